"""Benchmark of the objective (archer_async.loss), printed as Markdown.

1. Time of `policy_loss` forward + backward against a plain PPO-clip loss (ratio, clip, masked token
   mean) at B=64, T=4096 on CPU: variants interleaved in one run, median of --repeats.
2. Peak memory of `entropy_from_logits` (chunked) against the naive full-tensor formula, and of
   `logprobs_from_logits` forward + backward against log_softmax + gather, at B=1, T=4096,
   V=151936 with bf16 logits. Each variant runs in its own subprocess; the peak is the process's
   VmHWM after resetting it (/proc/self/clear_refs) once the logits exist, minus the RSS then.

    .venv/bin/python -m bench.bench_loss [--repeats 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from archer_async.loss import LossConfig, entropy_from_logits, logprobs_from_logits, policy_loss

VOCAB = 151936


def ppo_clip_loss(logp_bt, old_bt, adv_bt, mask_bt, eps: float = 0.2):
    """Plain PPO-clip: ratio against the old policy, symmetric clip, one masked token mean."""
    ratio = torch.exp(logp_bt - old_bt)
    loss_bt = torch.maximum(-adv_bt * ratio, -adv_bt * ratio.clamp(1 - eps, 1 + eps))
    return (loss_bt * mask_bt).sum() / mask_bt.sum()


def time_losses(b: int, t: int, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    prox = -torch.rand(b, t, generator=g) * 3
    logp = (prox + 0.2 * torch.randn(b, t, generator=g)).requires_grad_()
    behav = prox + 0.1 * torch.randn(b, t, generator=g)
    ref = prox + 0.1 * torch.randn(b, t, generator=g)
    ent = torch.rand(b, t, generator=g) * 2
    adv = torch.randn(b, 1, generator=g).expand(b, t).contiguous()
    lengths = torch.randint(t // 4, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    maskf = mask.float()
    variants = {
        "plain PPO-clip": lambda: ppo_clip_loss(logp, prox, adv, maskf),
        "policy_loss (defaults: token_tis, seq-mean-token-mean, KL low)": lambda: policy_loss(
            logp, prox, behav, ref, ent, adv, mask, LossConfig())[0],
        "policy_loss (token-mean, is none, no KL)": lambda: policy_loss(
            logp, prox, behav, None, ent, adv, mask,
            LossConfig(loss_agg="token-mean", is_correction="none", kl_coef_low_entropy=0.0))[0],
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats + 1):  # first round is warm-up
        for name, fn in variants.items():
            logp.grad = None
            t0 = time.perf_counter()
            fn().backward()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def memory_child(variant: str, t: int) -> None:
    """Run one variant in this process and print {"peak_mib", "seconds"} as JSON."""
    torch.manual_seed(0)
    logits = torch.randn(1, t, VOCAB, dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, t))
    if variant.startswith("logprobs"):
        logits.requires_grad_()
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    t0 = time.perf_counter()
    if variant == "entropy_chunked":
        entropy_from_logits(logits, 1.0)
    elif variant == "entropy_naive":
        z = logits.float() / 1.0
        _ = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)
    elif variant == "logprobs_chunked":
        logprobs_from_logits(logits, ids, 1.0).sum().backward()
    elif variant == "logprobs_naive":
        torch.log_softmax(logits.float() / 1.0, -1).gather(-1, ids[..., None]).sum().backward()
    else:
        raise SystemExit(f"unknown variant {variant}")
    seconds = time.perf_counter() - t0
    print(json.dumps({"peak_mib": (_rss_kib("VmHWM") - base) / 1024, "seconds": seconds}))


def measure_memory(variant: str, t: int, threads: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--t", str(t), "--threads", str(threads)],
        capture_output=True, text=True, timeout=900, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--b", type=int, default=64)
    ap.add_argument("--t", type=int, default=4096)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        memory_child(args.child, args.t)
        return

    print(f"## policy_loss forward+backward, B={args.b}, T={args.t}, float32, median of {args.repeats}\n")
    times = time_losses(args.b, args.t, args.repeats)
    base = times["plain PPO-clip"]
    print("| loss | median ms | ratio to plain PPO-clip |\n|---|---|---|")
    for name, sec in times.items():
        print(f"| {name} | {sec * 1e3:.1f} | {sec / base:.2f}x |")

    print(f"\n## peak memory above the logits, B=1, T={args.t}, V={VOCAB}, bf16 logits "
          f"({args.t * VOCAB * 2 / 2**20:.0f} MiB)\n")
    print("| function | variant | peak extra MiB | seconds | naive / chunked memory |\n|---|---|---|---|---|")
    for fn in ("entropy", "logprobs"):
        res = {v: measure_memory(f"{fn}_{v}", args.t, args.threads) for v in ("chunked", "naive")}
        ratio = res["naive"]["peak_mib"] / max(res["chunked"]["peak_mib"], 1e-9)
        for v, r in res.items():
            label = {"entropy": "entropy_from_logits", "logprobs": "logprobs_from_logits fwd+bwd"}[fn]
            print(f"| {label} | {v} | {r['peak_mib']:.0f} | {r['seconds']:.2f} | "
                  f"{f'{ratio:.1f}x' if v == 'naive' else ''} |")


if __name__ == "__main__":
    main()

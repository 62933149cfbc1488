"""Learner throughput on CPU for the tiny model: tokens/s of full training steps at world size 1 and 2.

    .venv/bin/python -m bench.bench_learner [--steps 3] [--worlds 1 2] [--groups 8] [--samples 8] [--threads 1]

Model: the shipped tiny model (archer_async/assets/tiny) when it exists, else a random-init Qwen2 of the
tiny model's shape (hidden 128, 3 layers, 2 heads of 64, vocab 512). Data: synthetic TrajectoryGroups
(prompt 24-56 tokens, response 16-64 tokens, mixed rewards). Each world size runs in its own spawned
processes over gloo on 127.0.0.1; one warm-up step, then `--steps` timed steps. Also times one
checkpoint save, one HF export and one full-weight gather. Prints one JSON line per world size.

    .venv/bin/python -m bench.bench_learner --packing [--steps 2] [--budget 4160] [--padded-micro-batch 4 1]

Padded vs packed micro-batches side by side on a long-tailed length distribution (`packing_comparison`):
a random-init Qwen2 of ~13.5M parameters (hidden 384, 6 layers, vocab 8192), responses log-normal between
64 and 4,096 tokens (median 384), prompts 32-64 tokens; each mode runs the same steps in its own 1-rank
process (one warm-up step, then `--steps` timed). Reports per mode: tokens/s (prompt + response tokens
per second of learner step), the fraction of computed positions that are padding, and the peak memory of
the timed steps above the process's memory before them (peak RSS on CPU via /proc VmHWM, reset with
clear_refs; torch.cuda.max_memory_allocated on GPU). bench/gpu_learner.py calls the same function with
a GPU-sized model.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.multiprocessing as mp

from archer_async.config import Config
from archer_async.types import Reward, Sample, TrajectoryGroup


def model_dir(tmp: Path) -> Path:
    """The tiny model if it is built, else a random-init model of its shape in `tmp`."""
    try:
        from archer_async.config import TINY_MODEL_DIR

        p = TINY_MODEL_DIR
        if (p / "config.json").is_file():
            return p
    except ImportError:
        pass
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    out = tmp / "model"
    Qwen2ForCausalLM(cfg).save_pretrained(str(out))
    return out


def groups(step: int, n_groups: int, n_samples: int, vocab: int) -> list[TrajectoryGroup]:
    rng = random.Random(step)
    out = []
    for g in range(n_groups):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(24, 56))]
        samples = []
        for s in range(n_samples):
            t = rng.randint(16, 64)
            samples.append(Sample(f"b-{step}-{g}-{s}", [rng.randrange(3, vocab) for _ in range(t)],
                                  [-6.0] * t, [0] * t, "stop", Reward("pass" if (s + g) % 2 else "fail")))
        out.append(TrajectoryGroup(f"b-g{step}-{g}", g, "bench", prompt, samples))
    return out


def worker(rank, world, port, args, mdir, run_dir, out_file):
    from learner.trainer import Learner

    cfg = Config.model_validate({
        "run_dir": run_dir,
        "learner": {"num_ranks": world, "batch_groups": args.groups, "mini_batch_groups": args.groups,
                    "micro_batch_size": args.micro_batch, "cpus_per_rank": args.threads},
    })
    lrn = Learner(cfg, rank, world, "127.0.0.1", port, run_dir, mdir)
    vocab = lrn.model.config.vocab_size
    lrn.step(groups(0, args.groups, args.samples, vocab) if rank == 0 else None)  # warm-up
    rates, secs = [], []
    for i in range(args.steps):
        m = lrn.step(groups(i + 1, args.groups, args.samples, vocab) if rank == 0 else None)
        rates.append(m["learner/tokens_per_s"])
        secs.append(m["learner/step_s"])
    t0 = time.perf_counter()
    n = sum(1 for _ in lrn.iter_weights())
    gather_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lrn.save_checkpoint(args.steps + 1, {})
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lrn.export_hf()
    export_s = time.perf_counter() - t0
    lrn.close()
    if rank == 0:
        Path(out_file).write_text(json.dumps({
            "world_size": world, "tokens_per_step": m["learner/tokens"], "tokens_per_s_median": statistics.median(rates),
            "step_s_median": statistics.median(secs), "gather_s": gather_s, "tensors": n, "checkpoint_s": save_s,
            "export_hf_s": export_s, "params": sum(p.numel() for p in lrn.model.parameters()),
        }))


PACKING_SHAPE = dict(vocab_size=8192, hidden_size=384, intermediate_size=1152, num_hidden_layers=6,
                     num_attention_heads=6, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                     tie_word_embeddings=True)


def lognormal_lengths(rng: random.Random, n: int, lo: int = 64, hi: int = 4096, median: float = 384.0,
                      sigma: float = 1.0) -> list[int]:
    """`n` response lengths, log-normal (median `median`, log-sd `sigma`) clipped to [lo, hi]."""
    return [min(hi, max(lo, int(round(math.exp(rng.gauss(math.log(median), sigma)))))) for _ in range(n)]


def long_tailed_groups(step: int, n_groups: int, n_samples: int, vocab: int, max_response: int) -> list[TrajectoryGroup]:
    """Groups with prompts of 32-64 tokens and log-normal responses of 64..max_response tokens (seeded by step)."""
    rng = random.Random(10_000 + step)
    out = []
    for g in range(n_groups):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(32, 64))]
        samples = []
        for s, t in enumerate(lognormal_lengths(rng, n_samples, hi=max_response)):
            samples.append(Sample(f"p-{step}-{g}-{s}", [rng.randrange(3, vocab) for _ in range(t)],
                                  [-6.0] * t, [0] * t, "stop", Reward("pass" if (s + g) % 2 else "fail")))
        out.append(TrajectoryGroup(f"p-g{step}-{g}", g, "bench", prompt, samples))
    return out


def _peak_reset(device: torch.device) -> int:
    """Reset the peak-memory counter; returns the current memory in bytes (RSS on CPU, allocated on GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    return _proc_kib("VmRSS") * 1024


def _peak_read(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _proc_kib("VmHWM") * 1024


def _proc_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def packing_worker(mode: dict, spec: dict, mdir: str, run_dir: str, out_file: str) -> None:
    """One mode (padded micro_batch_size or packed token budget) in its own 1-rank process."""
    from learner.trainer import Learner

    learner = {"num_ranks": 1, "batch_groups": spec["groups"], "mini_batch_groups": spec["groups"],
               "cpus_per_rank": spec["threads"], "gpus_per_rank": 1 if spec["gpu"] else 0}
    if mode["kind"] == "packed":
        learner["max_tokens_per_micro_batch"] = mode["budget"]
    else:
        learner["micro_batch_size"] = mode["micro_batch_size"]
    learner["activation_checkpointing"] = spec["activation_checkpointing"]
    cfg = Config.model_validate({
        "run_dir": run_dir, "learner": learner, "model": {"dtype": spec["dtype"]},
        "data": {"max_prompt_length": 64}, "actors": {"max_response_length": spec["max_response"]},
    })
    lrn = Learner(cfg, 0, 1, "127.0.0.1", free_port(), run_dir, mdir)
    vocab = lrn.model.config.vocab_size
    gen = lambda i: long_tailed_groups(i, spec["groups"], spec["samples"], vocab, spec["max_response"])  # noqa: E731
    lrn.step(gen(0))  # warm-up
    base = _peak_reset(lrn.device)
    tokens, secs, pads = 0, 0.0, []
    for i in range(spec["steps"]):
        m = lrn.step(gen(i + 1))
        tokens += m["learner/tokens"]
        secs += m["learner/step_s"]
        pads.append(m["learner/padding_fraction"])
    peak = _peak_read(lrn.device)
    res = {"mode": mode, "attn": lrn.attn_implementation, "tokens": tokens, "seconds": round(secs, 2),
           "tokens_per_s": round(tokens / secs, 1), "padding_fraction": round(statistics.mean(pads), 4),
           "peak_mem_above_start_mib": round((peak - base) / 2**20, 1), "loss_last": m["loss"],
           "params": sum(p.numel() for p in lrn.model.parameters())}
    lrn.close()
    Path(out_file).write_text(json.dumps(res))


def packing_comparison(modes: list[dict], *, steps: int = 2, groups: int = 2, samples: int = 4,
                       max_response: int = 4096, threads: int = 1, shape: dict = PACKING_SHAPE,
                       gpu: bool = False, dtype: str = "float32", activation_checkpointing: bool = False,
                       model_path: Optional[Path] = None) -> list[dict]:
    """Run every mode ({"kind": "padded", "micro_batch_size": m} or {"kind": "packed", "budget": b}) on the same
    long-tailed steps, each in its own spawned 1-rank learner; returns one result dict per mode.
    `model_path`: an existing HF model directory; None builds a random-init Qwen2 of `shape` (on the CPU)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    spec = {"steps": steps, "groups": groups, "samples": samples, "max_response": max_response, "threads": threads,
            "gpu": gpu, "dtype": dtype, "activation_checkpointing": activation_checkpointing}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mdir = model_path
        if mdir is None:
            torch.manual_seed(0)
            mdir = tmp / "model"
            Qwen2ForCausalLM(Qwen2Config(pad_token_id=0, eos_token_id=1, **shape)).save_pretrained(str(mdir))
        ctx = mp.get_context("spawn")
        for i, mode in enumerate(modes):
            out_file = tmp / f"mode-{i}.json"
            p = ctx.Process(target=packing_worker, args=(mode, spec, str(mdir), str(tmp / f"run{i}"),
                                                         str(out_file)))
            p.start()
            p.join()
            if p.exitcode:
                raise SystemExit(f"mode {mode}: the learner process failed (exit {p.exitcode})")
            results.append(json.loads(out_file.read_text()))
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (learner.cpus_per_rank)")
    ap.add_argument("--packing", action="store_true", help="padded vs packed on long-tailed lengths (see above)")
    ap.add_argument("--budget", type=int, default=4160, help="--packing: learner.max_tokens_per_micro_batch")
    ap.add_argument("--padded-micro-batch", type=int, nargs="+", default=[4, 1],
                    help="--packing: micro_batch_size of each padded mode")
    args = ap.parse_args()
    if args.packing:
        modes = [{"kind": "padded", "micro_batch_size": m} for m in args.padded_micro_batch]
        modes.append({"kind": "packed", "budget": args.budget})
        res = packing_comparison(modes, steps=args.steps, groups=args.groups, samples=args.samples,
                                 threads=args.threads)
        for r in res:
            print(json.dumps(r), flush=True)
        packed = res[-1]
        for r in res[:-1]:
            print(json.dumps({"packed_vs": r["mode"], "tokens_per_s_ratio": round(packed["tokens_per_s"] / r["tokens_per_s"], 2)}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mdir = model_dir(tmp)
        for world in args.worlds:
            out_file = tmp / f"res-{world}.json"
            port = free_port()
            ctx = mp.get_context("spawn")
            procs = [ctx.Process(target=worker, args=(r, world, port, args, str(mdir), str(tmp / f"run{world}"),
                                                      str(out_file))) for r in range(world)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            if any(p.exitcode for p in procs):
                raise SystemExit(f"world size {world}: a rank failed")
            res = json.loads(out_file.read_text())
            res["model"] = str(mdir) if "assets" in str(mdir) else "random-init tiny-shape Qwen2"
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()

"""One-GPU learner benchmark: tokens/s and MFU of a training step of a random-init Qwen2-1.5B, and the
time to gather and send its weights.

    python -m bench.gpu_learner                 # Qwen2-1.5B shape, bf16, sequence 4096
    python -m bench.gpu_learner --tiny          # tiny shape; runs on CPU too (smoke test)

What it does (no model download, no vLLM): builds a random-init model of the Qwen2-1.5B configuration
(28 layers, hidden 1536, 12 heads / 2 KV heads of 128, MLP 8960, vocab 151936, tied embeddings) in a
temporary directory; starts the project's `learner.trainer.Learner` as a 1-rank FSDP2 world (NCCL, bf16
parameters with fp32 master weights and fp32 gradient reduction, the frozen bf16 reference model of the
KL term); runs `--warmup` + `--steps` training steps, each one group of `--samples` sequences of
`--seq` tokens (prompt `--prompt` tokens) through the project's loss with micro-batch 1; then times a
full-weight gather (bf16, `--bucket-mb` buckets) and one weight update sent over the project's gloo
transfer path to a stand-alone receiver process on the same host (GPU -> host copy + loopback).

MFU = model FLOPs / (step seconds x peak bf16 dense FLOP/s). Model FLOPs per sequence of length s:
training 6 * N_body * s + 6 * L * d_attn * s^2 (causal attention fwd+bwd) + 6 * V * d * k (lm_head on
the k kept positions); the reference model's forward adds a third of that (reported separately as
`mfu_with_ref`). Peak: 989 TFLOP/s for H100 SXM / H200, 756 for H100 PCIe, 312 for A100, or --peak-tflops.
Prints one JSON object.

    python -m bench.gpu_learner --packing        # padded vs packed micro-batches, long-tailed lengths
    python -m bench.gpu_learner --packing --tiny # the same on the tiny shape (CPU smoke test)

`--packing` runs `packing_comparison_gpu`: the long-tailed comparison of `bench.bench_learner --packing`
(log-normal responses of 64..8,192 tokens) on the Qwen2-1.5B shape in bf16 with activation checkpointing:
padded `micro_batch_size` 1 and 4 against packed micro-batches of `--budget` tokens (varlen flash
attention when flash-attn is installed). Per mode: tokens/s, padding fraction and peak GPU memory
(torch.cuda.max_memory_allocated above the allocation before the timed steps). Prints one JSON line
per mode, then the tokens/s ratios.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

QWEN2_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, head_dim=128, max_position_embeddings=32768,
                  rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=True)
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0))


def build_model_dir(out: Path, shape: dict, device: torch.device, dtype: torch.dtype) -> Path:
    """Random-init Qwen2 of `shape`, saved as safetensors in `dtype` (initialised on `device` for speed)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(pad_token_id=0, eos_token_id=1, bos_token_id=1, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    model.to(dtype).save_pretrained(str(out))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def model_flops(cfg, seq: int, kept: int) -> float:
    """Training (fwd+bwd) FLOPs of one sequence of `seq` tokens with `kept` lm_head positions."""
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    d_attn = cfg.num_attention_heads * cfg.head_dim
    d_kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = d * d_attn + 2 * d * d_kv + d_attn * d + 3 * d * cfg.intermediate_size
    n_body = L * per_layer
    return 6.0 * n_body * seq + 6.0 * L * d_attn * seq * seq + 6.0 * V * d * kept


def make_groups(n_samples: int, seq: int, prompt: int, vocab: int):
    from archer_async.types import Reward, Sample, TrajectoryGroup

    g = torch.Generator().manual_seed(0)
    resp = seq - prompt
    samples = [Sample(f"gpu-{i}", torch.randint(3, vocab, (resp,), generator=g).tolist(), [-2.0] * resp, [0] * resp,
                      "length", Reward("pass" if i % 2 else "fail")) for i in range(n_samples)]
    return [TrajectoryGroup("gpu-g0", 0, "bench", torch.randint(3, vocab, (prompt,), generator=g).tolist(), samples)]


def receiver(init: dict, version: int, out_q) -> None:
    """Stand-alone weight receiver on the host: receive one update, report bytes and seconds."""
    from actors.weight_receiver import WeightReceiver

    rx = WeightReceiver(init)
    rx.connect()
    n = 0
    nbytes = 0
    for _, t in rx.receive(expected_version=version):
        n += 1
        nbytes += t.numel() * t.element_size()
    out_q.put({"tensors": n, "bytes": nbytes, **rx.last_stats})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def packing_comparison_gpu(tiny: bool = False, budget: int = 16384, max_response: int = 8192, groups: int = 2,
                           samples: int = 8, steps: int = 2, padded_micro_batch: tuple = (1, 4)) -> list[dict]:
    """Padded vs packed micro-batches on one GPU (CPU with `tiny`); returns bench_learner's per-mode results."""
    from bench.bench_learner import packing_comparison

    gpu = torch.cuda.is_available()
    if not gpu and not tiny:
        raise SystemExit("no CUDA device: run with --tiny for the CPU smoke test")
    device = torch.device("cuda") if gpu else torch.device("cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    shape = dict(TINY if tiny else QWEN2_1_5B)
    shape["max_position_embeddings"] = max(shape["max_position_embeddings"], budget)
    modes = [{"kind": "padded", "micro_batch_size": m} for m in padded_micro_batch]
    modes.append({"kind": "packed", "budget": budget})
    with tempfile.TemporaryDirectory() as tmp:
        mdir = build_model_dir(Path(tmp) / "model", shape, device, dtype)
        results = packing_comparison(
            modes, steps=steps, groups=groups, samples=samples, max_response=max_response, threads=1, gpu=gpu,
            dtype="bfloat16" if gpu else "float32", activation_checkpointing=not tiny, model_path=mdir)
    for r in results:
        r["device"] = torch.cuda.get_device_name() if gpu else "cpu"
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description="one-GPU learner step / weight-sync benchmark")
    ap.add_argument("--tiny", action="store_true", help="tiny model shape (CPU allowed)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 4096; 256 with --tiny)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens per sequence (default seq/8)")
    ap.add_argument("--samples", type=int, default=2, help="sequences per step (one group; micro-batch 1)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--no-send", action="store_true", help="skip the weight send (gather only)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--packing", action="store_true", help="padded vs packed micro-batches (packing_comparison_gpu)")
    ap.add_argument("--budget", type=int, default=None,
                    help="--packing: learner.max_tokens_per_micro_batch (default 16384; 1024 with --tiny)")
    args = ap.parse_args()
    if args.packing:
        kw = dict(budget=args.budget or 1024, max_response=512, samples=4) if args.tiny else {}
        if args.budget and not args.tiny:
            kw["budget"] = args.budget
        res = packing_comparison_gpu(tiny=args.tiny, steps=args.steps, **kw)
        for r in res:
            print(json.dumps(r), flush=True)
        for r in res[:-1]:
            print(json.dumps({"packed_vs": r["mode"], "tokens_per_s_ratio": round(res[-1]["tokens_per_s"] / r["tokens_per_s"], 2)}))
        return

    from archer_async.config import Config
    from archer_async.weight_sync import make_sync_init
    from learner.trainer import Learner

    gpu = torch.cuda.is_available()
    if not gpu and not args.tiny:
        raise SystemExit("no CUDA device: run with --tiny for the CPU smoke test")
    device = torch.device("cuda") if gpu else torch.device("cpu")
    seq = args.seq or (256 if args.tiny else 4096)
    prompt = args.prompt or max(1, seq // 8)
    dtype_name = "bfloat16" if gpu else "float32"
    out: dict = {"device": torch.cuda.get_device_name() if gpu else "cpu", "shape": "tiny" if args.tiny else "Qwen2-1.5B",
                 "seq": seq, "prompt": prompt, "samples_per_step": args.samples, "dtype": dtype_name,
                 "activation_checkpointing": args.activation_checkpointing, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        mdir = build_model_dir(tmp / "model", TINY if args.tiny else QWEN2_1_5B, device,
                               torch.bfloat16 if gpu else torch.float32)
        out["build_model_s"] = round(time.perf_counter() - t0, 1)
        cfg = Config.model_validate({
            "run_dir": str(tmp / "run"),
            "model": {"dtype": dtype_name},
            "learner": {"num_ranks": 1, "gpus_per_rank": 1 if gpu else 0, "batch_groups": 1, "mini_batch_groups": 1,
                        "micro_batch_size": 1, "activation_checkpointing": args.activation_checkpointing},
            "sync": {"bucket_mb": args.bucket_mb},
        })
        t0 = time.perf_counter()
        lrn = Learner(cfg, 0, 1, "127.0.0.1", free_port(), tmp / "run", mdir)
        out["learner_init_s"] = round(time.perf_counter() - t0, 1)
        out["attn_implementation"] = lrn.attn_implementation
        mcfg = lrn.model.config
        out["params"] = sum(p.numel() for p in lrn.model.parameters())
        groups = make_groups(args.samples, seq, prompt, mcfg.vocab_size)
        for _ in range(args.warmup):
            lrn.step(groups)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            sync(device)
            t0 = time.perf_counter()
            m = lrn.step(groups)
            sync(device)
            times.append(time.perf_counter() - t0)
        step_s = min(times)
        tokens = args.samples * seq
        train_flops = args.samples * model_flops(mcfg, seq, seq - prompt + 1)
        peak = args.peak_tflops
        if peak is None and gpu:
            name = torch.cuda.get_device_name()
            peak = next((v for k, v in PEAK_TFLOPS if k in name), None)
        out.update({
            "step_s": round(step_s, 4), "step_s_all": [round(t, 4) for t in times], "tokens_per_step": tokens,
            "tokens_per_s": round(tokens / step_s, 1), "loss": m["loss"], "grad_norm": m["grad_norm"],
            "train_tflops_per_step": round(train_flops / 1e12, 2),
            "achieved_tflops": round(train_flops / step_s / 1e12, 2),
            "peak_tflops": peak,
            "mfu": round(train_flops / step_s / (peak * 1e12), 4) if peak else None,
            "mfu_with_ref": round(train_flops * 4 / 3 / step_s / (peak * 1e12), 4) if peak else None,
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
        })
        sync(device)
        t0 = time.perf_counter()
        n_bytes = 0
        for _, t in lrn.iter_weights():
            n_bytes += t.numel() * t.element_size()
        sync(device)
        out["gather_s"] = round(time.perf_counter() - t0, 3)
        out["weights_gib"] = round(n_bytes / 2**30, 3)
        if not args.no_send:
            init = make_sync_init(num_actors=1, backend="gloo", timeout_s=300)
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            proc = ctx.Process(target=receiver, args=(init.for_rank(1).to_dict(), lrn.version, q))
            proc.start()
            res = lrn.broadcast_weights(lrn.version, init.to_dict())
            got = q.get(timeout=300)
            proc.join(60)
            out["send"] = {"ok": res["ok"], "error": res["error"], "gather_and_send_s": round(res["seconds"], 3),
                           "backend": "gloo (GPU -> host, loopback)", "received_tensors": got["tensors"],
                           "received_gib": round(got["bytes"] / 2**30, 3)}
        lrn.close()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

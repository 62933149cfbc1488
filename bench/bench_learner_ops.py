"""Per-update learner overheads on real FSDP2 shards over gloo, old and new way side by side.

    .venv/bin/python -m bench.bench_learner_ops [--ranks 2] [--reps 3] [--iters 20] [--model DIR]

`--ranks` spawned processes on 127.0.0.1 (one torch thread each) shard the model (default: the
embedded tiny model) with `learner.model.shard_model` and time, interleaved within each repetition:

- full-weight gather (what every weight sync and HF export does): one `DTensor.full_tensor()` per
  parameter (one collective each, the previous code) vs `learner.weights.iter_full_weights` (one
  all-gather per bucket, `gather_bucket`); fp32, 256 MB buckets;
- gradient clipping + AdamW step: per-tensor loops (`foreach=False`, the previous CPU setting) vs
  `foreach=True`, after a backward pass on a fixed batch, each from the same seed; the final weights
  of both are compared bit for bit.

Printed: milliseconds per operation on rank 0 (mean over `--iters` calls, every repetition).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

def _sharded(model_dir: str, world: int):
    from torch.distributed.device_mesh import init_device_mesh

    from learner.model import load_causal_lm, shard_model

    mesh = init_device_mesh("cpu", (world,))
    model = load_causal_lm(model_dir, "sdpa", torch.device("cpu"))
    return shard_model(model, mesh, torch.float32, torch.float32)


def _timed(fn, iters: int) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return 1e3 * (time.perf_counter() - t0) / iters


def _worker(rank: int, world: int, port: int, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from learner import weights as W

    say = print if rank == 0 else (lambda *a, **k: None)
    model = _sharded(args.model, world)
    named = W.named_trainable_tensors(model)

    def per_parameter():
        for bucket in W.plan_buckets(named, 256 << 20, torch.float32):
            for i in bucket:
                W._full(named[i][1], torch.float32)

    def batched():
        for _ in W.iter_full_weights(model, rank, torch.float32, 256 << 20):
            pass

    ids = torch.randint(3, 500, (8, 48), generator=torch.Generator().manual_seed(1))
    final = {}
    for rep in range(args.reps):
        for name, fn in (("gather: per-parameter full_tensor", per_parameter),
                         ("gather: one all-gather per bucket", batched)):
            say(f"rep {rep} {name:36s} {_timed(fn, args.iters):7.2f} ms", flush=True)
        for foreach in (False, True):
            torch.manual_seed(0)
            m = _sharded(args.model, world)
            params = [p for p in m.parameters()]
            opt = torch.optim.AdamW(params, lr=1e-3, foreach=foreach)
            clip_ms = step_ms = 0.0
            for _ in range(args.iters):
                m(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
                dist.barrier()
                t0 = time.perf_counter()
                norm = torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=foreach)
                float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                t1 = time.perf_counter()
                opt.step()
                opt.zero_grad(set_to_none=True)
                clip_ms += 1e3 * (t1 - t0)
                step_ms += 1e3 * (time.perf_counter() - t1)
            final[foreach] = [p.full_tensor() for p in params]
            say(f"rep {rep} clip + AdamW, foreach={foreach!s:5s}            clip {clip_ms / args.iters:6.2f} ms"
                f"  step {step_ms / args.iters:6.2f} ms", flush=True)
        same = all(torch.equal(a, b) for a, b in zip(final[False], final[True]))
        say(f"rep {rep} AdamW foreach and per-tensor weights bitwise equal: {same}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--model", default="", help="HF model directory (default: the embedded tiny model)")
    args = ap.parse_args()
    if not args.model:
        from archer_async.config import TINY_MODEL_DIR

        args.model = str(TINY_MODEL_DIR)
    from archer_async.weight_sync import free_port

    print(f"{args.ranks} gloo ranks, model {args.model}, load average {os.getloadavg()}", flush=True)
    mp.spawn(_worker, args=(args.ranks, free_port(), args), nprocs=args.ranks)


if __name__ == "__main__":
    main()

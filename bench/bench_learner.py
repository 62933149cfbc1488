"""Learner throughput on CPU for the tiny model: tokens/s of full training steps at world size 1 and 2.

    .venv/bin/python -m bench.bench_learner [--steps 3] [--worlds 1 2] [--groups 8] [--samples 8] [--threads 1]

Model: the shipped tiny model (archer_async/assets/tiny) when it exists, else a random-init Qwen2 of the
tiny model's shape (hidden 128, 3 layers, 2 heads of 64, vocab 512). Data: synthetic TrajectoryGroups
(prompt 24-56 tokens, response 16-64 tokens, mixed rewards). Each world size runs in its own spawned
processes over gloo on 127.0.0.1; one warm-up step, then `--steps` timed steps. Also times one
checkpoint save, one HF export and one full-weight gather. Prints one JSON line per world size.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import tempfile
import time
from pathlib import Path

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
    args = ap.parse_args()
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

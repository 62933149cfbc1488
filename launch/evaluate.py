"""`archer-async eval --model PATH --data FILE [--k K]`: avg@K and pass@K (docs/algorithm.md section 9).

Generation runs on one vLLM engine: an actor role built in this process (through the role contract,
`archer_async.roles.ACTOR`, with no buffer and no weight updates); every response is graded by the reward pool with all of its tests (the sandbox for code, math-verify for math).
Problems go through in chunks, with a progress bar; the report is printed and optionally written
as JSON (atomically).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

from archer_async import roles
from archer_async.config import UserError, build_config
from launch.evaluation import summarize
from archer_async.fsio import atomic_write_text


def eval_main(args) -> int:
    from archer_async.data import load_dataset

    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise UserError(f"--model {str(model)!r}: not a Hugging Face model directory (no config.json)")
    if args.k < 1:
        raise UserError(f"--k must be >= 1, got {args.k}")
    from rewards import check_row

    rows = load_dataset([args.data], check=check_row)
    if args.limit:
        rows = rows[: args.limit]
    if not rows:
        raise UserError(f"--data {args.data!r}: no rows")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    cfg = build_config({
        "model": {"path": str(model)},
        "data": {"train_files": [args.data], "eval_files": [args.data], "shuffle": False},
        "actors": {"num_actors": 1, "max_response_length": args.max_tokens, "eval_temperature": args.temperature},
        "run_dir": tempfile.mkdtemp(prefix="archer-eval-"),
    })
    from tqdm import tqdm

    print(f"[archer-async] evaluating {model} on {len(rows)} problems x {args.k} samples "
          f"(T={args.temperature}, max {args.max_tokens} tokens)", file=sys.stderr, flush=True)
    try:
        actor = roles.construct(roles.ACTOR, cfg, 0, cfg.run_dir, connect_buffer=False)
    except BaseException:
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        raise
    t0 = time.time()
    per_problem: list = []
    try:
        chunk = max(1, 64 // args.k)
        with tqdm(total=len(rows), unit="problem", file=sys.stderr) as bar:
            for i in range(0, len(rows), chunk):
                part = rows[i:i + chunk]
                per_problem += actor.evaluate_rewards(part, args.k, temperature=args.temperature,
                                                      max_tokens=args.max_tokens)
                bar.update(len(part))
    finally:
        actor.stop()
        shutil.rmtree(cfg.run_dir, ignore_errors=True)  # the engine's scratch run directory
    s = summarize(per_problem, args.k)
    by_source: dict[str, list] = {}
    for row, rewards in zip(rows, per_problem):
        by_source.setdefault(row["data_source"], []).append(rewards)
    report = {
        "model": str(model), "data": str(args.data), "k": args.k, "temperature": args.temperature,
        "max_tokens": args.max_tokens, f"avg@{args.k}": s["avg_at_k"], f"pass@{args.k}": s["pass_at_k"],
        "problems": s["problems"], "samples": s["samples"], "infra_errors": s["infra_errors"],
        "by_data_source": {src: summarize(v, args.k) for src, v in sorted(by_source.items())},
        "seconds": round(time.time() - t0, 2),
    }
    text = json.dumps(report, indent=2)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    print(text)
    return 0

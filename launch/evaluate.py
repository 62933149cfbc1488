"""`archer-async eval --model PATH --data FILE [--k K]`: avg@K and pass@K (docs/algorithm.md section 9).

Generation runs on one vLLM engine: an actor role built in this process (through the role contract,
`archer_async.roles.ACTOR`, with no buffer and no weight updates); every response is graded by the reward pool with all of its tests (the sandbox for code, math-verify for math).
Problems go through in chunks, with a progress bar; the report is printed and optionally written
as JSON (atomically). `--max-tokens` is fitted to the model's context length (max_position_embeddings)
after the longest prompt: clamped with one line, or refused (exit 2) when no token fits. vLLM's own
output goes to a log file, kept and named only when the evaluation fails (`--verbose`: the terminal).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from archer_async import roles
from archer_async.config import UserError, build_config
from launch.evaluation import summarize
from archer_async.fsio import atomic_write_text


def _fit_max_tokens(model: Path, rows: list[dict], max_tokens: int, say) -> tuple[int, int]:
    """(max_tokens, longest prompt) within the model's context length: a --max-tokens that does not
    fit after the longest prompt is clamped with one line; no room at all is a UserError."""
    from transformers import AutoTokenizer

    from archer_async.data import prompt_ids
    from archer_async.modelinfo import context_length

    if max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    longest = max(len(prompt_ids(tokenizer, row)) for row in rows)
    ctx = context_length(model)
    if ctx is None:
        return max_tokens, longest
    room = ctx - longest
    if room < 1:
        raise UserError(f"--data: the longest prompt has {longest} tokens, the model's context length "
                        f"(max_position_embeddings in {model / 'config.json'}) is {ctx}: no room to generate")
    if max_tokens > room:
        say(f"[archer-async] --max-tokens {max_tokens} does not fit the model's context length {ctx} after "
            f"prompts of up to {longest} tokens: generating at most {room} tokens")
        max_tokens = room
    return max_tokens, longest


class _QuietFds:
    """Send this process's fds 1 and 2 (and so vLLM's logs and its engine process's) to a log file;
    `self.err` writes to the terminal's stderr. `restore()` puts the fds back."""

    def __init__(self, log_path: Path):
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = (os.dup(1), os.dup(2))
        self.err = os.fdopen(os.dup(2), "w", buffering=1)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)

    def restore(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.err.close()


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
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    max_tokens, longest = _fit_max_tokens(model, rows, args.max_tokens, say)
    scratch = tempfile.mkdtemp(prefix="archer-eval-")
    cfg = build_config({
        "model": {"path": str(model)},
        "data": {"train_files": [args.data], "eval_files": [args.data], "shuffle": False,
                 "max_prompt_length": longest},
        "actors": {"num_actors": 1, "max_response_length": max_tokens, "max_model_len": longest + max_tokens,
                   "eval_temperature": args.temperature},
        "run_dir": scratch,
    })
    from tqdm import tqdm

    say(f"[archer-async] evaluating {model} on {len(rows)} problems x {args.k} samples "
        f"(T={args.temperature}, max {max_tokens} tokens)")
    verbose = bool(getattr(args, "verbose", False))
    log_path = Path(scratch) / "eval.log"
    quiet = None if verbose else _QuietFds(log_path)
    err = sys.stderr if quiet is None else quiet.err
    t0 = time.time()
    per_problem: list = []
    ok = False
    try:
        actor = roles.construct(roles.ACTOR, cfg, 0, cfg.run_dir, connect_buffer=False)
        try:
            chunk = max(1, 64 // args.k)
            with tqdm(total=len(rows), unit="problem", file=err) as bar:
                for i in range(0, len(rows), chunk):
                    part = rows[i:i + chunk]
                    per_problem += actor.evaluate_rewards(part, args.k, temperature=args.temperature,
                                                          max_tokens=max_tokens)
                    bar.update(len(part))
        finally:
            actor.stop()
        ok = True
    except Exception:
        if quiet is not None:
            traceback.print_exc()  # into the log, which is kept and named below
        else:
            raise
    finally:
        if quiet is not None:
            quiet.restore()
        if not ok and quiet is not None:
            kept = Path(tempfile.gettempdir()) / f"archer-eval-{os.getpid()}.log"
            shutil.copyfile(log_path, kept)
            shutil.rmtree(scratch, ignore_errors=True)
            print(f"archer-async: eval failed; vLLM's log and the error are in {kept}", file=sys.stderr)
        shutil.rmtree(scratch, ignore_errors=True)  # the engine's scratch run directory
    if not ok:
        return 1
    s = summarize(per_problem, args.k)
    by_source: dict[str, list] = {}
    for row, rewards in zip(rows, per_problem):
        by_source.setdefault(row["data_source"], []).append(rewards)
    report = {
        "model": str(model), "data": str(args.data), "k": args.k, "temperature": args.temperature,
        "max_tokens": max_tokens, f"avg@{args.k}": s["avg_at_k"], f"pass@{args.k}": s["pass_at_k"],
        "problems": s["problems"], "samples": s["samples"], "infra_errors": s["infra_errors"],
        "by_data_source": {src: summarize(v, args.k) for src, v in sorted(by_source.items())},
        "seconds": round(time.time() - t0, 2),
    }
    text = json.dumps(report, indent=2)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    print(text)
    return 0

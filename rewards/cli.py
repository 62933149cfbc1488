"""`archer-async score INPUT.jsonl [-o OUT.jsonl] [--workers N] [--sandbox bwrap|none] [--timeout S]`.

Each input line is a verl row (data_source, reward_model.ground_truth, any other fields) plus a
`response` string. Each output line keeps every input field in input order and adds `reward` (1, 0, or
null for infra errors), `status` (pass, fail, timeout, infra_error) and `reason`. The whole input is
validated before anything is graded; the output is written to a temp file and renamed into place.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

from archer_async.config import RewardsConfig, UserError
from archer_async.fsio import atomic_write_text

from .pool import RewardPool, check_row
from .sandbox import SandboxUnavailable


class ScoreInputError(UserError, ValueError):
    """A malformed line of the `score` input file (the message names file and line)."""


def read_rows(path: str) -> list[dict]:
    """Parse and validate every line; ScoreInputError naming file:line on the first bad one."""
    p = Path(path)
    if not p.is_file():
        raise ScoreInputError(f"{path}: no such file")
    rows = []
    with p.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ScoreInputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ScoreInputError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if not isinstance(row.get("data_source"), str):
                raise ScoreInputError(f"{where}: missing string field 'data_source'")
            rm = row.get("reward_model")
            if not isinstance(rm, dict) or "ground_truth" not in rm:
                raise ScoreInputError(f"{where}: missing field 'reward_model.ground_truth'")
            if not isinstance(row.get("response"), str):
                raise ScoreInputError(f"{where}: missing string field 'response'")
            try:
                check_row(row)
            except ValueError as e:
                raise ScoreInputError(f"{where}: {e}") from None
            rows.append(row)
    return rows


def score_main(args) -> int:
    """Handler of `archer-async score` (argparse namespace: input, output, workers, sandbox, timeout)."""
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.timeout is not None and not (args.timeout > 0):
        raise UserError(f"--timeout must be > 0, got {args.timeout}")
    rows = read_rows(args.input)
    cfg = RewardsConfig(workers=args.workers, sandbox=args.sandbox,
                        **({} if args.timeout is None else {"timeout_s": args.timeout}))
    items = [(r["data_source"], r["reward_model"]["ground_truth"], r["response"]) for r in rows]
    from tqdm import tqdm
    t0 = time.monotonic()
    try:
        pool = RewardPool(cfg)
    except SandboxUnavailable as e:
        print(f"archer-async score: {e}", file=sys.stderr)
        return 1
    with pool, tqdm(total=len(items), desc="scoring", unit="sample", file=sys.stderr,
                                       mininterval=0.5) as bar:
        rewards = pool.score(items, training=False, progress=bar.update)
    seconds = time.monotonic() - t0
    out_lines = []
    for row, r in zip(rows, rewards):
        v = r.value
        out = {**row, "reward": None if v is None else int(v), "status": r.status, "reason": r.reason}
        out_lines.append(json.dumps(out, ensure_ascii=False) + "\n")
    if args.output:
        atomic_write_text(args.output, "".join(out_lines))
    else:
        sys.stdout.writelines(out_lines)
        sys.stdout.flush()
    counts = Counter(r.status for r in rewards)
    scored = [r.value for r in rewards if r.value is not None]
    mean = sum(scored) / len(scored) if scored else float("nan")
    print(f"scored {len(rewards)} samples in {seconds:.1f}s ({len(rewards) / max(seconds, 1e-9):.1f}/s): "
          + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("pass", "fail", "timeout", "infra_error"))
          + f"; mean reward {mean:.3f} (infra errors excluded)", file=sys.stderr)
    return 0

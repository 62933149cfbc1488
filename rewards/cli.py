"""`archer-async score INPUT.jsonl [-o OUT.jsonl] [--workers N] [--sandbox bwrap|none] [--timeout S]`.

Each input line is a verl row (data_source, reward_model.ground_truth, any other fields) plus a
`response` string. Each output line keeps every input field in input order and adds `reward` (1, 0, or
null for infra errors), `status` (pass, fail, timeout, infra_error) and `reason`. The whole input is
validated and the output path opened before anything is graded; rows are written as they are graded.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

from pydantic import ValidationError

from archer_async.config import RewardsConfig, UserError, format_validation_error

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
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ScoreInputError(f"{where}: not UTF-8 text (byte {e.start} of the line: {e.reason})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ScoreInputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise ScoreInputError(f"{where}: not valid JSON (nested too deeply)") from None
            except ValueError as e:  # e.g. an integer past Python's 4,300-digit conversion limit
                raise ScoreInputError(f"{where}: not valid JSON ({str(e).split(';')[0]})") from None
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


def open_output(path: str, input_path: str):
    """Open `-o` for writing before anything is graded: a directory, an unwritable path or the input
    file itself is a UserError naming it (after all the grading, it would lose the batch)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"-o {path}: is a directory; name a file (e.g. {p / 'scored.jsonl'})")
    if p.exists() and Path(input_path).exists() and p.resolve() == Path(input_path).resolve():
        raise UserError(f"-o {path}: is the input file; write the scores to another file")
    parent = next((a for a in p.absolute().parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"-o {path}: cannot write there ({parent} is not a directory)")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        return open(p, "w", encoding="utf-8")
    except OSError as e:
        raise UserError(f"-o {path}: cannot write there ({e.strerror or e})") from None


def output_line(row: dict, reward) -> str:
    """One output JSONL line: the input row plus reward, status, reason. A string the input held as a
    lone UTF-16 surrogate escape (e.g. "\\ud800", not encodable as UTF-8) is written escaped, as it came."""
    v = reward.value
    out = {**row, "reward": None if v is None else int(v), "status": reward.status, "reason": reward.reason}
    line = json.dumps(out, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(out, ensure_ascii=True)
    return line + "\n"


def score_main(args) -> int:
    """Handler of `archer-async score` (argparse namespace: input, output, workers, sandbox, timeout).

    Rows are written (and flushed) as each chunk of them is graded, in input order, so an interrupted
    run keeps what it graded; the output path is opened before grading starts."""
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UserError(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
    rows = read_rows(args.input)
    try:
        cfg = RewardsConfig(workers=args.workers, sandbox=args.sandbox,
                            **({} if args.timeout is None else {"timeout_s": args.timeout}))
    except ValidationError as e:
        raise UserError(format_validation_error(e).replace("invalid config: ", "score: ")) from None
    items = [(r["data_source"], r["reward_model"]["ground_truth"], r["response"]) for r in rows]
    out = open_output(args.output, args.input) if args.output else sys.stdout
    from tqdm import tqdm
    t0 = time.monotonic()
    try:
        pool = RewardPool(cfg)
    except SandboxUnavailable as e:
        print(f"archer-async score: {e}", file=sys.stderr)
        return 1
    rewards = []
    chunk = max(16, 8 * cfg.workers)  # rows graded in parallel, then written before the next chunk
    try:
        with pool, tqdm(total=len(items), desc="scoring", unit="sample", file=sys.stderr, mininterval=0.5) as bar:
            for start in range(0, len(items), chunk):
                got = pool.score(items[start:start + chunk], training=False, progress=bar.update)
                out.writelines(output_line(row, r) for row, r in zip(rows[start:start + chunk], got))
                out.flush()
                rewards.extend(got)
        if out is not sys.stdout:
            os.fsync(out.fileno())
    finally:
        if out is not sys.stdout:
            out.close()
    seconds = time.monotonic() - t0
    counts = Counter(r.status for r in rewards)
    scored = [r.value for r in rewards if r.value is not None]
    mean = sum(scored) / len(scored) if scored else float("nan")
    print(f"scored {len(rewards)} samples in {seconds:.1f}s ({len(rewards) / max(seconds, 1e-9):.1f}/s): "
          + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("pass", "fail", "timeout", "infra_error"))
          + f"; mean reward {mean:.3f} (infra errors excluded)", file=sys.stderr)
    return 0

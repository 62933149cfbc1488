"""Grader throughput on realistic rows, before (a baseline commit's `rewards/`) and after (this checkout).

    .venv/bin/python -m bench.bench_sandbox --base main --repeat 2 --workers 2

Rows: the correct responses of tests/data/rewards_realdata.jsonl's code rows (public problems with
several tests each: Codeforces / CodeContests / TACO stdin, LeetCode and HumanEval functional,
LiveCodeBench stdin and call-based), without the rows that sleep on purpose (tags limits / timeout),
each graded `--repeat` times with training=False (every test). The baseline's `rewards/` package is
taken from git (`git archive BASE rewards`) and imported as `rewards_base`; data sources it does not know
(taco, codeforces, leetcode) are given as "code", the same items go to both. Both pools use 10 s per
program run and `--workers` threads; pool start-up (the sandbox probe) is not timed. Variants alternate
(base, after, base, after) in one run, and the load average is printed with each.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from archer_async.config import RewardsConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "rewards_realdata.jsonl"
_BASE_KNOWN = ("code", "humanevalplus", "tiny_code")


def load_items() -> tuple[list, int]:
    """(items, total tests) of the benchmark rows."""
    items, tests = [], 0
    for line in DATA.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r["category"] == "math" or r["expected"] != "pass" or {"limits", "timeout"} & set(r["tags"]):
            continue
        gt = json.loads(r["reward_model"]["ground_truth"])
        tests += len(gt) if isinstance(gt, list) else len(gt.get("inputs", [0]))
        items.append((r["data_source"], r["reward_model"]["ground_truth"], r["response"]))
    return items, tests


def base_package(base: str) -> str:
    """Extract the baseline's rewards/ as package `rewards_base` in a temp dir; returns that dir."""
    d = tempfile.mkdtemp(prefix="bench-sandbox-base-")
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", base, "rewards"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", d], input=tar, check=True)
    os.rename(os.path.join(d, "rewards"), os.path.join(d, "rewards_base"))
    return d


def run(pool_cls, cfg, items, repeat: int) -> tuple[float, dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pool_cls(cfg) as pool:
            t0 = time.perf_counter()
            rewards = pool.score(items * repeat, training=False)
            dt = time.perf_counter() - t0
    counts: dict = {}
    for r in rewards:
        counts[r.status] = counts.get(r.status, 0) + 1
    return dt, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="main", help="git revision of the baseline grader (default main)")
    ap.add_argument("--repeat", type=int, default=2, help="times each row is graded per variant")
    ap.add_argument("--rounds", type=int, default=2, help="base/after alternations")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    items, tests = load_items()
    sys.path.insert(0, base_package(args.base))
    base_pool = importlib.import_module("rewards_base").RewardPool
    from rewards import RewardPool

    base_items = [(s if s in _BASE_KNOWN or s.startswith("livecodebench") else "code", g, r) for s, g, r in items]
    # the baseline's RewardsConfig fields are a subset of this one's; cpu_time_s must be set for it
    base_cfg = RewardsConfig(workers=args.workers, timeout_s=10.0, cpu_time_s=10)
    new_cfg = RewardsConfig(workers=args.workers, timeout_s=10.0, functional_timeout_s=10.0, lcb_timeout_s=10.0)
    n = len(items) * args.repeat
    print(f"{len(items)} rows ({tests} tests) x {args.repeat}, {args.workers} workers, base {args.base}", flush=True)
    results: dict = {"before": [], "after": []}
    for _ in range(args.rounds):
        for name, cls, cfg, its in (("before", base_pool, base_cfg, base_items), ("after", RewardPool, new_cfg, items)):
            dt, counts = run(cls, cfg, its, args.repeat)
            results[name].append(dt)
            print(f"{name:6s} {n} rows in {dt:7.2f}s = {n / dt:6.2f} rows/s, {tests * args.repeat / dt:6.1f} tests/s "
                  f"{counts}  load {os.getloadavg()[0]:.2f}", flush=True)
    b, a = min(results["before"]), min(results["after"])
    print(f"best: before {n / b:.2f} rows/s, after {n / a:.2f} rows/s (after/before {b / a:.2f}x)")


if __name__ == "__main__":
    main()

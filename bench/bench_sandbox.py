"""Sandbox overhead: programs/s for N stdin/stdout programs, sandboxed (RewardPool, bwrap) vs bare.

    .venv/bin/python -m bench.bench_sandbox --n 1000 --workers 2

Each program is a short model-style solution with one stdin test. Measured side by side in one run:
  bare      N x `python -I -S main.py` in a temp dir (subprocess, `workers` threads), output compared
  none      RewardPool(sandbox="none"): the full grader, programs unsandboxed
  bwrap     RewardPool(sandbox="bwrap"): the full grader, every program in a fresh bubblewrap sandbox
The overhead ratio is bare programs/s over bwrap programs/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from archer_async.config import RewardsConfig
from rewards import RewardPool

TEMPLATES = [
    ("a, b = map(int, input().split())\nprint(a + b)", lambda r: (f"{r} {r * 3}\n", str(4 * r))),
    ("import sys\nxs = sorted(map(int, sys.stdin.read().split()))\nprint(' '.join(map(str, xs)))",
     lambda r: (" ".join(str((r * k) % 97) for k in range(50)) + "\n",
                " ".join(map(str, sorted((r * k) % 97 for k in range(50)))))),
    ("n = int(input())\nprint(sum(i * i for i in range(n)))", lambda r: (f"{r * 100}\n", str(sum(i * i for i in range(r * 100))))),
    ("s = input().strip()\nprint(s[::-1])", lambda r: (f"abc{r}xyz\n", f"abc{r}xyz"[::-1])),
]


def make_programs(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(code, stdin, expected) of n programs."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        code, gen = TEMPLATES[i % len(TEMPLATES)]
        inp, exp = gen(rng.randint(1, 500))
        out.append((code, inp, exp))
    return out


def run_bare(progs, workers: int) -> tuple[float, int]:
    """Seconds and number of correct outputs, running each program bare in a subprocess."""
    py = os.path.realpath(sys.executable)

    def one(p):
        code, inp, exp = p
        with tempfile.TemporaryDirectory() as d:
            Path(d, "main.py").write_text(code)
            r = subprocess.run([py, "-I", "-S", "main.py"], cwd=d, input=inp.encode(), capture_output=True,
                               timeout=10, env={})
            return r.stdout.decode().strip() == exp.strip()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        ok = sum(ex.map(one, progs))
    return time.perf_counter() - t0, ok


def run_pool(progs, workers: int, sandbox: str) -> tuple[float, int]:
    """Seconds and number of passes through a RewardPool (pool start-up and probe not timed)."""
    items = [("code", json.dumps({"inputs": [inp], "outputs": [exp]}), f"</think>```python\n{code}\n```")
             for code, inp, exp in progs]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with RewardPool(RewardsConfig(workers=workers, sandbox=sandbox, timeout_s=10.0, cpu_time_s=10)) as pool:
            t0 = time.perf_counter()
            rewards = pool.score(items, training=False)
            dt = time.perf_counter() - t0
    return dt, sum(r.status == "pass" for r in rewards)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    progs = make_programs(args.n)
    rows = []
    for name, fn in (("bare subprocess", lambda: run_bare(progs, args.workers)),
                     ("RewardPool sandbox=none", lambda: run_pool(progs, args.workers, "none")),
                     ("RewardPool sandbox=bwrap", lambda: run_pool(progs, args.workers, "bwrap"))):
        dt, ok = fn()
        rows.append((name, dt, ok))
        print(f"{name:26s} {args.n} programs in {dt:7.2f}s = {args.n / dt:7.1f} programs/s, {ok} correct", flush=True)
    bare, bwrap = rows[0][1], rows[2][1]
    print(f"overhead ratio (bare programs/s / bwrap programs/s): {bwrap / bare:.2f}x")


if __name__ == "__main__":
    main()

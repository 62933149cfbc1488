"""Soak: run the tiny default for a long time and watch each role's resident memory and the process count.

    python -m bench.soak --run-dir /tmp/soak --minutes 120 --every 30

Starts `archer-async train` (total_steps large, so the time limit ends it), samples every `--every`
seconds the RSS of each role's process tree (RUN_DIR/pids.json: driver, buffer, learner ranks, actors;
an actor's tree includes its vLLM engine and reward workers), the same over the processes older than
LONG_LIVED_S only (`long_rss_mib/`, `long_procs/`: without the sandbox's short-lived per-program
processes), and the number of processes under the driver's session, then stops the run (SIGINT: the normal Ctrl-C path) and reports least-squares slopes
(MiB per hour, processes per hour) over the second half of the samples (after warm-up). Writes the
samples as CSV next to the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


LONG_LIVED_S = 120.0
"""Processes at least this old count as long-lived: the sandbox's per-program processes (a few ms to
seconds each) come and go between samples and only add noise to the role's RSS and process count."""


def tree_rss(pid: int) -> tuple[float, int, float, int]:
    """(RSS MiB of pid and its descendants, number of processes, the same two over the long-lived ones)."""
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0.0, 0, 0.0, 0
    total = long_total = 0
    n = n_long = 0
    now = time.time()
    for q in procs:
        try:
            rss, age = q.memory_info().rss, now - q.create_time()
        except psutil.Error:
            continue
        total += rss
        n += 1
        if age >= LONG_LIVED_S:
            long_total += rss
            n_long += 1
    return total / 2**20, n, long_total / 2**20, n_long


def session_processes(sid: int) -> int:
    n = 0
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid:
                n += 1
        except (OSError, psutil.Error):
            pass
    return n


def slope_per_hour(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over ts (seconds), per hour."""
    n = len(ts)
    if n < 2:
        return 0.0
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    if var == 0:
        return 0.0
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var * 3600.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default="/tmp/archer-soak")
    ap.add_argument("--minutes", type=float, default=120.0)
    ap.add_argument("--every", type=float, default=30.0)
    ap.add_argument("--out", default=None, help="summary JSON path (default RUN_DIR.soak.json)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    rd = Path(a.run_dir)
    if rd.exists():
        import shutil

        shutil.rmtree(rd)
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="nobind",
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    log = open(f"{rd}.driver.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", f"run_dir={rd}",
                             "learner.total_steps=100000", "launch.eval_every=0", "dashboard.enabled=false",
                             "learner.checkpoint_every=20", *a.overrides],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO), start_new_session=True)
    t0 = time.time()
    end = t0 + a.minutes * 60
    samples: list[dict] = []
    try:
        while time.time() < end and proc.poll() is None:
            time.sleep(a.every)
            try:
                pids = json.loads((rd / "pids.json").read_text())
            except (OSError, ValueError):
                continue
            row = {"t": round(time.time() - t0, 1), "processes": session_processes(proc.pid)}
            for role, pid in pids.items():
                if role == "driver":
                    mib = psutil.Process(pid).memory_info().rss / 2**20 if psutil.pid_exists(pid) else 0.0
                    row["rss_mib/driver"] = round(mib, 1)
                else:
                    mib, n, mib_long, n_long = tree_rss(int(pid))
                    row[f"rss_mib/{role}"] = round(mib, 1)
                    row[f"procs/{role}"] = n
                    row[f"long_rss_mib/{role}"] = round(mib_long, 1)
                    row[f"long_procs/{role}"] = n_long
            try:
                row["step"] = max(json.loads(l)["step"] for l in open(rd / "trained_ids.jsonl"))
            except (OSError, ValueError):
                row["step"] = 0
            samples.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(180)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    leftovers = session_processes(proc.pid)
    # rows taken while every role was up (a run that stopped early leaves zeros behind)
    samples = [r for r in samples if all(v > 0 for k, v in r.items() if k.startswith("rss_mib/"))]
    half = samples[len(samples) // 2:]
    keys = sorted({k for r in samples for k in r
                   if k.startswith(("rss_mib/", "procs/", "long_rss_mib/", "long_procs/")) or k == "processes"})
    summary = {
        "minutes": round((time.time() - t0) / 60, 1), "samples": len(samples), "every_s": a.every,
        "steps": samples[-1]["step"] if samples else 0, "exit_code": proc.returncode,
        "processes_left_after_stop": leftovers,
        "slopes_per_hour_second_half": {k: round(slope_per_hour([r["t"] for r in half if k in r],
                                                                [r[k] for r in half if k in r]), 2) for k in keys},
        "first": samples[0] if samples else None, "last": samples[-1] if samples else None,
    }
    out = Path(a.out or f"{rd}.soak.json")
    out.write_text(json.dumps(summary, indent=1))
    with open(out.with_suffix(".csv"), "w") as f:
        f.write(",".join(["t", "step", *keys]) + "\n")
        for r in samples:
            f.write(",".join(str(r.get(k, "")) for k in ["t", "step", *keys]) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

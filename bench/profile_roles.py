"""Where the cores go in one archer-async training step: CPU seconds per step of every kind of process.

    .venv/bin/python -m bench.profile_roles [--steps 12] [--warmup 3] [--out /tmp/profile] [key=value ...]

Runs `archer-async train` on bench/bench_trl.py's workload (its `ARCHER_SAME_WORKLOAD` settings: 8
prompts x 8 samples, 64 new tokens, every group trained) and samples, once a second, the CPU time of
every long-lived process of the run (from RUN_DIR/pids.json and their descendants) with psutil:
its own user + system time plus that of its children it has already reaped (the sandboxes and other
short-lived subprocesses count there once they exit). Classes:

    learner<r>          a learner rank (forward, backward, optimizer, collectives, weight send)
    actor (rollout)     an actor's own process (rollout loop, tokenisation, buffer client, weight receive)
    vLLM engine         the actors' vLLM engine-core processes (generation)
    reward workers      the actors' grading processes, with the bubblewrap sandboxes they ran
    buffer              the replay buffer's process
    driver              the `archer-async train` process
    rest of the machine Ray's own processes and anything else (the machine's busy time minus the above)
    idle                cores x wall time minus the machine's busy time

Only the steady state is counted: from the end of step `--warmup` to the end of the last step (times
from metrics.jsonl). Also printed: the learner's own split of a step (learner/step_s, sync/seconds,
learner/wait_for_data_s, means over the same steps). One run; compare variants in one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def classify(role: str, proc: psutil.Process) -> str:
    """The class of `proc`, a process of role `role` (a pids.json key) or one of its descendants."""
    try:
        text = " ".join(proc.cmdline()) + " " + proc.name()
    except psutil.Error:
        text = ""
    if role.startswith("actor"):
        if "EngineCore" in text:
            return "vLLM engine"
        if "rewards." in text or "bwrap" in text:
            return "reward workers"
        return "actor (rollout)"
    return role


def cpu_of(proc: psutil.Process) -> float:
    """User + system seconds of `proc` and of the children it reaped."""
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def sample(run_dir: Path) -> dict[int, tuple[str, float]]:
    """{pid: (class, CPU seconds so far)} of the run's live processes (each pid once)."""
    try:
        pids = json.loads((run_dir / "pids.json").read_text())
    except (OSError, ValueError):
        return {}
    seen: dict[int, tuple[str, float]] = {}
    for role, pid in sorted(pids.items(), key=lambda kv: kv[0] == "driver"):  # the driver last
        try:
            top = psutil.Process(int(pid))
            # the driver's descendants are Ray's own processes and the roles (counted by role above)
            procs = [top] if role == "driver" else [top] + top.children(recursive=True)
        except psutil.Error:
            continue
        for p in procs:
            if p.pid not in seen:
                try:
                    seen[p.pid] = (classify(role, p), cpu_of(p))
                except psutil.Error:
                    pass
    return seen


def busy_seconds() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


def main() -> int:
    from bench.bench_async import read_rows
    from bench.bench_trl import ARCHER_SAME_WORKLOAD

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default="")
    ap.add_argument("overrides", nargs="*", help="extra key=value settings (e.g. learner.num_ranks=1)")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="profile_roles_"))
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_CPU_KVCACHE_SPACE="1", RAY_ADDRESS="local")
    cmd = [str(ROOT / ".venv/bin/archer-async"), "train", f"run_dir={run_dir}", f"learner.total_steps={a.steps}",
           "launch.eval_every=0", "learner.checkpoint_every=100000", "dashboard.enabled=false", "wandb.mode=disabled",
           *ARCHER_SAME_WORKLOAD, *a.overrides]
    log = open(out / "console.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    history: list[tuple[float, float, dict]] = []  # (time, machine busy s, {pid: (class, cpu s)})
    while proc.poll() is None:
        s = sample(run_dir)
        if s:
            history.append((time.time(), busy_seconds(), s))
        time.sleep(1.0)
    if proc.returncode != 0:
        print(f"the run failed (exit {proc.returncode}); see {out / 'console.log'}", file=sys.stderr)
        return 1
    rows = read_rows(run_dir)
    t_from = next(float(r["time"]) for r in rows if int(r["step"]) == a.warmup)
    t_to = float(rows[-1]["time"])
    n_steps = int(rows[-1]["step"]) - a.warmup
    h0 = min(history, key=lambda h: abs(h[0] - t_from))
    h1 = min((h for h in history if h[0] <= t_to + 1.0), key=lambda h: abs(h[0] - t_to))
    wall = h1[0] - h0[0]
    per = defaultdict(float)
    for pid, (cls, c1) in h1[2].items():
        c0 = h0[2][pid][1] if pid in h0[2] else 0.0  # a process started later counts from its start
        per[cls] += max(0.0, c1 - c0)
    busy = h1[1] - h0[1]
    cores = psutil.cpu_count() or 1
    per["rest of the machine"] = max(0.0, busy - sum(per.values()))
    per["idle"] = max(0.0, cores * wall - busy)
    steady = [r for r in rows if a.warmup < int(r["step"])]
    mean = lambda k: sum(float(r.get(k, 0.0)) for r in steady) / len(steady)  # noqa: E731
    report = {"steps": n_steps, "wall_s": wall, "s_per_step": wall / n_steps, "cores": cores,
              "cpu_s_per_step": {k: v / n_steps for k, v in sorted(per.items(), key=lambda kv: -kv[1])},
              "learner/step_s": mean("learner/step_s"), "sync/seconds": mean("sync/seconds"),
              "learner/wait_for_data_s": mean("learner/wait_for_data_s"), "overrides": a.overrides,
              "load_avg_end": os.getloadavg()[0]}
    (out / "profile.json").write_text(json.dumps(report, indent=1))
    print(f"{n_steps} steady steps in {wall:.1f} s: {wall / n_steps:.2f} s/step on {cores} cores "
          f"({cores * wall / n_steps:.2f} core-s per step)")
    print("| where | CPU s per step | share of the cores |\n|---|---:|---:|")
    for k, v in report["cpu_s_per_step"].items():
        print(f"| {k} | {v:.2f} | {100 * v / (cores * wall / n_steps):.0f}% |")
    print(f"learner: step {report['learner/step_s']:.2f} s, weight sync {report['sync/seconds']:.2f} s, "
          f"wait for data {report['learner/wait_for_data_s']:.2f} s (means per step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

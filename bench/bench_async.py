"""Asynchronous vs synchronous training on the same tiny workload: wall time per step and the ideal ratio.

    .venv/bin/python -m bench.bench_async [--steps 12] [--warmup 2] [--rounds 1] \
        [--modes sync,async] [key=value ...]

Runs `archer-async train` once per mode and round, interleaved (sync, async, sync, async, ...), on the
embedded tiny default (2 vLLM actors, 2-rank FSDP2 learner over gloo, 16 prompts x 8 samples per
step, 64 new tokens at most) with `launch.eval_every=0` and checkpoints only at the end, then reads
each run's metrics.jsonl:

- per-step wall time: differences of the rows' "time" field, the first `--warmup` steps dropped
  (start-up and the first step's compilation and warm-up are excluded);
- in the sync run, T_gen = mean learner/wait_for_data_s (the learner waits while the actors
  generate the batch) and T_train = mean (learner/step_s + sync/seconds); the rest of a step's wall
  time (driver bookkeeping: metrics calls to actors and buffer) is reported as "other";
- ideal async speed-up = (T_gen + T_train) / max(T_gen, T_train); measured = sync s/step / async s/step.

Extra `key=value` arguments are passed to every run (e.g. `buffer.max_staleness=8`). The load average
(1 minute) is recorded before and after every run: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def iter_jsonl(path: Path):
    """The JSON objects of a JSON-lines file, skipping a line torn by a writer that was killed."""
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def read_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows of training steps (step >= 1), in order."""
    return [r for r in iter_jsonl(run_dir / "metrics.jsonl") if int(r.get("step", 0)) >= 1 and "learner/step_s" in r]


def _mean(rows: list[dict], key: str) -> float:
    vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.fmean(vals) if vals else float("nan")


def summarize(rows: list[dict], warmup: int) -> dict:
    """Per-step wall time and phase means over the steps after `warmup`."""
    if len(rows) < warmup + 2:
        raise RuntimeError(f"only {len(rows)} step rows; need at least warmup + 2 = {warmup + 2}")
    timed = rows[warmup + 1:]                       # intervals t[i] - t[i-1] for i > warmup
    walls = [float(b["time"]) - float(a["time"]) for a, b in zip(rows[warmup:-1], rows[warmup + 1:])]
    gen_tokens = [r.get("tokens/response") or r.get("responses/tokens") for r in timed]
    out = {
        "steps_timed": len(walls),
        "step_wall_s": statistics.fmean(walls),
        "step_wall_median_s": statistics.median(walls),
        "wait_for_data_s": _mean(timed, "learner/wait_for_data_s"),
        "learner_step_s": _mean(timed, "learner/step_s"),
        "sync_s": _mean(timed, "sync/seconds"),
        "actor_tokens_per_s": _mean(timed, "actor/tokens_per_s"),
        "learner_tokens_per_s": _mean(timed, "learner/tokens_per_s"),
        "staleness_mean": _mean(timed, "staleness/mean"),
        "staleness_max": max((float(r.get("staleness/max") or 0) for r in timed), default=0.0),
        "dropped_stale_total": float(rows[-1].get("buffer/dropped_stale", 0) or 0),
        "actor_wait_for_weights_s_total": float(rows[-1].get("actor/wait_for_weights_s", 0) or 0),
        "reward_mean": _mean(timed, "reward/mean"),
    }
    if all(isinstance(g, (int, float)) for g in gen_tokens) and gen_tokens:
        out["gen_tokens_per_step"] = statistics.fmean(gen_tokens)
    out["t_gen_s"] = out["wait_for_data_s"]
    out["t_train_s"] = out["learner_step_s"] + out["sync_s"]
    out["other_s"] = out["step_wall_s"] - out["t_gen_s"] - out["t_train_s"]
    return out


def run_archer(mode: str, steps: int, run_dir: Path, extra: list[str], timeout_s: float = 1800) -> dict:
    """One `archer-async train` run; returns its wall time, load averages and exit code."""
    # RAY_ADDRESS=local: always a fresh local cluster, even while another Ray cluster runs on this machine
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_CPU_KVCACHE_SPACE="1", RAY_ADDRESS="local",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [str(ROOT / ".venv/bin/archer-async"), "train", f"run_dir={run_dir}", f"learner.total_steps={steps}",
           "launch.eval_every=0", f"launch.mode={mode}", "learner.checkpoint_every=100000",
           "dashboard.enabled=false", "wandb.mode=disabled", *extra]
    load0 = os.getloadavg()[0]
    t0 = time.time()
    with open(str(run_dir) + ".console.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
    return {"mode": mode, "rc": rc, "wall_s": time.time() - t0, "load_before": load0, "load_after": os.getloadavg()[0],
            "command": " ".join(cmd[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--modes", default="sync,async", help="comma-separated; a mode may carry overrides: async:buffer.max_staleness=8")
    ap.add_argument("--out", default="", help="directory for the run dirs (default: a temp dir)")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("extra", nargs="*", help="key=value overrides for every run")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_async_"))
    out.mkdir(parents=True, exist_ok=True)
    variants = []
    for spec in args.modes.split(","):
        mode, *ovr = spec.split(":")
        variants.append((spec, mode, [o for o in ovr if o]))
    results = []
    for rnd in range(args.rounds):
        for name, mode, ovr in variants:
            rd = out / f"{name.replace(':', '_').replace('=', '-')}-r{rnd}"
            info = run_archer(mode, args.steps, rd, args.extra + ovr)
            info.update(variant=name, round=rnd, run_dir=str(rd))
            if info["rc"] == 0:
                info.update(summarize(read_rows(rd), args.warmup))
            results.append(info)
            print(json.dumps(info), flush=True)
    print()
    print("| variant | round | s/step (mean) | median | T_gen (wait for data) s | T_train (step + sync) s | other s "
          "| staleness mean | dropped stale | load before/after |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        if r["rc"] != 0:
            print(f"| {r['variant']} | {r['round']} | failed rc={r['rc']} | | | | | | | |")
            continue
        print(f"| {r['variant']} | {r['round']} | {r['step_wall_s']:.2f} | {r['step_wall_median_s']:.2f} | "
              f"{r['t_gen_s']:.2f} | {r['t_train_s']:.2f} | {r['other_s']:.2f} | {r['staleness_mean']:.2f} | "
              f"{r['dropped_stale_total']:.0f} | {r['load_before']:.1f} / {r['load_after']:.1f} |")
    by_round: dict[int, dict[str, dict]] = {}
    for r in results:
        if r["rc"] == 0:
            by_round.setdefault(r["round"], {})[r["variant"]] = r
    print()
    for rnd, vs in sorted(by_round.items()):
        sync = next((v for k, v in vs.items() if v["mode"] == "sync"), None)
        if sync is None:
            continue
        tg, tt = sync["t_gen_s"], sync["t_train_s"]
        ideal = (tg + tt) / max(tg, tt)
        for k, v in vs.items():
            if v["mode"] != "async":
                continue
            measured = sync["step_wall_s"] / v["step_wall_s"]
            line = {"round": rnd, "variant": k, "sync_s_per_step": sync["step_wall_s"],
                    "async_s_per_step": v["step_wall_s"], "measured_speedup": measured,
                    "ideal_speedup": ideal, "fraction_of_ideal": measured / ideal}
            results.append({"summary": line})
            print(f"round {rnd} {k}: sync {sync['step_wall_s']:.2f} s/step, async {v['step_wall_s']:.2f} s/step, "
                  f"speed-up {measured:.2f}x; ideal (T_gen {tg:.2f} + T_train {tt:.2f}) / max = {ideal:.2f}x; "
                  f"{100 * measured / ideal:.0f}% of ideal")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

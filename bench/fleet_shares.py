"""Per-actor shares of a finished run, from its own records: samples trained (RUN_DIR/trained_ids.jsonl),
samples generated (the last actor/samples_generated_total of each actor in actor_metrics.jsonl), the
mean idle fraction, and the per-step metrics summed over the run (waits, drops by reason).

    python -m bench.fleet_shares RUN_DIR
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def summarize(run_dir: Path) -> dict:
    trained = Counter()
    for r in _rows(run_dir / "trained_ids.jsonl"):
        trained.update(sid.rsplit("-", 1)[0] for sid in r["sample_ids"])
    generated, idle = {}, {}
    for r in _rows(run_dir / "actor_metrics.jsonl"):
        a = f"actor{r['actor_id']}" if not str(r["actor_id"]).startswith("actor") else str(r["actor_id"])
        if "actor/samples_generated_total" in r:
            generated[a] = r["actor/samples_generated_total"]
        if isinstance(r.get("actor/idle_frac"), (int, float)):
            idle.setdefault(a, []).append(r["actor/idle_frac"])
    steps = [r for r in _rows(run_dir / "metrics.jsonl") if r.get("step", 0) >= 1]
    sums = {k: sum(r.get(k) or 0 for r in steps) for k in (
        "actor/wait_for_weights_s", "learner/wait_for_data_s", "groups/dropped_solve_none",
        "groups/dropped_solve_all", "groups/dropped_stale", "groups/dropped_infra_error")}
    actors = sorted(set(trained) | set(generated), key=lambda a: int(a[5:]) if a[5:].isdigit() else 0)
    tt, tg = sum(trained.values()) or 1, sum(generated.values()) or 1
    return {"steps": len(steps), "seconds": (steps[-1]["time"] - steps[0]["time"]) if len(steps) > 1 else 0.0,
            "actors": {a: {"trained": trained[a], "trained_share": trained[a] / tt,
                           "generated": generated.get(a, 0), "generated_share": generated.get(a, 0) / tg,
                           "idle_frac_mean": sum(idle.get(a, [0])) / max(1, len(idle.get(a, [])))}
                       for a in actors},
            "sums": sums}


def main(argv: list[str]) -> int:
    s = summarize(Path(argv[0]))
    n = max(1, len(s["actors"]))
    print(f"steps {s['steps']}, {s['seconds']:.0f} s from step 1 to the last; fair band {0.8 / n:.3f}..{1.2 / n:.3f}")
    for a, v in s["actors"].items():
        print(f"{a}: trained {v['trained']} ({100 * v['trained_share']:.1f}%), generated {v['generated']} "
              f"({100 * v['generated_share']:.1f}%), idle {100 * v['idle_frac_mean']:.0f}%")
    print("per-step metrics summed over the run: " + ", ".join(f"{k} {v:.1f}" for k, v in s["sums"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

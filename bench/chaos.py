"""Chaos harness: SIGKILL roles of a tiny run at random moments, then prove exactly-once accounting.

    python -m bench.chaos --run-dir /tmp/chaos --seed 0 --kills 20 --steps 200 --time-limit 3000

Seeded (the kill schedule and the waits come from `random.Random(seed)`), bounded in time
(--time-limit, every wait has a deadline), loopback only (the run's own Ray cluster). Kinds of kill:

    actor    the actor's Ray worker (the driver re-places it with the same index; the run goes on)
    reward   one math-verification worker process of an actor (its sample becomes an infra_error)
    engine   the vLLM engine-core process of an actor (the actor stops generating; the driver re-places
             it at the next weight sync)
    actors   every actor's Ray worker at once (no actor generates: the step waiting for data ends, the
             driver re-places them all with the current weights and the step starts again)
    buffer   the buffer's process (the run stops with a message naming it; `resume` carries on)
    learner  one learner rank's process (as for the buffer)

Buffer and learner kills wait for a committed checkpoint (a run without one has nothing to resume).
After the last kill the run finishes; then `account(run_dir)` cross-checks three independent records:
the actors' acknowledgements (RUN_DIR/actors/*.acked.jsonl), the buffer's log (stored groups, their
deliveries, drops with reasons) and the learner's trained-ids record (RUN_DIR/trained_ids.jsonl, cut at
the final checkpoint). Lost: acknowledged yet neither trained, dropped with a reason, nor still held
ready in the buffer. Trained twice: a sample id in more than max_reuse trained steps.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
KINDS = ("actor", "reward", "engine", "actors", "buffer", "learner")
STOPPING = ("buffer", "learner")


# ------------------------------------------------------------------------------------------------
# accounting

def account(run_dir: str | os.PathLike, max_reuse: Optional[int] = None) -> dict:
    """Exactly-once figures of a finished run (see the module docstring); max_reuse: the run's
    buffer.max_reuse (read from its config.resolved.yaml when None)."""
    if max_reuse is None:
        import yaml

        conf = yaml.safe_load((Path(run_dir) / "config.resolved.yaml").read_text()) or {}
        max_reuse = int(conf.get("buffer", {}).get("max_reuse", 1))
    from learner import trained_ids
    from archer_async.config import BufferConfig
    from buffer.segment_log import SegmentLog
    from buffer.store import REC_DROP, REC_GROUP, BufferStore, _DROP_DEC, parse_group_record

    rd = Path(run_dir)
    latest = (rd / "checkpoints" / "latest").read_text().strip()
    cut = int(json.loads((rd / "checkpoints" / latest / "learner_state.json").read_text())["step"])
    rows = [r for r in trained_ids.read_rows(rd) if r["step"] <= cut]
    steps = Counter(r["step"] for r in rows)
    trained = Counter(s for r in rows for s in r["sample_ids"])
    trained_groups = Counter(g for r in rows for g in r["group_ids"])

    log_dir = rd / "buffer" / "log"
    store = BufferStore(log_dir, BufferConfig(max_reuse=max_reuse, filter_groups=False), 8, readonly=True)
    t = store.table
    ingest_drop_samples: dict[str, list[str]] = {}
    group_samples: dict[str, list[str]] = {}  # from the GROUP records: the table keeps finished groups slim
    for rtype, body, _ in SegmentLog(log_dir, readonly=True).replay():
        if rtype == REC_GROUP:
            meta = parse_group_record(body)[1]
            group_samples[meta.group_id] = list(meta.sample_ids)
        elif rtype == REC_DROP:
            info = _DROP_DEC.decode(body)
            if info.stage == "ingest":
                ingest_drop_samples[info.group_id] = list(info.sample_ids)

    acked: set[str] = set()
    for f in (rd / "actors").glob("*.acked.jsonl"):
        for line in f.read_text().splitlines():
            try:
                acked.add(json.loads(line)["group_id"])
            except (ValueError, KeyError):
                pass

    out = Counter()
    lost_ids: list[str] = []
    for e in t.entries:
        sids = group_samples[e.meta.group_id]
        out["groups_stored"] += 1
        out["samples_stored"] += len(sids)
        n_tr = trained_groups.get(e.meta.group_id, 0)
        if e.dropped is not None:
            out["samples_dropped_stored:" + e.dropped] += len(sids)
            if n_tr:
                out["samples_trained_and_dropped"] += len(sids)
        elif n_tr:
            out["samples_trained"] += len(sids)
            if e.delivered < min(n_tr, max_reuse):
                out["samples_trained_not_delivered"] += len(sids)
        elif e.delivered == 0:
            out["samples_held_ready_at_end"] += len(sids)
        else:  # delivered (consumed by a step the checkpoint covers) yet in no kept trained row
            out["samples_lost"] += len(sids)
            lost_ids.append(e.meta.group_id)
    for gid, sids in ingest_drop_samples.items():
        out["samples_dropped_at_ingest:" + t.ingest_drops.get(gid, "?")] += len(sids)
    out["samples_dropped_at_ingest"] = sum(len(s) for s in ingest_drop_samples.values())
    known = set(t.by_id) | set(t.ingest_drops)
    missing = sorted(acked - known)
    out["groups_acked_by_buffer"] = len(acked)
    out["groups_acked_missing_from_log"] = len(missing)
    out["samples_trained_twice"] = sum(1 for c in trained.values() if c > max_reuse)
    out["samples_trained_unknown_to_buffer"] = sum(1 for g in trained_groups if g not in t.by_id)
    out["trained_steps"] = len(steps)
    out["trained_steps_duplicated"] = sum(1 for c in steps.values() if c > 1)
    out["trained_steps_missing"] = len(set(range(1, cut + 1)) - set(steps))
    out["final_step"] = cut
    result = dict(out)
    result["samples_acknowledged"] = out["samples_stored"] + out["samples_dropped_at_ingest"]
    result["max_reuse"] = max_reuse
    result["lost_group_ids"] = lost_ids[:20] + missing[:20]
    result["ok"] = (out["samples_lost"] == 0 and not missing and out["samples_trained_twice"] == 0
                    and out["samples_trained_unknown_to_buffer"] == 0 and out["trained_steps_duplicated"] == 0
                    and out["trained_steps_missing"] == 0 and out["samples_trained_and_dropped"] == 0)
    return result


# ------------------------------------------------------------------------------------------------
# processes

def _children(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def find_target(run_dir: Path, kind: str, rng: random.Random, num_actors: int, num_ranks: int) -> Optional[tuple[str, list[int]]]:
    """(role description, pids) of the live process(es) of `kind`, or None."""
    try:
        pids = json.loads((run_dir / "pids.json").read_text())
    except (OSError, ValueError):
        return None
    if kind == "actors":  # while the learner waits for data: the step cannot finish without them
        found = [int(pids[f"actor{i}"]) for i in range(num_actors) if f"actor{i}" in pids]
        alive = [p for p in found if _alive(p)]
        return ("every actor", alive) if alive and len(alive) == num_actors and _learner_waits(run_dir) else None
    if kind == "actor":
        role = f"actor{rng.randrange(num_actors)}"
    elif kind == "learner":
        role = f"learner{rng.randrange(num_ranks)}"
    elif kind == "buffer":
        role = "buffer"
    else:  # a child process of a live actor: a reward worker, or its vLLM engine core
        actor = f"actor{rng.randrange(num_actors)}"
        if actor not in pids:
            return None
        mark = "rewards.math_worker" if kind == "reward" else "EngineCore"
        workers = [p for p in _children(int(pids[actor])) if mark in " ".join(_safe_cmdline(p)) + _safe_name(p)]
        if not workers:
            return None
        w = workers[rng.randrange(len(workers))]
        return f"{'reward worker' if kind == 'reward' else 'vLLM engine'} of {actor}", [w.pid]
    pid = pids.get(role)
    return (role, [int(pid)]) if pid and _alive(int(pid)) else None


def _learner_waits(run_dir: Path) -> bool:
    """Whether the learner has a sample request waiting in the buffer (the buffer's own stats)."""
    from archer_async.buffer_client import BufferClient

    try:
        client = BufferClient.from_run_dir(run_dir, client_id="chaos", endpoints_wait_s=5.0)
    except Exception:  # noqa: BLE001 - the buffer is not up (yet): not waiting
        return False
    try:
        return int(client.stats(timeout=5.0).get("waiting_samples", 0)) > 0
    except Exception:  # noqa: BLE001 - no answer in time: ask again later
        return False
    finally:
        client.close()


def _safe_name(p) -> str:
    try:
        return p.name()
    except Exception:  # noqa: BLE001 - the process may be gone
        return ""


def _safe_cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:  # noqa: BLE001 - the process may be gone
        return []


class Driver:
    """One `archer-async train|resume` process and its console output."""

    def __init__(self, args: list[str], log_path: Path, env: dict):
        self.log_path = log_path
        self.f = open(log_path, "ab")
        self.start_offset = self.f.tell()
        self.started = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "launch.cli", *args], stdout=self.f,
                                     stderr=subprocess.STDOUT, env=env, cwd=str(REPO), start_new_session=True)

    def output(self) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(self.start_offset)
            return f.read().decode(errors="replace")

    def wait(self, timeout_s: float) -> Optional[int]:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(90)
        except (OSError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass


def _latest_step(run_dir: Path) -> int:
    try:
        name = (run_dir / "checkpoints" / "latest").read_text().strip()
        return int(name.split("-")[1])
    except (OSError, ValueError, IndexError):
        return 0


def _pids_since(run_dir: Path, t: float) -> bool:
    try:
        return (run_dir / "pids.json").stat().st_mtime >= t
    except OSError:
        return False


def _trained_since(run_dir: Path, t: float) -> bool:
    from learner import trained_ids

    try:
        return trained_ids.path_of(run_dir).stat().st_mtime >= t
    except OSError:
        return False


def _trained_steps(run_dir: Path) -> int:
    from learner import trained_ids

    rows = trained_ids.read_rows(run_dir)
    return max((r["step"] for r in rows), default=0)


def run_chaos(run_dir: Path, seed: int, kills: int, steps: int, time_limit_s: float,
              kinds: tuple[str, ...] = KINDS, wait_range: tuple[float, float] = (10.0, 40.0),
              overrides: tuple[str, ...] = (), min_steps_left: int = 3) -> dict:
    """Run a tiny training run with `kills` SIGKILLs, finish it, return the events and the accounting.

    A kill lands only while at least `min_steps_left` training steps remain: one in the run's last
    moments would not be answered (the run finishes before the driver re-places what died), so the
    killing stops there."""
    rng = random.Random(seed)
    t_end = time.monotonic() + time_limit_s
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    base = [f"run_dir={run_dir}", f"learner.total_steps={steps}", "launch.eval_every=0", "learner.batch_groups=8", "learner.mini_batch_groups=8", "learner.checkpoint_every=2",
            "sync.timeout_s=30", "dashboard.enabled=false", *overrides]
    num_actors, num_ranks = 2, 2
    for o in overrides:
        if o.startswith("actors.num_actors="):
            num_actors = int(o.split("=")[1])
        if o.startswith("learner.num_ranks="):
            num_ranks = int(o.split("=")[1])
    log_path = run_dir.parent / f"{run_dir.name}.driver.log"
    log_path.unlink(missing_ok=True)
    driver = Driver(["train", *base], log_path, env)
    events: list[dict] = []
    resumes = 0
    last_stop_ckpt = 0
    plan = [kinds[i % len(kinds)] for i in range(kinds and kills)]
    rng.shuffle(plan)
    t0 = time.monotonic()
    try:
        for kind in plan:
            if time.monotonic() > t_end:
                break
            time.sleep(rng.uniform(*wait_range))
            # the target must exist (and a stop-the-run kill needs a checkpoint newer than the last start)
            target = None
            while time.monotonic() < t_end and driver.proc.poll() is None:
                if _trained_steps(run_dir) > steps - min_steps_left:
                    break  # too close to the end for the run to answer a kill
                # roles of this driver are up (pids.json rewritten since it started); a stop-the-run kill
                # also waits for a checkpoint newer than the one the last such kill left behind
                ready = _pids_since(run_dir, driver.started) and _trained_since(run_dir, driver.started) and (
                    kind not in STOPPING or _latest_step(run_dir) > max(1, last_stop_ckpt))
                target = find_target(run_dir, kind, rng, num_actors, num_ranks) if ready else None
                if target:
                    break
                time.sleep(1.0)
            if driver.proc.poll() is not None:
                if driver.proc.returncode == 0 or time.monotonic() > t_end:
                    break  # the run finished: stop killing
                # the run stopped after a kill it should have survived: recorded, then resumed
                events.append({"t": round(time.monotonic() - t0, 1), "kind": "unexpected_stop",
                               "driver_rc": driver.proc.returncode,
                               "message": next((l for l in driver.output().splitlines() if "error:" in l), "")})
                print(f"[chaos]   UNEXPECTED stop rc={driver.proc.returncode}: {events[-1]['message']}", flush=True)
                driver = Driver(["resume", str(run_dir), "dashboard.enabled=false"], log_path, env)
                resumes += 1
                continue
            if not target:
                break
            role, pids = target
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            ev = {"t": round(time.monotonic() - t0, 1), "kind": kind, "role": role, "pids": pids,
                  "step": _trained_steps(run_dir)}
            events.append(ev)
            print(f"[chaos] t={ev['t']}s kill -9 {role} (pid {', '.join(map(str, pids))}) at step {ev['step']}", flush=True)
            if kind == "actors":  # answered once the driver re-placed them (it rewrites pids.json)
                t_kill = time.time()
                while time.monotonic() < t_end and driver.proc.poll() is None and not _pids_since(run_dir, t_kill):
                    time.sleep(1.0)
            if kind in STOPPING:
                last_stop_ckpt = _latest_step(run_dir)
                rc = driver.wait(max(60.0, min(300.0, t_end - time.monotonic())))
                out = driver.output()
                ev["driver_rc"] = rc
                ev["message"] = next((l for l in out.splitlines() if "error:" in l), "")
                if rc is None:
                    driver.kill()
                    ev["message"] = "driver did not stop within the deadline"
                print(f"[chaos]   run stopped rc={rc}: {ev['message']}", flush=True)
                driver = Driver(["resume", str(run_dir), "dashboard.enabled=false"], log_path, env)
                resumes += 1
        rc = driver.wait(max(1.0, t_end - time.monotonic()))
        if rc is None:
            driver.kill()
        final_rc = rc
    finally:
        if driver.proc.poll() is None:
            driver.kill()
    out = {"seed": seed, "kills": sum(e["kind"] in KINDS for e in events),
           "by_kind": dict(Counter(e["kind"] for e in events)),
           "resumes": resumes, "final_rc": final_rc, "seconds": round(time.monotonic() - t0, 1), "events": events}
    try:
        out["actor_restarts"] = sum(l.count("re-placing it") for l in open(log_path, errors="replace"))
    except OSError:
        pass
    if final_rc == 0:
        out["accounting"] = account(run_dir)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default="/tmp/archer-chaos")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--time-limit", type=float, default=3000.0)
    ap.add_argument("--wait-min", type=float, default=10.0)
    ap.add_argument("--wait-max", type=float, default=40.0)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--out", default=None, help="write the result JSON here")
    ap.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    a = ap.parse_args()
    rd = Path(a.run_dir)
    if rd.exists():
        import shutil

        shutil.rmtree(rd)
    res = run_chaos(rd, a.seed, a.kills, a.steps, a.time_limit, tuple(a.kinds.split(",")),
                    (a.wait_min, a.wait_max), tuple(a.overrides))
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    acc = res.get("accounting") or {}
    return 0 if acc.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())

"""`archer-async buffer inspect RUN_DIR [--json]`: what a run's buffer holds.

Reads the segment log read-only (never repairs it, safe while the buffer runs) and reports groups by
state and by weight version, the oldest and newest group, drops by reason, bytes on disk, and any
torn or garbage tail found now or repaired at an earlier start (RUN_DIR/buffer/recovery.json).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

from archer_async import wire
from archer_async.config import BufferConfig, UserError
from buffer.store import BufferStore

STATES = ("ready", "partly_consumed", "consumed", "dropped_stale")


def _state(e, max_reuse: int) -> str:
    if e.dropped is not None:
        return "dropped_" + e.dropped
    if e.delivered >= max_reuse:
        return "consumed"
    return "partly_consumed" if e.delivered else "ready"


def _max_reuse(run_dir: Path) -> int:
    """buffer.max_reuse of the run (from config.resolved.yaml), 1 when unknown."""
    try:
        import yaml
        data = yaml.safe_load((run_dir / "config.resolved.yaml").read_text()) or {}
        return int(data.get("buffer", {}).get("max_reuse", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return 1
    except Exception:  # malformed YAML: the log is still worth reading
        return 1


def _running(run_dir: Path) -> bool:
    try:
        pid = int(json.loads(wire.endpoints_path(run_dir).read_text())["pid"])
        os.kill(pid, 0)
        return True
    except (OSError, ValueError, KeyError):
        return False


def _group_row(e) -> dict:
    return {"group_id": e.meta.group_id, "seq": e.seq, "min_version": e.meta.min_version,
            "actor_id": e.meta.actor_id, "created_at": e.meta.created_at}


def inspect_run(run_dir: str | os.PathLike) -> dict:
    """The report as a dict (what --json prints)."""
    rd = Path(run_dir)
    log_dir = wire.buffer_dir(rd) / "log"
    if not log_dir.is_dir():
        raise UserError(f"{rd}: no buffer log (expected {log_dir})")
    max_reuse = _max_reuse(rd)
    store = BufferStore(log_dir, BufferConfig(max_reuse=max_reuse, filter_groups=False), 8, readonly=True)
    t = store.table
    by_state: Counter = Counter()
    by_version: dict[int, Counter] = defaultdict(Counter)
    for e in t.entries:
        st = _state(e, max_reuse)
        by_state[st] += 1
        by_version[e.meta.min_version][st] += 1
    drops = Counter(t.ingest_drops.values())
    tail = store.log.tail
    try:
        recoveries = json.loads((wire.buffer_dir(rd) / "recovery.json").read_text())
    except (OSError, ValueError):
        recoveries = []
    report = {
        "run_dir": str(rd),
        "running": _running(rd),
        "groups_stored": len(t.entries),
        "groups_by_state": dict(by_state),
        "groups_by_version": {str(v): dict(c) for v, c in sorted(by_version.items())},
        "dropped_at_ingest": dict(drops),
        "dropped_by_reason": {k[5:]: v for k, v in t.counters.items() if k.startswith("drop:")},
        "oldest": _group_row(t.entries[0]) if t.entries else None,
        "newest": _group_row(t.entries[-1]) if t.entries else None,
        "learner_version": t.version,
        "cursor": t.cursor(),
        "max_reuse": max_reuse,
        "records": store.record_counts,
        "segments": len(store.log.segments()),
        "bytes_on_disk": store.log.bytes_on_disk(),
        "truncated_tail": None if tail is None else {
            "segment": tail.segment, "valid_bytes": tail.valid_bytes, "file_bytes": tail.file_bytes,
            "truncated_bytes": tail.truncated_bytes, "reason": tail.reason},
        "tail_repairs": recoveries,
    }
    return report


def _ts(x: float) -> str:
    return _dt.datetime.fromtimestamp(x).isoformat(timespec="seconds") if x else "-"


def format_report(r: dict) -> str:
    """Human-readable form of inspect_run's report."""
    lines = [f"buffer of {r['run_dir']} ({'running' if r['running'] else 'not running'})",
             f"  groups stored: {r['groups_stored']}   learner version (last seen): {r['learner_version']}"
             f"   cursor: {r['cursor']}   max_reuse: {r['max_reuse']}",
             "  by state:   " + ("  ".join(f"{k}={v}" for k, v in sorted(r["groups_by_state"].items())) or "-"),
             "  dropped:    " + ("  ".join(f"{k}={v}" for k, v in sorted(r["dropped_by_reason"].items())) or "none"),
             "  by weight version (min token version):"]
    for v, c in r["groups_by_version"].items():
        lines.append(f"    v{v:>4}: " + "  ".join(f"{k}={n}" for k, n in sorted(c.items())))
    for key in ("oldest", "newest"):
        g = r[key]
        if g:
            lines.append(f"  {key}: {g['group_id']} (seq {g['seq']}, v{g['min_version']}, "
                         f"actor {g['actor_id'] or '-'}, created {_ts(g['created_at'])})")
    lines.append(f"  disk: {r['bytes_on_disk']} bytes in {r['segments']} segment(s); records: "
                 + "  ".join(f"{k}={v}" for k, v in r["records"].items()))
    tail = r["truncated_tail"]
    if tail:
        note = " (the buffer is running: may be a write in progress)" if r["running"] else ""
        lines.append(f"  TORN TAIL: {tail['truncated_bytes']} bytes after the last valid record of "
                     f"{tail['segment']} ({tail['reason']}){note}")
    else:
        lines.append("  tail: clean")
    for rep in r["tail_repairs"]:
        lines.append(f"  repaired at {_ts(rep['time'])}: {rep['truncated_bytes']} bytes cut from "
                     f"{rep['segment']} ({rep['reason']})")
    return "\n".join(lines)


def inspect_main(args) -> int:
    """CLI handler: args.run_dir, args.json."""
    report = inspect_run(args.run_dir)
    if getattr(args, "json", False):
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_report(report))
    return 0

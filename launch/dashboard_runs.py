"""What the dashboard reads of its run directories: incrementally parsed JSONL files, a run summary,
and the runs' legend labels. Nothing here takes a path from a request: the server picks a run by its
index in the list given on the command line."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from archer_async.config import UserError
from archer_async.metrics import ACTOR_METRICS_FILE, METRICS_FILE, read_run_status

IDLE_AFTER_S = 60.0
"""Without status.json, a run whose files changed within this many seconds shows as live."""

_CONFIG_SUMMARY = (  # (label, dotted key) shown in the page header
    ("mode", "launch.mode"), ("model", "model.path"), ("actors", "actors.num_actors"),
    ("backend", "actors.backend"), ("samples/prompt", "actors.samples_per_prompt"),
    ("learner ranks", "learner.num_ranks"), ("batch groups", "learner.batch_groups"),
    ("total steps", "learner.total_steps"), ("lr", "learner.lr"), ("max staleness", "buffer.max_staleness"),
    ("IS correction", "loss.is_correction"), ("in-flight update", "actors.inflight_update"),
    ("sync", "sync.backend"),
)


class JsonlTail:
    """Incrementally parsed JSONL file: rows so far, the byte offset after the last complete line."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []
        self._offset = 0
        self._ino: int | None = None
        self._resets = 0
        self.mtime = 0.0
        self._lock = threading.Lock()

    @property
    def epoch(self) -> str:
        """Identity of the current file content: changes when the file is replaced or shrinks."""
        return f"{self._ino or 0}.{self._resets}"

    def refresh(self) -> None:
        """Parse lines appended since the last call; start over if the file was replaced or truncated."""
        with self._lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                if self.rows or self._offset:
                    self._reset(None)
                return
            if st.st_ino != self._ino or st.st_size < self._offset:
                self._reset(st.st_ino)
            self.mtime = st.st_mtime
            if st.st_size == self._offset:
                return
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read(st.st_size - self._offset)
            end = data.rfind(b"\n")
            if end < 0:
                return  # only a partial line so far
            for line in data[: end + 1].split(b"\n"):
                if line.strip():
                    try:
                        obj = json.loads(line, parse_constant=_no_nan, parse_float=_finite_float)
                    except ValueError:
                        continue
                    if isinstance(obj, dict):
                        self.rows.append(obj)
            self._offset += end + 1

    def _reset(self, ino: int | None) -> None:
        if self._ino is not None or self.rows:
            self._resets += 1
        self._ino, self._offset, self.rows = ino, 0, []

    def since(self, n: int, epoch: str | None) -> dict:
        """Rows from index n on, or every row with reset=True when the client's epoch is stale."""
        self.refresh()
        with self._lock:
            total = len(self.rows)
            reset = epoch != self.epoch or n > total or n < 0
            start = 0 if reset else n
            return {"epoch": self.epoch, "next": total, "reset": reset, "rows": self.rows[start:]}


def _no_nan(_name: str) -> None:
    """NaN / Infinity in a file written by another tool become null (JSON for the browser has neither)."""
    return None


def _finite_float(text: str) -> float | None:
    """A float literal too large for a double (e.g. 1e999 parses as inf) becomes null as NaN does."""
    v = float(text)
    return v if math.isfinite(v) else None


def _dig(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunReader:
    """Everything the dashboard serves about one run directory."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir).resolve()
        self.metrics = JsonlTail(self.run_dir / METRICS_FILE)
        self.actors = JsonlTail(self.run_dir / ACTOR_METRICS_FILE)
        self._config: dict | None = None
        self._config_mtime = -1.0

    def config(self) -> dict:
        """config.resolved.yaml as a dict ({} when absent or unreadable), re-read when it changes."""
        p = self.run_dir / "config.resolved.yaml"
        try:
            mtime = p.stat().st_mtime
        except FileNotFoundError:
            return {}
        if mtime != self._config_mtime:
            try:
                loaded = yaml.safe_load(p.read_text())
            except (OSError, yaml.YAMLError):
                loaded = None
            self._config = loaded if isinstance(loaded, dict) else {}
            self._config_mtime = mtime
        return self._config or {}

    def status(self) -> dict:
        """{"state": live|finished|failed|stopped|idle, "started_at", "ended_at"} from status.json and files."""
        st = read_run_status(self.run_dir)
        state = st.get("state")
        if state == "running":
            pid, host = st.get("pid"), st.get("host")
            gone = isinstance(pid, int) and host == os.uname().nodename and not _pid_alive(pid)
            state = "stopped" if gone else "live"
        elif state not in ("finished", "failed", "stopped"):
            newest = max(self.metrics.mtime, self.actors.mtime)
            state = "live" if newest and time.time() - newest < IDLE_AFTER_S else "idle"
        return {"state": state, "started_at": st.get("started_at"), "ended_at": st.get("ended_at"),
                "error": st.get("error")}

    def summary(self) -> dict:
        """The /api/run object."""
        self.metrics.refresh()
        self.actors.refresh()
        cfg = self.config()
        status = self.status()
        last = self.metrics.rows[-1] if self.metrics.rows else {}
        first_times = [r["time"] for r in (self.metrics.rows[:1] + self.actors.rows[:1])
                       if isinstance(r.get("time"), (int, float))]
        started = status["started_at"] or (min(first_times) if first_times else None)
        now = time.time()
        end = status["ended_at"] if status["state"] in ("finished", "failed", "stopped") else None
        if end is None and status["state"] in ("stopped", "idle"):
            times = [r.get("time") for r in (self.metrics.rows[-1:] + self.actors.rows[-1:])]
            end = max((t for t in times if isinstance(t, (int, float))), default=None)
        elapsed = ((end or now) - started) if started else None
        return {
            "run_dir": str(self.run_dir), "name": self.run_dir.name, "status": status["state"],
            "error": status["error"], "step": last.get("step"), "version": last.get("version"),
            "started_at": started, "elapsed_s": elapsed, "now": now,
            "total_steps": _dig(cfg, "learner.total_steps"),
            "rows": len(self.metrics.rows), "actor_rows": len(self.actors.rows),
            "config": [{"label": lbl, "key": key, "value": _dig(cfg, key)} for lbl, key in _CONFIG_SUMMARY
                       if _dig(cfg, key) is not None] if cfg else [],
        }


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Legend label of each run: its directory's name; runs of the same name get as many parent
    directories as tell them apart (``sweep-a/run``, ``sweep-b/run``), and the same directory given
    twice a ``#2`` suffix."""
    parts = [p.resolve().parts for p in run_dirs]
    labels = []
    for i, pi in enumerate(parts):
        depth = 1
        while depth < len(pi) and any(pj != pi and pj[-depth:] == pi[-depth:] for pj in parts):
            depth += 1
        labels.append("/".join(pi[-depth:]) if pi[-depth:] else str(run_dirs[i]))
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):
        seen[lab] = seen.get(lab, 0) + 1
        if seen[lab] > 1:
            labels[i] = f"{lab} #{seen[lab]}"
    return labels


def check_run_dirs(run_dirs: list[str | Path]) -> list[Path]:
    """The run directories as Paths; a missing one (or, when comparing several runs, one without
    metrics.jsonl) is a UserError naming every such directory in one line."""
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise UserError("dashboard: no run directory given")
    missing = [str(d) for d in dirs if not d.is_dir()]
    if len(dirs) == 1 and missing:
        raise UserError(f"{dirs[0]}: run directory not found (expected a directory with metrics.jsonl, "
                        "e.g. runs/<date-time>)")
    empty = [str(d) for d in dirs if len(dirs) > 1 and d.is_dir() and not (d / METRICS_FILE).is_file()]
    problems = ([f"run directory not found: {', '.join(missing)}"] if missing else []) + \
               ([f"no {METRICS_FILE} in: {', '.join(empty)}"] if empty else [])
    if problems:
        raise UserError(f"dashboard: {'; '.join(problems)} (each RUN_DIR must be a run directory with "
                        f"{METRICS_FILE}, e.g. runs/<date-time>)")
    return dirs

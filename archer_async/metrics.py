"""Run metrics: one name set for metrics.jsonl, wandb and the dashboard.

Files in the run directory (all JSON Lines, one object per line, appended):

- ``metrics.jsonl``: one row per learner step, written by :class:`MetricsWriter`. Keys are the names in
  :data:`METRIC_NAMES` (any subset; ``step`` is required) plus ``time`` (unix seconds, added when absent)
  and ``staleness/hist`` ({version lag as a string: number of samples} of the step's batch).
- ``actor_metrics.jsonl``: actor-side time series, one row per actor per report (every few seconds),
  appended by :class:`ActorMetricsWriter` / :func:`append_actor_metrics`. Keys: ``actor_id``, ``time``,
  ``actor/tokens_per_s``, ``actor/wait_for_weights_s`` (seconds since the actor's previous row),
  ``actor/in_flight``, ``actor/versions`` ({weight version as a string: requests in flight generating
  with it}), ``actor/idle_frac`` (fraction of the time since the previous row with no prompt in flight),
  ``actor/samples_generated_total`` (samples of the groups the buffer acknowledged, since the actor
  started: its share of the fleet's is this over the sum of every actor's latest), ``version``.
- ``status.json``: the run's state for the dashboard's live/finished indicator (:func:`write_run_status`).

Writers flush every line (line-buffered) and fsync at most every few seconds and on close, so a crash can
leave a torn last line; readers skip it and the next writer truncates it before appending. Non-finite
floats become null (JSON has no NaN). This module imports neither torch, vllm nor ray.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import string
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from archer_async.config import UserError
from archer_async.fsio import atomic_write_json, atomic_write_text, disk_full, overwrite_in_place

METRIC_NAMES: tuple[str, ...] = (
    "step", "version", "reward/mean", "actor/tokens_per_s", "learner/tokens_per_s", "buffer/size",
    "buffer/dropped_stale", "staleness/mean", "staleness/max", "sync/seconds", "learner/wait_for_data_s",
    "actor/wait_for_weights_s", "loss/pg", "loss/kl_low", "loss/clipfrac_low", "loss/clipfrac_high",
    "is/rho_mean", "is/rho_max", "is/truncated_frac", "is/ess", "is/mismatch_kl", "entropy/mean",
    "groups/solve_none", "groups/solve_all", "reward/infra_errors", "grad_norm", "lr",
    "eval/accuracy", "eval/pass_at_k",
    "groups/dropped_solve_none", "groups/dropped_solve_all", "groups/dropped_stale", "groups/dropped_infra_error",
    "actor/idle_frac",
)
"""Every metric name of docs/architecture.md section 7, in its order (eval/* only on evaluation steps), then
the buffer's drops per step by reason and the actors' idle fraction."""

STALENESS_HIST = "staleness/hist"
"""Step-row key of the staleness histogram: {str(version lag): number of samples}."""

ACTOR_METRIC_NAMES: tuple[str, ...] = (
    "actor_id", "time", "version", "actor/tokens_per_s", "actor/wait_for_weights_s", "actor/in_flight",
    "actor/versions", "actor/idle_frac", "actor/samples_generated_total",
)
"""Keys of one actor_metrics.jsonl row (all but actor_id and time optional)."""

KNOWN_FAMILIES = frozenset({k.split("/")[0] for k in METRIC_NAMES if "/" in k} | {"tokens", "responses"})
"""Step-row key prefixes of METRIC_NAMES (plus the learner's tokens/*, responses/*): extra diagnostics in these
families (e.g. loss/kl_high, learner/step_s) are expected; keys outside them are warned about once per writer."""
KNOWN_STEP_KEYS = frozenset(METRIC_NAMES) | {"time", "loss", STALENESS_HIST}

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
ACTOR_METRICS_FILE = "actor_metrics.jsonl"
STATUS_FILE = "status.json"
_FSYNC_EVERY_S = 5.0


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy/torch scalars -> Python numbers, NaN/inf -> None, dict keys -> str."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return _clean(item())
        except (TypeError, ValueError):
            pass
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return _clean(tolist())
    return str(value)


def _dumps(row: dict) -> str:
    return json.dumps(_clean(row), separators=(",", ":"), allow_nan=False)


def _truncate_torn_tail(path: Path) -> None:
    """Cut a last line that has no newline (a write torn by a crash) so appends start on a fresh line."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # scan backwards for the last newline
        pos, chunk = size, 65536
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            buf = f.read(pos - start)
            nl = buf.rfind(b"\n")
            if nl >= 0:
                f.truncate(start + nl + 1)
                return
            pos = start
        f.truncate(0)


def staleness_histogram(lags: Iterable[int]) -> dict[str, int]:
    """{str(version lag): count} of per-sample lags (learner version minus the oldest token version)."""
    hist: dict[int, int] = {}
    for lag in lags:
        hist[int(lag)] = hist.get(int(lag), 0) + 1
    return {str(k): hist[k] for k in sorted(hist)}


class MetricsWriter:
    """Appends one JSON object per learner step to RUN_DIR/metrics.jsonl and forwards it to wandb.

        writer = MetricsWriter(cfg.run_dir, cfg.wandb)          # once, in the process that owns metrics
        writer.log({"step": 1, "version": 1, "reward/mean": 0.4, "staleness/hist": {"0": 10, "1": 6}})
        writer.close()                                          # or use it as a context manager

    ``wandb_cfg`` is a WandbConfig (or None: no wandb). wandb is imported only when its mode is not
    "disabled"; offline runs write under RUN_DIR/wandb, and the wandb run id is kept in
    RUN_DIR/wandb/run_id so a resumed run continues the same wandb run. ``resume_step``: on resume,
    rows with step > resume_step (steps that will be trained again) are dropped from metrics.jsonl first.
    """

    def __init__(self, run_dir: str | Path, wandb_cfg: Any = None, *, resume_step: Optional[int] = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        _truncate_torn_tail(self.path)
        if resume_step is not None and self.path.exists():
            self._rewind(resume_step)
        self._f = open(self.path, "a", buffering=1, encoding="utf-8")
        self._last_fsync = time.monotonic()
        self._wandb_run = None
        self._wandb = None
        self._warned: set[str] = set()
        if wandb_cfg is not None and getattr(wandb_cfg, "mode", "disabled") != "disabled":
            self._init_wandb(wandb_cfg)

    def _rewind(self, resume_step: int) -> None:
        keep = [r for r in read_metrics(self.run_dir) if int(r.get("step", 0)) <= resume_step]
        atomic_write_text(self.path, "".join(_dumps(r) + "\n" for r in keep))

    def _init_wandb(self, cfg: Any) -> None:
        import wandb  # lazy: only runs that log to wandb pay for the import

        wdir = self.run_dir / "wandb"
        wdir.mkdir(exist_ok=True)
        id_file = wdir / "run_id"
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:  # wandb run ids: lowercase letters and digits
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            id_file.write_text(run_id + "\n")
        self._wandb = wandb
        try:
            self._wandb_run = wandb.init(
                project=cfg.project, entity=cfg.entity, name=cfg.name or self.run_dir.resolve().name,
                dir=str(self.run_dir), mode=cfg.mode, id=run_id, resume="allow",
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as e:  # wandb raises several types (no credentials, no network, bad entity)
            self._f.close()
            hint = " (set WANDB_API_KEY, or wandb.mode=offline)" if cfg.mode == "online" else ""
            raise UserError(f"wandb.mode={cfg.mode}: wandb could not start: {e}{hint}") from None

    def log(self, row: dict) -> dict:
        """Append one step row (``step`` required; ``time`` added when absent); returns the row written."""
        if "step" not in row:
            raise ValueError("a metrics row needs a 'step'")
        row = _clean(dict(row))
        row.setdefault("time", time.time())
        unknown = {k for k in row if k not in KNOWN_STEP_KEYS and k.split("/")[0] not in KNOWN_FAMILIES}
        unknown -= self._warned
        if unknown:
            self._warned |= unknown
            log.warning("metrics: keys outside the METRIC_NAMES families (written, not plotted): %s",
                        ", ".join(sorted(unknown)))
        self._f.write(json.dumps(row, separators=(",", ":"), allow_nan=False) + "\n")
        now = time.monotonic()
        if now - self._last_fsync >= _FSYNC_EVERY_S:
            os.fsync(self._f.fileno())
            self._last_fsync = now
        if self._wandb_run is not None:
            self._wandb_run.log(self._to_wandb(row), step=int(row["step"]))
        return row

    def _to_wandb(self, row: dict) -> dict:
        out = {k: v for k, v in row.items()  # scalars only: lists / dicts / None stay in metrics.jsonl
               if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        hist = row.get(STALENESS_HIST)
        if hist:  # bins of width 1 centred on each version lag, gaps filled with zeros
            lags = sorted(int(k) for k in hist)
            full = list(range(lags[0], lags[-1] + 1))
            counts = [hist.get(str(k), 0) for k in full]
            edges = [k - 0.5 for k in full] + [full[-1] + 0.5]
            out[STALENESS_HIST] = self._wandb.Histogram(np_histogram=(counts, edges))
        return out

    def close(self) -> None:
        """Flush, fsync and close the file; finish the wandb run."""
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_jsonl(path: Path) -> list[dict]:
    """Parse a JSONL file, skipping a torn (unterminated, unparseable) last line and blank lines."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    rows = []
    lines = data.split(b"\n")
    complete = lines[:-1]  # the text after the last newline is a partial line (or empty)
    for line in complete:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # a corrupt line (crash mid-write before a later append); never fatal for readers
        if isinstance(obj, dict):
            rows.append(obj)
    return rows


def read_metrics(run_dir: str | Path, since: int = 0) -> list[dict]:
    """Step rows of RUN_DIR/metrics.jsonl from row index ``since`` on; a torn last line is skipped."""
    return _read_jsonl(Path(run_dir) / METRICS_FILE)[since:]


def read_actor_metrics(run_dir: str | Path, since: int = 0) -> list[dict]:
    """Rows of RUN_DIR/actor_metrics.jsonl from row index ``since`` on; a torn last line is skipped."""
    return _read_jsonl(Path(run_dir) / ACTOR_METRICS_FILE)[since:]


def append_actor_metrics(run_dir: str | Path, row: dict) -> dict:
    """Append one actor row to RUN_DIR/actor_metrics.jsonl with a single O_APPEND write.

    Several actor processes on the run directory's node may append concurrently: each line is one write()
    to a file opened with O_APPEND, so lines do not interleave. ``actor_id`` is required; ``time`` is added.
    """
    if "actor_id" not in row:
        raise ValueError("an actor metrics row needs an 'actor_id'")
    row = _clean(dict(row))
    row.setdefault("time", time.time())
    data = (json.dumps(row, separators=(",", ":"), allow_nan=False) + "\n").encode()
    fd = os.open(Path(run_dir) / ACTOR_METRICS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return row


class ActorMetricsWriter:
    """Per-actor reporter of actor-side series; call :meth:`log` every few seconds from the rollout loop.

        rep = ActorMetricsWriter(run_dir, actor_id=0)
        rep.log(tokens_per_s=812.5, wait_for_weights_s=0.3, in_flight=48, versions={3: 40, 4: 8}, version=4)
    """

    def __init__(self, run_dir: str | Path, actor_id: int | str):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.actor_id = actor_id

    def log(self, *, tokens_per_s: float, wait_for_weights_s: float = 0.0, in_flight: int = 0,
            versions: Optional[dict] = None, version: Optional[int] = None, **extra: Any) -> dict:
        """Append one row: generated tokens/s since the last report, seconds waited for weights since the
        last report, requests in flight, {weight version: requests in flight on it}, current version."""
        row = {"actor_id": self.actor_id, "actor/tokens_per_s": tokens_per_s,
               "actor/wait_for_weights_s": wait_for_weights_s, "actor/in_flight": in_flight,
               "actor/versions": {str(k): v for k, v in (versions or {}).items()}}
        if version is not None:
            row["version"] = version
        row.update({k if "/" in k else f"actor/{k}": v for k, v in extra.items()})
        return append_actor_metrics(self.run_dir, row)


def write_run_status(run_dir: str | Path, state: str, **extra: Any) -> dict:
    """Write RUN_DIR/status.json atomically; ``state`` is "running", "finished", "failed" or "stopped"
    (interrupted by Ctrl-C / SIGTERM; the last checkpoint is valid and the run can be resumed).

    Keeps ``started_at`` (unix s) of the first call and earlier extra keys (e.g. total_steps) across calls;
    records ``pid``, ``host`` and ``updated_at``; "finished"/"failed"/"stopped" add ``ended_at``. The launcher
    calls it with "running" at start (again on resume) and with the final state at the end.
    """
    if state not in ("running", "finished", "failed", "stopped"):
        raise ValueError(f"unknown run state {state!r}")
    rd = Path(run_dir)
    rd.mkdir(parents=True, exist_ok=True)
    now = time.time()
    status = read_run_status(rd)
    status.pop("ended_at", None)
    status.update({"state": state, "started_at": status.get("started_at", now), "pid": os.getpid(),
                   "host": os.uname().nodename, "updated_at": now})
    if state != "running":
        status["ended_at"] = now
    status.update(_clean(extra))
    try:
        atomic_write_json(rd / STATUS_FILE, status)
    except OSError as e:
        if not disk_full(e):
            raise
        # a full disk has no room for the temporary copy: rewrite the file's own blocks instead
        overwrite_in_place(rd / STATUS_FILE, json.dumps(status).encode())
    return status


def read_run_status(run_dir: str | Path) -> dict:
    """RUN_DIR/status.json as a dict ({} when absent or unreadable)."""
    try:
        obj = json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}

"""Live throughput dashboard: a small stdlib HTTP server over a run directory's metric files.

    archer-async dashboard RUN_DIR [--host 127.0.0.1] [--port 8365]     # any run, live or finished
    server, url = start_dashboard(run_dir, "127.0.0.1", 0)               # launcher: background thread

Routes (all GET, read-only, nothing else on disk is reachable):

- ``/``                      launch/dashboard.html (self-contained: no CDN, plots on <canvas>)
- ``/api/metrics?since=N&epoch=E``  step rows of metrics.jsonl from row N on:
  ``{"epoch": E', "next": total, "reset": bool, "rows": [...]}``. ``reset`` is true (and ``rows`` holds every
  row) when the client's epoch is not the file's current one (the file was rewritten, e.g. on resume).
- ``/api/actors?since=N&epoch=E``   the same over actor_metrics.jsonl.
- ``/api/run``               run summary: run dir, status (live / finished / failed / stopped / idle),
  step, version, start time, elapsed seconds, a config summary from config.resolved.yaml.

Files are re-read incrementally (from the last byte offset) on each request, so polling a long run stays
cheap; a torn last line is left for the next poll.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

from archer_async.config import UserError
from archer_async.metrics import ACTOR_METRICS_FILE, METRICS_FILE, read_run_status

PAGE = Path(__file__).with_name("dashboard.html")
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


REQUEST_TIMEOUT_S = 10.0
"""Socket timeout of one connection: a client that sends no complete request (or reads no response)
within it is dropped, so half-open connections do not hold a thread each."""


def allowed_hosts(bind_host: str, port: int) -> set[str]:
    """Host header values served (lower case, with and without the port): the bound address and
    localhost. Any other name is refused, so a page whose DNS name is rebound to this address (DNS
    rebinding) cannot read the run. A wildcard bind also admits this machine's hostname."""
    names = {"localhost", "127.0.0.1", "[::1]", bind_host.lower()}
    if ":" in bind_host and not bind_host.startswith("["):
        names.add(f"[{bind_host.lower()}]")
    if bind_host in ("0.0.0.0", "::", ""):
        names.update({socket.gethostname().lower(), socket.getfqdn().lower()})
    names.discard("")
    return names | {f"{n}:{port}" for n in names}


class _Handler(BaseHTTPRequestHandler):
    server_version = "archer-async-dashboard"
    reader: RunReader  # set on the per-server subclass
    timeout = REQUEST_TIMEOUT_S  # StreamRequestHandler applies it to the connection's socket

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").strip().lower()
        return host in self.server.allowed_hosts  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # a poll every 2 s would flood the terminal

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        url = urlparse(self.path)
        q = parse_qs(url.query)
        try:
            if not self._host_ok():
                return self._json(421, {"error": "unknown Host header (only the dashboard's own address is served)"})
            if url.path in ("/", "/index.html"):
                self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif url.path in ("/api/metrics", "/api/actors"):
                tail = self.reader.metrics if url.path == "/api/metrics" else self.reader.actors
                try:
                    since = int(q.get("since", ["0"])[0])
                except ValueError:
                    return self._json(400, {"error": "since must be an integer"})
                self._json(200, tail.since(since, q.get("epoch", [None])[0]))
            elif url.path == "/api/run":
                self._json(200, self.reader.summary())
            elif url.path == "/favicon.ico":
                self._send(204, b"", "image/x-icon")
            else:
                self._json(404, {"error": f"no route {url.path}"})
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, json.dumps(obj, separators=(",", ":"), allow_nan=False).encode(), "application/json")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


def make_server(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8365) -> ThreadingHTTPServer:
    """Bind the dashboard server (not yet serving). Missing run dir or a busy port: UserError."""
    rd = Path(run_dir)
    if not 0 <= port <= 65535:
        raise UserError(f"dashboard: port {port} is out of range (0-65535)")
    if not rd.is_dir():
        raise UserError(f"{rd}: run directory not found (expected a directory with metrics.jsonl, "
                        "e.g. runs/<date-time>)")
    handler = type("DashboardHandler", (_Handler,), {"reader": RunReader(rd)})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OverflowError:
        raise UserError(f"dashboard: port {port} is out of range (0-65535)") from None
    except (OSError, UnicodeError) as e:
        raise UserError(f"dashboard: cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e}); "
                        "choose another port (--port, or dashboard.port=0 for a free one)") from None
    server.daemon_threads = True
    server.allowed_hosts = allowed_hosts(host, server.server_address[1])  # type: ignore[attr-defined]
    return server


def server_url(server: ThreadingHTTPServer) -> str:
    """http://host:port/ of a bound server (a wildcard bind shows as 127.0.0.1)."""
    host, port = server.server_address[:2]
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{port}/"


def start_dashboard(run_dir: str | Path, host: str = "127.0.0.1", port: int = 0, *,
                    fallback_to_free_port: bool = False) -> tuple[ThreadingHTTPServer, str]:
    """Serve RUN_DIR's dashboard from a daemon thread; port 0 picks a free port. Returns (server, url).

    A busy port raises UserError, or with ``fallback_to_free_port`` binds a free port instead (the url
    tells which). Stop it with ``server.shutdown(); server.server_close()``.
    """
    try:
        server = make_server(run_dir, host, port)
    except UserError:
        if not (fallback_to_free_port and port != 0 and Path(run_dir).is_dir()):
            raise
        server = make_server(run_dir, host, 0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="dashboard",
                     daemon=True).start()
    return server, server_url(server)


def dashboard_main(args) -> int:
    """`archer-async dashboard RUN_DIR [--host] [--port]`: serve until Ctrl-C."""
    server = make_server(args.run_dir, args.host, args.port)
    url = server_url(server)
    print(f"archer-async dashboard of {Path(args.run_dir).resolve()} at {url}  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

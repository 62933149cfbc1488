"""Live throughput dashboard: a small stdlib HTTP server over run directories' metric files.

    archer-async dashboard RUN_DIR [--host 127.0.0.1] [--port 8365]     # any run, live or finished
    archer-async dashboard RUN_DIR RUN_DIR ...                          # several runs overlaid (a sweep)
    server, url = start_dashboard(run_dir, "127.0.0.1", 0)               # launcher: background thread

Routes (all GET, read-only, nothing else on disk is reachable). A run is chosen by ``run=I``, its index
in the command line's list (default 0); a request never names a path:

- ``/``                      launch/dashboard.html (self-contained: no CDN, plots on <canvas>)
- ``/compare.js``            launch/dashboard_compare.js, the page's overlay of several runs
- ``/api/runs``              ``{"runs": [{"index": I, "label": L, "name": N, "run_dir": D}, ...]}``; the
  label is the directory's name, with parents where two runs share a name.
- ``/api/metrics?since=N&epoch=E``  step rows of metrics.jsonl from row N on:
  ``{"epoch": E', "next": total, "reset": bool, "rows": [...]}``. ``reset`` is true (and ``rows`` holds every
  row) when the client's epoch is not the file's current one (the file was rewritten, e.g. on resume).
- ``/api/actors?since=N&epoch=E``   the same over actor_metrics.jsonl.
- ``/api/run``               run summary: run dir, status (live / finished / failed / stopped / idle),
  step, version, start time, elapsed seconds, a config summary from config.resolved.yaml.

Bound to a loopback address (127.0.0.1, the default), the dashboard serves this machine only. Bound to any
other address (``--host 0.0.0.0`` / ``dashboard.host`` to watch from another machine), every ``/api/`` route
needs the server's token, drawn at start and printed in its address (``...?token=T``): opening that
address sets a same-site, HTTP-only cookie that the page's requests carry; a request without it gets 401.

Files are re-read incrementally (from the last byte offset) on each request, so polling a long run stays
cheap; a torn last line is left for the next poll.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs, urlparse

from archer_async.config import UserError
from launch.dashboard_runs import IDLE_AFTER_S, JsonlTail, RunReader, check_run_dirs, run_labels

__all__ = ["IDLE_AFTER_S", "JsonlTail", "RunReader", "allowed_hosts", "dashboard_main", "make_server",
           "server_url", "start_dashboard"]

PAGE = Path(__file__).with_name("dashboard.html")
COMPARE_JS = Path(__file__).with_name("dashboard_compare.js")
"""The page's script for several runs, served at /compare.js."""
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


LOOPBACK = ("127.0.0.1", "::1", "localhost")
"""Bind addresses served without a token (reachable from this machine only)."""


def _cookie_name(port: int) -> str:
    return f"archer_dashboard_{port}"  # cookies ignore the port: one name per dashboard on a host


class _Handler(BaseHTTPRequestHandler):
    server_version = "archer-async-dashboard"
    readers: list[RunReader]  # set on the per-server subclass, in the command line's order
    labels: list[str]
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
            if url.path.startswith("/api/") and not self._authorized(q):
                return self._json(401, {"error": "this dashboard needs its token: open the address it printed "
                                                 "at start (http://HOST:PORT/?token=...)"})
            if url.path in ("/", "/index.html"):
                cookie = None
                if self._token() and self._authorized(q):
                    cookie = (f"{_cookie_name(self.server.server_address[1])}={self._token()}; "
                              "HttpOnly; SameSite=Strict; Path=/")
                self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8", cookie)
            elif url.path == "/compare.js":
                self._send(200, COMPARE_JS.read_bytes(), "text/javascript; charset=utf-8")
            elif url.path == "/api/runs":
                self._json(200, {"runs": [{"index": i, "label": lab, "name": r.run_dir.name, "run_dir": str(r.run_dir)}
                                          for i, (r, lab) in enumerate(zip(self.readers, self.labels))]})
            elif url.path in ("/api/metrics", "/api/actors", "/api/run"):
                i = self._run_index(q)
                if i is None:
                    return None
                reader = self.readers[i]
                if url.path == "/api/run":
                    return self._json(200, {**reader.summary(), "label": self.labels[i]})
                tail = reader.metrics if url.path == "/api/metrics" else reader.actors
                try:
                    since = int(q.get("since", ["0"])[0])
                except ValueError:
                    return self._json(400, {"error": "since must be an integer"})
                self._json(200, tail.since(since, q.get("epoch", [None])[0]))
            elif url.path == "/favicon.ico":
                self._send(204, b"", "image/x-icon")
            else:
                self._json(404, {"error": f"no route {url.path}"})
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _token(self) -> str | None:
        return self.server.token  # type: ignore[attr-defined]

    def _authorized(self, q: dict) -> bool:
        """No token needed (loopback bind), or the request carries it: ``?token=`` or the cookie."""
        token = self._token()
        if token is None:
            return True
        given = q.get("token", [""])[0]
        jar = SimpleCookie()
        try:
            jar.load(self.headers.get("Cookie") or "")
        except CookieError:
            pass
        morsel = jar.get(_cookie_name(self.server.server_address[1]))
        return any(hmac.compare_digest(c.encode(), token.encode()) for c in (given, morsel.value if morsel else "") if c)

    def _run_index(self, q: dict) -> int | None:
        """The index of ``run=I`` (default 0), or None after answering 400/404: only an index into the
        runs given at start is accepted, never a path."""
        raw = q.get("run", ["0"])
        if len(raw) != 1 or not re.fullmatch(r"[0-9]{1,6}", raw[0]):
            self._json(400, {"error": "run must be a run index (0, 1, ...)"})
            return None
        i = int(raw[0])
        if i >= len(self.readers):
            self._json(404, {"error": f"no run {i} (this dashboard serves {len(self.readers)})"})
            return None
        return i

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, json.dumps(obj, separators=(",", ":"), allow_nan=False).encode(), "application/json")

    def _send(self, code: int, body: bytes, ctype: str, cookie: str | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        if cookie:
            self.send_header("Set-Cookie", cookie)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


def _as_list(run_dirs: str | Path | list[str | Path] | tuple) -> list[str | Path]:
    return list(run_dirs) if isinstance(run_dirs, (list, tuple)) else [run_dirs]


def make_server(run_dirs: str | Path | list[str | Path], host: str = "127.0.0.1",
                port: int = 8365) -> ThreadingHTTPServer:
    """Bind the dashboard server of one run directory or several (not yet serving). A missing run dir
    (with several, also one without metrics.jsonl) or a busy port: UserError."""
    if not 0 <= port <= 65535:
        raise UserError(f"dashboard: port {port} is out of range (0-65535)")
    dirs = check_run_dirs(_as_list(run_dirs))
    handler = type("DashboardHandler", (_Handler,), {"readers": [RunReader(d) for d in dirs],
                                                     "labels": run_labels(dirs)})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OverflowError:
        raise UserError(f"dashboard: port {port} is out of range (0-65535)") from None
    except (OSError, UnicodeError) as e:
        raise UserError(f"dashboard: cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e}); "
                        "choose another port (--port, or dashboard.port=0 for a free one)") from None
    server.daemon_threads = True
    server.allowed_hosts = allowed_hosts(host, server.server_address[1])  # type: ignore[attr-defined]
    server.token = None if host.lower() in LOOPBACK else secrets.token_urlsafe(24)  # type: ignore[attr-defined]
    return server


def server_url(server: ThreadingHTTPServer) -> str:
    """http://host:port/ of a bound server (a wildcard bind shows as 127.0.0.1)."""
    host, port = server.server_address[:2]
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    token = getattr(server, "token", None)
    return f"http://{host}:{port}/" + (f"?token={token}" if token else "")


def start_dashboard(run_dir: str | Path | list[str | Path], host: str = "127.0.0.1", port: int = 0, *,
                    fallback_to_free_port: bool = False) -> tuple[ThreadingHTTPServer, str]:
    """Serve the dashboard of RUN_DIR (or of a list of run dirs, overlaid) from a daemon thread; port 0
    picks a free port. Returns (server, url).

    A busy port raises UserError, or with ``fallback_to_free_port`` binds a free port instead (the url
    tells which). Stop it with ``server.shutdown(); server.server_close()``.
    """
    try:
        server = make_server(run_dir, host, port)
    except UserError:
        if not (fallback_to_free_port and port != 0 and all(Path(d).is_dir() for d in _as_list(run_dir))):
            raise
        server = make_server(run_dir, host, 0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="dashboard",
                     daemon=True).start()
    return server, server_url(server)


def dashboard_main(args) -> int:
    """`archer-async dashboard RUN_DIR [RUN_DIR ...] [--host] [--port]`: serve until Ctrl-C."""
    server = make_server(args.run_dirs, args.host, args.port)
    url = server_url(server)
    if len(args.run_dirs) == 1:
        what = str(Path(args.run_dirs[0]).resolve())
    else:
        what = f"{len(args.run_dirs)} runs ({', '.join(server.RequestHandlerClass.labels)})"
    print(f"archer-async dashboard of {what} at {url}  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

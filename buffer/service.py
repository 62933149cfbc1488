"""The buffer as a role object for a host process (e.g. launch's Ray RoleHost): the server runs in a
background thread of this process; the constructor returns once it serves.

    svc = BufferService(cfg, run_dir, restore_state)   # restore_state: checkpoint's consumed_state or None
    svc.endpoints()   # {"ingest": ..., "control": ...} (also in RUN_DIR/buffer/endpoints.json)
    svc.secret()      # the run secret the clients sign with (also in RUN_DIR/buffer/secret, mode 0600)
    svc.metrics()     # flat numbers: buffer/size, buffer/dropped_stale, buffer/ready, ... (+ drops by reason)
    svc.stop()
"""

from __future__ import annotations

import os
import threading
from typing import Optional, Union

from archer_async import wire
from archer_async.buffer_client import BufferClient
from archer_async.config import BufferConfig, Config
from archer_async.roles import BufferRole
from buffer.server import serve


class BufferService(BufferRole):
    """Runs `buffer.server.serve` in a thread; metrics come over the authenticated control socket."""

    def __init__(self, cfg: Union[Config, BufferConfig, dict, None], run_dir: str | os.PathLike,
                 restore_state: Optional[dict] = None, startup_timeout_s: float = 120.0):
        self.run_dir = str(run_dir)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._endpoints: dict = {}

        def ready(ep: dict) -> None:
            self._endpoints = ep
            self._ready.set()

        def run() -> None:
            try:
                serve(cfg, run_dir, restore_state=restore_state, ready_callback=ready, stop_event=self._stop)
            except BaseException as e:  # surfaced by the constructor or by the next call
                self._error = e
                self._ready.set()

        self._thread = threading.Thread(target=run, name="buffer-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(startup_timeout_s):
            raise TimeoutError(f"buffer did not start within {startup_timeout_s}s")
        self._check()
        self._secret = wire.load_secret(run_dir)
        self._client = BufferClient(self._endpoints, self._secret, client_id="buffer-service")

    def _check(self) -> None:
        if isinstance(self._error, OSError):
            raise self._error  # as it is: errno and file name travel to the driver (a full disk is named)
        if self._error is not None:
            raise RuntimeError(f"buffer server failed: {self._error!r}") from self._error

    def endpoints(self) -> dict:
        """The bound addresses (as in RUN_DIR/buffer/endpoints.json)."""
        return dict(self._endpoints)

    def secret(self) -> bytes:
        """The run's secret: the launcher hands it, over Ray, to the roles that connect (their nodes
        need no copy of RUN_DIR/buffer/secret)."""
        return self._secret

    def stats(self) -> dict:
        """The full stats dict of BufferClient.stats()."""
        self._check()
        return self._client.stats()

    def metrics(self) -> dict:
        """Flat numeric metrics named as in docs/architecture.md (buffer/size, buffer/dropped_stale) plus
        buffer/ready, buffer/accepted, buffer/in_flight, buffer/dropped_filtered, ... ."""
        s = self.stats()
        out = {f"buffer/{k}": v for k, v in s.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
        out.update(s.get("metrics", {}))
        out["buffer/dropped_by_reason"] = dict(s.get("dropped_by_reason", {}))  # running totals by reason
        return out

    def set_version(self, version: int) -> None:
        """Announce the learner's version (admission and staleness follow it)."""
        self._client.set_version(version)

    def set_max_staleness(self, max_staleness: int) -> None:
        """Set the staleness bound eta (buffer.max_staleness auto)."""
        self._client.set_max_staleness(max_staleness)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Commit what the server holds and stop it."""
        self._client.close()
        self._stop.set()
        self._thread.join(timeout_s)
        self._check()

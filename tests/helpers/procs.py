"""Events from spawned test processes, one pipe per process.

A shared `multiprocessing.Queue` is unsafe in tests that SIGKILL a process: each writer takes the
queue's write lock in a feeder thread and releases it after the bytes are out, so a process killed in
that window (its message already read by the test) leaves the lock held, and every other process's
`put` then waits forever. A pipe per process has no shared lock: a killed writer can only cut its own.
"""

from __future__ import annotations

import time
from multiprocessing.connection import Connection, wait


class ProcEvents:
    """The test's end: `channel()` gives one process its send end (`conn.send(event)` in the child);
    `collect(n, timeout)` returns the next n events from all of them, in arrival order."""

    def __init__(self, ctx):
        self._ctx = ctx
        self._readers: list[Connection] = []
        self._pending: list = []  # arrived, not yet returned (several readers can be ready at once)

    def channel(self) -> Connection:
        """A fresh send end for one process (pass it in the Process args)."""
        r, w = self._ctx.Pipe(duplex=False)
        self._readers.append(r)
        return w

    def collect(self, n: int, timeout: float) -> list:
        """The next `n` events; AssertionError naming what did arrive when they are not all there in
        `timeout` seconds. A reader whose process died (end of file) is dropped."""
        end = time.monotonic() + timeout
        while len(self._pending) < n:
            left = end - time.monotonic()
            ready = wait(self._readers, timeout=left) if left > 0 and self._readers else []
            if not ready:
                raise AssertionError(f"{len(self._pending)} of {n} events from the test processes "
                                     f"within {timeout:.0f} s: {self._pending}")
            for r in ready:
                try:
                    self._pending.append(r.recv())
                except (EOFError, OSError):
                    self._readers.remove(r)
        out, self._pending = self._pending[:n], self._pending[n:]
        return out

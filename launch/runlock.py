"""The run lock: one live driver per run directory.

`archer-async train` and `resume` take an exclusive flock(2) on RUN_DIR/driver.lock before anything
else touches the run directory, and hold it until the driver exits. The file records the holder's
pid, host and start time. A second driver on a live run stops at once with one line naming them
(exit 2; it touches nothing). The kernel drops the lock when its holder dies, however it dies, so a
lock file left by a dead driver is stale by construction: the next driver takes it over and says so.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from archer_async.config import UserError

LOCK_NAME = "driver.lock"


class RunLocked(UserError):
    """Another live driver holds the run directory."""


def _holder(data: bytes) -> dict:
    try:
        obj = json.loads(data or b"{}")
        return obj if isinstance(obj, dict) else {}
    except ValueError:
        return {}


def _refusal(rd: Path, h: dict) -> RunLocked:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["started"])) if h.get("started") else "?"
    return RunLocked(f"run_dir {str(rd)!r} is in use by a live driver: pid {h.get('pid', '?')} on host "
                     f"{h.get('host', '?')} (since {since}); stop that driver first (Ctrl-C, or "
                     f"`kill -TERM {h.get('pid', 'PID')}` on {h.get('host', 'its host')})")


class RunLock:
    """The held lock of one run directory (`acquire`); `release` drops it (idempotent)."""

    def __init__(self, run_dir: Path, fd: int, created_dir: bool, created_file: bool, previous: bytes):
        self.run_dir, self.path = run_dir, run_dir / LOCK_NAME
        self._fd: Optional[int] = fd
        self.created_dir = created_dir
        """True: the run directory did not exist before this lock."""
        self.created_file = created_file
        """True: the lock file did not exist before this lock."""
        self._previous = previous
        self.stale = _holder(previous)
        """What the file recorded of a previous driver that died holding the run ({} when none)."""

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike) -> "RunLock":
        """Take the lock (creating the run directory); RunLocked naming the live holder otherwise."""
        rd = Path(run_dir).resolve()
        path = rd / LOCK_NAME
        created_dir = not rd.exists()
        for _ in range(10):  # the file was unlinked under us (a driver that gave up at start-up): again
            try:
                rd.mkdir(parents=True, exist_ok=True)
                created_file = not path.exists()
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"run_dir {str(rd)!r}: cannot create the run lock: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(os.pread(fd, 4096, 0))
                os.close(fd)
                raise _refusal(rd, holder) from None
            except OSError as e:
                os.close(fd)
                raise UserError(f"{path}: cannot lock the run directory: {e.strerror or e}") from None
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise UserError(f"{path}: the run lock keeps being replaced; is another driver starting?")
        previous = os.pread(fd, 4096, 0)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        return cls(rd, fd, created_dir, created_file, previous)

    def stale_note(self) -> str:
        """One line about the dead driver whose lock was taken over ("" when there was none)."""
        if not self.stale.get("pid"):
            return ""
        return (f"took over the run lock of a driver that is gone (pid {self.stale['pid']} on host "
                f"{self.stale.get('host', '?')})")

    def release(self, cleanup: bool = False) -> None:
        """Drop the lock. cleanup: the run never started, leave the directory as it was (the lock
        file and the run directory removed when this lock created them, else the file's old bytes
        put back)."""
        if self._fd is None:
            return
        try:
            if cleanup and self.created_file:
                self.path.unlink()  # while still locked: see the inode check in acquire
                if self.created_dir:
                    self.run_dir.rmdir()
            else:
                os.ftruncate(self._fd, 0)  # a clean exit: the next driver finds no holder to report
                if cleanup and self._previous:
                    os.pwrite(self._fd, self._previous, 0)
        except OSError:
            pass
        os.close(self._fd)  # closing the last descriptor drops the flock
        self._fd = None

"""Per-role log files: every role process writes its log (and its stdout/stderr) to RUN_DIR/logs/<role>.log."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


class _LogFile(logging.FileHandler):
    """A log file that, once a write fails (a full disk, most often), says so in one line on the
    terminal and drops its further lines, instead of printing logging's traceback for every record."""

    broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if self.broken:
            return
        self.broken = True
        err = sys.exc_info()[1]
        why = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else repr(err)
        try:
            sys.__stderr__.write(f"[archer-async] log file {self.baseFilename}: {why}; its further lines are dropped\n")
        except (OSError, ValueError, AttributeError):
            pass


def setup_role_logging(run_dir: str | Path, role: str, redirect_std: bool = True) -> Path:
    """Send this process's logging (and, by default, its stdout/stderr) to RUN_DIR/logs/<role>.log."""
    log_dir = Path(run_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{role}.log"
    fmt = logging.Formatter(f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
    handler = _LogFile(path)
    handler.setFormatter(fmt)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    if redirect_std:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    return path

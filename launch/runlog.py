"""Per-role log files: every role process writes its log (and its stdout/stderr) to RUN_DIR/logs/<role>.log."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def setup_role_logging(run_dir: str | Path, role: str, redirect_std: bool = True) -> Path:
    """Send this process's logging (and, by default, its stdout/stderr) to RUN_DIR/logs/<role>.log."""
    log_dir = Path(run_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{role}.log"
    fmt = logging.Formatter(f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
    handler = logging.FileHandler(path)
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

"""Run-directory helpers shared by every role: per-role log files and atomic small-file writes."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via tmp + fsync + rename (+ directory fsync): all or nothing."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    dir_fd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode())


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

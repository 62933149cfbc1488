"""Durable file writes, one definition for every role: a small file replaced all or nothing.

`atomic_write_bytes` writes a temporary file in the target's directory, fsyncs it, renames it over the
target and fsyncs the directory, so after a crash at any moment the target holds either the old or
the new bytes, never a mix, and after the call returns the new bytes survive a power loss. Used for
every small file a run keeps: status.json, checkpoints' pointers and state, the buffer's endpoints and
recovery record, actors' sequence high-water marks, rewritten metrics and trained-ids files, `score`
and `eval` outputs. (The buffer's segment log and the learner's DCP shards have their own, larger
durability schemes.)
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so that a rename or a new file in it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` all or nothing (tmp + fsync + rename + directory fsync). The
    parent directory is created when missing; a failed write leaves no temporary file behind."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, **dumps_kwargs: Any) -> None:
    """`atomic_write_bytes` of `json.dumps(obj, **dumps_kwargs)`."""
    atomic_write_bytes(path, json.dumps(obj, **dumps_kwargs).encode("utf-8"))


_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException, _seen: int = 0) -> str:
    """"No space left on device: PATH" (or "Disk quota exceeded: PATH") when `exc` is, wraps or was
    caused by a full disk, else "". Looks through causes, contexts, exception groups and
    torch.distributed.checkpoint's per-rank failures (CheckpointException.failures)."""
    if exc is None or _seen > 20:
        return ""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        where = exc.filename or ""
        return f"{os.strerror(exc.errno)}{': ' + str(where) if where else ''}"
    inner = list(getattr(exc, "exceptions", None) or [])
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        inner += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    inner += [exc.__cause__, exc.__context__]
    for e in inner:
        if isinstance(e, BaseException):
            found = disk_full(e, _seen + 1)
            if found:
                return found
    text = str(exc)
    for code in _FULL:
        if os.strerror(code) in text:
            return os.strerror(code)
    return ""


def overwrite_in_place(path: str | Path, data: bytes) -> None:
    """Last resort for a small file on a full disk: write `data` over `path`'s existing bytes and
    cut it to length (its blocks are already allocated; not atomic: a crash mid-write can tear it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)

"""The record of what entered each optimizer step: RUN_DIR/trained_ids.jsonl.

One JSON row per training step, written by learner rank 0 right after the step (append, fsync):

    {"step": N, "group_ids": ["actor0-g12", ...], "sample_ids": ["actor0-13", ...]}

A step trained after the last checkpoint and then lost in a crash is re-trained after resume (the
buffer rewinds to the checkpoint's consumed_state), so `truncate_after(run_dir, step)` drops every
row past the restored checkpoint's step: the kept rows are exactly the steps the run's weights
contain. Exactly-once accounting (bench/chaos.py) counts sample ids over the kept rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from archer_async.fsio import atomic_write_bytes

FILE_NAME = "trained_ids.jsonl"


def path_of(run_dir: str | os.PathLike) -> Path:
    """RUN_DIR/trained_ids.jsonl."""
    return Path(run_dir) / FILE_NAME


def append_step(run_dir: str | os.PathLike, step: int, group_ids: Iterable[str], sample_ids: Iterable[str]) -> None:
    """Append (durably) the ids that entered training step `step`."""
    p = path_of(run_dir)
    row = json.dumps({"step": int(step), "group_ids": list(group_ids), "sample_ids": list(sample_ids)})
    with open(p, "a+b") as f:
        f.seek(0, os.SEEK_END)
        lead = b""
        if f.tell() > 0:  # a torn last line (killed mid-write) must not swallow this row
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                lead = b"\n"
        f.write(lead + row.encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def read_rows(run_dir: str | os.PathLike) -> list[dict]:
    """Every complete row, in file order (a torn or garbled line is skipped)."""
    p = path_of(run_dir)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_bytes().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def truncate_after(run_dir: str | os.PathLike, step: int) -> int:
    """Keep only rows with row["step"] <= step (atomic rewrite); returns how many rows were dropped."""
    p = path_of(run_dir)
    if not p.is_file():
        return 0
    rows = read_rows(run_dir)
    keep = [r for r in rows if r["step"] <= int(step)]
    if len(keep) == len(rows) and p.read_bytes().count(b"\n") == len(rows) and p.read_bytes().endswith(b"\n"):
        return 0  # nothing to cut and no torn line: leave the file alone
    atomic_write_bytes(p, b"".join(json.dumps(r).encode() + b"\n" for r in keep))
    return len(rows) - len(keep)

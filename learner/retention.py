"""Retention of step directories (`step-N/` under `RUN_DIR/checkpoints` and `RUN_DIR/hf`): keep the
newest N complete ones, delete older complete ones.

Never deleted: the directory `latest` names (checkpoints), anything not complete (a save or export
being written, or the leftover of an interrupted one: the next save of that step replaces it), and
anything that is not a `step-N` directory (hidden temporary export directories included). keep <= 0
keeps everything. Runs on rank 0 only, after the new directory is complete.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)

_STEP = re.compile(r"step-(\d+)")


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `root/step-N` directory, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink():
            out.append((int(m.group(1)), p))
    return sorted(out)


def prune(root: Path, keep: int, complete: Callable[[Path], bool], protect: Optional[Path] = None) -> list[Path]:
    """Delete the complete `step-N` directories of `root` older than the newest `keep` complete ones,
    except `protect`; returns what was deleted (oldest first)."""
    if keep <= 0:
        return []
    done = [p for _, p in step_dirs(root) if complete(p)]
    keep_set = {p.name for p in done[-keep:]}
    if protect is not None:
        keep_set.add(Path(protect).name)
    removed = []
    for p in done:
        if p.name in keep_set:
            continue
        try:
            shutil.rmtree(p)
            removed.append(p)
        except OSError as e:  # retention must never stop training
            log.warning("retention: cannot delete %s: %s", p, e)
    if removed:
        log.info("retention: deleted %s (keeping the newest %d)", ", ".join(p.name for p in removed), keep)
    return removed

"""Atomic, resharding learner checkpoints (torch.distributed.checkpoint).

Layout under `RUN_DIR/checkpoints/`:

    step-N/.metadata, __*_*.distcp   DCP shards of {"model": ..., "optim": ...} (sharded state dicts)
    step-N/rng/rank-R.pt             per-rank RNG states (torch CPU, CUDA, Python `random`)
    step-N/learner_state.json        step, weight version, optimizer steps / LR schedule, extra_state
    step-N/DONE                      written last (JSON: step, world size, torch version)
    latest                           text "step-N", replaced by tmp + fsync + rename + fsync(dir)

A save writes into a fresh `step-N/` (a leftover partial one is removed first), then DONE, then
flips `latest`. A crash at any point leaves `latest` on the previous complete checkpoint: DCP's
own completeness test (".metadata exists") is not trusted, DONE is. Loading validates DONE and
raises `CorruptCheckpointError` (a UserError) for anything partial or unreadable. DCP reshards on
load, so a checkpoint saved at world size A loads at world size B.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from archer_async.config import UserError
from archer_async.fsio import atomic_write_bytes, disk_full, fsync_dir

log = logging.getLogger(__name__)

DONE = "DONE"
LATEST = "latest"
STATE_FILE = "learner_state.json"


class DiskFullError(UserError):
    """A checkpoint could not be written for lack of space; the previous checkpoint stays latest."""


class CorruptCheckpointError(UserError):
    """A checkpoint directory is partial, corrupt or missing (the message names the path)."""


def step_dir(root: Path, step: int) -> Path:
    """`root/step-N`."""
    return Path(root) / f"step-{int(step)}"


def validate_checkpoint(path: Path) -> dict:
    """The DONE record of a complete checkpoint; CorruptCheckpointError if DONE, .metadata or the state file is missing/bad."""
    path = Path(path)
    if not path.is_dir():
        raise CorruptCheckpointError(f"checkpoint {path}: directory not found")
    try:
        done = json.loads((path / DONE).read_text())
    except FileNotFoundError:
        raise CorruptCheckpointError(f"checkpoint {path}: incomplete (no {DONE} marker; the save was interrupted)") from None
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"checkpoint {path}: unreadable {DONE} marker ({e})") from None
    if not (path / ".metadata").is_file():
        raise CorruptCheckpointError(f"checkpoint {path}: DCP .metadata missing")
    try:
        json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"checkpoint {path}: bad {STATE_FILE} ({e})") from None
    return done


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint `root/latest` names, validated; None when no checkpoint was ever committed."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not name or "/" in name or name.startswith("."):
        raise CorruptCheckpointError(f"{pointer}: malformed pointer {name!r}")
    path = root / name
    validate_checkpoint(path)
    return path


def _model_device(model: nn.Module) -> torch.device:
    """Where the learner computes: the device of the model's first parameter (CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _rng_state(device: torch.device) -> dict:
    """This rank's RNG state; the CUDA generator's only where the learner runs on CUDA (`device`): a CPU
    learner never touches CUDA, not even on a machine that has GPUs."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":
        if cuda is not None:
            log.info("checkpoint has a CUDA RNG state; the learner runs on %s: not restored", device)
        return
    if isinstance(cuda, (list, tuple)):  # older checkpoints: the state of every visible device
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(cuda):
            log.warning("checkpoint has no CUDA RNG state for device %s: not restored", device)
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_complete(path: Path) -> bool:
    """True for a committed checkpoint directory (its DONE marker was written last)."""
    return (Path(path) / DONE).is_file() and (Path(path) / ".metadata").is_file()


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Keep the newest `keep` complete checkpoints of `root` and the one `latest` names; delete older
    complete ones (never a partial one: it may be being written). keep <= 0 keeps all."""
    from .retention import prune

    pointer = Path(root) / LATEST
    protect = None
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not name:
            return []  # a malformed pointer: delete nothing
        protect = Path(root) / name
    return prune(Path(root), keep, is_complete, protect)


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    learner_state: dict[str, Any],
    rank: int,
    world_size: int,
    keep: int = 0,
) -> Path:
    """Save a complete checkpoint into a fresh `root/step-N/` and make it `latest`; collective over all ranks.

    `learner_state` must be JSON-able (step, version, schedule, the caller's extra_state).
    keep > 0: afterwards rank 0 deletes complete checkpoints older than the newest `keep`
    (`prune_checkpoints`). Returns the checkpoint directory. A full disk raises DiskFullError (one line:
    the cause, the path, the checkpoint that stays latest) instead of DCP's per-rank exception.
    """
    try:
        return _save_checkpoint(root, step, model, optimizer, learner_state, rank, world_size, keep)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        full = disk_full(e)
        if not full:
            raise
        try:
            kept = latest_checkpoint(Path(root))
        except CorruptCheckpointError:
            kept = None
        raise DiskFullError(f"{full} (saving checkpoint {step_dir(Path(root), step)}); "
                            + (f"the last checkpoint {kept} is intact" if kept else "no earlier checkpoint")
                            + ": free space, then `archer-async resume` the run") from None


def _save_checkpoint(root, step, model, optimizer, learner_state, rank, world_size, keep) -> Path:
    root = Path(root)
    path = step_dir(root, step)
    current = None
    try:
        current = latest_checkpoint(root)
    except CorruptCheckpointError:
        pass
    if current is not None and current.resolve() == path.resolve():
        # step N is committed already (e.g. saved again right after resuming from it): never rewrite latest in place
        log.warning("checkpoint %s is already latest; not rewriting it", path)
        _barrier()
        return path
    _barrier()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists():
            shutil.rmtree(path)  # a partial leftover of an interrupted save of this step (never latest)
        path.mkdir(parents=True)
    _barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    rng_dir = path / "rng"
    rng_dir.mkdir(exist_ok=True)
    rng_file = rng_dir / f"rank-{rank}.pt"
    with open(rng_file, "wb") as f:
        torch.save(_rng_state(_model_device(model)), f)
        f.flush()
        os.fsync(f.fileno())
    _barrier()
    if rank == 0:
        atomic_write_bytes(path / STATE_FILE, json.dumps(learner_state, sort_keys=True).encode())
        done = {"step": int(step), "world_size": world_size, "torch": torch.__version__}
        atomic_write_bytes(path / DONE, json.dumps(done).encode())
        fsync_dir(root)
        atomic_write_bytes(root / LATEST, f"{path.name}\n".encode())
        log.info("checkpoint %s committed", path)
        prune_checkpoints(root, keep)
    _barrier()
    return path


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> dict:
    """Load a validated checkpoint into the (already sharded) model and optimizer; returns its learner_state.

    Restores this rank's RNG state (rank 0's when the checkpoint had fewer ranks). Collective.
    """
    path = Path(path)
    validate_checkpoint(path)
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        raise CorruptCheckpointError(f"checkpoint {path}: cannot load shards ({type(e).__name__}: {e})") from e
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
        options=StateDictOptions(strict=True),
    )
    rng_file = path / "rng" / f"rank-{rank}.pt"
    if not rng_file.is_file():
        rng_file = path / "rng" / "rank-0.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False), _model_device(model))
    learner_state = json.loads((path / STATE_FILE).read_text())
    _barrier()
    return learner_state

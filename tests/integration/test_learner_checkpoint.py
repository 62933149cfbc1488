"""Checkpoint atomicity: a save interrupted at any point never becomes `latest`; a corrupt checkpoint is a
clear UserError. In-process (no process group: DCP's single-process mode) plus one real kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from archer_async.config import UserError
from learner import checkpoint as ck


def _model_and_opt(fill: float = 0.0):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(fill)
    return model, opt


def _save(root, step, fill):
    model, opt = _model_and_opt(fill)
    return ck.save_checkpoint(root, step, model, opt, {"step": step, "extra_state": {"cursor": step}}, 0, 1)


def _load_fill(path) -> float:
    model, opt = _model_and_opt(-1.0)
    state = ck.load_checkpoint(path, model, opt, 0)
    vals = {float(v) for p in model.parameters() for v in p.detach().flatten()}
    assert len(vals) == 1 and opt.state  # every weight restored, optimizer state present
    assert state["extra_state"]["cursor"] == state["step"]
    return vals.pop()


class _Crash(Exception):
    pass


def _crash_dcp_after_write(*args, **kwargs):
    _real_dcp_save(*args, **kwargs)  # shards and .metadata written: DCP would call this complete
    raise _Crash("killed after the DCP write")


_real_dcp_save = ck.dcp.save


def _crash_on(name):
    real = ck.atomic_write_bytes

    def fake(path, data):
        if Path(path).name == name:
            raise _Crash(f"killed while writing {name}")
        return real(path, data)

    return fake


def _crash_replace(real=os.replace):
    def fake(src, dst):
        if Path(dst).name == ck.LATEST:
            raise _Crash("killed before the rename of latest")
        return real(src, dst)

    return fake


@pytest.mark.parametrize("where", ["dcp", "state", "done", "latest-rename"])
def test_learner_interrupted_save_never_becomes_latest(tmp_path, monkeypatch, where):
    root = tmp_path / "checkpoints"
    first = _save(root, 1, 1.0)
    assert ck.latest_checkpoint(root) == first
    with monkeypatch.context() as m:
        if where == "dcp":
            m.setattr(ck.dcp, "save", _crash_dcp_after_write)
        elif where == "state":
            m.setattr(ck, "atomic_write_bytes", _crash_on(ck.STATE_FILE))
        elif where == "done":
            m.setattr(ck, "atomic_write_bytes", _crash_on(ck.DONE))
        else:
            m.setattr(ck.os, "replace", _crash_replace())
        with pytest.raises(_Crash):
            _save(root, 2, 2.0)
    assert ck.latest_checkpoint(root) == first
    assert _load_fill(ck.latest_checkpoint(root)) == 1.0
    if where != "latest-rename":  # the DONE marker is what makes a directory loadable
        with pytest.raises(ck.CorruptCheckpointError):
            ck.validate_checkpoint(root / "step-2")
    second = _save(root, 2, 2.0)  # the partial leftover is replaced by a complete save
    assert ck.latest_checkpoint(root) == second and _load_fill(second) == 2.0


def test_learner_corrupt_checkpoint_is_a_user_error(tmp_path):
    root = tmp_path / "checkpoints"
    path = _save(root, 3, 3.0)
    (path / ck.DONE).unlink()
    with pytest.raises(UserError, match="incomplete"):
        ck.latest_checkpoint(root)
    (path / ck.DONE).write_text("{not json")
    with pytest.raises(ck.CorruptCheckpointError, match="unreadable"):
        ck.load_checkpoint(path, *_model_and_opt(), 0)
    assert ck.latest_checkpoint(tmp_path / "nothing") is None
    (path / ck.DONE).write_text('{"step": 3}')
    for f in path.glob("*.distcp"):
        f.write_bytes(b"garbage")
    with pytest.raises(ck.CorruptCheckpointError, match="cannot load"):
        ck.load_checkpoint(path, *_model_and_opt(), 0)


_SAVER = """
import sys, itertools
sys.path.insert(0, {repo!r})
from tests.integration.test_learner_checkpoint import _save
from pathlib import Path
for step in itertools.count(1):
    _save(Path({root!r}), step, float(step))
    print(step, flush=True)
"""


@pytest.mark.integration
def test_learner_kill9_during_saves_leaves_a_loadable_latest(tmp_path):
    root = tmp_path / "checkpoints"
    code = _SAVER.format(repo=str(Path(__file__).resolve().parents[2]), root=str(root))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        done = 0
        while done < 3 and time.time() < deadline:  # let a few saves complete, then kill mid-save
            line = proc.stdout.readline()
            if not line:
                break
            done = int(line)
        time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert done >= 3
    latest = ck.latest_checkpoint(root)
    step = int(latest.name.split("-")[1])
    assert step >= done and _load_fill(latest) == float(step)


def test_learner_keep_checkpoints_deletes_old_ones_never_latest(tmp_path):
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        model, opt = _model_and_opt(float(step))
        ck.save_checkpoint(root, step, model, opt, {"step": step, "extra_state": {"cursor": step}}, 0, 1, keep=2)
    (root / "step-9").mkdir()  # a partial save (no DONE): may be being written, never deleted
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-2", "step-3", "step-9"]
    assert ck.latest_checkpoint(root).name == "step-3" and _load_fill(root / "step-3") == 3.0
    (root / "latest").write_text("step-2\n")  # e.g. resumed from step 2: `latest` is kept whatever its age
    model, opt = _model_and_opt(4.0)
    ck.save_checkpoint(root, 4, model, opt, {"step": 4, "extra_state": {"cursor": 4}}, 0, 1, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-4", "step-9"]
    assert ck.prune_checkpoints(root, 1) == [] and ck.is_complete(root / "step-4")

"""A full disk: one line naming "No space left on device" and the path, status.json still updated,
the checkpoint before it intact. The disk is a real, small tmpfs filled to the last byte (needs root
for `mount`; skipped elsewhere)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from archer_async.fsio import disk_full
from archer_async.metrics import read_run_status, write_run_status


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path) -> None:
    """Use every free byte of `disk`."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_disk_full_finds_the_cause_through_wrappers():
    err = OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/step-3/__0_0.distcp")

    class FakeCheckpointException(BaseException):
        def __init__(self, failures):
            super().__init__(f"CheckpointException ranks:{failures.keys()}")
            self.failures = failures

    wrapped = FakeCheckpointException({0: (err, "tb"), 1: (err, "tb")})
    assert disk_full(wrapped) == "No space left on device: /runs/x/checkpoints/step-3/__0_0.distcp"
    try:
        try:
            raise err
        except OSError:
            raise RuntimeError("save failed")
    except RuntimeError as chained:
        assert disk_full(chained).startswith("No space left on device")
    assert disk_full(RuntimeError("learner0: failed: OSError: [Errno 28] No space left on device"))
    assert disk_full(OSError(errno.EACCES, "Permission denied")) == ""


def test_status_json_is_updated_on_a_full_disk(small_disk):
    write_run_status(small_disk, "running", total_steps=10)
    _fill(small_disk)
    write_run_status(small_disk, "failed", error="No space left on device: somewhere")
    st = read_run_status(small_disk)
    assert st["state"] == "failed" and st["error"].startswith("No space left") and st["total_steps"] == 10
    assert not [p for p in os.listdir(small_disk) if p.endswith(".tmp")]


def test_checkpoint_on_a_full_disk_one_line_and_previous_intact(small_disk):
    torch = pytest.importorskip("torch")
    from learner.checkpoint import DiskFullError, latest_checkpoint, save_checkpoint

    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    root = small_disk / "checkpoints"
    first = save_checkpoint(root, 1, model, opt, {"step": 1}, 0, 1)
    before = {p.name: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    _fill(small_disk)
    with pytest.raises(DiskFullError) as e:
        save_checkpoint(root, 2, model, opt, {"step": 2}, 0, 1)
    msg = str(e.value)
    assert "No space left on device" in msg and str(root / "step-2") in msg and str(first) in msg
    assert "\n" not in msg
    assert latest_checkpoint(root) == first
    assert {p.name: p.read_bytes() for p in first.rglob("*") if p.is_file()} == before
    assert json.loads((first / "learner_state.json").read_text()) == {"step": 1}


def test_buffer_log_names_its_file_on_a_full_disk(small_disk):
    from buffer.segment_log import SegmentLog

    log = SegmentLog(small_disk / "buffer", fsync=True)
    log.append([(1, [b"acknowledged"])])
    _fill(small_disk)
    with pytest.raises(OSError) as e:
        log.append([(1, [b"x" * 65536])])
        log.sync()
    assert disk_full(e.value).startswith(f"No space left on device: {small_disk / 'buffer'}"), disk_full(e.value)


def test_a_log_file_on_a_full_disk_says_so_once(tmp_path, capfd):
    import logging

    from launch.runlog import _LogFile

    class FullDiskStream:
        def write(self, _):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    handler = _LogFile(tmp_path / "driver.log")
    handler.stream.close()
    handler.stream = FullDiskStream()
    log = logging.getLogger("test-full-disk-log")
    log.addHandler(handler)
    log.propagate = False
    try:
        for i in range(20):
            log.warning("line %d", i)
    finally:
        log.removeHandler(handler)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == [f"[archer-async] log file {tmp_path / 'driver.log'}: No space left on device; "
                     "its further lines are dropped"], err

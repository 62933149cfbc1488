"""The run lock: a second driver on a live run stops with one line naming pid and host, touching
nothing; the lock of a dead driver is taken over."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from archer_async.config import load_config, to_yaml
from launch.runlock import LOCK_NAME, RunLock, RunLocked

ROOT = Path(__file__).resolve().parents[2]
HOLD = "import sys, time; from launch.runlock import RunLock; l = RunLock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)"


def _holder(run_dir: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.stdout.readline().strip() == "held"
    return p


def _digest(path: Path) -> dict:
    return {str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["train", "resume"])
def test_second_driver_on_live_run_exits_2_naming_pid_and_host(tmp_path, command):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.resolved.yaml").write_text(to_yaml(load_config([], [f"run_dir={run_dir}"])))
    (run_dir / "status.json").write_text('{"state": "running"}\n')
    holder = _holder(run_dir)
    try:
        before = _digest(run_dir)
        args = ["train", f"run_dir={run_dir}"] if command == "train" else ["resume", str(run_dir)]
        r = subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert r.returncode == 2, (r.stdout, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"pid {holder.pid}" in lines[0] and socket.gethostname() in lines[0] and "live driver" in lines[0]
        assert _digest(run_dir) == before  # nothing touched
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_dead_driver_is_taken_over(tmp_path):
    holder = _holder(tmp_path)
    with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
        RunLock.acquire(tmp_path)
    holder.send_signal(signal.SIGKILL)  # dies holding it: the file still names it
    holder.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
    lock = RunLock.acquire(tmp_path)
    try:
        assert f"pid {holder.pid}" in lock.stale_note()
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    again = RunLock.acquire(tmp_path)  # released: free again, and no stale holder to report
    assert again.stale_note() == ""
    again.release()


def test_release_cleanup_leaves_the_directory_as_it_was(tmp_path):
    lock = RunLock.acquire(tmp_path / "new")
    lock.release(cleanup=True)
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    RunLock.acquire(tmp_path / "old").release(cleanup=True)
    assert (tmp_path / "old").is_dir() and not list((tmp_path / "old").iterdir())
    stale = b'{"pid": 999999, "host": "elsewhere"}\n'
    (tmp_path / "old" / LOCK_NAME).write_bytes(stale)
    RunLock.acquire(tmp_path / "old").release(cleanup=True)  # a refused start keeps the record
    assert (tmp_path / "old" / LOCK_NAME).read_bytes() == stale

"""A live run under hostile lifecycle events: a second driver on its run directory, then SIGTERM.

One real run (Ray, vLLM actor, FSDP learner, buffer) is started and, once it trains:
- `archer-async resume RUN_DIR` is refused by the run lock with exit 2 and one line naming the live
  driver's pid and host, and touches nothing (status.json, the buffer log, the checkpoints);
- SIGTERM to the driver alone (what `kill PID`, systemd or a scheduler sends) stops it as Ctrl-C does:
  exit 130, status.json "stopped", no process of the run left, the lock released.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers.launch import ROOT, CliRun, new_tag, run_env, wait_no_tagged

pytestmark = [pytest.mark.integration]

ARGS = ["learner.total_steps=40", "launch.eval_every=0", "actors.max_response_length=32", "dashboard.enabled=false",
        "wandb.mode=disabled", "actors.num_actors=1", "learner.batch_groups=8", "learner.mini_batch_groups=8",
        "learner.checkpoint_every=1000"]


def _digest(path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and "logs" not in p.parts and p.name != "metrics.jsonl"}


def test_live_run_is_locked_and_sigterm_stops_it_gracefully(tmp_path):
    run_dir = tmp_path / "run"
    tag = new_tag("lifecycle")
    run = CliRun(["train", f"run_dir={run_dir}", *ARGS], tag, tmp_path / "train.out")
    try:
        assert run.wait_for_line(r"step 1/40", timeout_s=480), f"the run never trained:\n{run.tail()}"
        lock = json.loads((run_dir / "driver.lock").read_text())
        assert lock["pid"] == run.proc.pid and lock["host"] == socket.gethostname()

        status_before = (run_dir / "status.json").read_bytes()
        log_before = {p.name: p.stat().st_size for p in (run_dir / "buffer" / "log").iterdir()}
        t0 = time.time()
        second = subprocess.run([sys.executable, "-m", "launch.cli", "resume", str(run_dir)], cwd=ROOT,
                                capture_output=True, text=True, timeout=120, env=run_env(new_tag("second")))
        assert second.returncode == 2, (second.stdout[-2000:], second.stderr[-2000:])
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"pid {run.proc.pid}" in lines[0] and socket.gethostname() in lines[0], lines[0]
        assert time.time() - t0 < 60  # refused at once: no preflight, no Ray
        assert (run_dir / "status.json").read_bytes() == status_before
        for name, size in log_before.items():  # the live buffer's log was not opened for repair
            p = run_dir / "buffer" / "log" / name
            assert not p.exists() or p.stat().st_size >= size or p.with_suffix(".seg").exists()

        t_term = time.time()
        os.kill(run.proc.pid, signal.SIGTERM)  # the driver alone, as `kill PID` does
        rc = run.wait(180)
        stop_s = time.time() - t_term
        left = wait_no_tagged(tag, 30)
    finally:
        run.close()
    out = run.output()
    assert rc == 130, out[-3000:]
    assert "interrupted: stopping every role" in out
    assert "Traceback" not in out
    assert not left, f"processes left after SIGTERM: {left}"
    assert stop_s < 120
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and "ended_at" in status
    assert (run_dir / "driver.lock").read_text() == ""  # released by a clean exit


def test_captured_rewind_and_sample_cannot_be_replayed(tmp_path, buffer_server):
    """A frame captured off the wire (authentic: signed with the run secret) and sent again is dropped
    and counted: a replayed `rewind` does not re-open consumed groups, a replayed `sample` takes none.
    Frames captured before a buffer restart are answered "stale_epoch" and not served."""
    import zmq

    from archer_async import wire
    from archer_async.buffer_client import BufferClient
    from tests.helpers.buffer import make_group

    proc = buffer_server({"capacity": 64, "filter_groups": False})
    with BufferClient.from_run_dir(tmp_path, client_id="actor") as actor:
        assert [r.status for r in actor.put_many([make_group(i) for i in range(8)])] == ["stored"] * 8
    learner = BufferClient.from_run_dir(tmp_path, client_id="learner")
    captured: dict[str, list] = {}
    pack = learner._signer.pack

    def spy(proto, header, payload=b""):  # what an eavesdropper on the control connection sees
        frames = pack(proto, header, payload)
        captured[header.__struct_config__.tag] = [bytes(f) if not isinstance(f, bytes) else f for f in frames]
        return frames

    learner._signer.pack = spy
    b1 = learner.sample(2, 0, timeout=10)
    sample_frames = captured["sample"]
    b2 = learner.sample(2, 0, timeout=10)
    learner.rewind(b1.consumed_state)  # the learner restarted from a checkpoint taken after b1
    rewind_frames = captured["rewind"]
    again = learner.sample(2, 0, timeout=10)
    assert again.group_ids == b2.group_ids  # what the rewind re-opened, delivered once more

    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(wire.read_endpoints(tmp_path)["control"])
    try:
        raw.send_multipart(rewind_frames)
        raw.send_multipart(sample_frames)
        assert not raw.poll(2000), "a replayed frame was answered"
        nxt = learner.sample(2, 0, timeout=10)
        assert not set(nxt.group_ids) & (set(b1.group_ids) | set(b2.group_ids)), nxt.group_ids  # nothing re-opened
        s = learner.stats()
        assert s["rejected_replay"] == 2
        assert s["stored_total"] == 8 and s["ready"] == 8 - 6  # the replayed sample took nothing

        # a restarted buffer (new epoch) does not serve frames captured before
        proc.terminate()
        assert proc.wait(10) == 0
        buffer_server({"capacity": 64, "filter_groups": False}, restore=nxt.consumed_state)
        raw.close()
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(wire.read_endpoints(tmp_path)["control"])
        raw.send_multipart(rewind_frames)
        assert raw.poll(5000)
        header, _ = learner._signer.unpack(wire.PROTO_REP, raw.recv_multipart())
        assert header["status"] == "stale_epoch"
        last = learner.sample(2, 0, timeout=30)  # the real client follows the restart
        assert not set(last.group_ids) & set(b1.group_ids + b2.group_ids + nxt.group_ids)
        assert learner.stats()["rejected_stale_epoch"] >= 1
    finally:
        raw.close()
        ctx.term()
        learner.close()


def test_resume_refuses_a_flipped_bit_in_the_active_segment(tmp_path):
    """One flipped bit inside the buffer's active segment, with acknowledged groups after it: resume
    stops before any process starts with one line naming the file and byte offset, and cuts nothing."""
    from archer_async.config import BufferConfig
    from buffer.store import BufferStore
    from tests.helpers.buffer import make_group, payload_meta

    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "launch.cli", "train", "--dry-run", f"run_dir={run}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    run.mkdir()
    (run / "config.resolved.yaml").write_text(r.stdout)
    step = run / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    (step / "DONE").write_text(json.dumps({"step": 2}))
    (step / "learner_state.json").write_text(json.dumps({"step": 2, "version": 2}))
    (step / ".metadata").write_text("x")
    (run / "checkpoints" / "latest").write_text("step-2\n")
    store = BufferStore(run / "buffer" / "log", BufferConfig(), 8)
    for i in range(10):
        store.ingest([payload_meta(make_group(i, tokens=50))])
        store.commit()
    store.close()
    active = next((run / "buffer" / "log").glob("*.open"))
    victim = store.table.entries[3].loc
    raw = bytearray(active.read_bytes())
    raw[victim.offset + victim.size // 2] ^= 0x10
    active.write_bytes(bytes(raw))
    before = _digest(run)
    r = subprocess.run([sys.executable, "-m", "launch.cli", "resume", str(run)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert active.name in lines[0] and f"byte {victim.offset}" in lines[0] and "not a torn tail" in lines[0]
    assert _digest(run) == before and active.read_bytes() == bytes(raw)

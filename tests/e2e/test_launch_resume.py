"""Ctrl-C and resume: a run interrupted mid-training stops cleanly, then `archer-async resume` continues it.

One run is stopped with SIGINT to its process group (what a terminal's Ctrl-C does) while it trains the
step after a checkpoint, so that step's groups were delivered and trained but are not in the checkpoint.
The resumed run must restart the actors with the checkpoint's weights, rewind the buffer, continue steps
and versions from the checkpoint and train every sample at most once (RUN_DIR/trained_ids.jsonl, the
learner's record of the ids entering each step, cut back to the checkpoint on resume).
"""

from __future__ import annotations

import datetime
import json
import re
import time

import pytest

from archer_async.config import BufferConfig
from buffer.store import BufferStore
from launch.dashboard import RunReader
from tests.helpers.launch import CliRun, new_tag, read_jsonl, wait_no_tagged

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

CKPT = 2      # checkpoint_every: the run is stopped while it trains step CKPT + 1
RESUMED_TOTAL = 4
ACTORS = ("actor0",)  # one actor keeps the two start-ups of this module short on a 2-core machine
ARGS = ["launch.eval_every=0", "actors.max_response_length=32", "dashboard.enabled=false", "wandb.mode=disabled",
        f"learner.checkpoint_every={CKPT}", f"actors.num_actors={len(ACTORS)}",
        "learner.batch_groups=8", "learner.mini_batch_groups=8"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    run_dir = tmp / "run"
    tag = new_tag("ctrlc")
    run = CliRun(["train", f"run_dir={run_dir}", "learner.total_steps=40", *ARGS], tag, tmp / "train.out")
    try:
        seen = run.wait_for_line(rf"step {CKPT + 1}/40", timeout_s=480)
        assert seen, f"the run never reached step {CKPT + 1}:\n{run.tail()}"
        assert (run_dir / "checkpoints" / f"step-{CKPT}" / "DONE").is_file()
        t_int = time.time()
        run.interrupt()
        rc = run.wait(180)
        stop_s = time.time() - t_int
        left = wait_no_tagged(tag, 30)
    finally:
        run.close()
    return {"run_dir": run_dir, "rc": rc, "out": run.output(), "left": left, "stop_s": stop_s, "tmp": tmp}


@pytest.fixture(scope="module")
def resumed_run(stopped_run):
    run_dir, tmp = stopped_run["run_dir"], stopped_run["tmp"]
    tag = new_tag("resume")
    t0 = time.time()
    run = CliRun(["resume", str(run_dir), f"learner.total_steps={RESUMED_TOTAL}"], tag, tmp / "resume.out")
    try:
        rc = run.wait(600)
        left = wait_no_tagged(tag, 30)
    finally:
        run.close()
    return {"run_dir": run_dir, "rc": rc, "out": run.output(), "left": left, "t0": t0}


def test_ctrl_c_stops_cleanly(stopped_run):
    run_dir = stopped_run["run_dir"]
    assert stopped_run["rc"] == 130, stopped_run["out"][-3000:]
    assert "interrupted: stopping every role" in stopped_run["out"]
    assert not stopped_run["left"], f"processes left after Ctrl-C: {stopped_run['left']}"
    assert stopped_run["stop_s"] < 120, f"stopping took {stopped_run['stop_s']:.0f} s"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and "ended_at" in status
    assert RunReader(run_dir).summary()["status"] == "stopped"  # what the dashboard shows
    # the last checkpoint is the one before the interrupted step, complete
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{CKPT}"
    state = json.loads((run_dir / "checkpoints" / latest / "learner_state.json").read_text())
    assert state["step"] == CKPT and state["version"] == CKPT
    assert (run_dir / "checkpoints" / latest / "DONE").is_file()
    assert state["extra_state"]["buffer"]["cursor"] >= 0 and len(state["extra_state"]["actors"]) == len(ACTORS)
    # the buffer was flushed: its log is clean and holds every group an actor saw acknowledged
    store = BufferStore(run_dir / "buffer" / "log", BufferConfig(filter_groups=False), 8, readonly=True)
    try:
        assert store.log.tail is None or store.log.tail.truncated_bytes == 0, store.log.tail
        acked = [r["group_id"] for a in ACTORS for r in read_jsonl(run_dir / "actors" / f"{a}.acked.jsonl")]
        assert acked, "no group was acknowledged before the stop"
        lost = [g for g in acked if not store.table.known(g)]
        assert not lost, f"acknowledged groups missing from the buffer log: {lost[:5]}"
    finally:
        store.close()
    trained = read_jsonl(run_dir / "trained_ids.jsonl")
    assert [r["step"] for r in trained][:CKPT + 1] == list(range(1, CKPT + 2))


def test_resume_continues_from_the_checkpoint(stopped_run, resumed_run):
    run_dir = resumed_run["run_dir"]
    assert resumed_run["rc"] == 0, resumed_run["out"][-3000:]
    assert not resumed_run["left"], f"processes left: {resumed_run['left']}"
    assert f"resumed at step {CKPT}, weight version {CKPT}" in resumed_run["out"]
    assert f"training steps {CKPT + 1}..{RESUMED_TOTAL}" in resumed_run["out"]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    # steps and versions: 1..total once each, the rows of the interrupted step replaced
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] >= 1]
    assert [r["step"] for r in rows] == list(range(1, RESUMED_TOTAL + 1))
    assert [r["version"] for r in rows] == list(range(1, RESUMED_TOTAL + 1))
    assert (run_dir / "checkpoints" / f"step-{RESUMED_TOTAL}" / "DONE").is_file()
    assert (run_dir / "hf" / f"step-{RESUMED_TOTAL}" / "model.safetensors").is_file()


def test_actors_restart_with_the_restored_weights(resumed_run):
    """Before any new rollout the actors load the checkpoint's weights (version CKPT) from the learner;
    every actor report of the resumed run is at that version or later."""
    run_dir, t0 = resumed_run["run_dir"], resumed_run["t0"]
    for a in ACTORS:
        served = [(_log_time(m.group(1)), int(m.group(2))) for m in re.finditer(
            r"^(\S+ \S+) .*now serving version (\d+)", (run_dir / "logs" / f"{a}.log").read_text(), re.M)]
        before = [v for t, v in served if t < t0 - 1]
        after = [v for t, v in served if t >= t0 - 1]
        assert before[:CKPT + 1] == list(range(CKPT + 1)), served       # the first run
        assert after == list(range(CKPT, RESUMED_TOTAL + 1)), served    # restored weights first
    late = [r for r in read_jsonl(run_dir / "actor_metrics.jsonl") if r["time"] >= t0]
    assert late, "no actor metrics after the resume"
    assert min(r["version"] for r in late) >= CKPT, sorted({r["version"] for r in late})


def _log_time(stamp: str) -> float:
    """Unix time of a log line's "YYYY-MM-DD HH:MM:SS,mmm" (local time)."""
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_no_sample_trained_twice(resumed_run):
    run_dir = resumed_run["run_dir"]
    trained = read_jsonl(run_dir / "trained_ids.jsonl")
    assert [r["step"] for r in trained] == list(range(1, RESUMED_TOTAL + 1))
    groups = [g for r in trained for g in r["group_ids"]]
    samples = [s for r in trained for s in r["sample_ids"]]
    assert groups and len(groups) == len(set(groups)), "a group was trained twice"
    assert len(samples) == len(set(samples)), "a sample was trained twice"
    # the buffer agrees: each trained group was delivered exactly once (max_reuse 1) after the rewind
    store = BufferStore(run_dir / "buffer" / "log", BufferConfig(filter_groups=False), 8, readonly=True)
    try:
        delivered = {e.meta.group_id: e.delivered for e in store.table.entries if e.delivered}
        assert set(groups) == set(delivered), (sorted(set(groups) ^ set(delivered)))[:6]
        assert max(delivered.values()) == 1
        assert store.record_counts.get("rewind", 0) >= 1, "the resumed buffer did not rewind to the checkpoint"
    finally:
        store.close()

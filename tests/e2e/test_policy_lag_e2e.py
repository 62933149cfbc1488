"""`launch.policy_lag: k` end to end (local Ray cluster, buffer, FSDP2 learner ranks, vLLM actors, the tiny
model, sync mode): from the per-token versions of the trained data, the learner at version v trains on
data of version v - k exactly (version 0 during the first k steps)."""

from __future__ import annotations

import pytest

from tests.helpers.launch import TINY, CliRun, new_tag, read_jsonl, wait_no_tagged

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

LAG, TOTAL = 2, 5


def test_trained_data_has_exactly_the_chosen_lag(tmp_path):
    run_dir = tmp_path / "run"
    tag = new_tag("lag")
    run = CliRun(["train", f"run_dir={run_dir}", *TINY, f"learner.total_steps={TOTAL}", "launch.eval_every=0",
                  "dashboard.enabled=false", "launch.mode=sync", f"launch.policy_lag={LAG}"],
                 tag, tmp_path / "train.out")
    try:
        rc = run.wait(840)
        left = wait_no_tagged(tag, 30)
    finally:
        run.close()
    assert rc == 0, run.output()[-4000:]
    assert not left, left
    steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] >= 1]
    assert [r["step"] for r in steps] == list(range(1, TOTAL + 1))
    for r in steps:
        version_before = r["version"] - 1  # the learner's version while it trained this step
        lag = min(version_before, LAG)
        # every sample's oldest token, and every token (mean and max), is exactly `lag` versions old
        assert set(r["staleness/hist"]) == {str(lag)}, (r["step"], r["staleness/hist"])
        assert r["staleness/max"] == lag and r["staleness/mean"] == pytest.approx(lag), r["step"]
    assert [r["staleness/max"] for r in steps] == [0, 1, 2, 2, 2]


def test_auto_staleness_bound_is_logged_and_within_bounds(tmp_path):
    """buffer.max_staleness auto in an asynchronous run: every step logs the bound in force, within
    [auto_min_staleness, auto_max_staleness], and no trained token is older than the bound of its step."""
    run_dir = tmp_path / "run"
    tag = new_tag("auto")
    run = CliRun(["train", f"run_dir={run_dir}", *TINY, "learner.total_steps=4", "launch.eval_every=0",
                  "dashboard.enabled=false", "buffer.max_staleness=auto", "buffer.auto_min_staleness=1",
                  "buffer.auto_max_staleness=3"], tag, tmp_path / "train.out")
    try:
        rc = run.wait(840)
        left = wait_no_tagged(tag, 30)
    finally:
        run.close()
    assert rc == 0, run.output()[-4000:]
    assert not left, left
    steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] >= 1]
    assert len(steps) == 4
    bounds = [3] + [r["staleness/bound"] for r in steps]  # the bound before step 1 is the upper bound
    for before, r in zip(bounds, steps):
        assert 1 <= r["staleness/bound"] <= 3
        assert r["staleness/max"] <= before, (r["step"], r["staleness/max"], before)

"""The no-progress watchdog: names the cause once nothing reaches the buffer while actors keep producing."""

import pytest

from launch.progress import ProgressWatch


def _buf(stored=0, filtered=0, stale=0, **by_reason):
    return {"stored_total": stored, "dropped_filtered": filtered, "dropped_stale": stale, "dropped_by_reason": by_reason}


def test_every_group_filtered_is_named_after_the_timeout():
    w = ProgressWatch(timeout_s=60, max_prompt_length=256, min_events=4)
    assert w.observe(0, _buf(), []) == ""
    assert w.observe(30, _buf(filtered=10, solve_none=10), []) == ""          # inside the window
    why = w.observe(61, _buf(filtered=20, solve_none=18, solve_all=2), [])
    assert why.startswith("no progress: every group filtered as having no signal (20 groups in the last 61 s")
    assert "solve_all 2, solve_none 18" in why


def test_a_stored_group_restarts_the_window():
    w = ProgressWatch(timeout_s=60, max_prompt_length=256)
    w.observe(0, _buf(), [])
    w.observe(50, _buf(stored=1, filtered=30), [])
    assert w.observe(100, _buf(stored=1, filtered=60), []) == ""              # 50 s since the last stored group
    assert "filtered" in w.observe(111, _buf(stored=1, filtered=70), [])


@pytest.mark.parametrize("buffer,actors,needle", [
    (_buf(stale=9), [], "every group dropped as stale (9 stale"),
    (_buf(), [{"prompts_skipped": 5}, {"prompts_skipped": 7}], "every prompt skipped as longer than data.max_prompt_length=256 (12 prompts"),
])
def test_other_causes(buffer, actors, needle):
    w = ProgressWatch(timeout_s=10, max_prompt_length=256)
    w.observe(0, _buf(), [{"prompts_skipped": 0}])
    assert needle in w.observe(11, buffer, actors)


def test_slow_generation_or_disabled_is_not_a_cause():
    w = ProgressWatch(timeout_s=10, max_prompt_length=256, min_events=16)
    w.observe(0, _buf(), [])
    assert w.observe(1000, _buf(), []) == ""                                  # nothing produced at all
    assert w.observe(1001, _buf(filtered=3), []) == ""                        # too few to tell
    off = ProgressWatch(timeout_s=0, max_prompt_length=256)
    off.observe(0, _buf(), [])
    assert off.observe(1e6, _buf(filtered=1000), []) == ""

"""Per-step metrics the driver derives from running totals: the actors' wait for weights and idle
fraction (per step, not a cumulative maximum) and the buffer's drops by reason."""

import time

from launch.train import Run, drop_counts


class _FakeRun:
    """A Run without a cluster: `_actor_stats` returns what the test sets."""

    def __init__(self):
        self.stats = {}
        self._actor_prev, self._row_t = {}, time.monotonic()

    def _actor_stats(self, timeout_s):
        return self.stats

    _actor_metrics = Run._actor_metrics


def test_actor_wait_is_per_step_not_a_running_maximum():
    run = _FakeRun()
    run.stats = {0: {"actor/wait_for_weights_s": 2.0, "idle_s": 0.0}, 1: {"actor/wait_for_weights_s": 0.0, "idle_s": 0.0}}
    assert run._actor_metrics()["actor/wait_for_weights_s"] == 1.0  # mean over actors of this step's waits
    run.stats = {0: {"actor/wait_for_weights_s": 2.5, "idle_s": 0.0}, 1: {"actor/wait_for_weights_s": 0.5, "idle_s": 0.0}}
    assert run._actor_metrics()["actor/wait_for_weights_s"] == 0.5  # the totals grew by 0.5 each
    run.stats = {0: {"actor/wait_for_weights_s": 2.5, "idle_s": 0.0}, 1: {"actor/wait_for_weights_s": 0.2, "idle_s": 0.0}}
    assert run._actor_metrics()["actor/wait_for_weights_s"] == 0.1  # actor1 re-placed: counts from 0


def test_actor_idle_fraction_of_the_step():
    run = _FakeRun()
    run.stats = {0: {"idle_s": 0.0}, 1: {"idle_s": 0.0}}
    run._actor_metrics()
    run._row_t = time.monotonic() - 10.0  # a 10 s step
    run.stats = {0: {"idle_s": 5.0}, 1: {"idle_s": 0.0}}
    m = run._actor_metrics()
    assert 0.24 <= m["actor/idle_frac"] <= 0.25  # actor0 idle half of it, actor1 never


def test_drop_counts_per_step_by_reason():
    first = drop_counts({"filtered:solve_none": 5, "stale": 1, "filtered:solve_all": 2}, None)
    assert first == {"groups/dropped_solve_none": 5, "groups/dropped_solve_all": 2, "groups/dropped_stale": 1,
                     "groups/dropped_infra_error": 0}
    nxt = drop_counts({"filtered:solve_none": 8, "stale": 1, "filtered:solve_all": 2, "filtered:infra_error": 1},
                      {"filtered:solve_none": 5, "stale": 1, "filtered:solve_all": 2})
    assert nxt == {"groups/dropped_solve_none": 3, "groups/dropped_solve_all": 0, "groups/dropped_stale": 0,
                   "groups/dropped_infra_error": 1}
    assert drop_counts({"stale": 2}, {"stale": 9})["groups/dropped_stale"] == 2  # a restarted buffer

"""buffer.max_staleness auto: the control rule by hand, the config checks, and the buffer's set_staleness
op (an in-process buffer service: the admission limit follows the new bound)."""

import math

import pytest

from archer_async.config import BufferConfig, Config, load_config
from archer_async.staleness import initial_staleness, is_auto, next_staleness

AUTO = BufferConfig(max_staleness="auto", auto_min_staleness=1, auto_max_staleness=8, auto_ess_low=0.8,
                    auto_ess_high=0.95, auto_kl_high=0.02)


@pytest.mark.parametrize("current, ess, kl, expected", [
    (8, 0.99, 0.001, 8),      # healthy at the upper bound: stays
    (4, 0.99, 0.001, 5),      # healthy: +1
    (4, 0.99, 0.0101, 4),     # ESS healthy but KL above half the threshold: hold
    (8, 0.79, 0.001, 4),      # ESS degraded: halved
    (8, 0.99, 0.021, 4),      # KL degraded: halved
    (5, 0.5, 0.5, 2),         # both degraded: 5 // 2
    (1, 0.1, 1.0, 1),         # never below the lower bound
    (4, 0.9, 0.001, 4),       # between the ESS thresholds: hold
    (4, math.nan, 0.001, 4),  # no statistic (e.g. a skipped step): hold
])
def test_control_rule_by_hand(current, ess, kl, expected):
    assert next_staleness(current, ess, kl, AUTO) == expected


def test_initial_bound_and_the_sequence_of_a_degradation():
    assert is_auto(AUTO) and initial_staleness(AUTO) == 8
    assert not is_auto(BufferConfig()) and initial_staleness(BufferConfig(max_staleness=3)) == 3
    eta, seen = 8, []
    for ess in (0.5, 0.5, 0.99, 0.99, 0.99, 0.6):
        eta = next_staleness(eta, ess, 0.0, AUTO)
        seen.append(eta)
    assert seen == [4, 2, 3, 4, 5, 2]


@pytest.mark.parametrize("overrides, message", [
    (["buffer.max_staleness=-1"], "buffer.max_staleness = -1: must be >= 0"),
    (["buffer.max_staleness=auto", "buffer.auto_min_staleness=5", "buffer.auto_max_staleness=2"], "min <= max"),
    (["buffer.auto_ess_low=0.99", "buffer.auto_ess_high=0.9"], "low <= high"),
    (["buffer.auto_kl_high=0"], "auto_kl_high"),
    (["buffer.max_staleness=often"], "max_staleness"),
])
def test_config_checks(overrides, message, tmp_path):
    with pytest.raises(Exception, match=message):
        load_config([], overrides + [f"run_dir={tmp_path / 'r'}"])


def test_buffer_set_staleness_moves_the_admission_limit(tmp_path):
    from archer_async.buffer_client import BufferClient
    from buffer.service import BufferService

    cfg = Config(run_dir=str(tmp_path), buffer={"max_staleness": "auto", "auto_max_staleness": 6, "fsync": False})
    svc = BufferService(cfg, tmp_path)
    try:
        with BufferClient.from_run_dir(tmp_path) as c:
            b = cfg.learner.batch_groups
            assert c.admission()["limit"] == (6 + 0 + 1) * b and c.admission()["max_staleness"] == 6
            svc.set_max_staleness(2)
            adm = c.admission()
            assert adm["max_staleness"] == 2 and adm["limit"] == (2 + 0 + 1) * b
    finally:
        svc.stop()

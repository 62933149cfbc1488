"""avg@K / pass@K against hand-computed values (docs/algorithm.md section 9)."""

import pytest

from launch.evaluation import pass_at_k, summarize


def test_pass_at_k_hand_values():
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 1, 8) == 1.0
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=5, c=2, k=1: plain pass rate 2/5
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    # n=10, c=3, k=4: 1 - C(7,4)/C(10,4) = 1 - 35/210
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - 35 / 210)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 2)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_summarize_avg_and_pass():
    out = summarize([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], k=4)
    assert out["avg_at_k"] == pytest.approx((0.25 + 0.0 + 1.0) / 3)
    assert out["pass_at_k"] == pytest.approx(2 / 3)
    assert out["problems"] == 3 and out["samples"] == 12


def test_summarize_keeps_infra_errors_out():
    out = summarize([[1.0, None], [None, None]], k=1)
    assert out["avg_at_k"] == 1.0 and out["problems"] == 1
    assert out["infra_errors"] == 3 and out["problems_infra_error"] == 1

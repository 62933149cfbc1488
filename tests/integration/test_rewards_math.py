"""Math rewards through the pool: equivalent forms pass, pathological answers end within the deadline."""

import time

import pytest

from archer_async.config import RewardsConfig
from rewards import RewardPool
from rewards.math_worker import MathWorker

pytestmark = pytest.mark.integration


def test_math_pool_equivalent_forms_and_wrong_answers():
    items = [
        ("math500", r"\frac{3}{4}", r"<think>\boxed{1}</think> so the answer is $\boxed{0.75}$"),
        ("aime2024", "204", r"</think>\boxed{204}"),
        ("amc23", r"\frac{\sqrt{2}}{2}", r"</think>\boxed{\dfrac{1}{\sqrt{2}}}"),
        ("olympiadbench", r"(x+1)^2", r"</think>\boxed{x^2+2x+1}"),
        ("tiny_math", "12", r"</think>\boxed{12}"),
        ("minerva", "12", r"</think>\boxed{13}"),
        ("math", "7", "</think> I cannot finish this one"),  # no answer
        ("math", "7", "</think> the answer is 7"),  # no box: Archer's Math-Verify string match accepts it
    ]
    with RewardPool(RewardsConfig(workers=2, math_timeout_s=30.0)) as pool:
        got = [r.status for r in pool.score(items, training=True)]
    assert got == ["pass"] * 5 + ["fail", "fail", "pass"]


def test_pathological_answer_ends_within_deadline():
    worker = MathWorker(timeout_s=1.5)
    try:
        assert worker.check("2", r"\boxed{2}").status == "pass"  # warm: the worker process is started
        hard = r"\boxed{" + "(" * 200 + "x^{x^{x^{x^{99999}}}}" + ")" * 200 + r" + 9^{9^{9^{9}}}}"
        t0 = time.monotonic()
        r = worker.check("9^{9^{9^{9}}}+1", hard)
        assert time.monotonic() - t0 < 1.5 + 3.0
        assert r.status in ("timeout", "fail"), r
        assert worker.check("3", r"\boxed{3}").status == "pass"  # a fresh worker replaces a killed one
    finally:
        worker.close()

"""Pure-function tests of the reward graders: extraction, dispatch, ground truth, comparisons, math."""

import json

import pytest

from archer_async.config import RewardsConfig, UserError
from rewards import UnknownDataSource, grader_kind
from rewards.code_grader import (GroundTruthError, extract_code, outputs_match, parse_ground_truth,
                                              values_equal)
from rewards.harness import _compile_tests, _make_helpers
from rewards.math_grader import check_answer, extract_boxed, to_number
from archer_async.types import Reward


@pytest.mark.parametrize("src,kind", [
    ("code", "code"), ("livecodebench", "code"), ("livecodebench_v5", "code"), ("humanevalplus", "code"),
    ("tiny_code", "code"), ("math", "math"), ("aime2024", "math"), ("amc23", "math"), ("math500", "math"),
    ("minerva", "math"), ("olympiad_bench", "math"), ("tiny_math", "math"), ("AIME25", "math"),
])
def test_dispatch(src, kind):
    assert grader_kind(src) == kind


def test_unknown_source_is_a_user_error():
    with pytest.raises(UnknownDataSource, match="unknown data_source 'gsm9k'"):
        grader_kind("gsm9k")
    assert issubclass(UnknownDataSource, UserError)


def test_extract_code_after_think_last_python_block():
    r = "```python\nprint(0)\n```</think>text\n```python\nprint(1)\n```\nmore\n```python\nprint(2)\n```\n```\nplain\n```"
    assert extract_code(r).strip() == "print(2)"
    assert extract_code("<think>```python\nx=1\n```</think> no code") is None
    assert extract_code("no think\n```py\nprint(3)\n```").strip() == "print(3)"
    assert extract_code("```\nprint(4)\n```").strip() == "print(4)"


def test_parse_ground_truth_formats():
    assert parse_ground_truth(json.dumps({"inputs": ["1"], "outputs": ["2"]})) == ("stdio", [("1", "2")])
    assert parse_ground_truth({"functional": "assert f()"}) == ("functional", "assert f()")
    lcb = [{"input": "[1]", "output": "1", "testtype": "functional", "metadata": {"func_name": "f"}}]
    assert parse_ground_truth(json.dumps(lcb))[0] == "lcb"
    for bad in ("not json", json.dumps({"x": 1}), json.dumps({"inputs": [1], "outputs": []}), "[]",
                json.dumps([{"input": "1", "output": "1", "testtype": "functional", "metadata": {}}])):
        with pytest.raises(GroundTruthError):
            parse_ground_truth(bad)


def test_output_and_value_comparison():
    assert outputs_match("3\n", " 3") and outputs_match("1 \r\n2\n", "1\n2") and not outputs_match("3", "4")
    assert values_equal([1, [2.0000000001]], [1, [2]]) and values_equal({"a": [1]}, {"a": [1]})
    assert not values_equal(True, 1) and not values_equal([1, 2], [1]) and not values_equal("1", 1)


def test_trusted_helpers_refuse_lying_objects():
    cmp, truth = _make_helpers()

    class Liar:
        def __eq__(self, other):
            return True

        def __bool__(self):
            return True

    class LyingInt(int):
        def __eq__(self, other):
            return True

    assert cmp(("Eq",), [1, (2, 3)], [1, (2, 3)]) and not cmp(("Lt", "Lt"), 1, 3, 2)
    for liar in (Liar(), LyingInt(5), [Liar()], {"k": Liar()}):
        with pytest.raises(AssertionError):
            cmp(("Eq",), liar, 7)
        with pytest.raises(AssertionError):
            truth(liar)
    assert cmp(("Is",), Liar, Liar)  # identity cannot lie


def test_test_code_rewrite_binds_helpers():
    code = _compile_tests("def check(f):\n    assert f(1) == 2 and not f(0) != 1\ncheck(g)\n", *_make_helpers())
    ns = {"g": lambda x: x + 1}
    exec(code, ns)  # passes with the honest function
    ns["g"] = lambda x: type("L", (), {"__eq__": lambda s, o: True, "__ne__": lambda s, o: False})()
    with pytest.raises(AssertionError, match="non-builtin"):
        exec(code, ns)


def test_extract_boxed():
    assert extract_boxed(r"\boxed{1} </think> a \boxed{\frac{1}{2}} then \boxed{x^{2}}") == "x^{2}"
    assert extract_boxed(r"\boxed{3} </think> nothing") is None
    assert extract_boxed(r"answer \boxed 7.") == "7."
    assert extract_boxed(r"\boxed{a}\boxed{b") == "a"


@pytest.mark.parametrize("gold,answer,ok", [
    ("2", r"\boxed{2}", True), (r"\frac{1}{2}", r"\boxed{0.5}", True), ("0.5", r"\boxed{\dfrac12}", True),
    ("1000", r"\boxed{1,000}", True), (r"50\%", r"\boxed{0.5}", True), ("3", r"\boxed{x = 3}", True),
    (r"90^\circ", r"\boxed{90}", True), (r"\text{(B)}", r"\boxed{(B)}", True), ("3", r"\boxed{4}", False),
    (r"\frac{\sqrt{3}}{2}", r"\boxed{\frac{\sqrt3}{2}}", True), (r"2\sqrt{2}", r"\boxed{\sqrt{8}}", True),
    ("x^2+2x+1", r"\boxed{(x+1)^2}", True), ("5", "no box here", False), (["4", "four"], r"\boxed{four}", True),
])
def test_math_equivalence(gold, answer, ok):
    assert check_answer(gold, answer)[0] is ok


def test_to_number():
    assert to_number("-3/4") == to_number(r"-\frac{3}{4}") == to_number("-0.75")
    assert to_number("x") is None and to_number("1/0") is None


def test_reward_values_and_config_fields():
    assert Reward("pass").value == 1.0 and Reward("timeout").value == 0.0 and Reward("infra_error").value is None
    cfg = RewardsConfig()
    for name in ("workers", "sandbox", "timeout_s", "cpu_time_s", "memory_mb", "max_output_bytes",
                 "max_tests_per_problem", "math_timeout_s", "max_processes", "max_open_files", "workdir_mb"):
        assert RewardsConfig.model_fields[name].description, name
        assert getattr(cfg, name) is not None

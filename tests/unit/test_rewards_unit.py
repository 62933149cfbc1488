"""Pure-function tests of the reward graders: extraction, dispatch, row formats, comparisons, codec, math."""

import json
import math

import pytest

from archer_async.config import RewardsConfig, UserError
from archer_async.types import Reward
from rewards import UnknownDataSource, grader_kind
from rewards import lcb_compat, prelude, wire
from rewards.code_grader import (GroundTruthError, archer_output_matches, extract_code, extract_code_lcb,
                                 parse_ground_truth)
from rewards.harness import HarnessCodec, Remote
from rewards.math_grader import check_answer, extract_boxed
from rewards.runner import RunnerCodec


@pytest.mark.parametrize("src,kind", [
    ("code", "code"), ("livecodebench", "code"), ("livecodebench_v5", "code"), ("humanevalplus", "code"),
    ("taco", "code"), ("apps", "code"), ("code_contests", "code"), ("codeforces", "code"),
    ("primeintellect", "code"), ("leetcode", "code"), ("tiny_code", "code"), ("math", "math"),
    ("aime2024", "math"), ("amc23", "math"), ("math500", "math"), ("minerva", "math"),
    ("olympiad_bench", "math"), ("tiny_math", "math"), ("AIME25", "math"),
])
def test_dispatch(src, kind):
    assert grader_kind(src) == kind


def test_unknown_source_is_a_user_error():
    with pytest.raises(UnknownDataSource, match="unknown data_source 'gsm9k'"):
        grader_kind("gsm9k")
    assert issubclass(UnknownDataSource, UserError)


def test_extract_code_is_archers():
    r = "```python\nprint(0)\n```</think>text\n```python\nprint(1)\n```\nmore\n```python\nprint(2)\n```\n```\nplain\n```"
    assert extract_code(r) == "print(2)\n"
    assert extract_code("<think>```python\nx=1\n```</think> no code") is None
    # Archer takes only ```python fences, case-sensitive, and the text between the first two </think>
    assert extract_code("```py\nprint(3)\n```") is None and extract_code("```Python\nprint(3)\n```") is None
    assert extract_code("a</think>```python\nprint(4)\n```</think>```python\nprint(5)\n```") == "print(4)\n"


def test_extract_code_lcb():
    assert extract_code_lcb("<think>```python\nx\n```</think>\n```py\nprint(1)\nprint(2)\n```\n") == "print(1)\nprint(2)"
    assert extract_code_lcb("</think> only one ``` line") is None


def test_parse_ground_truth_row_formats():
    assert parse_ground_truth(json.dumps({"inputs": ["1"], "outputs": ["2"]})) == ("stdio", [("1", "2")])
    assert parse_ground_truth({"functional": "assert f()"}) == ("functional", "assert f()")
    assert parse_ground_truth(json.dumps([{"input": "1", "output": "2"}]), "codeforces") == ("stdio", [("1", "2")])
    pi = [{"type": "stdin_stdout", "input": "1", "output": "2", "fn_name": None}]
    assert parse_ground_truth(json.dumps(pi), "primeintellect") == ("stdio", [("1", "2")])
    pi_fn = [{"type": "function_call", "fn_name": "f", "input": [1, 2], "output": [3]}]
    assert parse_ground_truth(json.dumps(pi_fn), "primeintellect") == (
        "taco_call", {"fn_name": "f", "inputs": [[1, 2]], "outputs": [[3]]})
    taco = {"fn_name": "g", "inputs": [[1]], "outputs": [[2]]}
    assert parse_ground_truth(json.dumps(taco), "taco") == ("taco_call", taco)
    lcb = [{"input": "[1]", "output": "1", "testtype": "functional", "metadata": {"func_name": "f"}}]
    assert parse_ground_truth(json.dumps(lcb))[0] == "lcb"
    assert parse_ground_truth(json.dumps("def check(c): pass\ncheck(f)"), "humanevalplus")[0] == "functional"


@pytest.mark.parametrize("gt,source,msg", [
    ("not json", "code", "not JSON"),
    (json.dumps({"x": 1}), "code", "unknown keys"),
    (json.dumps({"inputs": [1], "outputs": []}), "code", "same length"),
    ("[]", "code", "unrecognised"),
    (json.dumps([{"input": "1", "output": "1", "testtype": "functional", "metadata": {}}]), "livecodebench", "func_name"),
    (json.dumps("def test_x():\n    assert f() == 1\n"), "kodcode", "humanevalplus"),
    (json.dumps("check(f)"), "code", "bare string of test code"),
    (json.dumps([{"type": "stdin_stdout", "input": "1", "output": "1"}, {"type": "function_call"}]), "primeintellect",
     "unsupported PrimeIntellect"),
])
def test_bad_ground_truth_names_the_field(gt, source, msg):
    with pytest.raises(GroundTruthError, match=msg) as e:
        parse_ground_truth(gt, source)
    assert str(e.value).startswith("reward_model.ground_truth: ")


def test_archer_stdout_comparison_is_exact_but_for_the_ends():
    assert archer_output_matches(b"3\n", " 3") and archer_output_matches(b"YES\nNO", "YES\nNO\n")
    assert not archer_output_matches(b"1 \n2 \n", "1\n2")  # inner trailing spaces count (only strip())
    assert not archer_output_matches(b"yes", "YES") and not archer_output_matches(b"12.0", "12")
    assert not archer_output_matches(b"\xff", "x")


def test_lcb_output_comparison():
    m = wire.lcb_output_matches
    assert m("0.5\n", "0.50") and m("12.0", "12") and m("1e1", "10") and m("1   2 \n3", "1 2\n3 ")
    assert not m("6.06449510224598", "6.06449510224597979401")  # exact decimals, no tolerance
    assert not m("1\n\n2", "1\n2") and not m("Yes", "YES") and not m("a  b", "a b")


def test_call_based_comparisons():
    assert lcb_compat.lcb_call_matches(1, True) and lcb_compat.lcb_call_matches((1, 2), [1, 2])
    assert not lcb_compat.lcb_call_matches([(7, 7)], [[7, 7]]) and lcb_compat.lcb_call_matches(3.0, 3)
    assert lcb_compat.taco_matches([48], [48]) and lcb_compat.taco_matches(48, [48])
    assert lcb_compat.taco_matches([(1, 2)], [[[1, 2]]]) and not lcb_compat.taco_matches(5, [6])
    assert lcb_compat.taco_process_input_output([{"1": "a"}], {"2": 3}) == ([{1: "a"}], [{2: 3}])


class _Conn:
    codec = None


def _pair():
    ns = prelude.namespace()
    h = HarnessCodec(_Conn(), {"L": ns["ListNode"], "T": ns["TreeNode"]})
    r = RunnerCodec()
    r.namespace = prelude.namespace()
    r.fallback = {"ListNode": r.namespace["ListNode"], "TreeNode": r.namespace["TreeNode"]}
    return ns, h, r


def test_codec_round_trip_keeps_types_and_node_identity():
    ns, h, r = _pair()
    value = [None, True, 1, -(1 << 80), 2.5, float("inf"), "s", (1, [2]), {3, 4}, frozenset({5}), {"k": (6,)},
             b"\x00\xff", 1 + 2j, range(1, 5, 2)]
    msg = json.loads(json.dumps(h.dumps(value)))
    back = r.loads(msg)
    assert back == value and type(back[7]) is tuple and type(back[7][1]) is list
    assert math.isnan(r.loads(h.dumps(float("nan"))))
    head = ns["list_node"]([1, 2, 3])
    got = r.loads(json.loads(json.dumps(h.dumps((head, head.next)))))
    assert got[0].next is got[1] and got[1].val == 2  # shared nodes stay shared
    got[1].val = 9  # the solution changes a node it was given: the harness's node changes too
    assert h.loads(json.loads(json.dumps(r.dumps(got[0])))) is head and head.next.val == 9
    tree = h.loads(r.dumps(r.namespace["tree_node"]([1, None, 2])))
    assert ns["is_same_tree"](tree, ns["tree_node"]([1, None, 2]))


def test_codec_sends_other_objects_as_handles_compared_by_identity():
    ns, h, r = _pair()

    class Liar:
        def __eq__(self, other):
            return True

    enc = r.dumps([Liar(), lambda: 1])
    got = h.loads(enc)
    assert all(type(x) is Remote for x in got) and got[0] != 4 and got[0] == got[0]
    with pytest.raises(TypeError, match="cannot be passed"):
        h.dumps(lambda: 0)
    for bad in ({"v": ["zz"], "nodes": {}}, {"v": ["n", "c999"], "nodes": {}}, {"v": 1, "nodes": {"c1": ["X"]}}):
        with pytest.raises(wire.ProtocolError):
            h.loads(bad)


def test_prelude_is_archers():
    ns = prelude.namespace()
    assert ns["list_node"]([]) is None and ns["tree_node"]([]) is None
    t = ns["tree_node"]([3, 9, 20, None, None, 15, 7])
    assert (t.left.val, t.right.left.val, t.left.left) == (9, 15, None)
    assert ns["is_same_list"](ns["list_node"]([1, 2]), ns["list_node"]([1, 2]))
    assert not ns["is_same_list"](ns["list_node"]([1]), ns["list_node"]([1, 2]))
    assert ns["isqrt"](17) == 4 and ns["Counter"]("aab")["a"] == 2 and ns["pairwise"] is not None
    assert type(ns["np"]) is prelude.LazyModule  # numpy is imported only when a program uses it


def test_extract_boxed():
    assert extract_boxed(r"\boxed{1} </think> a \boxed{\frac{1}{2}} then \boxed{x^{2}}") == "x^{2}"
    assert extract_boxed(r"\boxed{3} </think> nothing") is None
    assert extract_boxed(r"answer \boxed{}") == ""


@pytest.mark.parametrize("gold,answer,ok", [
    ("2", r"\boxed{2}", True), (r"\frac{1}{2}", r"\boxed{0.5}", True), ("0.5", r"\boxed{\dfrac12}", True),
    ("1000", r"\boxed{1,000}", True), (r"50\%", r"\boxed{0.5}", True), ("3", r"\boxed{x = 3}", True),
    (r"90^\circ", r"\boxed{90}", True), ("3", r"\boxed{4}", False), (["4", "four"], r"\boxed{four}", True),
    (r"28\%", r"\boxed{28}", True),           # Archer's normaliser drops \% (Math-Verify alone rejects)
    ("0.15", r"\boxed{15\%}", True),          # Math-Verify reads 15\% as 0.15 (Archer as shipped rejects)
    (r"\frac{3}{2}", r"\boxed{\frac{6}{4}}", True), ("5", "no box here", False),
    (["9", ""], r"\boxed{}", False),          # an empty answer never matches an empty alternative
])
def test_math_is_archer_or_math_verify(gold, answer, ok):
    assert check_answer(gold, answer)[0] is ok


def test_reward_values_and_config_fields():
    assert Reward("pass").value == 1.0 and Reward("timeout").value == 0.0 and Reward("infra_error").value is None
    cfg = RewardsConfig()
    for name in RewardsConfig.model_fields:
        assert RewardsConfig.model_fields[name].description, name
    # Archer's limits are the defaults (rewards/code_utils/utils.py); LiveCodeBench rows get LCB's 6 s
    assert (cfg.timeout_s, cfg.functional_timeout_s, cfg.lcb_timeout_s, cfg.memory_mb, cfg.max_tests_per_problem) == (
        30.0, 60.0, 6.0, 1024, 16)
    assert "numpy" in cfg.sandbox_packages


def test_data_loading_rejects_ungradable_rows_by_file_line_and_field(tmp_path):
    from archer_async.data import DataError, load_rows
    from rewards import check_row

    good = {"prompt": [{"role": "user", "content": "q"}], "data_source": "taco",
            "reward_model": {"ground_truth": json.dumps({"fn_name": "f", "inputs": [[1]], "outputs": [[1]]})}}
    bad = {**good, "data_source": "kodcode", "reward_model": {"ground_truth": json.dumps("def test_a(): pass")}}
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    assert len(load_rows(p)) == 2  # the core loader alone does not know the graders
    with pytest.raises(DataError, match=rf"{p}:2: reward_model.ground_truth: a bare string"):
        load_rows(p, check=check_row)
    check_row({**good, "data_source": "aime2024", "reward_model": {"ground_truth": ["204", 204]}})
    for row, msg in (({**good, "data_source": "chess"}, "data_source: unknown"),
                     ({**good, "data_source": "math", "reward_model": {"ground_truth": []}}, "math answer")):
        with pytest.raises(ValueError, match=msg):
            check_row(row)


def test_archer_recipe_states_archers_limits():
    from pathlib import Path

    from archer_async.config import load_config

    recipe = Path(__file__).resolve().parents[2] / "launch" / "configs" / "archer_code_1.5b.yaml"
    r = load_config([str(recipe)]).rewards
    assert (r.timeout_s, r.functional_timeout_s, r.memory_mb, r.max_tests_per_problem) == (30.0, 60.0, 1024, 16)
    assert r.lcb_timeout_s == 6.0

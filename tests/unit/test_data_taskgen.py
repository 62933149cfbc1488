"""The embedded tiny task generator: determinism, verl layout, disjoint splits, correct references."""

import json
import re

from archer_async import taskgen
from archer_async.taskgen import CODE_SOURCE, MATH_SOURCE, generate_tasks


def test_generator_is_deterministic_and_seed_dependent():
    a = generate_tasks(60, 20, seed=3)
    b = generate_tasks(60, 20, seed=3)
    c = generate_tasks(60, 20, seed=4)
    assert json.dumps(a) == json.dumps(b)
    assert json.dumps(a) != json.dumps(c)


def test_eval_split_does_not_depend_on_train_size():
    _, e1 = generate_tasks(10, 30, seed=0)
    _, e2 = generate_tasks(500, 30, seed=0)
    assert e1 == e2


def test_splits_are_disjoint_and_rows_are_verl():
    train, evals = generate_tasks(1500, 200, seed=0)
    assert len(train) == 1500 and len(evals) == 200
    tr_text = {r["prompt"][0]["content"] for r in train}
    ev_text = {r["prompt"][0]["content"] for r in evals}
    assert not tr_text & ev_text
    assert len(ev_text) == 200  # held-out prompts are unique
    for split, rows in (("train", train), ("eval", evals)):
        assert {r["data_source"] for r in rows} == {MATH_SOURCE, CODE_SOURCE}
        for i, r in enumerate(rows):
            assert r["prompt"] == [{"role": "user", "content": r["prompt"][0]["content"]}]
            assert r["reward_model"]["style"] == "rule"
            assert isinstance(r["reward_model"]["ground_truth"], str)
            assert r["extra_info"]["index"] == i and r["extra_info"]["split"] == split


def test_math_references_box_the_ground_truth():
    train, _ = generate_tasks(200, 0, seed=1)
    for r in train:
        if r["data_source"] == MATH_SOURCE:
            ref = r["extra_info"]["reference"]
            assert ref.startswith("<think>") and "</think>" in ref
            assert ref.endswith("\\boxed{%s}" % r["reward_model"]["ground_truth"])
            expr = re.search(r"\d+ [-+] \d+", r["prompt"][0]["content"]).group(0)
            assert str(eval(expr)) == r["reward_model"]["ground_truth"]


def test_code_references_pass_their_tests():
    train, evals = generate_tasks(120, 40, seed=2)
    for r in train + evals:
        if r["data_source"] != CODE_SOURCE:
            continue
        gt = json.loads(r["reward_model"]["ground_truth"])
        assert len(gt["inputs"]) == len(gt["outputs"]) == taskgen.NUM_CODE_TESTS
        code = taskgen_code(r["extra_info"]["reference"])
        for inp, out in zip(gt["inputs"], gt["outputs"]):
            assert run_program(code, inp).strip() == out.strip()


def taskgen_code(reference: str) -> str:
    assert reference.startswith("```python\n") and reference.endswith("\n```")
    return reference[len("```python\n"):-len("\n```")]


def run_program(code: str, stdin: str) -> str:
    import contextlib
    import io

    lines = iter(stdin.splitlines())
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(code, {"input": lambda: next(lines)})  # noqa: S102 - the generator's own reference code
    return buf.getvalue()


def test_make_data_cli_writes_jsonl(tmp_path):
    from launch.cli import main
    from archer_async.data import load_rows

    rc = main(["make-data", str(tmp_path / "d"), "--num-train", "30", "--num-eval", "10", "--seed", "5"])
    assert rc == 0
    train = load_rows(tmp_path / "d" / "train.jsonl")
    evals = load_rows(tmp_path / "d" / "eval.jsonl")
    assert (train, evals) == tuple(generate_tasks(30, 10, 5))

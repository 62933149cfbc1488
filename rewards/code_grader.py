"""Code rewards (docs/algorithm.md section 8): each row format graded as the grader of its dataset does.

`parse_ground_truth` names the format (every verl format Archer, DeepCoder, TACO, LiveCodeBench and
PrimeIntellect publish; anything else is a GroundTruthError naming the field):

    stdio       {"inputs": [str], "outputs": [str]} (Archer, DeepCoder taco/apps/code_contests, verl PRIME),
                [{"input", "output"}] (DeepCoder codeforces), PrimeIntellect [{"type": "stdin_stdout", ...}]
                -> Archer's rule (rewards/code_utils/utils.py): one run per test (at most
                max_tests_per_problem, sampled, in training), exit status 0 and
                stdout.strip() == expected.strip(); exit() / quit() allowed.
    functional  {"functional": test code} (Archer, DeepCoder leetcode), a JSON string of test code
                (DeepCoder humanevalplus only) -> Archer's prelude + the solution + the tests, passing when
                the tests run to the end; run by harness.py / runner.py as two processes, so the verdict
                never rests on the solution's exit code or on anything the solution can reach.
    lcb         LiveCodeBench [{"input", "output", "testtype", "metadata": {"func_name"}}] -> LiveCodeBench's
                own evaluation (lcb_runner/evaluation/testing_util.py): stdin outputs compared line by line,
                numbers as exact decimals; call-based results `==` after a top-level tuple becomes a list.
    taco_call   {"fn_name", "inputs": [[args]], "outputs": [...]} (TACO / DeepCoder taco, apps),
                PrimeIntellect [{"type": "function_call", ...}] -> TACO's call-based rule: the result
                (tuples as lists) equals outputs[i] or outputs[i][0].

The program is taken as Archer takes it (the last ```python block after the first </think>), except for
LiveCodeBench rows: LiveCodeBench's rule (the lines between the last two lines holding ```), applied
after the first </think>.
"""

from __future__ import annotations

import json
import random
import re
import secrets
from typing import Any

from archer_async.types import Reward

from .sandbox import RunResult

_ARCHER_FENCE = re.compile(r"```python\n(.*?)```", re.DOTALL)
HARNESS_STARTUP_S = 10.0
"""Added to a harness run's deadline for starting its processes (the tests' own limits are inside)."""


class GroundTruthError(ValueError):
    """The ground truth is not a code row format (the message names the field)."""


def _after_think(response: str) -> str:
    """Archer's `response.split("</think>")[1]` when there is a </think>, else the whole response."""
    parts = response.split("</think>")
    return parts[1] if len(parts) > 1 else response


def extract_code(response: str) -> str | None:
    """Archer's extraction: the last ```python block of the text after the first </think>."""
    blocks = _ARCHER_FENCE.findall(_after_think(response))
    return blocks[-1] if blocks else None


def extract_code_lcb(response: str) -> str | None:
    """LiveCodeBench's extraction (lines strictly between the last two lines that contain ```),
    applied to the text after the first </think>."""
    lines = _after_think(response).split("\n")
    idx = [i for i, line in enumerate(lines) if "```" in line]
    if len(idx) < 2:
        return None
    return "\n".join(lines[idx[-2] + 1: idx[-1]])


def _field(msg: str) -> GroundTruthError:
    return GroundTruthError(f"reward_model.ground_truth: {msg}")


def _text(x: Any, what: str) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, list) and all(isinstance(v, str) for v in x):
        return "\n".join(x)  # TACO's stdin runner joins list inputs with newlines
    raise _field(f"{what} must be a string, got {type(x).__name__}")


def _stdio(ins: Any, outs: Any) -> list[tuple[str, str]]:
    if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs) or not ins:
        raise _field("'inputs' and 'outputs' must be non-empty lists of the same length")
    return [(_text(i, "an input"), _text(o, "an output")) for i, o in zip(ins, outs)]


def _func_name(test: dict) -> str:
    meta = test.get("metadata") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            meta = {}
    return str(meta.get("func_name") or "") if isinstance(meta, dict) else ""


def _test_list(gt: list) -> tuple[str, Any]:
    if not all(isinstance(t, dict) for t in gt):
        raise _field("a list ground truth must hold test objects")
    if all("testtype" in t for t in gt):  # LiveCodeBench
        for i, t in enumerate(gt):
            if "input" not in t or "output" not in t:
                raise _field(f"test {i} lacks 'input' or 'output'")
            if t["testtype"] not in ("stdin", "functional"):
                raise _field(f"test {i}: unknown testtype {t['testtype']!r}")
        if gt[0]["testtype"] == "functional":
            if not _func_name(gt[0]):
                raise _field("functional LiveCodeBench test without metadata.func_name")
            if not all(isinstance(t["input"], str) and isinstance(t["output"], str) for t in gt):
                raise _field("LiveCodeBench call-based inputs and outputs must be JSON text")
        else:
            for t in gt:
                _text(t["input"], "an input"), _text(t["output"], "an output")
        return "lcb", gt
    if all("type" in t for t in gt):  # PrimeIntellect verification_info["test_cases"]
        types = {t["type"] for t in gt}
        if types == {"stdin_stdout"}:
            return "stdio", _stdio([t.get("input") for t in gt], [t.get("output") for t in gt])
        if types == {"function_call"}:
            names = {t.get("fn_name") for t in gt}
            if len(names) != 1 or not isinstance(next(iter(names)), str) or not next(iter(names)):
                raise _field("function_call tests must share one non-empty fn_name")
            return "taco_call", {"fn_name": names.pop(), "inputs": [t.get("input") for t in gt],
                                 "outputs": [t.get("output") for t in gt]}
        raise _field(f"unsupported PrimeIntellect test types {sorted(map(str, types))}")
    if all("input" in t and "output" in t for t in gt):  # DeepCoder codeforces
        return "stdio", _stdio([t["input"] for t in gt], [t["output"] for t in gt])
    raise _field("unrecognised list of tests (LiveCodeBench, PrimeIntellect or {input, output} tests)")


def parse_ground_truth(gt: Any, data_source: str = "") -> tuple[str, Any]:
    """(kind, data) of a code ground truth: kind stdio | functional | lcb | taco_call (module docstring).
    Raises GroundTruthError (naming reward_model.ground_truth) for anything else."""
    if isinstance(gt, bytes):
        gt = gt.decode("utf-8", "replace")
    if isinstance(gt, str):
        try:
            gt = json.loads(gt)
        except json.JSONDecodeError as e:
            raise _field(f"not JSON ({e.msg} at column {e.colno})") from None
    if isinstance(gt, str):
        if str(data_source).lower() == "humanevalplus":
            return "functional", gt  # DeepCoder's HumanEval+ rows: the test code itself
        raise _field(f"a bare string of test code is graded only for data_source humanevalplus (HumanEval+ "
                     f"tests), not {data_source!r} (pytest files, e.g. kodcode, are not supported)")
    if isinstance(gt, dict):
        if "functional" in gt:
            if not isinstance(gt["functional"], str):
                raise _field("'functional' must be a string of test code")
            return "functional", gt["functional"]
        if "test_cases" in gt and isinstance(gt["test_cases"], list):  # PrimeIntellect verification_info
            if not gt["test_cases"]:
                raise _field("'test_cases' is empty")
            return _test_list(gt["test_cases"])
        if "inputs" in gt and "outputs" in gt:
            if gt.get("fn_name"):
                if not isinstance(gt["fn_name"], str):
                    raise _field("'fn_name' must be a string")
                ins, outs = gt["inputs"], gt["outputs"]
                if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs) or not ins:
                    raise _field("'inputs' and 'outputs' must be non-empty lists of the same length")
                return "taco_call", {"fn_name": gt["fn_name"], "inputs": ins, "outputs": outs}
            return "stdio", _stdio(gt["inputs"], gt["outputs"])
        raise _field(f"unknown keys {sorted(map(str, gt))[:5]} (expected 'functional', 'inputs'/'outputs' "
                     "or a list of tests)")
    if isinstance(gt, list) and gt:
        return _test_list(gt)
    raise _field(f"unrecognised code ground truth of type {type(gt).__name__}")


def archer_output_matches(got: bytes, expected: str) -> bool:
    """Archer: stdout (UTF-8) .strip() equals the expected output's .strip()."""
    try:
        return got.decode("utf-8").strip() == expected.strip()
    except UnicodeDecodeError:
        return False


def _run_failure(res: RunResult, what: str) -> Reward | None:
    """A Reward for a run that did not finish normally, else None."""
    if res.status == "infra_error":
        return Reward("infra_error", res.reason[:200])
    if res.status == "timeout":
        return Reward("timeout", f"{what}: {res.reason}")
    if res.status == "output_limit":
        return Reward("fail", f"{what}: output limit exceeded")
    return None


class CodeGrader:
    """Grades one code response against its ground truth with a sandbox (BwrapSandbox or NoSandbox).

    Limits (seconds): `per_test_s` per stdin test and per call of a call-based row, `functional_s` for a
    whole functional run, `lcb_per_test_s` per LiveCodeBench test."""

    def __init__(self, sandbox, max_tests_per_problem: int, *, per_test_s: float = 30.0,
                 functional_s: float = 60.0, lcb_per_test_s: float = 6.0):
        self.sandbox = sandbox
        self.max_tests = max_tests_per_problem
        self.per_test_s, self.functional_s, self.lcb_per_test_s = per_test_s, functional_s, lcb_per_test_s
        self._uids: set[int] = set()

    def _sample(self, tests: list, training: bool, rng: random.Random) -> list:
        if training and self.max_tests > 0 and len(tests) > self.max_tests:
            idx = sorted(rng.sample(range(len(tests)), self.max_tests))
            return [tests[i] for i in idx]
        return tests

    def grade(self, ground_truth: Any, response: str, *, training: bool, rng: random.Random | None = None,
              uids: set[int] | None = None, data_source: str = "code") -> Reward:
        """pass / fail / timeout / infra_error of `response`; `uids` collects the sandbox uids used."""
        try:
            kind, data = parse_ground_truth(ground_truth, data_source)
        except GroundTruthError as e:
            return Reward("infra_error", str(e)[:200])
        code = extract_code_lcb(response) if kind == "lcb" else extract_code(response)
        if code is None:
            return Reward("fail", "no python code block")
        rng = rng or random.Random(0)
        self._uids = uids if uids is not None else set()
        if kind == "stdio":
            return self._stdio(code, self._sample(data, training, rng))
        if kind == "functional":
            return self._harness({"mode": "functional", "solution": code, "test": data}, self.functional_s)
        if kind == "taco_call":
            idx = self._sample(list(range(len(data["inputs"]))), training, rng)
            payload = {"mode": "taco_call", "solution": code, "func_name": data["fn_name"],
                       "inputs": [data["inputs"][i] for i in idx], "outputs": [data["outputs"][i] for i in idx]}
            return self._calls(payload, self.per_test_s)
        functional = data[0]["testtype"] == "functional"
        payload = {"mode": "lcb_call" if functional else "lcb_stdio", "solution": code,
                   "func_name": _func_name(data[0]) if functional else "",
                   "inputs": [t["input"] if functional else _text(t["input"], "") for t in data],
                   "outputs": [t["output"] if functional else _text(t["output"], "") for t in data]}
        return self._calls(payload, self.lcb_per_test_s)

    def _stdio(self, code: str, tests: list[tuple[str, str]]) -> Reward:
        for i, (inp, expected) in enumerate(tests):
            res = self.sandbox.run(code, inp.encode("utf-8", "surrogatepass"), timeout_s=self.per_test_s)
            self._uids.update(res.uids or ([res.uid] if res.uid is not None else []))
            bad = _run_failure(res, f"test {i}")
            if bad is not None:
                return bad
            if res.returncode != 0:
                return Reward("fail", f"test {i}: runtime error (exit {res.returncode}) {res.stderr_tail}"[:200])
            if not archer_output_matches(res.stdout, expected):
                return Reward("fail", f"test {i}: wrong answer")
        return Reward("pass", f"{len(tests)} tests passed")

    def _calls(self, payload: dict, per_test: float) -> Reward:
        payload["per_test_s"] = per_test
        return self._harness(payload, (per_test + 1) * len(payload["inputs"]) + 5)

    def _harness(self, payload: dict, seconds: float) -> Reward:
        """One harness run; the verdict is the line carrying this run's nonce."""
        nonce = secrets.token_hex(16)
        res = self.sandbox.run_harness(json.dumps({**payload, "nonce": nonce}).encode(),
                                       timeout_s=seconds + HARNESS_STARTUP_S)
        self._uids.update(res.uids)
        bad = _run_failure(res, "tests")
        if bad is not None:
            return bad
        head = nonce + " VERDICT "
        for line in res.stdout.decode("utf-8", "replace").splitlines():
            if line.startswith(head):
                try:
                    v = json.loads(line[len(head):])
                    status, reason = v["status"], str(v["reason"])
                except (ValueError, KeyError, TypeError):
                    break
                if status in ("pass", "fail", "timeout"):
                    return Reward(status, reason[:200])
                break
        return Reward("infra_error", f"the test harness ended without a verdict ({res.stderr_tail or res.returncode})"[:200])

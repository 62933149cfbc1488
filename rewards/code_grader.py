"""Code rewards (docs/algorithm.md section 8): extract the program, run its tests in the sandbox, compare outside.

Ground-truth formats (a JSON string or the decoded object):
- {"inputs": [...], "outputs": [...]}: stdin/stdout; one sandboxed run per test, stopping at the
  first failure; pass iff every stdout.strip() equals the expected output's strip() (lines compared
  with trailing whitespace and \\r removed) and the program exited normally.
- {"functional": "<test code>"}: one run of the in-sandbox harness (harness.py) that executes the
  solution, then the test code, and reports PASS through the nonce channel.
- LiveCodeBench list [{"input", "output", "testtype": "stdin"|"functional", "metadata": {"func_name"}}]:
  stdin tests as above; functional tests in one harness run that returns every call's value as JSON,
  compared here with the JSON-decoded expected value (tuples as lists, bools never equal to ints).
"""

from __future__ import annotations

import json
import math
import random
import re
import secrets
from pathlib import Path
from typing import Any

from archer_async.types import Reward

from .sandbox import RunResult

HARNESS_SOURCE = Path(__file__).with_name("harness.py").read_text(encoding="utf-8")
_FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)


class GroundTruthError(ValueError):
    """The ground truth is not one of the three code formats."""


def extract_code(response: str) -> str | None:
    """Text after the first </think> (all of it if none), then its last fenced python block."""
    _, sep, after = response.partition("</think>")
    text = after if sep else response
    blocks = _FENCE.findall(text)
    if not blocks:
        return None
    tagged = [code for lang, code in blocks if lang]
    return (tagged or [code for _, code in blocks])[-1]


def parse_ground_truth(gt: Any) -> tuple[str, Any]:
    """(kind, data): kind is "stdio" (list of (input, output)), "functional" (test code) or
    "lcb" (list of test dicts). Raises GroundTruthError on anything else."""
    if isinstance(gt, (bytes, str)):
        try:
            gt = json.loads(gt)
        except json.JSONDecodeError as e:
            raise GroundTruthError(f"code ground truth is not JSON: {e}") from None
    if isinstance(gt, dict):
        if "functional" in gt:
            if not isinstance(gt["functional"], str):
                raise GroundTruthError("'functional' must be a string of test code")
            return "functional", gt["functional"]
        if "inputs" in gt and "outputs" in gt:
            ins, outs = gt["inputs"], gt["outputs"]
            if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs):
                raise GroundTruthError("'inputs' and 'outputs' must be lists of the same length")
            return "stdio", [(_as_text(i), _as_text(o)) for i, o in zip(ins, outs)]
        raise GroundTruthError(f"unknown code ground-truth keys {sorted(gt)[:5]}")
    if isinstance(gt, list) and gt and all(isinstance(t, dict) and "input" in t and "output" in t for t in gt):
        for t in gt:
            if t.get("testtype", "stdin") not in ("stdin", "functional"):
                raise GroundTruthError(f"unknown testtype {t.get('testtype')!r}")
            if t.get("testtype") == "functional" and not _func_name(t):
                raise GroundTruthError("functional LiveCodeBench test without metadata.func_name")
        return "lcb", gt
    raise GroundTruthError(f"unrecognised code ground truth of type {type(gt).__name__}")


def _as_text(x: Any) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, list):
        return "\n".join(map(str, x))
    return str(x)


def _func_name(test: dict) -> str:
    meta = test.get("metadata") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            meta = {}
    return str(meta.get("func_name") or "") if isinstance(meta, dict) else ""


def outputs_match(got: str, expected: str) -> bool:
    """stdout.strip() == expected.strip(), ignoring trailing spaces and \\r on each line."""
    if got.strip() == expected.strip():
        return True
    norm = lambda s: [ln.rstrip() for ln in s.strip().replace("\r", "").split("\n")]  # noqa: E731
    return norm(got) == norm(expected)


def values_equal(a: Any, b: Any) -> bool:
    """Equality of JSON-decoded values: exact, floats to 1e-9, bool distinct from int."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (math.isfinite(a) and math.isfinite(b) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(values_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


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
    """Grades one code response against its ground truth with a sandbox (BwrapSandbox or NoSandbox)."""

    def __init__(self, sandbox, max_tests_per_problem: int):
        self.sandbox = sandbox
        self.max_tests = max_tests_per_problem

    def _sample(self, tests: list, training: bool, rng: random.Random) -> list:
        if training and self.max_tests > 0 and len(tests) > self.max_tests:
            idx = sorted(rng.sample(range(len(tests)), self.max_tests))
            return [tests[i] for i in idx]
        return tests

    def grade(self, ground_truth: Any, response: str, *, training: bool, rng: random.Random | None = None,
              uids: set[int] | None = None) -> Reward:
        """pass / fail / timeout / infra_error of `response`; `uids` collects the sandbox uids used."""
        try:
            kind, data = parse_ground_truth(ground_truth)
        except GroundTruthError as e:
            return Reward("infra_error", f"bad ground truth: {e}"[:200])
        code = extract_code(response)
        if code is None:
            return Reward("fail", "no python code block")
        rng = rng or random.Random(0)
        self._uids = uids if uids is not None else set()
        if kind == "stdio":
            return self._stdio(code, self._sample(data, training, rng))
        if kind == "functional":
            return self._functional(code, data)
        tests = self._sample(data, training, rng)
        calls = [t for t in tests if t.get("testtype") == "functional"]
        stdio = [(_as_text(t["input"]), _as_text(t["output"])) for t in tests if t.get("testtype") != "functional"]
        if stdio:
            r = self._stdio(code, stdio)
            if r.status != "pass" or not calls:
                return r
        return self._calls(code, calls)

    def _run(self, source: str, stdin: bytes) -> RunResult:
        res = self.sandbox.run(source, stdin)
        if res.uid is not None:
            self._uids.add(res.uid)
        return res

    def _stdio(self, code: str, tests: list[tuple[str, str]]) -> Reward:
        for i, (inp, expected) in enumerate(tests):
            res = self._run(code, inp.encode("utf-8", "surrogatepass"))
            bad = _run_failure(res, f"test {i}")
            if bad is not None:
                return bad
            if res.returncode != 0:
                return Reward("fail", f"test {i}: runtime error (exit {res.returncode}) {res.stderr_tail}"[:200])
            if not outputs_match(res.stdout.decode("utf-8", "replace"), expected):
                return Reward("fail", f"test {i}: wrong answer")
        return Reward("pass", f"{len(tests)} tests passed")

    def _harness(self, payload: dict) -> tuple[Reward | None, list[tuple[str, str]]]:
        """Run the harness; (early Reward, [(tag, rest)] of the lines carrying this run's nonce)."""
        nonce = secrets.token_hex(16)
        res = self._run(HARNESS_SOURCE, json.dumps({**payload, "nonce": nonce}).encode())
        bad = _run_failure(res, "tests")
        if bad is not None:
            return bad, []
        lines = []
        for raw in res.stdout.decode("utf-8", "replace").splitlines():
            head, _, rest = raw.partition(" ")
            if head == nonce:
                tag, _, arg = rest.partition(" ")
                lines.append((tag, arg))
        if not lines:
            why = res.stderr_tail or f"exit {res.returncode}"
            return Reward("fail", f"tests did not run to the end ({why})"[:200]), []
        return None, lines

    def _functional(self, code: str, test_code: str) -> Reward:
        early, lines = self._harness({"mode": "functional", "solution": code, "test": test_code})
        if early is not None:
            return early
        tag, arg = lines[-1]
        if tag == "PASS" and len(lines) == 1:
            return Reward("pass", "tests passed")
        return Reward("fail", (_decode_reason(arg) if tag in ("FAIL", "ERROR") else "protocol error")[:200])

    def _calls(self, code: str, tests: list[dict]) -> Reward:
        name = _func_name(tests[0])
        payload = {"mode": "call", "solution": code, "func_name": name,
                   "inputs": [_as_text(t["input"]) for t in tests]}
        early, lines = self._harness(payload)
        if early is not None:
            return early
        results = [arg for tag, arg in lines if tag == "RESULT"]
        for i, (test, got) in enumerate(zip(tests, results)):
            try:
                expected = json.loads(_as_text(test["output"]))
            except json.JSONDecodeError:
                return Reward("infra_error", f"test {i}: expected output is not JSON")
            try:
                value = json.loads(got)
            except json.JSONDecodeError:
                return Reward("fail", f"test {i}: unreadable return value")
            if not values_equal(value, expected):
                return Reward("fail", f"test {i}: wrong answer")
        if len(results) < len(tests):
            tag, arg = lines[-1]
            reason = _decode_reason(arg) if tag == "ERROR" else "tests did not run to the end"
            return Reward("fail", f"test {len(results)}: {reason}"[:200])
        if lines[-1][0] != "END":
            return Reward("fail", "tests did not run to the end")
        return Reward("pass", f"{len(tests)} tests passed")


def _decode_reason(arg: str) -> str:
    try:
        v = json.loads(arg)
        return v if isinstance(v, str) else str(v)
    except json.JSONDecodeError:
        return arg

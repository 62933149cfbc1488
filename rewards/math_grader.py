"""Math rewards (docs/algorithm.md section 8): Archer's math reward OR Math-Verify.

`check_answer(gold, response)` passes when either accepts:

1. Archer's RewardMathFn as shipped (wizard-III/ArcherCodeR@8a1785b rewards/general_reward.py): the text
   after the first </think>; its last \\boxed{} answer against each gold (a gold holding \\boxed{} is
   unwrapped) by the mathd normaliser or the sympy comparison (math_archer.py); else Math-Verify's
   extracted answer string equal to a gold string. (Archer's final Math-Verify fallback computes a
   result and drops it; it is item 2 here.)
2. Math-Verify (huggingface/Math-Verify): verify(parse("\\boxed{gold}"), parse(response)) for any gold,
   as Archer's fallback would if it returned its result.

Departure from both: an empty answer never matches (Archer's normaliser accepts an empty \\boxed{} when a
gold list holds an empty alternative). The pool calls this only inside a killable worker process
(math_worker.py): sympy has no time limit of its own.
"""

from __future__ import annotations

from typing import Any

from .math_archer import extract_answer, grade_answer_mathd, grade_answer_sympy


def _after_think(response: str) -> str:
    parts = response.split("</think>")
    return parts[1] if len(parts) > 1 else response


def _golds(gold: Any) -> list:
    return list(gold) if isinstance(gold, (list, tuple)) else [gold]


def archer_math(gold: Any, response: str) -> tuple[bool, str]:
    """Archer's RewardMathFn as shipped (empty answers and golds never match)."""
    import math_verify

    golds = _golds(gold)
    solution = _after_think(response)
    processed = []
    for truth in golds:
        truth = str(truth)
        if "\\boxed" in truth:
            truth = extract_answer(truth)
            if truth is None:
                continue
        if truth.strip():
            processed.append(truth)
    if not processed:
        return False, "no usable gold answer"
    answer = extract_answer(solution)
    if answer is not None and answer.strip():
        for truth in processed:
            if grade_answer_mathd(answer, truth) or grade_answer_sympy(answer, truth):
                return True, "matches (Archer's normaliser)"
    try:
        parsed = math_verify.parse(solution, parsing_timeout=5)
    except Exception:  # noqa: BLE001 - Archer: a parse failure is a wrong answer
        return False, "unparsable answer"
    if len(parsed) >= 2 and isinstance(parsed[1], str) and parsed[1].strip() and parsed[1] in golds:
        return True, "matches (Math-Verify's answer string)"
    return False, f"wrong answer {answer[:60]!r}" if answer is not None else "no \\boxed{} answer"


def math_verify_match(gold: Any, response: str) -> bool:
    """Math-Verify: the boxed gold against the whole response, for any gold."""
    from math_verify import parse, verify

    pred = parse(response)
    if not pred:
        return False
    for g in _golds(gold):
        g = str(g)
        if not g.strip():
            continue
        try:
            if verify(parse("\\boxed{" + g + "}"), pred):
                return True
        except Exception:  # noqa: BLE001 - a verifier crash is a non-match
            continue
    return False


def check_answer(gold: Any, response: str) -> tuple[bool, str]:
    """(correct, reason) of a response against one gold answer or a list of accepted answers."""
    ok, reason = archer_math(gold, response)
    if ok:
        return True, reason
    if math_verify_match(gold, response):
        return True, "matches (Math-Verify)"
    return False, reason


def extract_boxed(response: str) -> str | None:
    """The last \\boxed{...} answer after the first </think> (Archer's extraction)."""
    return extract_answer(_after_think(response))

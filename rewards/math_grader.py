"""Math rewards (docs/algorithm.md section 8): the last \\boxed{} after </think> against the ground truth.

`check_answer` decides equivalence by any of: normalised string equality, exact numeric equality of
simple forms (integers, decimals, fractions, \\frac, percentages), math-verify's verdict, and a sympy
difference of the two parsed expressions (latex2sympy, never `sympify`/`eval` on model text).
It may hang or blow up on pathological input, so the pool only calls it inside a killable worker
process (`math_worker.py`) with a hard deadline.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

_BOX = re.compile(r"\\(?:boxed|fbox)\s*")


def extract_boxed(response: str) -> str | None:
    """Content of the last \\boxed{...} (or \\boxed x) after the first </think> (all text if none)."""
    _, sep, after = response.partition("</think>")
    text = after if sep else response
    starts = [m for m in _BOX.finditer(text)]
    for m in reversed(starts):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                c = text[j]
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j].strip()
            continue  # unbalanced: try an earlier box
        tok = re.match(r"[^\s$]+", text[i:])
        if tok:
            return tok.group(0)
    return None


_STRIP_CMDS = [r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\displaystyle", r"\mathrm", r"\textstyle"]


def normalize(s: str) -> str:
    """Canonical string form of a short answer (spacing, LaTeX decorations, units of degrees, ...)."""
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\mbox\{\s*([^{}]*)\}", r"\1", s)
    for c in _STRIP_CMDS:
        s = s.replace(c, "")
    s = s.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac").replace("^\\circ", "").replace("^{\\circ}", "")
    s = s.replace("\\%", "%").replace("\\$", "").replace("\\ ", "").replace("~", "")
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"^[a-zA-Z]\s*=", "", s)  # "x=3" -> "3"
    s = s.rstrip(".")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"(\d),(\d{3})(?!\d)", r"\1\2", s)  # 1,000 -> 1000
    return s


def to_number(s: str) -> Fraction | None:
    """Exact value of a simple numeric answer (int, decimal, a/b, \\frac{a}{b}, -, %), else None."""
    s = normalize(s)
    pct = s.endswith("%")
    s = s.rstrip("%")
    neg = s.startswith("-")
    s = s.lstrip("-+")
    m = re.fullmatch(r"\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s) or re.fullmatch(
        r"(-?\d+(?:\.\d+)?)/(-?\d+(?:\.\d+)?)", s)
    try:
        if m:
            den = Fraction(m.group(2))
            if den == 0:
                return None
            v = Fraction(m.group(1)) / den
        elif re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", s):
            v = Fraction(s)
        else:
            return None
    except (ValueError, ZeroDivisionError):
        return None
    v = -v if neg else v
    return v / 100 if pct else v


def _math_verify(gold: str, answer: str) -> bool:
    from math_verify import parse, verify
    g = parse(f"${gold}$", parsing_timeout=None)
    a = parse(f"${answer}$", parsing_timeout=None)
    return bool(g and a and verify(g, a, timeout_seconds=None))


def _sympy_equal(gold: str, answer: str) -> bool:
    import sympy
    from latex2sympy2_extended import latex2sympy
    a, b = latex2sympy(normalize(gold)), latex2sympy(normalize(answer))
    if not isinstance(a, sympy.Expr) or not isinstance(b, sympy.Expr):
        return bool(a == b)
    return sympy.simplify(a - b) == 0


def check_answer(gold: Any, response: str) -> tuple[bool, str]:
    """(correct, reason) of a response against one gold answer or a list of accepted answers."""
    answer = extract_boxed(response)
    if answer is None:
        return False, "no \\boxed{} answer"
    golds = gold if isinstance(gold, list) else [gold]
    for g in golds:
        g = extract_boxed(str(g)) or str(g)
        if normalize(g) == normalize(answer):
            return True, "matches (string)"
        gn, an = to_number(g), to_number(answer)
        if gn is not None and an is not None:
            if gn == an:
                return True, "matches (number)"
            continue  # two plain numbers that differ: no symbolic route can make them equal
        try:
            if _math_verify(g, answer):
                return True, "matches (math-verify)"
        except Exception:  # noqa: BLE001 - a parser crash is a non-match, not a grader failure
            pass
        try:
            if _sympy_equal(g, answer):
                return True, "matches (sympy)"
        except Exception:  # noqa: BLE001
            pass
    return False, f"wrong answer {answer[:60]!r}"

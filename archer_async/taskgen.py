"""The embedded tiny task data: seeded, verifiable problems in verl format.

Two families, so both reward paths run in the default configuration:

- ``tiny_math``: integer arithmetic (two-digit sums and differences, one-digit times two-digit
  products, three-term sums with a short ``<think>`` scratchpad), answered in ``\\boxed{}``;
  ``reward_model.ground_truth`` is the answer string.
- ``tiny_code``: small stdin/stdout programs (an expression of two integers read from one line, or
  an operation on a line of integers), answered with a short fenced python block;
  ``reward_model.ground_truth`` is the JSON string ``{"inputs": [...], "outputs": [...]}``.

Row layout (verl)::

    {"prompt": [{"role": "user", "content": "..."}], "data_source": "tiny_math",
     "reward_model": {"style": "rule", "ground_truth": "85"},
     "extra_info": {"index": 0, "split": "train", "reference": "\\\\boxed{85}"}}

``extra_info.reference`` is one correct response (the supervised warm start of the tiny model uses
it; graders ignore it). Train and held-out splits never share a prompt text: every prompt text is
assigned to one split by a seeded hash, independently of how many rows are drawn.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from archer_async.config import UserError

MATH_SOURCE = "tiny_math"
CODE_SOURCE = "tiny_code"
EVAL_FRACTION = 0.25
"""Share of the prompt-text space that belongs to the held-out split."""
NUM_CODE_TESTS = 5
"""stdin/stdout tests per code problem."""

_MATH_SUFFIX = " Put the final answer in \\boxed{}."
_MATH_LEADS = ("Compute {e}.", "What is {e}?", "Calculate {e}.")

# Two integers read from one line: (description, python expression); {a}/{b} are variable names.
_PAIR_FORMS = (
    ("the sum of {a} and {b}", "{a} + {b}"),
    ("{a} minus {b}", "{a} - {b}"),
    ("the product of {a} and {b}", "{a} * {b}"),
    ("the larger of {a} and {b}", "max({a}, {b})"),
    ("the smaller of {a} and {b}", "min({a}, {b})"),
    ("the absolute difference of {a} and {b}", "abs({a} - {b})"),
    ("{a} squared plus {b}", "{a} * {a} + {b}"),
    ("{b} minus {a}", "{b} - {a}"),
)
_PAIR_FORMS_K = (
    ("{a} times {k} plus {b}", "{a} * {k} + {b}"),
    ("{a} plus {b} times {k}", "{a} + {b} * {k}"),
    ("the sum of {a} and {b}, times {k}", "({a} + {b}) * {k}"),
    ("the remainder of {a} divided by {k}", "{a} % {k}"),
)
_PAIR_VARS = (("a", "b"), ("x", "y"), ("m", "n"))
_PAIR_LEADS = (
    "Read two integers {a} and {b} from one line. Print {d}.",
    "Given two integers {a} and {b} on one line of input, print {d}.",
)

# A line of integers: (description, python expression over the list `xs`).
_LIST_FORMS = (
    ("their sum", "sum(xs)"),
    ("the largest one", "max(xs)"),
    ("the smallest one", "min(xs)"),
    ("how many there are", "len(xs)"),
    ("them in increasing order, separated by spaces", "*sorted(xs)"),
    ("them in reverse order, separated by spaces", "*xs[::-1]"),
    ("the first one", "xs[0]"),
    ("the last one", "xs[-1]"),
)
_LIST_FORMS_K = (
    ("how many are greater than {k}", "len([v for v in xs if v > {k}])"),
    ("each one plus {k}, separated by spaces", "*[v + {k} for v in xs]"),
    ("each one times {k}, separated by spaces", "*[v * {k} for v in xs]"),
)
_LIST_LEADS = (
    "Read a line of integers separated by spaces. Print {d}.",
    "The input is one line of space-separated integers. Print {d}.",
)
_K_RANGE = range(2, 21)


def _is_eval_text(text: str, seed: int) -> bool:
    """Seeded hash split of the prompt-text space (stable across Python runs and row counts)."""
    h = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < EVAL_FRACTION


def _row(content: str, source: str, truth: str, reference: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": content}],
        "data_source": source,
        "reward_model": {"style": "rule", "ground_truth": truth},
        "extra_info": {"reference": reference},
    }


def _add_work(a: int, b: int) -> str:
    """Column addition of two numbers < 100: units, then tens with the carry."""
    u = a % 10 + b % 10
    return f"{a % 10} + {b % 10} = {u}. {a // 10} + {b // 10} + {u // 10} = {a // 10 + b // 10 + u // 10}."


def _sub_work(a: int, b: int) -> str:
    """Column subtraction a - b (b <= a < 100): units (borrowing ten when needed), then tens."""
    a0, b0 = a % 10, b % 10
    borrow = 1 if a0 < b0 else 0
    units = f"{a0 + 10 * borrow} - {b0} = {a0 + 10 * borrow - b0}."
    return units + f" {a // 10} - {b // 10} - {borrow} = {a // 10 - b // 10 - borrow}."


def _math_problem(rng: random.Random) -> dict:
    """One arithmetic problem (not yet assigned an index or split) with a column-arithmetic scratchpad."""
    kind = rng.choice(("add21", "add22", "add22", "sub21", "sub22"))
    if kind.startswith("add"):
        a = rng.randint(10, 99)
        b = rng.randint(1, 9) if kind == "add21" else rng.randint(10, 99)
        expr, ans, work = f"{a} + {b}", a + b, _add_work(a, b)
    else:
        a = rng.randint(10, 99)
        b = rng.randint(1, 9) if kind == "sub21" else rng.randint(10, a)
        expr, ans, work = f"{a} - {b}", a - b, _sub_work(a, b)
    content = rng.choice(_MATH_LEADS).format(e=expr) + _MATH_SUFFIX
    return _row(content, MATH_SOURCE, str(ans), f"<think>{work}</think>\n\\boxed{{{ans}}}")


def _code_tests(rng: random.Random, kind: str, expr: str) -> tuple[list[str], list[str]]:
    """Random stdin cases for one program and the expected stdout (computed by running `expr`)."""
    inputs, outputs = [], []
    for _ in range(NUM_CODE_TESTS):
        if kind == "pair":
            vals = [rng.randint(-20, 50), rng.randint(1, 50)]
            env = {"p": vals[0], "q": vals[1]}
        else:
            vals = [rng.randint(-9, 30) for _ in range(rng.randint(1, 6))]
            env = {"xs": vals}
        line = " ".join(map(str, vals))
        if expr.startswith("*"):
            out = " ".join(map(str, eval(expr[1:], {}, env)))  # noqa: S307 - our own template
        else:
            out = str(eval(expr, {}, env))  # noqa: S307 - our own template
        inputs.append(line + "\n")
        outputs.append(out + "\n")
    return inputs, outputs


def _code_problem(rng: random.Random) -> dict:
    """One stdin/stdout program problem (not yet assigned an index or split)."""
    if rng.random() < 0.6:
        desc, expr = rng.choice(_PAIR_FORMS + _PAIR_FORMS_K)
        a, b = rng.choice(_PAIR_VARS)
        k = rng.choice(_K_RANGE)
        d = desc.format(a=a, b=b, k=k)
        content = rng.choice(_PAIR_LEADS).format(a=a, b=b, d=d)
        code_expr = expr.format(a=a, b=b, k=k)
        code = f"{a}, {b} = map(int, input().split())\nprint({code_expr})"
        ins, outs = _code_tests(rng, "pair", expr.format(a="p", b="q", k=k))
    else:
        desc, expr = rng.choice(_LIST_FORMS + _LIST_FORMS_K)
        k = rng.choice(_K_RANGE)
        content = rng.choice(_LIST_LEADS).format(d=desc.format(k=k))
        code_expr = expr.format(k=k)
        code = f"xs = list(map(int, input().split()))\nprint({code_expr})"
        ins, outs = _code_tests(rng, "list", code_expr)
    truth = json.dumps({"inputs": ins, "outputs": outs})
    return _row(content, CODE_SOURCE, truth, f"```python\n{code}\n```")


def _draw(rng: random.Random, n: int, want_eval: bool, seed: int) -> list[dict]:
    """n problems (math and code alternating) whose prompt text falls in the wanted split.

    Prompt texts are unique within the split while the family's text space lasts (200 duplicate
    draws in a row mark it exhausted); afterwards repeats of a text (with fresh code tests) are
    accepted so any n can be served."""
    rows: list[dict] = []
    seen: set[str] = set()
    dup_run = {MATH_SOURCE: 0, CODE_SOURCE: 0}
    while len(rows) < n:
        make = _math_problem if len(rows) % 2 == 0 else _code_problem
        row = make(rng)
        text, fam = row["prompt"][0]["content"], row["data_source"]
        if _is_eval_text(text, seed) != want_eval:
            continue
        if text in seen and dup_run[fam] < 200:
            dup_run[fam] += 1
            continue
        if text not in seen and dup_run[fam] < 200:
            dup_run[fam] = 0
        seen.add(text)
        rows.append(row)
    return rows


def generate_tasks(num_train: int, num_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Seeded train and held-out rows in verl format; no prompt text is in both splits.

    The same (num_train, num_eval, seed) always gives the same rows; the held-out rows depend only
    on (num_eval, seed)."""
    if num_train < 0 or num_eval < 0:
        raise UserError(f"make-data: --num-train and --num-eval must be >= 0 (got {num_train}, {num_eval})")
    eval_rows = _draw(random.Random(f"eval-{seed}"), num_eval, True, seed)
    train_rows = _draw(random.Random(f"train-{seed}"), num_train, False, seed)
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        for i, row in enumerate(rows):
            row["extra_info"] = {"index": i, "split": split, **row["extra_info"]}
    return train_rows, eval_rows


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    """One JSON object per line (UTF-8)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def make_data_main(args) -> int:
    """`archer-async make-data OUT_DIR --num-train N --num-eval M --seed S`: write train/eval JSONL."""
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"make-data: {out} exists and is not a directory")
    train_rows, eval_rows = generate_tasks(args.num_train, args.num_eval, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(train_rows, out / "train.jsonl")
    write_jsonl(eval_rows, out / "eval.jsonl")
    print(f"wrote {len(train_rows)} rows to {out / 'train.jsonl'} and {len(eval_rows)} rows to "
          f"{out / 'eval.jsonl'} (seed {args.seed})")
    return 0

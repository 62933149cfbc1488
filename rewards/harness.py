"""In-sandbox test harness for functional and call-based tests (this file's text is the program run).

The grader runs this file as /tmp/main.py inside the sandbox and writes one JSON payload on stdin:
    {"mode": "functional" | "call", "nonce": str, "solution": str,
     "test": str (functional), "func_name": str, "inputs": [str, ...] (call)}

The solution is compiled after a header of common imports (typing, collections, heapq, bisect, itertools,
functools, math; recursion limit raised), as LiveCodeBench's harness does, and runs in a thread with a
256 MiB stack.

Reporting channel: the original stdout, kept on a private fd; the solution's own prints go to stderr.
Every report line starts with the per-run nonce, which lives only in a local of the harness thread and
never in a place the solution can reach:
- the payload is read to EOF before the solution runs (stdin then reads /dev/null);
- the harness thread's frames cannot be reached: an audit hook (which Python code cannot remove)
  refuses sys._getframe, frame attributes of tracebacks/generators/coroutines, sys._current_frames,
  sys.settrace/setprofile, the gc object walkers and new audit hooks; signal handlers (which receive the
  current frame) only ever run in the main thread, which sits in interpreter shutdown holding nothing;
- ctypes, numpy and the _test* C modules are not present in the sandbox, and /proc is not mounted.
So an early exit (sys.exit, os._exit, atexit, excepthook, killing the process) leaves no nonce line and
fails. Call mode writes each return value as strict JSON (builtin types only, tuples as lists), compared
with the expected value by the grader outside the sandbox. Functional mode runs the test code in its own
namespace with its own builtins, with every comparison and every `assert` test rewritten to trusted
helpers that refuse values of non-builtin types (an object whose __eq__ always says True fails).
"""

import ast
import builtins
import json
import math
import operator
import os
import sys
import threading

_PLAIN_SCALARS = (int, float, complex, str, bytes, bool, type(None))
_PLAIN_CONTAINERS = (list, tuple, set, frozenset)
_OPS = {"Eq": operator.eq, "NotEq": operator.ne, "Lt": operator.lt, "LtE": operator.le, "Gt": operator.gt,
        "GtE": operator.ge, "Is": operator.is_, "IsNot": operator.is_not,
        "In": lambda a, b: a in b, "NotIn": lambda a, b: a not in b}
_CMP_TAG, _TRUTH_TAG = "\x00grader-cmp\x00", "\x00grader-truth\x00"
_BLOCKED_EVENTS = frozenset({"sys._current_frames", "sys._current_exceptions", "sys.settrace",
                             "sys.setprofile", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
                             "sys.addaudithook", "ctypes.dlopen", "ctypes.cdata", "ctypes.addressof"})
_FRAME_ATTRS = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"})
_IMPORTS = ("from typing import *\nfrom collections import *\nfrom heapq import *\nfrom bisect import *\n"
            "from itertools import *\nfrom functools import *\nfrom math import *\nimport collections, heapq, "
            "bisect, itertools, functools, math, string, re, random, sys\nsys.setrecursionlimit(100000)\n")


def _to_json(x, depth=0):
    """Strict JSON-able copy of a return value (tuples become lists); TypeError for anything else."""
    t = type(x)
    if t in (int, str, bool, type(None)):
        return x
    if t is float:
        return x if math.isfinite(x) else repr(x)
    if depth > 500:
        raise TypeError("return value nested too deeply")
    if t in (list, tuple):
        return [_to_json(v, depth + 1) for v in x]
    if t is dict:
        return {(k if type(k) is str else json.dumps(_to_json(k, depth + 1))): _to_json(v, depth + 1)
                for k, v in x.items()}
    raise TypeError(f"return value of type {t.__name__} is not a builtin JSON value")


def _make_helpers():
    """The trusted comparison helpers: closures over captured builtins only.

    Nothing they use is looked up at call time in a module or in `builtins`, so a solution that
    patches `builtins.all`, `operator.eq` or this module's globals does not change their verdict.
    """
    _type, _all, _bool, _len, _str = type, all, bool, len, str
    _assert_error, _ops = AssertionError, dict(_OPS)
    scalars, containers, _dict = _PLAIN_SCALARS, _PLAIN_CONTAINERS, dict

    def plain(x, depth=0):
        """True iff x is built only of builtin values (exact types, so no subclass can lie)."""
        t = _type(x)
        if t in scalars:
            return True
        if depth > 200:
            return False
        if t in containers:
            return _all(plain(v, depth + 1) for v in x)
        if t is _dict:
            return _all(plain(k, depth + 1) and plain(v, depth + 1) for k, v in _dict.items(x))
        return False

    def cmp(ops, *operands):
        """Trusted chained comparison: every operand must be a builtin value (except for `is`)."""
        for i in range(_len(ops)):
            op, a, b = ops[i], operands[i], operands[i + 1]
            if op not in ("Is", "IsNot") and not (plain(a) and plain(b)):
                raise _assert_error("comparison of a non-builtin value ("
                                    + _type(a).__name__ + " " + _str(op) + " " + _type(b).__name__ + ")")
            if not _ops[op](a, b):
                return False
        return True

    def truth(x):
        """Trusted truth test: only builtin values may decide an assert."""
        if not plain(x):
            raise _assert_error("truth value of a non-builtin " + _type(x).__name__)
        return _bool(x)

    return cmp, truth


class _Rewrite(ast.NodeTransformer):
    """Comparisons -> _cmp(...), assert tests -> _truth(...), both as constants swapped in after compile."""

    def visit_Compare(self, node):
        self.generic_visit(node)
        ops = ast.Tuple([ast.Constant(type(o).__name__) for o in node.ops], ast.Load())
        return ast.copy_location(ast.Call(ast.Constant(_CMP_TAG), [ops, node.left, *node.comparators], []), node)

    def _test(self, node):
        if isinstance(node, ast.BoolOp):
            return ast.copy_location(ast.BoolOp(node.op, [self._test(v) for v in node.values]), node)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ast.copy_location(ast.UnaryOp(node.op, self._test(node.operand)), node)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Constant) and node.func.value == _CMP_TAG:
            return node
        return ast.copy_location(ast.Call(ast.Constant(_TRUTH_TAG), [node], []), node)

    def visit_Assert(self, node):
        self.generic_visit(node)
        node.test = self._test(node.test)
        return node


def _bind_consts(code, table):
    """Replace tag constants by the trusted functions, recursively through nested code objects."""
    consts = tuple(table.get(c, c) if type(c) is str else (_bind_consts(c, table) if type(c) is type(code) else c)
                   for c in code.co_consts)
    return code.replace(co_consts=consts)


def _compile_tests(test_src, cmp, truth):
    import warnings
    tree = ast.fix_missing_locations(_Rewrite().visit(ast.parse(test_src)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = compile(tree, "tests.py", "exec")
    return _bind_consts(code, {_CMP_TAG: cmp, _TRUTH_TAG: truth})


def _install_guard():
    def hook(event, args):
        if event == "sys._getframe":
            raise ValueError("frame access is disabled in the grader")
        if event in _BLOCKED_EVENTS:
            raise RuntimeError(f"{event} is disabled in the grader")
        if event == "object.__getattr__" and len(args) > 1 and args[1] in _FRAME_ATTRS:
            raise AttributeError(f"{args[1]} is disabled in the grader")
    sys.addaudithook(hook)


def _short(e):
    return f"{type(e).__name__}: {e}"[:200]


def _grade():
    """Run the solution and its tests; report through the nonce channel. Returns the exit code."""
    # Everything used after the solution's code has run is captured here first: the solution may patch
    # builtins and modules (os.write, json.dumps, exec, ...), never these locals.
    _exec, _compile, _getattr, _base_exc, _write = exec, compile, getattr, BaseException, os.write
    _dumps, _loads, _type, _str = json.dumps, json.loads, type, str
    raw = sys.stdin.buffer.read()
    payload = _loads(raw)
    del raw
    nonce = payload.pop("nonce").encode()
    mode = payload["mode"]
    report_fd = os.dup(1)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)  # the solution's prints go to stderr

    def report(line):
        data = nonce + b" " + line.encode("utf-8", "replace") + b"\n"
        while data:
            data = data[_write(report_fd, data):]

    def short(e):
        try:
            return (_type(e).__name__ + ": " + _str(e))[:200]
        except _base_exc:  # noqa: BLE001 - a hostile __str__
            return "exception"

    cmp, truth = _make_helpers()
    compiled_tests = _compile_tests(payload["test"], cmp, truth) if mode == "functional" else None
    pristine_builtins = dict(builtins.__dict__)
    solution = _compile(_IMPORTS + payload["solution"], "solution.py", "exec")
    inputs, name = payload.get("inputs", []), payload.get("func_name", "")
    del payload
    _install_guard()
    ns = {"__name__": "solution", "__builtins__": builtins}
    try:
        _exec(solution, ns)
    except _base_exc as e:  # noqa: BLE001 - any failure of the solution's module code is a fail
        report("ERROR " + _dumps("solution failed to load: " + short(e)))
        return 1
    if mode == "functional":
        tns = {k: v for k, v in ns.items() if k != "__builtins__"}
        tns.update({"__name__": "__main__", "__builtins__": pristine_builtins})
        try:
            _exec(compiled_tests, tns)
        except _base_exc as e:  # noqa: BLE001
            report("FAIL " + _dumps(short(e)))
            return 1
        report("PASS")
        return 0
    try:
        fn = _getattr(ns["Solution"](), name) if "Solution" in ns else ns[name]
    except _base_exc as e:  # noqa: BLE001
        report("ERROR " + _dumps("no callable " + name + ": " + short(e)))
        return 1
    for text in inputs:
        try:
            args = [_loads(line) for line in text.split("\n") if line.strip()]
            value = _dumps(_to_json(fn(*args)))
        except _base_exc as e:  # noqa: BLE001
            report("ERROR " + _dumps(short(e)))
            return 1
        report("RESULT " + value)
    report("END")
    return 0


def _thread_main():
    _exit = os._exit
    try:
        rc = _grade()
    except BaseException:  # noqa: BLE001 - the harness must exit, never hang
        rc = 2
    _exit(rc)


if __name__ == "__main__":
    threading.stack_size(256 * 1024 * 1024)  # deep recursion in solutions (counts against RLIMIT_AS)
    threading.Thread(target=_thread_main, name="grader").start()

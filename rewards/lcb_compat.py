"""How LiveCodeBench and TACO run a program, reproduced for the solution's process (runner.py).

LiveCodeBench (LiveCodeBench/LiveCodeBench@28fef95, lcb_runner/evaluation/testing_util.py, MIT; the
same file is Archer's rewards/code_utils/livecodebench.py): `IMPORT_STRING` is prepended to call-based
code; stdin code loses a final `if __name__ == '__main__':` (its body is kept) and has every statement
but imports wrapped into `def wrapped_function():`; each test calls it with sys.stdin, its readline /
readlines / read and `builtins.open` patched, stdout captured, SystemExit caught. `reliability_guard()`
runs first (quit = None, os.kill/system/remove/... = None). These rules decide some verdicts: `quit()`
fails, `exit()` and `sys.exit(1)` pass, `global x` at top level fails (it is a local of the wrapper),
`open(0)` does not see the test input (`from builtins import *` binds the real `open`), a second
`sys.stdin.buffer.readline()` returns the first line again.

TACO (FlagOpen/TACO@245eba3, metrics/testing_util.py, Apache-2.0): call-based code runs after
`TACO_HEADER`, `Solution()` is instantiated when "class Solution" is in the text, then the TACO
reliability guard (exit = quit = None, ...) runs before the calls.

Only the semantics are reproduced here; time limits are the harness's (harness.py), and the sandbox,
not these guards, is what contains the program.
"""

import ast
import builtins
import sys
from io import StringIO

IMPORT_STRING = ("from string import *\nfrom re import *\nfrom datetime import *\nfrom collections import *\n"
                 "from heapq import *\nfrom bisect import *\nfrom copy import *\nfrom math import *\n"
                 "from random import *\nfrom statistics import *\nfrom itertools import *\nfrom functools import *\n"
                 "from operator import *\nfrom io import *\nfrom sys import *\nfrom json import *\n"
                 "from builtins import *\nfrom typing import *\nimport string\nimport re\nimport datetime\n"
                 "import collections\nimport heapq\nimport bisect\nimport copy\nimport math\nimport random\n"
                 "import statistics\nimport itertools\nimport functools\nimport operator\nimport io\nimport sys\n"
                 "import json\nsys.setrecursionlimit(50000)\n")

TACO_HEADER = ("import sys\nimport time\nimport itertools\nfrom itertools import accumulate, product, permutations, "
               "combinations\nimport collections\nfrom collections import Counter, OrderedDict, deque, defaultdict, "
               "ChainMap\nfrom functools import lru_cache\nimport math\nfrom math import sqrt, sin, cos, tan, ceil, "
               "fabs, floor, gcd, exp, log, log2\nimport fractions\nfrom typing import List, Tuple\n"
               "import numpy as np\nimport random\nimport heapq\nfrom heapq import *\n")


class Capturing(list):
    def __enter__(self):
        self._stdout = sys.stdout
        sys.stdout = self._stringio = StringIO()
        self._stringio.close = lambda x: 1
        return self

    def __exit__(self, *args):
        self.append(self._stringio.getvalue())
        del self._stringio
        sys.stdout = self._stdout


class MockBuffer:
    def __init__(self, inputs: str):
        self.inputs = inputs.encode("utf-8")

    def read(self, *args):
        return self.inputs

    def readline(self, *args):
        return self.inputs.split(b"\n")[0] + b"\n"


class MockStdinWithBuffer:
    def __init__(self, inputs: str):
        self.inputs = inputs
        self._stringio = StringIO(inputs)
        self.buffer = MockBuffer(inputs)

    def read(self, *args):
        return self.inputs

    def readline(self, *args):
        return self._stringio.readline(*args)

    def readlines(self, *args):
        return self.inputs.split("\n")

    def __getattr__(self, name):
        return getattr(self._stringio, name)


def clean_if_name(code: str) -> str:
    try:
        astree = ast.parse(code)
        last_block = astree.body[-1]
        if isinstance(last_block, ast.If):
            condition = last_block.test
            if ast.unparse(condition).strip() == "__name__ == '__main__'":
                code = ast.unparse(astree.body[:-1]) + "\n" + ast.unparse(last_block.body)
    except:  # noqa: E722 - LiveCodeBench keeps the code on any failure
        pass
    return code


def make_function(code: str) -> str:
    try:
        import_stmts, all_other_stmts = [], []
        astree = ast.parse(code)
        for stmt in astree.body:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                import_stmts.append(stmt)
            else:
                all_other_stmts.append(stmt)
        function_ast = ast.FunctionDef(
            name="wrapped_function",
            args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]),
            body=all_other_stmts, decorator_list=[], lineno=-1)
        return IMPORT_STRING + "\n" + ast.unparse(import_stmts) + "\n" + ast.unparse(function_ast)
    except Exception:  # noqa: BLE001 - LiveCodeBench keeps the code on any failure
        return code


def call_method(method, inputs):
    from unittest.mock import mock_open, patch

    if isinstance(inputs, list):
        inputs = "\n".join(inputs)
    inputs_line_iterator = iter(inputs.split("\n"))
    mock_stdin = MockStdinWithBuffer(inputs)

    @patch("builtins.open", mock_open(read_data=inputs))
    @patch("sys.stdin", mock_stdin)
    @patch("sys.stdin.readline", lambda *args: next(inputs_line_iterator))
    @patch("sys.stdin.readlines", lambda *args: inputs.split("\n"))
    @patch("sys.stdin.read", lambda *args: inputs)
    def _inner_call_method(_method):
        try:
            return _method()
        except SystemExit:
            pass

    return _inner_call_method(method)


def compile_module(code: str, *, solution_class: bool):
    """LCB's compile_code / TACO's compile_and_get_func: exec as module `tmp_sol`; Solution() if asked."""
    from types import ModuleType
    tmp_sol = ModuleType("tmp_sol", "")
    exec(code, tmp_sol.__dict__)
    if solution_class:
        return tmp_sol.Solution()
    return tmp_sol


def lcb_reliability_guard() -> None:
    """LiveCodeBench's reliability_guard() without its (unused) memory limit."""
    import os
    import shutil
    import subprocess
    builtins.quit = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
                 "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
                 "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"):
        setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    builtins.help = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


def taco_reliability_guard() -> None:
    """TACO's reliability_guard() (as LiveCodeBench's, and `exit` is None too)."""
    lcb_reliability_guard()
    builtins.exit = None


def taco_process_input_output(inputs, outputs):
    """TACO's process_input_output: JSON's string keys of a dict back to ints (singleton lists)."""
    try:
        if isinstance(inputs[0], dict):
            inputs = [{int(k): v for k, v in inputs[0].items()}]
    except Exception:  # noqa: BLE001
        pass
    try:
        if isinstance(outputs, dict):
            outputs = [{int(k): v for k, v in outputs.items()}]
    except Exception:  # noqa: BLE001
        pass
    try:
        if isinstance(outputs[0], dict):
            outputs = [{int(k): v for k, v in outputs[0].items()}]
    except Exception:  # noqa: BLE001
        pass
    return inputs, outputs


def taco_matches(exec_outputs, outputs) -> bool:
    """TACO's execute_cb_code comparison: tuples as lists, equal to outputs or outputs[0]."""
    try:
        if isinstance(exec_outputs, tuple):
            exec_outputs = list(exec_outputs)
        tmp_result = exec_outputs == outputs
        if isinstance(outputs, list) and outputs:
            tmp_result = tmp_result or (exec_outputs == outputs[0])
        try:
            if isinstance(exec_outputs[0], tuple):
                exec_outputs = [list(x) for x in exec_outputs]
                tmp_result = tmp_result or (exec_outputs == outputs[0])
        except Exception:  # noqa: BLE001
            pass
        return bool(tmp_result)
    except Exception:  # noqa: BLE001 - TACO records any comparison failure as a failed test
        return False


def lcb_call_matches(prediction, expected) -> bool:
    """LiveCodeBench's grade_call_based comparison: a top-level tuple becomes a list, then `==`."""
    if isinstance(prediction, tuple):
        prediction = list(prediction)
    tmp_result = prediction == expected
    return bool(tmp_result)

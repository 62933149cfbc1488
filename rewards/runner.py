"""The solution's process: runs untrusted code and answers the harness's requests (inside the sandbox).

`boot.py` starts it as its own uid, with stdin /dev/null, stdout joined to stderr, and two pipes to
the harness (harness.py), which runs as another uid: nothing this process does can write the verdict,
read the harness's memory (tests, nonce) or signal it. It waits for requests (wire.py messages):

    ["load", {"mode", "source", "func_name"}]   run the solution as its row format's grader would
    ["call", ref, args]  ["getattr", ref, name]  ["bool" | "len" | "iter" | "next" | "repr", ref]
    ["getitem", ref, key]  ["stdio", input]      (the last: one LiveCodeBench stdin test)

and answers ["ok", value] | ["exc", type name, message] | ["exit", type name] (SystemExit and other
non-Exception escapes) | ["stop"] (StopIteration of "next") | ["out", captured stdout].

Modes: "functional" runs Archer's prelude (prelude.py) then the solution as `__main__` and returns
the names it defined; "lcb_call" / "lcb_stdio" / "taco_call" reproduce LiveCodeBench's and TACO's
loading (lcb_compat.py) and return the function to call.
"""

import importlib
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import lcb_compat
    import prelude as prelude_mod
    import wire
else:  # imported by the unit tests
    from . import lcb_compat, wire
    from . import prelude as prelude_mod

ARCHER_RECURSION_LIMIT = 1000
"""Archer runs the solution and its tests as a plain script: the interpreter's default limit."""
_ARCHER_FRAMES = 2  # <module> and check() are on the stack when Archer's test calls the solution


class _AsRef:
    """Sent as a handle whatever the value (a solution's global list is not copied to the harness)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj


class RunnerCodec(wire.Codec):
    """Encodes the solution's values: node-shaped objects as nodes, other objects as handles."""

    def __init__(self):
        super().__init__("c")
        self.namespace: dict = {}
        self.refs: dict[int, object] = {}
        self.ref_ids: dict[int, int] = {}
        self.fallback: dict = {}

    def node_kind(self, obj):
        if isinstance(obj, type):
            return None
        try:
            d = object.__getattribute__(obj, "__dict__")
        except Exception:  # noqa: BLE001
            return None
        if type(d) is not dict or "val" not in d:
            return None
        if "next" in d and "left" not in d and "right" not in d:
            return "L"
        if "left" in d and "right" in d and "next" not in d:
            return "T"
        return None

    def new_node(self, kind):
        # The solution's ListNode / TreeNode if it defined one (Archer's helpers look the name up at
        # call time, so a solution's own class is what its inputs are built of), else the prelude's.
        name = "ListNode" if kind == "L" else "TreeNode"
        cls = self.namespace.get(name)
        if not isinstance(cls, type):
            cls = self.fallback[name]
        return cls(0)

    def ref_of(self, obj):
        if type(obj) is _AsRef:
            obj = obj.obj
        n = self.ref_ids.get(id(obj))
        if n is None:
            n = len(self.refs) + 1
            self.refs[n] = obj
            self.ref_ids[id(obj)] = n
        return ["r", n]

    def obj_of_ref(self, ref):
        try:
            return self.refs[ref]
        except (KeyError, TypeError):
            raise wire.ProtocolError("unknown handle") from None


class Runner:
    def __init__(self, rfd: int, wfd: int):
        self.rfd, self.wfd = rfd, wfd
        self.codec = RunnerCodec()
        self.mode = None
        self.target = None

    # --- loading --------------------------------------------------------------------------------
    def load(self, spec: dict):  # noqa: C901 - one branch per row format
        mode, source = spec["mode"], spec["source"]
        self.mode = mode
        if mode == "functional":
            ns = prelude_mod.namespace()
            before = dict(ns)
            self.codec.namespace = ns
            self.codec.fallback = {"ListNode": ns["ListNode"], "TreeNode": ns["TreeNode"]}
            exec(compile(source, "solution.py", "exec"), ns)
            # scalars as values, everything else (functions, classes, containers) as handles
            return {k: v if v is None or type(v) in (bool, int, float, str) else _AsRef(v)
                    for k, v in ns.items() if not k.startswith("__") and not (k in before and before[k] is v)}
        uses_numpy = "numpy" in source or "np." in source
        if uses_numpy:
            # LiveCodeBench's process has numpy loaded before its guard runs; TACO's header imports it
            importlib.import_module("numpy")
        if mode in ("lcb_call", "lcb_stdio"):
            sys.set_int_max_str_digits(50000)  # LiveCodeBench's evaluator sets it
            lcb_compat.lcb_reliability_guard()
            if mode == "lcb_call":
                code = lcb_compat.IMPORT_STRING + "\n\n" + source
                sol = lcb_compat.compile_module(code, solution_class="class Solution" in code)
                name = spec["func_name"]
                if not hasattr(sol, name):
                    raise AttributeError(f"no function {name!r}")
                return getattr(sol, name)
            code = lcb_compat.make_function(lcb_compat.clean_if_name(source))
            sol = lcb_compat.compile_module(code, solution_class=False)
            if not hasattr(sol, "wrapped_function"):
                raise AttributeError("no wrapped_function")
            self.target = sol.wrapped_function
            return None
        if mode == "taco_call":
            header = lcb_compat.TACO_HEADER
            if not uses_numpy:  # the header's numpy import costs ~0.1 s; bind np lazily instead
                header = header.replace("import numpy as np\n", "from prelude import np\n")
            code = header + source
            sol = lcb_compat.compile_module(code, solution_class="class Solution" in code)
            fn = getattr(sol, spec["func_name"])
            lcb_compat.taco_reliability_guard()
            return fn
        raise ValueError(f"unknown mode {mode!r}")

    # --- requests -------------------------------------------------------------------------------
    def _set_depth(self) -> None:
        if self.mode in ("functional", "taco_call"):
            depth, f = 0, sys._getframe(1)
            while f is not None:
                depth, f = depth + 1, f.f_back
            sys.setrecursionlimit(ARCHER_RECURSION_LIMIT + depth - _ARCHER_FRAMES + 1)

    def handle(self, msg):
        op = msg[0]
        c = self.codec
        if op == "load":
            return ["ok", c.dumps(self.load(msg[1]))]
        if op == "stdio":
            with lcb_compat.Capturing() as captured:
                lcb_compat.call_method(self.target, msg[1])
            return ["out", captured[0]]
        obj = c.obj_of_ref(msg[1])
        if op == "call":
            args, kwargs = c.loads(msg[2])
            self._set_depth()
            result = obj(*args, **kwargs)
            return ["ok", c.dumps((result, args, kwargs))]
        if op == "getattr":
            return ["ok", c.dumps(getattr(obj, str(msg[2])))]
        if op == "getitem":
            return ["ok", c.dumps(obj[c.loads(msg[2])])]
        if op == "bool":
            return ["ok", c.dumps(bool(obj))]
        if op == "len":
            return ["ok", c.dumps(len(obj))]
        if op == "iter":
            return ["ok", c.dumps(iter(obj))]
        if op == "next":
            try:
                return ["ok", c.dumps(next(obj))]
            except StopIteration:
                return ["stop"]
        if op == "repr":
            return ["ok", c.dumps(str(repr(obj))[:1000])]
        raise wire.ProtocolError(f"unknown request {op!r}")

    def serve(self) -> None:
        send, recv = wire.send, wire.recv
        while True:
            try:
                msg = recv(self.rfd)
            except (wire.ProtocolError, OSError):
                os._exit(0)  # the harness is gone
            try:
                reply = self.handle(msg)
            except Exception as e:  # noqa: BLE001 - the solution's exception, reported by type and text
                reply = ["exc", type(e).__name__, _text(e)]
            except BaseException as e:  # noqa: BLE001 - SystemExit and the like: the run is over
                reply = ["exit", type(e).__name__]
            try:
                send(self.wfd, reply)
            except (TypeError, ValueError, RecursionError) as e:
                send(self.wfd, ["exc", "TypeError", f"value cannot be sent: {type(e).__name__}"])
            except OSError:
                os._exit(0)


def _text(e) -> str:
    try:
        return str(e)[:300]
    except BaseException:  # noqa: BLE001 - a hostile __str__
        return ""


if __name__ == "__main__":
    Runner(int(sys.argv[1]), int(sys.argv[2])).serve()

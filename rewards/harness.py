"""The trusted side of a functional or call-based run (inside the sandbox; this file's text is the program).

`boot.py` starts this process and the solution's process (runner.py) as two different uids joined by
two pipes. This process reads the payload on stdin:

    {"nonce": str, "mode": "functional" | "lcb_call" | "lcb_stdio" | "taco_call", "solution": str,
     "test": str (functional), "func_name": str, "inputs": [...], "outputs": [...], "per_test_s": float}

and writes one line on stdout: `<nonce> VERDICT {"status": "pass"|"fail"|"timeout", "reason": str}`.
No code of the solution ever runs here: the solution's functions, classes and objects are handles
(`Remote`) whose calls and attribute reads are messages to the other process, and what comes back is
data (wire.py). The solution's process has no handle on this process's stdout, cannot read its memory
(another uid, no ptrace) and cannot signal it, so nothing it does can write or fake the verdict line.

functional (Archer/DeepCoder `{"functional": test code}`, HumanEval+ test code): the test code runs
here after Archer's prelude (prelude.py), with the names the solution defined that the prelude and the
builtins do not already define (so a solution cannot replace `is_same_list`, `abs` or `np` for the
tests); it passes when it runs to the end (or calls exit(0)), as Archer's exit status 0.
lcb_call / lcb_stdio: LiveCodeBench's run_test, test by test, stopping at the first failure, each test
within per_test_s. taco_call: TACO's call-based run_test, the same way.
"""

import builtins
import json
import os
import sys
import time

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # a read-only directory of the sandbox: the solution cannot add modules
    import lcb_compat
    import prelude
    import wire
else:  # imported by the unit tests
    from . import lcb_compat, prelude, wire

_ARCHER_RECURSION_LIMIT = 1000


class Abort(BaseException):
    """Ends the run with a verdict; not an Exception, so test code cannot catch it."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


class SolutionError(Exception):
    """An exception of the solution whose type is not a builtin exception (raised here by name)."""


def _exception(name: str, text: str) -> Exception:
    t = getattr(builtins, str(name), None)
    if isinstance(t, type) and issubclass(t, Exception):
        try:
            return t(text)
        except Exception:  # noqa: BLE001 - an exception type with a different signature
            pass
    return SolutionError(f"{name}: {text}")


class Remote:
    """A handle on an object of the solution's process. Equality is identity (never the solution's __eq__)."""

    __slots__ = ("_rid", "_conn", "__weakref__")

    def __init__(self, rid, conn):
        object.__setattr__(self, "_rid", rid)
        object.__setattr__(self, "_conn", conn)

    def __call__(self, *args, **kwargs):
        return self._conn.call(self, args, kwargs)

    def __getattr__(self, name):
        return self._conn.request(["getattr", self._rid, name])

    def __setattr__(self, name, value):
        raise TypeError("attributes of the solution's objects are read-only here")

    def __bool__(self):
        return bool(self._conn.request(["bool", self._rid]))

    def __len__(self):
        n = self._conn.request(["len", self._rid])
        if type(n) is not int:
            raise TypeError("len() of the solution's object is not an int")
        return n

    def __iter__(self):
        return self._conn.request(["iter", self._rid])

    def __next__(self):
        return self._conn.request(["next", self._rid])

    def __getitem__(self, key):
        return self._conn.request(["getitem", self._rid, self._conn.codec.dumps(key)])

    def __repr__(self):
        return f"<solution object #{self._rid}>"


class HarnessCodec(wire.Codec):
    def __init__(self, conn, node_types: dict):
        super().__init__("p")
        self.conn = conn
        self.node_types = node_types  # {"L": ListNode, "T": TreeNode} of the prelude run here
        self.remotes: dict = {}

    def node_kind(self, obj):
        t = type(obj)
        return "L" if t is self.node_types.get("L") else "T" if t is self.node_types.get("T") else None

    def new_node(self, kind):
        cls = self.node_types.get(kind)
        if cls is None:
            raise wire.ProtocolError("no node types in this mode")
        return cls(0)

    def ref_of(self, obj):
        if type(obj) is Remote:
            return ["r", obj._rid]
        raise TypeError(f"a {type(obj).__name__} cannot be passed to the solution")

    def obj_of_ref(self, ref):
        if type(ref) is not int:
            raise wire.ProtocolError("bad handle")
        r = self.remotes.get(ref)
        if r is None:
            r = self.remotes[ref] = Remote(ref, self.conn)
        return r


class Conn:
    """Requests to the solution's process; `deadline` (monotonic) bounds each answer when set."""

    def __init__(self, wfd: int, rfd: int):
        self.wfd, self.rfd = wfd, rfd
        self.codec = HarnessCodec(self, {})
        self.deadline = None

    def request(self, msg, *, values=True):
        try:
            wire.send(self.wfd, msg)
            reply = wire.recv(self.rfd, self.deadline)
        except wire.Timeout:
            raise Abort("timeout", "time limit exceeded") from None
        except (wire.ProtocolError, OSError) as e:
            raise Abort("fail", f"the solution's process stopped answering ({e})") from None
        if type(reply) is not list or not reply:
            raise Abort("fail", "protocol error")
        tag = reply[0]
        if tag == "ok" and len(reply) == 2:
            if not values:
                return reply[1]
            try:
                return self.codec.loads(reply[1])
            except wire.ProtocolError as e:
                raise Abort("fail", f"protocol error: {e}") from None
        if tag == "exc" and len(reply) == 3:
            raise _exception(reply[1], str(reply[2]))
        if tag == "exit":
            raise Abort("fail", f"the solution exited during the tests ({str(reply[1:2])[:60]})")
        if tag == "stop":
            raise StopIteration
        if tag == "out" and len(reply) == 2 and type(reply[1]) is str:
            return reply[1]
        raise Abort("fail", "protocol error")

    def call(self, fn: Remote, args: tuple, kwargs: dict):
        """fn(*args, **kwargs) in the solution's process; arguments it changed in place change here too."""
        sent = self.codec.dumps((args, kwargs))  # TypeError for a value that cannot be sent
        out = self.request(["call", fn._rid, sent], values=False)
        try:
            result, args2, kwargs2 = self.codec.loads(out)
            back = out["v"]
            before_kw = {pair[0]: pair[1] for pair in sent["v"][2][1:]}
            after_kw = {pair[0]: pair[1] for pair in back[3][1:]}
            for orig, new, before, after in zip(args, args2, sent["v"][1][1:], back[2][1:]):
                _sync(orig, new, before, after)
            for k, orig in kwargs.items():
                _sync(orig, kwargs2.get(k), before_kw.get(k), after_kw.get(k))
        except (wire.ProtocolError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise Abort("fail", f"protocol error: {type(e).__name__}") from None
        return result


def _sync(orig, new, enc_before, enc_after) -> None:
    """Mirror an in-place change of a container argument (nodes are mirrored by the codec)."""
    if enc_before == enc_after or type(orig) is not type(new):
        return
    if type(orig) is list or type(orig) is bytearray:
        orig[:] = new
    elif type(orig) in (dict, set):
        orig.clear()
        orig.update(new)


def run_functional(conn: Conn, p: dict):
    ns = prelude.namespace()
    conn.codec.node_types = {"L": ns["ListNode"], "T": ns["TreeNode"]}
    tests = compile(p["test"], "tests.py", "exec")
    names = conn.request(["load", {"mode": "functional", "source": p["solution"]}])
    if type(names) is not dict:
        raise Abort("fail", "protocol error")
    taken = set(ns) | set(dir(builtins))
    for k, v in names.items():
        if type(k) is str and k not in taken:
            ns[k] = v
    depth, f = 0, sys._getframe()
    while f is not None:
        depth, f = depth + 1, f.f_back
    sys.setrecursionlimit(_ARCHER_RECURSION_LIMIT + depth)
    try:
        exec(tests, ns)
    except SystemExit as e:  # the test code's own exit(): Archer reads the exit status
        if e.code not in (None, 0):
            raise Abort("fail", f"tests exited with {e.code!r}") from None
    except Exception as e:  # noqa: BLE001 - a failing assert, an exception of the solution or of the tests
        raise Abort("fail", _short(e)) from None
    return "tests passed"


def _load_target(conn: Conn, p: dict, mode: str):
    try:
        return conn.request(["load", {"mode": mode, "source": p["solution"], "func_name": p.get("func_name", "")}])
    except Exception as e:  # noqa: BLE001
        raise Abort("fail", "the solution failed to load: " + _short(e)) from None


def run_lcb_call(conn: Conn, p: dict, per_test: float):
    try:
        inputs = [[json.loads(line) for line in str(text).split("\n")] for text in p["inputs"]]
        outputs = [json.loads(out) for out in p["outputs"]]
    except ValueError as e:
        raise Abort("fail", f"test data is not JSON line by line ({e})") from None
    conn.deadline = time.monotonic() + per_test
    fn = _load_target(conn, p, "lcb_call")
    for i, (args, expected) in enumerate(zip(inputs, outputs)):
        conn.deadline = time.monotonic() + per_test
        try:
            got = fn(*args)
            ok = lcb_compat.lcb_call_matches(got, expected)
        except Exception as e:  # noqa: BLE001 - LiveCodeBench: runtime error
            raise Abort("fail", f"test {i}: " + _short(e)) from None
        if not ok:
            raise Abort("fail", f"test {i}: wrong answer")
    return f"{len(inputs)} tests passed"


def run_taco_call(conn: Conn, p: dict, per_test: float):
    conn.deadline = time.monotonic() + per_test
    fn = _load_target(conn, p, "taco_call")
    for i, (inp, out) in enumerate(zip(p["inputs"], p["outputs"])):
        inp, out = lcb_compat.taco_process_input_output(inp, out)
        conn.deadline = time.monotonic() + per_test
        try:
            got = fn(*inp)
        except Exception as e:  # noqa: BLE001 - TACO: runtime error
            raise Abort("fail", f"test {i}: " + _short(e)) from None
        if not lcb_compat.taco_matches(got, out):
            raise Abort("fail", f"test {i}: wrong answer")
    return f"{len(p['inputs'])} tests passed"


def run_lcb_stdio(conn: Conn, p: dict, per_test: float):
    conn.deadline = time.monotonic() + per_test
    _load_target(conn, p, "lcb_stdio")
    for i, (inp, expected) in enumerate(zip(p["inputs"], p["outputs"])):
        conn.deadline = time.monotonic() + per_test
        try:
            got = conn.request(["stdio", inp])
        except Exception as e:  # noqa: BLE001 - LiveCodeBench: runtime error
            raise Abort("fail", f"test {i}: " + _short(e)) from None
        if not wire.lcb_output_matches(got, expected):
            raise Abort("fail", f"test {i}: wrong answer")
    return f"{len(p['inputs'])} tests passed"


def _short(e) -> str:
    try:
        text = str(e)
    except Exception:  # noqa: BLE001
        text = ""
    return (f"{type(e).__name__}: {text}" if text else type(e).__name__)[:200]


MODES = {"functional": lambda c, p: run_functional(c, p),
         "lcb_call": lambda c, p: run_lcb_call(c, p, float(p["per_test_s"])),
         "lcb_stdio": lambda c, p: run_lcb_stdio(c, p, float(p["per_test_s"])),
         "taco_call": lambda c, p: run_taco_call(c, p, float(p["per_test_s"]))}


def main() -> None:
    wfd, rfd = int(sys.argv[1]), int(sys.argv[2])
    report_fd = os.dup(1)
    os.dup2(2, 1)  # prints of the test code go to stderr; stdout carries the verdict alone
    sys.set_int_max_str_digits(50000)
    payload = json.loads(sys.stdin.buffer.read())
    nonce = payload.pop("nonce")
    conn = Conn(wfd, rfd)
    try:
        verdict = {"status": "pass", "reason": MODES[payload["mode"]](conn, payload)}
    except Abort as a:
        verdict = {"status": a.status, "reason": a.reason}
    except MemoryError:
        verdict = {"status": "fail", "reason": "out of memory"}
    data = (nonce + " VERDICT " + json.dumps(verdict) + "\n").encode()
    while data:
        data = data[os.write(report_fd, data):]
    os._exit(0)


if __name__ == "__main__":
    main()

"""Messages between the trusted harness (harness.py) and the solution's process (runner.py).

Both ends run inside the sandbox as different uids and share only two pipes. A message is an 8-byte
big-endian length and a JSON document. Values cross as data, never as objects with behaviour:

    None, bool, int, float, str                 JSON scalars (ints past 2**63 as ["i", hex])
    ["l", ...] list  ["t", ...] tuple  ["s", ...] set  ["fs", ...] frozenset  ["q", ...] deque
    ["d", [k, v], ...] dict (and its subclasses)  ["f", "nan"|"inf"|"-inf"]  ["c", re, im] complex
    ["b", latin-1 text] bytes  ["ba", ...] bytearray  ["rg", start, stop, step] range
    ["fr", num, den] Fraction  ["dec", text] Decimal
    ["np", dtype, value] numpy scalar  ["nd", dtype, shape, [flat values]] numpy array (plain dtypes)
    ["n", token] a linked-list / tree node (ListNode / TreeNode shape), described in the node table
    ["r", id] any other object of the solution's process: a handle the harness can call, read
              attributes of, iterate or test for truth (each through a message), never compare by value

A message carrying values is {"v": value, "nodes": {token: ["L", val, next] | ["T", val, left, right]}}.
Node tokens name the same object on both sides for the whole run, so a solution that rewires the
nodes it was given is seen doing so, and identity between arguments survives the trip.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time

MAX_MESSAGE = 256 * 1024 * 1024
MAX_DEPTH = 600
_BIG = 1 << 63


class ProtocolError(Exception):
    """The other end broke the message format, died, or sent something undecodable."""


class Timeout(Exception):
    """No answer before the deadline."""


def send(fd: int, obj) -> None:
    data = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    data = len(data).to_bytes(8, "big") + data
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise Timeout()
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise ProtocolError("the other process exited")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv(fd: int, deadline: float | None = None):
    n = int.from_bytes(_read_exact(fd, 8, deadline), "big")
    if n > MAX_MESSAGE:
        raise ProtocolError(f"message of {n} bytes")
    try:
        return json.loads(_read_exact(fd, n, deadline))
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"unreadable message: {e}") from None


def _numpy():
    return sys.modules.get("numpy")


class Codec:
    """Encoder/decoder of one end. `prefix` ("p" harness, "c" runner) keeps node tokens apart.

    Subclass hooks: `node_kind(obj)` -> "L" | "T" | None; `new_node(kind)`; `ref_of(obj)` -> encoded
    ["r", id] or raise TypeError; `obj_of_ref(id)`.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._count = 0
        self.token_of: dict[int, str] = {}
        self.node_of: dict[str, object] = {}

    # --- encoding -------------------------------------------------------------------------------
    def dumps(self, value) -> dict:
        nodes: dict = {}
        todo: list = []
        v = self._enc(value, todo, 0)
        while todo:
            obj = todo.pop()
            tok = self.token_of[id(obj)]
            if tok in nodes:
                continue
            kind = self.node_kind(obj)
            d = vars(obj)
            if kind == "L":
                nodes[tok] = ["L", self._enc(d.get("val"), todo, 0), self._enc(d.get("next"), todo, 0)]
            else:
                nodes[tok] = ["T", self._enc(d.get("val"), todo, 0), self._enc(d.get("left"), todo, 0),
                              self._enc(d.get("right"), todo, 0)]
        return {"v": v, "nodes": nodes}

    def _token(self, obj) -> str:
        tok = self.token_of.get(id(obj))
        if tok is None:
            self._count += 1
            tok = f"{self.prefix}{self._count}"
            self.token_of[id(obj)] = tok
            self.node_of[tok] = obj
        return tok

    def _enc(self, x, todo: list, depth: int):
        t = type(x)
        if x is None or t is bool or t is str:
            return x
        if t is int:
            return x if -_BIG < x < _BIG else ["i", format(x, "x")]
        if t is float:
            return x if x == x and x not in (float("inf"), float("-inf")) else ["f", repr(x)]
        if depth > MAX_DEPTH:
            return self.ref_of(x)
        d = depth + 1
        if t is list:
            return ["l", *[self._enc(v, todo, d) for v in x]]
        if t is tuple:
            return ["t", *[self._enc(v, todo, d) for v in x]]
        if t is dict:
            return ["d", *[[self._enc(k, todo, d), self._enc(v, todo, d)] for k, v in x.items()]]
        if t is set or t is frozenset:
            return ["s" if t is set else "fs", *[self._enc(v, todo, d) for v in x]]
        if t is complex:
            return ["c", self._enc(x.real, todo, d), self._enc(x.imag, todo, d)]
        if t is bytes or t is bytearray:
            return ["b" if t is bytes else "ba", x.decode("latin-1")]
        if t is range:
            return ["rg", x.start, x.stop, x.step]
        kind = self.node_kind(x)
        if kind is not None:
            todo.append(x)
            return ["n", self._token(x)]
        mod = getattr(t, "__module__", "")
        if mod == "collections":
            if isinstance(x, dict):  # defaultdict, OrderedDict, Counter compare as dicts
                return ["d", *[[self._enc(k, todo, d), self._enc(v, todo, d)] for k, v in dict.items(x)]]
            if t.__name__ == "deque":
                return ["q", *[self._enc(v, todo, d) for v in list(x)]]
        if mod == "fractions" and t.__name__ == "Fraction":
            return ["fr", self._enc(x.numerator, todo, d), self._enc(x.denominator, todo, d)]
        if mod == "decimal" and t.__name__ == "Decimal":
            return ["dec", str(x)]
        np = _numpy()
        if np is not None:
            if isinstance(x, np.generic) and x.dtype.kind in "biufcUS" and type(x).__module__ == "numpy":
                return ["np", x.dtype.str, self._enc(x.item(), todo, d)]
            if t is np.ndarray and x.dtype.kind in "biufcUS":
                return ["nd", x.dtype.str, list(x.shape), [self._enc(v, todo, d) for v in x.ravel().tolist()]]
        return self.ref_of(x)

    # --- decoding -------------------------------------------------------------------------------
    def loads(self, msg):
        try:
            nodes = msg["nodes"]
            if not isinstance(nodes, dict):
                raise ProtocolError("bad node table")
            made = {}
            for tok, spec in nodes.items():
                if not isinstance(spec, list) or not spec or spec[0] not in ("L", "T") or len(spec) != (3 if spec[0] == "L" else 4):
                    raise ProtocolError("bad node")
                obj = self.node_of.get(tok)
                if obj is None:
                    obj = self.new_node(spec[0])
                    self.token_of[id(obj)] = tok
                    self.node_of[tok] = obj
                elif self.node_kind(obj) != spec[0]:
                    raise ProtocolError("node changed kind")
                made[tok] = obj
            for tok, spec in nodes.items():
                obj = made[tok]
                if spec[0] == "L":
                    obj.val, obj.next = self._dec(spec[1], 0), self._dec(spec[2], 0)
                else:
                    obj.val, obj.left, obj.right = self._dec(spec[1], 0), self._dec(spec[2], 0), self._dec(spec[3], 0)
            return self._dec(msg["v"], 0)
        except ProtocolError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError, OverflowError) as e:
            raise ProtocolError(f"undecodable value: {type(e).__name__}: {e}") from None

    def _dec(self, x, depth: int):
        t = type(x)
        if x is None or t in (bool, int, float, str):
            return x
        if t is not list or not x or type(x[0]) is not str:
            raise ProtocolError("bad value")
        if depth > MAX_DEPTH + 2:
            raise ProtocolError("value nested too deeply")
        tag, rest, d = x[0], x[1:], depth + 1
        if tag == "l":
            return [self._dec(v, d) for v in rest]
        if tag == "t":
            return tuple(self._dec(v, d) for v in rest)
        if tag == "d":
            return {self._dec(k, d): self._dec(v, d) for k, v in rest}
        if tag == "s":
            return {self._dec(v, d) for v in rest}
        if tag == "fs":
            return frozenset(self._dec(v, d) for v in rest)
        if tag == "q":
            import collections
            return collections.deque(self._dec(v, d) for v in rest)
        if tag == "i":
            return int(rest[0], 16)
        if tag == "f":
            if rest[0] not in ("nan", "inf", "-inf"):
                raise ProtocolError("bad float")
            return float(rest[0])
        if tag == "c":
            return complex(self._dec(rest[0], d), self._dec(rest[1], d))
        if tag in ("b", "ba"):
            b = rest[0].encode("latin-1")
            return b if tag == "b" else bytearray(b)
        if tag == "rg":
            return range(int(rest[0]), int(rest[1]), int(rest[2]))
        if tag == "fr":
            import fractions
            return fractions.Fraction(int(self._dec(rest[0], d)), int(self._dec(rest[1], d)))
        if tag == "dec":
            import decimal
            return decimal.Decimal(str(rest[0]))
        if tag in ("np", "nd"):
            import numpy as np
            dt = np.dtype(str(rest[0]))
            if dt.kind not in "biufcUS":
                raise ProtocolError("bad numpy dtype")
            if tag == "np":
                return dt.type(self._dec(rest[1], d))
            shape = [int(n) for n in rest[1]]
            return np.array([self._dec(v, d) for v in rest[2]], dtype=dt).reshape(shape)
        if tag == "n":
            obj = self.node_of.get(rest[0])
            if obj is None:
                raise ProtocolError("unknown node")
            return obj
        if tag == "r":
            return self.obj_of_ref(rest[0])
        raise ProtocolError(f"unknown tag {tag!r}")

    # --- hooks ----------------------------------------------------------------------------------
    def node_kind(self, obj):  # pragma: no cover - overridden
        return None

    def new_node(self, kind):  # pragma: no cover - overridden
        raise ProtocolError("nodes not supported")

    def ref_of(self, obj):  # pragma: no cover - overridden
        raise TypeError(f"cannot send a {type(obj).__name__}")

    def obj_of_ref(self, ref):  # pragma: no cover - overridden
        raise ProtocolError("refs not supported")


# --- LiveCodeBench's output comparison (lcb_runner/evaluation/testing_util.py@28fef95, MIT) ----------

def lcb_stripped_lines(val: str) -> list[str]:
    return [line.strip() for line in val.strip().split("\n")]


def _lcb_decimals(line: str):
    from decimal import Decimal
    try:
        return True, [Decimal(tok) for tok in line.split()]
    except Exception:  # noqa: BLE001 - LCB: any conversion failure is "not numeric"
        return False, []


def lcb_output_matches(prediction: str, expected: str) -> bool:
    """LCB's grade_stdio rule: same number of stripped lines; each line equal as text, or as the exact
    Decimal values of its whitespace-separated tokens (0.5 == 0.50, 12.0 == 12; no tolerance)."""
    got, want = lcb_stripped_lines(prediction), lcb_stripped_lines(expected)
    if len(got) != len(want):
        return False
    for a, b in zip(got, want):
        if a == b:
            continue
        ok_a, da = _lcb_decimals(a)
        if not ok_a:
            return False
        ok_b, db = _lcb_decimals(b)
        if not ok_b or da != db:
            return False
    return True

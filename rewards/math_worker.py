"""A killable math-verification process and its client.

The process (`python -m rewards.math_worker MEMORY_MB`) reads one JSON request per line
({"gold": ..., "response": str}) and answers one JSON line ({"ok": bool, "reason": str}). The client
(`MathWorker`) enforces the deadline by SIGKILLing the process and starts a fresh one on the next call,
so a normaliser that hangs (a CPU loop no `wait_for` can interrupt) costs one deadline, never the pool.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import selectors
import subprocess
import sys
import time

from archer_async.types import Reward

STARTUP_TIMEOUT_S = 120.0


def _serve(memory_mb: int) -> None:
    lim = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    sys.set_int_max_str_digits(10_000)
    from rewards.math_grader import check_answer
    for name in ("math_verify", "sympy", "pylatexenc.latex2text"):  # import cost paid before "ready"
        importlib.import_module(name)
    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            ok, reason = check_answer(req["gold"], req["response"])
            msg = {"ok": ok, "reason": reason}
        except MemoryError:
            msg = {"ok": False, "reason": "answer too large to verify"}
        except Exception as e:  # noqa: BLE001 - reported as an infra error by the client
            msg = {"error": f"{type(e).__name__}: {e}"[:200]}
        out.write(json.dumps(msg) + "\n")
        out.flush()


class MathWorker:
    """Client of one worker process; not thread-safe (one per pool thread)."""

    def __init__(self, timeout_s: float, memory_mb: int = 2048):
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA", "OMP"))}
        env["OMP_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen([sys.executable, "-m", "rewards.math_worker", str(self.memory_mb)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, text=True, bufsize=1)
        if self._readline(time.monotonic() + STARTUP_TIMEOUT_S) is None:
            self.close()
            raise RuntimeError("math worker did not start")

    def _readline(self, deadline: float) -> str | None:
        assert self.proc is not None and self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(timeout=left):
                return None
        line = self.proc.stdout.readline()
        return line or None

    def check(self, gold, response: str) -> Reward:
        """Verify one response; timeout past the deadline, infra_error if the worker breaks."""
        try:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            assert self.proc is not None and self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"gold": gold, "response": response}) + "\n")
            self.proc.stdin.flush()
        except (OSError, RuntimeError, ValueError) as e:
            self.close()
            return Reward("infra_error", f"math worker failed: {e}"[:200])
        line = self._readline(time.monotonic() + self.timeout_s)
        if line is None:
            crashed = self.proc.poll() is not None
            self.close()
            if crashed:
                return Reward("infra_error", "math worker crashed")
            return Reward("timeout", f"math verification exceeded {self.timeout_s:g}s")
        msg = json.loads(line)
        if "error" in msg:
            return Reward("infra_error", f"math grader crashed: {msg['error']}"[:200])
        return Reward("pass" if msg["ok"] else "fail", msg["reason"][:200])

    def close(self) -> None:
        """Kill the worker process (a new one starts on the next check)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    if f:
                        f.close()
                except OSError:
                    pass
            self.proc = None


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else 2048)

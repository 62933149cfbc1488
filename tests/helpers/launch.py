"""Helpers of the launch tests (tests/*/test_launch_*.py): run the `archer-async` CLI in a subprocess the
way a user does, and find every process a run left behind.

Each run's processes are marked with a unique ARCHER_TEST_TAG in their environment. Every process the
CLI starts (Ray's GCS and raylets, Ray workers, vLLM engine cores and their workers) inherits it, so
after the run any process whose /proc/<pid>/environ still holds the tag is an orphan of that run, and
processes of other runs on this shared machine are never confused with it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]

TINY = ["learner.total_steps=4", "launch.eval_every=2", "launch.eval_max_problems=8", "launch.eval_k=2",
        "actors.max_response_length=32", "dashboard.port=0", "wandb.mode=disabled",
        "learner.batch_groups=8", "learner.mini_batch_groups=8"]
"""Overrides of a short test run (the training defaults stay as they are)."""


def new_tag(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:12]}"


def run_env(tag: str, **extra: str) -> dict[str, str]:
    """The environment of a test run: the tag, and vLLM on CPU settings for a shared 2-core machine."""
    env = dict(os.environ)
    env.update({"ARCHER_TEST_TAG": tag, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1",
                "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


def tagged_pids(tag: str) -> dict[int, str]:
    """{pid: command line} of live processes (not zombies) whose environment holds ARCHER_TEST_TAG=tag."""
    needle = f"ARCHER_TEST_TAG={tag}".encode()
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes()
            if needle not in env.split(b"\0"):
                continue
            stat = (d / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue
            out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
        except (OSError, IndexError):
            continue
    return out


def wait_no_tagged(tag: str, timeout_s: float = 30.0) -> dict[int, str]:
    """Poll until no process of the run is left (processes may take a moment to exit); returns those left."""
    deadline = time.time() + timeout_s
    while True:
        left = tagged_pids(tag)
        if not left or time.time() > deadline:
            return left
        time.sleep(0.5)


def kill_tagged(tag: str) -> None:
    """Clean-up after a failed test: SIGKILL what this test's run left, by pid."""
    for pid in tagged_pids(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, as in a terminal's foreground job (pytest
    may run with SIGINT ignored, e.g. as a background job of a script, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class CliRun:
    """`python -m launch.cli ARGS` in its own session (like a terminal's foreground job), with
    stdout+stderr collected line by line (and copied to `log_path`)."""

    def __init__(self, args: list[str], tag: str, log_path: Path, env: Optional[dict] = None):
        self.tag = tag
        self.args = args
        self.log_path = log_path
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.started = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launch.cli", *args], cwd=ROOT, env=env or run_env(tag),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            start_new_session=True, preexec_fn=_default_sigint)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.log_path, "a") as f:
            for line in self.proc.stdout:
                f.write(line)
                f.flush()
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_line(self, pattern: str, timeout_s: float) -> Optional[re.Match]:
        """First output line matching `pattern` (regex search); None on timeout or when the run ended."""
        rx = re.compile(pattern)
        deadline = time.time() + timeout_s
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.time()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    return None
                self._cond.wait(min(left, 1.0))

    def interrupt(self) -> None:
        """Ctrl-C as a terminal sends it: SIGINT to the whole foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self, timeout_s: float) -> int:
        """Exit code; on timeout the run is killed (with every process it left) and the test fails."""
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"`archer-async {' '.join(self.args)}` did not finish within {timeout_s:.0f} s; "
                                 f"output tail:\n{self.tail()}") from None
        self._reader.join(10)
        return rc

    def close(self) -> None:
        """Teardown: kill the run if it is still going, and every process carrying its tag."""
        if self.proc.poll() is None:
            self.kill()
        kill_tagged(self.tag)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        kill_tagged(self.tag)
        self.proc.wait(10)

    def output(self) -> str:
        return "\n".join(self.lines)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def role_nodes(run_dir: Path) -> dict[str, str]:
    """{role: Ray node id prefix} from the driver log's "<role> on host (ip, node <id>)" lines."""
    out = {}
    for m in re.finditer(r"launch: (\w+) on .*\(.*, node ([0-9a-f]+)\)", (run_dir / "logs" / "driver.log").read_text()):
        out[m.group(1)] = m.group(2)
    return out

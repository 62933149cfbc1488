"""Every command shown in README.md's code blocks works as printed, on what the quick start produced.

The commands are parsed from the README (a new command is covered without touching this file):
every line of a fenced code block whose first word is a program a user runs (`archer-async`,
`bash`, `python`, `pip`, `apt-get`, after any `VAR=value` prefix), continuation lines joined, comments
dropped. The quick start (`bash launch/dev.sh train`) runs first, shortened by two overrides
(`learner.total_steps=4` and a 16-problem held-out evaluation, which every other `train` gets too);
every other command then runs against its run directory and Hugging Face export, with the synopsis
placeholders (RUN_DIR, PATH, FILE, ...) filled in by `FILL` and `[optional]` brackets opened. Each
must exit 0 with no traceback on stderr (and nothing printed at interpreter exit).

Exceptions, each with its reason, are `NOT_RUN` (they install packages or need a GPU) and
`RUN_INSTEAD` (the whole test suite, which holds this test, runs collect-only). The dashboard
server runs until Ctrl-C: it must serve its page and stop cleanly on SIGINT.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.launch import ROOT, kill_tagged, new_tag, run_env, wait_no_tagged

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]

QUICK_START = "bash launch/dev.sh train"
SHORTER = ["learner.total_steps=4", "launch.eval_max_problems=16"]
"""The changes to the quick-start training: fewer steps, a smaller held-out evaluation."""

PROGRAMS = {"archer-async", "bash", "python", "python3", "python3.11", "pip", "apt-get"}

NOT_RUN = {
    "python3.11 -m venv .venv && . .venv/bin/activate": "creates a second virtualenv and installs into it "
    "(network, minutes); `bash launch/dev.sh` does the same steps and runs here",
    'pip install -e ".[cpu,test]"': "installs packages into the environment the tests run in; "
    "`bash launch/dev.sh setup` does it",
    "pip uninstall -y torchvision torchaudio torchcodec": "changes the environment the tests run in; "
    "`bash launch/dev.sh setup` does it",
    'pip install -e ".[gpu,test]"': "needs a CUDA GPU (vllm's CUDA build)",
    "pip install ninja packaging wheel setuptools": "prepares the flash-attn build, which needs a CUDA toolkit",
    'MAX_JOBS=8 pip install --no-build-isolation -e ".[flash]"': "builds flash-attn: needs a CUDA toolkit (nvcc)",
    "apt-get install bubblewrap": "installs a system package (root); `bash launch/dev.sh setup` does it "
    "and the sandbox tests use it",
}
"""Commands not run here, and why."""

RUN_INSTEAD = {
    "bash launch/dev.sh test": "bash launch/dev.sh test --collect-only -q",
}
"""The whole test suite contains this test: its set-up check and pytest run collect-only."""

LONG_RUNNING = {"dashboard"}
"""archer-async subcommands that serve until Ctrl-C."""


def readme_commands(text: str) -> list[str]:
    """Commands of README.md's fenced code blocks, in order, unique, comments stripped."""
    out: list[str] = []
    in_block = False
    for raw in text.splitlines():
        if raw.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            continue
        line = re.split(r"\s+#\s", raw, maxsplit=1)[0].rstrip()
        if not line.strip():
            continue
        if raw[:1].isspace() and out and line.strip()[:1] in "[-":
            out[-1] += " " + line.strip()  # a synopsis' continuation line
            continue
        program = next((w for w in line.split() if not re.fullmatch(r"[A-Z_]+=\S*", w)), "")
        if program in PROGRAMS:  # after any VAR=value prefix
            out.append(line.strip())
    return list(dict.fromkeys(out))


def fill(command: str, values: dict[str, str]) -> str:
    """The command with `[...]` opened, `...` dropped and every placeholder replaced by its value."""
    command = re.sub(r"\bruns/\d{8}-\d{6}/hf/step-\d+", values["PATH"], command)  # the final export
    command = re.sub(r"\bruns/\d{8}-\d{6}\b", values["RUN_DIR"], command)
    command = command.replace("[", " ").replace("]", " ").replace("...", " ")
    words = []
    for w in shlex.split(command):
        if w in values:
            w = values[w]
        elif re.fullmatch(r"[A-Z][A-Z_]*(\.[a-z]+)?", w):
            raise AssertionError(f"README command {command!r}: no value for the placeholder {w!r}; add it to "
                                 "the values of tests/e2e/test_readme_walk.py")
        words.append(w)
    return " ".join(shlex.quote(w) if w not in ("&&", "|", ";") else w for w in words)


def test_readme_parser_finds_every_command():
    cmds = readme_commands((ROOT / "README.md").read_text())
    assert cmds[0] == QUICK_START
    subcommands = {c.split()[1] for c in cmds if c.startswith("archer-async ")}
    assert {"train", "resume", "eval", "score", "dashboard", "buffer", "build-tiny", "make-data"} <= subcommands
    assert not any(c.startswith(("RUN_DIR", "prompts")) for c in cmds), cmds  # layout blocks are not commands
    assert any("--timeout S" in c for c in cmds), "a synopsis continuation line was not joined"


def _venv() -> Path:
    return Path(os.environ.get("ARCHER_VENV") or ROOT / ".venv")


def _dev_sh_ready(venv: Path) -> bool:
    """True when `bash launch/dev.sh` would not install anything (the same check as its need_setup)."""
    stamp = venv / ".archer-setup"
    if not (venv / "bin" / "python").exists() or not stamp.exists():
        return False
    want = subprocess.run("sha256sum pyproject.toml launch/dev.sh | sha256sum | cut -c1-16", shell=True,
                          cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return stamp.read_text().strip() == want and all(shutil.which(p) for p in ("bwrap", "chromium"))


class Shell:
    """Runs README commands with bash in the repository root, as a user's shell with the venv on PATH."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.tags: list[str] = []
        venv_bin = _venv() / "bin" if (_venv() / "bin" / "archer-async").exists() else Path(sys.executable).parent
        self.path = f"{venv_bin}:{os.environ.get('PATH', '')}"

    def env(self, tag: str) -> dict:
        env = run_env(tag, PATH=self.path, PYTHONPATH=str(ROOT))
        return env

    def start(self, command: str) -> tuple[subprocess.Popen, str, Path, Path]:
        tag = new_tag("readme")
        self.tags.append(tag)
        n = len(self.tags)
        out, err = self.tmp / f"cmd{n}.out", self.tmp / f"cmd{n}.err"
        p = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=self.env(tag), stdin=subprocess.DEVNULL,
                             stdout=open(out, "w"), stderr=open(err, "w"), start_new_session=True)
        return p, tag, out, err

    def run(self, command: str, timeout_s: float) -> tuple[int, str, str]:
        p, tag, out, err = self.start(command)
        t0 = time.time()
        try:
            rc = p.wait(timeout_s)
            print(f"[readme walk] {time.time() - t0:.1f} s: {command}", flush=True)  # shown with -s
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            kill_tagged(tag)
            raise AssertionError(f"`{command}` did not finish in {timeout_s:.0f} s:\n{err.read_text()[-3000:]}")
        left = wait_no_tagged(tag, 30)
        assert not left, f"`{command}` left processes: {left}"
        return rc, out.read_text(), err.read_text()

    def close(self) -> None:
        for tag in self.tags:
            kill_tagged(tag)


def assert_clean(command: str, rc: int, out: str, err: str) -> None:
    where = f"`{command}` (exit {rc})\n--- stdout tail:\n{out[-2000:]}\n--- stderr tail:\n{err[-4000:]}"
    assert rc == 0, where
    assert "Traceback (most recent call last)" not in err, where
    assert "Exception ignored" not in err, where  # printed at interpreter exit
    logs = [ln for ln in err.splitlines() if re.search(r"\b(DEBUG|INFO|WARNING)\b", ln)]
    assert not logs, f"log lines on the terminal (they belong in the log files):\n{logs[:10]}\n{where}"


@pytest.fixture
def shell(tmp_path):
    s = Shell(tmp_path)
    yield s
    s.close()


def _inputs(tmp: Path) -> dict[str, str]:
    """Values of the synopsis placeholders that are input files (a small eval file, a score input)."""
    from archer_async.taskgen import generate_tasks

    _, rows = generate_tasks(10, 6, 1)
    data = tmp / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored = tmp / "responses.jsonl"
    scored.write_text("".join(json.dumps(dict(r, response=f"\\boxed{{{r['reward_model']['ground_truth']}}}")) + "\n"
                              for r in rows if r["data_source"] == "tiny_math"))
    return {"FILE": str(data), "INPUT.jsonl": str(scored), "OUT.jsonl": str(tmp / "scores.jsonl"),
            "OUT_DIR": str(tmp / "data"), "DIR": str(tmp / "tiny"), "K": "4", "N": "2", "S": "30",
            "CONFIG.yaml": "launch/configs/tiny_cpu.yaml", "key=value": "learner.total_steps=4"}


def test_every_readme_command_works_as_printed(tmp_path, shell):
    commands = readme_commands((ROOT / "README.md").read_text())
    assert commands[0] == QUICK_START
    values = _inputs(tmp_path)
    # paths outside the repository that README examples write (e.g. /tmp/tiny-data): removed afterwards
    litter = {Path(w) for c in commands for w in c.split() if w.startswith("/tmp/")}
    litter = {p for p in litter if not p.exists()}

    # 1. the quick start, shortened (SHORTER); its run directory is what every other command uses
    runs = ROOT / "runs"
    before = set(runs.iterdir()) if runs.exists() else set()
    quick = f"{QUICK_START} {' '.join(SHORTER)}"
    if not _dev_sh_ready(_venv()):  # dev.sh would install first: not in a test; the same `train` it execs
        quick = f"archer-async train {' '.join(SHORTER)}"
    rc, out, err = shell.run(quick, 1500)
    new = sorted(set(runs.iterdir()) - before) if runs.exists() else []
    try:
        assert_clean(quick, rc, out, err)
        assert len(new) == 1, new
        run_dir = new[0]
        values["RUN_DIR"] = str(run_dir.relative_to(ROOT))
        exports = sorted((run_dir / "hf").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        assert exports, "the quick start exported no Hugging Face model"
        values["PATH"] = str(exports[-1])
        for log in (run_dir / "logs").glob("actor*.log"):  # a healthy weight update reports no failure
            assert "Failed to load weights" not in log.read_text(), log
        assert "held-out accuracy" in out + err

        # 2. every other command, as printed, on that run
        ran, skipped, skipped_setup = [], [], []
        for command in commands[1:]:
            if command in NOT_RUN:
                skipped.append(command)
                continue
            if command.startswith("bash launch/dev.sh") and not _dev_sh_ready(_venv()):
                skipped_setup.append(command)  # it would install first (run `bash launch/dev.sh setup`)
                continue
            command = RUN_INSTEAD.get(command, command)
            line = fill(command, values)
            words = line.split()
            if words[:2] == ["archer-async", "train"] and "--dry-run" not in words:
                line += " " + " ".join(SHORTER)  # every training, shortened by the same overrides
                words = line.split()
            if words[0] == "archer-async" and words[1] in LONG_RUNNING:
                _serve_then_ctrl_c(shell, line)
            else:
                rc, out, err = shell.run(line, 900)
                assert_clean(line, rc, out, err)
                if words[:2] == ["archer-async", "eval"]:
                    report = json.loads(out)  # stdout is the report alone
                    assert report["problems"] > 0 and 0 <= report["avg@4"] <= 1
            ran.append(line)
        print("\nREADME commands run:\n  " + "\n  ".join(ran) + "\nnot run:\n  " + "\n  ".join(
            f"{c}  ({NOT_RUN[c]})" for c in skipped) + "".join(
            f"\n  {c}  (the environment is not set up for this checkout)" for c in skipped_setup))
        assert set(skipped) == set(NOT_RUN) & set(commands)
    finally:
        for d in (set(runs.iterdir()) - before) if runs.exists() else ():  # every run the walk started
            shutil.rmtree(d, ignore_errors=True)
        if runs.exists() and not before and not any(runs.iterdir()):
            runs.rmdir()
        for p in litter:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _serve_then_ctrl_c(shell: Shell, line: str) -> None:
    p, tag, out, err = shell.start(line)
    try:
        deadline = time.time() + 120
        url = None
        while url is None and time.time() < deadline and p.poll() is None:
            m = re.search(r"(http://\S+)", out.read_text())
            url = m.group(1) if m else None
            time.sleep(0.5)
        assert url, f"`{line}` printed no address:\n{out.read_text()}\n{err.read_text()}"
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        os.killpg(p.pid, signal.SIGINT)
        rc = p.wait(60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        kill_tagged(tag)
    e = err.read_text()
    assert rc in (0, 130), f"`{line}` exit {rc} after Ctrl-C:\n{e[-3000:]}"
    assert "Traceback (most recent call last)" not in e and "Exception ignored" not in e, e[-3000:]

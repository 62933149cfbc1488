"""launch/dev.sh against a fake virtualenv (scripts named Fake... stand for python, pip and the CLI): a
failing `import vllm` stops set-up with its reason; `train` needs no browser."""

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("sha256sum", "cut", "cat", "dirname", "id", "tail", "bwrap")


def _tree(tmp: Path, python_body: str) -> tuple[Path, dict]:
    """A copy of dev.sh + pyproject.toml, a .venv of fake scripts, and a PATH of only the tools dev.sh uses
    (a fake bwrap; no chromium, no apt-get, no nvidia-smi)."""
    (tmp / "launch").mkdir()
    shutil.copy(ROOT / "launch" / "dev.sh", tmp / "launch" / "dev.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp / "pyproject.toml")
    venv_bin = tmp / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    scripts = {"python": python_body, "pip": "exit 0  # FakePip", "archer-async": 'echo "FakeArcherAsync $*"'}
    for name, body in scripts.items():
        (venv_bin / name).write_text(f"#!/bin/bash\n{body}\n")
        (venv_bin / name).chmod(0o755)
    path = tmp / "path"
    path.mkdir()
    for tool in TOOLS:
        if tool == "bwrap":
            (path / tool).write_text("#!/bin/bash\nexit 0\n")
            (path / tool).chmod(0o755)
        else:
            os.symlink(shutil.which(tool), path / tool)
    env = {"PATH": str(path), "HOME": str(tmp)}
    return tmp, env


def _run(tmp: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("bash"), str(tmp / "launch" / "dev.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=60)


FAKE_PYTHON_NO_VLLM = """# FakePython: vLLM's CUDA build that cannot load its libraries
case "$*" in
  *"import vllm"*) echo "ImportError: libcudart.so.13: cannot open shared object file" >&2; exit 1 ;;
esac
exit 0"""


def test_setup_fails_loudly_with_the_reason_when_vllm_does_not_import(tmp_path):
    tmp, env = _tree(tmp_path, FAKE_PYTHON_NO_VLLM)
    r = _run(tmp, env, "setup")
    assert r.returncode != 0
    assert "libcudart.so.13" in r.stderr
    assert "`import vllm` fails" in r.stderr
    assert not (tmp / ".venv" / ".archer-setup").exists()  # a failed set-up is not stamped as done


def test_train_needs_no_browser(tmp_path):
    tmp, env = _tree(tmp_path, "exit 0  # FakePython")
    first = _run(tmp, env, "setup")
    assert first.returncode == 0, first.stderr
    r = _run(tmp, env, "train", "x.yaml")
    assert r.returncode == 0, r.stderr
    assert "FakeArcherAsync train x.yaml" in r.stdout
    assert "chromium" not in (r.stdout + r.stderr)


def test_test_command_says_why_the_browser_test_will_fail_without_chromium(tmp_path):
    tmp, env = _tree(tmp_path, 'echo "FakePython $*"')
    assert _run(tmp, env, "setup").returncode == 0
    r = _run(tmp, env, "test", "-q")
    assert "no chromium could be installed" in r.stderr
    assert "FakePython -m pytest tests -q" in r.stdout

"""bench/gpu_check.sh, the GPU machine's check script, in its --cpu-dry form: every CPU-able part runs
(tiny shapes, the CPU as the device) and passes; the shell script itself parses."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_gpu_check_script_parses():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_gpu_check_cpu_dry_runs_every_cpu_part(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(SCRIPT), "--cpu-dry"], env=env, capture_output=True, text=True, timeout=900)
    log = (tmp_path / "gpu_check.log").read_text()
    assert r.returncode == 0, log[-4000:]
    for check in ("loss", "step", "memory", "ckpt", "sync", "nccl", "packing"):
        assert f"== {check}: PASS" in log, log[-4000:]
    assert "== vllm: SKIPPED (--cpu-dry" in log
    assert '"check": "sync", "ok": true' in log and '"bit_exact": true' in log
    assert '"check": "ckpt", "ok": true' in log and '"cuda_rng_saved": false' in log


def test_gpu_check_refuses_an_unknown_flag():
    r = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr

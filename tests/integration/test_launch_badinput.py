"""Bad launch input: one clear error line, exit code 2, no run directory, no Ray process left behind.

A run that fails its preflight (model directory, data files, config, the cluster's resources, which
are checked right after Ray starts and before the run directory is created) leaves nothing behind. A
failure after start-up (a role that crashes) keeps the run directory and its logs/ for diagnosis.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def run_bad(cli):
    def run(args: list[str], name: str) -> tuple[int, list[str], dict]:
        rc, proc, left = cli(args, name, 240)
        return rc, proc.lines, left

    return run


def _assert_one_clear_error(rc: int, lines: list[str], left: dict, *needles: str) -> None:
    text = "\n".join(lines)
    assert rc == 2, text
    errors = [ln for ln in lines if ln.startswith("archer-async:")]
    assert len(errors) == 1, text
    for n in needles:
        assert n in errors[0], errors[0]
    assert "Traceback" not in text, text
    assert not left, f"processes left behind: {left}"


def test_missing_model_path(tmp_path, run_bad):
    run_dir = tmp_path / "run"
    rc, lines, left = run_bad(["train", f"run_dir={run_dir}", "model.path=/nonexistent"], "model")
    _assert_one_clear_error(rc, lines, left, "model.path", "/nonexistent")
    assert not run_dir.exists()


def test_resources_no_cluster_has(tmp_path, run_bad):
    """learner.gpus_per_rank=1 on a machine without GPUs: Ray starts, the check fails, Ray is stopped."""
    run_dir = tmp_path / "run"
    rc, lines, left = run_bad(["train", f"run_dir={run_dir}", "learner.gpus_per_rank=1",
                                          "dashboard.enabled=false", "wandb.mode=disabled"], "gpu")
    _assert_one_clear_error(rc, lines, left, "GPU: need 2, cluster has 0", "learner.gpus_per_rank")
    assert not run_dir.exists()


def test_malformed_yaml(tmp_path, run_bad):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  total_steps: 3\n  lr: [1e-4\n")
    run_dir = tmp_path / "run"
    rc, lines, left = run_bad(["train", str(bad), f"run_dir={run_dir}"], "yaml")
    _assert_one_clear_error(rc, lines, left, str(bad), "YAML")
    assert not run_dir.exists()


def test_data_file_with_a_broken_row(tmp_path, run_bad):
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "data_source": "tiny_math",
             "reward_model": {"style": "rule", "ground_truth": str(i + 1)}} for i in range(4)]
    data = tmp_path / "train.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines[2] = json.dumps({"prompt": [{"role": "user", "content": "no answer"}], "data_source": "tiny_math"})
    data.write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    rc, out, left = run_bad(["train", f"run_dir={run_dir}", f"data.train_files=[{data}]"], "data")
    _assert_one_clear_error(rc, out, left, f"{data}:3", "reward_model")
    assert not run_dir.exists()


def test_unreachable_ray_address(tmp_path, run_bad):
    """launch.ray_address where no cluster listens fails in seconds (ray.init alone retries for minutes)."""
    run_dir = tmp_path / "run"
    rc, lines, left = run_bad(["train", f"run_dir={run_dir}", "launch.ray_address=127.0.0.1:9"], "addr")
    _assert_one_clear_error(rc, lines, left, "launch.ray_address", "127.0.0.1:9")
    assert not run_dir.exists()


def test_prompt_length_that_fills_the_models_context(tmp_path, run_bad):
    run_dir = tmp_path / "run"
    rc, lines, left = run_bad(["train", f"run_dir={run_dir}", "data.max_prompt_length=512"], "ctx")
    _assert_one_clear_error(rc, lines, left, "data.max_prompt_length 512", "context length 512")
    assert not run_dir.exists()

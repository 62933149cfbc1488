"""`archer-async eval --model PATH --data FILE --k K`: avg@K / pass@K of the shipped tiny model on
`archer-async make-data` output, generated with vLLM, with a progress bar and a JSON report."""

from __future__ import annotations

import json

import pytest

from archer_async.config import TINY_MODEL_DIR
pytestmark = pytest.mark.integration


@pytest.fixture
def eval_cli(tmp_path, cli):
    """The CLI with TMPDIR in the test's directory (the eval's scratch directory must not outlive it)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)

    def run(args: list[str], name: str, timeout_s: float = 480) -> tuple[int, str, dict]:
        rc, proc, left = cli(args, name, timeout_s, env={"TMPDIR": str(scratch)})
        return rc, proc.output(), left

    return run


def test_eval_cli_reports_avg_and_pass_at_k(tmp_path, eval_cli):
    data_dir = tmp_path / "data"
    rc, out, _ = eval_cli(["make-data", str(data_dir), "--num-train", "10", "--num-eval", "8"], "make-data", 120)
    assert rc == 0, out
    report_path = tmp_path / "report.json"
    rc, out, left = eval_cli(["eval", "--model", str(TINY_MODEL_DIR), "--data", str(data_dir / "eval.jsonl"),
                                    "--limit", "8", "--k", "2", "--max-tokens", "32", "-o", str(report_path)], "eval")
    assert rc == 0, out[-3000:]
    assert not left, f"processes left: {left}"
    assert "8/8" in out and "problem" in out  # the progress bar reached the end
    report = json.loads(report_path.read_text())
    assert report["k"] == 2 and report["problems"] == 8 and report["samples"] == 16
    assert 0.0 <= report["avg@2"] <= report["pass@2"] <= 1.0
    assert set(report["by_data_source"]) <= {"tiny_math", "tiny_code"} and report["by_data_source"]
    assert sum(s["problems"] for s in report["by_data_source"].values()) == 8
    assert list((tmp_path / "tmp").glob("archer-eval-*")) == [], "the eval's scratch directory was left behind"


def test_eval_cli_bad_model_exits_2(tmp_path, eval_cli):
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "1+1?"}], "data_source": "tiny_math",
                                "reward_model": {"style": "rule", "ground_truth": "2"}}) + "\n")
    rc, out, left = eval_cli(["eval", "--model", str(tmp_path / "no-model"), "--data", str(data)], "badmodel", 60)
    assert rc == 2, out
    errors = [ln for ln in out.splitlines() if ln.startswith("archer-async:")]
    assert len(errors) == 1 and "--model" in errors[0] and "no-model" in errors[0], out
    assert "Traceback" not in out and not left

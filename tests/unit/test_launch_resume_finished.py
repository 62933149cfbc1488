"""`archer-async resume` of a finished run says so and starts nothing; an unfinished one resumes."""

from __future__ import annotations

from types import SimpleNamespace

from archer_async.config import load_config
from launch.train import Run


def _run(tmp_path, total: int) -> Run:
    return Run(load_config([], [f"run_dir={tmp_path}", f"learner.total_steps={total}"]), resume=True)


def test_finished_run_with_its_export_is_not_restarted(tmp_path, capsys):
    (tmp_path / "hf" / "step-4").mkdir(parents=True)
    (tmp_path / "hf" / "step-4" / "config.json").write_text("{}")
    pre = SimpleNamespace(restore={"step": 4})
    assert _run(tmp_path, 4)._finished(pre)
    out = capsys.readouterr().out
    assert "the run is complete: step 4 of learner.total_steps=4" in out and "learner.total_steps=N" in out
    assert not _run(tmp_path, 6)._finished(pre)  # more steps asked for: it trains on


def test_finished_steps_without_the_final_export_resume(tmp_path):
    assert not _run(tmp_path, 4)._finished(SimpleNamespace(restore={"step": 4}))

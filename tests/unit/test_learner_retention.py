"""Retention of checkpoints and HF exports (`learner.retention.prune`): the newest N complete step
directories stay, the one `latest` names stays, nothing partial or hidden is ever deleted."""

from pathlib import Path

from learner.retention import prune, step_dirs


def _make(root: Path, step: int, complete: bool = True) -> Path:
    p = root / f"step-{step}"
    p.mkdir(parents=True)
    if complete:
        (p / "DONE").write_text("{}")
    return p


def _complete(p: Path) -> bool:
    return (p / "DONE").is_file()


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_keeps_newest_complete_and_protected(tmp_path):
    for s in (10, 20, 30, 40, 50):
        _make(tmp_path, s)
    removed = prune(tmp_path, 2, _complete, protect=tmp_path / "step-20")
    assert [p.name for p in removed] == ["step-10", "step-30"]
    assert _names(tmp_path) == ["step-20", "step-40", "step-50"]


def test_partial_and_hidden_directories_are_never_deleted(tmp_path):
    for s in (1, 2, 3):
        _make(tmp_path, s)
    _make(tmp_path, 0, complete=False)   # leftover of an interrupted save
    _make(tmp_path, 4, complete=False)   # being written now
    (tmp_path / ".tmp-step-4-123").mkdir()  # an HF export being written
    (tmp_path / "latest").write_text("step-3\n")
    prune(tmp_path, 1, _complete)
    assert _names(tmp_path) == [".tmp-step-4-123", "latest", "step-0", "step-3", "step-4"]


def test_steps_sort_numerically_not_by_name(tmp_path):
    for s in (9, 10, 100):
        _make(tmp_path, s)
    assert [s for s, _ in step_dirs(tmp_path)] == [9, 10, 100]
    prune(tmp_path, 1, _complete)
    assert _names(tmp_path) == ["step-100"]


def test_keep_zero_keeps_everything(tmp_path):
    for s in (1, 2, 3):
        _make(tmp_path, s)
    assert prune(tmp_path, 0, _complete) == []
    assert len(_names(tmp_path)) == 3
    assert prune(tmp_path / "missing", 2, _complete) == []

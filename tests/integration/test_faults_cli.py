"""Bad inputs at the CLI: `archer-async train` / `resume` / `buffer inspect` answer each with exit code 2 and
one clear line (no traceback), before any process starts, and leave what is valid untouched.

Unit-level coverage lives next to each component (tests/unit/test_config.py: YAML, unknown keys, types;
tests/unit/test_data_loader.py: broken rows; tests/integration/test_learner_checkpoint.py: corrupt shards;
tests/unit/test_buffer_log.py: torn / corrupt segments; tests/integration/test_faults_disk.py: a full disk)."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def _one_clear_line(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("archer-async:")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _tree_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_train_malformed_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("learner:\n  lr: [1e-6\n  batch_groups: 8\n")
    _one_clear_line(_cli("train", str(f), f"run_dir={tmp_path / 'run'}"), "bad.yaml")
    assert not (tmp_path / "run").exists()


def test_train_unknown_key_and_wrong_type(tmp_path):
    _one_clear_line(_cli("train", "learner.no_such_key=1", f"run_dir={tmp_path}/r"), "learner.no_such_key")
    _one_clear_line(_cli("train", "learner.total_steps=many", f"run_dir={tmp_path}/r"), "learner.total_steps")
    f = tmp_path / "typed.yaml"
    f.write_text("actors:\n  num_actors: {a: 1}\n")
    _one_clear_line(_cli("train", str(f), f"run_dir={tmp_path}/r"), "actors.num_actors")
    assert not (tmp_path / "r").exists()


def _tiny_model_copy(dst: Path) -> Path:
    from archer_async.config import TINY_MODEL_DIR

    shutil.copytree(TINY_MODEL_DIR, dst)
    return dst


@pytest.mark.parametrize("damage", ["missing", "no_config", "corrupt_config", "no_weights", "no_tokenizer"])
def test_train_missing_or_corrupt_model_directory(tmp_path, damage):
    model = tmp_path / "model"
    if damage != "missing":
        _tiny_model_copy(model)
    if damage == "no_config":
        (model / "config.json").unlink()
    elif damage == "corrupt_config":
        (model / "config.json").write_text('{"model_type": "qwen2", ')
    elif damage == "no_weights":
        for p in model.glob("*.safetensors"):
            p.unlink()
    elif damage == "no_tokenizer":
        for n in ("tokenizer.json", "tokenizer_config.json"):
            (model / n).unlink()
    line = _one_clear_line(_cli("train", f"model.path={model}", f"run_dir={tmp_path / 'run'}"), "model.path")
    assert str(model) in line
    assert not (tmp_path / "run" / "buffer").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_train_dataset_with_broken_rows(tmp_path):
    data = tmp_path / "train.jsonl"
    good = {"prompt": [{"role": "user", "content": "1+1?"}], "data_source": "tiny_math",
            "reward_model": {"ground_truth": "2"}}
    data.write_text(json.dumps(good) + "\n" + '{"prompt": [{"role": "user"' + "\n")
    line = _one_clear_line(_cli("train", f"data.train_files=[{data}]", f"run_dir={tmp_path / 'run'}"))
    assert "train.jsonl" in line and "2" in line  # file and line number


def _fake_run(tmp_path: Path, step_dir_files: dict) -> Path:
    """A run directory as a crashed run leaves it: resolved config, buffer dir, a checkpoint tree."""
    run = tmp_path / "run"
    r = _cli("train", "--dry-run", f"run_dir={run}")
    assert r.returncode == 0, r.stderr
    run.mkdir()
    (run / "config.resolved.yaml").write_text(r.stdout)
    ck = run / "checkpoints"
    (ck / "step-2").mkdir(parents=True)
    for name, text in step_dir_files.items():
        (ck / "step-2" / name).write_text(text)
    (ck / "latest").write_text("step-2\n")
    (run / "buffer" / "log").mkdir(parents=True)
    return run


@pytest.mark.parametrize("case", ["no_done", "bad_state", "bad_pointer", "no_checkpoint"])
def test_resume_corrupt_checkpoint_directory(tmp_path, case):
    files = {"DONE": json.dumps({"step": 2}), "learner_state.json": json.dumps({"step": 2, "version": 2}),
             ".metadata": "x"}
    if case == "no_done":
        del files["DONE"]
    if case == "bad_state":
        files["learner_state.json"] = '{"step": 2, "vers'
    run = _fake_run(tmp_path, files)
    if case == "bad_pointer":
        (run / "checkpoints" / "latest").write_text("step-9\n")
    if case == "no_checkpoint":
        shutil.rmtree(run / "checkpoints")
    before = _tree_digest(run)
    line = _one_clear_line(_cli("resume", str(run)))
    assert str(run) in line
    assert _tree_digest(run) == before  # nothing valid (or invalid) was touched


def test_resume_not_a_run_directory_and_train_over_a_run(tmp_path):
    _one_clear_line(_cli("resume", str(tmp_path / "nothing")), "not a run directory")
    run = _fake_run(tmp_path, {"DONE": "{}", "learner_state.json": "{}", ".metadata": "x"})
    before = _tree_digest(run)
    _one_clear_line(_cli("train", f"run_dir={run}"), "already holds a run", "resume")
    assert _tree_digest(run) == before


def test_buffer_inspect_corrupt_and_truncated_segment(tmp_path):
    """A torn tail is reported (repaired at the next start, tests/unit/test_buffer_log.py); a corrupt sealed
    segment is an error naming it, and inspect never modifies the log."""
    from archer_async.config import BufferConfig
    from buffer.store import BufferStore
    from tests.helpers.buffer import make_group, payload_meta

    log_dir = tmp_path / "buffer" / "log"
    store = BufferStore(log_dir, BufferConfig(segment_bytes=4096), 8)
    for i in range(12):
        store.ingest([payload_meta(make_group(i, tokens=100))])
        store.commit()
    store.ingest([payload_meta(make_group(99, tokens=10))])
    store.commit()  # not closed: the process "crashed" with an active segment
    segs = sorted(log_dir.glob("*.seg"))
    active = next(log_dir.glob("*.open"))
    assert len(segs) >= 2
    active.write_bytes(active.read_bytes()[:-7])  # truncated mid-record
    before = _tree_digest(tmp_path)
    r = _cli("buffer", "inspect", str(tmp_path))
    assert r.returncode == 0 and "TORN TAIL" in r.stdout, r.stdout + r.stderr
    assert _tree_digest(tmp_path) == before
    sealed = segs[0]
    data = bytearray(sealed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    sealed.write_bytes(bytes(data))
    _one_clear_line(_cli("buffer", "inspect", str(tmp_path)), sealed.name)


def test_resume_with_corrupt_buffer_segment(tmp_path):
    """A sealed buffer segment with a flipped byte: resume stops before any process starts, naming the
    segment, and leaves the run directory as it was (the log needs a human, nothing is truncated)."""
    from archer_async.config import BufferConfig
    from buffer.store import BufferStore
    from tests.helpers.buffer import make_group, payload_meta

    run = _fake_run(tmp_path, {"DONE": json.dumps({"step": 2}),
                               "learner_state.json": json.dumps({"step": 2, "version": 2}), ".metadata": "x"})
    store = BufferStore(run / "buffer" / "log", BufferConfig(segment_bytes=4096), 8)
    for i in range(12):
        store.ingest([payload_meta(make_group(i, tokens=100))])
        store.commit()
    store.close()
    sealed = sorted((run / "buffer" / "log").glob("*.seg"))[0]
    data = bytearray(sealed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    sealed.write_bytes(bytes(data))
    before = _tree_digest(run)
    _one_clear_line(_cli("resume", str(run)), sealed.name, "cannot be replayed")
    assert _tree_digest(run) == before

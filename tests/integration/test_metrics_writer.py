"""MetricsWriter / readers of metrics.jsonl and actor_metrics.jsonl, run status, wandb forwarding."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from archer_async.config import UserError, WandbConfig
from archer_async.metrics import (ACTOR_METRICS_FILE, METRIC_NAMES, METRICS_FILE, ActorMetricsWriter,
                                  MetricsWriter, append_actor_metrics, read_actor_metrics, read_metrics,
                                  read_run_status, staleness_histogram, write_run_status)

# docs/architecture.md section 7, in its order, then the buffer's drops per step by reason and the actors'
# idle fraction: one name set for metrics.jsonl, wandb and the dashboard.
SPEC_NAMES = """step version reward/mean actor/tokens_per_s learner/tokens_per_s buffer/size buffer/dropped_stale
staleness/mean staleness/max sync/seconds learner/wait_for_data_s actor/wait_for_weights_s loss/pg loss/kl_low
loss/clipfrac_low loss/clipfrac_high is/rho_mean is/rho_max is/truncated_frac is/ess is/mismatch_kl entropy/mean
groups/solve_none groups/solve_all reward/infra_errors grad_norm lr eval/accuracy eval/pass_at_k
groups/dropped_solve_none groups/dropped_solve_all groups/dropped_stale groups/dropped_infra_error
actor/idle_frac""".split()


def test_metric_names_are_the_spec_list():
    assert list(METRIC_NAMES) == SPEC_NAMES
    assert len(set(METRIC_NAMES)) == len(METRIC_NAMES)


def test_writer_appends_one_json_line_per_step_and_cleans_values(tmp_path):
    with MetricsWriter(tmp_path, None) as w:
        w.log({"step": 1, "version": 1, "reward/mean": np.float32(0.5), "loss/pg": float("nan"),
               "staleness/hist": {0: 3, 2: np.int64(1)}, "is/rho_max": float("inf")})
        w.log({"step": 2, "version": 2, "reward/mean": 0.75, "time": 123.0})
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["reward/mean"] == 0.5 and isinstance(first["time"], float)
    assert first["loss/pg"] is None and first["is/rho_max"] is None  # JSON has no NaN / inf
    assert first["staleness/hist"] == {"0": 3, "2": 1}
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["time"] == 123.0
    assert [r["step"] for r in read_metrics(tmp_path, since=1)] == [2]
    with pytest.raises(ValueError, match="step"):
        MetricsWriter(tmp_path, None).log({"version": 3})


def test_writer_is_line_buffered_before_close(tmp_path):
    w = MetricsWriter(tmp_path, None)
    w.log({"step": 1})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]  # visible to readers without close()
    w.close()


def test_torn_last_line_is_skipped_by_readers_and_cut_by_the_next_writer(tmp_path):
    with MetricsWriter(tmp_path, None) as w:
        for s in (1, 2):
            w.log({"step": s, "reward/mean": 0.1 * s})
    path = tmp_path / METRICS_FILE
    with open(path, "a") as f:
        f.write('{"step": 3, "reward/me')  # a crash mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    with MetricsWriter(tmp_path, None) as w:
        w.log({"step": 3, "reward/mean": 0.3})
    text = path.read_text()
    assert text.endswith("\n") and "reward/me\"" not in text and '"reward/me' not in text.replace('"reward/mean', "")
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_corrupt_middle_line_and_missing_file_do_not_break_readers(tmp_path):
    assert read_metrics(tmp_path) == [] and read_actor_metrics(tmp_path) == []
    (tmp_path / METRICS_FILE).write_text('{"step": 1}\nnot json\n\n[1, 2]\n{"step": 2}\n')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_resume_step_drops_rows_that_will_be_trained_again(tmp_path):
    with MetricsWriter(tmp_path, None) as w:
        for s in range(1, 8):
            w.log({"step": s})
    with MetricsWriter(tmp_path, None, resume_step=4) as w:  # checkpoint at step 4
        w.log({"step": 5, "version": 5})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    assert not (tmp_path / (METRICS_FILE + ".tmp")).exists()


def test_staleness_histogram():
    assert staleness_histogram([0, 1, 1, 3, 0, 1]) == {"0": 2, "1": 3, "3": 1}
    assert list(staleness_histogram([2, 0, 1])) == ["0", "1", "2"]
    assert staleness_histogram([]) == {}


def _actor_proc(run_dir: str, actor_id: int, n: int) -> None:
    rep = ActorMetricsWriter(run_dir, actor_id)
    for i in range(n):
        rep.log(tokens_per_s=100.0 + i, wait_for_weights_s=0.01, in_flight=i % 7, versions={i // 10: 3},
                version=i // 10, note="x" * (i % 50))


def test_actor_metrics_concurrent_appends_from_processes_do_not_interleave(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_actor_proc, args=(str(tmp_path), a, 300)) for a in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    lines = (tmp_path / ACTOR_METRICS_FILE).read_text().splitlines()
    assert len(lines) == 1200
    rows = [json.loads(line) for line in lines]  # every line is whole JSON
    for a in range(4):
        mine = [r for r in rows if r["actor_id"] == a]
        assert [r["actor/tokens_per_s"] for r in mine] == [100.0 + i for i in range(300)]
    r = rows[-1]
    assert set(r) >= {"actor_id", "time", "version", "actor/tokens_per_s", "actor/wait_for_weights_s",
                      "actor/in_flight", "actor/versions", "actor/note"}
    assert isinstance(r["actor/versions"], dict) and all(isinstance(k, str) for k in r["actor/versions"])
    assert len(read_actor_metrics(tmp_path, since=1000)) == 200
    with pytest.raises(ValueError, match="actor_id"):
        append_actor_metrics(tmp_path, {"actor/tokens_per_s": 1.0})


def test_run_status_keeps_start_time_and_extras(tmp_path):
    assert read_run_status(tmp_path) == {}
    s1 = write_run_status(tmp_path, "running", total_steps=30)
    s2 = write_run_status(tmp_path, "finished")
    assert s2["started_at"] == s1["started_at"] and s2["total_steps"] == 30 and s2["ended_at"] >= s1["started_at"]
    s3 = write_run_status(tmp_path, "running")  # resumed
    assert "ended_at" not in s3 and s3["started_at"] == s1["started_at"]
    assert read_run_status(tmp_path)["state"] == "running"
    with pytest.raises(ValueError):
        write_run_status(tmp_path, "paused")


class FakeWandbRun:
    def __init__(self, **kwargs):
        self.init_kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


def _fake_wandb_module(runs: list) -> types.ModuleType:
    mod = types.ModuleType("wandb")
    mod.Settings = lambda **kw: kw

    class FakeHistogram:
        def __init__(self, np_histogram):
            self.counts, self.edges = np_histogram

    mod.Histogram = FakeHistogram

    def init(**kwargs):
        runs.append(FakeWandbRun(**kwargs))
        return runs[-1]

    mod.init = init
    return mod


def test_rows_are_forwarded_to_wandb_with_the_same_names(tmp_path, monkeypatch):
    runs: list[FakeWandbRun] = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb_module(runs))
    cfg = WandbConfig(mode="offline", project="p", name=None)
    with MetricsWriter(tmp_path / "run-a", cfg) as w:
        w.log({"step": 4, "reward/mean": 0.5, "loss/pg": math.nan, "staleness/hist": {"0": 5, "2": 1}})
    run = runs[0]
    assert run.finished
    assert run.init_kwargs["mode"] == "offline" and run.init_kwargs["dir"] == str(tmp_path / "run-a")
    run_id = run.init_kwargs["id"]
    assert run.init_kwargs["name"] == "run-a" and len(run_id) == 8 and run_id.isalnum()
    step, data = run.logged[0]
    assert step == 4 and data["reward/mean"] == 0.5 and "loss/pg" not in data and "step" not in data
    hist = data["staleness/hist"]
    assert list(hist.counts) == [5, 0, 1] and list(hist.edges) == [-0.5, 0.5, 1.5, 2.5]
    assert (tmp_path / "run-a" / "wandb" / "run_id").read_text().strip() == run_id


def test_wandb_disabled_is_never_imported(tmp_path):
    rd = str(tmp_path)
    code = ("import sys\n"
            "from archer_async.config import WandbConfig\n"
            "from archer_async.metrics import MetricsWriter\n"
            f"w = MetricsWriter({rd!r}, WandbConfig(mode='disabled'))\n"
            "w.log({'step': 1})\n"
            "w.close()\n"
            f"MetricsWriter({rd!r}, None).close()\n"
            "assert 'wandb' not in sys.modules, 'wandb was imported'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]


@pytest.mark.integration
def test_real_wandb_offline_run_under_run_dir_and_resume_keeps_the_id(tmp_path):
    cfg = WandbConfig(mode="offline")
    with MetricsWriter(tmp_path, cfg) as w:
        for s in range(1, 4):
            w.log({"step": s, "reward/mean": 0.1 * s, "staleness/hist": {"0": 4, "1": 2}})
    run_id = (tmp_path / "wandb" / "run_id").read_text().strip()
    files = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert files and files[0].stat().st_size > 0
    with MetricsWriter(tmp_path, cfg, resume_step=2) as w:
        w.log({"step": 3, "reward/mean": 0.3})
    assert (tmp_path / "wandb" / "run_id").read_text().strip() == run_id
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert Path(tmp_path / METRICS_FILE).read_text().count("\n") == 3


def test_keys_outside_the_name_set_are_written_and_warned_once(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="archer_async.metrics"), MetricsWriter(tmp_path, None) as w:
        w.log({"step": 1, "reward/mean": 0.1, "rewrad/mean": 0.1, "loss/kl_high": 0.0, "tokens/low": 3})
        w.log({"step": 2, "rewrad/mean": 0.2})
    warnings = [r.getMessage() for r in caplog.records if "rewrad/mean" in r.getMessage()]
    assert len(warnings) == 1 and "reward/mean" not in warnings[0]
    assert [r["rewrad/mean"] for r in read_metrics(tmp_path)] == [0.1, 0.2]
    assert not [r for r in caplog.records if "kl_high" in r.getMessage() or "tokens/low" in r.getMessage()]


def test_wandb_that_cannot_start_is_a_user_error(tmp_path, monkeypatch):
    mod = _fake_wandb_module([])

    def failing_init(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)")

    mod.init = failing_init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    with pytest.raises(UserError, match="wandb.mode=online.*WANDB_API_KEY"):
        MetricsWriter(tmp_path, WandbConfig(mode="online"))

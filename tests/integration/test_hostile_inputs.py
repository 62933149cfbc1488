"""Hostile input: every refused input is exit code 2, exactly one line on stderr naming the key or file,
no traceback, and nothing started (no run directory). Config, data files, model directory, damaged
run directories, `score`, `eval` and the dashboard, each probed as a user would through the CLI."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from archer_async.config import TINY_MODEL_DIR
from archer_async.taskgen import generate_tasks, write_jsonl

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEEP = "[" * 100_000 + "]" * 100_000
BIG_INT = "9" * 5000


def _cli(args: list[str], timeout_s: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s, env=env, cwd=ROOT)


def _assert_refused(r: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("archer-async: "), r.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Every hostile file the probes name, built once."""
    d = tmp_path_factory.mktemp("hostile")
    train, evals = generate_tasks(40, 8, seed=0)
    write_jsonl(train, d / "train.jsonl")
    write_jsonl(evals, d / "eval.jsonl")
    write_jsonl(train[:1], d / "one.jsonl")
    (d / "empty.jsonl").write_text("")
    row = json.dumps(train[0])
    (d / "badutf8.jsonl").write_bytes(row.encode() + b"\n" + row.encode().replace(b'"prompt"', b'"pr\xffompt"') + b"\n")
    (d / "deep.jsonl").write_text(row + "\n" + row[:-1] + f', "x": {DEEP}}}\n')
    (d / "bigint.jsonl").write_text(row[:-1] + f', "x": {BIG_INT}}}\n')
    (d / "unknown_source.jsonl").write_text(row.replace(f'"{train[0]["data_source"]}"', '"no_such_grader"') + "\n")
    (d / "badutf8.yaml").write_bytes(b"learner:\n  lr: \"\xff\xfe\"\n")
    (d / "deep.yaml").write_text(f"learner: {DEEP}\n")
    model = d / "model"
    shutil.copytree(TINY_MODEL_DIR, model)
    weights = next(model.glob("*.safetensors"))
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 1000)
    # score inputs: graded rows plus a `response`
    scored = dict(train[0], response="\\boxed{%s}" % train[0]["reward_model"]["ground_truth"])
    line = json.dumps(scored)
    (d / "score.jsonl").write_text(line + "\n")
    (d / "score_badutf8.jsonl").write_bytes(line.encode().replace(b"boxed", b"box\xffed") + b"\n")
    (d / "score_bigint.jsonl").write_text(line[:-1] + f', "x": {BIG_INT}}}\n')
    (d / "score_deep.jsonl").write_text(line[:-1] + f', "x": {DEEP}}}\n')
    surrogate = line.replace('"response": "', '"response": "\\ud800 ')
    (d / "score_surrogate.jsonl").write_text(line + "\n" + surrogate + "\n" + line + "\n")
    (d / "a_file").write_text("")
    return {p.name: p for p in d.iterdir()} | {"dir": d}


def _damaged_run(d: Path, latest: bytes, state: bytes) -> Path:
    """A run directory whose checkpoint pointer or state is damaged."""
    rd = d / f"run-{abs(hash((latest, state)))}"
    step = rd / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    r = _cli(["train", f"run_dir={rd}", "--dry-run"])
    (rd / "config.resolved.yaml").write_text(r.stdout)
    (rd / "checkpoints" / "latest").write_bytes(latest)
    (step / "DONE").write_text("{}")
    (step / "learner_state.json").write_bytes(state)
    return rd


TRAIN_PROBES = [  # (id, args (with {name} for a built file), needles in the one error line)
    ("mini_batch_groups=0", ["learner.mini_batch_groups=0"], ["learner.mini_batch_groups = 0: must be >= 1"]),
    ("total_steps=0", ["learner.total_steps=0"], ["learner.total_steps = 0: must be >= 1"]),
    ("capacity=0", ["buffer.capacity=0"], ["buffer.capacity = 0"]),
    ("num_actors=0", ["actors.num_actors=0"], ["actors.num_actors = 0"]),
    ("port=70000", ["dashboard.port=70000"], ["dashboard.port = 70000: must be <= 65535"]),
    ("lr=nan", ["learner.lr=.nan"], ["learner.lr = nan: must be a finite number"]),
    ("temperature=inf", ["actors.temperature=.inf"], ["actors.temperature = inf: must be a finite number"]),
    ("override-deep", [f"learner.lr={DEEP[:3000]}{DEEP[-3000:]}"], ["learner.lr"]),
    ("yaml-badutf8", ["{badutf8.yaml}"], ["{badutf8.yaml}", "not UTF-8"]),
    ("yaml-deep", ["{deep.yaml}"], ["{deep.yaml}", "nested too deeply"]),
    ("batch>capacity", ["learner.batch_groups=32", "learner.mini_batch_groups=32", "buffer.capacity=16"],
     ["learner.batch_groups=32 > buffer.capacity=16"]),
    ("one-sample-filtered", ["actors.samples_per_prompt=1"], ["actors.samples_per_prompt=1", "no signal"]),
    ("prompts-too-long", ["data.max_prompt_length=5"], ["data.max_prompt_length=5", "every one of the"]),
    ("rows<actors", ["data.train_files=[{one.jsonl}]"], ["1 training row(s) for actors.num_actors=2"]),
    ("empty-eval", ["data.eval_files=[{empty.jsonl}]"], ["data.eval_files", "no held-out rows", "launch.eval_every=0"]),
    ("unknown-data-source", ["data.train_files=[{unknown_source.jsonl}]"], ["{unknown_source.jsonl}:1", "no_such_grader"]),
    ("data-badutf8", ["data.train_files=[{badutf8.jsonl}]"], ["{badutf8.jsonl}:2", "not UTF-8"]),
    ("data-deep", ["data.train_files=[{deep.jsonl}]"], ["{deep.jsonl}:2", "nested too deeply"]),
    ("data-bigint", ["data.train_files=[{bigint.jsonl}]"], ["{bigint.jsonl}:1", "4300 digits"]),
    ("truncated-safetensors", ["model.path={model}"], ["model.safetensors", "truncated"]),
]


def _fill(items: list[str], files: dict) -> list[str]:
    return [s.format(**{k.replace(".", "_"): v for k, v in files.items()}) if "{" in s and "[[[" not in s else s
            for s in (i.replace(".yaml}", "_yaml}").replace(".jsonl}", "_jsonl}") for i in items)]


@pytest.mark.parametrize("args,needles", [p[1:] for p in TRAIN_PROBES], ids=[p[0] for p in TRAIN_PROBES])
def test_train_refuses_with_one_line(files, tmp_path, args, needles):
    rd = tmp_path / "run"
    files = {**files, "model": files["dir"] / "model"}
    r = _cli(["train", f"run_dir={rd}", *_fill(args, files)])
    _assert_refused(r, *_fill(needles, files))
    assert not rd.exists()


@pytest.mark.parametrize("latest,state,needle", [
    (b"step-2", b"[]", "step-2/learner_state.json: corrupt checkpoint state"),
    (b"step-2", b'{"step": "2", "version": 2}', "step-2/learner_state.json: corrupt checkpoint state"),
    (b"step-2", b"\xff\xfe", "step-2/learner_state.json: corrupt checkpoint state"),
    (b"step-\xff", b"{}", "checkpoints/latest: corrupt (not UTF-8"),
    (b"../../x", b"{}", "checkpoints/latest: corrupt"),
], ids=["state-list", "state-str-step", "state-badutf8", "latest-badutf8", "latest-escapes"])
def test_resume_of_a_damaged_run_refuses_with_one_line(files, latest, state, needle):
    rd = _damaged_run(files["dir"], latest, state)
    _assert_refused(_cli(["resume", str(rd)]), str(rd), needle)
    assert not (rd / "status.json").exists()


SCORE_PROBES = [
    ("out-is-dir", ["{score.jsonl}", "-o", "{dir}"], ["-o", "is a directory"]),
    ("out-under-file", ["{score.jsonl}", "-o", "{a_file}/out.jsonl"], ["-o", "not a directory"]),
    ("out-is-input", ["{score.jsonl}", "-o", "{score.jsonl}"], ["is the input file"]),
    ("timeout-inf", ["{score.jsonl}", "--timeout", "inf"], ["--timeout", "inf"]),
    ("timeout-nan", ["{score.jsonl}", "--timeout", "nan"], ["--timeout", "nan"]),
    ("input-badutf8", ["{score_badutf8.jsonl}"], ["{score_badutf8.jsonl}:1", "not UTF-8"]),
    ("input-bigint", ["{score_bigint.jsonl}"], ["{score_bigint.jsonl}:1", "4300 digits"]),
    ("input-deep", ["{score_deep.jsonl}"], ["{score_deep.jsonl}:1", "nested too deeply"]),
]


@pytest.mark.parametrize("args,needles", [p[1:] for p in SCORE_PROBES], ids=[p[0] for p in SCORE_PROBES])
def test_score_refuses_before_grading(files, args, needles):
    _assert_refused(_cli(["score", "--sandbox", "none", *_fill(args, files)]), *_fill(needles, files))


def test_score_keeps_a_lone_surrogate_and_the_batch(files, tmp_path):
    out = tmp_path / "scored.jsonl"
    r = _cli(["score", "--sandbox", "none", str(files["score_surrogate.jsonl"]), "-o", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(ln) for ln in out.read_text(encoding="utf-8").splitlines()]
    assert [row["status"] for row in rows] == ["pass", rows[1]["status"], "pass"] and len(rows) == 3
    assert rows[1]["response"].startswith("\ud800")  # written escaped, read back as it came


def test_eval_and_dashboard_refuse_bad_numbers(files):
    _assert_refused(_cli(["eval", "--model", str(TINY_MODEL_DIR), "--data", str(files["eval.jsonl"]),
                          "--temperature", "inf"]), "--temperature")
    _assert_refused(_cli(["dashboard", str(files["dir"]), "--port", "70000"]), "port 70000")


# ---- the dashboard's server, in process ---------------------------------------------------------

@pytest.fixture
def dashboard(tmp_path, monkeypatch):
    from launch import dashboard as dash

    monkeypatch.setattr(dash._Handler, "timeout", 1.0)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1e999, "kl": -1e999, "x": NaN}\n{"step": 2, "loss": 0.5}\n')
    server, _ = dash.start_dashboard(tmp_path, "127.0.0.1", 0)
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _get(port: int, path: str, host: str) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.putrequest("GET", path, skip_host=True)
    c.putheader("Host", host)
    c.endheaders()
    r = c.getresponse()
    return r.status, r.read()


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.nip.io:{port}", ""])
def test_dashboard_refuses_a_foreign_host_header(dashboard, host):
    status, body = _get(dashboard, "/api/run", host.format(port=dashboard))
    assert status == 421 and b"run_dir" not in body


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST", "127.0.0.1"])
def test_dashboard_serves_its_own_host(dashboard, host):
    assert _get(dashboard, "/api/run", host.format(port=dashboard))[0] == 200


def test_dashboard_non_finite_metrics_are_null_not_an_empty_api(dashboard):
    status, body = _get(dashboard, "/api/metrics", f"127.0.0.1:{dashboard}")
    assert status == 200
    assert json.loads(body)["rows"] == [{"step": 1, "loss": None, "kl": None, "x": None}, {"step": 2, "loss": 0.5}]


def test_dashboard_drops_a_half_open_connection(dashboard):
    with socket.create_connection(("127.0.0.1", dashboard), timeout=10) as s:
        s.sendall(b"GET /api/run HTTP/1.1\r\n")  # never finishes its headers
        t0 = time.monotonic()
        assert s.recv(100) == b""  # the server closed it
        assert time.monotonic() - t0 < 5


# ---- several runs: a request picks a run by index, never by path -----------------------------------

@pytest.fixture
def two_runs(tmp_path, monkeypatch):
    from launch import dashboard as dash

    monkeypatch.setattr(dash._Handler, "timeout", 1.0)
    (tmp_path / "secret.txt").write_text("SECRET-OUTSIDE")
    for name in ("run-a", "run-b", "not-given"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps({"step": 1, "who": f"ROW-{name}"}) + "\n")
    (tmp_path / "run-a" / "config.resolved.yaml").write_text("learner: {lr: 0.001}\n")
    server, _ = dash.start_dashboard([tmp_path / "run-a", tmp_path / "run-b"], "127.0.0.1", 0)
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("path", [
    "/api/metrics?run=-1", "/api/metrics?run=2", "/api/metrics?run=../not-given", "/api/metrics?run=%2e%2e",
    "/api/metrics?run=1%00", "/api/metrics?run=+1", "/api/metrics?run=1_0", "/api/metrics?run=0x1",
    "/api/metrics?run=0&run=1", "/api/run?run=not-given", "/api/actors?run=99999999999999999999",
    "/api/metrics/../../secret.txt", "/../secret.txt", "/%2e%2e/secret.txt", "/api/../../not-given/metrics.jsonl",
    "/compare.js/../../secret.txt", "/run-a/metrics.jsonl", "/metrics.jsonl", "/config.resolved.yaml"])
def test_dashboard_of_several_runs_reads_only_their_files(two_runs, path):
    status, body = _get(two_runs, path, f"127.0.0.1:{two_runs}")
    assert status in (400, 404) and b"SECRET" not in body and b"ROW-" not in body, (status, body[:200])


def test_dashboard_of_several_runs_serves_each_given_run(two_runs):
    host = f"127.0.0.1:{two_runs}"
    rows = [json.loads(_get(two_runs, f"/api/metrics?run={i}", host)[1])["rows"] for i in (0, 1)]
    assert rows == [[{"step": 1, "who": "ROW-run-a"}], [{"step": 1, "who": "ROW-run-b"}]]
    assert json.loads(_get(two_runs, "/api/metrics", host)[1])["rows"] == rows[0]  # no run=: the first
    assert b"not-given" not in _get(two_runs, "/api/runs", host)[1]


def test_dashboard_of_several_runs_refuses_a_bad_run_dir_up_front(tmp_path):
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "no-metrics").mkdir()
    for bad, needle in (("gone", "run directory not found"), ("no-metrics", "no metrics.jsonl")):
        line = _assert_refused(_cli(["dashboard", str(tmp_path / "good"), str(tmp_path / bad), "--port", "0"]),
                               needle, str(tmp_path / bad))
        assert str(tmp_path / "good") not in line, line  # names the bad directory only

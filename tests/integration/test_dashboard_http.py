"""Dashboard HTTP server on 127.0.0.1 (free port): page, incremental JSON endpoints, run summary, CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from launch.cli import main as cli_main
from archer_async.config import UserError
from archer_async.metrics import (ACTOR_METRICS_FILE, METRICS_FILE, MetricsWriter, append_actor_metrics,
                                  write_run_status)
from launch.dashboard import start_dashboard

ROOT = Path(__file__).resolve().parents[2]


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def get_json(url: str) -> dict:
    code, body, ctype = get(url)
    assert code == 200 and ctype == "application/json", (code, body)
    return json.loads(body)


@pytest.fixture
def served(tmp_path):
    run_dir = tmp_path / "test-run-dir"  # test data
    run_dir.mkdir()
    server, url = start_dashboard(run_dir, "127.0.0.1", 0)
    yield run_dir, url
    server.shutdown()
    server.server_close()


def test_start_dashboard_binds_loopback_free_port_and_serves_the_self_contained_page(served):
    run_dir, url = served
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url) and not url.endswith(":0/")
    code, body, ctype = get(url)
    assert code == 200 and ctype.startswith("text/html")
    html = body.decode()
    assert "<canvas" in html or "createElement(\"section\")" in html
    assert "/api/metrics" in html and "/api/actors" in html and "/api/run" in html
    # no CDN or any other remote resource: the page must work offline
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "https://" not in html and "http://" not in html
    assert get(url + "nope")[0] == 404
    assert get(url + "api/metrics?since=abc")[0] == 400


def test_metrics_endpoint_is_incremental_and_tolerates_a_torn_line(served):
    run_dir, url = served
    first = get_json(url + "api/metrics?since=0&epoch=")
    assert first["rows"] == [] and first["next"] == 0
    with MetricsWriter(run_dir, None) as w:
        for s in (1, 2, 3):
            w.log({"step": s, "version": s, "reward/mean": s / 10})
    r = get_json(url + "api/metrics?since=0&epoch=")
    assert r["reset"] and [x["step"] for x in r["rows"]] == [1, 2, 3] and r["next"] == 3
    epoch = r["epoch"]
    path = run_dir / METRICS_FILE
    with open(path, "a") as f:
        f.write(json.dumps({"step": 4}) + "\n" + json.dumps({"step": 5, "loss/pg": 0.1})[:-3])  # torn
    r = get_json(url + f"api/metrics?since=3&epoch={epoch}")
    assert not r["reset"] and [x["step"] for x in r["rows"]] == [4] and r["next"] == 4 and r["epoch"] == epoch
    with open(path, "a") as f:
        f.write('.1}\n{"step": 6, "loss/pg": NaN}\n')  # the torn line completes; a NaN from another tool
    r = get_json(url + f"api/metrics?since=4&epoch={epoch}")
    assert [x["step"] for x in r["rows"]] == [5, 6] and r["rows"][1]["loss/pg"] is None
    assert get_json(url + f"api/metrics?since=6&epoch={epoch}")["rows"] == []
    # a client that is ahead (or holds another epoch) gets everything again
    r = get_json(url + f"api/metrics?since=99&epoch={epoch}")
    assert r["reset"] and len(r["rows"]) == 6
    # resume rewrites the file: new epoch, client resets
    MetricsWriter(run_dir, None, resume_step=2).close()
    r = get_json(url + f"api/metrics?since=6&epoch={epoch}")
    assert r["reset"] and r["epoch"] != epoch and [x["step"] for x in r["rows"]] == [1, 2]


def test_actors_endpoint(served):
    run_dir, url = served
    for i in range(4):
        append_actor_metrics(run_dir, {"actor_id": i % 2, "actor/tokens_per_s": 100.0 * i,
                                       "actor/in_flight": i, "actor/versions": {"3": i}})
    r = get_json(url + "api/actors?since=0&epoch=")
    assert [x["actor_id"] for x in r["rows"]] == [0, 1, 0, 1] and r["next"] == 4
    append_actor_metrics(run_dir, {"actor_id": 1, "actor/tokens_per_s": 7.0})
    r2 = get_json(url + f"api/actors?since=4&epoch={r['epoch']}")
    assert [x["actor/tokens_per_s"] for x in r2["rows"]] == [7.0] and not r2["reset"]
    assert (run_dir / ACTOR_METRICS_FILE).exists()


def test_run_summary_status_and_config(served):
    run_dir, url = served
    s = get_json(url + "api/run")
    assert s["status"] == "idle" and s["step"] is None and s["config"] == []
    assert s["run_dir"] == str(run_dir.resolve()) and s["name"] == "test-run-dir"
    (run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(
        {"learner": {"total_steps": 30, "num_ranks": 2}, "actors": {"num_actors": 4}, "launch": {"mode": "async"}}))
    write_run_status(run_dir, "running")
    with MetricsWriter(run_dir, None) as w:
        w.log({"step": 7, "version": 7})
    s = get_json(url + "api/run")
    assert s["status"] == "live" and s["step"] == 7 and s["version"] == 7 and s["total_steps"] == 30
    assert s["elapsed_s"] >= 0 and s["rows"] == 1
    cfg = {c["key"]: c["value"] for c in s["config"]}
    assert cfg["actors.num_actors"] == 4 and cfg["launch.mode"] == "async" and cfg["learner.num_ranks"] == 2
    time.sleep(0.05)
    write_run_status(run_dir, "finished")
    s2 = get_json(url + "api/run")
    assert s2["status"] == "finished"
    assert get_json(url + "api/run")["elapsed_s"] == s2["elapsed_s"]  # a finished run's clock stops
    # a "running" status whose process is gone (kill -9 of the launcher) shows as stopped
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_run_status(run_dir, "running", pid=dead.pid, error=None)
    assert get_json(url + "api/run")["status"] == "stopped"
    write_run_status(run_dir, "failed", pid=os.getpid(), error="learner rank 1 died")
    s3 = get_json(url + "api/run")
    assert s3["status"] == "failed" and s3["error"] == "learner rank 1 died"


def test_missing_run_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="run directory not found"):
        start_dashboard(tmp_path / "no-such-run", "127.0.0.1", 0)
    assert cli_main(["dashboard", str(tmp_path / "no-such-run"), "--port", "0"]) == 2


def test_busy_port_is_a_user_error(served, tmp_path):
    run_dir, url = served
    port = int(url.rsplit(":", 1)[1].strip("/"))
    with pytest.raises(UserError, match=f"127.0.0.1:{port}"):
        start_dashboard(run_dir, "127.0.0.1", port)
    server, url2 = start_dashboard(run_dir, "127.0.0.1", port, fallback_to_free_port=True)
    try:
        assert url2 != url and get(url2)[0] == 200
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.integration
def test_cli_dashboard_command_serves_a_finished_run(tmp_path):
    run_dir = tmp_path / "finished-test-run"
    with MetricsWriter(run_dir, None) as w:
        w.log({"step": 1, "version": 1, "reward/mean": 0.25})
    write_run_status(run_dir, "finished")
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "dashboard", str(run_dir), "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        s = get_json(m.group(1) + "api/run")
        assert s["status"] == "finished" and s["step"] == 1
        assert get_json(m.group(1) + "api/metrics?since=0")["rows"][0]["reward/mean"] == 0.25
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---- several runs (a sweep) on one dashboard --------------------------------------------------------

def _write_rows(run_dir: Path, rows: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / METRICS_FILE, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_several_runs_each_served_by_index_with_its_own_label_and_epoch(tmp_path):
    a, b = tmp_path / "sweep" / "lr-1e-4", tmp_path / "sweep" / "lr-3e-4"  # test data
    _write_rows(a, [{"step": s, "time": 100.0 + s, "reward/mean": s / 10} for s in (1, 2, 3)])
    _write_rows(b, [{"step": s, "time": 200.0 + s, "reward/mean": s / 5} for s in (1, 2)])
    append_actor_metrics(b, {"actor_id": 0, "actor/tokens_per_s": 512.0})
    (b / "config.resolved.yaml").write_text(yaml.safe_dump({"learner": {"lr": 3e-4, "total_steps": 9}}))
    server, url = start_dashboard([a, b], "127.0.0.1", 0)
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url)
        runs = get_json(url + "api/runs")["runs"]
        assert [(r["index"], r["label"], r["run_dir"]) for r in runs] == [
            (0, "lr-1e-4", str(a.resolve())), (1, "lr-3e-4", str(b.resolve()))]
        ma, mb = (get_json(url + f"api/metrics?run={i}&since=0&epoch=") for i in (0, 1))
        assert [r["reward/mean"] for r in ma["rows"]] == [0.1, 0.2, 0.3] and ma["next"] == 3
        assert [r["reward/mean"] for r in mb["rows"]] == [0.2, 0.4] and mb["next"] == 2
        # one run grows, the other's incremental answer stays empty
        _write_rows(b, [{"step": 3, "time": 203.0, "reward/mean": 0.6}])
        assert get_json(url + f"api/metrics?run=0&since=3&epoch={ma['epoch']}")["rows"] == []
        r = get_json(url + f"api/metrics?run=1&since=2&epoch={mb['epoch']}")
        assert not r["reset"] and [x["step"] for x in r["rows"]] == [3]
        assert get_json(url + "api/actors?run=0")["rows"] == []
        assert get_json(url + "api/actors?run=1")["rows"][0]["actor/tokens_per_s"] == 512.0
        s0, s1 = (get_json(url + f"api/run?run={i}") for i in (0, 1))
        assert (s0["label"], s0["step"], s0["total_steps"]) == ("lr-1e-4", 3, None)
        assert (s1["label"], s1["step"], s1["total_steps"]) == ("lr-3e-4", 3, 9)
        assert {c["key"]: c["value"] for c in s1["config"]}["learner.lr"] == 3e-4
        assert get(url + "api/run?run=2")[0] == 404 and get(url + "api/metrics?run=x")[0] == 400
        assert get(url + "compare.js")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_single_run_lists_one_run(served):
    run_dir, url = served
    assert get_json(url + "api/runs")["runs"] == [{"index": 0, "label": "test-run-dir", "name": "test-run-dir",
                                                    "run_dir": str(run_dir.resolve())}]
    assert get(url + "api/metrics?run=1")[0] == 404


def test_run_labels_tell_same_named_runs_apart(tmp_path):
    from launch.dashboard_runs import run_labels

    assert run_labels([tmp_path / "x" / "run", tmp_path / "y" / "run", tmp_path / "z"]) == ["x/run", "y/run", "z"]
    assert run_labels([tmp_path / "run", tmp_path / "run"]) == ["run", "run #2"]
    assert run_labels([tmp_path / "a" / "s" / "r", tmp_path / "b" / "s" / "r"]) == ["a/s/r", "b/s/r"]


@pytest.mark.integration
def test_cli_dashboard_command_serves_two_runs(tmp_path):
    a, b = tmp_path / "x" / "run", tmp_path / "y" / "run"
    _write_rows(a, [{"step": 1, "reward/mean": 0.25}])
    _write_rows(b, [{"step": 1, "reward/mean": 0.5}])
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "dashboard", str(a), str(b), "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert m and "2 runs (x/run, y/run)" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        assert [r["label"] for r in get_json(m.group(1) + "api/runs")["runs"]] == ["x/run", "y/run"]
        assert get_json(m.group(1) + "api/metrics?run=1")["rows"][0]["reward/mean"] == 0.5
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_dashboard_off_loopback_serves_its_data_only_with_its_token(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_run_status(run_dir, "running", total_steps=5)
    # 127.0.0.2: a loopback address the machine answers on, but not one of the token-free bind addresses
    server, url = start_dashboard(run_dir, "127.0.0.2", 0)
    try:
        m = re.fullmatch(r"(http://127\.0\.0\.2:\d+/)\?token=([A-Za-z0-9_-]{32})", url)
        assert m, url
        base, token = m.groups()
        assert get(base + "api/run")[0] == 401
        assert get(base + "api/metrics?since=0")[0] == 401
        assert get(base + "api/run?token=" + "x" * 32)[0] == 401
        assert get_json(base + f"api/run?token={token}")["status"] == "live"
        # the address as printed sets a cookie that the page's own requests carry
        with urllib.request.urlopen(url, timeout=10) as r:
            cookie = r.headers.get("Set-Cookie")
            assert r.status == 200 and b"<html" in r.read().lower()
        port = server.server_address[1]
        assert cookie.startswith(f"archer_dashboard_{port}={token};") and "HttpOnly" in cookie, cookie
        req = urllib.request.Request(base + "api/run", headers={"Cookie": cookie.split(";")[0]})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200 and json.loads(r.read())["status"] == "live"
        bad = urllib.request.Request(base + "api/run", headers={"Cookie": f"archer_dashboard_{port}=nope"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad, timeout=10)
        assert e.value.code == 401
    finally:
        server.shutdown()
        server.server_close()
    # on 127.0.0.1 (the default) no token: the machine's own users only
    server, url = start_dashboard(run_dir, "127.0.0.1", 0)
    try:
        assert "token" not in url and get_json(url + "api/run")["status"] == "live"
    finally:
        server.shutdown()
        server.server_close()

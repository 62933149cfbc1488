"""End to end: one short `archer-async train` run (local Ray cluster, buffer, 2 FSDP2 learner ranks, 2 vLLM
actors, the tiny model) checked from every side, and its live dashboard in headless Chromium.

The run is shared by the tests of this module (module-scoped fixture); its dashboard is loaded while it
trains. A screenshot of the live page is kept as test-artifacts/dashboard_live.png.
"""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path

import pytest
import yaml

from archer_async.metrics import METRIC_NAMES
from tests.helpers.launch import ROOT, TINY, CliRun, new_tag, read_jsonl, wait_no_tagged
from tests.helpers.browser import CANVAS_CHECK, Chromium

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

TOTAL = 4
RETENTION = ["learner.checkpoint_every=1", "learner.keep_checkpoints=2", "learner.export_hf_every=1",
             "learner.keep_hf_exports=2"]
ARTIFACTS = ROOT / "test-artifacts"


def _watch_dashboard(run: CliRun, url: str, profile: Path) -> dict:
    """Load the page while the run trains: plots drawn, then the step moves on. Returns observations."""
    obs: dict = {"url": url}
    chrome = Chromium(profile)
    try:
        chrome.open(url, 1440, 1000)
        chrome.wait_for("+document.body.dataset.renders >= 1 && document.body.dataset.status", timeout=120)
        obs["status"] = chrome.eval("document.body.dataset.status")
        obs["first_step"] = int(chrome.wait_for(
            "+document.body.dataset.step >= 1 && document.body.dataset.step", timeout=400))
        obs["canvases_first"] = chrome.eval(CANVAS_CHECK)
        obs["renders_first"] = int(chrome.eval("document.body.dataset.renders"))
        obs["later_step"] = int(chrome.wait_for(
            f"+document.body.dataset.step > {obs['first_step']} && document.body.dataset.step", timeout=300))
        obs["canvases_later"] = chrome.eval(CANVAS_CHECK)
        obs["renders_later"] = int(chrome.eval("document.body.dataset.renders"))
        height = int(chrome.eval("document.documentElement.scrollHeight"))
        chrome.viewport(1440, height)
        time.sleep(0.5)
        png = base64.b64decode(chrome.call("Page.captureScreenshot", {"format": "png"})["data"])
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "dashboard_live.png").write_bytes(png)
        obs["png_bytes"] = len(png)
        obs["png_ok"] = png[:8] == b"\x89PNG\r\n\x1a\n"
        obs["exceptions"] = list(chrome.exceptions)
    except AssertionError as e:  # reported by the dashboard test; the run itself goes on
        obs["error"] = str(e)
    finally:
        chrome.close()
    return obs


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    run_dir = tmp / "run"
    tag = new_tag("e2e")
    t0 = time.time()
    run = CliRun(["train", f"run_dir={run_dir}", *TINY, *RETENTION], tag, tmp / "train.out")
    try:
        m = run.wait_for_line(r"dashboard: (http://\S+)", timeout_s=420)
        dash = _watch_dashboard(run, m.group(1), tmp / "chrome") if m else {"error": "no dashboard line"}
        rc = run.wait(600)
        seconds = time.time() - t0
        left = wait_no_tagged(tag, 30)
    finally:
        run.close()
    return {"run_dir": run_dir, "rc": rc, "out": run.output(), "dash": dash, "left": left, "seconds": seconds}


def test_run_exits_zero_and_leaves_no_process(e2e_run):
    assert e2e_run["rc"] == 0, e2e_run["out"][-4000:]
    assert not e2e_run["left"], f"processes of the run still alive: {e2e_run['left']}"
    out = e2e_run["out"]
    assert f"step {TOTAL}/{TOTAL}" in out
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/", out)
    status = yaml.safe_load((e2e_run["run_dir"] / "status.json").read_text())
    assert status["state"] == "finished" and status["total_steps"] == TOTAL


def test_metrics_hold_every_metric_name(e2e_run):
    rows = read_jsonl(e2e_run["run_dir"] / "metrics.jsonl")
    steps = [r for r in rows if r["step"] >= 1]
    assert [r["step"] for r in steps] == list(range(1, TOTAL + 1))
    always = [n for n in METRIC_NAMES if not n.startswith("eval/")]
    for r in steps:
        missing = [n for n in always if n not in r]
        assert not missing, f"step {r['step']} lacks {missing}"
        assert isinstance(r["staleness/hist"], dict) and sum(r["staleness/hist"].values()) > 0
    # versions advance with every step (each step applied an optimizer update)
    assert [r["version"] for r in steps] == list(range(1, TOTAL + 1))
    cfg = yaml.safe_load((e2e_run["run_dir"] / "config.resolved.yaml").read_text())
    eta = cfg["buffer"]["max_staleness"]
    assert all(0 <= r["staleness/max"] <= eta for r in steps), [r["staleness/max"] for r in steps]
    assert any(r["staleness/max"] >= 1 for r in steps), "asynchronous run with no stale token at all"
    # eval/* at the start (step 0), every launch.eval_every steps and at the end; nowhere else
    evals = {r["step"]: r for r in rows if "eval/accuracy" in r}
    assert sorted(evals) == [0, 2, 4]
    for r in evals.values():
        assert 0.0 <= r["eval/accuracy"] <= r["eval/pass_at_k"] <= 1.0


def test_actors_weight_versions_advance(e2e_run):
    run_dir = e2e_run["run_dir"]
    rows = read_jsonl(run_dir / "actor_metrics.jsonl")
    for actor in ("actor0", "actor1"):
        versions = [r["version"] for r in rows if r["actor_id"] == actor]
        assert versions, f"{actor} wrote no actor metrics"
        assert versions == sorted(versions), f"{actor} went back in version: {versions}"
        log = (run_dir / "logs" / f"{actor}.log").read_text()
        served = [int(v) for v in re.findall(r"now serving version (\d+)", log)]
        assert served == list(range(0, TOTAL + 1)), f"{actor} served versions {served}"
    assert max(r["version"] for r in rows) >= 2


def test_run_directory_layout(e2e_run):
    run_dir = e2e_run["run_dir"]
    for role in ("driver", "buffer", "learner0", "learner1", "actor0", "actor1"):
        log = run_dir / "logs" / f"{role}.log"
        assert log.is_file() and log.stat().st_size > 0, f"missing or empty {log}"
    driver = (run_dir / "logs" / "driver.log").read_text()
    for role in ("buffer", "learner0", "learner1", "actor0", "actor1"):
        assert re.search(rf"launch: {role} on \S+ \(.*, node [0-9a-f]+\)", driver), f"no placement line for {role}"
    cfg = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
    assert cfg["learner"]["total_steps"] == TOTAL and cfg["actors"]["max_response_length"] == 32
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{TOTAL}" and (run_dir / "checkpoints" / latest / "DONE").is_file()
    # a checkpoint and an HF export every step, the newest two of each kept (the final export included)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-3", "step-4"]
    assert sorted(p.name for p in (run_dir / "hf").iterdir()) == ["step-3", "step-4"]
    assert re.search(r"exported Hugging Face model: \S+/hf/step-2", (run_dir / "logs" / "driver.log").read_text())


def test_hf_export_loads_in_transformers(e2e_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from archer_async.config import TINY_MODEL_DIR

    path = e2e_run["run_dir"] / "hf" / f"step-{TOTAL}"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("What is 2 + 3?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32)
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed, "the exported weights equal the initial model: training changed nothing"


def test_dashboard_of_the_live_run(e2e_run):
    dash = e2e_run["dash"]
    assert "error" not in dash, dash
    assert dash["status"] == "live"
    assert 1 <= dash["first_step"] < dash["later_step"] <= TOTAL
    assert dash["renders_later"] > dash["renders_first"]
    by_id = {c["id"]: c for c in dash["canvases_later"]}
    assert len(by_id) >= 15
    for c in dash["canvases_later"]:
        assert c["drawn"] == "1", c
    for cid in ("cv-tput", "cv-reward", "cv-buffer", "cv-sync"):
        assert by_id[cid]["points"] >= dash["later_step"] and by_id[cid]["ink"] > 500, by_id[cid]
    first = {c["id"]: c for c in dash["canvases_first"]}
    assert by_id["cv-reward"]["points"] > first["cv-reward"]["points"]
    assert dash["png_ok"] and dash["png_bytes"] > 30_000
    assert not dash["exceptions"], dash["exceptions"]

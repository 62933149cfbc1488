"""Headless-Chromium test of the dashboard page: plots are drawn, the page follows new rows.

The run directory is synthetic test data (tests/helpers/browser.py). A full-page screenshot is kept as
test-artifacts/dashboard.png.
"""

from __future__ import annotations

import base64
import random
import time

import pytest
import yaml

from archer_async.metrics import write_run_status
from launch.dashboard import start_dashboard
from tests.helpers.browser import ARTIFACTS, CANVAS_CHECK, NUM_ACTORS, STEP_S, Chromium, write_synthetic_run

@pytest.mark.integration
@pytest.mark.timeout(120)
def test_dashboard_page_draws_plots_and_follows_new_rows(tmp_path):
    run_dir = tmp_path / "synthetic-test-run"  # test data, not a real training run
    run_dir.mkdir()
    rng = random.Random(0)
    t0 = time.time() - 40 * STEP_S
    (run_dir / "config.resolved.yaml").write_text(yaml.safe_dump({
        "launch": {"mode": "async"}, "actors": {"num_actors": NUM_ACTORS, "samples_per_prompt": 8,
                                                "backend": "vllm", "inflight_update": "keep"},
        "learner": {"num_ranks": 2, "batch_groups": 8, "total_steps": 40, "lr": 1e-4},
        "buffer": {"max_staleness": 4}, "loss": {"is_correction": "token_tis"}, "sync": {"backend": "gloo"},
        "model": {"path": "synthetic-test-model"}}))
    status = write_run_status(run_dir, "running", total_steps=40, started_at=t0 - 5)
    assert status["state"] == "running"

    server, url = start_dashboard(run_dir, "127.0.0.1", 0)
    chrome = Chromium(tmp_path / "chrome-profile")
    try:
        # a run that has not logged a step yet: every panel drawn, empty, no script error
        chrome.open(url, 1440, 1000)
        assert chrome.wait_for("+document.body.dataset.renders >= 1 && document.body.dataset.status",
                               timeout=40) == "live"
        empty = chrome.eval(CANVAS_CHECK)
        assert empty and all(c["drawn"] == "1" and c["points"] == 0 for c in empty), empty
        assert chrome.eval("document.body.dataset.step") == "-1"

        # steps 1..30 arrive: the open page picks them up on its next poll
        write_synthetic_run(run_dir, range(1, 31), t0, rng)
        chrome.wait_for("document.body.dataset.step === '30'", timeout=15)
        canvases = chrome.eval(CANVAS_CHECK)
        assert len(canvases) >= 15, canvases
        by_id = {c["id"]: c for c in canvases}
        for c in canvases:
            assert c["drawn"] == "1" and c["w"] > 200 and c["h"] > 100, c
            assert c["ink"] > 500 and c["colors"] > 3, f"canvas {c['id']} looks empty: {c}"
        for cid in ("cv-tput", "cv-buffer", "cv-reward", "cv-entropy", "cv-clip", "cv-rho", "cv-sync", "cv-wait"):
            assert by_id[cid]["points"] >= 30, by_id[cid]
        assert by_id["cv-stale"]["points"] >= 5  # lags 0..4 (eta = 4)
        assert by_id["cv-idle"]["points"] >= 30 and by_id["cv-share"]["points"] >= 30
        assert by_id["cv-groups"]["points"] >= 30 * 4  # the buffer's drops by reason, per step
        assert "% of samples" in chrome.eval("document.getElementById('h-actors').textContent")
        assert by_id["cv-eval"]["points"] == 6  # steps 10, 20, 30 x (avg@K, pass@K)
        assert chrome.eval("document.getElementById('h-version').textContent") == "30"
        assert "actor 2" in chrome.eval("document.getElementById('h-actors').textContent")
        renders = int(chrome.eval("document.body.dataset.renders"))

        # the run goes on: new rows appear in the open page on its next poll
        write_synthetic_run(run_dir, range(31, 41), t0, rng)
        chrome.wait_for("document.body.dataset.step === '40'", timeout=10)
        assert int(chrome.eval("document.body.dataset.renders")) > renders
        assert chrome.eval("+document.getElementById('cv-reward').dataset.points") == 40
        assert chrome.eval("+document.getElementById('cv-eval').dataset.points") == 8
        write_run_status(run_dir, "finished")
        assert chrome.wait_for("document.body.dataset.status === 'finished' && "
                               "document.getElementById('h-status').textContent.trim()") == "finished"

        # full-page screenshot kept as a test artifact
        height = int(chrome.eval("document.documentElement.scrollHeight"))
        chrome.viewport(1440, height)
        time.sleep(0.5)  # resize re-render (debounced 120 ms)
        shot = chrome.call("Page.captureScreenshot", {"format": "png"})
        ARTIFACTS.mkdir(exist_ok=True)
        png = base64.b64decode(shot["data"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
        (ARTIFACTS / "dashboard.png").write_bytes(png)
        assert not chrome.exceptions, chrome.exceptions
    finally:
        chrome.close()
        server.shutdown()
        server.server_close()

"""Headless-Chromium test of `archer-async dashboard RUN_DIR RUN_DIR`: two runs overlaid on the same plots.

The two run directories are synthetic test data (tests/helpers/browser.py), a two-point learning-rate
sweep. A full-page screenshot is saved in the test's tmp dir and kept as test-artifacts/dashboard-compare.png.
"""

from __future__ import annotations

import base64
import json
import random
import time

import pytest
import yaml

from archer_async.metrics import write_run_status
from launch.dashboard import start_dashboard
from tests.helpers.browser import ARTIFACTS, CANVAS_CHECK, STEP_S, Chromium, write_synthetic_run

RUNS = (("sweep-lr1e-4", 1e-4, 30, 1.0), ("sweep-lr2e-4", 2e-4, 20, 2.0))  # name, lr, steps, learning speed

# Decode a PNG in the page and count its distinct colours and the pixels near each of the given colours.
PNG_STATS = """(async (b64, hexes) => {
  const img = new Image(); img.src = "data:image/png;base64," + b64; await img.decode();
  const cv = document.createElement("canvas"); cv.width = img.width; cv.height = img.height;
  const g = cv.getContext("2d"); g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, cv.width, cv.height).data, colors = new Set();
  const want = hexes.map((h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16))), near = want.map(() => 0);
  for (let i = 0; i < d.length; i += 4) {
    colors.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
    want.forEach((c, j) => { if (Math.abs(d[i] - c[0]) + Math.abs(d[i + 1] - c[1]) + Math.abs(d[i + 2] - c[2]) < 24) near[j]++; });
  }
  return {w: img.width, h: img.height, colors: colors.size, near};
})"""


def _write_runs(tmp_path):
    rng, t0, dirs = random.Random(1), time.time() - 40 * STEP_S, []
    for name, lr, steps, speed in RUNS:
        run_dir = tmp_path / name  # test data, not a real training run
        run_dir.mkdir()
        (run_dir / "config.resolved.yaml").write_text(yaml.safe_dump({
            "launch": {"mode": "async"}, "actors": {"num_actors": 3}, "model": {"path": "synthetic-test-model"},
            "learner": {"total_steps": 30, "lr": lr}, "buffer": {"max_staleness": 4}}))
        write_run_status(run_dir, "running", total_steps=30, started_at=t0 - 5)
        write_synthetic_run(run_dir, range(1, steps + 1), t0, rng, speed)
        write_run_status(run_dir, "finished")
        dirs.append(run_dir)
    return dirs


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_dashboard_overlays_two_runs_with_a_legend_label_each(tmp_path):
    dirs = _write_runs(tmp_path)
    server, url = start_dashboard(dirs, "127.0.0.1", 0)
    chrome = Chromium(tmp_path / "chrome-profile")
    try:
        chrome.open(url, 1440, 1000)
        assert chrome.wait_for("document.body.dataset.step === '30,20' && document.body.dataset.status",
                               timeout=40) == "finished,finished"
        runs = chrome.eval("S.runs.map((R) => [R.label, R.color])")
        assert [r[0] for r in runs] == ["sweep-lr1e-4", "sweep-lr2e-4"] and runs[0][1] != runs[1][1]
        colors = [c for _, c in runs]

        # every per-step plot: one line per run, each run's label in the panel's legend
        for pid in ("reward", "entropy", "loss", "clip", "rho", "staleline", "lr", "buffer", "wait"):
            lg = chrome.eval(f"document.querySelector('#panel-{pid} .legend').textContent")
            assert "sweep-lr1e-4" in lg and "sweep-lr2e-4" in lg, (pid, lg)
            cv = chrome.eval(f"Object.assign({{}}, document.getElementById('cv-{pid}').dataset)")
            assert cv["series"] == "2" and cv["runs"] == "2" and int(cv["points"]) == 50, (pid, cv)
        assert chrome.eval("+document.getElementById('cv-eval').dataset.points") == 5  # avg@K at 10, 20, 30 + 10, 20
        # wall-time plots overlay too: throughput per run, per-actor plots in the runs' colours
        assert chrome.eval("document.getElementById('cv-tput').dataset.series") == "2"
        assert chrome.eval("document.getElementById('cv-idle').dataset.runs") == "2"
        assert chrome.eval("document.getElementById('cv-stale').dataset.series") == "2"
        # a tab picks the metric of a multi-metric panel; still one line per run
        chrome.eval("document.querySelector('#panel-rho .tab[data-key=\"is/rho_max\"]').click()")
        assert chrome.eval("S.runs.length && PANELS.find((p) => p.id === 'rho').sel") == "is/rho_max"
        assert chrome.eval("document.getElementById('cv-rho').dataset.series") == "2"

        # header: one row per run with its status; the swept value (lr) per run, the shared config once
        rows = chrome.eval("[...document.querySelectorAll('#h-runs .runrow')].map((r) => r.textContent)")
        assert len(rows) == 2 and "sweep-lr1e-4" in rows[0] and "0.0001" in rows[0] and "0.0002" in rows[1], rows
        assert all("finished" in r for r in rows), rows
        shared = chrome.eval("document.getElementById('h-config').textContent")
        assert "synthetic-test-model" in shared and "lr" not in shared, shared

        # hovering a plot lists every run's value at that step
        chrome.eval("(() => { const cv = document.getElementById('cv-reward'), r = cv.getBoundingClientRect();"
                    " cv.dispatchEvent(new MouseEvent('mousemove', {clientX: r.left + r.width / 2,"
                    " clientY: r.top + 50, bubbles: true})); })()")
        tip = chrome.eval("document.getElementById('tip').textContent")
        assert "sweep-lr1e-4" in tip and "sweep-lr2e-4" in tip, tip
        chrome.eval("document.getElementById('cv-reward').dispatchEvent(new MouseEvent('mouseleave'))")

        # a run that goes on: its new rows join its line on the next poll, the other run's stay as they were
        write_synthetic_run(dirs[1], range(21, 26), time.time() - 40 * STEP_S, random.Random(2), 2.0)
        chrome.wait_for("document.body.dataset.step === '30,25'", timeout=15)
        assert chrome.eval("+document.getElementById('cv-reward').dataset.points") == 55

        canvases = chrome.eval(CANVAS_CHECK)
        assert len(canvases) >= 15
        for c in canvases:
            assert c["drawn"] == "1" and c["ink"] > 500 and c["colors"] > 3, f"canvas {c['id']} looks empty: {c}"

        height = int(chrome.eval("document.documentElement.scrollHeight"))
        chrome.viewport(1440, height)
        time.sleep(0.5)  # resize re-render (debounced 120 ms)
        shot = chrome.call("Page.captureScreenshot", {"format": "png"})
        png = base64.b64decode(shot["data"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
        (tmp_path / "dashboard-compare.png").write_bytes(png)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "dashboard-compare.png").write_bytes(png)
        stats = chrome.call("Runtime.evaluate", {"expression": f"{PNG_STATS}({json.dumps(shot['data'])}, "
                                                 f"{json.dumps(colors)})", "awaitPromise": True,
                                                 "returnByValue": True})["result"]["value"]
        assert stats["w"] == 1440 and stats["h"] >= 1000 and stats["colors"] > 200, stats
        assert all(n > 2000 for n in stats["near"]), stats  # both runs' lines are visible
        assert not chrome.exceptions, chrome.exceptions
    finally:
        chrome.close()
        server.shutdown()
        server.server_close()

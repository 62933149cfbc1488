"""Headless Chromium for the dashboard tests, and synthetic run data to show it.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: fd 3 in, fd 4 out,
NUL-terminated JSON), so nothing listens on a port but the dashboard itself (127.0.0.1, free port).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

from archer_async.metrics import MetricsWriter, append_actor_metrics, staleness_histogram

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
NUM_ACTORS = 3
STEP_S = 6.0  # synthetic seconds between learner steps


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError("Chromium not found: install it (`apt-get install -y chromium`, "
                         "done by `bash launch/dev.sh setup`)")


# ------------------------------------------------------------------------------ synthetic run (test data)
def synthetic_step_row(step: int, t0: float, rng: random.Random, speed: float = 1.0) -> dict:
    """One learner-step row with plausible, smoothly varying values (test data only); `speed` scales how
    fast reward, accuracy and entropy move (a second run of a sweep learns faster or slower)."""
    lags = [min(4, int(abs(rng.gauss(0, 1.3 / speed)))) for _ in range(64)]
    s = step * speed
    row = {
        "step": step, "version": step, "time": t0 + step * STEP_S,
        "reward/mean": 0.22 + 0.45 * (1 - math.exp(-s / 14)) + rng.gauss(0, 0.03),
        "actor/tokens_per_s": NUM_ACTORS * 820 + rng.gauss(0, 60),
        "learner/tokens_per_s": (1450 + 120 * math.sin(step / 5)) / speed ** 0.5 + rng.gauss(0, 40),
        "buffer/size": max(0, round(10 + 6 * math.sin(step / 4) + rng.gauss(0, 1.5))),
        "buffer/dropped_stale": step // 9,
        "staleness/mean": sum(lags) / len(lags), "staleness/max": max(lags),
        "staleness/hist": staleness_histogram(lags),
        "sync/seconds": 0.9 + 0.15 * math.sin(step / 3) + abs(rng.gauss(0, 0.08)),
        "learner/wait_for_data_s": max(0.0, 1.2 * math.exp(-step / 10) + rng.gauss(0, 0.1)),
        "actor/wait_for_weights_s": max(0.0, 0.35 + rng.gauss(0, 0.06)),
        "loss/pg": rng.gauss(-0.01, 0.02), "loss/kl_low": 0.002 * s ** 0.5 + abs(rng.gauss(0, 0.001)),
        "loss/clipfrac_low": 0.03 + abs(rng.gauss(0, 0.008)),
        "loss/clipfrac_high": 0.012 + abs(rng.gauss(0, 0.004)),
        "is/rho_mean": 1.0 + rng.gauss(0, 0.01), "is/rho_max": 2.5 + abs(rng.gauss(0, 0.8)),
        "is/truncated_frac": 0.01 + abs(rng.gauss(0, 0.004)), "is/ess": 0.93 + rng.gauss(0, 0.015),
        "is/mismatch_kl": 0.0015 + abs(rng.gauss(0, 0.0004)),
        "entropy/mean": 0.9 * math.exp(-s / 60) + 0.25 + rng.gauss(0, 0.01),
        "groups/solve_none": rng.randint(0, 3), "groups/solve_all": rng.randint(0, 2),
        "reward/infra_errors": int(rng.random() < 0.1), "grad_norm": 0.6 + abs(rng.gauss(0, 0.2)), "lr": 1e-4 * speed,
        "groups/dropped_solve_none": rng.randint(0, 4), "groups/dropped_solve_all": rng.randint(0, 3),
        "groups/dropped_stale": int(rng.random() < 0.2), "groups/dropped_infra_error": 0,
        "actor/idle_frac": max(0.0, 0.15 + rng.gauss(0, 0.05)),
    }
    if step % 10 == 0:
        row["eval/accuracy"] = 0.2 + 0.4 * (1 - math.exp(-s / 20)) + rng.gauss(0, 0.01)
        row["eval/pass_at_k"] = min(1.0, row["eval/accuracy"] + 0.18)
    return row


def write_synthetic_run(run_dir: Path, steps: range, t0: float, rng: random.Random, speed: float = 1.0) -> None:
    """Append learner rows for `steps` and 3 actors' rows every 2 s of synthetic time (test data only)."""
    with MetricsWriter(run_dir, None) as writer:
        for s in steps:
            writer.log(synthetic_step_row(s, t0, rng, speed))
    t = (steps.start - 1) * STEP_S
    while t < steps.stop * STEP_S - STEP_S:
        v = int(t // STEP_S)
        for i in range(NUM_ACTORS):
            append_actor_metrics(run_dir, {
                "actor_id": i, "time": t0 + t, "version": v,
                "actor/tokens_per_s": 820 + 90 * math.sin(t / 40 + i) + rng.gauss(0, 25),
                "actor/wait_for_weights_s": 0.3, "actor/in_flight": 48 - 6 * i + rng.randint(-4, 4),
                "actor/versions": {str(v): 40, str(max(0, v - 1)): 8},
                "actor/idle_frac": max(0.0, min(1.0, 0.1 + 0.05 * i + rng.gauss(0, 0.03))),
                "actor/samples_generated_total": int((t + 2.0) * (30 + 2 * i))})
        t += 2.0


# ------------------------------------------------------------------------------ DevTools over a pipe
class Chromium:
    """A headless Chromium speaking the DevTools protocol over --remote-debugging-pipe."""

    def __init__(self, user_data_dir: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        hi_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 100)
        hi_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 100)
        for fd in (to_chrome_r, from_chrome_w):
            os.close(fd)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--hide-scrollbars", "--mute-audio", "--remote-debugging-pipe", f"--user-data-dir={user_data_dir}",
                 "about:blank"]
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec 3<&{hi_r} 4>&{hi_w} {hi_r}<&- {hi_w}>&-; exec "$@"', "bash", find_chromium(), *flags],
            pass_fds=(hi_r, hi_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(hi_r)
        os.close(hi_w)
        self._next_id = 0
        self._results: dict[int, dict] = {}
        self.exceptions: list[dict] = []  # Runtime.exceptionThrown events (uncaught errors in the page)
        self._cond = threading.Condition()
        threading.Thread(target=self._reader, daemon=True).start()
        self.session = ""

    def _reader(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_chrome, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._results[-1] = {"error": "chromium closed the pipe"}
                    self._cond.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                obj = json.loads(msg)
                if obj.get("method") == "Runtime.exceptionThrown":
                    self.exceptions.append(obj["params"]["exceptionDetails"])
                elif "id" in obj:
                    with self._cond:
                        self._results[obj["id"]] = obj
                        self._cond.notify_all()

    def call(self, method: str, params: dict | None = None, session: bool = True, timeout: float = 20.0) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._next_id not in self._results:
                if -1 in self._results:
                    raise AssertionError(f"{method}: {self._results[-1]['error']}")
                left = deadline - time.monotonic()
                assert left > 0, f"DevTools call {method} timed out"
                self._cond.wait(left)
            res = self._results.pop(self._next_id)
        assert "error" not in res, f"{method}: {res['error']}"
        return res["result"]

    def open(self, url: str, width: int, height: int) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        self.viewport(width, height)
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Page.navigate", {"url": url})

    def viewport(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def eval(self, expression: str):
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        assert "exceptionDetails" not in res, res["exceptionDetails"]
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        while True:  # exceptions while the page is still loading count as "not yet"
            value = self.eval(f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()")
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.2)

    def close(self) -> None:
        try:
            self.call("Browser.close", session=False, timeout=5)
        except AssertionError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=10)
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass


# Per canvas: the JS sets data-drawn; count pixels that differ from the transparent background.
CANVAS_CHECK = """(() => [...document.querySelectorAll('canvas')].map(cv => {
  const d = cv.getContext('2d').getImageData(0, 0, cv.width, cv.height).data;
  const colors = new Set(); let ink = 0;
  for (let i = 0; i < d.length; i += 4) { if (d[i + 3] > 0) { ink++; colors.add((d[i] << 16) | (d[i+1] << 8) | d[i+2]); } }
  return {id: cv.id, drawn: cv.dataset.drawn, points: +cv.dataset.points, ink, colors: colors.size,
          w: cv.width, h: cv.height};
}))()"""

"""Shared helpers of the buffer tests (small groups, a server subprocess); holds no tests itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from archer_async import wire
from archer_async.types import Reward, Sample, TrajectoryGroup, encode_group
from buffer.segment_log import SegmentLog
from buffer.store import group_meta

REPO = Path(__file__).resolve().parents[2]


def make_group(i, version=0, rewards=("pass", "fail"), actor="a", tokens=3) -> TrajectoryGroup:
    """A small valid group with id "<actor>-g<i>"."""
    samples = [Sample(sample_id=f"{actor}-{i}-{j}", response_ids=list(range(tokens)),
                      behavior_logprobs=[-0.5] * tokens, token_versions=[version] * tokens,
                      finish_reason="stop", reward=Reward(r)) for j, r in enumerate(rewards)]
    return TrajectoryGroup(group_id=f"{actor}-g{i}", prompt_index=i, data_source="tiny",
                           prompt_ids=[1, 2, 3], samples=samples, actor_id=actor, created_at=time.time())


def replay_log(path, **kw):
    """(SegmentLog reopened at `path`, its records as [(type, body bytes)]) after a full replay."""
    log = SegmentLog(path, **kw)
    return log, [(t, bytes(b)) for t, b, _ in log.replay()]


def payload_meta(g: TrajectoryGroup):
    """(GroupMeta, payload) as BufferStore.ingest takes them."""
    data = encode_group(g)
    return group_meta(data), data


def start_server(run_dir, buffer_cfg: dict | None = None, restore_state: dict | None = None,
                 wait_s: float = 30.0, preexec_fn=None) -> subprocess.Popen:
    """`python -m buffer` as a real process; returns once endpoints.json names its pid.
    preexec_fn runs in the child before exec (e.g. to set resource limits)."""
    cmd = [sys.executable, "-m", "buffer", "--run-dir", str(run_dir),
           "--config-json", json.dumps(buffer_cfg or {})]
    if restore_state is not None:
        p = Path(run_dir) / "restore.json"
        p.write_text(json.dumps(restore_state))
        cmd += ["--restore-state", str(p)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=preexec_fn)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if wire.read_endpoints(run_dir)["pid"] == proc.pid:
                return proc
        except Exception:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"buffer exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("buffer did not start")

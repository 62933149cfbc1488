"""kill -9 of the buffer process mid-ingest (and a learner crash) lose nothing and train nothing twice."""

import os
import signal
import threading
import time

import pytest

from archer_async.buffer_client import BufferClient
from tests.helpers.buffer import make_group, start_server

pytestmark = pytest.mark.integration


def test_kill9_buffer_mid_ingest_and_learner_crash(tmp_path):
    cfg = {"capacity": 1000, "max_staleness": 1000, "fsync": True}
    proc = start_server(tmp_path, cfg)
    n_actors, per_actor = 3, 60
    acked: list[str] = []
    lock = threading.Lock()
    errors = []

    def actor(k):
        try:
            with BufferClient.from_run_dir(tmp_path, client_id=f"actor-{k}", ack_timeout_s=1.0) as c:
                for i in range(per_actor):
                    r = c.put(make_group(i, actor=f"act{k}", tokens=200), timeout=60)
                    assert r.status in ("stored", "duplicate")
                    with lock:
                        acked.append(r.group_id)
        except Exception as e:  # surfaced by the main thread
            errors.append(e)

    threads = [threading.Thread(target=actor, args=(k,)) for k in range(n_actors)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # producers are mid-ingest
    proc.wait(10)
    with lock:
        acked_before_kill = set(acked)
    assert len(acked_before_kill) >= 40
    proc = start_server(tmp_path, cfg)
    try:
        with BufferClient.from_run_dir(tmp_path, client_id="learner") as learner:
            stats = learner.stats()
            assert stats["stored_total"] >= len(acked_before_kill)  # every acknowledged group survived
            trained: list[str] = []
            ckpt_trained, ckpt_state = [], None
            crashed = False
            total = n_actors * per_actor
            while len(trained) < total:
                batch = learner.sample(5, 0, timeout=60)
                trained += batch.group_ids
                if len(trained) % 20 == 0:  # checkpoint: trained ids + the buffer's consumed_state
                    ckpt_trained, ckpt_state = list(trained), batch.consumed_state
                if not crashed and len(trained) >= 75 and ckpt_state is not None:
                    crashed = True  # learner dies; the new one resumes from its checkpoint
                    learner.close()
                    learner = BufferClient.from_run_dir(tmp_path, client_id="learner-2")
                    learner.rewind(ckpt_state)
                    trained = list(ckpt_trained)
            for t in threads:
                t.join(60)
            assert not errors, errors
            final = learner.stats()
            learner.close()
    finally:
        proc.terminate()
        proc.wait(10)
    expected = {f"act{k}-g{i}" for k in range(n_actors) for i in range(per_actor)}
    assert crashed
    assert len(trained) == len(set(trained)) == total  # 0 trained twice
    assert set(trained) == expected                    # 0 lost
    assert acked_before_kill <= set(trained)
    assert final["stored_total"] == total and final["ready"] == 0

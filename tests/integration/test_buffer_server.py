"""The buffer over real ZMQ on 127.0.0.1: producers, a consumer, authentication, malformed frames,
backpressure, restore from a checkpoint state, and the inspect CLI."""

import json
import os
import stat
import threading
import time

import msgspec
import pytest
import zmq

from archer_async import wire
from archer_async.buffer_client import BufferAuthError, BufferClient, BufferTimeout
from archer_async.types import GroupHeader
from launch.cli import main as cli_main
from tests.helpers.buffer import make_group

pytestmark = pytest.mark.integration


def test_producers_and_consumer_exactly_once(tmp_path, buffer_server):
    buffer_server({"capacity": 16, "max_staleness": 100})
    assert stat.S_IMODE(os.stat(wire.secret_path(tmp_path)).st_mode) == 0o600
    n_actors, per_actor = 3, 20
    results = {}

    def actor(k):
        with BufferClient.from_run_dir(tmp_path, client_id=f"actor-{k}", max_pending=8) as c:
            out = []
            for i in range(per_actor):
                while not c.reserve(1):
                    threading.Event().wait(0.02)
                out.append(c.put(make_group(i, actor=f"actor{k}"), timeout=60))
            results[k] = out

    threads = [threading.Thread(target=actor, args=(k,)) for k in range(n_actors)]
    for t in threads:
        t.start()
    seen = []
    with BufferClient.from_run_dir(tmp_path, client_id="learner") as learner:
        version = 0
        while len(seen) < n_actors * per_actor:
            batch = learner.sample(4, version, timeout=60)
            assert [g.group_id for g in batch.groups] == batch.group_ids
            seen += batch.group_ids
            version += 1
            learner.set_version(version)
        for t in threads:
            t.join(60)
        stats = learner.stats()
    assert all(r.status == "stored" for rs in results.values() for r in rs)
    assert len(seen) == len(set(seen)) == n_actors * per_actor  # none lost, none twice
    assert stats["delivered_total"] == 60 and stats["size"] == 0 and stats["in_flight"] == 0
    assert stats["metrics"]["buffer/size"] == 0


def test_unauthenticated_and_malformed_are_rejected(tmp_path, buffer_server):
    buffer_server()
    bad = BufferClient(wire.read_endpoints(tmp_path), os.urandom(32), client_id="intruder", ack_timeout_s=2)
    with pytest.raises(BufferAuthError):
        bad.put(make_group(0), timeout=10)
    bad.close()
    ctx = zmq.Context()
    ep = wire.read_endpoints(tmp_path)
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(ep["ingest"])
    signer = wire.Signer(wire.load_secret(tmp_path))
    raw.send_multipart([b"garbage"])
    raw.send_multipart([b"a", b"b", b"c", b"d", b"e"])
    fresh = {"epoch": ep["epoch"], "sid": "raw"}  # authentic and fresh, but malformed
    raw.send_multipart(signer.pack(wire.PROTO_REQ, {"op": "put", "rid": 1, "seq": 1, **fresh}, b"\xc1not msgpack"))
    raw.send_multipart(signer.pack(wire.PROTO_REQ, {"op": "put", "rid": "x", "seq": 2, **fresh}, b""))
    lying = GroupHeader.of(make_group(11))  # authentic, but the header does not describe the payload
    raw.send_multipart(signer.pack(wire.PROTO_REQ, {"op": "put", "rid": 3, "meta": lying, "seq": 3, **fresh},
                                   msgspec.msgpack.encode(make_group(12))))
    forged = signer.pack(wire.PROTO_REQ, {"op": "put", "rid": 2, "seq": 4, **fresh},
                         msgspec.msgpack.encode(make_group(9)))
    forged[2] = msgspec.msgpack.encode(make_group(10))  # payload swapped after signing
    raw.send_multipart(forged)
    assert raw.poll(5000)
    with BufferClient.from_run_dir(tmp_path) as good:
        assert good.put(make_group(1)).status == "stored"
        s = good.stats()
    raw.close()
    ctx.term()
    assert s["rejected_auth"] >= 4 and s["rejected_malformed"] >= 3
    assert s["stored_total"] == 1  # only the authentic group


def test_backpressure_then_restore_from_checkpoint_state(tmp_path, buffer_server):
    proc = buffer_server({"capacity": 2, "fsync": True})
    with BufferClient.from_run_dir(tmp_path, client_id="actor", max_pending=8) as actor, \
            BufferClient.from_run_dir(tmp_path, client_id="learner") as learner:
        for i in range(5):
            actor.submit(make_group(i))
        deadline = time.monotonic() + 30
        while True:  # the first two are acknowledged after their fsync (may take more than 1 s here)
            with pytest.raises(BufferTimeout):
                actor.flush(timeout=1.0)  # full: producers wait, nothing dropped
            if actor.pending() <= 3 or time.monotonic() > deadline:
                break
        assert actor.pending() == 3
        flushed = []
        waiter = threading.Thread(target=lambda: flushed.extend(actor.flush(timeout=30)))
        waiter.start()  # the actor keeps re-sending while the learner frees room
        b1 = learner.sample(2, 0, timeout=10)
        ckpt = b1.consumed_state
        b2 = learner.sample(2, 0, timeout=10)
        waiter.join(30)
        assert len(flushed) == 5 and all(r.status == "stored" for r in flushed)
        assert set(b1.group_ids) | set(b2.group_ids) == {"a-g0", "a-g1", "a-g2", "a-g3"}
    proc.terminate()
    assert proc.wait(10) == 0
    # learner crashed after its checkpoint at b1: the restarted buffer re-delivers b2, then g4
    buffer_server({"capacity": 2}, restore=ckpt)
    with BufferClient.from_run_dir(tmp_path, client_id="learner2") as learner:
        b = learner.sample(3, 0, timeout=10)
        assert b.group_ids == b2.group_ids + ["a-g4"]
        assert b.consumed_state["cursor"] == 5
    r = cli_main(["buffer", "inspect", str(tmp_path), "--json"])
    assert r == 0


def test_inspect_reports_states_and_torn_tail(tmp_path, buffer_server, capsys):
    proc = buffer_server({"filter_groups": True, "fsync": False, "sampler": "oldest"})  # by arrival
    with BufferClient.from_run_dir(tmp_path) as c:
        c.put_many([make_group(i, version=i % 2) for i in range(6)] + [make_group(6, rewards=("fail", "fail"))])
        c.sample(2, 0, timeout=10)
    proc.terminate()
    proc.wait(10)
    seg = sorted((tmp_path / "buffer" / "log").glob("*.open"))[-1]
    with open(seg, "ab") as f:
        f.write(b"\x10\x00\x00\x00torn")
    assert cli_main(["buffer", "inspect", str(tmp_path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["groups_stored"] == 6
    assert rep["groups_by_state"] == {"consumed": 2, "ready": 4}
    assert rep["groups_by_version"]["1"] == {"consumed": 1, "ready": 2}  # oldest first: g0, g1
    assert rep["dropped_by_reason"] == {"filtered:solve_none": 1}
    assert rep["truncated_tail"]["truncated_bytes"] == 8 and rep["oldest"]["group_id"] == "a-g0"
    assert cli_main(["buffer", "inspect", str(tmp_path)]) == 0
    assert "TORN TAIL" in capsys.readouterr().out
    buffer_server({"fsync": False})  # the restart repairs it and records the repair
    assert cli_main(["buffer", "inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tail: clean" in out and "repaired at" in out


def test_service_in_process_thread(tmp_path):
    from archer_async.config import Config
    from buffer.service import BufferService

    cfg = Config(run_dir=str(tmp_path))
    svc = BufferService(cfg, tmp_path)
    try:
        with BufferClient.from_run_dir(tmp_path) as c:
            assert c.put(make_group(0)).status == "stored"
            # (eta + v + 1) * learner.batch_groups
            assert c.admission()["limit"] == (cfg.buffer.max_staleness + 0 + 1) * cfg.learner.batch_groups == 80
        m = svc.metrics()
        assert m["buffer/size"] == 1 and m["buffer/dropped_stale"] == 0 and m["buffer/stored_total"] == 1
        assert svc.endpoints()["ingest"] == wire.read_endpoints(tmp_path)["ingest"]
    finally:
        svc.stop()
    assert not svc.alive()

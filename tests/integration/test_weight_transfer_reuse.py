"""Weight transfer: gloo-group reuse across updates, a re-placed receiver process, failed-peer naming,
and a consumer failure after the acknowledgement reaching the sender."""

import dataclasses
import multiprocessing as mp
import os
import re
import signal
import threading

import pytest
import torch

from actors.weight_receiver import WeightReceiver
from learner.weight_sender import WeightSender
from archer_async.weight_sync import WeightSyncError, make_sync_init
from tests.helpers.procs import ProcEvents


def _weights(version: int, n: int = 4) -> list[tuple[str, torch.Tensor]]:
    return [(f"layer{i}.weight", torch.full((32, 32), float(version * 10 + i))) for i in range(n)]


def _thread_receiver(init, versions, out: dict) -> threading.Thread:
    """A receiver in a thread: receives `versions` in order into out["got"], its stats into out["stats"]."""

    def run():
        try:
            rx = WeightReceiver(init)
            rx.connect()
            for v in versions:
                out.setdefault("got", []).append([(n, t.clone()) for n, t in rx.receive(v)])
                out.setdefault("stats", []).append(rx.last_stats)
        except Exception as e:  # reported to the test
            out["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def _proc_receiver(init: dict, versions: list[int], q, die_in: int = -1) -> None:
    """A receiver process: reports ("ok"|"err", rank, version, first values or error, new_group) on its
    pipe `q` (`ProcEvents.channel`); SIGKILLs itself after the first tensor of version `die_in`."""
    rx = WeightReceiver(init)
    rx.connect(timeout_s=180)
    q.send(("hello", init["rank"], -1, None, None))
    for v in versions:
        try:
            got = []
            for _, t in rx.receive(v):
                got.append(float(t.flatten()[0]))
                if v == die_in:
                    os.kill(os.getpid(), signal.SIGKILL)
            q.send(("ok", init["rank"], v, got, rx.last_stats["new_group"]))
        except WeightSyncError as e:
            q.send(("err", init["rank"], v, str(e), None))


def _start_receiver(ctx, init, rank: int, versions: list[int], events: ProcEvents, die_in: int = -1):
    """`_proc_receiver` of `rank` in a spawned process, reporting on its own pipe of `events`."""
    p = ctx.Process(target=_proc_receiver, args=(init.for_rank(rank).to_dict(), versions, events.channel(), die_in),
                    daemon=True)
    p.start()
    return p


def test_second_update_on_unchanged_membership_reuses_the_group():
    init = make_sync_init(num_actors=2, timeout_s=120)  # generous: a loaded CI machine
    sender = WeightSender(init)
    outs = [{}, {}]
    threads = [_thread_receiver(init.for_rank(r), [1, 2, 3], outs[r - 1]) for r in (1, 2)]
    try:
        sender.connect()
        stats = [sender.send(_weights(v), v, bucket_bytes=b) for v, b in ((1, 1 << 20), (2, 1 << 20), (3, 5000))]
        for th in threads:
            th.join(30)
    finally:
        sender.close()
    assert [s["new_group"] for s in stats] == [True, False, False]
    for out in outs:
        assert "error" not in out, out.get("error")
        assert [s["new_group"] for s in out["stats"]] == [True, False, False]
        for v, got in zip((1, 2, 3), out["got"]):
            assert [float(t[0, 0]) for _, t in got] == [v * 10.0 + i for i in range(4)]


@pytest.mark.integration
def test_replaced_receiver_process_gets_the_next_update_on_a_fresh_group():
    """The actor of rank 1 dies between two successful updates; a new process with the same rank joins
    the next one (a fresh group: the old one still has the dead process in it)."""
    ctx = mp.get_context("spawn")
    events = ProcEvents(ctx)
    init = make_sync_init(num_actors=2, timeout_s=120)  # generous: a loaded CI machine
    sender = WeightSender(init)
    old = _start_receiver(ctx, init, 1, [1, 2], events)
    other = _start_receiver(ctx, init, 2, [1, 2, 3], events)
    repl = None
    try:
        sender.connect()
        assert len(events.collect(2, 180)) == 2  # hello from both
        for v in (1, 2):
            s = sender.send(_weights(v), v)
            assert [e[:3] for e in sorted(events.collect(2, 180))] == [("ok", 1, v), ("ok", 2, v)]
        assert s["new_group"] is False  # update 2 reused the group of update 1
        old.kill()  # the actor process is lost between two successful updates
        old.join(30)
        repl = _start_receiver(ctx, init, 1, [3], events)
        assert events.collect(1, 180)[0][0] == "hello"
        s3 = sender.send(_weights(3), 3)
        evs = sorted(events.collect(2, 180))
        assert [e[:3] for e in evs] == [("ok", 1, 3), ("ok", 2, 3)]
        assert all(e[3] == [30.0 + i for i in range(4)] and e[4] is True for e in evs)  # fresh group on both
        assert s3["new_group"] is True
    finally:
        sender.close()
        for p in (old, other, repl):
            if p is not None and p.is_alive():
                p.kill()


@pytest.mark.integration
def test_failed_update_error_names_the_failed_peer():
    ctx = mp.get_context("spawn")
    events = ProcEvents(ctx)
    init = make_sync_init(num_actors=2, timeout_s=180)  # receivers: spawned, they import torch first (slow
    sender = WeightSender(init)                         # on a busy machine) and may say hello far apart
    bad = _start_receiver(ctx, init, 1, [1, 2], events, die_in=2)
    good = _start_receiver(ctx, init, 2, [1, 2], events)
    try:
        sender.connect()
        sender.init = dataclasses.replace(sender.init, timeout_s=10)  # updates: the short deadline under test
        assert len(events.collect(2, 180)) == 2
        sender.send(_weights(1), 1)
        assert sorted(e[:3] for e in events.collect(2, 60)) == [("ok", 1, 1), ("ok", 2, 1)]
        with pytest.raises(WeightSyncError) as info:
            sender.send(_weights(2, n=8), 2, bucket_bytes=5000)  # rank 1 dies after its first tensor
        msg = str(info.value)
        assert re.search(r"did not answer \(dead or stalled\): \[1\]|receivers \[1\] did not acknowledge", msg), msg
        ev = events.collect(1, 60)[0]
        assert ev[:3] == ("err", 2, 2)  # the survivor's receive raised: it keeps version 1
    finally:
        sender.close()
        for p in (bad, good):
            if p.is_alive():
                p.kill()


def test_consumer_failure_after_the_acknowledgement_reaches_the_sender_with_the_next_request():
    init = make_sync_init(num_actors=1, timeout_s=20)
    sender = WeightSender(init)
    box: dict = {}

    def consumer():
        try:
            rx = WeightReceiver(init.for_rank(1))
            rx.connect()
            it = rx.receive(1)
            next(it)  # the whole (single-bucket) update is here and acknowledged; the consumer gives up
            it.close()
            box["got"] = [(n, t.clone()) for n, t in rx.receive(2)]
        except Exception as e:
            box["error"] = e

    th = threading.Thread(target=consumer, daemon=True)
    th.start()
    try:
        sender.connect()
        s1 = sender.send(_weights(1), 1)
        s2 = sender.send(_weights(2), 2)
        th.join(20)
    finally:
        sender.close()
    assert "error" not in box, box.get("error")
    assert "receiver_reports" not in s1
    assert "version 1" in s2["receiver_reports"][1] and "1 of the 4 tensors" in s2["receiver_reports"][1]
    assert [float(t[0, 0]) for _, t in box["got"]] == [20.0 + i for i in range(4)]


def test_small_chunks_carry_every_byte_copied_or_sent_from_the_tensor():
    """Chunks far smaller than the bucket: tensors spanning chunk boundaries, chunks inside one large
    contiguous tensor (broadcast from it, uncopied), non-contiguous, 0-dim and empty tensors, bf16."""
    g = torch.Generator().manual_seed(0)
    ws = [
        ("a", torch.randn(5, 7, generator=g)),
        ("big", torch.randn(64, 64, generator=g)),  # 16 KiB: several whole 1 KiB chunks inside it
        ("t", torch.randn(9, 30, generator=g)[:, ::3]),  # non-contiguous view
        ("h", torch.randn(333, generator=g).to(torch.bfloat16)),
        ("s", torch.tensor(3, dtype=torch.int64)),
        ("e", torch.empty(0, 4)),
    ]
    init = make_sync_init(num_actors=1, timeout_s=20)
    sender = WeightSender(init, chunk_bytes=1000)
    out: dict = {}
    th = _thread_receiver(init.for_rank(1), [1], out)
    try:
        sender.connect()
        sender.send(ws, 1, bucket_bytes=1 << 20)
        th.join(20)
    finally:
        sender.close()
    assert "error" not in out, out.get("error")
    got = out["got"][0]
    assert [n for n, _ in got] == [n for n, _ in ws]
    for (_, a), (_, b) in zip(got, ws):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)

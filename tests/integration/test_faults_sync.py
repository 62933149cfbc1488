"""Weight-sync faults with real receiver processes: a receiver SIGKILLed mid-update, and one that stalls.

The update aborts within its deadline (never a silent hang), the surviving receiver keeps its previous
weights (its receive raises), and a replacement process with the same rank joins the next update,
which then succeeds for everyone (the fresh-group-per-update design that re-placed actors rely on)."""

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from learner.weight_sender import WeightSender
from archer_async.weight_sync import WeightSyncError, make_sync_init
from tests.helpers.procs import ProcEvents

pytestmark = pytest.mark.integration

DEADLINE_S = 12.0


def _weights(version: int) -> list[tuple[str, torch.Tensor]]:
    return [(f"layer{i}.weight", torch.full((64, 64), float(version * 10 + i))) for i in range(6)]


def _receiver(init: dict, versions: list[int], q, fault: str = "", fault_version: int = -1) -> None:
    """Receive `versions` in order; report ("ok"|"err", rank, version, detail). fault: "die" | "stall"
    after the first bucket of `fault_version`."""
    from actors.weight_receiver import WeightReceiver

    rx = WeightReceiver(init)
    rx.connect(timeout_s=180)  # the sender's store may come up later than this process
    q.send(("hello", init["rank"], -1, ""))
    for v in versions:
        try:
            got = []
            for n, t in rx.receive(v):
                got.append(float(t.flatten()[0]))
                if v == fault_version and len(got) == 1:
                    if fault == "die":
                        os.kill(os.getpid(), signal.SIGKILL)
                    if fault == "stall":
                        time.sleep(600)
            q.send(("ok", init["rank"], v, got))
        except WeightSyncError as e:
            q.send(("err", init["rank"], v, str(e)))


def _start(ctx, init, rank, versions, q: ProcEvents, fault="", fault_version=-1):
    p = ctx.Process(target=_receiver, args=(init.for_rank(rank).to_dict(), versions, q.channel(), fault, fault_version),
                    daemon=True)
    p.start()
    return p


def _connect(sender: WeightSender, tries: int = 15) -> None:
    """connect() hosts the store, then waits for every hello (re-tried: spawned receivers start slowly)."""
    for i in range(tries):
        try:
            sender.connect()
            return
        except WeightSyncError:
            if i == tries - 1:
                raise


@pytest.mark.parametrize("fault", ["die", "stall"])
def test_receiver_fault_mid_update_aborts_in_deadline_and_replacement_joins(fault):
    ctx = mp.get_context("spawn")
    q = ProcEvents(ctx)
    # the deadline under test is the sender's; receivers wait long (a replacement process is spawned and
    # imports torch while the survivor already waits for the next update)
    init = make_sync_init(num_actors=2, timeout_s=180)
    sender = WeightSender(init, timeout_s=DEADLINE_S)
    bad = _start(ctx, init, 1, [1, 2], q, fault, fault_version=2)
    good = _start(ctx, init, 2, [1, 2, 3], q)
    try:
        _connect(sender)
        assert len(q.collect(2, 120)) == 2  # both said hello (spawned interpreters import torch)
        sender.send(_weights(1), 1, bucket_bytes=20_000)
        oks = q.collect(2, 60)
        assert sorted((k, r, v) for k, r, v, _ in oks) == [("ok", 1, 1), ("ok", 2, 1)]

        t0 = time.monotonic()
        with pytest.raises(WeightSyncError):
            sender.send(_weights(2), 2, bucket_bytes=20_000)
        assert time.monotonic() - t0 < DEADLINE_S + 10  # aborted within its deadline
        ev = q.collect(1, 60)
        assert ev and ev[0][:3] == ("err", 2, 2), ev  # the survivor keeps version 1 (its receive raised)
        if fault == "die":
            bad.join(10)
            assert bad.exitcode == -signal.SIGKILL
        else:
            bad.kill()
            bad.join(10)

        # a replacement receiver with the same rank joins the next update
        repl = _start(ctx, init, 1, [3], q)  # (it joins at the next update; no new connect() on the sender)
        assert q.collect(1, 120)[0][0] == "hello"
        sender.send(_weights(3), 3, bucket_bytes=20_000)
        oks = q.collect(2, 60)
        assert sorted((k, r, v) for k, r, v, _ in oks) == [("ok", 1, 3), ("ok", 2, 3)]
        assert all(got == [30.0 + i for i in range(6)] for _, _, _, got in oks)
        repl.join(30)
    finally:
        sender.close()
        for p in (bad, good):
            if p.is_alive():
                p.kill()

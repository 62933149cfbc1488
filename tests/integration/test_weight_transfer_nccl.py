"""The NCCL branch of the weight transfer on CPU: `WeightSender` / `WeightReceiver` with backend "nccl",
their communicators built by `GlooBackedNcclShim` (vLLM's PyNcclCommunicator interface and device
checks, bytes over gloo). Real TCPStore, real processes where a process dies."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest
import torch

from actors.weight_receiver import WeightReceiver
from archer_async.weight_sync import WeightSyncError, make_sync_init
from archer_async.weight_sync.protocol import Control, nccl_broadcast, nccl_group, vllm_nccl_communicator
from learner.weight_sender import WeightSender
from tests.helpers.nccl_shim import GlooBackedNcclShim, disabled_nccl_shim, gloo_backed_nccl_shim
from tests.helpers.procs import ProcEvents

pytestmark = pytest.mark.integration


def _weights(version: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(version)
    return [
        ("model.embed_tokens.weight", torch.randn(37, 16, generator=g)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(16, 16, generator=g).to(torch.bfloat16)),
        ("model.layers.0.self_attn.q_proj.bias", torch.randn(16, generator=g).half()),
        ("model.norm.weight", torch.randn(16, generator=g)[::2]),  # non-contiguous view
        ("model.norm.bias", torch.randn(2, generator=g).double()),
        ("step", torch.tensor(version, dtype=torch.int64)),  # 0-dim
        ("empty", torch.empty(0, 3)),
    ]


def _nccl_init(num_actors: int, timeout_s: float):
    return make_sync_init(num_actors=num_actors, backend="nccl", timeout_s=timeout_s)


def _sender(init, factory=gloo_backed_nccl_shim, **kw) -> WeightSender:
    return WeightSender(init, device="cpu", nccl_factory=factory, **kw)


def _thread_receiver(init, versions, out: dict, factory=gloo_backed_nccl_shim) -> threading.Thread:
    def run():
        try:
            rx = WeightReceiver(init, device="cpu", nccl_factory=factory)
            out["rx"] = rx
            rx.connect()
            for v in versions:
                try:
                    got = [(n, t.clone()) for n, t in rx.receive(v)]
                    out.setdefault("got", []).append(got)
                    out.setdefault("stats", []).append(rx.last_stats)
                except WeightSyncError as e:
                    out.setdefault("errors", []).append(str(e))
        except Exception as e:  # reported to the test
            out["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def _assert_bit_exact(got, sent) -> None:
    assert [n for n, _ in got] == [n for n, _ in sent]
    for (n, t), (_, s) in zip(got, sent):
        assert t.dtype == s.dtype and t.shape == s.shape, n
        assert torch.equal(t.view(-1).view(torch.uint8) if t.numel() else t,
                           s.contiguous().view(-1).view(torch.uint8) if s.numel() else s), n


def test_nccl_branch_is_bit_exact_and_keeps_its_communicator_while_membership_holds():
    init = _nccl_init(2, timeout_s=60)
    sender = _sender(init)
    outs = [{}, {}]
    threads = [_thread_receiver(init.for_rank(r), [1, 2], outs[r - 1]) for r in (1, 2)]
    try:
        sender.connect()
        s1 = sender.send(_weights(1), 1, bucket_bytes=1500)  # several buckets
        comm = sender._nccl
        assert isinstance(comm, GlooBackedNcclShim) and not comm.disabled
        s2 = sender.send(_weights(2), 2, bucket_bytes=1500)
        for th in threads:
            th.join(30)
        assert s1["new_group"] and not s2["new_group"] and s1["num_buckets"] > 1
        assert sender._nccl is comm  # the same communicator served the second update
        for out in outs:
            assert "error" not in out and "errors" not in out, out
            _assert_bit_exact(out["got"][0], _weights(1))
            _assert_bit_exact(out["got"][1], _weights(2))
            assert [s["new_group"] for s in out["stats"]] == [True, False]
    finally:
        sender.close()


def test_disabled_communicator_fails_the_update_on_every_side():
    init = _nccl_init(1, timeout_s=20)
    sender = _sender(init, factory=disabled_nccl_shim)
    out: dict = {}
    th = _thread_receiver(init.for_rank(1), [1], out, factory=disabled_nccl_shim)
    try:
        sender.connect()
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError, match="disabled"):
            sender.send(_weights(1), 1)
        th.join(30)
        assert time.monotonic() - t0 < 15
        assert "got" not in out and len(out.get("errors", [])) == 1, out  # no weights from a no-op broadcast
    finally:
        sender.close()


def test_vllm_communicator_that_vllm_disables_is_an_error(monkeypatch):
    """vLLM's own PyNcclCommunicator, disabled as VLLM_DISABLE_PYNCCL does (its broadcast would return
    without moving a byte): the rendezvous raises instead of handing it out."""
    pytest.importorskip("vllm")
    monkeypatch.setenv("VLLM_DISABLE_PYNCCL", "1")
    init = _nccl_init(1, timeout_s=20)
    ctl = Control(init, is_master=True, timeout_s=20)
    with pytest.raises(WeightSyncError, match="disabled"):
        nccl_group(ctl, "g1", 0, 2, torch.device("cpu"), time.monotonic() + 15, vllm_nccl_communicator)


def test_watchdog_aborts_a_stuck_broadcast_on_both_sides():
    """Rank 1 never joins the sender's broadcast; rank 0 of a second group never sends: each side ends
    its own stuck broadcast (sender at its deadline, receiver when told the update is aborted), and
    its communicator is aborted, never reused."""
    init = _nccl_init(1, timeout_s=30)
    ctl = Control(init, is_master=True, timeout_s=30)
    comms: dict = {}

    def join(rank, gid):
        comms[(gid, rank)] = nccl_group(ctl, gid, rank, 2, torch.device("cpu"), time.monotonic() + 20,
                                        gloo_backed_nccl_shim)

    for gid in ("a", "b"):
        ths = [threading.Thread(target=join, args=(r, gid)) for r in (0, 1)]
        [t.start() for t in ths]
        [t.join(30) for t in ths]
    assert len(comms) == 4

    big = torch.zeros(64 << 20, dtype=torch.uint8)  # far more than the socket buffers take
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match="deadline"):
        nccl_broadcast(comms[("a", 0)], big, time.monotonic() + 2.0)
    assert 1.5 < time.monotonic() - t0 < 8
    assert comms[("a", 0)].disabled  # aborted

    told = time.monotonic() + 1.0
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match="sender aborted"):
        nccl_broadcast(comms[("b", 1)], torch.zeros(16, dtype=torch.uint8), time.monotonic() + 60,
                       aborted=lambda: "the sender aborted" if time.monotonic() > told else None)
    assert time.monotonic() - t0 < 5  # long before its 60 s deadline
    assert comms[("b", 1)].disabled


def test_wrong_device_is_refused_like_pynccl():
    init = _nccl_init(1, timeout_s=30)
    ctl = Control(init, is_master=True, timeout_s=30)
    comms: dict = {}
    ths = [threading.Thread(target=lambda r=r: comms.__setitem__(r, nccl_group(
        ctl, "d", r, 2, torch.device("cuda", 0) if r == 0 else torch.device("cpu"), time.monotonic() + 20,
        gloo_backed_nccl_shim))) for r in (0, 1)]
    [t.start() for t in ths]
    [t.join(30) for t in ths]
    with pytest.raises(WeightSyncError, match="created to work on cuda:0"):
        nccl_broadcast(comms[0], torch.zeros(4, dtype=torch.uint8), time.monotonic() + 5)


# ------------------------------------------------------------------------------------------------
# Processes: a receiver killed in the middle of a broadcast, and its replacement

class _DieInBroadcast(GlooBackedNcclShim):
    """A shim whose process is SIGKILLed inside its `die_at`-th broadcast (the bytes half-way)."""

    die_at = -1
    count = 0

    def broadcast(self, tensor, src, stream=None):
        type(self).count += 1
        if type(self).count == self.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().broadcast(tensor, src, stream)


def _dying_factory(store, rank, world_size, device):
    from tests.helpers.nccl_shim import _Group

    return _DieInBroadcast(_Group(store, rank, world_size), device)


def _proc_receiver(init: dict, versions: list[int], q, die_at: int = -1) -> None:
    _DieInBroadcast.die_at = die_at
    rx = WeightReceiver(init, device="cpu", nccl_factory=_dying_factory)
    rx.connect(timeout_s=180)
    q.send(("hello", init["rank"], -1, None, None))
    for v in versions:
        try:
            got = [(n, t.clone()) for n, t in rx.receive(v)]
            q.send(("ok", init["rank"], v, got, rx.last_stats["new_group"]))
        except WeightSyncError as e:
            q.send(("err", init["rank"], v, str(e), None))


def _start(ctx, init, rank, versions, events: ProcEvents, die_at=-1):
    p = ctx.Process(target=_proc_receiver, args=(init.for_rank(rank).to_dict(), versions, events.channel(), die_at),
                    daemon=True)
    p.start()
    return p


def test_receiver_killed_mid_broadcast_then_replaced_actor_gets_the_next_update():
    deadline_s = 10.0
    ctx = mp.get_context("spawn")
    events = ProcEvents(ctx)
    init = _nccl_init(2, timeout_s=180)  # receivers wait long; the sender's deadline is the one under test
    sender = _sender(init, timeout_s=deadline_s)
    # rank 1 dies inside the 2nd broadcast of version 2 (each version is 2 buckets: broadcasts 1-2, 3-4)
    bad = _start(ctx, init, 1, [1, 2], events, die_at=4)
    good = _start(ctx, init, 2, [1, 2, 3], events)
    repl = None
    try:
        for i in range(15):  # hosts the store, then waits for every hello (spawned receivers start slowly)
            try:
                sender.connect()
                break
            except WeightSyncError:
                assert i < 14
        assert len(events.collect(2, 120)) == 2
        sender.send(_weights(1), 1, bucket_bytes=1500)
        oks = sorted(events.collect(2, 60), key=lambda e: e[1])
        assert [(k, r, v) for k, r, v, _, _ in oks] == [("ok", 1, 1), ("ok", 2, 1)]
        for ev in oks:
            _assert_bit_exact(ev[3], _weights(1))
        comm = sender._nccl

        t0 = time.monotonic()
        with pytest.raises(WeightSyncError):
            sender.send(_weights(2), 2, bucket_bytes=1500)
        assert time.monotonic() - t0 < deadline_s + 5  # failed within its deadline
        assert comm.disabled and sender._nccl is None  # its communicator aborted, not kept
        ev = events.collect(1, 60)[0]
        assert ev[:3] == ("err", 2, 2), ev  # the survivor's receive raised: it keeps version 1
        bad.join(10)
        assert bad.exitcode == -signal.SIGKILL

        repl = _start(ctx, init, 1, [3], events)  # the re-placed actor: same rank, new process
        assert events.collect(1, 120)[0][0] == "hello"
        stats = sender.send(_weights(3), 3, bucket_bytes=1500)
        assert stats["new_group"]  # a new communicator on every side
        oks = sorted(events.collect(2, 60), key=lambda e: e[1])
        assert [(k, r, v, ng) for k, r, v, _, ng in oks] == [("ok", 1, 3, True), ("ok", 2, 3, True)]
        for ev in oks:
            _assert_bit_exact(ev[3], _weights(3))
        repl.join(30)
    finally:
        sender.close()
        for p in (bad, good, repl):
            if p is not None and p.is_alive():
                p.kill()

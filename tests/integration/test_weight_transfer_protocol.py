"""The weight-transfer wire protocol (archer_async.weight_sync) without vLLM: a real TCPStore and
real gloo groups on 127.0.0.1, receivers in threads of the test process."""

from __future__ import annotations

import threading
import time
import weakref

import pytest
import torch

from actors.weight_receiver import WeightReceiver
from archer_async.weight_sync import SyncInit, WeightSyncError, make_sync_init, receiver_rank
from archer_async.weight_sync.buckets import pack_bucket, unpack_bucket
from learner.weight_sender import WeightSender


def _weights(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        ("model.embed_tokens.weight", torch.randn(37, 16, generator=g)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(16, 16, generator=g).to(torch.bfloat16)),
        ("model.layers.0.self_attn.q_proj.bias", torch.randn(16, generator=g).half()),
        ("model.norm.weight", torch.randn(16, generator=g)[::2]),  # non-contiguous view
        ("model.norm.bias", torch.randn(2, generator=g).double()[::2]),  # one element with stride 2
        ("step", torch.tensor(7, dtype=torch.int64)),  # 0-dim
        ("empty", torch.empty(0, 3)),
    ]


def _run_receiver(init: SyncInit, version, out: dict, timeout_s=None):
    try:
        rx = WeightReceiver(init)
        rx.connect()
        versions = version if isinstance(version, list) else [version]
        for v in versions:
            out.setdefault("got", []).append([(n, t.clone()) for n, t in rx.receive(v, timeout_s=timeout_s)])
            out.setdefault("stats", []).append(rx.last_stats)
    except Exception as e:  # reported to the test thread
        out["error"] = e


def _start(init: SyncInit, ranks, version, timeout_s=None):
    outs, threads = [], []
    for r in ranks:
        out: dict = {}
        th = threading.Thread(target=_run_receiver, args=(init.for_rank(r), version, out, timeout_s), daemon=True)
        th.start()
        outs.append(out)
        threads.append(th)
    return outs, threads


def test_pack_unpack_roundtrip_keeps_dtype_shape_and_values():
    ws = _weights()
    header, flat = pack_bucket(ws, torch.device("cpu"))
    assert all(o % 64 == 0 for o in header["offsets"])
    back = unpack_bucket(header, flat)
    for (n, t), (m, u) in zip(ws, back):
        assert n == m and t.dtype == u.dtype and t.shape == u.shape
        assert torch.equal(t, u)


def _mixed(seed: int) -> list[tuple[str, torch.Tensor]]:
    """Small tensors around tensors of 1-3 KB (sent alone when chunks are 1 KB)."""
    g = torch.Generator().manual_seed(seed)
    return [("a", torch.randn(3, generator=g)), ("big1", torch.randn(700, generator=g)),
            ("b", torch.randn(5, generator=g).half()), ("c", torch.randn(2, 2, generator=g)),
            ("big2", torch.randn(16, 40, generator=g).to(torch.bfloat16)), ("d", torch.randn(200, generator=g)),
            ("e", torch.randn(100, generator=g)), ("empty", torch.empty(0))]


def test_chunk_bounds_follow_tensors_and_big_tensors_go_uncopied():
    from archer_async.weight_sync.buckets import byte_sources, ChunkPacker, bucket_layout, chunk_bounds

    ws = _mixed(0)
    header = bucket_layout(ws)
    bounds = chunk_bounds(header, 1024)
    assert all(s < e for s, e in bounds) and all(e <= s2 for (_, e), (s2, _) in zip(bounds, bounds[1:]))
    sizes = {n: t.numel() * t.element_size() for n, t in ws}
    offs = dict(zip(header["names"], header["offsets"]))
    bigs = [(offs[name], sizes[name]) for name in ("big1", "big2")]  # 2,800 and 1,280 bytes
    for o, n in bigs:  # pieces of at most 1 KB inside the tensor
        assert [(s, e) for s, e in bounds if o <= s < o + n] == [(s, min(s + 1024, o + n)) for s in range(o, o + n, 1024)]
    for name, n in sizes.items():  # every byte of every tensor is in exactly one range
        o = offs[name]
        assert all(sum(s <= b < e for s, e in bounds) == 1 for b in range(o, o + n))
    assert all(e - s <= 1024 for s, e in bounds)
    flat = torch.zeros(header["nbytes"], dtype=torch.uint8)
    packer = ChunkPacker(byte_sources(ws, header["offsets"]), flat)
    srcs = {o: v for o, _, v in byte_sources(ws, header["offsets"])}
    for s, e in bounds:
        piece = packer.chunk(s, e)
        inside = [o for o, n in bigs if o <= s < o + n]
        if inside:  # a view of the tensor's own bytes, not of the pack buffer
            assert piece.data_ptr() == srcs[inside[0]].data_ptr() + (s - inside[0])
        else:
            assert piece.data_ptr() == flat.data_ptr() + s
        flat[s:e].copy_(piece)
    for (n, t), (m, u) in zip(ws, unpack_bucket(header, flat)):
        assert n == m and torch.equal(t, u)
    assert chunk_bounds(header, 0) == [(0, header["nbytes"])]


def test_packer_fills_any_byte_range_like_pack_bucket():
    """Chunks cutting tensors anywhere (and spanning alignment gaps) hold the bytes pack_bucket lays out,
    and zeros where no tensor is."""
    from archer_async.weight_sync.buckets import byte_sources, ChunkPacker, bucket_layout, pack_bucket

    ws = _mixed(1)
    header = bucket_layout(ws)
    _, ref = pack_bucket(ws, torch.device("cpu"))
    covered = torch.zeros(header["nbytes"], dtype=torch.bool)
    for o, n, _ in byte_sources(ws, header["offsets"]):
        covered[o:o + n] = True
    assert not covered.all()  # the layout has gaps, so the zero fill is exercised
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        cuts = sorted({0, header["nbytes"], *torch.randint(1, header["nbytes"], (4,), generator=g).tolist()})
        flat = torch.full((header["nbytes"],), 0xAB, dtype=torch.uint8)
        packer = ChunkPacker(byte_sources(ws, header["offsets"]), flat)
        got = torch.cat([packer.chunk(s, e).clone() for s, e in zip(cuts, cuts[1:])])
        assert torch.equal(got[covered], ref[covered])
        assert not got[~covered].any()


def test_small_chunks_with_big_tensors_arrive_bit_identical():
    init = make_sync_init(num_actors=1, timeout_s=20)
    sender = WeightSender(init, chunk_bytes=1024)
    outs, threads = _start(init, [receiver_rank(0)], [1, 2])
    sender.connect()
    sender.send(_mixed(1), version=1)
    sender.send(_mixed(2), version=2, bucket_bytes=4000)
    for th in threads:
        th.join(20)
    assert "error" not in outs[0], outs[0].get("error")
    for got, seed in zip(outs[0]["got"], (1, 2)):
        want = _mixed(seed)
        assert [n for n, _ in got] == [n for n, _ in want]
        assert all(a.dtype == b.dtype and torch.equal(a, b) for (_, a), (_, b) in zip(got, want))
    sender.close()


def test_two_receivers_two_versions_multi_bucket():
    init = make_sync_init(num_actors=2, timeout_s=20)
    sender = WeightSender(init)
    outs, threads = _start(init, [receiver_rank(0), receiver_rank(1)], [1, 2])
    sender.connect()
    s1 = sender.send(iter(_weights(1)), version=1, bucket_bytes=300)
    s2 = sender.send(_weights(2), version=2, bucket_bytes=1 << 20)
    for th in threads:
        th.join(20)
    assert s1["num_buckets"] >= 3 and s2["num_buckets"] == 1
    assert s1["num_tensors"] == len(_weights()) and s1["receivers"] == 2
    for out in outs:
        assert "error" not in out, out.get("error")
        for got, seed in zip(out["got"], (1, 2)):
            want = _weights(seed)
            assert [n for n, _ in got] == [n for n, _ in want]
            for (_, a), (_, b) in zip(got, want):
                assert a.dtype == b.dtype and torch.equal(a, b)
        assert out["stats"][0]["num_buckets"] == s1["num_buckets"]


def test_sender_holds_at_most_one_bucket():
    """Peak memory: tensors produced by the iterator are released once their bucket is sent."""
    init = make_sync_init(num_actors=1, timeout_s=20)
    sender = WeightSender(init)
    outs, threads = _start(init, [1], 0)
    sender.connect()
    alive: list = []
    peak = [0]

    def gen():
        for i in range(40):
            t = torch.full((256,), float(i))  # 1 KiB each
            alive.append(weakref.ref(t))
            peak[0] = max(peak[0], sum(r() is not None for r in alive))
            yield f"w{i}", t
            del t

    stats = sender.send(gen(), version=0, bucket_bytes=4096)
    threads[0].join(20)
    assert "error" not in outs[0], outs[0].get("error")
    assert stats["num_buckets"] == 10
    assert peak[0] <= 5, f"{peak[0]} tensors alive at once with 4-tensor buckets"
    assert [float(t[0]) for _, t in outs[0]["got"][0]] == [float(i) for i in range(40)]


@pytest.mark.parametrize("bad", ["not_a_tensor", "repeated_name"])
@pytest.mark.parametrize("where", [1, 9])  # in the first bucket (before the announcement), in the third
def test_bad_weight_fails_the_update_and_aborts_the_waiting_receivers(bad, where):
    init = make_sync_init(num_actors=2, timeout_s=60)
    sender = WeightSender(init)
    outs, threads = _start(init, [1, 2], 0)
    sender.connect()
    deadline = time.monotonic() + 30
    while not all(sender._ctl.has(f"want/0/{r}") for r in (1, 2)):  # both receivers asked for version 0
        assert time.monotonic() < deadline, "receivers never asked for version 0"
        time.sleep(0.01)

    def gen():
        for i in range(12):
            if i == where:
                yield (f"w{i}", [1.0]) if bad == "not_a_tensor" else (f"w{i - 1}", torch.zeros(256))
            else:
                yield f"w{i}", torch.full((256,), float(i))  # 1 KiB: four per 4 KiB bucket

    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match="not a tensor" if bad == "not_a_tensor" else "sent twice"):
        sender.send(gen(), version=0, bucket_bytes=4096)
    for th in threads:
        th.join(20)
    assert time.monotonic() - t0 < 20, "receivers waited for their own deadline (60 s)"
    for out in outs:
        assert isinstance(out.get("error"), WeightSyncError) and "abort" in str(out["error"]), out.get("error")


def test_version_mismatch_fails_loudly_on_both_sides():
    init = make_sync_init(num_actors=1, timeout_s=2)
    sender = WeightSender(init)
    outs, threads = _start(init, [1], 5, timeout_s=2)
    sender.connect()
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match="not ready for version 6"):
        sender.send(_weights(), version=6)
    assert time.monotonic() - t0 < 6
    threads[0].join(10)
    assert isinstance(outs[0].get("error"), WeightSyncError)
    err = str(outs[0]["error"])  # names what it waited for and what the sender announced
    assert "never announced version 5" in err and "the latest update it started is version 6" in err, err


def test_connect_deadline_names_missing_receiver():
    init = make_sync_init(num_actors=2, timeout_s=1.5)
    outs, threads = _start(init, [1], [])  # rank 2 never comes
    sender = WeightSender(init)
    with pytest.raises(WeightSyncError, match=r"ranks \[2\]"):
        sender.connect()
    threads[0].join(5)


def test_receiver_lost_mid_update_fails_sender_within_deadline_then_next_update_works():
    init = make_sync_init(num_actors=1, timeout_s=4)
    sender = WeightSender(init)
    rx = WeightReceiver(init.for_rank(1))
    box: dict = {}

    def half_then_quit():
        rx.connect()
        it = rx.receive(1)
        next(it)  # first tensor of the first bucket, then the consumer walks away
        it.close()
        box["closed"] = True
        box["got"] = [(n, t.clone()) for n, t in rx.receive(2)]

    th = threading.Thread(target=half_then_quit, daemon=True)
    th.start()
    sender.connect()
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError):
        sender.send(_weights(), version=1, bucket_bytes=1000)
    assert time.monotonic() - t0 < 10
    sender.send(_weights(3), version=2)
    th.join(10)
    assert box.get("closed")
    assert torch.equal(box["got"][0][1], _weights(3)[0][1])


def test_receiver_reconnects_after_sender_restart():
    init = make_sync_init(num_actors=1, timeout_s=10)
    s1 = WeightSender(init)
    out: dict = {}
    th = threading.Thread(target=_run_receiver, args=(init.for_rank(1), [1, 2], out), daemon=True)
    th.start()
    s1.connect()
    s1.send(_weights(1), version=1)
    s1.close()
    del s1
    time.sleep(0.2)
    s2 = WeightSender(init.to_dict())  # same address: a restarted learner
    s2.connect()  # the receiver notices the new store and says hello again
    s2.send(_weights(2), version=2)
    th.join(10)
    assert "error" not in out, out.get("error")
    assert torch.equal(out["got"][1][0][1], _weights(2)[0][1])


def test_sync_init_ranks_and_dict_form():
    from archer_async.weight_sync import make_sync_init

    init = make_sync_init(3, timeout_s=7)
    assert init.backend == "gloo" and init.world_size == 4 and init.timeout_s == 7 and init.store_port > 0
    assert [init.for_rank(receiver_rank(i)).rank for i in range(3)] == [1, 2, 3]
    assert SyncInit.from_any(init.for_rank(2).to_dict()) == init.for_rank(2)
    with pytest.raises(ValueError):
        init.for_rank(4)


def test_receive_buffer_is_reused_only_when_no_tensor_from_it_is_alive():
    init = make_sync_init(num_actors=1, timeout_s=60)
    sender = WeightSender(init)
    box: dict = {}

    def receiver():
        try:
            rx = WeightReceiver(init.for_rank(1))
            rx.connect()
            sum(t.numel() for _, t in rx.receive(1))  # tensors dropped as they are taken
            box["buf1"] = rx._buf
            held = list(rx.receive(2))  # held across the next update (a staging consumer)
            box["buf2"] = rx._buf
            box["held_before"] = [(n, t.clone()) for n, t in held]
            box["got3"] = [(n, t.clone()) for n, t in rx.receive(3)]
            box["buf3"] = rx._buf
            box["held_after"] = held
            rx.close()
        except Exception as e:  # reported to the test thread
            box["error"] = e

    th = threading.Thread(target=receiver, daemon=True)
    th.start()
    sender.connect()
    try:
        for v in (1, 2, 3):
            sender.send(_weights(seed=v), v)
        th.join(60)
    finally:
        sender.close()
    assert "error" not in box, box.get("error")
    assert box["buf2"] is box["buf1"]  # nothing of update 1 was alive: the same buffer
    assert box["buf3"] is not box["buf2"]  # update 2's tensors were alive: a fresh buffer for update 3
    assert box["buf3"].data_ptr() != box["buf2"].data_ptr()
    for (n, before), (m, after) in zip(box["held_before"], box["held_after"]):
        assert n == m and torch.equal(before, after), n  # the held tensors were not overwritten
    want3 = dict(_weights(seed=3))
    for n, t in box["got3"]:
        assert torch.equal(t, want3[n]), n


"""Segment log: framing, group commit, sealing, torn-tail repair at every byte offset."""

import os
import random

import pytest

from archer_async.config import BufferConfig
from buffer.segment_log import LogCorruptError, SegmentLog
from buffer.store import BufferStore
from tests.helpers.buffer import make_group, payload_meta, replay_log


def _records(n, rng):
    return [(1 + i % 3, [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))]) for i in range(n)]


def test_append_replay_roundtrip_and_sealing(tmp_path):
    rng = random.Random(0)
    recs = _records(50, rng)
    log = SegmentLog(tmp_path, segment_bytes=300, fsync=True)
    for i in range(0, 50, 7):
        log.append(recs[i:i + 7])
        log.sync()
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert sum(n.endswith(".seg") for n in names) >= 3  # sealed by size
    assert sum(n.endswith(".open") for n in names) <= 1
    log2, got = replay_log(tmp_path)
    assert got == [(t, b"".join(p)) for t, p in recs]
    assert log2.tail is None
    locs = log2.append([(2, [b"after"])])
    assert log2.read(locs[0]) == (2, b"after")


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 7, b"\xff" * 64, bytes(range(200))])
def test_torn_last_record_every_offset(tmp_path, garbage):
    rng = random.Random(1)
    recs = _records(5, rng) + [(1, [b"the-last-record-" + bytes(rng.randrange(256) for _ in range(30))])]
    base = tmp_path / "base"
    log = SegmentLog(base, fsync=False)
    locs = log.append(recs)
    log.sync()
    log.close()
    (seg,) = list(base.iterdir())
    data = seg.read_bytes()
    last = locs[-1]
    assert last.offset + last.size == len(data)
    expect = [(t, b"".join(p)) for t, p in recs[:-1]]
    for cut in range(last.offset, len(data)):
        d = tmp_path / f"c{cut}"
        d.mkdir()
        (d / seg.name).write_bytes(data[:cut] + garbage)
        log2, got = replay_log(d)
        assert got == expect, cut
        if cut > last.offset or garbage:
            assert log2.tail is not None and log2.tail.valid_bytes == last.offset
        assert (d / seg.name).stat().st_size == last.offset  # repaired on disk
        # the log stays usable: a new record goes right after the committed prefix
        log2.append([(3, [b"new"])])
        log2.close()
        _, again = replay_log(d)
        assert again == expect + [(3, b"new")]


def test_garbage_after_complete_log_is_cut(tmp_path):
    log = SegmentLog(tmp_path, fsync=False)
    log.append([(1, [b"a"]), (2, [b"bb"])])
    log.close()
    (seg,) = list(tmp_path.iterdir())
    with open(seg, "ab") as f:
        f.write(os.urandom(100))
    log2, got = replay_log(tmp_path)
    assert got == [(1, b"a"), (2, b"bb")] and log2.tail.truncated_bytes == 100


def test_corrupt_sealed_segment_is_loud(tmp_path):
    log = SegmentLog(tmp_path, segment_bytes=10, fsync=False)
    log.append([(1, [b"x" * 20])])
    log.sync()
    log.append([(1, [b"y" * 20])])
    log.sync()
    log.close()
    sealed = sorted(tmp_path.glob("*.seg"))[0]
    raw = bytearray(sealed.read_bytes())
    raw[12] ^= 0xFF
    sealed.write_bytes(bytes(raw))
    with pytest.raises(LogCorruptError):
        replay_log(tmp_path)


def test_store_torn_group_record_yields_committed_groups(tmp_path):
    cfg = BufferConfig(fsync=False, filter_groups=False)
    store = BufferStore(tmp_path, cfg, 8)
    groups = [make_group(i) for i in range(4)]
    assert store.ingest([payload_meta(g) for g in groups]) == ["stored"] * 4
    store.commit()
    store.close()
    (seg,) = list(tmp_path.iterdir())
    data = seg.read_bytes()
    last = store.table.entries[-1].loc
    for cut in range(last.offset, len(data), 97):
        seg.write_bytes(data[:cut] + b"\x00garbage")
        s2 = BufferStore(tmp_path, cfg, 8)
        assert [e.meta.group_id for e in s2.table.entries] == [g.group_id for g in groups[:3]]
        s2.close()


def test_legacy_crc32_records_replay_and_sync_drops_page_cache(tmp_path):
    import zlib

    from buffer.segment_log import HEADER

    old = b""  # two records framed the way earlier versions wrote them (CRC32 check)
    for rtype, body in ((1, b"old-one"), (2, b"old-two")):
        tb = bytes([rtype]) + body
        old += HEADER.pack(len(tb), zlib.crc32(tb)) + tb
    (tmp_path / "00000001.open").write_bytes(old + b"\x05\x00\x00\x00torn")
    log, got = replay_log(tmp_path, fsync=True)
    assert got == [(1, b"old-one"), (2, b"old-two")] and log.tail.truncated_bytes == 8
    log.append([(3, [b"new-", b"format"])])
    log.sync()
    assert log._dropped == log._size  # synced pages handed back to the kernel
    log.close()
    _, again = replay_log(tmp_path)
    assert again == [(1, b"old-one"), (2, b"old-two"), (3, b"new-format")]


def test_group_prefix_check_without_decode():
    import msgspec

    from archer_async.types import encode_group
    from buffer.store import check_group_prefix, meta_from_header
    from archer_async.types import GroupHeader

    g = make_group(7)
    data = encode_group(g)
    check_group_prefix(data, g.group_id)
    assert meta_from_header(GroupHeader.of(g), data, verify=False).group_id == g.group_id
    for bad_payload, gid in ((data, "a-g8"), (data, "a-g"), (msgspec.msgpack.encode([g.group_id]), g.group_id),
                             (b"", g.group_id), (data[:5], g.group_id)):
        with pytest.raises(ValueError):
            check_group_prefix(bad_payload, gid)
    with pytest.raises(ValueError):  # an authentic header describing another group's bytes
        meta_from_header(GroupHeader.of(make_group(8)), data, verify=False)

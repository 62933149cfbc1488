"""Damage inside the active segment is refused by name (file, byte offset), never cut as a torn tail."""

import pytest

from archer_async.config import BufferConfig
from buffer.segment_log import HEADER, LogCorruptError, SegmentLog
from buffer.store import BufferStore
from tests.helpers.buffer import make_group, payload_meta, replay_log


def _active_log(path, n=6):
    log = SegmentLog(path, fsync=False)
    locs = log.append([(1, [f"record-{i}-".encode() * 5]) for i in range(n)])
    log.sync()
    log.close()
    (seg,) = list(path.iterdir())
    assert seg.suffix == ".open"
    return seg, locs


@pytest.mark.parametrize("where", ["body", "check", "type", "length-low", "length-high"])
def test_flipped_bit_mid_active_segment_is_refused_and_file_kept(tmp_path, where):
    seg, locs = _active_log(tmp_path)
    victim = locs[2]
    byte = {"body": victim.offset + HEADER.size + 7, "check": victim.offset + 5,
            "type": victim.offset + HEADER.size, "length-low": victim.offset,
            "length-high": victim.offset + 3}[where]
    bit = 0x80 if where == "length-high" else 0x04
    raw = bytearray(seg.read_bytes())
    raw[byte] ^= bit
    seg.write_bytes(bytes(raw))
    for readonly in (True, False):
        with pytest.raises(LogCorruptError) as e:
            replay_log(tmp_path, readonly=readonly)
        msg = str(e.value)
        assert str(seg) in msg and f"byte {victim.offset}" in msg and "not a torn tail" in msg
        assert "\n" not in msg
        assert seg.read_bytes() == bytes(raw)  # nothing cut: the file is kept for inspection


def test_store_refuses_and_keeps_acknowledged_groups(tmp_path):
    cfg = BufferConfig(fsync=False, filter_groups=False)
    store = BufferStore(tmp_path, cfg, 8)
    groups = [make_group(i) for i in range(6)]
    assert store.ingest([payload_meta(g) for g in groups]) == ["stored"] * 6
    store.commit()
    store.close()
    (seg,) = list(tmp_path.iterdir())
    size = seg.stat().st_size
    loc = store.table.entries[1].loc
    raw = bytearray(seg.read_bytes())
    raw[loc.offset + loc.size // 2] ^= 0x01
    seg.write_bytes(bytes(raw))
    with pytest.raises(LogCorruptError, match=f"byte {loc.offset}"):
        BufferStore(tmp_path, cfg, 8)
    assert seg.stat().st_size == size


def test_incomplete_final_record_is_still_cut(tmp_path):
    seg, locs = _active_log(tmp_path)
    data = seg.read_bytes()
    seg.write_bytes(data[:locs[-1].offset + 12])
    log, got = replay_log(tmp_path)
    assert len(got) == len(locs) - 1 and log.tail.valid_bytes == locs[-1].offset
    assert seg.stat().st_size == locs[-1].offset

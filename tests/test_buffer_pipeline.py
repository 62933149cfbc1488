"""Pipelined group commit of the segment log: records queued by the owner are written by helper
threads in sync-point order (the write of one point overlapping the fsync of the previous), across
segment seals, and replay returns every record exactly once, in order; in direct mode (O_DIRECT)
every point ends on a block boundary and the padding never reaches the reader."""

import errno
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from buffer.segment_log import BLOCK, SegmentLog


def _direct_io_supported(path) -> bool:
    try:
        fd = os.open(path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(path / "probe")
    return True


@pytest.mark.parametrize("direct", [False, True])
def test_deferred_points_written_in_order_across_seals(tmp_path, direct):
    if direct and not _direct_io_supported(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    log = SegmentLog(tmp_path, segment_bytes=2000, fsync=True, direct=direct)
    log.deferred = True
    want, futures = [], []
    with ThreadPoolExecutor(2) as pool:
        for k in range(60):
            body = bytes([k]) * (50 + 7 * k)
            log.append([(1 + k % 3, [body[:10], body[10:]])])
            want.append((1 + k % 3, body))
            if k % 4 == 3:  # a commit every 4 records, two in flight at a time
                futures.append(pool.submit(log.run_sync, log.begin_sync()))
        futures.append(pool.submit(log.run_sync, log.begin_sync()))
        for f in futures:
            f.result()
    log.close()
    assert len(log.segments()) > 3 and all(p.suffix == ".seg" for _, p in log.segments()[:-1])
    if direct:
        assert log.direct  # never fell back to the page cache
        assert all(p.stat().st_size % BLOCK == 0 for _, p in log.segments())
    log2 = SegmentLog(tmp_path, segment_bytes=2000, fsync=True)
    got = [(t, bytes(b)) for t, b, _ in log2.replay()]
    assert got == want and log2.tail is None


def _replayed(path):
    log = SegmentLog(path, fsync=True)
    return log, [(t, bytes(b)) for t, b, _ in log.replay()]


def test_direct_log_after_an_unaligned_tail_and_a_torn_padding(tmp_path):
    if not _direct_io_supported(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    log = SegmentLog(tmp_path, fsync=True, direct=True)
    log.append([(1, [b"immediate"])])  # immediate mode: the segment ends unaligned
    log.sync()
    log.deferred = True
    log.append([(2, [b"x" * 5000])])  # starts unaligned: written buffered, padded to a block
    log.run_sync(log.begin_sync())
    assert log._dfd is None
    (loc,) = log.append([(3, [b"y" * 3000, b"z"])])  # aligned: written with O_DIRECT
    log.run_sync(log.begin_sync())
    assert log._dfd is not None and loc.offset % BLOCK == 0
    assert log.read(loc) == (3, b"y" * 3000 + b"z")
    log.close()
    want = [(1, b"immediate"), (2, b"x" * 5000), (3, b"y" * 3000 + b"z")]
    (seg,) = [p for _, p in log.segments()]
    assert seg.stat().st_size % BLOCK == 0
    log2, got = _replayed(tmp_path)
    assert got == want and log2.tail is None
    log2.close()
    # a crash inside the last padding record: the tail is cut back to the last real record
    end = loc.offset + loc.size
    os.truncate(seg, seg.stat().st_size - 10)
    log3, got = _replayed(tmp_path)
    assert got == want and log3.tail.valid_bytes == end and seg.stat().st_size == end
    log3.deferred = True  # the repaired, unaligned log keeps going
    log3.append([(1, [b"after"])])
    log3.run_sync(log3.begin_sync())
    log3.append([(2, [b"later"])])
    log3.run_sync(log3.begin_sync())
    log3.close()
    assert _replayed(tmp_path)[1] == want + [(1, b"after"), (2, b"later")]


def test_direct_io_refused_writes_buffered_and_says_so(tmp_path, monkeypatch, caplog):
    real_open = os.open

    def open_refusing_direct_fake(path, flags, *args):  # a filesystem without O_DIRECT
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_refusing_direct_fake)
    log = SegmentLog(tmp_path, fsync=True, direct=True)
    log.deferred = True
    want = []
    with caplog.at_level(logging.WARNING, logger="buffer.log"):
        for k in range(3):
            log.append([(1, [bytes([k]) * 700])])
            want.append((1, bytes([k]) * 700))
            log.run_sync(log.begin_sync())
    log.close()
    assert not log.direct and "direct I/O refused" in caplog.text
    assert _replayed(tmp_path)[1] == want

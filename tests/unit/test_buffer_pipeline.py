"""Pipelined group commit of the segment log: records queued by the owner are written by helper
threads in sync-point order (the write of one point overlapping the fsync of the previous), across
segment seals, and replay returns every record exactly once, in order; in direct mode (O_DIRECT)
every point ends on a block boundary and the padding never reaches the reader."""

import errno
import logging
import mmap
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from buffer.segment_log import BLOCK, DIRECT_MIN_BYTES, SegmentLog
from tests.helpers.buffer import replay_log


def _direct_io_supported(path) -> bool:
    """This filesystem opens and writes a block with O_DIRECT."""
    try:
        fd = os.open(path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        os.pwrite(fd, mmap.mmap(-1, BLOCK), 0)  # page-aligned
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(path / "probe")
    return True


@pytest.fixture
def direct_tmp(tmp_path):
    """A directory on a filesystem that takes O_DIRECT writes: tmp_path, else a temporary directory
    inside the checkout (a machine's /tmp may be tmpfs, which refuses O_DIRECT, while the checkout is
    on a disk). Skips only where neither takes it."""
    if _direct_io_supported(tmp_path):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix=".direct-io-test-", dir=Path(__file__).resolve().parent))
    try:
        if not _direct_io_supported(d):
            pytest.skip("neither the test's temporary directory nor the checkout's filesystem takes O_DIRECT")
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def direct_always(monkeypatch):
    """Every sync point padded and written direct, however small (the mechanics, on small records)."""
    monkeypatch.setattr("buffer.segment_log.DIRECT_MIN_BYTES", 0)


def _count_direct_writes(monkeypatch) -> list:
    """Spy: one entry per piece written through the O_DIRECT handle."""
    pieces = []
    real = SegmentLog._pwrite_all

    def spy(self, data, offset):
        pieces.append((offset, len(data)))
        return real(self, data, offset)

    monkeypatch.setattr(SegmentLog, "_pwrite_all", spy)
    return pieces


@pytest.mark.parametrize("direct", [False, True])
def test_deferred_points_written_in_order_across_seals(tmp_path, direct, monkeypatch, direct_always, request):
    if direct:
        tmp_path = request.getfixturevalue("direct_tmp")
    pieces = _count_direct_writes(monkeypatch)
    # direct: every point is padded to 4 KiB, so segments hold several points only when larger
    log = SegmentLog(tmp_path, segment_bytes=12_000 if direct else 2000, fsync=True, direct=direct)
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
    assert log._stage is None  # the staging buffer goes with close
    if direct:
        assert log.direct and len(pieces) >= 15  # every point went past the page cache
        assert all(off % BLOCK == 0 and n % BLOCK == 0 for off, n in pieces)
        assert all(p.stat().st_size % BLOCK == 0 for _, p in log.segments())
    else:
        assert not pieces
    log2 = SegmentLog(tmp_path, segment_bytes=2000, fsync=True)
    got = [(t, bytes(b)) for t, b, _ in log2.replay()]
    assert got == want and log2.tail is None


def test_direct_log_after_an_unaligned_tail_and_a_torn_padding(direct_tmp, direct_always):
    log = SegmentLog(direct_tmp, fsync=True, direct=True)
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
    log2, got = replay_log(direct_tmp)
    assert got == want and log2.tail is None
    log2.close()
    # a crash inside the last padding record: the tail is cut back to the last real record
    end = loc.offset + loc.size
    os.truncate(seg, seg.stat().st_size - 10)
    log3, got = replay_log(direct_tmp)
    assert got == want and log3.tail.valid_bytes == end and seg.stat().st_size == end
    log3.deferred = True  # the repaired, unaligned log keeps going
    log3.append([(1, [b"after"])])
    log3.run_sync(log3.begin_sync())
    log3.append([(2, [b"later"])])
    log3.run_sync(log3.begin_sync())
    log3.close()
    assert replay_log(direct_tmp)[1] == want + [(1, b"after"), (2, b"later")]


def test_direct_io_refused_writes_buffered_and_says_so(tmp_path, monkeypatch, caplog, direct_always):
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
    assert replay_log(tmp_path)[1] == want


@pytest.mark.parametrize("gap", list(range(0, 20)) + [BLOCK - 9, BLOCK - 1])
def test_direct_padding_of_every_small_gap(direct_tmp, gap, direct_always):
    """A gap shorter than a record header is padded into the next block (and replay skips the pad)."""
    log = SegmentLog(direct_tmp, fsync=True, direct=True)
    log.deferred = True
    body = b"g" * (2 * BLOCK - gap - 9)  # header 9 bytes: the point ends `gap` bytes before a boundary
    log.append([(1, [body])])
    log.run_sync(log.begin_sync())
    (loc,) = log.append([(2, [b"next"])])
    log.run_sync(log.begin_sync())
    assert loc.offset % BLOCK == 0 and loc.offset >= 2 * BLOCK and log.read(loc) == (2, b"next")
    log.close()
    assert replay_log(direct_tmp)[1] == [(1, body), (2, b"next")]


def _pwrite_fake(monkeypatch, fail_at: int, error: "OSError | None") -> list:
    """Fake os.pwrite: the `fail_at`-th call (0-based) raises `error`, or (error None) writes only the
    first half (whole blocks when the data is an even number of blocks). Returns the call counter."""
    real = os.pwrite
    calls = [0]

    def pwrite_fake(fd, data, offset):
        k = calls[0]
        calls[0] += 1
        if k == fail_at:
            if error is not None:
                raise error
            return real(fd, memoryview(data)[:len(data) // 2], offset)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite_fake)
    return calls


def _three_points(log):
    want = []
    for k in range(3):
        body = bytes([k]) * (6000 + 1000 * k)
        log.append([(1, [body])])
        want.append((1, body))
        log.run_sync(log.begin_sync())
    return want


def test_short_direct_write_is_written_again_buffered(direct_tmp, monkeypatch, direct_always):
    monkeypatch.setattr("buffer.segment_log._STAGE_BYTES", 2 * BLOCK)  # each point one piece of 2 blocks
    calls = _pwrite_fake(monkeypatch, fail_at=1, error=None)  # the 2nd point: one block of two goes out
    log = SegmentLog(direct_tmp, fsync=True, direct=True)
    log.deferred = True
    want = _three_points(log)
    log.close()
    assert calls[0] == 3  # three direct writes: the short one was not retried direct
    assert log.direct  # a short write is not a refusal
    log2, got = replay_log(direct_tmp)
    assert got == want and log2.tail is None


@pytest.mark.parametrize("error", [errno.EIO, errno.EINVAL])
def test_failed_direct_write_leaves_no_partial_record(direct_tmp, monkeypatch, direct_always, error):
    """After a direct write succeeded, any error (EINVAL too) fails the log; direct mode stays on."""
    monkeypatch.setattr("buffer.segment_log._STAGE_BYTES", BLOCK)
    _pwrite_fake(monkeypatch, fail_at=3, error=OSError(error, os.strerror(error)))
    log = SegmentLog(direct_tmp, fsync=True, direct=True)
    log.deferred = True
    body = b"a" * 6000
    log.append([(1, [body])])
    log.run_sync(log.begin_sync())  # pieces 0 and 1
    log.append([(1, [b"b" * 9000])])
    with pytest.raises(OSError, match=os.strerror(error)):
        log.run_sync(log.begin_sync())  # piece 2 written, piece 3 fails: cut back to the point's start
    assert log.direct
    (seg,) = [p for _, p in log.segments()]
    assert seg.stat().st_size == 2 * BLOCK
    log2, got = replay_log(direct_tmp)
    assert got == [(1, body)] and log2.tail is None


def test_small_points_are_written_buffered_without_padding(direct_tmp, monkeypatch):
    pieces = _count_direct_writes(monkeypatch)
    log = SegmentLog(direct_tmp, fsync=True, direct=True)
    log.deferred = True
    small = log.append([(2, [b"delivery"])])[0]
    log.run_sync(log.begin_sync())
    (seg,) = [p for _, p in log.segments()]
    assert seg.stat().st_size == small.size and not pieces  # no padding, page cache
    big = [bytes([k]) * DIRECT_MIN_BYTES for k in range(2)]
    log.append([(1, [big[0]])])  # starts unaligned: buffered, padded
    log.run_sync(log.begin_sync())
    assert not pieces and seg.stat().st_size % BLOCK == 0
    log.append([(1, [big[1]])])  # aligned and large: direct
    log.run_sync(log.begin_sync())
    assert pieces and seg.stat().st_size % BLOCK == 0
    log.close()
    assert replay_log(direct_tmp)[1] == [(2, b"delivery"), (1, big[0]), (1, big[1])]


def test_einval_on_the_first_direct_write_is_a_refusal(direct_tmp, monkeypatch, caplog, direct_always):
    """A filesystem that opens O_DIRECT but refuses the first write: buffered from then on, nothing lost."""
    calls = _pwrite_fake(monkeypatch, fail_at=0, error=OSError(errno.EINVAL, "Invalid argument"))
    log = SegmentLog(direct_tmp, fsync=True, direct=True)
    log.deferred = True
    with caplog.at_level(logging.WARNING, logger="buffer.log"):
        want = _three_points(log)
    log.close()
    assert calls[0] == 1 and not log.direct and "direct I/O refused" in caplog.text
    log2, got = replay_log(direct_tmp)
    assert got == want and log2.tail is None

"""Pipelined group commit of the segment log: records queued by the owner are written by helper
threads in sync-point order (the write of one point overlapping the fsync of the previous), across
segment seals, and replay returns every record exactly once, in order."""

from concurrent.futures import ThreadPoolExecutor

from buffer.segment_log import SegmentLog


def test_deferred_points_written_in_order_across_seals(tmp_path):
    log = SegmentLog(tmp_path, segment_bytes=2000, fsync=True)
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
    log2 = SegmentLog(tmp_path, segment_bytes=2000, fsync=True)
    got = [(t, bytes(b)) for t, b, _ in log2.replay()]
    assert got == want and log2.tail is None

"""A full disk while the buffer writes its log (simulated with RLIMIT_FSIZE on the real buffer process):
the buffer stops with an error, nothing it acknowledged is lost, no partial record stays behind, and a
restarted buffer takes the producers' unacknowledged groups (re-sent by their clients)."""

import resource
import signal
import subprocess
from pathlib import Path

import pytest

from archer_async.buffer_client import BufferClient, BufferTimeout
from archer_async.config import BufferConfig
from buffer.store import BufferStore
from tests.helpers.buffer import make_group, start_server

pytestmark = pytest.mark.integration

_LIMIT = 256 << 10  # bytes a log file may reach: "the disk is full" past this


def _limited_server(run_dir: Path, cfg: dict) -> subprocess.Popen:
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (_LIMIT, _LIMIT))

    return start_server(run_dir, cfg, preexec_fn=limit)


def test_disk_full_mid_ingest_loses_nothing_acknowledged(tmp_path):
    cfg = {"capacity": 10_000, "max_staleness": 1000, "fsync": True, "segment_bytes": 64 << 20}
    proc = _limited_server(tmp_path, cfg)
    acked, unacked = [], []
    try:
        with BufferClient.from_run_dir(tmp_path, client_id="actor0", ack_timeout_s=1.0) as c:
            for i in range(400):  # ~1.6 KB per group: the limit is hit well before the end
                g = make_group(i, actor="actor0", tokens=200)
                try:
                    r = c.put(g, timeout=5)
                except BufferTimeout:
                    unacked.append(g.group_id)
                    break
                acked.append(r.group_id)
            assert unacked, "the simulated disk never filled"
            assert proc.wait(30) != 0  # the buffer stopped with an error, no silent hang
            err = proc.stderr.read().decode()
            assert "File too large" in err or "No space" in err or "Errno 27" in err, err[-2000:]
            # nothing acknowledged is lost, the failed write left no partial record
            store = BufferStore(tmp_path / "buffer" / "log", BufferConfig(**cfg), 8, readonly=True)
            stored = {e.meta.group_id for e in store.table.entries}
            assert set(acked) <= stored
            assert store.log.tail is None  # the segment was cut back to its last complete record
            store.log.close() if hasattr(store.log, "close") else None
            # space again: a restarted buffer takes the group the client kept re-sending
            proc = start_server(tmp_path, cfg)
            r = c.put(make_group(len(acked), actor="actor0", tokens=200), timeout=60)
            assert r.group_id == unacked[0] and r.status in ("stored", "duplicate")
            stats = c.stats()
            assert stats["stored_total"] == len(acked) + 1
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)

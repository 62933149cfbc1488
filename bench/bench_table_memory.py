"""Memory the buffer keeps per group it has stored, once the group is finished (consumed).

    .venv/bin/python -m bench.bench_table_memory [--groups 10000] [--samples 8]

A long run keeps one table entry per group it ever stored (duplicate detection, rewind to a
checkpoint), so this is the buffer's growth rate per trained group. Ingests `--groups` groups of
`--samples` samples into a BufferStore (a real segment log in a temp dir, fsync off), delivers each
batch of 250 to a learner, and reports Python heap bytes (tracemalloc) per finished group.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

from archer_async.config import BufferConfig
from buffer.store import BufferStore
from buffer.table import GroupMeta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=10_000)
    ap.add_argument("--samples", type=int, default=8)
    args = ap.parse_args()
    batch = 250
    with tempfile.TemporaryDirectory() as d:
        st = BufferStore(Path(d) / "log", BufferConfig(capacity=2 * batch, fsync=False, max_staleness=10**6,
                                                      filter_groups=False), batch)
        payload = b"\x85" + b"x" * 2000
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for k0 in range(0, args.groups, batch):
            items = [(GroupMeta(group_id=f"actor0-{k:08d}", min_version=0, max_version=0, actor_id="actor0",
                                prompt_index=k, sample_ids=[f"actor0-{k:08d}-{j}" for j in range(args.samples)],
                                reward_statuses=["pass", "fail"] * (args.samples // 2), num_tokens=400,
                                created_at=time.time(), nbytes=len(payload)), payload) for k in range(k0, k0 + batch)]
            st.ingest(items)
            st.commit()
            assert st.sample(batch, 0, "learner", f"r{k0}") is not None
            del items
        used = tracemalloc.get_traced_memory()[0] - base
        st.close()
    n = args.groups // batch * batch
    print(f"{n} groups of {args.samples} samples stored and consumed: {used / 2**20:.2f} MiB of Python heap, "
          f"{used / n:.0f} bytes per finished group")


if __name__ == "__main__":
    main()

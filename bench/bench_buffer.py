"""Buffer ingest throughput vs raw pyzmq PUSH/PULL of the same bytes, measured side by side.

    .venv/bin/python bench/bench_buffer.py [--groups 1000] [--producers 2] [--samples 16] [--tokens 1000]

Each group: `--samples` responses of `--tokens` tokens (random token ids and log-probs), encoded once
(msgspec msgpack, ~230 KB for 16 x 1000); producers only patch the group id into the bytes. Modes,
all with the same producer processes and bytes:
  raw          pyzmq PUSH (one per producer) -> one PULL process; time until the last byte arrives
  buffer/nosync the buffer process (`python -m buffer`), HMAC-signed puts, CRC-framed log writes,
               acknowledgement after the write (buffer.fsync=false)
  buffer/fsync same with one fsync per batch before acknowledging (buffer.fsync=true, the default)
  buffer/fsync+trust  same, with buffer.verify_payload=false (no server-side msgpack decode)
Throughput = groups / seconds from the producers' start barrier to the last ack (or receive).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from archer_async.buffer_client import group_header  # noqa: E402
from archer_async.types import Reward, Sample, TrajectoryGroup, encode_group  # noqa: E402

ID_TEMPLATE = "bench-g0000000"


def template(samples: int, tokens: int) -> tuple[bytes, bytes, dict]:
    """(head, tail) of an encoded group around its group_id, and its put header (group_header)."""
    rng = random.Random(0)
    ss = [Sample(sample_id=f"bench-{j}", response_ids=[rng.randrange(150_000) for _ in range(tokens)],
                 behavior_logprobs=[-rng.random() * 3 for _ in range(tokens)], token_versions=[0] * tokens,
                 finish_reason="stop", reward=Reward("pass" if j % 2 else "fail")) for j in range(samples)]
    g = TrajectoryGroup(group_id=ID_TEMPLATE, prompt_index=0, data_source="bench",
                        prompt_ids=list(range(256)), samples=ss, actor_id="bench")
    data = encode_group(g)
    i = data.index(ID_TEMPLATE.encode())
    return data[:i], data[i + len(ID_TEMPLATE):], group_header(g)


def group_bytes(head: bytes, tail: bytes, k: int) -> tuple[str, bytes]:
    gid = f"bench-g{k:07d}"
    assert len(gid) == len(ID_TEMPLATE)
    return gid, head + gid.encode() + tail


def raw_producer(addr, ids, head, tail, barrier):
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.connect(addr)
    barrier.wait()
    for k in ids:
        s.send(group_bytes(head, tail, k)[1], copy=False)
    s.close(linger=-1)
    ctx.term()


def buffer_producer(run_dir, ids, head, tail, meta, barrier, window):
    from archer_async.buffer_client import BufferClient
    c = BufferClient.from_run_dir(run_dir, client_id=f"bench-{os.getpid()}", max_pending=window)
    c.ping()
    barrier.wait()
    for k in ids:
        gid, data = group_bytes(head, tail, k)
        c.submit_encoded(gid, data, dict(meta, gid=gid))
    res = c.flush(timeout=600)
    assert len(res) == len(ids) and all(r.status == "stored" for r in res), res[:3]
    c.close()


MODES = ("raw", "buffer/nosync", "buffer/fsync", "buffer/fsync+trust")


def split(n, p):
    return [list(range(i, n, p)) for i in range(p)]


def run_raw(n, p, head, tail) -> float:
    import zmq
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    mpc = mp.get_context("spawn")
    barrier = mpc.Barrier(p + 1)
    procs = [mpc.Process(target=raw_producer, args=(f"tcp://127.0.0.1:{port}", ids, head, tail, barrier))
             for ids in split(n, p)]
    for pr in procs:
        pr.start()
    barrier.wait()
    t0 = time.perf_counter()
    nbytes = 0
    for _ in range(n):
        nbytes += len(pull.recv(copy=False))
    dt = time.perf_counter() - t0
    for pr in procs:
        pr.join()
    pull.close()
    ctx.term()
    return dt


def run_buffer(n, p, head, tail, meta, fsync: bool, verify: bool, window: int, base: Path) -> tuple[float, int]:
    run_dir = Path(tempfile.mkdtemp(prefix="bench-buffer-", dir=base))
    cfg = {"capacity": n + 10, "fsync": fsync, "max_staleness": 1000, "verify_payload": verify}
    server = subprocess.Popen([sys.executable, "-m", "buffer", "--run-dir", str(run_dir), "--config-json",
                               json.dumps(cfg)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    server.stdout.readline()  # endpoints: ready
    mpc = mp.get_context("spawn")
    barrier = mpc.Barrier(p + 1)
    procs = [mpc.Process(target=buffer_producer, args=(str(run_dir), ids, head, tail, meta, barrier, window))
             for ids in split(n, p)]
    for pr in procs:
        pr.start()
    barrier.wait()
    t0 = time.perf_counter()
    for pr in procs:
        pr.join()
    dt = time.perf_counter() - t0
    ok = all(pr.exitcode == 0 for pr in procs)
    server.terminate()
    server.wait(30)
    disk = sum(f.stat().st_size for f in (run_dir / "buffer" / "log").iterdir())
    shutil.rmtree(run_dir, ignore_errors=True)
    if not ok:
        raise SystemExit("a producer failed")
    return dt, disk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=1000)
    ap.add_argument("--producers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--window", type=int, default=32, help="unacknowledged puts per producer")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", default="", help="where the buffer's run dirs go (default: a temp dir)")
    args = ap.parse_args()
    head, tail, meta = template(args.samples, args.tokens)
    size = len(head) + len(ID_TEMPLATE) + len(tail)
    base = Path(args.dir or tempfile.gettempdir())
    n, p = args.groups, args.producers
    print(f"{n} groups x {args.samples} samples x {args.tokens} tokens = {size} bytes/group, "
          f"{p} producer processes, window {args.window}", flush=True)
    rows = {}
    for rep in range(args.repeats):  # interleaved, so every mode sees the same machine load
        for mode in MODES:
            if mode == "raw":
                dt, disk = run_raw(n, p, head, tail), 0
            else:
                dt, disk = run_buffer(n, p, head, tail, meta, "nosync" not in mode, "trust" not in mode,
                                      args.window, base)
            rows.setdefault(mode, []).append((dt, disk))
            print(f"  rep {rep} {mode:14s} {n / dt:9.0f} groups/s {n * size / dt / 1e6:8.0f} MB/s", flush=True)
    best_raw = min(dt for dt, _ in rows["raw"])
    print("\n| mode | groups/s | MB/s | % of raw | log bytes on disk |")
    print("|---|---:|---:|---:|---:|")
    for mode, rs in rows.items():
        dt = min(d for d, _ in rs)
        print(f"| {mode} | {n / dt:,.0f} | {n * size / dt / 1e6:,.0f} | {100 * best_raw / dt:.0f}% | "
              f"{rs[0][1]:,} |")


if __name__ == "__main__":
    main()

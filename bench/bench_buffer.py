"""Buffer ingest throughput vs raw pyzmq PUSH/PULL of the same bytes, measured side by side.

    .venv/bin/python -m bench.bench_buffer [--groups 1000] [--producers 2] [--repeats 5] [--samples 16] [--tokens 1000] [--check-costs]

Each group: `--samples` responses of `--tokens` tokens (random token ids and log-probs), encoded once
(msgspec msgpack, ~230 KB for 16 x 1000); producers only patch the group id into the bytes. Modes,
all with the same producer processes and bytes, interleaved within each repetition:
  raw          pyzmq PUSH (one per producer) -> one PULL process; time until the last byte arrives
  raw+hold     raw, but the PULL side keeps every message until the end, as the buffer did before it
               read payloads back from its log: every message lands in fresh memory
  raw+curve    the same with CurveZMQ on the sockets (authenticated encryption in libzmq's I/O threads)
  buffer/nosync the buffer process (`python -m buffer`), every put MAC'd (AES-256-GCM tag over all bytes),
               XXH3-checked log records, one ack message per producer per batch (buffer.fsync=false)
  buffer/fsync same with one fsync per batch before acknowledging (buffer.fsync=true, the default;
               the log written with O_DIRECT, buffer.direct_io=true, the default)
  buffer/fsync+pagecache same as fsync, the log written through the page cache (buffer.direct_io=false)
  buffer/fsync+verify same as fsync with buffer.verify_payload=true (server-side msgpack decode)
Throughput = groups / seconds from the producers' start barrier to the last ack (or receive).
Reported: median over the repetitions and the min-max spread; % of raw = median / median of raw.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from archer_async.types import GroupHeader
from archer_async.types import Reward, Sample, TrajectoryGroup, encode_group

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
    return data[:i], data[i + len(ID_TEMPLATE):], GroupHeader.of(g)


def group_bytes(head: bytes, tail: bytes, k: int) -> tuple[str, bytes]:
    gid = f"bench-g{k:07d}"
    assert len(gid) == len(ID_TEMPLATE)
    return gid, head + gid.encode() + tail


def proc_cpu_s(pid: int) -> float:
    """user + system CPU seconds of process `pid`, all its threads (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_producer(addr, ids, head, tail, barrier, cpu, keys=None):
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    if keys is not None:  # (client public, client secret, server public), z85
        s.curve_publickey, s.curve_secretkey, s.curve_serverkey = keys
    s.connect(addr)
    barrier.wait()
    c0 = time.process_time()
    for k in ids:
        s.send(group_bytes(head, tail, k)[1], copy=False)
    s.close(linger=-1)
    ctx.term()
    cpu.put(time.process_time() - c0)


def buffer_producer(run_dir, ids, head, tail, meta, barrier, window, cpu):
    from archer_async.buffer_client import BufferClient
    kw = {"max_pending": window} if window else {}  # default: the client's own window, as actors use it
    c = BufferClient.from_run_dir(run_dir, client_id=f"bench-{os.getpid()}", **kw)
    c.ping()
    barrier.wait()
    c0 = time.process_time()
    for k in ids:
        gid, data = group_bytes(head, tail, k)
        c.submit_encoded(gid, data, dict(meta, gid=gid))
    res = c.flush(timeout=600)
    cpu.put(time.process_time() - c0)
    assert len(res) == len(ids) and all(r.status == "stored" for r in res), res[:3]
    c.close()


MODES = ("raw", "raw+hold", "raw+curve", "buffer/nosync", "buffer/fsync", "buffer/fsync+pagecache",
         "buffer/fsync+verify")


def split(n, p):
    return [list(range(i, n, p)) for i in range(p)]


def run_raw(n, p, head, tail, curve: bool = False, hold: bool = False) -> tuple[float, float, float]:
    """(seconds, producers' CPU seconds, receiver's CPU seconds)."""
    import zmq
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    keys = None
    if curve:
        spub, ssec = zmq.curve_keypair()
        cpub, csec = zmq.curve_keypair()
        pull.curve_server, pull.curve_secretkey, pull.curve_publickey = True, ssec, spub
        keys = (cpub, csec, spub)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    mpc = mp.get_context("spawn")
    barrier, cpu = mpc.Barrier(p + 1), mpc.Queue()
    procs = [mpc.Process(target=raw_producer, args=(f"tcp://127.0.0.1:{port}", ids, head, tail, barrier, cpu, keys))
             for ids in split(n, p)]
    for pr in procs:
        pr.start()
    barrier.wait()
    t0, c0 = time.perf_counter(), proc_cpu_s(os.getpid())
    kept = []
    for _ in range(n):
        m = pull.recv(copy=False)
        if hold:
            kept.append(m)
    dt, recv_cpu = time.perf_counter() - t0, proc_cpu_s(os.getpid()) - c0
    del kept
    prod_cpu = sum(cpu.get() for _ in procs)
    for pr in procs:
        pr.join()
    pull.close()
    ctx.term()
    return dt, prod_cpu, recv_cpu


def run_buffer(n, p, head, tail, meta, fsync: bool, verify: bool, window: int, base: Path, direct_io: bool = True
               ) -> tuple[float, int, float, float]:
    """(seconds, log bytes, producers' CPU seconds, buffer process CPU seconds)."""
    run_dir = Path(tempfile.mkdtemp(prefix="bench-buffer-", dir=base))
    cfg = {"capacity": n + 10, "fsync": fsync, "max_staleness": 1000, "verify_payload": verify,
           "direct_io": direct_io}
    server = subprocess.Popen([sys.executable, "-m", "buffer", "--run-dir", str(run_dir), "--config-json",
                               json.dumps(cfg)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    server.stdout.readline()  # endpoints: ready
    mpc = mp.get_context("spawn")
    barrier, cpu = mpc.Barrier(p + 1), mpc.Queue()
    procs = [mpc.Process(target=buffer_producer, args=(str(run_dir), ids, head, tail, meta, barrier, window, cpu))
             for ids in split(n, p)]
    for pr in procs:
        pr.start()
    barrier.wait()
    t0, c0 = time.perf_counter(), proc_cpu_s(server.pid)
    prod_cpu = sum(cpu.get() for _ in procs)  # arrives when a producer has all its acks
    for pr in procs:
        pr.join()
    dt, server_cpu = time.perf_counter() - t0, proc_cpu_s(server.pid) - c0
    ok = all(pr.exitcode == 0 for pr in procs)
    server.terminate()
    server.wait(30)
    disk = sum(f.stat().st_size for f in (run_dir / "buffer" / "log").iterdir())
    shutil.rmtree(run_dir, ignore_errors=True)
    if not ok:
        raise SystemExit("a producer failed")
    return dt, disk, prod_cpu, server_cpu


def check_costs(head: bytes, tail: bytes, n: int = 300, rounds: int = 5) -> dict:
    """CPU ms per group of the per-byte checks (best of `rounds` passes over `n` distinct groups, more
    than fit in the L2 caches): the wire MAC in use (AES-256-GCM tag, archer_async.wire.Signer), the
    alternatives (HMAC-SHA256; keyed BLAKE3 when the blake3 package is installed) and the log's XXH3
    record check."""
    import hashlib
    import hmac

    import xxhash

    from archer_async import wire
    groups = [group_bytes(head, tail, k)[1] for k in range(n)]
    signer, key = wire.Signer(os.urandom(32)), os.urandom(32)
    fns = {"AES-256-GCM tag (Signer.pack)": lambda g: signer.pack(wire.PROTO_REQ, {"op": "put", "rid": 1}, g),
           "HMAC-SHA256": lambda g: hmac.digest(key, g, hashlib.sha256),
           "XXH3-64 (log record check)": xxhash.xxh3_64_intdigest}
    try:
        import blake3
        fns["keyed BLAKE3"] = lambda g: blake3.blake3(g, key=key).digest()
    except ImportError:
        pass
    out = {}
    for name, fn in fns.items():
        best = float("inf")
        for _ in range(rounds):
            t0 = time.thread_time()
            for g in groups:
                fn(g)
            best = min(best, (time.thread_time() - t0) / n)
        out[name] = 1e3 * best
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=1000)
    ap.add_argument("--producers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--window", type=int, default=0,
                    help="unacknowledged puts per producer (default 0: BufferClient's default, what actors use)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    ap.add_argument("--dir", default="", help="where the buffer's run dirs go (default: a temp dir)")
    ap.add_argument("--check-costs", action="store_true", help="also print the CPU cost of the per-byte checks")
    args = ap.parse_args()
    head, tail, meta = template(args.samples, args.tokens)
    if args.check_costs:
        for name, ms in check_costs(head, tail).items():
            print(f"  check cost: {name:32s} {ms:.4f} CPU ms/group", flush=True)
    size = len(head) + len(ID_TEMPLATE) + len(tail)
    base = Path(args.dir or tempfile.gettempdir())
    n, p = args.groups, args.producers
    print(f"{n} groups x {args.samples} samples x {args.tokens} tokens = {size} bytes/group, "
          f"{p} producer processes, window {args.window or 'BufferClient default'}; load average {os.getloadavg()}", flush=True)
    rows: dict[str, list] = {}
    for rep in range(args.repeats):  # interleaved, so every mode sees the same machine load
        for mode in args.modes.split(","):
            if mode.startswith("raw"):
                dt, pc, rc = run_raw(n, p, head, tail, curve=mode == "raw+curve", hold=mode == "raw+hold")
                disk = 0
            else:
                dt, disk, pc, rc = run_buffer(n, p, head, tail, meta, "nosync" not in mode, "verify" in mode,
                                              args.window, base, direct_io="pagecache" not in mode)
            rows.setdefault(mode, []).append((n / dt, disk, 1e3 * pc / n, 1e3 * rc / n))
            print(f"  rep {rep} {mode:20s} {n / dt:9.0f} groups/s {n * size / dt / 1e6:8.0f} MB/s  CPU ms/group: "
                  f"producers {1e3 * pc / n:.3f} receiver {1e3 * rc / n:.3f}", flush=True)
    print(f"load average after: {os.getloadavg()}")
    raw_med = statistics.median(r[0] for r in rows.get("raw", [(float("nan"),)]))
    print("\n| mode | groups/s median (min-max) | MB/s median | % of raw (median) | CPU ms/group producers "
          "| CPU ms/group receiver | log bytes on disk |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, rs in rows.items():
        rates = [r[0] for r in rs]
        med = statistics.median(rates)
        print(f"| {mode} | {med:,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) | {med * size / 1e6:,.0f} | "
              f"{100 * med / raw_med:.0f}% | {statistics.median(r[2] for r in rs):.3f} | "
              f"{statistics.median(r[3] for r in rs):.3f} | {rs[0][1]:,} |")


if __name__ == "__main__":
    main()

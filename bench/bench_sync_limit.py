"""Weight sync against its limit: WeightSender -> WeightReceiver vs a raw gloo broadcast of the same bytes.

    .venv/bin/python -m bench.bench_sync_limit [--sizes-mb 1.4,64,256] [--receivers 2] [--reps 5]

One sender (this process) and `--receivers` receiver processes on 127.0.0.1, all on the gloo backend.
For every payload size the four variants below run interleaved (A B C D A B C D ...; with `--rotate` the
order rotates by one every repetition, B C D A, C D A B, ...), each timed on the sender from the
start of the update until every receiver holds the data. Between two variants the sender waits,
outside the timing, until every receiver has finished its side of the previous one (so one variant's
teardown, e.g. a fresh group's destruction on the receivers, is not billed to the next; `--no-settle`
starts the next variant at once, the method of earlier measurements). The receivers get their command
as the sender starts its clock; with `--lead-ms N` the sender waits N ms first, outside the timing, so
that the receivers are already waiting for the update (their request in the store, or the raw
receivers inside the broadcast), as the actors are in a run: the driver tells learner and actors at
once, and the learner gathers the full weights before it sends.

- project path: `WeightSender.send(named fp32 tensors, version)` -> every receiver iterates
  `WeightReceiver.receive(version)` to the end (the full protocol: request/announcement in the
  TCPStore, bucket headers, packing the tensors into one flat buffer per bucket, pipelined with its
  chunked broadcast over the gloo group kept from the previous successful update, "done"
  acknowledgements);
- raw limit: `torch.distributed.broadcast` of one flat uint8 tensor per bucket, packed beforehand
  with the same bytes, over a persistent gloo process group (created once, outside the timing), into
  receive buffers allocated and touched once per payload size, then a barrier so the sender knows
  every receiver has the bytes;
- raw + packing (diagnostic): the same data plane without the control plane: the sender lays out,
  chunks and packs the separate tensors inside the timing exactly as WeightSender does (`chunk_bounds`,
  `ChunkPacker`, `gloo_broadcast_chunks`: tensors of 4 MB or more uncopied, the rest packed, the next
  chunk packed while one travels) over the persistent group, then the barrier; so ours / (raw + packing)
  is the cost of the announcement and the acknowledgement;
- project path, fresh group (diagnostic): the same, with `WeightSender.reuse_group = False`, so every
  update rendezvouses a new gloo group (the behaviour before groups were reused);
- raw + fresh group (diagnostic): the same broadcast and barrier over a new `ProcessGroupGloo`
  rendezvoused per update in a TCPStore (what the project's protocol does for failure isolation),
  the group's creation inside the timing.

The payload is a list of fp32 tensors shaped like transformer weights (the tiny model's own
state dict for its size; square 1024-wide matrices for the larger ones). Receivers discard what they
receive (the vLLM-side reload is not part of the transfer; bench/bench_actor.py measures it).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from archer_async.weight_sync.buckets import (
    DEFAULT_CHUNK_BYTES, byte_sources, ChunkPacker, bucket_layout, chunk_bounds, chunk_size, pack_bucket,
    split_buckets,
)
from actors.weight_receiver import WeightReceiver
from learner.weight_sender import WeightSender
from archer_async.weight_sync import gloo_broadcast_chunks, free_port, make_sync_init


def payload(size_mb: float) -> list[tuple[str, torch.Tensor]]:
    """Named fp32 tensors totalling about size_mb MB: the tiny model's weights when size_mb < 4."""
    if size_mb < 4:
        try:
            from safetensors.torch import load_file

            from archer_async.config import TINY_MODEL_DIR

            path = TINY_MODEL_DIR
            files = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
            if files:
                sd = {}
                for f in files:
                    sd.update(load_file(os.path.join(path, f)))
                return [(k, v.float().contiguous()) for k, v in sorted(sd.items())]
        except Exception as e:  # noqa: BLE001 - fall back to synthetic tensors of the asked size
            print(f"tiny model unavailable ({e}); synthetic payload", file=sys.stderr)
    n = max(1, int(size_mb * 1e6 / 4))
    out, i = [], 0
    while n > 0:
        k = min(n, 1024 * 1024)
        out.append((f"layers.{i}.weight", torch.randn(k)))
        n -= k
        i += 1
    return out


def _fresh_group(store, nonce: str, rank: int, world: int):
    return dist.ProcessGroupGloo(dist.PrefixStore(f"bench-pg/{nonce}", store), rank, world,
                                 datetime.timedelta(seconds=300))


def _fresh_round(pg, flats: list[torch.Tensor]) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    for f in flats:
        pg.broadcast([f], opts).wait()
    pg.barrier().wait()


def _receiver(rank: int, world: int, init: dict, raw_port: int, store_port: int, q_in, q_out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{raw_port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    store = dist.TCPStore("127.0.0.1", store_port, world, is_master=False, timeout=datetime.timedelta(seconds=300))
    rx = WeightReceiver(dict(init, rank=rank))
    rx.connect()
    raw_bufs: dict[tuple, list[torch.Tensor]] = {}
    q_out.put("ready")
    while True:
        cmd = q_in.get()
        if cmd[0] == "stop":
            break
        if cmd[0] == "ws":
            collections.deque(rx.receive(cmd[1]), maxlen=0)  # takes every tensor and keeps none (as the
            # actors drop a loaded update), so the receiver reuses its buffer next time
        elif cmd[0] == "raw":
            key = tuple(cmd[1])
            if key not in raw_bufs:  # the limit receives into buffers it already touched, as the project path does
                raw_bufs.clear()
                raw_bufs[key] = [torch.zeros(nbytes, dtype=torch.uint8) for nbytes in key]
            chunks = cmd[2]  # per bucket: the [start, end) of its broadcasts (None: one broadcast)
            for buf, bounds in zip(raw_bufs[key], chunks or [None] * len(key)):
                if bounds is None:
                    dist.broadcast(buf, src=0)
                else:
                    gloo_broadcast_chunks(dist.group.WORLD, bounds, lambda s, e, b=buf: b[s:e], time.monotonic() + 300)
            dist.barrier()
        elif cmd[0] == "fresh":
            pg = _fresh_group(store, cmd[2], rank, world)
            _fresh_round(pg, [torch.empty(n, dtype=torch.uint8) for n in cmd[1]])
            del pg
        if cmd[-1] == "settle":
            q_out.put("idle")
    rx.close()
    dist.destroy_process_group()


def packed_buckets(buckets: list[list[tuple[str, torch.Tensor]]]) -> list[torch.Tensor]:
    """The flat uint8 buffers WeightSender would send for these buckets (same layout), packed: the raw
    limit sends the same bytes from memory holding them (an untouched buffer would be read from the
    kernel's shared zero page, which is faster than any real payload)."""
    return [pack_bucket(bucket, torch.device("cpu"))[1] for bucket in buckets]


def sender_chunks(layout: dict) -> list[tuple[int, int]]:
    """The [start, end) of the broadcasts WeightSender (default chunk_bytes) makes of a bucket with this layout."""
    return chunk_bounds(layout, chunk_size(layout["nbytes"], DEFAULT_CHUNK_BYTES))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", default="0,64,256", help="payload sizes in MB (0: the tiny model's weights)")
    ap.add_argument("--receivers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--rotate", action="store_true",
                    help="rotate the order of the variants every repetition (default: always the same order)")
    ap.add_argument("--lead-ms", type=float, default=0.0,
                    help="wait this long after commanding the receivers before starting the clock (default 0)")
    ap.add_argument("--no-settle", action="store_true",
                    help="start each variant as soon as the sender finished the previous one (default: wait, "
                         "outside the timing, until every receiver has finished its side of it too)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = 1 + args.receivers
    init = make_sync_init(args.receivers, backend="gloo", host="127.0.0.1", timeout_s=300).to_dict()
    raw_port, store_port = free_port(), free_port()
    ctx = mp.get_context("spawn")
    q_out = ctx.Queue()
    qs, procs = [], []
    for r in range(1, world):
        q = ctx.Queue()
        p = ctx.Process(target=_receiver, args=(r, world, init, raw_port, store_port, q, q_out), daemon=True)
        p.start()
        qs.append(q)
        procs.append(p)
    sender = WeightSender(init)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{raw_port}", rank=0, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    store = dist.TCPStore("127.0.0.1", store_port, world, is_master=True, timeout=datetime.timedelta(seconds=300))
    sender.connect()
    for _ in procs:
        assert q_out.get(timeout=300) == "ready"
    bucket_bytes = args.bucket_mb << 20
    settle = not args.no_settle
    lead_s = args.lead_ms / 1e3
    tag = "settle" if settle else ""
    version = 0
    results = []
    print(f"load average at start: {os.getloadavg()}", flush=True)
    for size_mb in [float(s) for s in args.sizes_mb.split(",")]:
        tensors = payload(size_mb)
        buckets = [b for b, _ in split_buckets(tensors, bucket_bytes)]
        flats = packed_buckets(buckets)
        sizes = [f.numel() for f in flats]
        times: dict[str, list[float]] = {"ws": [], "ws_fresh": [], "raw": [], "raw_pack": [], "raw_fresh": []}
        chunk_plan = [sender_chunks(bucket_layout(b)) for b in buckets]  # the receivers' side of raw + packing
        pack_buf = torch.empty(max(sizes), dtype=torch.uint8)
        stats: dict[str, dict] = {}
        counter = [version]

        def run_ws(reuse: bool, key: str) -> float:
            counter[0] += 1
            sender.reuse_group = reuse
            for q in qs:
                q.put(("ws", counter[0], tag))
            time.sleep(lead_s)
            t0 = time.perf_counter()
            stats[key] = sender.send(iter(tensors), counter[0], bucket_bytes)
            dt = time.perf_counter() - t0
            sender.reuse_group = True
            return dt

        def run_raw(pack: bool) -> float:
            """The raw limit: one broadcast of the packed payload per bucket. pack=True: the separate tensors,
            laid out, chunked and packed inside the timing exactly as WeightSender does (`gloo_broadcast_chunks`),
            without its announcement and acknowledgement."""
            for q in qs:
                q.put(("raw", sizes, chunk_plan if pack else None, tag))
            time.sleep(lead_s)
            t0 = time.perf_counter()
            for bucket, f in zip(buckets, flats):
                if not pack:
                    dist.broadcast(f, src=0)
                    continue
                layout = bucket_layout(bucket)
                n = layout["nbytes"]
                packer = ChunkPacker(byte_sources(bucket, layout["offsets"]), pack_buf[:n])
                gloo_broadcast_chunks(dist.group.WORLD, sender_chunks(layout), packer.chunk, time.monotonic() + 300)
            dist.barrier()
            return time.perf_counter() - t0

        def run_raw_fresh(rep: int) -> float:
            nonce = f"{size_mb}-{rep}"
            for q in qs:
                q.put(("fresh", sizes, nonce, tag))
            time.sleep(lead_s)
            t0 = time.perf_counter()
            pg = _fresh_group(store, nonce, 0, world)
            _fresh_round(pg, flats)
            dt = time.perf_counter() - t0
            del pg
            return dt

        variants = [("ws", lambda rep: run_ws(True, "ws")), ("ws_fresh", lambda rep: run_ws(False, "ws_fresh")),
                    ("raw", lambda rep: run_raw(False)), ("raw_pack", lambda rep: run_raw(True)), ("raw_fresh", run_raw_fresh)]
        for rep in range(args.reps + 1):              # rep 0: warm-up of every variant, not counted
            order = variants[rep % len(variants):] + variants[:rep % len(variants)] if args.rotate else variants
            for name, fn in order:
                dt = fn(rep)
                if settle:  # the receivers' side of this variant (teardown included) ends before the next starts
                    for _ in procs:
                        assert q_out.get(timeout=300) == "idle"
                if rep:
                    times[name].append(dt)
            assert stats["ws_fresh"]["new_group"] and (rep == 0 or not stats["ws"]["new_group"]), stats
        version = counter[0]
        st = stats["ws"]
        ws_times, raw_times, fresh_times, fast_times = times["ws"], times["raw"], times["raw_fresh"], times["ws_fresh"]
        row = {"payload_bytes": st["bytes"], "buckets": st["num_buckets"], "tensors": st["num_tensors"],
               "receivers": args.receivers, "reps": args.reps, "rotate": args.rotate, "settle": settle,
               "lead_ms": args.lead_ms,
               "weightsender_median_s": statistics.median(ws_times), "weightsender_min_s": min(ws_times),
               "raw_broadcast_median_s": statistics.median(raw_times), "raw_broadcast_min_s": min(raw_times),
               "raw_pack_median_s": statistics.median(times["raw_pack"]), "raw_pack_min_s": min(times["raw_pack"]),
               "raw_fresh_group_median_s": statistics.median(fresh_times), "raw_fresh_group_min_s": min(fresh_times),
               "weightsender_fresh_group_median_s": statistics.median(fast_times),
               "weightsender_fresh_group_min_s": min(fast_times), "load_avg_1m": os.getloadavg()[0]}
        row["ratio_median"] = row["weightsender_median_s"] / row["raw_broadcast_median_s"]
        row["ratio_min"] = row["weightsender_min_s"] / row["raw_broadcast_min_s"]
        row["ratio_vs_raw_pack_median"] = row["weightsender_median_s"] / row["raw_pack_median_s"]
        row["weightsender_GBps"] = st["bytes"] / row["weightsender_median_s"] / 1e9
        row["raw_GBps"] = st["bytes"] / row["raw_broadcast_median_s"] / 1e9
        results.append(row)
        print(json.dumps(row), flush=True)
    for q in qs:
        q.put(("stop",))
    for p in procs:
        p.join(60)
    sender.close()
    dist.destroy_process_group()
    print("\n| payload MB | buckets | WeightSender median s (min) | raw gloo broadcast median s (min) | ratio median (min) "
          "| raw + packing median s (ratio) | raw + fresh group median s (min) "
          "| WeightSender, fresh group, median s (min) | load avg |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['payload_bytes'] / 1e6:.2f} | {r['buckets']} | {r['weightsender_median_s']:.4f} "
              f"({r['weightsender_min_s']:.4f}) | {r['raw_broadcast_median_s']:.4f} ({r['raw_broadcast_min_s']:.4f}) | "
              f"{r['ratio_median']:.2f} ({r['ratio_min']:.2f}) | {r['raw_pack_median_s']:.4f} "
              f"({r['ratio_vs_raw_pack_median']:.2f}) | {r['raw_fresh_group_median_s']:.4f} "
              f"({r['raw_fresh_group_min_s']:.4f}) | {r['weightsender_fresh_group_median_s']:.4f} "
              f"({r['weightsender_fresh_group_min_s']:.4f}) | {r['load_avg_1m']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

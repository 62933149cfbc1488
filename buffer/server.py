"""The buffer process: ZMQ ingest from actors, sample/stats/admission for the learner and dashboard.

Two ROUTER sockets (RUN_DIR/buffer/endpoints.json names them): ``ingest`` takes ``put`` messages
(one encoded TrajectoryGroup each) and acknowledges groups once their records are durable (one ack
message per producer per group commit, listing [rid, status, group_id] of each of its groups);
``control`` serves every other op of `archer_async.wire.Op` (one handler per op, `_HANDLERS`).
Every message carries a MAC under the run's secret over all its bytes (archer_async.wire); others
are counted and refused. One thread runs the loop (receive, verify, index, queue log records, reply);
two helper threads write the queued records and fsync them (group commit: one fsync for everything
queued since the previous commit, however many producers). The loop verifies batch k+2 while batch k+1
is written and batch k fsynced; it checks for finished commits every few puts, so acknowledgements
go out as soon as their fsync returned, and never before.

Start it as a process (``python -m buffer --run-dir D [--config-json J]``) or inside any Python
process, e.g. a Ray actor, with the blocking ``serve(cfg, run_dir, restore_state, ready_callback,
stop_event)``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import zmq

from archer_async import wire
from archer_async.config import BufferConfig, Config
from archer_async.fsio import atomic_write_json
from archer_async.types import join_groups
from buffer.store import BufferStore, group_meta, meta_from_header
from buffer.table import RestoreError, share_slots

log = logging.getLogger("buffer.server")

_MAX_BATCH_BYTES = 64 << 20
_MAX_WAIT_MS = 60_000
_CHUNK = 4
"""Puts verified and appended between two checks of the commits in flight."""
_MAX_COMMITS = 2
"""Group commits in flight at once (the write of the newer overlaps the fsync of the older)."""
_PEER_S = 30.0
"""A producer silent (no reserve, release or put) for longer no longer holds back the others under
buffer.max_share_gap (it crashed, restarts or finished)."""


def resolve_config(cfg: Union[Config, BufferConfig, dict, None]) -> tuple[BufferConfig, int]:
    """(BufferConfig, batch_groups for the admission rule) from a full Config or a buffer section."""
    if cfg is None:
        cfg = BufferConfig()
    if isinstance(cfg, dict):
        cfg = Config.model_validate(cfg) if "buffer" in cfg else BufferConfig.model_validate(cfg)
    if isinstance(cfg, Config):
        b = cfg.buffer
        return b, b.admission_batch_groups or cfg.learner.batch_groups
    return cfg, cfg.admission_batch_groups or 8


@dataclass
class _Commit:
    """One group commit in flight: the groups it makes ready and the replies it releases."""

    pending: list
    replies: list
    future: Optional[Future] = None
    written: bool = False
    """Its records are written (its fsync may still run): the next commit may start."""


@dataclass
class _Waiting:
    """A sample request held until enough groups are ready or its deadline passes."""

    ident: bytes
    rid: int
    n: int
    version: int
    req: str
    deadline: float


@dataclass
class _Reserving:
    """A reserve request being answered: held (``hold``) until slots free or its deadline passes."""

    ident: bytes
    rid: int
    want: int
    deadline: float
    hold: bool


class BufferServer:
    """Bound sockets + durable store. `serve_forever` runs the loop; `close` releases everything."""

    def __init__(self, cfg: Union[Config, BufferConfig, dict, None], run_dir: str | os.PathLike,
                 restore_state: Optional[dict] = None):
        self.cfg, batch_groups = resolve_config(cfg)
        self.run_dir = Path(run_dir)
        self.dir = wire.buffer_dir(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.signer = wire.Signer(wire.ensure_secret(run_dir))
        self.store = BufferStore(self.dir / "log", self.cfg, batch_groups, restore_state)
        self._record_recovery()
        self.epoch = os.urandom(8).hex()
        self.counters = {"rejected_auth": 0, "rejected_malformed": 0, "rejected_replay": 0,
                         "rejected_stale_epoch": 0, "reserve_granted": 0, "reserve_refused": 0}
        self._fresh = wire.ReplayWindow()
        self._waiting: dict[str, _Waiting] = {}
        self._reserving: dict[str, _Reserving] = {}  # client -> its reserve request, oldest first
        self._seen: dict[str, float] = {}  # producer -> when it last reserved, released or put (monotonic)
        self._stop = threading.Event()
        self._pool = (ThreadPoolExecutor(_MAX_COMMITS, thread_name_prefix="buffer-fsync")
                      if self.cfg.fsync else None)
        if self._pool is not None:  # records are written by the fsync threads, not the loop
            self.store.log.deferred = True
        self._wake_r, self._wake_w = os.pipe()  # the fsync threads wake the loop's poll through this
        os.set_blocking(self._wake_r, False)
        self._inflight: deque[_Commit] = deque()  # commits in flight, oldest first
        self._staged: list = []  # replies that wait for the next fsync
        self.ctx = zmq.Context()
        self.ingest = self._socket()
        self.control = self._socket()
        self.endpoints = self._bind()
        atomic_write_json(wire.endpoints_path(run_dir), self.endpoints, indent=1, sort_keys=True)
        s = self.store.stats()
        log.info("buffer serving ingest=%s control=%s: %d groups stored, %d ready, version %d, %d bytes on disk",
                 self.endpoints["ingest"], self.endpoints["control"], s["stored_total"], s["ready"],
                 s["version"], s["bytes_on_disk"])

    # ------------------------------------------------------------------ set-up
    def _socket(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, self.cfg.max_message_bytes)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        return sock

    def _bind(self) -> dict:
        host = "127.0.0.1" if self.cfg.host == "auto" else self.cfg.host  # the launcher resolves auto itself
        wanted: list[Optional[int]] = [None, None]
        if self.cfg.port:
            wanted = [self.cfg.port, self.cfg.port + 1]
        else:  # a restarted buffer keeps its ports when it can, so connected clients just reconnect
            try:
                old = json.loads(wire.endpoints_path(self.run_dir).read_text())
                wanted = [int(old["ingest"].rsplit(":", 1)[1]), int(old["control"].rsplit(":", 1)[1])]
            except (OSError, ValueError, KeyError, IndexError):
                pass
        ports = []
        for sock, port in zip((self.ingest, self.control), wanted):
            bound = None
            if port:
                try:
                    sock.bind(f"tcp://{host}:{port}")
                    bound = port
                except zmq.ZMQError:
                    if self.cfg.port:
                        raise
            if bound is None:
                bound = sock.bind_to_random_port(f"tcp://{host}")
            ports.append(bound)
        adv = host
        if host in ("0.0.0.0", "*", "::"):
            adv = socket.gethostbyname(socket.gethostname())
        return {"ingest": f"tcp://{adv}:{ports[0]}", "control": f"tcp://{adv}:{ports[1]}",
                "pid": os.getpid(), "epoch": self.epoch, "started_at": time.time()}

    def _record_recovery(self) -> None:
        tail = self.store.log.tail
        if tail is None:
            return
        log.warning("buffer log: truncated %d bytes of torn/garbage tail in %s (%s)",
                    tail.truncated_bytes, tail.segment, tail.reason)
        path = self.dir / "recovery.json"
        try:
            history = json.loads(path.read_text())
        except (OSError, ValueError):
            history = []
        history.append({"time": time.time(), "segment": tail.segment, "valid_bytes": tail.valid_bytes,
                        "file_bytes": tail.file_bytes, "truncated_bytes": tail.truncated_bytes,
                        "reason": tail.reason})
        atomic_write_json(path, history, indent=1, sort_keys=True)

    # ------------------------------------------------------------------ messages
    def _drain(self, sock: zmq.Socket, max_msgs: int) -> list:
        msgs, nbytes = [], 0
        while len(msgs) < max_msgs and nbytes < _MAX_BATCH_BYTES:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            msgs.append(frames)
            nbytes += sum(len(f) for f in frames)
        return msgs

    def _verify(self, sock: zmq.Socket, frames: list):
        """(ident, typed request, payload) of an authentic, well-formed message, else None (counted,
        refused)."""
        ident = frames[0].bytes
        header: dict = {}
        try:
            header, payload = self.signer.unpack(wire.PROTO_REQ, frames[1:])
            req = wire.parse_request(header)
            if req.epoch != self.epoch:  # meant for an earlier (or no) epoch: not served, told ours
                self.counters["rejected_stale_epoch"] += 1
                if sock is self.ingest:
                    reply = {"rid": -1, "status": "acks", "acks": [[req.rid, "stale_epoch", ""]]}
                else:
                    reply = {"rid": req.rid, "status": "stale_epoch"}
                self._reply(sock, ident, reply)
                return None
            if not self._fresh.fresh(req.sid, req.seq):  # a replayed frame: dropped without an answer
                self.counters["rejected_replay"] += 1
                return None
            return ident, req, payload
        except wire.AuthError:
            self.counters["rejected_auth"] += 1
            sock.send_multipart([ident, wire.PROTO_REP, wire.UNAUTHENTICATED_REPLY_HEADER, b"", bytes(wire.MAC_BYTES)])
        except wire.FrameError as e:
            self.counters["rejected_malformed"] += 1
            rid = header.get("rid") if isinstance(header.get("rid"), int) else -1
            self._reply(sock, ident, {"rid": rid, "status": "error", "error": str(e)})
        return None

    def _reply(self, sock: zmq.Socket, ident: bytes, header: dict, payload: bytes = b"") -> None:
        header["epoch"] = self.epoch
        sock.send_multipart([ident] + self.signer.pack(wire.PROTO_REP, header, payload), copy=False)

    def _send_all(self, replies: list) -> None:
        for sock, ident, header, payload in replies:
            self._reply(sock, ident, header, payload)

    # ------------------------------------------------------------------ handlers
    def _prepare_puts(self, msgs: list) -> list:
        """Check put messages and index their groups: [(ident, rid, meta, payload, client, held)]."""
        out = []
        for ident, req, payload in msgs:
            try:
                if not isinstance(req, wire.Put):
                    raise wire.FrameError(f"op {req.__struct_config__.tag!r} is not served on the ingest socket")
                if req.meta is not None:
                    meta = meta_from_header(req.meta, payload, self.cfg.verify_payload)
                else:
                    meta = group_meta(payload)
                out.append((ident, req.rid, meta, payload, req.client, req.held))
            except ValueError as e:
                self.counters["rejected_malformed"] += 1
                self._reply(self.ingest, ident, {"rid": req.rid, "status": "error", "error": str(e)})
        return out

    def _apply_puts(self, prepared: list, staged: list) -> None:
        statuses = self.store.ingest([(meta, payload) for _, _, meta, payload, _, _ in prepared])
        for _, _, _, _, client, held in prepared:
            if held is not None:  # the producer's own count of prompts it still has in flight
                self.store.table.in_flight[client] = held
                self._seen[client] = time.monotonic()
        acks: dict[bytes, list] = {}  # one ack message per producer per batch, not one per group
        full: dict[bytes, list] = {}
        for (ident, rid, meta, _, _, _), status in zip(prepared, statuses):
            (full if status == "full" else acks).setdefault(ident, []).append([rid, status, meta.group_id])
        for ident, items in full.items():  # not stored: answer now, the producer re-sends later
            self._reply(self.ingest, ident, {"rid": -1, "status": "acks", "acks": items, "retry_ms": 100})
        for ident, items in acks.items():  # sent after the fsync that covers them
            staged.append((self.ingest, ident, {"rid": -1, "status": "acks", "acks": items}, b""))

    def _admission(self) -> dict:
        t = self.store.table
        return {"accepted": t.accepted(), "in_flight": sum(t.in_flight.values()), "version": t.version,
                "limit": t.admission_limit(), "headroom": t.headroom(), "size": len(t.live),
                "capacity": t.capacity, "batch_groups": t.batch_groups, "max_staleness": t.max_staleness}

    def stats(self) -> dict:
        s = self.store.stats()
        s.update(self.counters)
        s["waiting_samples"] = len(self._waiting)
        s["waiting_reserves"] = len(self._reserving)
        s["in_flight_by_client"] = dict(self.store.table.in_flight)
        s["epoch"] = self.epoch
        s["metrics"] = {"buffer/size": s["size"], "buffer/dropped_stale": s["dropped_stale"]}
        return s

    # one handler per control op: (ident, typed request, staged replies)
    def _ping(self, ident: bytes, req: wire.Ping, staged: list) -> None:
        self._reply(self.control, ident, {"rid": req.rid, "status": "ok"})

    def _stats(self, ident: bytes, req: wire.Stats, staged: list) -> None:
        self._reply(self.control, ident, {"rid": req.rid, "status": "ok", "stats": self.stats()})

    def _admission_op(self, ident: bytes, req: wire.Admission, staged: list) -> None:
        self._reply(self.control, ident, {"rid": req.rid, "status": "ok", **self._admission()})

    def _reserve(self, ident: bytes, req: wire.Reserve, staged: list) -> None:
        t = self.store.table
        t.in_flight[req.client] = req.held
        self._seen[req.client] = time.monotonic()
        self._reserving.pop(req.client, None)  # a newer request replaces a held one (its sender moved on)
        self._reserving[req.client] = _Reserving(ident, req.rid, req.want,
                                                 time.monotonic() + min(req.wait_ms, _MAX_WAIT_MS) / 1e3,
                                                 req.wait_ms > 0)
        self._serve_reserving()

    def _serve_reserving(self) -> None:
        """Divide the free slots among the reserve requests (`buffer.table.share_slots`: fewest groups
        accepted plus prompts in flight first, none more than buffer.max_share_gap ahead of the live
        producer furthest behind) and answer every request that got slots, does not wait, or reached
        its deadline."""
        if not self._reserving:
            return
        t = self.store.table
        now = time.monotonic()
        peers = [c for c, seen in self._seen.items()
                 if now - seen <= _PEER_S and t.accepted_by_actor.get(c, 0) > 0]
        grants = share_slots(t.headroom(), {c: r.want for c, r in self._reserving.items()}, t.in_flight,
                             t.accepted_by_actor, t.share_gap, peers)
        for client, r in list(self._reserving.items()):
            g = grants[client]
            if g > 0 or r.want == 0 or not r.hold or now >= r.deadline:
                del self._reserving[client]
                t.in_flight[client] = t.in_flight.get(client, 0) + g
                self.counters["reserve_granted"] += g
                self.counters["reserve_refused"] += int(g == 0 and r.want > 0)
                self._reply(self.control, r.ident, {"rid": r.rid, "status": "ok", "granted": g, **self._admission()})

    def _release(self, ident: bytes, req: wire.Release, staged: list) -> None:
        t = self.store.table
        t.in_flight[req.client] = max(0, t.in_flight.get(req.client, 0) - req.n)
        self._seen[req.client] = time.monotonic()
        self._reply(self.control, ident, {"rid": req.rid, "status": "ok", **self._admission()})

    def _set_version(self, ident: bytes, req: wire.SetVersion, staged: list) -> None:
        self.store.set_version(req.version)
        staged.append((self.control, ident, {"rid": req.rid, "status": "ok"}, b""))

    def _set_staleness(self, ident: bytes, req: wire.SetStaleness, staged: list) -> None:
        self.store.table.max_staleness = int(req.max_staleness)  # not logged: a restart starts from the config
        self._reply(self.control, ident, {"rid": req.rid, "status": "ok", **self._admission()})

    def _rewind(self, ident: bytes, req: wire.Rewind, staged: list) -> None:
        try:
            self.store.rewind(req.state)
        except RestoreError as e:
            self._reply(self.control, ident, {"rid": req.rid, "status": "error", "error": str(e)})
            return
        self._waiting.clear()
        staged.append((self.control, ident, {"rid": req.rid, "status": "ok",
                                             "consumed_state": self.store.table.consumed_state()}, b""))

    def _sample(self, ident: bytes, req: wire.Sample, staged: list) -> None:
        w = _Waiting(ident, req.rid, req.n, req.version, req.req,
                     time.monotonic() + min(req.wait_ms, _MAX_WAIT_MS) / 1e3)
        if not self._try_sample(req.client, w, staged):
            if req.wait_ms > 0:
                self._waiting[req.client] = w
            else:
                self._reply(self.control, ident, {"rid": req.rid, "status": "timeout", **self._admission()})

    _HANDLERS = {wire.Ping: _ping, wire.Stats: _stats, wire.Admission: _admission_op, wire.Reserve: _reserve,
                 wire.Release: _release, wire.SetVersion: _set_version, wire.Rewind: _rewind,
                 wire.Sample: _sample, wire.SetStaleness: _set_staleness}

    def _try_sample(self, consumer: str, w: _Waiting, staged: list) -> bool:
        res = self.store.sample(w.n, w.version, consumer, w.req)
        if res is None:
            return False
        entries, payloads = res
        body = join_groups(payloads)
        staged.append((self.control, w.ident, {
            "rid": w.rid, "status": "ok", "gids": [e.meta.group_id for e in entries],
            "consumed_state": self.store.table.consumed_state(), "version": w.version}, body))
        return True

    def _serve_waiting(self, staged: list) -> None:
        now = time.monotonic()
        for consumer, w in list(self._waiting.items()):
            if self._try_sample(consumer, w, staged):
                del self._waiting[consumer]
            elif now >= w.deadline:
                del self._waiting[consumer]
                self._reply(self.control, w.ident, {"rid": w.rid, "status": "timeout", **self._admission()})

    # ------------------------------------------------------------------ loop
    def stop(self) -> None:
        """Ask serve_forever to finish (commits what it holds, then returns)."""
        self._stop.set()

    def serve_forever(self, stop_event: Optional[threading.Event] = None) -> None:
        """Run until stop() or stop_event is set. Raises only on I/O failure of the log."""
        poller = zmq.Poller()
        poller.register(self.ingest, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        stopping = lambda: self._stop.is_set() or (stop_event is not None and stop_event.is_set())  # noqa: E731
        while True:
            if stopping():
                while self._inflight:
                    self._finish_sync()
                if not self._staged and not self.store.unsynced:
                    break
                events = {}
            else:
                timeout = 100
                deadlines = [w.deadline for w in self._waiting.values()]
                deadlines += [r.deadline for r in self._reserving.values()]
                if deadlines:
                    nearest = min(deadlines) - time.monotonic()
                    timeout = max(0, min(timeout, int(nearest * 1000) + 1))
                events = dict(poller.poll(timeout))
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
            if self.control in events:
                for frames in self._drain(self.control, 256):
                    m = self._verify(self.control, frames)
                    if m is not None:
                        self._control(m[0], m[1])
            if self.ingest in events:
                self._ingest_batch()
            self._serve_waiting(self._staged)
            self._serve_reserving()
            self._commit()

    def _control(self, ident: bytes, req: wire.Request) -> None:
        handler = self._HANDLERS.get(type(req))
        if handler is None:  # a put on the control socket
            self.counters["rejected_malformed"] += 1
            self._reply(self.control, ident, {"rid": req.rid, "status": "error",
                                              "error": f"op {req.__struct_config__.tag!r} is not served on the control socket"})
            return
        try:
            handler(self, ident, req, self._staged)
        except (KeyError, TypeError, ValueError) as e:
            self.counters["rejected_malformed"] += 1
            self._reply(self.control, ident, {"rid": req.rid, "status": "error", "error": str(e)})

    def _ingest_batch(self) -> None:
        """Take up to max_commit_batch puts, in chunks of _CHUNK: each chunk is verified and appended,
        then the fsync pipeline is served (acks of a finished fsync go out, the next fsync starts),
        so a big batch neither delays acknowledgements nor leaves the disk idle."""
        left = self.cfg.max_commit_batch
        while left > 0:
            msgs = self._drain(self.ingest, min(_CHUNK, left))
            if not msgs:
                return
            left -= len(msgs)
            puts = self._prepare_puts([m for m in (self._verify(self.ingest, f) for f in msgs) if m])
            if puts:
                self._apply_puts(puts, self._staged)
            self._commit()

    # ------------------------------------------------------------------ group commit
    def _commit(self) -> None:
        """Serve the commit pipeline without blocking: acknowledge what finished fsyncs cover (in
        order), then start a commit of everything appended since, unless the newest commit is still
        writing (then more accumulates) or two are in flight (the write of one overlaps the fsync of
        the other)."""
        while self._inflight and self._inflight[0].future.done():
            self._finish_sync()
        if not (self.store.unsynced or self._staged):
            return
        if self._pool is None:
            pending, staged = self.store.take_pending(), self._staged
            self._staged = []
            self.store.log.sync()
            self.store.publish(pending)
            self._send_all(staged)
            return
        if len(self._inflight) >= _MAX_COMMITS or (self._inflight and not self._inflight[-1].written):
            return
        job = _Commit(self.store.take_pending(), self._staged)
        self._staged = []
        point = self.store.log.begin_sync()
        job.future = self._pool.submit(self._sync_job, point, job)
        job.future.add_done_callback(self._wake)
        self._inflight.append(job)

    def _wake(self, _=None) -> None:
        """Wake the loop's poll (called from the fsync threads)."""
        os.write(self._wake_w, b"\0")

    def _sync_job(self, point, job: "_Commit") -> None:
        """In an fsync thread: write the records of `point`, then make them durable."""

        def written() -> None:
            job.written = True
            self._wake()

        self.store.log.run_sync(point, written)

    def _finish_sync(self) -> None:
        """After the oldest commit in flight returned: publish its groups, send its replies."""
        job = self._inflight.popleft()
        job.future.result()  # blocks only while stopping; raises the write's or fsync's OSError
        self.store.publish(job.pending)
        self._send_all(job.replies)

    def close(self) -> None:
        """Close sockets and the log (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for sock in (self.ingest, self.control):
            sock.close(linger=200)
        self.ctx.term()
        self.store.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1


def serve(cfg: Union[Config, BufferConfig, dict, None], run_dir: str | os.PathLike,
          restore_state: Optional[dict] = None,
          ready_callback: Optional[Callable[[dict], None]] = None,
          stop_event: Optional[threading.Event] = None) -> None:
    """Open the buffer of `run_dir`, bind, publish RUN_DIR/buffer/endpoints.json, call
    ready_callback(endpoints) and serve until stop_event is set (blocking).

    restore_state: the consumed_state of the learner checkpoint being resumed (None: continue from
    the buffer's own log, e.g. after a buffer-only restart).
    """
    server = BufferServer(cfg, run_dir, restore_state)
    try:
        if ready_callback is not None:
            ready_callback(dict(server.endpoints))
        server.serve_forever(stop_event)
    finally:
        server.close()

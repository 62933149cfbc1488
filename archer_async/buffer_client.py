"""Client of the replay buffer, used by actors (put, admission) and the learner (sample, rewind).

    client = BufferClient.from_run_dir(run_dir, client_id="actor-0")
    if client.reserve(1):                 # admission: may I start one more prompt?
        ...generate, score...
        client.put(group)                 # returns once the group is durable (or accounted as dropped)

    batch = client.sample(8, version=v, timeout=None)   # learner: 8 groups for version v
    train(batch.groups); state = batch.consumed_state   # checkpoint `state` with the model
    client.rewind(state)                  # after a learner restart (the buffer kept running)

Delivery guarantees: a put is acknowledged only after the buffer's fsync; unacknowledged groups are
re-sent (after `ack_timeout_s` without any reply the socket is rebuilt, endpoints re-read, and every
unacknowledged group re-sent; the buffer deduplicates by group_id). A full buffer answers "full" and
the client re-sends after a pause: producers wait, nothing is dropped. Sample requests carry an id,
so a retried request whose reply was lost returns the same groups rather than new ones.

One client may be shared by threads (an internal lock serialises calls); one per thread is faster.
"""

from __future__ import annotations

import itertools
import os
import socket as _socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Iterable, Optional

import zmq

from archer_async import wire
from archer_async.types import GroupHeader, TrajectoryGroup, decode_groups, encode_group


class BufferError(RuntimeError):
    """The buffer refused a request or is unreachable."""


class BufferAuthError(BufferError):
    """The buffer refused our messages as unauthenticated (wrong run secret)."""


class BufferTimeout(BufferError, TimeoutError):
    """No answer (or not enough data) before the deadline."""


class BufferRejected(BufferError):
    """The buffer rejected a request as malformed or invalid (the message says why)."""


@dataclass(frozen=True)
class PutResult:
    """Outcome of one put: status is "stored", "duplicate" (already held or accounted for),
    "dropped_stale" or "dropped_filtered" (recorded durably with the reason). In every case the
    actor may forget the group."""

    group_id: str
    status: str


@dataclass
class SampleBatch:
    """One sample reply."""

    payload: bytes
    """The delivered groups as the buffer sent them: one msgpack array of encoded groups
    (`archer_async.types.join_groups`); the learner passes these bytes to its ranks as they are."""
    group_ids: list[str]
    """Their ids, in order."""
    consumed_state: dict
    """Buffer state after this delivery: store it in the learner checkpoint that covers these groups."""
    version: int
    """Learner version the groups were checked against (staleness)."""
    request_id: str

    @property
    def groups(self) -> list[TrajectoryGroup]:
        """The delivered groups, decoded (len == the n_groups asked for)."""
        return decode_groups(self.payload)


@dataclass
class _Put:
    group_id: str
    data: bytes
    reserved: bool
    meta: Optional[GroupHeader] = None
    sent_at: float = 0.0
    retry_at: float = 0.0


_RETRY_MS = 100


class BufferClient:
    """See the module docstring. Construct with `from_run_dir` (reads RUN_DIR/buffer/endpoints.json
    and the run secret) or with explicit endpoints and secret."""

    def __init__(self, endpoints: Optional[dict] = None, secret: Optional[bytes] = None, *,
                 run_dir: Optional[str | os.PathLike] = None, client_id: str = "",
                 ack_timeout_s: float = 10.0, max_pending: int = 64, endpoints_wait_s: float = 60.0):
        if run_dir is None and (endpoints is None or secret is None):
            raise ValueError("BufferClient needs run_dir, or endpoints and secret")
        self.run_dir = run_dir
        self.endpoints = endpoints or wire.read_endpoints(run_dir, wait_s=endpoints_wait_s)
        self._signer = wire.Signer(secret if secret is not None else wire.load_secret(run_dir))
        self.client_id = client_id or f"{_socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ack_timeout_s = ack_timeout_s
        self.max_pending = max_pending
        self._ctx = zmq.Context()
        self._socks: dict[str, Optional[zmq.Socket]] = {"ingest": None, "control": None}
        self._lock = threading.RLock()
        self._rid = 0
        self._unacked: dict[int, _Put] = {}
        self._done: dict[int, PutResult] = {}
        self._failed: dict[int, str] = {}
        self._last_reply = {"ingest": time.monotonic(), "control": time.monotonic()}
        self._epoch: Optional[str] = self.endpoints.get("epoch") or None
        self._epoch_changed = False
        self._session = uuid.uuid4().hex  # freshness: one session per socket kind, numbered messages
        self._seq = {"ingest": itertools.count(1), "control": itertools.count(1)}
        self._held = 0
        self._consumed_state: Optional[dict] = None

    @classmethod
    def from_run_dir(cls, run_dir: str | os.PathLike, client_id: str = "", **kw) -> "BufferClient":
        """Client of the buffer of `run_dir` (waits up to endpoints_wait_s for it to publish endpoints)."""
        return cls(run_dir=run_dir, client_id=client_id, **kw)

    # ------------------------------------------------------------------ sockets
    def _sock(self, kind: str) -> zmq.Socket:
        s = self._socks[kind]
        if s is None:
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 100_000)
            s.setsockopt(zmq.RCVHWM, 100_000)
            s.connect(self.endpoints[kind])
            self._socks[kind] = s
            self._last_reply[kind] = time.monotonic()
        return s

    def _reconnect(self, kind: str) -> None:
        s = self._socks[kind]
        if s is not None:
            s.close(linger=0)
            self._socks[kind] = None
        if self.run_dir is not None:
            try:
                self.endpoints = wire.read_endpoints(self.run_dir, wait_s=0.0)
            except Exception:  # keep the old endpoints; the buffer may be restarting
                pass
        self._sock(kind)

    def _next_rid(self) -> int:
        self._rid += 1
        return self._rid

    def _send(self, kind: str, header: wire.Request, payload: bytes = b"") -> None:
        header.sid, header.seq = f"{self._session}.{kind}", next(self._seq[kind])
        header.epoch = self._epoch or ""
        frames = self._signer.pack(wire.PROTO_REQ, header, payload)
        self._sock(kind).send_multipart(frames, copy=False)

    def _recv(self, kind: str, timeout_s: float) -> Optional[tuple[dict, object]]:
        """One verified reply within timeout_s, or None."""
        sock = self._sock(kind)
        if not sock.poll(max(0, int(timeout_s * 1000))):
            return None
        frames = sock.recv_multipart(copy=False)
        try:
            header, payload = self._signer.unpack(wire.PROTO_REP, frames)
        except wire.AuthError:
            if len(frames) > 1 and frames[1].bytes == wire.UNAUTHENTICATED_REPLY_HEADER:
                raise BufferAuthError("the buffer rejected this client's messages as unauthenticated "
                                      "(is the run secret the buffer's?)") from None
            return None
        except wire.FrameError:
            return None
        self._last_reply[kind] = time.monotonic()
        epoch = header.get("epoch")
        if epoch is not None and epoch != self._epoch:
            if self._epoch is not None:
                self._epoch_changed = True
            self._epoch = epoch
        return header, payload

    def _on_restart(self) -> None:
        """The buffer restarted: re-send every unacknowledged group and re-assert reservations."""
        if not self._epoch_changed:
            return
        self._epoch_changed = False
        for rid, p in self._unacked.items():
            self._send_put(rid, p)
        held = self._held
        if held:
            self._call(wire.Reserve(rid=0, want=0, held=held))

    # ------------------------------------------------------------------ ingest
    def _send_put(self, rid: int, p: _Put) -> None:
        p.sent_at = time.monotonic()
        p.retry_at = 0.0
        self._send("ingest", wire.Put(rid=rid, client=self.client_id, held=self._held, meta=p.meta), p.data)

    def _pump(self, timeout_s: float) -> None:
        """Receive acknowledgements (returns once some arrived, or after timeout_s); re-send what
        must be re-sent (buffer full, no answer for ack_timeout_s, buffer restarted)."""
        end = time.monotonic() + timeout_s
        got_any = False
        while True:
            now = time.monotonic()
            for rid, p in list(self._unacked.items()):
                if p.retry_at and p.retry_at <= now:
                    self._send_put(rid, p)
            if self._unacked and now - self._last_reply["ingest"] > self.ack_timeout_s:
                if now - min(p.sent_at for p in self._unacked.values()) > self.ack_timeout_s:
                    self._reconnect("ingest")
                    for rid, p in self._unacked.items():
                        self._send_put(rid, p)
            wait = 0.0 if got_any else max(0.0, end - now)
            retry_times = [p.retry_at for p in self._unacked.values() if p.retry_at]
            if retry_times:
                wait = min(wait, max(0.0, min(retry_times) - now))
            got = self._recv("ingest", min(wait, 0.2))
            if got is not None:
                self._handle_ack(*got)
                got_any = True
                continue
            if got_any or time.monotonic() >= end:
                break
        self._on_restart()

    def _handle_ack(self, header: dict, _payload) -> None:
        if header.get("status") == "acks":  # [[rid, status, group_id], ...] of one group commit
            items = header.get("acks")
            for item in items if isinstance(items, list) else ():
                if isinstance(item, list) and len(item) >= 2:
                    self._handle_one(item[0], item[1], header)
            return
        self._handle_one(header.get("rid"), header.get("status"), header)

    def _handle_one(self, rid, status, header: dict) -> None:
        p = self._unacked.get(rid) if isinstance(rid, int) else None
        if p is None:
            return
        if status in ("stored", "duplicate", "dropped_stale", "dropped_filtered"):
            del self._unacked[rid]
            self._done[rid] = PutResult(p.group_id, status)
        elif status == "full":
            p.retry_at = time.monotonic() + header.get("retry_ms", _RETRY_MS) / 1000
        elif status == "stale_epoch":  # sent to a buffer that has since restarted: send it again
            p.retry_at = time.monotonic()
        elif status == "error":
            del self._unacked[rid]
            self._failed[rid] = str(header.get("error", "rejected"))

    def submit(self, group: TrajectoryGroup) -> int:
        """Send a group without waiting (returns its request id); at most max_pending stay unacked
        (this call waits for acknowledgements beyond that). Collect results with flush()."""
        return self.submit_encoded(group.group_id, encode_group(group), GroupHeader.of(group))

    def submit_encoded(self, group_id: str, data: bytes, meta: Optional[GroupHeader] = None) -> int:
        """submit() for an already encoded group (encode_group bytes); meta: GroupHeader.of(group)
        (None: the buffer derives it from the bytes)."""
        with self._lock:
            while len(self._unacked) >= self.max_pending:
                self._pump(0.05)
            rid = self._next_rid()
            reserved = self._held > 0
            if reserved:
                self._held -= 1
            p = _Put(group_id, data, reserved, meta)
            self._unacked[rid] = p
            self._send_put(rid, p)
            return rid

    def pending(self) -> int:
        """Groups sent and not yet acknowledged."""
        return len(self._unacked)

    def _result(self, rid: int) -> Optional[PutResult]:
        if rid in self._failed:
            raise BufferRejected(f"group rejected by the buffer: {self._failed.pop(rid)}")
        return self._done.pop(rid, None)

    def put(self, group: TrajectoryGroup, timeout: Optional[float] = 120.0) -> PutResult:
        """Send one group and wait for its acknowledgement (re-sending as needed). On BufferTimeout
        the group stays queued and later calls keep re-sending it."""
        return self.put_encoded(group.group_id, encode_group(group), timeout, GroupHeader.of(group))

    def put_encoded(self, group_id: str, data: bytes, timeout: Optional[float] = 120.0,
                    meta: Optional[GroupHeader] = None) -> PutResult:
        """put() for an already encoded group (meta as in submit_encoded)."""
        with self._lock:
            rid = self.submit_encoded(group_id, data, meta)
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                r = self._result(rid)
                if r is not None:
                    return r
                if deadline is not None and time.monotonic() >= deadline:
                    raise BufferTimeout(f"no acknowledgement for group {group_id} within {timeout}s")
                self._pump(0.2 if deadline is None else min(0.2, max(0.0, deadline - time.monotonic())))

    def flush(self, timeout: Optional[float] = 120.0) -> list[PutResult]:
        """Wait until every submitted group is acknowledged; returns (and forgets) their results."""
        with self._lock:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._unacked:
                if deadline is not None and time.monotonic() >= deadline:
                    raise BufferTimeout(f"{len(self._unacked)} groups unacknowledged after {timeout}s")
                self._pump(0.2 if deadline is None else min(0.2, max(0.0, deadline - time.monotonic())))
            if self._failed:
                rid, msg = next(iter(self._failed.items()))
                self._failed.clear()
                raise BufferRejected(f"group rejected by the buffer: {msg}")
            out = [self._done[r] for r in sorted(self._done)]
            self._done.clear()
            return out

    def put_many(self, groups: Iterable[TrajectoryGroup], timeout: Optional[float] = 120.0) -> list[PutResult]:
        """Pipelined puts (up to max_pending in flight); returns results in order."""
        with self._lock:
            for g in groups:
                self.submit(g)
            return self.flush(timeout)

    # ------------------------------------------------------------------ control
    def _call(self, req: wire.Request, timeout: Optional[float] = None, extra_wait_s: float = 0.0,
              cancel: Optional[threading.Event] = None) -> Optional[dict]:
        """Request/reply on the control socket (`req`'s rid and client are filled in here), re-sent
        over a fresh socket if unanswered. None when `cancel` is set before the reply came."""
        with self._lock:
            rid = req.rid = self._next_rid()
            req.client = self.client_id
            header = req
            deadline = None if timeout is None else time.monotonic() + timeout
            self._send("control", header)
            resend_at = time.monotonic() + self.ack_timeout_s + extra_wait_s
            while True:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise BufferTimeout(f"buffer did not answer {req.__struct_config__.tag!r} within {timeout}s")
                if now >= resend_at:
                    self._reconnect("control")
                    self._send("control", header)
                    resend_at = now + self.ack_timeout_s + extra_wait_s
                if cancel is not None and cancel.is_set():
                    return None
                limit = resend_at if deadline is None else min(resend_at, deadline)
                got = self._recv("control", max(0.0, min(limit - now, 0.5 if cancel is None else 0.02)))
                if got is None or got[0].get("rid") != rid:
                    continue
                reply, payload = got
                if reply.get("status") == "stale_epoch":  # the buffer restarted: now we know its epoch
                    self._send("control", header)
                    resend_at = time.monotonic() + self.ack_timeout_s + extra_wait_s
                    continue
                if reply.get("status") == "error":
                    raise BufferRejected(f"buffer refused {req.__struct_config__.tag!r}: {reply.get('error')}")
                reply["_payload"] = payload
                if not isinstance(req, wire.Reserve):
                    self._on_restart()
                return reply

    def ping(self, timeout: Optional[float] = 30.0) -> dict:
        """Round trip; returns {"status": "ok", "epoch": ...}."""
        r = self._call(wire.Ping(rid=0), timeout)
        r.pop("_payload", None)
        return r

    def stats(self, timeout: Optional[float] = 30.0) -> dict:
        """Buffer statistics: size, ready, depth_by_version, dropped_stale, dropped_filtered,
        dropped_by_reason, accepted, in_flight, version, bytes_on_disk, rejected_auth, ...,
        and "metrics" with the metric names of docs/architecture.md (buffer/size, buffer/dropped_stale)."""
        return self._call(wire.Stats(rid=0), timeout)["stats"]

    def admission(self, timeout: Optional[float] = 30.0) -> dict:
        """{"accepted", "in_flight", "version", "limit", "headroom", "size", "capacity", ...}: an actor
        may start a prompt while accepted + in_flight < limit = (eta + version + 1) * batch_groups."""
        r = self._call(wire.Admission(rid=0), timeout)
        r.pop("_payload", None)
        return r

    def reserve(self, n: int = 1, timeout: Optional[float] = 30.0, wait_s: float = 0.0,
                cancel: Optional[threading.Event] = None) -> int:
        """Ask to start up to n prompts; returns how many were granted (0: wait and ask again).
        Each granted reservation is consumed by the next put (or returned with release).

        wait_s > 0: the buffer holds the request while no slot is free and answers as soon as slots
        free (shared fairly among the clients asking) or with 0 after wait_s. `cancel` set: stop
        waiting and return 0 at once; a grant the buffer makes meanwhile is taken back by the next
        request or put of this client, which re-asserts how many reservations it holds."""
        with self._lock:
            req = wire.Reserve(rid=0, want=int(n), held=self._held, wait_ms=int(max(0.0, wait_s) * 1000))
            r = self._call(req, timeout, extra_wait_s=max(0.0, wait_s), cancel=cancel)
            if r is None:  # cancelled
                return 0
            granted = int(r.get("granted", 0))
            self._held += granted
            return granted

    def release(self, n: int = 1, timeout: Optional[float] = 30.0) -> None:
        """Return n reservations whose prompts were abandoned."""
        with self._lock:
            n = min(n, self._held)
            self._held -= n
            self._call(wire.Release(rid=0, n=n), timeout)

    @property
    def reserved(self) -> int:
        """Reservations held and not yet used by a put."""
        return self._held

    def set_version(self, version: int, timeout: Optional[float] = 30.0) -> None:
        """Tell the buffer the learner's version (durable; admission and staleness follow it)."""
        self._call(wire.SetVersion(rid=0, version=int(version)), timeout)

    def set_max_staleness(self, max_staleness: int, timeout: Optional[float] = 30.0) -> dict:
        """Set the staleness bound eta (buffer.max_staleness auto); returns the admission numbers."""
        r = self._call(wire.SetStaleness(rid=0, max_staleness=int(max_staleness)), timeout)
        r.pop("_payload", None)
        return r

    def sample(self, n_groups: int, version: int, timeout: Optional[float] = None) -> SampleBatch:
        """n_groups groups trainable at `version` (every token's version >= version - eta), oldest
        first by default. Blocks until they are ready; BufferTimeout after `timeout` seconds
        (None: wait forever). The batch's consumed_state is what a checkpoint covering it stores."""
        req = uuid.uuid4().hex
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = 5.0 if deadline is None else max(0.0, deadline - time.monotonic())
            wait_ms = int(min(remaining, 5.0) * 1000)
            r = self._call(wire.Sample(rid=0, n=int(n_groups), version=int(version), req=req, wait_ms=wait_ms),
                           None, extra_wait_s=wait_ms / 1000)
            if r.get("status") == "ok":
                self._consumed_state = r["consumed_state"]
                return SampleBatch(bytes(r["_payload"]), list(r["gids"]), r["consumed_state"], int(r["version"]), req)
            if deadline is not None and time.monotonic() >= deadline:
                raise BufferTimeout(f"{n_groups} groups for version {version} not ready within {timeout}s "
                                    f"(ready: {r.get('size', '?')} live, accepted {r.get('accepted', '?')})")

    @property
    def consumed_state(self) -> Optional[dict]:
        """consumed_state of the latest sample reply (None before the first)."""
        return self._consumed_state

    def rewind(self, consumed_state: dict, timeout: Optional[float] = 60.0) -> dict:
        """Make the buffer forget deliveries after `consumed_state` (a learner checkpoint's): they
        are delivered again. Returns the buffer's consumed_state after the rewind."""
        r = self._call(wire.Rewind(rid=0, state=consumed_state), timeout)
        self._consumed_state = r["consumed_state"]
        return r["consumed_state"]

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close sockets (unacknowledged groups are abandoned: flush() first). Idempotent."""
        if self._ctx.closed:
            return
        for kind, s in self._socks.items():
            if s is not None:
                s.close(linger=0)
                self._socks[kind] = None
        self._ctx.term()

    def __enter__(self) -> "BufferClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

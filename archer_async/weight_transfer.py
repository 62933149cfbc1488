"""Learner -> actor weight transfer: one control call per update, bucketed broadcasts, a deadline.

Both sides of the wire live here so that the learner (trainer side) and the actors' inference
workers (receiver side, inside vLLM through `archer_async.vllm_plugin`, or stand-alone) agree on one
protocol.

Topology. A transfer group of `world_size = 1 + R` ranks: rank 0 is learner rank 0 (the only
sender), ranks 1..R are the actors' inference workers (`receiver_rank(actor_index)`). The control
plane is a `torch.distributed.TCPStore` hosted by the sender at `SyncInit.host:store_port`; every
wait on it is a blocking `TCPStore.wait` (the store wakes the waiter when the key is set; no
polling). The data plane is a broadcast from rank 0:

- gloo (CPU): a `ProcessGroupGloo` rendezvoused under the nonce of the update that created it and
  reused by later updates while the membership is unchanged and every update on it succeeded: each
  receiver reports the group it holds in its request, and the sender names the group of the update
  in its announcement (the old one, or a fresh one under this update's nonce when a receiver was
  replaced, one of them reports another group, or the previous update failed). Any failure drops
  the group on the side that saw it, so a failed update never leaves a half-finished collective
  behind for the next one. Every broadcast carries what is left of the update's deadline as its
  timeout.
- nccl (GPU): one persistent vLLM `PyNcclCommunicator` (created at `connect()` on both sides, port
  `SyncInit.nccl_port`). NCCL collectives cannot time out: the deadline is enforced at the
  handshake and at the final acknowledgement; a receiver that dies mid-broadcast needs a new group.

One update, version v (key names under the store's prefix):

    receivers (when they start waiting, usually before the sender):
             set want/v/r = {"req": id, "group": id | null, "prev": consumer failure of the last update | absent}
    sender:  lay out bucket 0 (names, dtypes, shapes, offsets, bytes, chunk size; no copy yet)
             wait want/v/r for all r (one blocking multi_get; if they are not all there yet, set
             "latest" for the receivers' error messages and pack chunk 0 meanwhile)
             set go/<req> for every request + "latest", one multi_set = {nonce, header of bucket 0, gloo group}
                                                           ->  receivers: wake on go/<req>
             broadcast bucket 0 in chunks (gloo: `chunk_size`, <= 2 in flight, chunk k+1 packed while
             chunk k travels; a chunk inside one contiguous CPU tensor is sent from it, uncopied)
                                                           ->  receive the chunks into one flat buffer
             for bucket k >= 1: set <nonce>/b<k> = header, broadcast  ->  wait <nonce>/b<k>, receive, yield
             wait <nonce>/done/r for all r  <-  set <nonce>/done/r = "ok" | error text
                                                   ("ok" as soon as the last bucket's bytes are in,
                                                    before its tensors are yielded)
             (on any failure: set <nonce>/abort = reason and wake the receivers where they block:
              go/<req> or <nonce>/b<next> = {"abort": reason}; they raise at once, and the sender's
              error names the receivers that did not answer and quotes those that did)

So an update costs one wake-up before the data and one after it (the acknowledgement), like a
broadcast followed by a barrier. Store keys are deleted off that path: each receiver deletes its
request and answer after acknowledging, and its acknowledgement at the end of its next update (the
sender has read it by then); the sender deletes extra bucket headers (and a failed update's keys)
while the next update's first chunk travels. A consumer that stops or fails after the
acknowledgement (while taking the last bucket) raises to its own caller; the receiver also reports
it in its next request, and the sender logs it and returns it as `stats["receiver_reports"]`.

Bucket layout, packing and chunking are in `archer_async.weight_buckets`. Memory: the sender packs
every bucket into one flat buffer; on CPU that buffer is kept between
updates (it is at most one bucket, `bucket_bytes`, and reusing it saves the page faults of a fresh
allocation); the receiver holds what its consumer keeps (the vLLM engine stages a whole update
before loading it, so that a failed transfer leaves the old weights in place).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import logging
import socket
import time
import traceback
import uuid
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from archer_async.weight_buckets import (  # noqa: F401 - pack_bucket / unpack_bucket: part of this module's API
    DEFAULT_CHUNK_BYTES, _byte_sources, _ChunkPacker, bucket_layout, chunk_bounds, chunk_size, pack_bucket,
    unpack_bucket,
)

log = logging.getLogger(__name__)

class WeightSyncError(RuntimeError):
    """A weight update failed or missed its deadline. Receivers keep serving the previous version."""


@dataclasses.dataclass
class SyncInit:
    """Where and how the transfer group meets. The launcher builds one (`make_sync_init`) and hands
    it to the learner (rank 0) and, with `for_rank(receiver_rank(i))`, to actor i."""

    host: str
    """Address of the sender's TCPStore (and of the NCCL rendezvous); reachable from every actor."""
    store_port: int
    """TCPStore port (the control plane)."""
    world_size: int
    """1 (the sender) + number of receiving inference workers."""
    backend: str = "gloo"
    """Data plane: "gloo" (CPU tensors) or "nccl" (CUDA tensors)."""
    timeout_s: float = 120.0
    """Deadline of one update (handshake + data + acknowledgement) and of `connect()`."""
    nccl_port: int = 0
    """Rendezvous port of the persistent NCCL communicator (nccl only)."""
    rank: int = 0
    """This process's rank: 0 for the sender, 1..world_size-1 for receivers."""

    def for_rank(self, rank: int) -> "SyncInit":
        """A copy addressed to `rank`."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside the transfer group of size {self.world_size}")
        return dataclasses.replace(self, rank=rank)

    def to_dict(self) -> dict:
        """Plain dict (what crosses Ray / vLLM's RPC)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_any(cls, obj: "SyncInit | dict") -> "SyncInit":
        """Accept a SyncInit or its dict form (unknown keys are an error)."""
        if isinstance(obj, SyncInit):
            return obj
        if not isinstance(obj, dict):
            raise TypeError(f"sync init must be a SyncInit or a dict, got {type(obj).__name__}")
        return cls(**obj)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def receiver_rank(actor_index: int, workers_per_actor: int = 1) -> int:
    """Transfer-group rank of actor `actor_index`'s first inference worker."""
    return 1 + actor_index * workers_per_actor


def make_sync_init(num_actors: int, backend: str = "gloo", host: str = "127.0.0.1",
                   timeout_s: float = 120.0, store_port: int = 0, nccl_port: int = 0,
                   workers_per_actor: int = 1) -> SyncInit:
    """The init info of a transfer group for `num_actors` actors (ports 0: picked free now)."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"weight-transfer backend must be gloo or nccl, got {backend!r}")
    if num_actors < 1:
        raise ValueError("a transfer group needs at least one actor")
    return SyncInit(
        host=host,
        store_port=store_port or free_port(host),
        world_size=1 + num_actors * workers_per_actor,
        backend=backend,
        timeout_s=float(timeout_s),
        nccl_port=(nccl_port or free_port(host)) if backend == "nccl" else nccl_port,
        rank=0,
    )


def sync_init_from_config(cfg, host: Optional[str] = None) -> SyncInit:
    """The launcher's SyncInit for a run config (`archer_async.config.Config`): backend "auto" is nccl
    when both learner ranks and actors have GPUs, gloo otherwise; host/port/deadline from cfg.sync."""
    backend = cfg.sync.backend
    if backend == "auto":
        backend = "nccl" if cfg.learner.gpus_per_rank > 0 and cfg.actors.gpus_per_actor > 0 else "gloo"
    return make_sync_init(cfg.actors.num_actors, backend=backend, host=host or cfg.sync.host,
                          timeout_s=cfg.sync.timeout_s, store_port=cfg.sync.store_port)


# ----------------------------------------------------------------------------------------------
# Control plane

class _Control:
    """JSON values in a TCPStore under one prefix; waits block in the store until the key is set."""

    PREFIX = "archer-ws/"

    def __init__(self, init: SyncInit, is_master: bool, timeout_s: float):
        self.timeout = datetime.timedelta(seconds=max(1.0, timeout_s))
        self.store = dist.TCPStore(
            init.host, init.store_port, is_master=is_master,
            timeout=datetime.timedelta(seconds=max(1.0, timeout_s)), wait_for_workers=False,
        )

    def set(self, key: str, value: Any) -> None:
        self.store.set(self.PREFIX + key, json.dumps(value))

    def get(self, key: str) -> Any:
        return json.loads(self.store.get(self.PREFIX + key))

    def get_many(self, keys: list[str]) -> list[Any]:
        """Values of `keys` (all must exist) in one round trip."""
        return [json.loads(v) for v in self.store.multi_get([self.PREFIX + k for k in keys])]

    def has(self, key: str) -> bool:
        return self.store.check([self.PREFIX + key])

    def delete(self, *keys: str) -> None:
        for k in keys:
            try:
                self.store.delete_key(self.PREFIX + k)
            except Exception:  # best effort: cleanup must never mask the real outcome
                pass

    def wait_all(self, keys: list[str], deadline: float) -> list[str]:
        """Block until every key exists or the deadline passes; the keys still missing then ([] = all there).

        One `TCPStore.wait` (woken by the store when the last key is set); a connection error (the
        store went away) propagates."""
        full = [self.PREFIX + k for k in keys]
        while True:
            left = deadline - time.monotonic()
            if left > 0:
                try:
                    self.store.wait(full, datetime.timedelta(seconds=left))
                    return []
                except dist.DistStoreError:  # the wait's own timeout; re-checked below
                    if deadline - time.monotonic() > 0.05:
                        raise  # not a timeout: a store error the caller must see
            if time.monotonic() >= deadline:
                return [k for k, f in zip(keys, full) if not self.store.check([f])]

    def get_all(self, keys: list[str], deadline: float) -> tuple[list[Any], list[str]]:
        """(values, []) once every key exists, or (None, keys still missing) at the deadline.

        One blocking `multi_get` (the store waits for the keys inside it, so this is one wait and one
        read, the same as `wait_all` alone); a connection error (the store went away) propagates."""
        full = [self.PREFIX + k for k in keys]
        left = deadline - time.monotonic()
        if left > 0:
            self.store.set_timeout(datetime.timedelta(seconds=left))
            try:
                return [json.loads(v) for v in self.store.multi_get(full)], []
            except dist.DistStoreError:  # the wait's own timeout; re-checked below
                if deadline - time.monotonic() > 0.05:
                    raise  # not a timeout: a store error the caller must see
            finally:
                self.store.set_timeout(self.timeout)
        missing = [k for k, f in zip(keys, full) if not self.store.check([f])]
        if missing:
            return None, missing
        return self.get_many(keys), []

    def wait(self, key: str, deadline: float, what: str = "") -> Any:
        """Value of `key` once it exists; WeightSyncError at the deadline."""
        if self.wait_all([key], deadline):
            raise WeightSyncError(f"deadline passed waiting for {what or key}")
        return self.get(key)


def _remaining(deadline: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(0.5, deadline - time.monotonic()))


def _gloo_group(ctl: _Control, group_id: str, rank: int, world_size: int, deadline: float):
    """A fresh gloo group (rendezvous under `group_id`, bounded by the deadline)."""
    return dist.ProcessGroupGloo(dist.PrefixStore(f"archer-pg/{group_id}", ctl.store), rank, world_size,
                                 _remaining(deadline))


def _gloo_broadcast_chunks(pg, bounds: list[tuple[int, int]], chunk, deadline: float, after_first=None,
                           window: int = 2) -> None:
    """One broadcast from rank 0 per [start, end) of `bounds`, of the uint8 tensor `chunk(start, end)`.

    At most `window` broadcasts are in flight (gloo runs them in its own threads), so the sender
    packs chunk k+1 while chunk k travels; each carries what is left of the deadline as its timeout,
    and the window keeps queued ones from outliving the deadline by more than one timeout.
    `after_first()` runs once the first broadcast is under way (bookkeeping that may overlap it)."""
    works: collections.deque = collections.deque()
    for i, (s, e) in enumerate(bounds):
        t = chunk(s, e)
        if len(works) >= window:
            works.popleft().wait()
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.timeout = _remaining(deadline)
        works.append(pg.broadcast([t], opts))
        if i == 0 and after_first is not None:
            after_first()
    while works:
        works.popleft().wait()


def _nccl_group(init: SyncInit, rank: int, device: torch.device):
    """The persistent NCCL communicator of the group (vLLM's stateless rendezvous)."""
    from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group

    return stateless_init_process_group(init.host, init.nccl_port, rank, init.world_size, device)


def _nccl_broadcast(comm, flat: torch.Tensor) -> None:
    stream = torch.cuda.current_stream()
    comm.broadcast(flat, src=0, stream=stream)
    stream.synchronize()


# ----------------------------------------------------------------------------------------------
# Trainer side

class WeightSender:
    """Learner rank 0's end of the transfer group.

        sender = WeightSender(sync_init)               # or its dict form
        sender.connect()                               # every receiver registered (deadline)
        stats = sender.send(iter_full_weights(...), version=v, bucket_bytes=256 << 20)

    `send` takes any iterable of (Hugging Face name, full tensor); it re-buckets by `bucket_bytes`
    (a larger tensor travels alone) and never holds more than one bucket. On failure it raises
    WeightSyncError and tells the receivers to abort; they keep their old weights. Other learner
    ranks must still drain their share of a collective iterator themselves.

    `reuse_group` (gloo): keep the gloo group between successful updates of an unchanged membership
    (default); False creates a fresh group for every update (a rendezvous and a full mesh of TCP
    connections per update). `chunk_bytes` (gloo): a bucket travels as broadcasts of at most this many
    bytes (`chunk_size`; <= 0: one broadcast per bucket), each packed while the previous one is in flight.
    """

    def __init__(self, init: "SyncInit | dict", backend: Optional[str] = None, timeout_s: Optional[float] = None,
                 reuse_group: bool = True, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.init = SyncInit.from_any(init)
        if backend is not None:
            self.init = dataclasses.replace(self.init, backend=backend)
        if timeout_s is not None:
            self.init = dataclasses.replace(self.init, timeout_s=float(timeout_s))
        if self.init.backend not in ("gloo", "nccl"):
            raise ValueError(f"weight-transfer backend must be gloo or nccl, got {self.init.backend!r}")
        self.reuse_group = bool(reuse_group)
        self.chunk_bytes = int(chunk_bytes)
        self._stale: list[str] = []  # store keys of the last update, deleted during the next one
        self._want: list[str] = []  # requests consumed by the current update (deleted once its data flows)
        self._ctl: Optional[_Control] = None
        self._nccl = None
        self._pg = None  # gloo group of the last successful update
        self._group_id: Optional[str] = None
        self._buf: Optional[torch.Tensor] = None  # reused packing buffer (CPU only), uint8 [>= largest bucket]
        self._headers = 0  # bucket headers published in the current update
        self._reqs: dict[int, str] = {}  # receiver rank -> request id of the current update
        self.device = torch.device("cpu")

    @property
    def num_receivers(self) -> int:
        return self.init.world_size - 1

    def connect(self) -> None:
        """Host the control store and wait until every receiver said hello (and, for nccl, join the
        communicator); WeightSyncError naming the missing ranks at the deadline."""
        deadline = time.monotonic() + self.init.timeout_s
        if self._ctl is None:
            self._ctl = _Control(self.init, is_master=True, timeout_s=self.init.timeout_s)
        if self.init.backend == "nccl" and self._nccl is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
            self._nccl = _nccl_group(self.init, 0, self.device)
        missing = self._missing("hello/{r}", deadline)
        if missing:
            raise WeightSyncError(f"weight receivers (ranks {missing}) did not connect to "
                                  f"{self.init.host}:{self.init.store_port} within {self.init.timeout_s:.0f} s")

    def _missing(self, pattern: str, deadline: float) -> list[int]:
        """Receiver ranks whose `pattern.format(r=rank)` key is still missing at the deadline (one blocking wait)."""
        assert self._ctl is not None
        ranks = list(range(1, self.init.world_size))
        left = set(self._ctl.wait_all([pattern.format(r=r) for r in ranks], deadline))
        return [r for r in ranks if pattern.format(r=r) in left]

    def _drop_group(self) -> None:
        self._pg = None
        self._group_id = None

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
             bucket_bytes: int = 256 << 20) -> dict:
        """Broadcast one full set of weights as `version`; blocks until every receiver acknowledged.

        Returns {"version", "seconds", "bytes", "num_tensors", "num_buckets", "receivers", "new_group"}
        and, when a receiver reported that its consumer failed after acknowledging the previous update,
        "receiver_reports" {rank: report} (also logged; the consumer's own caller raised it).
        """
        if self._ctl is None:
            raise WeightSyncError("WeightSender.send before connect()")
        ctl = self._ctl
        t0 = time.monotonic()
        deadline = t0 + self.init.timeout_s
        nonce = f"{int(version)}-{uuid.uuid4().hex[:10]}"
        keys: list[str] = []  # this update's store keys (deleted during the next update, or now on failure)
        ranks = range(1, self.init.world_size)
        stats = {"version": int(version), "bytes": 0, "num_tensors": 0, "num_buckets": 0,
                 "receivers": self.num_receivers, "new_group": False}
        self._headers = 0  # bucket headers published so far (the next one is where receivers wait)
        self._reqs = {}  # receiver rank -> its request id for this update (read from want/<v>/<r>)
        try:
            seen: set[str] = set()
            bucket: list[tuple[str, torch.Tensor]] = []
            size = 0
            for name, t in named_tensors:
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"weight {name!r} is a {type(t).__name__}, not a tensor")
                if name in seen:
                    raise ValueError(f"weight {name!r} sent twice in one update")
                seen.add(name)
                n = t.numel() * t.element_size()
                if bucket and size + n > bucket_bytes:
                    self._send_bucket(nonce, version, bucket, False, deadline, stats, keys)
                    bucket, size = [], 0
                bucket.append((name, t))
                size += n
            self._send_bucket(nonce, version, bucket, True, deadline, stats, keys)
            del bucket
            done = [f"{nonce}/done/{r}" for r in ranks]
            acks, missing = ctl.get_all(done, deadline)
            keys += done
            if missing:
                raise WeightSyncError(f"receivers {[r for r, k in zip(ranks, done) if k in missing]} "
                                      f"did not acknowledge version {version}")
            bad = [(r, e) for r, e in zip(ranks, acks) if e != "ok"]
            if bad:
                raise WeightSyncError(f"receivers failed version {version}: {bad}")
        except Exception as e:
            self._drop_group()  # a failed update never leaves its group (and its half-done collective) behind
            traceback.clear_frames(e.__traceback__)  # frames of the failed broadcast hold the group: free it now,
            reason = f"{type(e).__name__}: {e}"      # so receivers inside that broadcast fail at once
            try:
                ctl.set(f"{nonce}/abort", reason)
                # wake the receivers where they are blocked: on their go key, or on the next bucket header
                if self._headers == 0:
                    if self._reqs:
                        ctl.store.multi_set([ctl.PREFIX + f"go/{q}" for q in self._reqs.values()],
                                            [json.dumps({"abort": reason})] * len(self._reqs))
                else:
                    ctl.set(f"{nonce}/b{self._headers}", {"abort": reason})
                if not isinstance(e, WeightSyncError):  # a data-plane failure: say which receivers answered
                    reason += self._peer_report(nonce, deadline)
            except Exception:  # noqa: BLE001 - the store itself failing must not mask the real error
                pass
            log.error("weight update to version %s FAILED after %.1f s: %s", version, time.monotonic() - t0, reason)
            # the receivers may still be about to read the abort: its keys go with the next update's cleanup
            ctl.delete(*self._want)  # a retry of this version must wait for fresh requests
            self._want = []
            self._stale += keys + [f"{nonce}/abort", f"{nonce}/b{self._headers}"]
            if isinstance(e, WeightSyncError):
                raise
            raise WeightSyncError(f"weight update to version {version} failed: {reason}") from e
        # receivers delete their own request, answer and acknowledgement keys; bucket headers (k >= 1)
        # are the sender's, deleted while the next update's data flows
        self._stale = [k for k in keys if k.startswith(f"{nonce}/b")]
        stats["seconds"] = time.monotonic() - t0
        return stats

    def _cleanup(self) -> None:
        """Delete what is left of the previous update's keys (run while a broadcast is in flight)."""
        stale, self._stale = self._stale, []
        self._want = []  # consumed; from here on the receivers delete their requests themselves
        if stale:
            self._ctl.delete(*stale)

    def _peer_report(self, nonce: str, deadline: float, grace_s: float = 0.5) -> str:
        """After a failed broadcast: each receiver's own error, or that it said nothing (dead or stalled).

        Surviving receivers fail their side within moments of the abort and report it; this waits for
        them at most `grace_s`, and never past the update's deadline."""
        ranks = list(range(1, self.init.world_size))
        keys = {r: f"{nonce}/done/{r}" for r in ranks}
        silent_keys = set(self._ctl.wait_all(list(keys.values()), min(deadline, time.monotonic() + grace_s)))
        silent = [r for r in ranks if keys[r] in silent_keys]
        answered = [r for r in ranks if keys[r] not in silent_keys]
        errors = dict(zip(answered, self._ctl.get_many([keys[r] for r in answered]))) if answered else {}
        self._ctl.delete(*(keys[r] for r in answered))
        return ((f"; receivers that did not answer (dead or stalled): {silent}" if silent else "")
                + (f"; receivers' errors: {errors}" if errors else ""))

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """The kept CPU packing buffer, grown when a bucket needs more: uint8 [nbytes] view."""
        if self._buf is None or self._buf.numel() < nbytes:
            self._buf = None
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._buf[:nbytes]

    def _announce(self, nonce: str, version: int, header: dict, deadline: float, stats: dict, keys: list,
                  while_waiting=None) -> None:
        """Wait until every receiver asked for `version` (want/<v>/<r>, usually there already), choose the
        gloo group, and answer every request (go/<req>) with the nonce and the first bucket's header.
        The consumed requests (self._want) are deleted once the data flows (`_cleanup`).
        `while_waiting()` runs when the requests are not all there yet (the sender packs meanwhile).

        The group of the last update is kept when reuse is on and every receiver still holds it;
        otherwise a fresh one is named after this update's nonce (created on both sides right after
        this announcement)."""
        ctl = self._ctl
        ranks = list(range(1, self.init.world_size))
        want = [f"want/{version}/{r}" for r in ranks]
        self._want = want
        latest = {"version": int(version), "nonce": nonce}  # for the receivers' error messages
        if not ctl.store.check([ctl.PREFIX + k for k in want]):
            # receivers not there yet: say which version is coming, use the wait, then wait for them
            ctl.set("latest", latest)
            if while_waiting is not None:
                while_waiting()
        asks, absent = ctl.get_all(want, deadline)
        if absent:
            present = [r for r, k in zip(ranks, want) if k not in absent]
            self._reqs = {r: a["req"] for r, a in zip(present, ctl.get_many([want[r - 1] for r in present]))}
            keys.extend(f"go/{q}" for q in self._reqs.values())
            raise WeightSyncError(f"receivers {[r for r, k in zip(ranks, want) if k in absent]} "
                                  f"not ready for version {version}")
        asks = dict(zip(ranks, asks))
        self._reqs = {r: a["req"] for r, a in asks.items()}
        keys.extend(f"go/{q}" for q in self._reqs.values())
        reports = {r: a["prev"] for r, a in asks.items() if a.get("prev")}
        if reports:
            log.warning("weight receivers reported failures after acknowledging an earlier update: %s", reports)
            stats["receiver_reports"] = reports
        group = None
        if self.init.backend == "gloo":
            if not (self.reuse_group and self._pg is not None
                    and all(a.get("group") == self._group_id for a in asks.values())):
                self._drop_group()
                self._group_id = nonce
                stats["new_group"] = True
            group = self._group_id
        go = json.dumps({"nonce": nonce, "header": dict(header, group=group)})
        ctl.store.multi_set([ctl.PREFIX + f"go/{self._reqs[r]}" for r in ranks] + [ctl.PREFIX + "latest"],
                            [go] * len(ranks) + [json.dumps(latest)])

    def _send_bucket(self, nonce: str, version: int, bucket: list, last: bool, deadline: float,
                     stats: dict, keys: list) -> None:
        header = bucket_layout(bucket)
        header["last"] = last
        gloo = self.init.backend == "gloo"
        if gloo:
            header["chunk"] = chunk_size(header["nbytes"], self.chunk_bytes)
        k = stats["num_buckets"]
        nbytes = header["nbytes"]
        packer = bounds = None
        early: dict = {}  # chunk 0, when packed while waiting for the receivers' requests
        if nbytes and gloo:
            buf = self._buffer(nbytes) if self.device.type == "cpu" else torch.empty(nbytes, dtype=torch.uint8)
            packer = _ChunkPacker(_byte_sources(bucket, header["offsets"]), buf)
            bounds = chunk_bounds(nbytes, header["chunk"])
        if k == 0:  # announced before packing: the receivers wake up while the sender packs
            self._announce(nonce, version, header, deadline, stats, keys,
                           while_waiting=(lambda: early.setdefault(0, packer.chunk(*bounds[0]))) if packer else None)
        else:
            self._ctl.set(f"{nonce}/b{k}", header)
            keys.append(f"{nonce}/b{k}")
        self._headers = k + 1
        if gloo and self._pg is None:  # receivers create their end after reading the announcement
            self._pg = _gloo_group(self._ctl, self._group_id, 0, self.init.world_size, deadline)
        if packer is not None:
            _gloo_broadcast_chunks(self._pg, bounds,
                                   lambda s, e: early.pop(0) if s == 0 and early else packer.chunk(s, e),
                                   deadline, after_first=self._cleanup if k == 0 else None)
            del packer, early
        elif nbytes:
            _, flat = pack_bucket(bucket, self.device)
            _nccl_broadcast(self._nccl, flat)
            del flat
        if k == 0 and (not nbytes or not gloo):
            self._cleanup()
        stats["num_buckets"] += 1
        stats["num_tensors"] += len(bucket)
        stats["bytes"] += nbytes

    def close(self) -> None:
        """Drop the communicator, the gloo group and the packing buffer, and stop hosting the store."""
        self._drop_group()
        self._buf = None
        if self._ctl is not None and self._stale:
            self._ctl.delete(*self._stale)
        self._stale = []
        _release(self)


# ----------------------------------------------------------------------------------------------
# Receiver side

class WeightReceiver:
    """One inference worker's end. Used inside vLLM by `archer_async.vllm_plugin` and stand-alone
    (transformers backend, tests):

        rx = WeightReceiver(sync_init.for_rank(receiver_rank(i)))
        rx.connect()
        for name, tensor in rx.receive(expected_version=v): ...

    `receive` yields (name, tensor view [shape] of dtype) bucket by bucket and acknowledges to the
    sender when the last bucket arrived; the consumer must exhaust it. Any failure (deadline, abort,
    lost peer) raises WeightSyncError from the iterator.
    """

    def __init__(self, init: "SyncInit | dict", device: "torch.device | str" = "cpu", nccl_comm=None):
        self.init = SyncInit.from_any(init)
        if not 1 <= self.init.rank < self.init.world_size:
            raise ValueError(f"receiver rank {self.init.rank} outside 1..{self.init.world_size - 1}")
        self.device = torch.device(device)
        self._ctl: Optional[_Control] = None
        self._nccl = nccl_comm
        self._pg = None  # gloo group of the last successful update, reused while the sender names it
        self._group_id: Optional[str] = None
        self._consumer_error: Optional[str] = None  # consumer failure after an acknowledgement, for the sender
        self._prev_done: Optional[str] = None  # acknowledgement key of the last update (deleted at the next)
        self.last_stats: dict = {}

    def connect(self, timeout_s: Optional[float] = None) -> None:
        """Reach the sender's store (retrying until the deadline) and say hello; join NCCL when used."""
        self._drop_group()  # a group belongs to one sender's store
        self._ctl = _Control(self.init, is_master=False, timeout_s=timeout_s or self.init.timeout_s)
        self._ctl.set(f"hello/{self.init.rank}", time.time())
        if self.init.backend == "nccl" and self._nccl is None:
            self._nccl = _nccl_group(self.init, self.init.rank, self.device)

    def _ensure_control(self, deadline: Optional[float] = None) -> _Control:
        """The store client, (re)connected when there is none (a lost store shows as an error of its
        next call, which `_request` answers by dropping the client and coming back here)."""
        if self._ctl is not None:
            return self._ctl
        self.connect(None if deadline is None else max(1.0, deadline - time.monotonic()))
        assert self._ctl is not None
        return self._ctl

    def _request(self, version: int, deadline: float) -> tuple[_Control, dict, str]:
        """Ask for `version` and wait for the sender's answer: (store client, {"nonce", "header"} of bucket 0,
        request id).

        The request (want/<v>/<rank> = {"req", "group"}) is usually in the store before the sender
        starts the update, so the sender's announcement is the only wake-up before the data flows.
        Survives a sender restart meanwhile (reconnects and asks again)."""
        rank = self.init.rank
        while True:
            try:
                ctl = self._ensure_control(deadline)
                req = f"{rank}-{uuid.uuid4().hex[:12]}"
                ask = {"req": req, "group": self._group_id}
                if self._consumer_error:  # reported once, with the next request
                    ask["prev"] = self._consumer_error
                ctl.set(f"want/{version}/{rank}", ask)
                self._consumer_error = None
                got, _ = ctl.get_all([f"go/{req}"], deadline)
                if got:
                    go = got[0]
                    if "abort" in go:
                        raise WeightSyncError(f"rank {rank}: sender aborted the update: {go['abort']}")
                    return ctl, go, req
                ctl.delete(f"want/{version}/{rank}")  # nobody is waiting any more
                latest = None
                try:
                    latest = ctl.get("latest") if ctl.has("latest") else None
                except Exception:
                    pass
                raise WeightSyncError(
                    f"rank {rank}: the sender never announced version {version} within the deadline"
                    + (f" (its latest announced update is version {latest['version']})" if latest else ""))
            except WeightSyncError:
                raise
            except Exception as e:  # the store went away (learner restart): reconnect until the deadline
                if time.monotonic() >= deadline:
                    raise WeightSyncError(f"rank {rank}: control store unreachable: {e}") from e
                log.warning("weight receiver rank %d: control store lost (%s); reconnecting", rank, e)
                self._ctl = None
                self._drop_group()
                time.sleep(0.1)

    def _drop_group(self) -> None:
        self._pg = None
        self._group_id = None

    def _header(self, ctl: _Control, nonce: str, k: int, version: int, deadline: float) -> dict:
        """Header of bucket k (blocking); WeightSyncError when the sender aborted or at the deadline."""
        key = f"{nonce}/b{k}"
        got, _ = ctl.get_all([key], deadline)
        if not got:
            abort = ctl.get(f"{nonce}/abort") if ctl.has(f"{nonce}/abort") else None
            if abort is not None:
                raise WeightSyncError(f"sender aborted the update: {abort}")
            raise WeightSyncError(f"deadline passed waiting for bucket {k} of version {version}")
        header = got[0]
        if "abort" in header:
            raise WeightSyncError(f"sender aborted the update: {header['abort']}")
        return header

    def receive(self, expected_version: int, timeout_s: Optional[float] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the weights of `expected_version` (see the class docstring).

        The acknowledgement goes to the sender as soon as the last bucket's bytes are here, before its
        tensors are yielded (the data and the group's collectives are complete then). If the consumer
        stops or fails while taking that last bucket, the failure is its own caller's to raise, and
        it is also reported to the sender with this receiver's next request."""
        t0 = time.monotonic()
        deadline = t0 + (timeout_s or self.init.timeout_s)
        rank = self.init.rank
        version = int(expected_version)
        ctl = nonce = req = None
        acked = completed = False
        taken = total = 0
        stats = {"version": version, "bytes": 0, "num_tensors": 0, "num_buckets": 0, "new_group": False}
        try:
            ctl, go, req = self._request(version, deadline)
            nonce, header = go["nonce"], go["header"]
            k = 0
            while True:
                if k:
                    header = self._header(ctl, nonce, k, version, deadline)
                if k == 0 and self.init.backend == "gloo":
                    group = header.get("group")
                    if group is None:
                        raise WeightSyncError(f"rank {rank}: the sender named no gloo group for version {version}")
                    if group != self._group_id or self._pg is None:
                        self._drop_group()
                        self._pg = _gloo_group(ctl, group, rank, self.init.world_size, deadline)
                        self._group_id = group
                        stats["new_group"] = True
                nbytes = header["nbytes"]
                flat = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                if nbytes:
                    if self.init.backend == "gloo":
                        _gloo_broadcast_chunks(self._pg, chunk_bounds(nbytes, header.get("chunk", 0)),
                                               lambda s, e: flat[s:e], deadline)
                    else:
                        _nccl_broadcast(self._nccl, flat)
                tensors = unpack_bucket(header, flat)
                stats["bytes"] += nbytes
                stats["num_tensors"] += len(tensors)
                stats["num_buckets"] += 1
                if header["last"]:
                    ctl.set(f"{nonce}/done/{rank}", "ok")
                    acked = True
                    stats["ack_s"] = time.monotonic() - t0
                    taken, total = 0, len(tensors)
                for item in tensors:
                    taken += 1
                    yield item
                del tensors, flat
                k += 1
                if header["last"]:
                    break
            completed = True
        except Exception as e:
            if acked:  # the sender already has this update; the consumer's failure goes with the next request
                self._consumer_error = f"version {version}: consumer failed: {type(e).__name__}: {e}"
                raise
            if ctl is not None and nonce is not None:
                try:
                    ctl.set(f"{nonce}/done/{rank}", f"{type(e).__name__}: {e}")
                except Exception:
                    pass
            if isinstance(e, WeightSyncError):
                raise
            raise WeightSyncError(f"rank {rank}: receiving version {expected_version} failed: "
                                  f"{type(e).__name__}: {e}") from e
        finally:
            if acked and not completed and taken < total and self._consumer_error is None:
                self._consumer_error = (f"version {version}: consumer stopped after {taken} of the "
                                        f"{total} tensors of the last bucket")
            if not acked:  # failed, or the consumer walked away: this group may hold a half-done collective
                self._drop_group()
            if ctl is not None and req is not None:
                # this receiver's own keys, after the sender read them: the request and its answer now,
                # the previous update's acknowledgement (read before this update was announced)
                stale = [f"want/{version}/{rank}", f"go/{req}"] + ([self._prev_done] if self._prev_done else [])
                self._prev_done = f"{nonce}/done/{rank}" if acked else None
                ctl.delete(*stale)
        stats["seconds"] = time.monotonic() - t0
        self.last_stats = stats

    def close(self) -> None:
        """Forget the store client, the gloo group and the communicator."""
        self._drop_group()
        _release(self)


def _release(side: "WeightSender | WeightReceiver") -> None:
    """Destroy a side's NCCL communicator (best effort) and drop its control-store handle."""
    if side._nccl is not None:
        try:
            side._nccl.destroy()
        except Exception:  # noqa: BLE001 - tearing down a possibly broken communicator
            pass
    side._nccl = None
    side._ctl = None

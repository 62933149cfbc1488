"""Learner -> actor weight transfer: one control call per update, bucketed broadcasts, a deadline.

What both ends of the wire share, so that the learner (sender: `learner.weight_sender.WeightSender`)
and the actors' inference workers (receivers: `actors.weight_receiver.WeightReceiver`, inside
vLLM through `actors.vllm_weight_engine`, or stand-alone) agree on one protocol: the group's init info
(`SyncInit`, `make_sync_init`, `sync_init_from_config`), the control plane (`Control`), the
data-plane collectives (`gloo_group`, `gloo_broadcast_chunks`, `nccl_group`, `nccl_broadcast`) and
the state both ends hold (`Endpoint`). The protocol itself is described here; this module imports
neither end.

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
    sender:  set "latest" = {version, nonce}: the update it starts (for the error message of a receiver
             waiting for another version; a one-way write, the store sends no reply)
             lay out bucket 0 (names, dtypes, shapes, offsets, bytes, chunk size; no copy yet)
             wait want/v/r for all r (one blocking multi_get)
             set go/<req> for every request, one multi_set = {nonce, header of bucket 0, gloo group}
                                                           ->  receivers: wake on go/<req>
             broadcast bucket 0 in chunks (gloo: `chunk_bounds`, <= 2 in flight, chunk k+1 packed while
             chunk k travels; chunks follow tensor boundaries, and a tensor of >= 4 MB travels in
             pieces of its own, sent from its memory uncopied)
                                                           ->  receive the chunks into one flat buffer
             for bucket k >= 1: set <nonce>/b<k> = header, broadcast  ->  wait <nonce>/b<k>, receive, yield
             wait <nonce>/done/r for all r  <-  set <nonce>/done/r = "ok" | error text
                                                   ("ok" as soon as the last bucket's bytes are in,
                                                    before its tensors are yielded)
             (on any failure: set <nonce>/abort = reason and wake the receivers where they block:
              go/<req> or <nonce>/b<next> = {"abort": reason}; they raise at once (one inside a
              broadcast that will not complete raises at its deadline: dropping a gloo group does not
              fail its peers' pending operations), and the sender's error names the receivers that did
              not answer and quotes those that did)

So an update costs one wake-up before the data and one after it (the acknowledgement), like a
broadcast followed by a barrier. Store keys are deleted off that path: each receiver deletes its
request and answer after acknowledging, and its acknowledgement at the end of its next update (the
sender has read it by then); the sender deletes extra bucket headers (and a failed update's keys)
while the next update's first chunk travels. A consumer that stops or fails after the
acknowledgement (while taking the last bucket) raises to its own caller; the receiver also reports
it in its next request, and the sender logs it and returns it as `stats["receiver_reports"]`.

Bucket layout, packing and chunking are in `archer_async.weight_sync.buckets`. Memory: the sender packs
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
import socket
import time
from typing import Any, Optional

import torch
import torch.distributed as dist



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


def tcp_store(host: str, port: int, is_master: bool, timeout: datetime.timedelta,
              world_size: Optional[int] = None, wait_for_workers: bool = False) -> dist.TCPStore:
    """A torch TCPStore at host:port. The master listens on `host` only: torch's own listener binds
    every interface (`*`), which would expose the unauthenticated store to every network the node
    is on; so the master binds its listening socket itself and hands it over (master_listen_fd)."""
    if not is_master:
        return dist.TCPStore(host, port, world_size, False, timeout=timeout, wait_for_workers=False)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(4096)
        store = dist.TCPStore(host, sock.getsockname()[1], world_size, True, timeout=timeout,
                              wait_for_workers=wait_for_workers, master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store owns the listening descriptor now
    return store


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
    return make_sync_init(cfg.actors.num_actors, backend=backend, host=host or cfg.sync.host or "127.0.0.1",
                          timeout_s=cfg.sync.timeout_s, store_port=cfg.sync.store_port)


# ----------------------------------------------------------------------------------------------
# Control plane

class Control:
    """JSON values in a TCPStore under one prefix; waits block in the store until the key is set."""

    PREFIX = "archer-ws/"

    def __init__(self, init: SyncInit, is_master: bool, timeout_s: float):
        self.timeout = datetime.timedelta(seconds=max(1.0, timeout_s))
        self.store = tcp_store(init.host, init.store_port, is_master,
                               datetime.timedelta(seconds=max(1.0, timeout_s)))

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


def gloo_group(ctl: Control, group_id: str, rank: int, world_size: int, deadline: float):
    """A fresh gloo group (rendezvous under `group_id`, bounded by the deadline)."""
    return dist.ProcessGroupGloo(dist.PrefixStore(f"archer-pg/{group_id}", ctl.store), rank, world_size,
                                 _remaining(deadline))


def gloo_broadcast_chunks(pg, bounds: list[tuple[int, int]], chunk, deadline: float, after_first=None,
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


def nccl_group(init: SyncInit, rank: int, device: torch.device):
    """The persistent NCCL communicator of the group (vLLM's stateless rendezvous)."""
    from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group

    return stateless_init_process_group(init.host, init.nccl_port, rank, init.world_size, device)


def nccl_broadcast(comm, flat: torch.Tensor) -> None:
    stream = torch.cuda.current_stream()
    comm.broadcast(flat, src=0, stream=stream)
    stream.synchronize()


class Endpoint:
    """What both ends of a transfer group hold: the init info, the control-store client, the data
    plane (the gloo group of the last successful update, or the NCCL communicator) and a reusable
    CPU buffer. `WeightSender` (learner) and `WeightReceiver` (actors) build on it."""

    def __init__(self, init: "SyncInit | dict", device: "torch.device | str" = "cpu", nccl_comm=None):
        self.init = SyncInit.from_any(init)
        self.device = torch.device(device)
        self._ctl: Optional[Control] = None
        self._nccl = nccl_comm
        self._pg = None  # gloo group of the last successful update, reused while the membership holds
        self._group_id: Optional[str] = None
        self._buf: Optional[torch.Tensor] = None  # reused CPU buffer, uint8

    def _drop_group(self) -> None:
        """Forget the gloo group (after a failure, or when another group is named)."""
        self._pg = None
        self._group_id = None

    def _release(self) -> None:
        """Forget the group and the buffer, destroy the NCCL communicator (best effort) and drop the
        control-store client."""
        self._drop_group()
        self._buf = None
        if self._nccl is not None:
            try:
                self._nccl.destroy()
            except Exception:  # noqa: BLE001 - tearing down a possibly broken communicator
                pass
        self._nccl = None
        self._ctl = None

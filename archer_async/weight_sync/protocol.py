"""Learner -> actor weight transfer: one control call per update, bucketed broadcasts, a deadline.

What both ends of the wire share, so that the learner (sender: `learner.weight_sender.WeightSender`)
and the actors' inference workers (receivers: `actors.weight_receiver.WeightReceiver`, inside
vLLM through `actors.vllm_weight_engine`, or stand-alone) agree on one protocol: the group's init info
(`SyncInit`, `make_sync_init`), the control plane (`Control`), the
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
- nccl (GPU): a vLLM `PyNcclCommunicator`, built on demand by the update that needs it and kept, like
  the gloo group, while the membership is unchanged and every update on it succeeded. Its rendezvous
  runs over the control store (a `StatelessProcessGroup` on a `PrefixStore` named after the group:
  no port of its own), right after the announcement, so every member joins concurrently (the receivers
  are all waiting for the announcement then; the sender starts right after writing it); a failed or
  late rendezvous fails the update on every side and the next update tries again. A re-placed actor
  reports no group, so the next update builds a new communicator on every side. A communicator that
  vLLM disabled (`VLLM_DISABLE_PYNCCL`, no NCCL library) is an error, never a silent no-op. NCCL
  collectives cannot time out, so each broadcast runs under a watchdog (`nccl_broadcast`): at the
  update's deadline, or as soon as the other side reported a failure (the sender's abort key for a
  receiver, a receiver's error for the sender), the communicator is aborted (`destroy()`, i.e.
  `ncclCommAbort`, which ends the stuck kernel) and the update fails on that side; the next update
  builds a new one.

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
                                                   ("ok" as soon as the last bucket's bytes are in;
                                                    its tensors are unpacked meanwhile)
             set <nonce>/commit = "ok"      ->  wait <nonce>/commit, then yield the last bucket's tensors
                                                   (an update that failed on any rank never reaches a
                                                    consumer's last bucket: everyone keeps the old weights)
             (on any failure: set <nonce>/abort = reason and wake the receivers where they block:
              go/<req>, or <nonce>/b<next> and <nonce>/commit = {"abort": reason}; they raise at once;
              one inside a gloo broadcast that will not complete raises at its deadline (dropping a
              gloo group does not fail its peers' pending operations), one inside an NCCL broadcast
              as soon as its watchdog sees <nonce>/abort; the sender's error names the receivers that
              did not answer and quotes those that did)

So an update costs one wake-up before the data and two after it (the acknowledgement and the
confirmation), like a broadcast followed by a barrier and a commit. Store keys are deleted off that path: each receiver deletes its
request and answer after acknowledging, and its acknowledgement at the end of its next update (the
sender has read it by then); the sender deletes extra bucket headers (and a failed update's keys)
while the next update's first chunk travels. A consumer that stops or fails after the
acknowledgement (while taking the last bucket) raises to its own caller; the receiver also reports
it in its next request, and the sender logs it and returns it as `stats["receiver_reports"]`.

Bucket layout, packing and chunking are in `archer_async.weight_sync.buckets`. Memory: the sender packs
every bucket into one flat buffer; on CPU that buffer is kept between
updates (it is at most one bucket, `bucket_bytes`, and reusing it saves the page faults of a fresh
allocation); the receiver holds what its consumer keeps (the vLLM engine stages a whole update
before loading it, so that a failed transfer leaves the old weights in place; on a GPU it receives
with `to_host`, so the staged copy is in host memory and the GPU holds one bucket beyond the model).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import secrets
import socket
import threading
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist



class WeightSyncError(RuntimeError):
    """A weight update failed or missed its deadline. Receivers keep serving the previous version."""


@dataclasses.dataclass
class SyncInit:
    """Where and how the transfer group meets. The launcher builds one (`make_sync_init`) and hands
    it to the learner (rank 0) and, with `for_rank(receiver_rank(i))`, to actor i."""

    host: str
    """Address of the sender's TCPStore (the control plane, and the rendezvous of the gloo group or NCCL
    communicator); reachable from every actor."""
    store_port: int
    """TCPStore port (the control plane)."""
    world_size: int
    """1 (the sender) + number of receiving inference workers."""
    backend: str = "gloo"
    """Data plane: "gloo" (CPU tensors) or "nccl" (CUDA tensors)."""
    timeout_s: float = 120.0
    """Deadline of one update (handshake + data + acknowledgement) and of `connect()`."""
    rank: int = 0
    """This process's rank: 0 for the sender, 1..world_size-1 for receivers."""
    token: str = ""
    """The group's secret: every key of the control store lives under it. torch's TCPStore has no
    authentication and no way to list keys, so a client that reaches the port without the token can
    neither read nor set anything the group uses ("": no namespace, for tests only)."""

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


def secret_namespace(store: dist.Store, token: str) -> dist.Store:
    """`store` with every key under the secret `token` ("" leaves it as is). What a TCPStore offers in
    place of authentication: it has no key listing, so without the token nothing of the group's can be
    read, overwritten or deleted by another client of the port."""
    return dist.PrefixStore(f"{token}/", store) if token else store


def receiver_rank(actor_index: int, workers_per_actor: int = 1) -> int:
    """Transfer-group rank of actor `actor_index`'s first inference worker."""
    return 1 + actor_index * workers_per_actor


def make_sync_init(num_actors: int, backend: str = "gloo", host: str = "127.0.0.1",
                   timeout_s: float = 120.0, store_port: int = 0,
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
        rank=0,
        token=secrets.token_hex(16),
    )


# ----------------------------------------------------------------------------------------------
# Control plane

class Control:
    """JSON values in a TCPStore under one prefix; waits block in the store until the key is set."""

    PREFIX = "archer-ws/"

    def __init__(self, init: SyncInit, is_master: bool, timeout_s: float):
        self.host, self.port, self.token = init.host, init.store_port, init.token
        self.timeout = datetime.timedelta(seconds=max(1.0, timeout_s))
        self.store = secret_namespace(tcp_store(init.host, init.store_port, is_master, self.timeout), init.token)

    def client(self, prefix: str, deadline: float):
        """A second client of this store (its own connection, blocking calls bounded by the deadline),
        under `prefix`: a rendezvous blocked in it never holds up this client's calls."""
        store = dist.TCPStore(self.host, self.port, is_master=False, timeout=_remaining(deadline),
                              wait_for_workers=False)
        return dist.PrefixStore(prefix, secret_namespace(store, self.token))

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


NcclFactory = Callable[[Any, int, int, torch.device], Any]
"""Builds one member of an NCCL communicator: (rendezvous store, rank, world size, device) -> an object
with vLLM `PyNcclCommunicator`'s interface (`broadcast(tensor, src, stream)`, `destroy()`, `disabled`,
`device`). The default is `vllm_nccl_communicator`."""


def vllm_nccl_communicator(store, rank: int, world_size: int, device: torch.device):
    """vLLM's `PyNcclCommunicator` on `device`, rendezvoused through `store` (a `StatelessProcessGroup`
    over it: rank 0 publishes the NCCL unique id there; no port of its own)."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup
    from vllm.utils.nccl import unpinned_nccl_env

    pg = StatelessProcessGroup(rank=rank, world_size=world_size, store=store)
    with unpinned_nccl_env():
        return PyNcclCommunicator(pg, device=device)


def _watch(fn, what: str, deadline: float, aborted: Optional[Callable[[], Optional[str]]] = None,
           on_abort: Optional[Callable[[], None]] = None, poll_s: float = 0.2):
    """Run the blocking `fn()` in a daemon thread and return its result; WeightSyncError (after
    `on_abort()`) at the deadline or as soon as `aborted()` returns a reason (checked every `poll_s`).
    A thread still blocked after `on_abort` is left behind (daemon): the caller is never held."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = e

    th = threading.Thread(target=run, name=f"archer-ws-{what}", daemon=True)
    th.start()
    reason = None
    while True:
        th.join(max(0.0, min(poll_s, deadline - time.monotonic())))
        if not th.is_alive():
            break
        if time.monotonic() >= deadline:
            reason = "the update's deadline passed"
        elif aborted is not None:
            reason = aborted()
        if reason:
            break
    if reason:
        if on_abort is not None:
            try:
                on_abort()
            except Exception:  # noqa: BLE001 - tearing down a stuck communicator; the error below is the news
                pass
        raise WeightSyncError(f"{what} aborted: {reason}")
    if "error" in box:
        e = box["error"]
        raise WeightSyncError(f"{what} failed: {type(e).__name__}: {e}") from e
    return box.get("value")


def _check_enabled(comm, what: str) -> None:
    if comm is None or getattr(comm, "disabled", False) or not getattr(comm, "available", True):
        raise WeightSyncError(
            f"{what}: the NCCL communicator is disabled (vLLM disables it when VLLM_DISABLE_PYNCCL is set, "
            f"the NCCL library cannot be loaded, or it was aborted); its broadcasts would move no bytes")


def nccl_group(ctl: Control, group_id: str, rank: int, world_size: int, device: torch.device, deadline: float,
               factory: Optional[NcclFactory] = None, aborted=None):
    """A fresh NCCL communicator for the group `group_id`, every member joining now (rendezvous over the
    control store under `archer-nccl/<group_id>`, on a client of its own, bounded by the deadline and
    by `aborted()`);
    WeightSyncError when it fails, is late, or comes back disabled."""
    factory = factory or vllm_nccl_communicator
    comm = _watch(lambda: factory(ctl.client(f"archer-nccl/{group_id}", deadline), rank, world_size, device), f"NCCL rendezvous of rank {rank}",
                  deadline, aborted)
    try:
        _check_enabled(comm, f"rank {rank}")
    except WeightSyncError:
        _destroy(comm)
        raise
    return comm


def _destroy(comm) -> None:
    try:
        if comm is not None:
            comm.destroy()
    except Exception:  # noqa: BLE001 - tearing down a possibly broken communicator
        pass


def nccl_broadcast(comm, flat: torch.Tensor, deadline: float, aborted=None) -> None:
    """Broadcast `flat` from rank 0 over `comm` and wait until it is complete on this side, under a
    watchdog: at the deadline, or when `aborted()` names a reason, the communicator is aborted
    (`destroy()`: the stuck collective ends) and WeightSyncError is raised. A disabled communicator
    is an error (vLLM's `broadcast` would silently return)."""
    _check_enabled(comm, "broadcast")
    cuda = flat.device.type == "cuda"
    stream = torch.cuda.current_stream(flat.device) if cuda else None

    def run():
        if cuda:
            with torch.cuda.device(flat.device):
                comm.broadcast(flat, src=0, stream=stream)
                stream.synchronize()
        else:
            comm.broadcast(flat, src=0, stream=stream)

    _watch(run, "NCCL broadcast", deadline, aborted, on_abort=lambda: _destroy(comm))


class Endpoint:
    """What both ends of a transfer group hold: the init info, the control-store client, the data
    plane of the last successful update (its gloo group or NCCL communicator, and the group's id) and
    a reusable CPU buffer. `WeightSender` (learner) and `WeightReceiver` (actors) build on it.
    `nccl_factory` builds NCCL communicators (default `vllm_nccl_communicator`)."""

    def __init__(self, init: "SyncInit | dict", device: "torch.device | str" = "cpu",
                 nccl_factory: Optional[NcclFactory] = None):
        self.init = SyncInit.from_any(init)
        self.device = torch.device(device)
        self._ctl: Optional[Control] = None
        self._nccl = None  # NCCL communicator of the current group (nccl backend)
        self._nccl_factory = nccl_factory
        self._pg = None  # gloo group of the current group (gloo backend)
        self._group_id: Optional[str] = None
        self._buf: Optional[torch.Tensor] = None  # reused CPU buffer, uint8

    def _has_group(self) -> bool:
        return (self._pg if self.init.backend == "gloo" else self._nccl) is not None

    def _open_group(self, ctl: Control, group_id: str, deadline: float, aborted=None) -> None:
        """Join the group `group_id` (every member joins it in the same update)."""
        self._drop_group()
        if self.init.backend == "gloo":
            self._pg = gloo_group(ctl, group_id, self.init.rank, self.init.world_size, deadline)
        else:
            self._nccl = nccl_group(ctl, group_id, self.init.rank, self.init.world_size, self.device, deadline,
                                    self._nccl_factory, aborted)
        self._group_id = group_id

    def _drop_group(self) -> None:
        """Forget the gloo group and destroy the NCCL communicator (after a failure, when another group
        is named, at close)."""
        self._pg = None
        self._group_id = None
        comm, self._nccl = self._nccl, None
        _destroy(comm)

    def _release(self) -> None:
        """Drop the group and the buffer and the control-store client."""
        self._drop_group()
        self._buf = None
        self._ctl = None

"""Learner -> actor weight transfer: one control call per update, bucketed broadcasts, a deadline.

Both sides of the wire live here so that the learner (trainer side) and the actors' inference
workers (receiver side, inside vLLM through `archer_async.vllm_plugin`, or stand-alone) agree on one
protocol.

Topology. A transfer group of `world_size = 1 + R` ranks: rank 0 is learner rank 0 (the only
sender), ranks 1..R are the actors' inference workers (`receiver_rank(actor_index)`). The control
plane is a `torch.distributed.TCPStore` hosted by the sender at `SyncInit.host:store_port`; the data
plane is a broadcast from rank 0:

- gloo (CPU): a fresh `ProcessGroupGloo` per update, rendezvoused under the update's nonce, so a
  failed update can never leave a half-finished collective behind for the next one; its timeout is
  what is left of the update's deadline.
- nccl (GPU): one persistent vLLM `PyNcclCommunicator` (created at `connect()` on both sides, port
  `SyncInit.nccl_port`). NCCL collectives cannot time out: the deadline is enforced at the
  handshake and at the final acknowledgement; a receiver that dies mid-broadcast needs a new group.

One update, version v (key names under the store's prefix):

    sender:    ann/v = nonce                      receivers: wait ann/v -> nonce
               wait <nonce>/ready/r for all r  <-            set <nonce>/ready/r
               for bucket k: set <nonce>/b<k> = header (names, dtypes, shapes, offsets, bytes, last)
                             broadcast one flat uint8 buffer of the bucket  ->  receive, slice, yield
               wait <nonce>/done/r for all r   <-            set <nonce>/done/r = "ok" | error text
               (on any failure: set <nonce>/abort = reason; receivers stop waiting and raise)

Peak extra memory on the sender is one bucket (the tensors of the bucket plus its packed buffer);
the receiver holds what its consumer keeps (the vLLM engine stages a whole update before loading it,
so that a failed transfer leaves the old weights in place).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import socket
import time
import uuid
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

ALIGN_BYTES = 64
"""Every tensor starts at a multiple of this many bytes inside a bucket (dtype views need alignment)."""
_POLL_MIN_S, _POLL_MAX_S = 0.001, 0.02


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
    """JSON values in a TCPStore under one prefix, with deadline-aware polling."""

    PREFIX = "archer-ws/"

    def __init__(self, init: SyncInit, is_master: bool, timeout_s: float):
        self.store = dist.TCPStore(
            init.host, init.store_port, is_master=is_master,
            timeout=datetime.timedelta(seconds=max(1.0, timeout_s)), wait_for_workers=False,
        )

    def set(self, key: str, value: Any) -> None:
        self.store.set(self.PREFIX + key, json.dumps(value))

    def get(self, key: str) -> Any:
        return json.loads(self.store.get(self.PREFIX + key))

    def has(self, key: str) -> bool:
        return self.store.check([self.PREFIX + key])

    def delete(self, *keys: str) -> None:
        for k in keys:
            try:
                self.store.delete_key(self.PREFIX + k)
            except Exception:  # best effort: cleanup must never mask the real outcome
                pass

    def wait(self, key: str, deadline: float, abort_key: Optional[str] = None, what: str = "") -> Any:
        """Value of `key` once it exists; WeightSyncError at the deadline or when `abort_key` appears."""
        pause = _POLL_MIN_S
        while True:
            if self.has(key):
                return self.get(key)
            if abort_key is not None and self.has(abort_key):
                raise WeightSyncError(f"sender aborted the update: {self.get(abort_key)}")
            if time.monotonic() >= deadline:
                raise WeightSyncError(f"deadline passed waiting for {what or key}")
            time.sleep(pause)
            pause = min(_POLL_MAX_S, pause * 2)


def _remaining(deadline: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(0.5, deadline - time.monotonic()))


def _gloo_group(ctl: _Control, nonce: str, rank: int, world_size: int, deadline: float):
    """A fresh gloo group for one update (rendezvous under the nonce)."""
    return dist.ProcessGroupGloo(dist.PrefixStore(f"archer-pg/{nonce}", ctl.store), rank, world_size,
                                 _remaining(deadline))


def _gloo_broadcast(pg, flat: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    pg.broadcast([flat], opts).wait()


def _nccl_group(init: SyncInit, rank: int, device: torch.device):
    """The persistent NCCL communicator of the group (vLLM's stateless rendezvous)."""
    from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group

    return stateless_init_process_group(init.host, init.nccl_port, rank, init.world_size, device)


def _nccl_broadcast(comm, flat: torch.Tensor) -> None:
    stream = torch.cuda.current_stream()
    comm.broadcast(flat, src=0, stream=stream)
    stream.synchronize()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _align(n: int) -> int:
    return (n + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


def pack_bucket(tensors: list[tuple[str, torch.Tensor]], device: torch.device) -> tuple[dict, torch.Tensor]:
    """(header, flat uint8 [nbytes] buffer on `device`) of one bucket."""
    names, dtypes, shapes, offsets = [], [], [], []
    off = 0
    for name, t in tensors:
        names.append(name)
        dtypes.append(_dtype_name(t.dtype))
        shapes.append(list(t.shape))
        offsets.append(off)
        off = _align(off + t.numel() * t.element_size())
    flat = torch.empty(off, dtype=torch.uint8, device=device)
    for (_, t), o in zip(tensors, offsets):
        n = t.numel() * t.element_size()
        if n:
            flat[o:o + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
    return {"names": names, "dtypes": dtypes, "shapes": shapes, "offsets": offsets, "nbytes": off}, flat


def unpack_bucket(header: dict, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Inverse of pack_bucket: views into `flat` (no copy), one per tensor, with its dtype and shape."""
    out = []
    for name, dt, shape, o in zip(header["names"], header["dtypes"], header["shapes"], header["offsets"]):
        dtype = getattr(torch, dt)
        numel = 1
        for s in shape:
            numel *= s
        n = numel * torch.empty((), dtype=dtype).element_size()
        out.append((name, flat[o:o + n].view(dtype).view(shape)))
    return out


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
    """

    def __init__(self, init: "SyncInit | dict", backend: Optional[str] = None, timeout_s: Optional[float] = None):
        self.init = SyncInit.from_any(init)
        if backend is not None:
            self.init = dataclasses.replace(self.init, backend=backend)
        if timeout_s is not None:
            self.init = dataclasses.replace(self.init, timeout_s=float(timeout_s))
        if self.init.backend not in ("gloo", "nccl"):
            raise ValueError(f"weight-transfer backend must be gloo or nccl, got {self.init.backend!r}")
        self._ctl: Optional[_Control] = None
        self._nccl = None
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

    def _missing(self, pattern: str, deadline: float, abort_key: Optional[str] = None) -> list[int]:
        assert self._ctl is not None
        left = set(range(1, self.init.world_size))
        pause = _POLL_MIN_S
        while left:
            left = {r for r in left if not self._ctl.has(pattern.format(r=r))}
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(pause)
            pause = min(_POLL_MAX_S, pause * 2)
        return sorted(left)

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
             bucket_bytes: int = 256 << 20) -> dict:
        """Broadcast one full set of weights as `version`; blocks until every receiver acknowledged.

        Returns {"version", "seconds", "bytes", "num_tensors", "num_buckets", "receivers"}.
        """
        if self._ctl is None:
            raise WeightSyncError("WeightSender.send before connect()")
        ctl = self._ctl
        t0 = time.monotonic()
        deadline = t0 + self.init.timeout_s
        nonce = f"{int(version)}-{uuid.uuid4().hex[:10]}"
        ctl.set(f"ann/{int(version)}", nonce)
        ctl.set("latest", {"version": int(version), "nonce": nonce})
        keys = [f"ann/{int(version)}"]
        pg = None
        stats = {"version": int(version), "bytes": 0, "num_tensors": 0, "num_buckets": 0,
                 "receivers": self.num_receivers}
        try:
            missing = self._missing(nonce + "/ready/{r}", deadline)
            if missing:
                raise WeightSyncError(f"receivers {missing} not ready for version {version}")
            keys += [f"{nonce}/ready/{r}" for r in range(1, self.init.world_size)]
            if self.init.backend == "gloo":
                pg = _gloo_group(ctl, nonce, 0, self.init.world_size, deadline)
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
                    self._send_bucket(pg, nonce, bucket, last=False, stats=stats, keys=keys)
                    bucket, size = [], 0
                bucket.append((name, t))
                size += n
            self._send_bucket(pg, nonce, bucket, last=True, stats=stats, keys=keys)
            del bucket
            missing = self._missing(nonce + "/done/{r}", deadline)
            if missing:
                raise WeightSyncError(f"receivers {missing} did not acknowledge version {version}")
            errors = [(r, ctl.get(f"{nonce}/done/{r}")) for r in range(1, self.init.world_size)]
            keys += [f"{nonce}/done/{r}" for r in range(1, self.init.world_size)]
            bad = [(r, e) for r, e in errors if e != "ok"]
            if bad:
                raise WeightSyncError(f"receivers failed version {version}: {bad}")
        except Exception as e:
            ctl.set(f"{nonce}/abort", f"{type(e).__name__}: {e}")
            log.error("weight update to version %s FAILED after %.1f s: %s", version, time.monotonic() - t0, e)
            if isinstance(e, WeightSyncError):
                raise
            raise WeightSyncError(f"weight update to version {version} failed: {type(e).__name__}: {e}") from e
        finally:
            ctl.delete(*keys)
            del pg
        stats["seconds"] = time.monotonic() - t0
        return stats

    def _send_bucket(self, pg, nonce: str, bucket: list, last: bool, stats: dict, keys: list) -> None:
        header, flat = pack_bucket(bucket, self.device)
        header["last"] = last
        k = stats["num_buckets"]
        self._ctl.set(f"{nonce}/b{k}", header)
        keys.append(f"{nonce}/b{k}")
        if header["nbytes"]:
            if pg is not None:
                _gloo_broadcast(pg, flat)
            else:
                _nccl_broadcast(self._nccl, flat)
        stats["num_buckets"] += 1
        stats["num_tensors"] += len(bucket)
        stats["bytes"] += header["nbytes"]

    def close(self) -> None:
        """Drop the communicator and stop hosting the store."""
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
        self.last_stats: dict = {}

    def connect(self, timeout_s: Optional[float] = None) -> None:
        """Reach the sender's store (retrying until the deadline) and say hello; join NCCL when used."""
        self._ctl = _Control(self.init, is_master=False, timeout_s=timeout_s or self.init.timeout_s)
        self._ctl.set(f"hello/{self.init.rank}", time.time())
        if self.init.backend == "nccl" and self._nccl is None:
            self._nccl = _nccl_group(self.init, self.init.rank, self.device)

    def _ensure_control(self, deadline: Optional[float] = None) -> _Control:
        """The store client, reconnected when the sender restarted since the last update."""
        if self._ctl is not None:
            try:
                self._ctl.has("latest")
                return self._ctl
            except Exception:
                log.warning("weight receiver rank %d: lost the control store, reconnecting", self.init.rank)
        self.connect(None if deadline is None else max(1.0, deadline - time.monotonic()))
        assert self._ctl is not None
        return self._ctl

    def _wait_announcement(self, version: int, deadline: float) -> tuple[_Control, str]:
        """(store client, nonce) of the sender's update `version`; survives a sender restart meanwhile."""
        while True:
            try:
                ctl = self._ensure_control(deadline)
                return ctl, ctl.wait(f"ann/{version}", deadline, what=f"version {version}")
            except WeightSyncError:
                latest = None
                try:
                    latest = self._ctl.get("latest") if self._ctl is not None and self._ctl.has("latest") else None
                except Exception:
                    pass
                raise WeightSyncError(
                    f"rank {self.init.rank}: the sender never announced version {version} within the deadline"
                    + (f" (its latest announced update is version {latest['version']})" if latest else "")) from None
            except Exception as e:  # the store went away (learner restart): reconnect until the deadline
                if time.monotonic() >= deadline:
                    raise WeightSyncError(f"rank {self.init.rank}: control store unreachable: {e}") from e
                log.warning("weight receiver rank %d: control store lost (%s); reconnecting", self.init.rank, e)
                self._ctl = None
                time.sleep(0.1)

    def receive(self, expected_version: int, timeout_s: Optional[float] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the weights of `expected_version` (see the class docstring)."""
        t0 = time.monotonic()
        deadline = t0 + (timeout_s or self.init.timeout_s)
        rank = self.init.rank
        ctl = None
        nonce = None
        pg = None
        stats = {"version": int(expected_version), "bytes": 0, "num_tensors": 0, "num_buckets": 0}
        try:
            ctl, nonce = self._wait_announcement(int(expected_version), deadline)
            abort_key = f"{nonce}/abort"
            ctl.set(f"{nonce}/ready/{rank}", 1)
            if self.init.backend == "gloo":
                pg = _gloo_group(ctl, nonce, rank, self.init.world_size, deadline)
            k = 0
            while True:
                header = ctl.wait(f"{nonce}/b{k}", deadline, abort_key, what=f"bucket {k} of version {expected_version}")
                flat = torch.empty(header["nbytes"], dtype=torch.uint8, device=self.device)
                if header["nbytes"]:
                    if pg is not None:
                        _gloo_broadcast(pg, flat)
                    else:
                        _nccl_broadcast(self._nccl, flat)
                tensors = unpack_bucket(header, flat)
                stats["bytes"] += header["nbytes"]
                stats["num_tensors"] += len(tensors)
                stats["num_buckets"] += 1
                yield from tensors
                del tensors, flat
                k += 1
                if header["last"]:
                    break
            ctl.set(f"{nonce}/done/{rank}", "ok")
        except Exception as e:
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
            del pg
        stats["seconds"] = time.monotonic() - t0
        self.last_stats = stats

    def close(self) -> None:
        """Forget the store client and the communicator."""
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

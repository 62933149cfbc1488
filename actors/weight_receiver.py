"""An inference worker's end of the weight transfer (`WeightReceiver`): asks for a version, receives
its buckets and yields the tensors, then acknowledges to the sender.

The protocol, the control plane and the collectives it uses are in `archer_async.weight_sync.protocol`
(its module docstring describes one update step by step); the sending end is
`learner.weight_sender`; bucket layout and unpacking are in `archer_async.weight_sync.buckets`.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Iterator, Optional

import torch

from archer_async.weight_sync.buckets import chunk_bounds, unpack_bucket
from archer_async.weight_sync import (
    Control, Endpoint, SyncInit, WeightSyncError, gloo_broadcast_chunks, nccl_broadcast,
)

log = logging.getLogger(__name__)


class WeightReceiver(Endpoint):
    """One inference worker's end. Used inside vLLM by `actors.vllm_weight_engine` and stand-alone
    (transformers backend, tests):

        rx = WeightReceiver(sync_init.for_rank(receiver_rank(i)))
        rx.connect()
        for name, tensor in rx.receive(expected_version=v): ...

    `receive` yields (name, tensor view [shape] of dtype) bucket by bucket and acknowledges to the
    sender when the last bucket arrived; the consumer must exhaust it. Any failure (deadline, abort,
    lost peer) raises WeightSyncError from the iterator.

    `device`: where the bytes arrive (nccl: the communicator's CUDA device). `nccl_factory`: see
    `archer_async.weight_sync.protocol.NcclFactory` (default: vLLM's PyNcclCommunicator).
    """

    def __init__(self, init: "SyncInit | dict", device: "torch.device | str" = "cpu", nccl_factory=None):
        super().__init__(init, device, nccl_factory)
        if not 1 <= self.init.rank < self.init.world_size:
            raise ValueError(f"receiver rank {self.init.rank} outside 1..{self.init.world_size - 1}")
        self._consumer_error: Optional[str] = None  # consumer failure after an acknowledgement, for the sender
        self._prev_done: Optional[str] = None  # acknowledgement key of the last update (deleted at the next)
        self._dev_buf: Optional[torch.Tensor] = None  # GPU receive buffer of `receive(to_host=True)`
        self.last_stats: dict = {}

    def connect(self, timeout_s: Optional[float] = None) -> None:
        """Reach the sender's store (retrying until the deadline) and say hello. The data plane (gloo
        group or NCCL communicator) is joined by the update that the sender announces with it."""
        self._drop_group()  # a group belongs to one sender's store
        self._ctl = Control(self.init, is_master=False, timeout_s=timeout_s or self.init.timeout_s)
        self._ctl.set(f"hello/{self.init.rank}", time.time())

    def _ensure_control(self, deadline: Optional[float] = None) -> Control:
        """The store client, (re)connected when there is none (a lost store shows as an error of its
        next call, which `_request` answers by dropping the client and coming back here)."""
        if self._ctl is not None:
            return self._ctl
        self.connect(None if deadline is None else max(1.0, deadline - time.monotonic()))
        assert self._ctl is not None
        return self._ctl

    def _request(self, version: int, deadline: float) -> tuple[Control, dict, str]:
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
                    + (f" (the latest update it started is version {latest['version']})" if latest else ""))
            except WeightSyncError:
                raise
            except Exception as e:  # the store went away (learner restart): reconnect until the deadline
                if time.monotonic() >= deadline:
                    raise WeightSyncError(f"rank {rank}: control store unreachable: {e}") from e
                log.warning("weight receiver rank %d: control store lost (%s); reconnecting", rank, e)
                self._ctl = None
                self._drop_group()
                time.sleep(0.1)

    def _receive_buffer(self, nbytes: int, staging: bool = False) -> torch.Tensor:
        """uint8 [nbytes] to receive a bucket into. On CPU the previous buffer is reused when no tensor
        a consumer took from it is still alive (its storage has no other user): a fresh allocation of a
        few MB is fresh mmap'd memory, one page fault per 4 KB on first touch. Otherwise (a consumer
        that keeps the tensors, a staged multi-bucket update, GPU) a new buffer. `staging` (GPU, bytes
        copied to the host after each bucket): one GPU buffer, grown when needed, serves every bucket."""
        if self.device.type != "cpu":
            if not staging:
                return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            if self._dev_buf is None or self._dev_buf.numel() < nbytes:
                self._dev_buf = None
                self._dev_buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            return self._dev_buf[:nbytes]
        b = self._buf
        # use count: self._buf plus the temporary storage object of this call
        if b is not None and b.numel() >= nbytes and torch._C._storage_Use_Count(b.untyped_storage()._cdata) <= 2:
            return b[:nbytes]
        self._buf = None
        self._buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._buf

    def _header(self, ctl: Control, nonce: str, k: int, version: int, deadline: float) -> dict:
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

    def receive(self, expected_version: int, timeout_s: Optional[float] = None,
                to_host: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the weights of `expected_version` (see the class docstring).

        `to_host`: each bucket that arrived on the GPU is copied to host memory before its tensors
        are yielded, and its GPU buffer is reused by the next bucket: a consumer that stages the whole
        update (keeps every tensor until it loads them) then holds it in host memory, and the GPU
        holds one bucket beyond the model, never a second copy of it.

        The acknowledgement goes to the sender as soon as the last bucket's bytes are here (the data and
        the group's collectives are complete then); the last bucket's tensors are yielded once the
        sender confirmed the update (every receiver acknowledged), so an update that failed anywhere
        never reaches a consumer's last bucket. If the consumer
        stops or fails while taking that last bucket, the failure is its own caller's to raise, and
        it is also reported to the sender with this receiver's next request."""
        t0 = time.monotonic()
        deadline = t0 + (timeout_s or self.init.timeout_s)
        rank = self.init.rank
        version = int(expected_version)
        ctl = nonce = req = None
        acked = committed = completed = False
        taken = total = 0
        stats = {"version": version, "bytes": 0, "num_tensors": 0, "num_buckets": 0, "new_group": False}
        try:
            ctl, go, req = self._request(version, deadline)
            nonce, header = go["nonce"], go["header"]

            def aborted(ctl=ctl, key=f"{nonce}/abort"):  # the sender's abort, checked while a collective runs
                return f"the sender aborted the update: {ctl.get(key)}" if ctl.has(key) else None

            k = 0
            while True:
                if k:
                    header = self._header(ctl, nonce, k, version, deadline)
                if k == 0:
                    group = header.get("group")
                    if group is None:
                        raise WeightSyncError(f"rank {rank}: the sender named no group for version {version}")
                    if group != self._group_id or not self._has_group():
                        # a new group (first update, membership change, or after a failure): every member
                        # joins it now, concurrently with the sender
                        self._open_group(ctl, group, deadline, aborted)
                        stats["new_group"] = True
                nbytes = header["nbytes"]
                flat = self._receive_buffer(nbytes, staging=to_host)
                if nbytes:
                    if self.init.backend == "gloo":
                        gloo_broadcast_chunks(self._pg, chunk_bounds(header, header.get("chunk", 0)),
                                               lambda s, e: flat[s:e], deadline)
                    else:
                        nccl_broadcast(self._nccl, flat, deadline, aborted)
                if to_host and flat.device.type != "cpu":
                    flat = flat.to("cpu")
                if header["last"]:  # every byte is here: the sender may go on while the tensors are unpacked
                    ctl.set(f"{nonce}/done/{rank}", "ok")
                    acked = True
                    stats["ack_s"] = time.monotonic() - t0
                tensors = unpack_bucket(header, flat)
                if header["last"]:
                    # the sender confirms the update once every receiver has it: a consumer never takes
                    # the last bucket of an update that failed elsewhere (it keeps its previous weights)
                    got, _ = ctl.get_all([f"{nonce}/commit"], deadline)
                    if not got:
                        raise WeightSyncError(f"rank {rank}: the sender did not confirm version {version} "
                                              f"within the deadline")
                    if isinstance(got[0], dict) and "abort" in got[0]:
                        raise WeightSyncError(f"rank {rank}: sender aborted the update: {got[0]['abort']}")
                    committed = True
                stats["bytes"] += nbytes
                stats["num_tensors"] += len(tensors)
                stats["num_buckets"] += 1
                if header["last"]:
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
            if committed:  # the sender already has this update; the consumer's failure goes with the next request
                self._consumer_error = f"version {version}: consumer failed: {type(e).__name__}: {e}"
                raise
            if ctl is not None and nonce is not None and not acked:
                try:
                    ctl.set(f"{nonce}/done/{rank}", f"{type(e).__name__}: {e}")
                except Exception:
                    pass
            if isinstance(e, WeightSyncError):
                raise
            raise WeightSyncError(f"rank {rank}: receiving version {expected_version} failed: "
                                  f"{type(e).__name__}: {e}") from e
        finally:
            if committed and not completed and taken < total and self._consumer_error is None:
                self._consumer_error = (f"version {version}: consumer stopped after {taken} of the "
                                        f"{total} tensors of the last bucket")
            if not committed:  # failed, or the consumer walked away: this group may hold a half-done collective
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
        """Forget the store client and the gloo group, destroy the communicator."""
        self._release()
        self._dev_buf = None

"""Learner rank 0's end of the weight transfer (`WeightSender`): buckets, announces and broadcasts
one full set of weights per update and waits for every receiver's acknowledgement.

The protocol, the control plane and the collectives it uses are in `archer_async.weight_sync.protocol`
(its module docstring describes one update step by step); the receiving end is
`actors.weight_receiver`; bucket layout and packing are in `archer_async.weight_sync.buckets`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import traceback
import uuid
from typing import Iterable, Iterator, Optional

import torch

from archer_async.weight_sync.buckets import (
    DEFAULT_CHUNK_BYTES, byte_sources, ChunkPacker, bucket_layout, chunk_bounds, chunk_size, pack_bucket,
    split_buckets,
)
from archer_async.weight_sync import (
    Control, Endpoint, SyncInit, WeightSyncError, gloo_broadcast_chunks, nccl_broadcast,
)

log = logging.getLogger(__name__)


def _checked(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of one update; TypeError for a non-tensor, ValueError for a repeated name."""
    seen: set[str] = set()
    for name, t in named_tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"weight {name!r} is a {type(t).__name__}, not a tensor")
        if name in seen:
            raise ValueError(f"weight {name!r} sent twice in one update")
        seen.add(name)
        yield name, t


class WeightSender(Endpoint):
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
    connections per update; for nccl a new communicator per update). `device`: where the bytes are packed
    (nccl: the communicator's device, default the current CUDA device). `nccl_factory`: see
    `archer_async.weight_sync.protocol.NcclFactory`. `chunk_bytes` (gloo): a bucket travels as broadcasts of at most this many
    bytes (`chunk_size`; <= 0: one broadcast per bucket), each packed while the previous one is in flight.
    """

    def __init__(self, init: "SyncInit | dict", backend: Optional[str] = None, timeout_s: Optional[float] = None,
                 reuse_group: bool = True, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 device: "torch.device | str | None" = None, nccl_factory=None):
        super().__init__(init, "cpu", nccl_factory)
        if backend is not None:
            self.init = dataclasses.replace(self.init, backend=backend)
        if device is not None:
            self.device = torch.device(device)
        elif self.init.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        if timeout_s is not None:
            self.init = dataclasses.replace(self.init, timeout_s=float(timeout_s))
        if self.init.backend not in ("gloo", "nccl"):
            raise ValueError(f"weight-transfer backend must be gloo or nccl, got {self.init.backend!r}")
        self.reuse_group = bool(reuse_group)
        self.chunk_bytes = int(chunk_bytes)
        self._stale: list[str] = []  # store keys of the last update, deleted during the next one
        self._want: list[str] = []  # requests consumed by the current update (deleted once its data flows)
        self._headers = 0  # bucket headers published in the current update
        self._reqs: dict[int, str] = {}  # receiver rank -> request id of the current update

    @property
    def num_receivers(self) -> int:
        return self.init.world_size - 1

    def connect(self) -> None:
        """Host the control store and wait until every receiver said hello; WeightSyncError naming the
        missing ranks at the deadline (the store stays up: a later call waits again). The data plane
        (gloo group or NCCL communicator) is built by the first update, every member joining it then."""
        deadline = time.monotonic() + self.init.timeout_s
        if self._ctl is None:
            self._ctl = Control(self.init, is_master=True, timeout_s=self.init.timeout_s)
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
            # the update this sender starts, for the error message of a receiver waiting for another
            # version (a one-way write: the store sends no reply, so it costs no round trip)
            ctl.set("latest", {"version": int(version), "nonce": nonce})
            for bucket, last in split_buckets(_checked(named_tensors), bucket_bytes):
                self._send_bucket(nonce, version, bucket, last, deadline, stats, keys)
                bucket.clear()  # its tensors go before the next bucket is gathered: one bucket alive at a time
            done = [f"{nonce}/done/{r}" for r in ranks]
            acks, missing = ctl.get_all(done, deadline)
            keys += done
            if missing:
                raise WeightSyncError(f"receivers {[r for r, k in zip(ranks, done) if k in missing]} "
                                      f"did not acknowledge version {version}")
            bad = [(r, e) for r, e in zip(ranks, acks) if e != "ok"]
            if bad:
                raise WeightSyncError(f"receivers failed version {version}: {bad}")
            ctl.set(f"{nonce}/commit", "ok")  # every receiver has it: they may hand the last bucket over
            keys.append(f"{nonce}/commit")
        except Exception as e:
            self._drop_group()  # a failed update never leaves its group (and its half-done collective) behind
            # frames of the failed broadcast hold the group and its buffers: free them now. (A receiver still
            # inside one of its broadcasts is not woken by that: gloo fails a peer's pending operation only
            # at that operation's own timeout, the receiver's deadline. Receivers waiting on the store are
            # woken below.)
            traceback.clear_frames(e.__traceback__)
            reason = f"{type(e).__name__}: {e}"
            try:
                ctl.set(f"{nonce}/abort", reason)
                # wake the receivers where they are blocked: on their go key, or on the next bucket header
                if self._headers == 0:
                    if not self._reqs:  # failed before the announcement read the requests
                        self._take_requests(version, keys)
                    if self._reqs:
                        ctl.store.multi_set([ctl.PREFIX + f"go/{q}" for q in self._reqs.values()],
                                            [json.dumps({"abort": reason})] * len(self._reqs))
                else:  # (and where they wait for the confirmation after the last bucket)
                    ctl.store.multi_set([ctl.PREFIX + f"{nonce}/b{self._headers}", ctl.PREFIX + f"{nonce}/commit"],
                                        [json.dumps({"abort": reason})] * 2)
                if not isinstance(e, WeightSyncError):  # a data-plane failure: say which receivers answered
                    reason += self._peer_report(nonce, deadline)
            except Exception:  # noqa: BLE001 - the store itself failing must not mask the real error
                pass
            log.error("weight update to version %s FAILED after %.1f s: %s", version, time.monotonic() - t0, reason)
            # the receivers may still be about to read the abort: its keys go with the next update's cleanup
            ctl.delete(*self._want)  # a retry of this version must wait for fresh requests
            self._want = []
            self._stale += keys + [f"{nonce}/abort", f"{nonce}/b{self._headers}", f"{nonce}/commit"]
            if isinstance(e, WeightSyncError):
                raise
            raise WeightSyncError(f"weight update to version {version} failed: {reason}") from e
        # receivers delete their own request, answer and acknowledgement keys; bucket headers (k >= 1)
        # and the confirmation are the sender's, deleted while the next update's data flows
        self._stale = [k for k in keys if k.startswith(f"{nonce}/b") or k == f"{nonce}/commit"]
        stats["seconds"] = time.monotonic() - t0
        return stats

    def _take_requests(self, version: int, keys: list) -> None:
        """The requests for `version` already in the store, taken as this update's (so that a failure
        before the announcement still answers their receivers, with the abort)."""
        want = {r: f"want/{version}/{r}" for r in range(1, self.init.world_size)}
        present = [r for r, k in want.items() if self._ctl.has(k)]
        if present:
            self._want = [want[r] for r in present]
            self._take(dict(zip(present, self._ctl.get_many(self._want))), keys)

    def _take(self, asks: dict, keys: list) -> None:
        """Answer these requests in this update (receiver rank -> its want/<v>/<r> value): their go
        keys become this update's."""
        self._reqs = {r: a["req"] for r, a in asks.items()}
        keys.extend(f"go/{q}" for q in self._reqs.values())

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

    def _receiver_failure(self, nonce: str) -> Optional[str]:
        """A receiver's error for this update, if one reported it (checked while a collective runs)."""
        for r in range(1, self.init.world_size):
            key = f"{nonce}/done/{r}"
            if self._ctl.has(key):
                v = self._ctl.get(key)
                if v != "ok":
                    return f"receiver {r} failed: {v}"
        return None

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """The kept CPU packing buffer, grown when a bucket needs more: uint8 [nbytes] view."""
        if self._buf is None or self._buf.numel() < nbytes:
            self._buf = None
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._buf[:nbytes]

    def _announce(self, nonce: str, version: int, header: dict, deadline: float, stats: dict, keys: list) -> None:
        """Wait until every receiver asked for `version` (want/<v>/<r>, usually there already), choose the
        gloo group, and answer every request (go/<req>) with the nonce and the first bucket's header.
        The consumed requests (self._want) are deleted once the data flows (`_cleanup`).

        The group of the last update is kept when reuse is on and every receiver still holds it;
        otherwise a fresh one is named after this update's nonce (created on both sides right after
        this announcement)."""
        ctl = self._ctl
        ranks = list(range(1, self.init.world_size))
        want = [f"want/{version}/{r}" for r in ranks]
        self._want = want
        asks, absent = ctl.get_all(want, deadline)
        if absent:
            present = [r for r, k in zip(ranks, want) if k not in absent]
            self._take(dict(zip(present, ctl.get_many([want[r - 1] for r in present]))), keys)
            raise WeightSyncError(f"receivers {[r for r, k in zip(ranks, want) if k in absent]} "
                                  f"not ready for version {version}")
        asks = dict(zip(ranks, asks))
        self._take(asks, keys)
        reports = {r: a["prev"] for r, a in asks.items() if a.get("prev")}
        if reports:
            log.warning("weight receivers reported failures after acknowledging an earlier update: %s", reports)
            stats["receiver_reports"] = reports
        if not (self.reuse_group and self._has_group()
                and all(a.get("group") == self._group_id for a in asks.values())):
            self._drop_group()
            self._group_id = nonce  # created on every side right after this announcement
            stats["new_group"] = True
        group = self._group_id
        go = json.dumps({"nonce": nonce, "header": dict(header, group=group)})
        ctl.store.multi_set([ctl.PREFIX + f"go/{self._reqs[r]}" for r in ranks], [go] * len(ranks))

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
        if nbytes and gloo:
            buf = self._buffer(nbytes) if self.device.type == "cpu" else torch.empty(nbytes, dtype=torch.uint8)
            packer = ChunkPacker(byte_sources(bucket, header["offsets"]), buf)
            bounds = chunk_bounds(header, header["chunk"])
        if k == 0:  # announced before packing: the receivers wake up while the sender packs
            self._announce(nonce, version, header, deadline, stats, keys)
        else:
            self._ctl.set(f"{nonce}/b{k}", header)
            keys.append(f"{nonce}/b{k}")
        self._headers = k + 1
        failed = lambda: self._receiver_failure(nonce)  # noqa: E731
        if not self._has_group():  # receivers create their end after reading the announcement, concurrently
            self._open_group(self._ctl, self._group_id, deadline, failed)
        if packer is not None:
            gloo_broadcast_chunks(self._pg, bounds, packer.chunk, deadline,
                                   after_first=self._cleanup if k == 0 else None)
            del packer
        elif nbytes:
            _, flat = pack_bucket(bucket, self.device)
            nccl_broadcast(self._nccl, flat, deadline, failed)
            del flat
        if k == 0 and (not nbytes or not gloo):
            self._cleanup()
        stats["num_buckets"] += 1
        stats["num_tensors"] += len(bucket)
        stats["bytes"] += nbytes

    def close(self) -> None:
        """Drop the communicator, the gloo group and the packing buffer, and stop hosting the store."""
        if self._ctl is not None and self._stale:
            # (a confirmation stays: a receiver may not have read it yet, and the store goes with the sender)
            self._ctl.delete(*(k for k in self._stale if not k.endswith("/commit")))
        self._stale = []
        self._release()

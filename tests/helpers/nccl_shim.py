"""`GlooBackedNcclShim`: vLLM's `PyNcclCommunicator` interface with the bytes carried over gloo, so that
the project's NCCL branch of the weight transfer (`archer_async.weight_sync.protocol.nccl_group`,
`nccl_broadcast`) runs on a CPU machine.

What it keeps of the real communicator (vllm/distributed/device_communicators/pynccl.py):
- construction from a `StatelessProcessGroup`-like group (rank, world_size, store): rank 0 publishes a
  unique id through the store (`broadcast_obj`) and every rank blocks until all ranks have joined;
  a warm-up one-element all_reduce follows, as in `_init_comm`;
- `available` / `disabled` (`disabled=True` builds one the way vLLM does when `VLLM_DISABLE_PYNCCL` is
  set or the NCCL library is missing: it returns before any rendezvous and its collectives are
  silent no-ops);
- `broadcast(tensor, src, stream=None)` with its device check (the tensor must be on the
  communicator's device) and its silent return when disabled;
- `destroy()` (ncclCommAbort): a broadcast still blocked on this rank returns with an error.

What differs: the bytes go through a gloo group on the same store, and `broadcast` blocks until
the data is complete (a CUDA broadcast returns once queued, and the caller synchronizes the stream).
"""

from __future__ import annotations

import datetime
import time
import uuid

import torch
import torch.distributed as dist

# the largest wait of one gloo operation: only destroy() or the peers end it (as with NCCL)
_OP_TIMEOUT = datetime.timedelta(seconds=600)


class GlooBackedNcclShim:
    """See the module docstring."""

    def __init__(self, group, device: "torch.device | str | int", disabled: bool = False):
        self.rank = group.rank
        self.world_size = group.world_size
        self.group = group
        if isinstance(device, int):
            device = torch.device("cuda", device)
        self.device = torch.device(device)
        self._aborted = False
        if self.world_size == 1 or disabled:
            self.available = False
            self.disabled = True
            return
        self.available = True
        self.disabled = False
        # rank 0 mints the id and broadcasts it through the store, as PyNcclCommunicator does
        self.unique_id = group.broadcast_obj(uuid.uuid4().hex if self.rank == 0 else None, src=0)
        self._pg = dist.ProcessGroupGloo(dist.PrefixStore(f"shim/{self.unique_id}", group.store),
                                         self.rank, self.world_size, _OP_TIMEOUT)
        data = torch.zeros(1)  # warm-up all_reduce: blocks until every rank is here
        self._pg.allreduce([data]).wait()

    def broadcast(self, tensor: torch.Tensor, src: int, stream=None) -> None:
        if self.disabled:
            return
        assert tensor.device == self.device, (
            f"this nccl communicator is created to work on {self.device}, but the input tensor is on {tensor.device}"
        )
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.timeout = _OP_TIMEOUT
        work = self._pg.broadcast([tensor], opts)
        while not work.is_completed():
            if self._aborted:
                raise RuntimeError("NCCL error: communicator aborted (ncclCommAbort)")
            time.sleep(0.01)
        work.wait()

    def destroy(self) -> None:
        if self.available and not self.disabled:
            self._aborted = True
            self.available = False
            self.disabled = True


class _Group:
    """The part of vLLM's `StatelessProcessGroup` the communicator uses: rank, world_size, store and
    `broadcast_obj` through the store."""

    def __init__(self, store, rank: int, world_size: int):
        self.store, self.rank, self.world_size = store, rank, world_size

    def broadcast_obj(self, obj, src: int):
        import pickle

        if self.rank == src:
            self.store.set(f"broadcast_from/{src}/0", pickle.dumps(obj))
            return obj
        return pickle.loads(self.store.get(f"broadcast_from/{src}/0"))


def gloo_backed_nccl_shim(store, rank: int, world_size: int, device) -> GlooBackedNcclShim:
    """An `NcclFactory` (archer_async.weight_sync.protocol) that builds `GlooBackedNcclShim`s."""
    return GlooBackedNcclShim(_Group(store, rank, world_size), device)


def disabled_nccl_shim(store, rank: int, world_size: int, device) -> GlooBackedNcclShim:
    """An `NcclFactory` whose communicators come back disabled, as vLLM's do under VLLM_DISABLE_PYNCCL."""
    return GlooBackedNcclShim(_Group(store, rank, world_size), device, disabled=True)

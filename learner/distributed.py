"""Process-group set-up and small collectives of the learner ranks.

CPU: gloo. GPU: NCCL for tensors plus gloo for Python objects (the default group is created with
backend "cpu:gloo,cuda:nccl", so CPU tensors and pickled objects go over gloo).
"""

from __future__ import annotations

import datetime as _dt
import os
import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from archer_async.weight_sync.protocol import secret_namespace, tcp_store


def pick_device(gpus_per_rank: float) -> torch.device:
    """cuda:<current> when this rank asked for a GPU and one is visible, else cpu."""
    if gpus_per_rank > 0 and torch.cuda.is_available():
        idx = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())) % torch.cuda.device_count()
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return torch.device("cpu")


def init_process_group(
    rank: int, world_size: int, master_addr: str, master_port: int, device: torch.device, timeout_s: float,
    store_token: str = "",
) -> DeviceMesh:
    """Join (or reuse) the learner's default process group and return a 1-D device mesh over it.
    `store_token`: the secret every rendezvous key lives under (`secret_namespace`; the launcher picks one
    per run, so a client of the store's port without it cannot read or set the group's keys)."""
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        timeout = _dt.timedelta(seconds=timeout_s)
        # rank 0's rendezvous store listens on master_addr only (a tcp:// init_method binds every interface)
        store = secret_namespace(tcp_store(master_addr, int(master_port), rank == 0, timeout,
                                           world_size=world_size, wait_for_workers=False), store_token)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    assert dist.get_rank() == rank and dist.get_world_size() == world_size, "process group does not match rank/world"
    return init_device_mesh(device.type, (world_size,), mesh_dim_names=("fsdp",))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (pickled, over the CPU/gloo path)."""
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=torch.device("cpu"))
    return box[0]


def broadcast_bytes(data: Optional[bytes], src: int = 0) -> memoryview:
    """Rank `src`'s `data` on every rank, as raw bytes over the CPU/gloo path (no pickling): its length,
    then the bytes themselves. Returns a read-only view (rank `src`: of `data` itself)."""
    rank = dist.get_rank()
    n = torch.tensor([len(data) if rank == src else 0], dtype=torch.int64)
    dist.broadcast(n, src=src)
    if rank == src:
        with warnings.catch_warnings():  # a broadcast's source is only read
            warnings.simplefilter("ignore", UserWarning)
            buf = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    else:
        buf = torch.empty(int(n.item()), dtype=torch.uint8)
    if buf.numel():
        dist.broadcast(buf, src=src)
    return memoryview(data) if rank == src else memoryview(buf.numpy()).toreadonly()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    out: list[Optional[Any]] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise float64 sum of `values` over ranks (same length on every rank)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()

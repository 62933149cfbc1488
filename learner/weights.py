"""Full-weight gathering from FSDP2 shards, bucket by bucket, with Hugging Face names.

`iter_full_weights` is a collective: every rank must iterate it to the end in the same order (one
all-gather per bucket: every rank packs its dim-0 shards of the bucket's parameters into one flat
buffer, see `gather_bucket`). Only rank 0 keeps the tensors; the other ranks iterate for the side
effect of taking part in the gathers. Peak extra memory is one bucket of full tensors
(`bucket_bytes`) plus its gathered buffer, never the whole model.

Tied embeddings: when `config.tie_word_embeddings` is set, `lm_head.weight` is the same parameter
as `model.embed_tokens.weight` and appears once, under the embedding's name (what Hugging Face
checkpoints contain and what vLLM's loaders expect).
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard


def named_trainable_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(HF name, parameter) in the model's registration order, each shared tensor once (tied lm_head dropped)."""
    out = []
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in seen:
            continue
        seen.add(key)
        out.append((name, p))
    tie = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    if tie:
        out = [(n, p) for n, p in out if n != "lm_head.weight"]
    return out


def plan_buckets(named: list[tuple[str, torch.Tensor]], bucket_bytes: int, dtype: torch.dtype) -> list[list[int]]:
    """Split parameter indices into consecutive buckets of at most `bucket_bytes` full-size bytes (a larger tensor is alone)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    buckets: list[list[int]] = []
    cur: list[int] = []
    cur_bytes = 0
    for i, (_, p) in enumerate(named):
        nbytes = p.numel() * itemsize  # numel of a DTensor is its global size
        if cur and cur_bytes + nbytes > bucket_bytes:
            buckets.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += nbytes
    if cur:
        buckets.append(cur)
    return buckets


def _full(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """All-gather one (possibly sharded) parameter to a full tensor of `dtype` (cast before the gather: half the bytes)."""
    t = p.detach()
    if isinstance(t, DTensor):
        return t.to(dtype).full_tensor()
    return t.to(dtype)


def _dim0_sharded(p: torch.Tensor) -> bool:
    """A DTensor sharded on dim 0 over a 1-D mesh (FSDP2's layout), which `gather_bucket` can batch."""
    return (isinstance(p, DTensor) and p.device_mesh.ndim == 1 and len(p.placements) == 1
            and p.placements[0] == Shard(0) and p.dim() >= 1)


def gather_bucket(params: list[torch.Tensor], dtype: torch.dtype, assemble: bool = True) -> list[torch.Tensor]:
    """Full tensors [global shape] of `dtype` of dim-0 sharded DTensors on one 1-D mesh: ONE all-gather
    (a collective: every rank calls it; `assemble=False`: take part only, return []).

    Shard layout (FSDP2 / DTensor `Shard(0)`, torch.chunk semantics): with c = ceil(n / W) rows per
    chunk, rank r holds rows [r*c, min((r+1)*c, n)) (possibly none). Every rank writes its shards,
    each padded to c rows, into one flat send buffer [sum_j c_j * row_j] (cast to `dtype` on the way:
    fewer bytes on the wire); the all-gather yields W such buffers, from which parameter j's full
    tensor is the concatenation of each rank's valid rows. Equal, bit for bit, to
    `p.to(dtype).full_tensor()` per parameter, which costs one collective (and one DTensor dispatch)
    per parameter instead of one per bucket."""
    mesh = params[0].device_mesh
    world, group = mesh.size(), mesh.get_group()
    layout, per_rank = [], 0  # (offset in a rank's part, chunk rows, elements per row)
    for p in params:
        n = p.shape[0]
        row = math.prod(p.shape[1:])
        rows = -(-n // world)
        layout.append((per_rank, rows, row))
        per_rank += rows * row
    local0 = params[0].to_local()
    send = torch.zeros(per_rank, dtype=dtype, device=local0.device)
    for p, (off, _, _) in zip(params, layout):
        local = p.to_local().detach().reshape(-1)
        send[off:off + local.numel()].copy_(local)
    recv = torch.empty(world * per_rank, dtype=dtype, device=send.device)
    dist.all_gather_into_tensor(recv, send, group=group)  # torch >= 1.13
    if not assemble:
        return []
    out = []
    for p, (off, rows, row) in zip(params, layout):
        n = p.shape[0]
        parts = [recv[r * per_rank + off:r * per_rank + off + max(0, min(rows, n - r * rows)) * row]
                 for r in range(world)]
        out.append(torch.cat(parts).view(p.shape))
    return out


def iter_full_weights(
    model: nn.Module,
    rank: int,
    dtype: torch.dtype,
    bucket_bytes: int,
    device: Optional[torch.device] = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor [global shape] of `dtype`) on rank 0; a collective every rank must exhaust.

    Each bucket is gathered completely before any of its tensors is yielded, so a consumer on rank 0
    can stop early only by draining the iterator (see `drain`), otherwise the other ranks hang in
    the next gather. `device`: where rank 0's yielded tensors live (None: where they were gathered).
    """
    named = named_trainable_tensors(model)
    for bucket in plan_buckets(named, bucket_bytes, dtype):
        ps = [named[i][1] for i in bucket]
        mesh = ps[0].device_mesh if isinstance(ps[0], DTensor) else None
        if mesh is not None and mesh.size() > 1 and all(_dim0_sharded(p) and p.device_mesh == mesh for p in ps):
            fulls = gather_bucket(ps, dtype, assemble=rank == 0)
        else:  # one rank (nothing to gather: no copies) or other layouts: one gather per parameter
            fulls = [_full(p, dtype) for p in ps]
        if rank != 0:
            del fulls
            continue
        gathered = [(named[i][0], f if device is None else f.to(device)) for i, f in zip(bucket, fulls)]
        del fulls
        yield from gathered
        del gathered


def drain(it: Iterator) -> None:
    """Run a collective iterator to its end (keeps every rank's gather order in step after a failed send)."""
    for _ in it:
        pass

"""Full-weight gathering from FSDP2 shards, bucket by bucket, with Hugging Face names.

`iter_full_weights` is a collective: every rank must iterate it to the end in the same order (each
parameter's `DTensor.full_tensor()` is an all-gather). Only rank 0 receives the tensors; the other
ranks iterate for the side effect of taking part in the gathers. Peak extra memory is one bucket of
full tensors (`bucket_bytes`), never the whole model.

Tied embeddings: when `config.tie_word_embeddings` is set, `lm_head.weight` is the same parameter
as `model.embed_tokens.weight` and appears once, under the embedding's name (what Hugging Face
checkpoints contain and what vLLM's loaders expect).
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor


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
        gathered = []
        for i in bucket:
            name, p = named[i]
            full = _full(p, dtype)
            if rank == 0:
                gathered.append((name, full if device is None else full.to(device)))
            else:
                del full
        if rank == 0:
            yield from gathered
        del gathered


def drain(it: Iterator) -> None:
    """Run a collective iterator to its end (keeps every rank's gather order in step after a failed send)."""
    for _ in it:
        pass

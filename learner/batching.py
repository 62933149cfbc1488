"""From trajectory groups to padded micro-batch tensors, sharded over learner ranks.

Every rank receives the whole (filtered) batch, so all ranks compute the same plan: mini-batches
(consecutive groups), a token-balanced assignment of each mini-batch's responses to ranks, and
micro-batches of at most `micro_batch_size` responses. Every rank runs the same number of
micro-batches per mini-batch (FSDP's collectives must match); a rank with fewer responses runs
"dummy" micro-batches whose response mask is all zero (they add exactly zero to the loss and the
gradient).

Tensor layout of one micro-batch of N responses, right padded (no attention mask is needed: with
causal attention a real token never sees a later pad):

    input_ids      [N, L]  prompt_i + response_i + pad
    response_ids   [N, T]  response tokens, T = longest response, 0-padded
    gather_index   [N, T]  column of the kept logits that predicts response token t of row i
    response_mask  [N, T]  1.0 on real response tokens (0 everywhere for a dummy micro-batch)
    behavior_logprobs, advantages, token_versions  [N, T]
    logits_to_keep int     the model keeps the last `logits_to_keep` positions' logits
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch


@dataclasses.dataclass
class TrainRow:
    """One response ready for training (its group's GRPO advantage attached)."""

    sample_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    behavior_logprobs: list[float]
    token_versions: list[int]
    advantage: float

    @property
    def num_tokens(self) -> int:
        """Prompt + response tokens (the forward cost)."""
        return len(self.prompt_ids) + len(self.response_ids)


@dataclasses.dataclass
class MicroBatch:
    """Padded tensors of one micro-batch (see the module docstring for shapes)."""

    input_ids: torch.Tensor
    response_ids: torch.Tensor
    gather_index: torch.Tensor
    response_mask: torch.Tensor
    behavior_logprobs: torch.Tensor
    advantages: torch.Tensor
    token_versions: torch.Tensor
    logits_to_keep: int
    num_real_rows: int

    def to(self, device: torch.device) -> "MicroBatch":
        """Copy every tensor to `device`."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                kw[k] = v.to(device, non_blocking=True)
        return MicroBatch(**kw)


def split_minibatches(groups_rows: list[list[TrainRow]], num_minibatches: int) -> list[list[TrainRow]]:
    """Split groups (each a list of rows) into `num_minibatches` consecutive, near-equal chunks; empty chunks dropped."""
    n = len(groups_rows)
    k = max(1, min(num_minibatches, n))
    out = []
    start = 0
    for i in range(k):
        size = n // k + (1 if i < n % k else 0)
        rows = [r for g in groups_rows[start:start + size] for r in g]
        start += size
        if rows:
            out.append(rows)
    return out


def assign_to_ranks(rows: list[TrainRow], world_size: int) -> list[list[TrainRow]]:
    """Token-balanced, deterministic assignment: longest first, each to the rank with the fewest tokens so far."""
    order = sorted(range(len(rows)), key=lambda i: (-rows[i].num_tokens, i))
    loads = [0] * world_size
    counts = [0] * world_size
    out: list[list[TrainRow]] = [[] for _ in range(world_size)]
    for i in order:
        r = min(range(world_size), key=lambda j: (loads[j], counts[j], j))
        out[r].append(rows[i])
        loads[r] += rows[i].num_tokens
        counts[r] += 1
    return out


def plan_micro_batches(
    rows: list[TrainRow], rank: int, world_size: int, micro_batch_size: int
) -> list[list[TrainRow]]:
    """This rank's micro-batches for one mini-batch; every rank gets the same count (empty lists are dummies)."""
    per_rank = assign_to_ranks(rows, world_size)
    n_micro = max(1, max(-(-len(r) // micro_batch_size) for r in per_rank))
    mine = per_rank[rank]  # already sorted longest first: similar lengths share a micro-batch
    chunks = [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    return chunks + [[] for _ in range(n_micro - len(chunks))]


def collate(rows: list[TrainRow], pad_id: int, dummy_row: Optional[TrainRow] = None) -> MicroBatch:
    """Pad `rows` into a MicroBatch; with no rows, one copy of `dummy_row` with an all-zero response mask."""
    dummy = not rows
    if dummy:
        assert dummy_row is not None, "a dummy micro-batch needs a template row"
        rows = [dummy_row]
    n = len(rows)
    L = max(r.num_tokens for r in rows)
    T = max(1, max(len(r.response_ids) for r in rows))
    first = min(len(r.prompt_ids) for r in rows) - 1  # first column whose logits are needed
    assert first >= 0, "every response needs at least one prompt token before it"
    keep = L - first
    input_ids = torch.full((n, L), pad_id, dtype=torch.long)
    response_ids = torch.zeros((n, T), dtype=torch.long)
    gather_index = torch.zeros((n, T), dtype=torch.long)
    mask = torch.zeros((n, T), dtype=torch.float32)
    behav = torch.zeros((n, T), dtype=torch.float32)
    adv = torch.zeros((n, T), dtype=torch.float32)
    versions = torch.zeros((n, T), dtype=torch.long)
    for i, r in enumerate(rows):
        p, t = len(r.prompt_ids), len(r.response_ids)
        input_ids[i, :p] = torch.tensor(r.prompt_ids, dtype=torch.long)
        if t:
            input_ids[i, p:p + t] = torch.tensor(r.response_ids, dtype=torch.long)
            response_ids[i, :t] = input_ids[i, p:p + t]
            mask[i, :t] = 0.0 if dummy else 1.0
            behav[i, :t] = torch.tensor(r.behavior_logprobs, dtype=torch.float32)
            adv[i, :t] = r.advantage
            versions[i, :t] = torch.tensor(r.token_versions, dtype=torch.long)
        # logits at column c predict token c+1; kept logits start at column `first`
        gather_index[i] = torch.clamp(torch.arange(T) + (p - 1 - first), max=keep - 1)
    return MicroBatch(
        input_ids=input_ids, response_ids=response_ids, gather_index=gather_index, response_mask=mask,
        behavior_logprobs=behav, advantages=adv, token_versions=versions, logits_to_keep=keep,
        num_real_rows=0 if dummy else n,
    )


def select_response_logits(logits: torch.Tensor, gather_index: torch.Tensor) -> torch.Tensor:
    """logits [N, K, V] (the kept columns) -> [N, T, V] aligned with the response tokens."""
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    return logits[rows, gather_index]

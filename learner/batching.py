"""From trajectory groups to micro-batch tensors (padded or packed), sharded over learner ranks.

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

With `learner.max_tokens_per_micro_batch` the micro-batches are formed by tokens instead
(`plan_token_micro_batches`: longest first, first-fit into bins of at most the budget) and the rows
of a micro-batch are packed into ONE sequence with no padding (`collate_packed`):

    input_ids      [1, S]  prompt_1 + response_1 + prompt_2 + response_2 + ...   (S = sum of row lengths)
    position_ids   [1, S]  0..len_1-1, 0..len_2-1, ...   (restart per row)
    cu_seq_lens    [N+1]   row boundaries in the packed sequence (0, len_1, len_1+len_2, ...)
    logits_to_keep [M]     positions whose logits predict a response token (M = total response tokens)
    gather_index   [N, T]  index into those M positions of response token t of row i (clamped on padding)
    response_ids, response_mask, behavior_logprobs, advantages, token_versions  [N, T] as above

Each row attends only to itself (the attention receives the row boundaries, see learner/attention.py),
so a packed micro-batch computes the same numbers as the padded one; only the small [N, T] per-token
tensors of the loss keep a padded layout.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

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
    logits_to_keep: Union[int, torch.Tensor]
    num_real_rows: int
    position_ids: Optional[torch.Tensor] = None
    cu_seq_lens: Optional[torch.Tensor] = None
    max_len: int = 0

    @property
    def packed(self) -> bool:
        """True for a packed micro-batch (one sequence of concatenated rows)."""
        return self.position_ids is not None

    @property
    def computed_positions(self) -> int:
        """Positions the forward pass computes (rows x padded length, or the packed length)."""
        return int(self.input_ids.numel())

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


def first_fit_decreasing(rows: list[TrainRow], max_tokens: int) -> list[list[TrainRow]]:
    """Bins of at most `max_tokens` prompt+response tokens: longest row first, each into the first bin it fits
    (deterministic: ties keep the input order). A row longer than the budget gets a bin of its own."""
    order = sorted(range(len(rows)), key=lambda i: (-rows[i].num_tokens, i))
    bins: list[list[TrainRow]] = []
    loads: list[int] = []
    for i in order:
        n = rows[i].num_tokens
        for b, load in enumerate(loads):
            if load + n <= max_tokens:
                bins[b].append(rows[i])
                loads[b] += n
                break
        else:
            bins.append([rows[i]])
            loads.append(n)
    return bins


def plan_token_micro_batches(
    rows: list[TrainRow], rank: int, world_size: int, max_tokens: int
) -> list[list[TrainRow]]:
    """This rank's token-budget micro-batches for one mini-batch; every rank gets the same count (empty lists
    are dummies, run as a 2-token sequence with a zero mask)."""
    per_rank = assign_to_ranks(rows, world_size)
    bins = [first_fit_decreasing(r, max_tokens) for r in per_rank]
    n_micro = max(1, max(len(b) for b in bins))
    mine = bins[rank]
    return mine + [[] for _ in range(n_micro - len(mine))]


def plan_rank(rows: list[TrainRow], rank: int, world_size: int, micro_batch_size: int,
              max_tokens: Optional[int]) -> list[list[TrainRow]]:
    """The configured plan: token budget when `max_tokens` is set, else `micro_batch_size` rows."""
    if max_tokens:
        return plan_token_micro_batches(rows, rank, world_size, max_tokens)
    return plan_micro_batches(rows, rank, world_size, micro_batch_size)


def computed_positions(chunks: list[list[TrainRow]], packed: bool, dummy_row: TrainRow) -> int:
    """Positions the forward passes of `chunks` compute (padding included) without building tensors."""
    total = 0
    for c in chunks:
        if not c:
            total += 2 if packed else dummy_row.num_tokens
        elif packed:
            total += sum(r.num_tokens for r in c)
        else:
            total += len(c) * max(r.num_tokens for r in c)
    return total


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
    response_ids, gather_index, mask, behav, adv, versions = _response_tensors(n, T)
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


def _response_tensors(n: int, T: int) -> tuple[torch.Tensor, ...]:
    """Zeroed [n, T] per-response-token tensors: response ids, gather index, mask, behaviour log-probs,
    advantages, token versions."""
    long, f32 = torch.long, torch.float32
    return tuple(torch.zeros((n, T), dtype=d) for d in (long, long, f32, f32, f32, long))


def collate_packed(rows: list[TrainRow], dummy_row: Optional[TrainRow] = None) -> MicroBatch:
    """Pack `rows` into one sequence (see the module docstring); with no rows, a 2-token slice of
    `dummy_row` (one prompt and one response token) with an all-zero response mask."""
    dummy = not rows
    if dummy:
        assert dummy_row is not None, "a dummy micro-batch needs a template row"
        r0 = dummy_row
        rows = [TrainRow(r0.sample_id, r0.prompt_ids[-1:], r0.response_ids[:1], r0.behavior_logprobs[:1],
                         r0.token_versions[:1], r0.advantage)]
    n = len(rows)
    T = max(1, max(len(r.response_ids) for r in rows))
    ids: list[int] = []
    pos: list[int] = []
    keep: list[int] = []
    cu = [0]
    response_ids, gather_index, mask, behav, adv, versions = _response_tensors(n, T)
    for i, r in enumerate(rows):
        p, t = len(r.prompt_ids), len(r.response_ids)
        assert p >= 1 and t >= 1, "every packed row needs a prompt token and a response token"
        start = len(ids)
        ids.extend(r.prompt_ids)
        ids.extend(r.response_ids)
        pos.extend(range(p + t))
        cu.append(len(ids))
        k0 = len(keep)
        keep.extend(range(start + p - 1, start + p - 1 + t))  # logits at position c predict token c+1
        response_ids[i, :t] = torch.tensor(r.response_ids, dtype=torch.long)
        mask[i, :t] = 0.0 if dummy else 1.0
        behav[i, :t] = torch.tensor(r.behavior_logprobs, dtype=torch.float32)
        adv[i, :t] = r.advantage
        versions[i, :t] = torch.tensor(r.token_versions, dtype=torch.long)
        gather_index[i] = torch.clamp(torch.arange(T) + k0, max=k0 + t - 1)
    lens = [b - a for a, b in zip(cu, cu[1:])]
    return MicroBatch(
        input_ids=torch.tensor([ids], dtype=torch.long), response_ids=response_ids, gather_index=gather_index,
        response_mask=mask, behavior_logprobs=behav, advantages=adv, token_versions=versions,
        logits_to_keep=torch.tensor(keep, dtype=torch.long), num_real_rows=0 if dummy else n,
        position_ids=torch.tensor([pos], dtype=torch.long), cu_seq_lens=torch.tensor(cu, dtype=torch.int32),
        max_len=max(lens),
    )


def select_response_logits(logits: torch.Tensor, gather_index: torch.Tensor) -> torch.Tensor:
    """logits [N, K, V] (the kept columns) -> [N, T, V] aligned with the response tokens."""
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    return logits[rows, gather_index]

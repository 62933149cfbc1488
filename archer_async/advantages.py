"""GRPO advantages and the group filter of docs/algorithm.md §6.

    A_i = (R_i - mean_group) / (std_group + 1e-6),   std unbiased (torch default, n - 1)

Groups (one prompt, its n responses) whose rewards are all equal carry no signal and are dropped
before training (`groups/solve_none`: all 0, `groups/solve_all`: all 1). A sample whose reward is an
infrastructure error (`Reward.value is None`: the sandbox or the grader broke) is neither 0 nor 1:
its whole group is dropped and counted (`groups/infra_error`), never silently scored 0.

Departures from Archer's released code: a group of one response (unbiased std undefined) gets
advantage 0 rather than its raw reward; such a group is all-equal and is dropped by the filter anyway.
Advantages are computed in float64 and returned in the rewards' dtype.
"""

from __future__ import annotations

from typing import Hashable, Sequence, Union

import torch

from archer_async.types import STATUS_VALUE, TrajectoryGroup, no_signal

__all__ = ["GRPO_EPS", "broadcast_advantages", "filter_groups", "group_advantages", "grpo_advantages"]

GRPO_EPS = 1e-6
"""Added to the group standard deviation."""


def _group_index(group_ids: Union[torch.Tensor, Sequence[Hashable]], n: int) -> torch.Tensor:
    """[N] long index of each element's group, 0..G-1."""
    if isinstance(group_ids, torch.Tensor):
        if group_ids.shape != (n,):
            raise ValueError(f"group_ids has shape {tuple(group_ids.shape)}, expected ({n},)")
        return torch.unique(group_ids, return_inverse=True)[1].cpu()
    if len(group_ids) != n:
        raise ValueError(f"group_ids has {len(group_ids)} entries, expected {n}")
    first_seen: dict[Hashable, int] = {}
    return torch.tensor([first_seen.setdefault(g, len(first_seen)) for g in group_ids], dtype=torch.long)


def grpo_advantages(rewards: torch.Tensor, group_ids: Union[torch.Tensor, Sequence[Hashable]]) -> torch.Tensor:
    """GRPO advantage of each response: rewards [N] float, group_ids [N] (tensor or hashables) -> [N].

    Groups need not be contiguous. Rewards must be finite (drop infra errors with filter_groups
    first). Singleton groups get 0; all-equal groups get 0 (0 / (0 + 1e-6)).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [N], got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    idx_n = _group_index(group_ids, n).to(rewards.device)
    r_n = rewards.detach().to(torch.float64)
    if not bool(torch.isfinite(r_n).all()):
        raise ValueError("rewards must be finite; drop infra-error groups with filter_groups first")
    num_groups = int(idx_n.max()) + 1 if n else 0
    zeros_g = torch.zeros(num_groups, dtype=torch.float64, device=rewards.device)
    count_g = zeros_g.index_add(0, idx_n, torch.ones_like(r_n))
    mean_g = zeros_g.index_add(0, idx_n, r_n) / count_g
    dev_n = r_n - mean_g[idx_n]
    std_g = (zeros_g.index_add(0, idx_n, dev_n * dev_n) / (count_g - 1).clamp_min(1)).sqrt()
    adv_n = torch.where(count_g[idx_n] > 1, dev_n / (std_g[idx_n] + GRPO_EPS), 0.0)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return adv_n.to(out_dtype)


def filter_groups(groups: Sequence[TrajectoryGroup]) -> tuple[list[TrajectoryGroup], dict[str, int]]:
    """§6 filter: (kept groups in input order, counts).

    Each dropped group is counted once under the reason `archer_async.types.no_signal` gives:
    groups/empty, groups/infra_error, groups/solve_none or groups/solve_all. Also groups/total,
    groups/kept and reward/infra_errors (samples with an infra-error reward, over all groups given).
    """
    counts = {k: 0 for k in ("groups/total", "groups/kept", "groups/empty", "groups/infra_error",
                             "groups/solve_none", "groups/solve_all", "reward/infra_errors")}
    kept: list[TrajectoryGroup] = []
    for group in groups:
        counts["groups/total"] += 1
        statuses = [s.reward.status for s in group.samples]
        counts["reward/infra_errors"] += sum(STATUS_VALUE[st] is None for st in statuses)
        reason = no_signal(statuses)
        if reason is None:
            kept.append(group)
        else:
            counts["groups/" + reason] += 1
    counts["groups/kept"] = len(kept)
    return kept, counts


def group_advantages(groups: Sequence[TrajectoryGroup], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N] GRPO advantages of every sample, flattened group by group, samples in order.

    Raises ValueError if a reward is an infra error (filter the groups first).
    """
    rewards, ids = [], []
    for gi, group in enumerate(groups):
        for sample in group.samples:
            value = sample.reward.value
            if value is None:
                raise ValueError(f"group {group.group_id}: sample {sample.sample_id} has an infra-error reward; "
                                 "drop such groups with filter_groups first")
            rewards.append(value)
            ids.append(gi)
    return grpo_advantages(torch.tensor(rewards, dtype=dtype), ids)


def broadcast_advantages(response_advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-response advantages [B] -> per-token [B, T]: A_i on the response's valid tokens, 0 on padding."""
    if response_advantages.dim() != 1 or mask.dim() != 2 or mask.shape[0] != response_advantages.shape[0]:
        raise ValueError(f"expected advantages [B] and mask [B, T], got {tuple(response_advantages.shape)} "
                         f"and {tuple(mask.shape)}")
    m = mask if mask.dtype == torch.bool else mask != 0
    return torch.where(m, response_advantages.unsqueeze(-1), 0.0)

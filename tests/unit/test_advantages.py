"""GRPO advantages, the §6 group filter and the token broadcast."""

import math

import pytest
import torch

from archer_async.advantages import broadcast_advantages, filter_groups, group_advantages, grpo_advantages
from archer_async.types import Reward, Sample, TrajectoryGroup


def test_grpo_advantages_hand_computed():
    # group "a" = [1, 0, 0, 0]: mean 0.25, unbiased var (0.75^2 + 3 * 0.25^2) / 3 = 0.25, std 0.5
    # group "b" = [1, 0] (interleaved): mean 0.5, var (0.25 + 0.25) / 1 = 0.5, std sqrt(0.5)
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    ids = ["a", "b", "a", "b", "a", "a"]
    adv = grpo_advantages(rewards, ids)
    sa, sb = 0.5 + 1e-6, math.sqrt(0.5) + 1e-6
    expect = [0.75 / sa, 0.5 / sb, -0.25 / sa, -0.5 / sb, -0.25 / sa, -0.25 / sa]
    assert adv.dtype == torch.float32
    assert adv.tolist() == pytest.approx(expect, rel=1e-6)
    # tensor group ids give the same result
    assert torch.equal(grpo_advantages(rewards, torch.tensor([7, 3, 7, 3, 7, 7])), adv)


def test_grpo_advantages_degenerate_groups_and_torch_std():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.3, 0.9, 0.2], dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 1, 2, 3, 3, 3])
    adv = grpo_advantages(rewards, ids)
    assert adv[:5].tolist() == [0.0] * 5  # all-equal groups and a singleton group
    g = rewards[5:]
    assert torch.allclose(adv[5:], (g - g.mean()) / (g.std() + 1e-6), rtol=1e-12)
    with pytest.raises(ValueError, match="finite"):
        grpo_advantages(torch.tensor([1.0, float("nan")]), [0, 0])
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(torch.tensor([1.0, 0.0]), [0])


def _group(gid, statuses):
    samples = [
        Sample(sample_id=f"{gid}-{i}", response_ids=[1, 2], behavior_logprobs=[-0.1, -0.2], token_versions=[0, 0],
               finish_reason="stop", reward=Reward(status=s))
        for i, s in enumerate(statuses)
    ]
    return TrajectoryGroup(group_id=gid, prompt_index=0, data_source="test", prompt_ids=[5], samples=samples)


def test_filter_groups_counts_every_drop_reason():
    groups = [
        _group("mixed", ["pass", "fail", "timeout", "fail"]),
        _group("none", ["fail", "timeout", "fail"]),
        _group("all", ["pass", "pass"]),
        _group("infra", ["pass", "fail", "infra_error", "infra_error"]),
        _group("infra-all-fail", ["fail", "infra_error"]),
        _group("empty", []),
        _group("mixed2", ["fail", "pass"]),
    ]
    kept, counts = filter_groups(groups)
    assert [g.group_id for g in kept] == ["mixed", "mixed2"]
    assert counts == {
        "groups/total": 7, "groups/kept": 2, "groups/empty": 1, "groups/infra_error": 2,
        "groups/solve_none": 1, "groups/solve_all": 1, "reward/infra_errors": 3,
    }


def test_group_advantages_flatten_in_order_and_refuse_infra_errors():
    kept = [_group("g1", ["pass", "fail"]), _group("g2", ["fail", "fail", "pass"])]
    adv = group_advantages(kept)
    s1 = math.sqrt(0.5) + 1e-6  # [1, 0]
    s2 = math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2) + 1e-6  # [0, 0, 1]
    assert adv.tolist() == pytest.approx([0.5 / s1, -0.5 / s1, -(1 / 3) / s2, -(1 / 3) / s2, (2 / 3) / s2], rel=1e-6)
    with pytest.raises(ValueError, match="infra-error"):
        group_advantages([_group("bad", ["pass", "infra_error"])])


def test_broadcast_advantages_to_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    out = broadcast_advantages(torch.tensor([0.5, -2.0, 3.0]), mask)
    assert out.tolist() == [[0.5, 0.5, 0.0], [-2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    with pytest.raises(ValueError):
        broadcast_advantages(torch.tensor([1.0, 2.0]), mask)

"""The sequence-level and variance-controlled corrections of docs/algorithm.md §3 (seq_tis, geo_mask,
m2po) against hand-computed values, and m2po's micro-batch invariance."""

import math

import pytest
import torch

from archer_async.config import ConfigError, LossConfig
from archer_async.loss import (
    importance_weights, loss_denominators, m2po_cutoff, merge_metrics, policy_loss, squared_log_ratios,
    validate_loss_config,
)

F64 = torch.float64
NO_KL = dict(kl_coef_low_entropy=0.0, kl_coef_high_entropy=0.0)


def _one_row(**cfg):
    """One response of 4 valid tokens, rho = [0.25, 1, 1.5, 3], r = 1, A = 1 (L_t = -1), plus a padding
    token with rho = 100: the loss is -mean(w) and d loss / d logp_t = -w_t / 4."""
    rhos = [0.25, 1.0, 1.5, 3.0]
    prox = torch.full((1, 5), -1.0, dtype=F64)
    behav = torch.tensor([[-1.0 - math.log(r) for r in rhos] + [-1.0 - math.log(100.0)]], dtype=F64)
    logp = prox.clone().requires_grad_()
    mask = torch.tensor([[True] * 4 + [False]])
    loss, met = policy_loss(logp, prox, behav, None, torch.ones(1, 5, dtype=F64), torch.ones(1, 5, dtype=F64),
                            mask, LossConfig(**NO_KL, **cfg))
    loss.backward()
    return loss.item(), met, logp.grad[0].tolist()


# s = (log rho)^2 of the 4 tokens: 1.92181, 0, 0.16440, 1.20695 (mean 0.82329)
@pytest.mark.parametrize("cfg, w, flagged", [
    # seq_tis: prod rho = 0.25 * 1 * 1.5 * 3 = 1.125 on every token (cap 2); cap 1.1 truncates all 4
    (dict(is_correction="seq_tis"), [1.125] * 4, 0),
    (dict(is_correction="seq_tis", seq_is_cap=1.1), [1.1] * 4, 4),
    # geo_mask: geometric mean 1.125 ** 0.25 = 1.02988 lies in [0.9, 1.1] -> weight 1; above 1.02 -> rejected
    (dict(is_correction="geo_mask"), [1.0] * 4, 0),
    (dict(is_correction="geo_mask", geo_mask_high=1.02), [0.0] * 4, 4),
    # m2po tau 0.04: drop 1.92 (rest mean 0.457), 1.21 (0.0822), 0.164 (0.0) -> only rho = 1 stays
    (dict(is_correction="m2po"), [0.0, 1.0, 0.0, 0.0], 3),
    # tau 0.1: after dropping 1.92 and 1.21 the rest's mean is 0.0822 <= 0.1
    (dict(is_correction="m2po", m2po_tau=0.1), [0.0, 1.0, 1.5, 0.0], 2),
    # tau 1: the mean 0.823 is already within the bound, nothing masked (w = rho)
    (dict(is_correction="m2po", m2po_tau=1.0), [0.25, 1.0, 1.5, 3.0], 0),
])
def test_hand_computed_one_response(cfg, w, flagged):
    loss, met, grad = _one_row(**cfg)
    assert loss == pytest.approx(-sum(w) / 4, abs=1e-12)
    assert grad == pytest.approx([-x / 4 for x in w] + [0.0], abs=1e-12)
    assert met["is/truncated_frac"] == pytest.approx(flagged / 4)
    assert met["is/w_mean"] == pytest.approx(sum(w) / 4)
    assert met["is/rho_mean"] == pytest.approx(5.75 / 4)  # the per-token statistic is unchanged


def _two_rows(**cfg):
    """Row 0: rho = [2, 2] (+1 padding), row 1: rho = [0.5, 1, 1]; r = 1, A = 1 -> the loss is minus the
    mean over responses of each response's mean weight."""
    rho = torch.tensor([[2.0, 2.0, 1.0], [0.5, 1.0, 1.0]], dtype=F64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    prox = torch.full((2, 3), -2.0, dtype=F64)
    behav = prox - rho.log()
    logp = prox.clone().requires_grad_()
    loss, met = policy_loss(logp, prox, behav, None, torch.ones(2, 3, dtype=F64), torch.ones(2, 3, dtype=F64),
                            mask, LossConfig(**NO_KL, **cfg))
    w, _, _, flagged = importance_weights(prox, behav, mask, LossConfig(**NO_KL, **cfg))
    return loss.item(), met, w.tolist(), flagged.tolist()


def test_seq_tis_per_response_with_padding():
    # row 0: 2 * 2 = 4 > cap 2 -> 2 on both tokens (flagged); row 1: 0.5 * 1 * 1 = 0.5 on all three
    loss, met, w, flagged = _two_rows(is_correction="seq_tis")
    assert w[0] == [2.0, 2.0, 0.0] and w[1] == pytest.approx([0.5, 0.5, 0.5], abs=1e-15)
    assert flagged == [[True, True, False], [False, False, False]]
    assert loss == pytest.approx(-(2.0 + 0.5) / 2, abs=1e-12)
    assert met["is/truncated_frac"] == pytest.approx(2 / 5)


def test_geo_mask_per_response_with_padding():
    # geometric means: row 0 = 2 (> 1.1, rejected), row 1 = 0.5 ** (1/3) = 0.7937 (< 0.9, rejected)
    loss, met, w, flagged = _two_rows(is_correction="geo_mask")
    assert w == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]] and loss == 0.0 and met["is/truncated_frac"] == 1.0
    # band [0.75, 1.1]: row 1 kept with weight 1 (padding of row 0 stays 0)
    loss, met, w, flagged = _two_rows(is_correction="geo_mask", geo_mask_low=0.75)
    assert w == [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    assert flagged == [[True, True, False], [False, False, False]]
    assert loss == pytest.approx(-(0.0 + 1.0) / 2, abs=1e-12)


def test_m2po_cutoff_rule_and_ties():
    assert m2po_cutoff(torch.tensor([0.01, 0.02, 0.0]), 0.04) == math.inf  # mean already <= tau
    assert m2po_cutoff(torch.zeros(0), 0.04) == math.inf
    # [4, 4, 1, 0], tau 0.5: removing one 4 leaves mean 5/3, removing both leaves 0.5 -> cutoff 4
    assert m2po_cutoff(torch.tensor([1.0, 4.0, 0.0, 4.0]), 0.5) == 4.0
    # [1, 1, 1, 0], tau 0.6: removing two leaves 0.5 -> cutoff 1; the third 1 ties and is masked too
    assert m2po_cutoff(torch.tensor([1.0, 1.0, 1.0, 0.0]), 0.6) == 1.0
    # every value large: all must go (the cutoff is the smallest value)
    assert m2po_cutoff(torch.tensor([3.0, 2.0]), 0.04) == 2.0


def test_m2po_micro_batches_reproduce_full_batch():
    g = torch.Generator().manual_seed(4)
    b, t = 6, 7
    prox = -torch.rand(b, t, generator=g, dtype=F64) * 3
    logp = prox + 0.2 * torch.randn(b, t, generator=g, dtype=F64)
    behav = prox + 0.4 * torch.randn(b, t, generator=g, dtype=F64)
    ent = torch.rand(b, t, generator=g, dtype=F64)
    adv = torch.randn(b, 1, generator=g, dtype=F64).expand(b, t).contiguous()
    mask = torch.arange(t)[None, :] < torch.tensor([7, 3, 5, 1, 7, 4])[:, None]
    cfg = LossConfig(is_correction="m2po", **NO_KL)
    logp.requires_grad_()
    full, full_met = policy_loss(logp, prox, behav, None, ent, adv, mask, cfg)
    (full_grad,) = torch.autograd.grad(full, logp)
    assert 0 < full_met["is/truncated_frac"] < 1  # the mask acts on this batch
    splits = ([0, 1], [2, 3, 4], [5])
    # the cutoff of the whole mini-batch from the micro-batches' squared log-ratios
    cut = m2po_cutoff(torch.cat([squared_log_ratios(prox[r], behav[r], mask[r]) for r in splits]), cfg.m2po_tau)
    den = loss_denominators(None, mask, cfg)
    with pytest.raises(ValueError, match="m2po_cutoff"):
        policy_loss(logp, prox, behav, None, ent, adv, mask, cfg, denominators=den)
    den = type(den)(den.num_responses, den.num_tokens, m2po_cutoff=cut)
    total, parts, grad = 0.0, [], torch.zeros_like(logp)
    for rows in splits:
        lp = logp.detach()[rows].requires_grad_()
        loss, met = policy_loss(lp, prox[rows], behav[rows], None, ent[rows], adv[rows], mask[rows], cfg,
                                denominators=den)
        loss.backward()
        grad[rows] += lp.grad
        total += loss.item()
        parts.append(met)
    assert total == pytest.approx(full.item(), rel=1e-12)
    assert torch.allclose(grad, full_grad, rtol=1e-12, atol=1e-15)
    assert merge_metrics(parts)["is/truncated_frac"] == pytest.approx(full_met["is/truncated_frac"])
    # a per-micro-batch cutoff would differ: the mask really is a property of the whole batch
    local = [m2po_cutoff(squared_log_ratios(prox[r], behav[r], mask[r]), cfg.m2po_tau) for r in splits]
    assert any(c != cut for c in local)


@pytest.mark.parametrize("key, value", [("seq_is_cap", 0.5), ("geo_mask_low", 1.2), ("geo_mask_high", 0.9),
                                        ("m2po_tau", 0.0)])
def test_bad_settings_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        LossConfig(**{key: value})
    cfg = LossConfig().model_copy(update={key: value})  # bypasses the validator, as a caller could
    with pytest.raises(ConfigError, match=f"loss.{key}"):
        validate_loss_config(cfg)

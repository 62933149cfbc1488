"""The training objective of docs/algorithm.md §1-5: Archer's dual-token loss with off-policy correction.

Objective (per valid token t of response i; every tensor is [B, T], B responses, T positions):

    token classes   tau_i = nanquantile({H_t : mask_t}, q)  (linear, per response)
                    high_t = H_t > tau_i,   low_t = H_t <= tau_i
    policy term     d_t = clamp(logp_t - prox_t, -20, 20),  r_t = exp(d_t)
                    (eps_lo, eps_hi) = low-entropy or high-entropy clip ratios of the token's class
                    L1_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_lo, 1 + eps_hi))
                    L_t  = min(L1_t, -A_t c) where A_t < 0 (dual clip, c = dual_clip_c), else L1_t
    IS weight       rho_t = exp(clamp(prox_t - behav_t, -20, 20))   (no gradient)
                    w_t = 1 | min(rho_t, is_cap) | rho_t * [is_mask_low <= rho_t <= is_mask_high]   (none,
                          token_tis, token_mask)
                    sequence modes, per response i with S_i = sum_t log rho_t over its valid tokens:
                    w_t = min(exp(S_i), seq_is_cap)                                    (seq_tis)
                    w_t = [geo_mask_low <= exp(S_i / n_i) <= geo_mask_high]            (geo_mask)
                    m2po: s_t = (log rho_t)^2; c = the smallest cutoff such that the mini-batch's
                    tokens with s_t < c have mean s <= m2po_tau (c = inf when the mean of all is);
                    w_t = rho_t * [s_t < c]                                             (m2po)
    KL (k3)         e_t = clamp(ref_t - logp_t, -20, 20),  k_t = clamp(exp(e_t) - e_t - 1, -10, 10)
    loss            = agg(w_t L_t over valid tokens)
                      + kl_coef_low_entropy  * agg(k_t over low-entropy tokens)
                      + kl_coef_high_entropy * agg(k_t over high-entropy tokens)
    agg             "seq-mean-token-mean": mean over responses of each response's mean over its own
                    tokens of the class (a response with none of them contributes 0 and still counts);
                    "token-mean": one mean over every token of the class in the batch.

Gradient flows only through `logprobs`; entropies, advantages and the other log-probs are detached.

Departures from the paper (Wang et al., arXiv 2507.15778, and its released verl code):
- The PPO ratio is taken against the proximal policy pi_prox (the learner's weights at the start of
  the training step, recomputed), not against the rollout policy, and each token's term is weighted by
  a stop-gradient importance weight w_t derived from pi_prox / mu (decoupled PPO). With
  prox == behav every mode gives w_t = 1 (the config checks enforce is_cap >= 1 and
  is_mask_low <= 1 <= is_mask_high), so the loss is then exactly Archer's.
- Archer's released run used "token-mean" with one response per micro-batch, i.e. in effect
  "seq-mean-token-mean"; both are available here and neither depends on how a batch is split.
- Rows with no valid token (padding rows) are not counted as responses.
- k3 is evaluated as expm1(e) - e (the same value as exp(e) - e - 1, with less rounding near 0).
- An optional KL on high-entropy tokens (kl_coef_high_entropy, 0 by default as in Archer).
- Settings outside their meaningful range (dual_clip_c <= 1, is_cap < 1, a clip ratio < 0, ...)
  raise ConfigError naming the key (`validate_loss_config`) instead of training silently.

Sequence modes (seq_tis, geo_mask) act per response; a response is never split across micro-batches,
so they need nothing more. m2po's cutoff c is a property of the whole mini-batch: the micro-batched
caller computes it once with `m2po_cutoff(squared_log_ratios(...) of every micro-batch and rank)` and
passes it as `denominators.m2po_cutoff`.

Micro-batch invariance (§5). `policy_loss(..., denominators=None)` treats its inputs as the whole
mini-batch. When the learner splits a mini-batch into micro-batches and accumulates gradients, it
computes `den = loss_denominators(entropy, mask, cfg)` over the whole mini-batch once (entropy may be
None unless loss_agg == "token-mean" and a KL coefficient is non-zero; otherwise only response and
token counts are needed) and passes `denominators=den` on every micro-batch: each call then returns
that micro-batch's contribution, and the contributions (values and gradients) sum to the full-batch
loss. Do not divide by the number of micro-batches. Token classes are per response, so they do not
depend on the split; within one optimizer step the weights do not change, so entropies from a no-grad
pass give the same classes. With data parallelism, sum the denominators over ranks (`+`) and scale
each rank's loss by the world size when the gradient reduction averages. `merge_metrics` combines
the micro-batch metric dicts exactly.

`entropy_from_logits` and `logprobs_from_logits` work chunk by chunk over the sequence so that no
full-vocabulary float32 copy of the whole [B, T, V] logits ever exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from archer_async.config import ConfigError, LossConfig

__all__ = [
    "LossConfig",
    "LossDenominators",
    "entropy_from_logits",
    "high_entropy_mask",
    "importance_weights",
    "logprobs_from_logits",
    "loss_denominators",
    "m2po_cutoff",
    "merge_metrics",
    "policy_loss",
    "squared_log_ratios",
    "validate_loss_config",
]

LOG_RATIO_CLAMP = 20.0
"""|log-ratio| bound before exp (policy ratio, IS ratio, KL log-ratio)."""
KL_CLAMP = 10.0
"""|k3| bound."""
_QUANTILE_MAX_ELEMENTS = 1 << 24
"""torch.nanquantile refuses larger inputs; rows are processed in blocks below this."""
_CHUNK_ELEMENTS = 1 << 24
"""Default budget of float elements per temporary in the chunked logits functions (64 MiB in fp32)."""


@dataclass(frozen=True)
class LossDenominators:
    """Mini-batch totals that make micro-batch losses sum to the mini-batch loss.

    num_low_tokens / num_high_tokens are None when entropies were not available; they are only
    needed for loss_agg == "token-mean" with a non-zero KL coefficient of that class.
    """

    num_responses: int
    """Rows with at least one valid token."""
    num_tokens: int
    """Valid tokens."""
    num_low_tokens: Optional[int] = None
    """Valid low-entropy tokens."""
    num_high_tokens: Optional[int] = None
    """Valid high-entropy tokens."""
    m2po_cutoff: Optional[float] = None
    """m2po only: the mini-batch's cutoff on (log rho)^2 (`m2po_cutoff`); not summed by `+` (None)."""

    def __add__(self, other: "LossDenominators") -> "LossDenominators":
        def add(a: Optional[int], b: Optional[int]) -> Optional[int]:
            return None if a is None or b is None else a + b

        return LossDenominators(
            self.num_responses + other.num_responses,
            self.num_tokens + other.num_tokens,
            add(self.num_low_tokens, other.num_low_tokens),
            add(self.num_high_tokens, other.num_high_tokens),
        )


def validate_loss_config(cfg: LossConfig) -> None:
    """Raise ConfigError naming the key when a loss setting is out of its meaningful range."""
    for key, msg in cfg.problems():  # the ranges live with the config (checked at load too)
        raise ConfigError(f"loss.{key} = {msg}")


def _bool_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """§1: bool [B, T], True on valid tokens whose entropy exceeds their response's q-quantile.

    entropy [B, T] (any float dtype, computed in float32/float64), mask [B, T] bool or 0/1. The
    quantile is torch.nanquantile (linear) over the row with padding set to NaN; valid tokens that
    are not high-entropy are low-entropy (`mask & ~high`). All-masked rows have no high tokens.
    """
    m = _bool_mask(mask)
    h = entropy.detach().to(_float_dtype(entropy.dtype)).masked_fill(~m, float("nan"))
    rows = max(1, _QUANTILE_MAX_ELEMENTS // max(1, h.shape[-1]))
    tau_b = torch.cat([torch.nanquantile(blk, quantile, dim=-1) for blk in h.split(rows, dim=0)])
    return m & (h > tau_b.unsqueeze(-1))  # NaN compares False: padding and empty rows stay False


def loss_denominators(
    entropy: Optional[torch.Tensor], mask: torch.Tensor, cfg: LossConfig
) -> LossDenominators:
    """Totals of a whole mini-batch ([B, T] entropy and mask) for micro-batched `policy_loss`.

    entropy may be None: the class counts are then None (enough unless loss_agg is "token-mean"
    with a non-zero KL coefficient). One host sync.
    """
    m = _bool_mask(mask)
    stats = [m.any(-1).sum(), m.sum()]
    if entropy is not None:
        high = high_entropy_mask(entropy, m, cfg.entropy_quantile)
        stats += [(m & ~high).sum(), high.sum()]
    vals = [int(v) for v in torch.stack(stats).tolist()]
    return LossDenominators(*vals) if len(vals) == 4 else LossDenominators(vals[0], vals[1])


def _log_rho(proximal_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """clamp(prox - behav, -20, 20) [B, T] in the compute dtype of `proximal_logprobs`, 0 on padding."""
    cdt = _float_dtype(proximal_logprobs.dtype)
    prox = torch.where(m, proximal_logprobs.detach().to(cdt), 0.0)
    behav = torch.where(m, behavior_logprobs.detach().to(cdt), 0.0)
    return (prox - behav).clamp_(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def squared_log_ratios(
    proximal_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """(log rho_t)^2 of the valid tokens, flattened to [N] (N = valid tokens), exactly as policy_loss
    computes them from [B, T] proximal / behaviour log-probs: the input of `m2po_cutoff`."""
    m = _bool_mask(mask)
    with torch.no_grad():
        return _log_rho(proximal_logprobs, behavior_logprobs, m).square()[m]


def m2po_cutoff(sq_log_rho_n: torch.Tensor, tau: float) -> float:
    """M2PO's second-moment mask as a cutoff c on s = (log rho)^2, from the [N] values of a mini-batch.

    Tokens with the largest s are masked one by one until the mean s of the rest is <= tau: with
    s sorted descending, k is the smallest count whose removal achieves it, and c = the k-th largest
    s; a token is kept iff s < c (ties with the k-th largest are masked too, which only lowers the
    mean further). Returns inf (nothing masked) when the mean of all N is already <= tau or N = 0.
    """
    s = sq_log_rho_n.detach().flatten().to(torch.float64)
    n = s.numel()
    if n == 0 or float(s.mean()) <= tau:
        return math.inf
    desc = torch.sort(s, descending=True).values
    rest_sum = desc.flip(0).cumsum(0).flip(0)  # rest_sum[k] = sum of desc[k:] (the rest after removing k)
    rest_mean = rest_sum / torch.arange(n, 0, -1, dtype=torch.float64)
    ok = (rest_mean <= tau).nonzero()
    k = int(ok[0]) if ok.numel() else n  # removing all N leaves nothing, which satisfies any bound
    return float(desc[k - 1])


def importance_weights(
    proximal_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor, mask: torch.Tensor, cfg: LossConfig,
    m2po_cut: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """§3: (w, rho, log_rho, flagged), each [B, T], no gradient; w, rho, log_rho 0 and flagged False
    on padding.

    log_rho = clamp(prox - behav, -20, 20), rho = exp(log_rho); w per cfg.is_correction; flagged
    marks tokens that were truncated or masked (token_tis: rho > is_cap; token_mask: outside the band;
    seq_tis: every token of a response whose ratio exceeds seq_is_cap; geo_mask: every token of a
    rejected response; m2po: the masked tokens). m2po_cut: m2po's cutoff (None: of this batch).
    """
    m = _bool_mask(mask)
    with torch.no_grad():
        return _importance_weights(_log_rho(proximal_logprobs, behavior_logprobs, m), m, cfg, m2po_cut)


def _importance_weights(
    log_rho: torch.Tensor, m: torch.Tensor, cfg: LossConfig, m2po_cut: Optional[float] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """importance_weights given the clamped log_rho [B, T] that is already 0 on padding."""
    rho = torch.where(m, log_rho.exp(), 0.0)
    mode = cfg.is_correction
    if mode == "none":
        w, flagged = m.to(rho.dtype), torch.zeros_like(m)
    elif mode == "token_tis":
        w, flagged = rho.clamp(max=cfg.is_cap), rho > cfg.is_cap  # padding: rho = 0 -> w = 0, not flagged
    elif mode == "token_mask":
        in_band = (rho >= cfg.is_mask_low) & (rho <= cfg.is_mask_high)
        w, flagged = torch.where(in_band, rho, 0.0), m & ~in_band
    elif mode in ("seq_tis", "geo_mask"):
        sum_b = log_rho.sum(-1)  # [B] S_i (padding contributes 0)
        if mode == "seq_tis":
            seq_ratio_b = sum_b.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()  # [B]
            w_b = seq_ratio_b.clamp(max=cfg.seq_is_cap)
            bad_b = seq_ratio_b > cfg.seq_is_cap
        else:
            geo_b = (sum_b / m.sum(-1).clamp_min(1)).exp()  # [B] geometric-mean ratio
            bad_b = (geo_b < cfg.geo_mask_low) | (geo_b > cfg.geo_mask_high)
            w_b = (~bad_b).to(rho.dtype)
        w = torch.where(m, w_b.unsqueeze(-1), 0.0)
        flagged = m & bad_b.unsqueeze(-1)
    elif mode == "m2po":
        s = log_rho.square()
        cut = m2po_cutoff(s[m], cfg.m2po_tau) if m2po_cut is None else m2po_cut
        masked = m & (s >= cut)
        w, flagged = torch.where(masked, 0.0, rho), masked
    else:
        raise ConfigError(f"loss.is_correction = {mode!r}: unknown mode")
    return w, rho, log_rho, flagged


def _aggregate(
    values_bt: torch.Tensor,
    sel_bt: Optional[torch.Tensor],
    row_count_b: torch.Tensor,
    agg: str,
    num_responses: "int | torch.Tensor",
    num_selected: "int | torch.Tensor | None",
) -> torch.Tensor:
    """§5 aggregation of values_bt over the selected tokens (sel_bt None: values are already 0 off
    the selection), divided by the given totals; row_count_b [B] = selected tokens per row."""
    if sel_bt is not None:
        values_bt = torch.where(sel_bt, values_bt, 0.0)
    row_sum_b = values_bt.sum(-1)
    if agg == "token-mean":
        assert num_selected is not None
        return row_sum_b.sum() / _at_least_one(num_selected)
    return (row_sum_b / row_count_b.clamp_min(1)).sum() / _at_least_one(num_responses)


def _at_least_one(x: "int | torch.Tensor") -> "int | torch.Tensor":
    return x.clamp_min(1) if isinstance(x, torch.Tensor) else max(int(x), 1)


def _check_inputs(tensors: dict[str, Optional[torch.Tensor]]) -> None:
    shape = tensors["logprobs"].shape
    if len(shape) != 2:
        raise ValueError(f"policy_loss: logprobs must be [B, T], got shape {tuple(shape)}")
    for name, t in tensors.items():
        if t is not None and t.shape != shape:
            raise ValueError(f"policy_loss: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def policy_loss(
    logprobs: torch.Tensor,
    proximal_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor],
    entropy: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    *,
    denominators: Optional[LossDenominators] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The docs/algorithm.md loss of a batch of responses: (scalar loss, metrics).

    Every tensor is [B, T]: logprobs (log pi_theta, carries the gradient), proximal_logprobs,
    behavior_logprobs, ref_logprobs (None allowed when both KL coefficients are 0), entropy (H_t of
    pi_theta at the sampling temperature), advantages (response advantage broadcast to tokens), mask
    (bool or 0/1; 1 = response token). Float64 inputs compute in float64, others in float32.
    Values at padding positions are ignored (NaN or inf there is harmless; their gradient is 0).

    denominators=None: the batch is the whole mini-batch. Otherwise the batch is one micro-batch
    of a mini-batch whose totals `loss_denominators` gave; the return is this micro-batch's additive
    contribution (see the module docstring). Metrics: loss, loss/pg, loss/kl_low, loss/kl_high are
    contributions (summed by merge_metrics); the others describe this call's tokens. loss/kl_low
    and loss/kl_high are 0.0 when ref_logprobs is None. One host sync (the metrics).
    """
    validate_loss_config(cfg)
    _check_inputs(
        dict(logprobs=logprobs, proximal_logprobs=proximal_logprobs, behavior_logprobs=behavior_logprobs,
             ref_logprobs=ref_logprobs, entropy=entropy, advantages=advantages, mask=mask)
    )
    if ref_logprobs is None and (cfg.kl_coef_low_entropy != 0 or cfg.kl_coef_high_entropy != 0):
        raise ValueError(
            "policy_loss: ref_logprobs is None but loss.kl_coef_low_entropy="
            f"{cfg.kl_coef_low_entropy} / kl_coef_high_entropy={cfg.kl_coef_high_entropy}; "
            "pass reference log-probs or set both coefficients to 0"
        )
    agg = cfg.loss_agg
    if agg == "token-mean" and denominators is not None:
        for name, coef in (("num_low_tokens", cfg.kl_coef_low_entropy), ("num_high_tokens", cfg.kl_coef_high_entropy)):
            if coef != 0 and getattr(denominators, name) is None:
                raise ValueError(f"policy_loss: token-mean KL needs denominators.{name}; "
                                 "pass entropy to loss_denominators")
    m2po_cut = None
    if cfg.is_correction == "m2po" and denominators is not None:
        if denominators.m2po_cutoff is None:
            raise ValueError("policy_loss: loss.is_correction = m2po on a micro-batch needs denominators.m2po_cutoff "
                             "(m2po_cutoff over the whole mini-batch)")
        m2po_cut = denominators.m2po_cutoff
    cdt = _float_dtype(logprobs.dtype)
    m = _bool_mask(mask)

    def prep(x: torch.Tensor) -> torch.Tensor:  # detached, compute dtype, 0 on padding (no NaN/inf)
        return torch.where(m, x.detach().to(cdt), 0.0)

    logp = torch.where(m, logprobs.to(cdt), 0.0)
    prox, adv = prep(proximal_logprobs), prep(advantages)
    high = high_entropy_mask(entropy, m, cfg.entropy_quantile)
    low = m & ~high
    n_row_b, n_high_row_b = m.sum(-1), high.sum(-1)
    n_low_row_b = n_row_b - n_high_row_b
    if denominators is None:  # this batch is the whole mini-batch: totals stay on the device
        den_resp, den_tok = (n_row_b > 0).sum(), n_row_b.sum()
        den_high = n_high_row_b.sum()
        den_low = den_tok - den_high
    else:
        den_resp, den_tok = denominators.num_responses, denominators.num_tokens
        den_low, den_high = denominators.num_low_tokens, denominators.num_high_tokens

    # §2 clipped policy term around pi_prox, per-class clip ranges.
    ratio = (logp - prox).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()

    def per_class(high_value: float, low_value: float) -> torch.Tensor:  # [B, T] in cdt, exact scalars
        def scalar(x: float) -> torch.Tensor:
            return torch.tensor(x, dtype=cdt, device=logp.device)

        return torch.where(high, scalar(high_value), scalar(low_value))

    lo_bt = per_class(1.0 - cfg.high_entropy_clip_ratio_low, 1.0 - cfg.low_entropy_clip_ratio_low)
    hi_bt = per_class(1.0 + cfg.high_entropy_clip_ratio_high, 1.0 + cfg.low_entropy_clip_ratio_high)
    neg_adv = -adv
    loss_unclipped = neg_adv * ratio
    loss_clipped = neg_adv * torch.clamp(ratio, lo_bt, hi_bt)
    is_clipped = loss_clipped > loss_unclipped  # False on padding (both 0)
    pg_bt = torch.where(is_clipped, loss_clipped, loss_unclipped)
    if cfg.dual_clip_c is not None:
        dual_bound = neg_adv * cfg.dual_clip_c
        is_dual = (adv < 0) & (dual_bound < pg_bt)  # False on padding (adv = 0)
        pg_bt = torch.where(is_dual, dual_bound, pg_bt)
    else:
        is_dual = torch.zeros_like(m)

    # §3 importance weight (stop-gradient); 0 on padding, so pg_bt needs no further masking.
    log_rho = (prox - prep(behavior_logprobs)).clamp_(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    w, rho, log_rho, flagged = _importance_weights(log_rho, m, cfg, m2po_cut)
    pg = _aggregate(w * pg_bt, None, n_row_b, agg, den_resp, den_tok)

    # §4 k3 KL to the reference per token class.
    kl_low = kl_high = torch.zeros((), dtype=cdt, device=logp.device)
    if ref_logprobs is not None:
        e = (prep(ref_logprobs) - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        k_bt = (torch.expm1(e) - e).clamp(-KL_CLAMP, KL_CLAMP)  # 0 on padding
        if agg != "token-mean" or den_low is not None:
            kl_low = _aggregate(k_bt, low, n_low_row_b, agg, den_resp, den_low)
        if agg != "token-mean" or den_high is not None:
            kl_high = _aggregate(k_bt, high, n_high_row_b, agg, den_resp, den_high)
    loss = pg
    if cfg.kl_coef_low_entropy != 0:
        loss = loss + cfg.kl_coef_low_entropy * kl_low
    if cfg.kl_coef_high_entropy != 0:
        loss = loss + cfg.kl_coef_high_entropy * kl_high

    with torch.no_grad():  # every statistic as a sum over this call's tokens, one transfer
        clipped_high = (is_clipped & high).sum()
        sums = torch.stack([
            loss.detach(), pg.detach(), kl_low.detach(), kl_high.detach(),
            n_row_b.sum(), n_high_row_b.sum(), (n_row_b > 0).sum(),
            is_clipped.sum() - clipped_high, clipped_high, is_dual.sum(),
            rho.sum(), rho.max() if rho.numel() else rho.new_zeros(()), flagged.sum(),
            w.sum(), (w * w).sum(), (torch.expm1(log_rho) - log_rho).sum(), prep(entropy).sum(),
        ]).to(torch.float64).tolist()
    (tot, pg_v, kl_low_v, kl_high_v, n, n_high, n_resp, clip_low, clip_high, dual, rho_sum, rho_max,
     flagged_n, w_sum, w_sq_sum, mismatch_sum, ent_sum) = sums
    n_low = n - n_high

    def frac(num: float, den: float) -> float:
        return num / den if den > 0 else 0.0

    metrics = {
        "loss": tot,
        "loss/pg": pg_v,
        "loss/kl_low": kl_low_v,
        "loss/kl_high": kl_high_v,
        "loss/clipfrac_low": frac(clip_low, n_low),
        "loss/clipfrac_high": frac(clip_high, n_high),
        "loss/dual_clipfrac": frac(dual, n),
        "is/rho_mean": frac(rho_sum, n),
        "is/rho_max": rho_max,
        "is/truncated_frac": frac(flagged_n, n),
        "is/ess": frac(w_sum * w_sum, n * w_sq_sum),
        "is/mismatch_kl": frac(mismatch_sum, n),
        "is/w_mean": frac(w_sum, n),
        "is/w_sq_mean": frac(w_sq_sum, n),
        "entropy/mean": frac(ent_sum, n),
        "tokens/high_entropy_frac": frac(n_high, n),
        "tokens/valid": n,
        "tokens/low": n_low,
        "tokens/high": n_high,
        "responses/count": n_resp,
    }
    return loss, metrics


_SUM_KEYS = ("loss", "loss/pg", "loss/kl_low", "loss/kl_high", "tokens/valid", "tokens/low", "tokens/high",
             "responses/count")
_WEIGHTED = {
    "loss/clipfrac_low": "tokens/low",
    "loss/clipfrac_high": "tokens/high",
    "loss/dual_clipfrac": "tokens/valid",
    "is/rho_mean": "tokens/valid",
    "is/truncated_frac": "tokens/valid",
    "is/mismatch_kl": "tokens/valid",
    "is/w_mean": "tokens/valid",
    "is/w_sq_mean": "tokens/valid",
    "entropy/mean": "tokens/valid",
}


def merge_metrics(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Combine the metric dicts of micro-batches (called with shared denominators) into the
    mini-batch's: contributions and counts are summed, means re-weighted by their token counts,
    is/rho_max is the max, is/ess and the high-entropy fraction are recomputed."""
    if not parts:
        raise ValueError("merge_metrics: no metric dicts given")
    out = {k: math.fsum(p[k] for p in parts) for k in _SUM_KEYS}
    for key, weight in _WEIGHTED.items():
        out[key] = math.fsum(p[key] * p[weight] for p in parts) / max(out[weight], 1.0)
    out["is/rho_max"] = max(p["is/rho_max"] for p in parts)
    w_sq = out["is/w_sq_mean"]
    out["is/ess"] = out["is/w_mean"] ** 2 / w_sq if w_sq > 0 else 0.0
    out["tokens/high_entropy_frac"] = out["tokens/high"] / max(out["tokens/valid"], 1.0)
    return {k: out[k] for k in parts[0]}


def _check_logits(logits: torch.Tensor, temperature: float) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _chunk_len(logits: torch.Tensor, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    b, _, v = logits.shape
    return max(1, _CHUNK_ELEMENTS // max(1, b * v))


def _scaled_chunk(logits: torch.Tensor, s: int, e: int, cdt: torch.dtype, temperature: float) -> torch.Tensor:
    """[B, e-s, V] logits / temperature in cdt, always a fresh tensor (safe to modify in place)."""
    z = logits[:, s:e].to(cdt, copy=True)
    return z.div_(temperature) if temperature != 1.0 else z


def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, chunk_size: Optional[int] = None
) -> torch.Tensor:
    """H_t = logsumexp(z) - sum_v softmax(z)_v z_v with z = logits / temperature; [B, T, V] -> [B, T].

    Detached (no gradient). float64 logits give float64, others float32. Works on chunks of
    `chunk_size` positions (default: about 2**24 elements per chunk), so the extra memory is two
    float32 chunk buffers, never a float32 copy of the whole [B, T, V].
    """
    _check_logits(logits, temperature)
    b, t, _ = logits.shape
    cdt = _float_dtype(logits.dtype)
    out_bt = torch.empty(b, t, dtype=cdt, device=logits.device)
    step = _chunk_len(logits, chunk_size)
    with torch.no_grad():
        for s in range(0, t, step):
            e = min(s + step, t)
            z = _scaled_chunk(logits, s, e, cdt, temperature)
            lse = torch.logsumexp(z, dim=-1)
            p = (z - lse.unsqueeze(-1)).exp_()
            out_bt[:, s:e] = lse - torch.einsum("btv,btv->bt", p, z)
            del z, p
    return out_bt


class _ChunkedLogprobs(torch.autograd.Function):
    """log softmax(logits / temperature)[token]; forward and backward chunked over positions."""

    @staticmethod
    def forward(ctx, logits, token_ids, temperature, step):  # type: ignore[override]
        b, t, _ = logits.shape
        cdt = _float_dtype(logits.dtype)
        out_bt = torch.empty(b, t, dtype=cdt, device=logits.device)
        lse_bt = torch.empty(b, t, dtype=cdt, device=logits.device)
        for s in range(0, t, step):
            e = min(s + step, t)
            z = _scaled_chunk(logits, s, e, cdt, temperature)
            lse = torch.logsumexp(z, dim=-1)
            out_bt[:, s:e] = z.gather(-1, token_ids[:, s:e].unsqueeze(-1)).squeeze(-1) - lse
            lse_bt[:, s:e] = lse
            del z
        ctx.save_for_backward(logits, token_ids, lse_bt)
        ctx.temperature, ctx.step = temperature, step
        return out_bt

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_bt):  # type: ignore[override]
        logits, token_ids, lse_bt = ctx.saved_tensors
        temperature, step = ctx.temperature, ctx.step
        cdt = lse_bt.dtype
        grad_btv = torch.empty_like(logits)
        for s in range(0, logits.shape[1], step):
            e = min(s + step, logits.shape[1])
            g = grad_bt[:, s:e].to(cdt).unsqueeze(-1)
            p = _scaled_chunk(logits, s, e, cdt, temperature).sub_(lse_bt[:, s:e].unsqueeze(-1)).exp_()
            p.mul_(-g).scatter_add_(-1, token_ids[:, s:e].unsqueeze(-1), g)  # g * (onehot - softmax)
            if temperature != 1.0:
                p.div_(temperature)
            grad_btv[:, s:e] = p
            del p
        return grad_btv, None, None, None


def logprobs_from_logits(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0, chunk_size: Optional[int] = None
) -> torch.Tensor:
    """log softmax(logits / temperature)[token_ids]: logits [B, T, V], token_ids [B, T] -> [B, T].

    Differentiable w.r.t. logits (first order). Forward and backward both run chunk by chunk (the
    backward writes the [B, T, V] gradient in logits' dtype, the only full-size tensor it creates),
    so no full float32 copy of the logits is kept for backward. Every token id, padding included,
    must lie in [0, V). float64 logits give float64, others float32.
    """
    _check_logits(logits, temperature)
    if token_ids.shape != logits.shape[:2]:
        raise ValueError(f"token_ids shape {tuple(token_ids.shape)} does not match logits {tuple(logits.shape)}")
    token_ids = token_ids.long()
    if token_ids.numel() and bool(((token_ids < 0) | (token_ids >= logits.shape[-1])).any()):
        raise ValueError(f"token_ids must lie in [0, {logits.shape[-1]}) (padding included)")
    return _ChunkedLogprobs.apply(logits, token_ids, float(temperature), _chunk_len(logits, chunk_size))

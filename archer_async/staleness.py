"""`buffer.max_staleness: auto`: the staleness bound eta follows the learner's importance statistics.

After every training step the driver feeds the step's `is/ess` (effective sample size of the
importance weights, 1 = on-policy) and `is/mismatch_kl` (estimated KL(mu || pi_prox)) to
`next_staleness`, and sends a changed bound to the buffer:

    degraded (ess < auto_ess_low  or  kl > auto_kl_high):        eta <- max(lo, eta // 2)
    healthy  (ess >= auto_ess_high and kl <= auto_kl_high / 2):  eta <- min(hi, eta + 1)
    otherwise (or a statistic is not finite):                    eta unchanged

with [lo, hi] = [auto_min_staleness, auto_max_staleness] and eta starting at hi. Multiplicative
decrease, additive increase (as in TCP congestion control): a degradation cuts the lag at once, the
bound grows back one version per healthy step. The band between the two thresholds keeps the bound
from oscillating on noise.
"""

from __future__ import annotations

import math

from archer_async.config import BufferConfig


def is_auto(bcfg: BufferConfig) -> bool:
    """True when the buffer's staleness bound is adaptive."""
    return bcfg.max_staleness == "auto"


def initial_staleness(bcfg: BufferConfig) -> int:
    """eta at the start of a run: the configured integer, or auto_max_staleness under auto."""
    return int(bcfg.auto_max_staleness) if is_auto(bcfg) else int(bcfg.max_staleness)


def next_staleness(current: int, ess: float, mismatch_kl: float, bcfg: BufferConfig) -> int:
    """The bound after a step whose importance statistics were (ess, mismatch_kl); see the module doc."""
    lo, hi = int(bcfg.auto_min_staleness), int(bcfg.auto_max_staleness)
    if not (math.isfinite(ess) and math.isfinite(mismatch_kl)):
        new = current
    elif ess < bcfg.auto_ess_low or mismatch_kl > bcfg.auto_kl_high:
        new = current // 2
    elif ess >= bcfg.auto_ess_high and mismatch_kl <= bcfg.auto_kl_high / 2:
        new = current + 1
    else:
        new = current
    return max(lo, min(hi, new))

"""Evaluation metrics of docs/algorithm.md section 9: avg@K and pass@K.

avg@K  = mean over problems of the fraction of K samples that pass.
pass@K = fraction of problems with at least one passing sample among K; with n > K samples per
         problem the unbiased estimator 1 - C(n - c, K) / C(n, K) (Chen et al., 2021) is used.

Infra errors (reward None) are neither passes nor fails: they are reported separately, and a problem
whose samples all hit infra errors is left out of both averages (counted in `problems_infra_error`).
"""

from __future__ import annotations

from math import comb
from typing import Optional, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c passes (1 - C(n-c, k) / C(n, k)); k <= n."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n} c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def summarize(rewards_per_problem: Sequence[Sequence[Optional[float]]], k: int) -> dict:
    """avg@k and pass@k over problems, each a list of n >= k rewards in {1.0, 0.0, None}.

    Returns {"avg_at_k", "pass_at_k", "k", "problems", "samples", "infra_errors", "problems_infra_error"}.
    """
    avg, pas, infra, skipped, samples = [], [], 0, 0, 0
    for rewards in rewards_per_problem:
        valid = [r for r in rewards if r is not None]
        infra += len(rewards) - len(valid)
        samples += len(rewards)
        if not valid:
            skipped += 1
            continue
        n, c = len(valid), sum(1 for r in valid if r >= 1.0)
        avg.append(c / n)
        pas.append(pass_at_k(n, c, min(k, n)))
    return {
        "avg_at_k": sum(avg) / len(avg) if avg else 0.0,
        "pass_at_k": sum(pas) / len(pas) if pas else 0.0,
        "k": k,
        "problems": len(avg),
        "samples": samples,
        "infra_errors": infra,
        "problems_infra_error": skipped,
    }

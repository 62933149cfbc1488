"""Verifiable rewards: sandboxed code tests and math verification (docs/algorithm.md section 8).

Public API:
    RewardPool(cfg: RewardsConfig)                     probes the sandbox; SandboxUnavailable if it cannot work
    pool.score(items, *, training) -> list[Reward]     items: (data_source, ground_truth, response)
    pool.close()
    score_one(data_source, ground_truth, response, cfg=None) -> Reward
    grader_kind(data_source) -> "code" | "math"        UnknownDataSource otherwise
    check_row(row)                                     ValueError naming the field of an ungradable row
"""

from archer_async.types import Reward

from .pool import RewardPool, UnknownDataSource, check_row, grader_kind, score_one
from .sandbox import SandboxUnavailable

__all__ = ["Reward", "RewardPool", "SandboxUnavailable", "UnknownDataSource", "check_row", "grader_kind", "score_one"]

"""The reward pool: dispatch on data_source, grade in parallel, per-sample deadlines, no leftovers.

    pool = RewardPool(cfg.rewards)              # probes the sandbox; SandboxUnavailable if it cannot work
    rewards = pool.score([(data_source, ground_truth, response), ...], training=True)
    pool.close()

`workers` supervised threads take jobs from a bounded queue. A code job runs its programs in fresh
sandboxes (each killed at its deadline); a math job goes to the thread's own math-worker process
(killed and restarted past math_timeout_s). A grader exception becomes an infra_error Reward (kept out of
training, never scored 0); a dead thread is replaced at the next batch. After each batch the pool checks
that no process of the batch's sandbox uids is alive (and kills and logs any, which would be a bug).
"""

from __future__ import annotations

import logging
import os
import queue
import random
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from archer_async.config import RewardsConfig, UserError
from archer_async.types import Reward

from .code_grader import CodeGrader, parse_ground_truth
from .math_worker import MathWorker
from .sandbox import Limits, make_sandbox, processes_of_uids

log = logging.getLogger(__name__)

_CODE_EXACT = {"code", "humanevalplus", "tiny_code", "taco", "apps", "code_contests", "codecontests", "codeforces",
               "primeintellect", "leetcode", "kodcode"}
_CODE_PREFIX = ("livecodebench",)
_MATH_EXACT = {"math", "math500", "minerva", "tiny_math"}
_MATH_PREFIX = ("aime", "amc", "olympiad")


class UnknownDataSource(UserError, ValueError):
    """A data_source no grader handles."""


def grader_kind(data_source: str) -> str:
    """"code" or "math" for a verl data_source; UnknownDataSource otherwise."""
    ds = str(data_source).strip().lower()
    if ds in _CODE_EXACT or ds.startswith(_CODE_PREFIX):
        return "code"
    if ds in _MATH_EXACT or ds.startswith(_MATH_PREFIX):
        return "math"
    raise UnknownDataSource(
        f"unknown data_source {data_source!r}: code graders take code, livecodebench*, humanevalplus, taco, apps, "
        "code_contests, codecontests, codeforces, primeintellect, leetcode, tiny_code; "
        "math graders take math, aime*, amc*, math500, minerva, olympiad*, tiny_math")


def check_row(row: dict) -> None:
    """Raise ValueError naming the field unless the row's data_source has a grader and its
    reward_model.ground_truth is a format that grader takes (data loading calls this for every row)."""
    source = row.get("data_source")
    try:
        kind = grader_kind(source)
    except UnknownDataSource as e:
        raise ValueError(f"data_source: {e}") from None
    gt = (row.get("reward_model") or {}).get("ground_truth")
    if kind == "code":
        parse_ground_truth(gt, str(source).strip().lower())  # GroundTruthError is a ValueError
        return
    golds = gt if isinstance(gt, list) else [gt]
    if not golds or not all(isinstance(g, (str, int, float)) and not isinstance(g, bool) for g in golds):
        raise ValueError("reward_model.ground_truth: a math answer must be a string or number, or a non-empty "
                         f"list of them, got {type(gt).__name__}")


def limits_from_config(cfg: RewardsConfig) -> Limits:
    """Sandbox limits of one program run from the rewards config."""
    return Limits(timeout_s=cfg.timeout_s, cpu_time_s=cfg.cpu_time_s, memory_mb=cfg.memory_mb,
                  max_output_bytes=cfg.max_output_bytes, max_processes=cfg.max_processes,
                  max_open_files=cfg.max_open_files, workdir_mb=cfg.workdir_mb)


@dataclass
class _Batch:
    results: list
    remaining: int
    done: threading.Condition = field(default_factory=threading.Condition)
    uids: set = field(default_factory=set)
    progress: Optional[Callable[[int], None]] = None


class RewardPool:
    """Parallel verifiable rewards; see the module docstring. Thread-safe `score`."""

    def __init__(self, cfg: RewardsConfig):
        if cfg.workers < 1:
            raise UserError(f"rewards.workers must be >= 1, got {cfg.workers}")
        for key in ("timeout_s", "functional_timeout_s", "lcb_timeout_s", "math_timeout_s"):
            if not getattr(cfg, key) > 0:
                raise UserError(f"rewards.{key} must be positive, got {getattr(cfg, key)}")
        if cfg.cpu_time_s is not None and cfg.cpu_time_s < 1:
            raise UserError(f"rewards.cpu_time_s must be >= 1 (or null), got {cfg.cpu_time_s}")
        self.cfg = cfg
        self.limits = limits_from_config(cfg)
        # probes; raises SandboxUnavailable
        self.sandbox = make_sandbox(cfg.sandbox, self.limits, packages=tuple(cfg.sandbox_packages))
        if cfg.sandbox == "none":
            self._warn_unsandboxed()
        self._jobs: queue.Queue = queue.Queue(maxsize=max(2, 2 * cfg.workers))
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        self._ensure_threads()

    @staticmethod
    def _warn_unsandboxed() -> None:
        msg = "rewards.sandbox=none: model-written programs run UNSANDBOXED (trusted data only)"
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        log.warning(msg)

    def _ensure_threads(self) -> None:
        """Start (or replace dead) worker threads up to cfg.workers."""
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            while len(self._threads) < self.cfg.workers:
                t = threading.Thread(target=self._worker, name=f"reward-worker-{len(self._threads)}", daemon=True)
                t.start()
                self._threads.append(t)

    def _worker(self) -> None:
        c = self.cfg
        code = CodeGrader(self.sandbox, c.max_tests_per_problem, per_test_s=c.timeout_s,
                          functional_s=c.functional_timeout_s, lcb_per_test_s=c.lcb_timeout_s)
        mathw = MathWorker(self.cfg.math_timeout_s, memory_mb=max(2048, 2 * self.cfg.memory_mb))
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                batch, i, (source, gt, response), training = job
                t0 = time.monotonic()
                try:
                    if grader_kind(source) == "code":
                        rng = random.Random(hash((i, len(response))))
                        r = code.grade(gt, response, training=training, rng=rng, uids=batch.uids,
                                       data_source=str(source).strip().lower())
                    else:
                        r = mathw.check(gt, response)
                except Exception as e:  # noqa: BLE001 - a grader crash is an infra error, never a 0
                    log.exception("grader crashed")
                    r = Reward("infra_error", f"grader crashed: {type(e).__name__}: {e}"[:200])
                log.debug("scored %s in %.3fs: %s", source, time.monotonic() - t0, r.status)
                with batch.done:
                    batch.results[i] = r
                    batch.remaining -= 1
                    batch.done.notify_all()
                if batch.progress is not None:
                    batch.progress(1)
        finally:
            mathw.close()

    def score(self, items: list[tuple[str, Any, str]], *, training: bool,
              progress: Optional[Callable[[int], None]] = None) -> list[Reward]:
        """Rewards of (data_source, ground_truth, response) items, in order, graded in parallel.

        training=True samples at most max_tests_per_problem tests per code problem; False runs all.
        Raises UnknownDataSource (before grading anything) for a data_source no grader handles.
        """
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        for source, _, _ in items:
            grader_kind(source)
        if not items:
            return []
        if self.cfg.sandbox == "none":
            self._warn_unsandboxed()
        self._ensure_threads()
        batch = _Batch(results=[None] * len(items), remaining=len(items), progress=progress)
        for i, item in enumerate(items):
            self._jobs.put((batch, i, item, training))  # blocks while the queue is full
        with batch.done:
            while batch.remaining > 0:
                batch.done.wait(timeout=1.0)
                if batch.remaining > 0 and not any(t.is_alive() for t in self._threads):
                    self._ensure_threads()
        self._check_leftovers(batch.uids)
        return list(batch.results)

    def _check_leftovers(self, uids: set[int]) -> None:
        """Kill and log any live process of this batch's sandboxes (there should be none)."""
        if not uids:
            return
        left = processes_of_uids(uids)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if left:
            log.error("reward pool: %d sandboxed processes outlived their run (killed): %s", len(left), left)

    def close(self) -> None:
        """Stop the worker threads and their math processes."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join(timeout=30)

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def score_one(data_source: str, ground_truth: Any, response: str, cfg: Optional[RewardsConfig] = None,
              *, training: bool = False) -> Reward:
    """Score one response with a temporary pool (convenience; build a RewardPool for many)."""
    cfg = cfg or RewardsConfig()
    with RewardPool(cfg.model_copy(update={"workers": 1})) as pool:
        return pool.score([(data_source, ground_truth, response)], training=training)[0]

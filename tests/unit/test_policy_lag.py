"""launch.policy_lag: the hold rule (launch/policy_lag.py) with the buffer's real admission table gives
every trained batch exactly the chosen lag, with filtered groups replaced at the same version; without
the hold the lag is not exact. The config checks name the key."""

import random

import pytest

from archer_async.config import load_config
from buffer.table import DropInfo, GroupMeta, Table
from launch.policy_lag import batch_complete, batch_versions


def test_batch_complete_and_versions_by_hand():
    # k = 2, B = 4, serving version 3: the limit is (2 + 3 + 1) * 4 = 24 accepted groups, none in flight
    assert batch_complete(24, 0, 3, 2, 4)
    assert not batch_complete(23, 0, 3, 2, 4)
    assert not batch_complete(24, 1, 3, 2, 4)
    assert batch_versions(6, 2) == [0, 0, 0, 1, 2, 3]
    assert batch_versions(3, 0) == [0, 1, 2]


def _group(t: Table, serving: int, rng: random.Random, actors: int = 1) -> None:
    """One prompt generated at version `serving` arrives: stored, or filtered (no signal) at ingest."""
    gid = f"g{t.next_seq}-{len(t.ingest_drops)}"
    statuses = ["fail"] * 4 if rng.random() < 0.3 else ["pass", "fail", "fail", "pass"]
    meta = GroupMeta(group_id=gid, min_version=serving, max_version=serving, actor_id=f"a{rng.randrange(actors)}", prompt_index=0,
                     sample_ids=[f"{gid}-{i}" for i in range(4)], reward_statuses=statuses, num_tokens=8,
                     created_at=0.0, nbytes=1)
    verdict = t.classify(meta)
    if verdict == "store":
        t.commit([t.add_group(meta)])
    else:
        assert verdict.startswith("filtered")
        t.add_ingest_drop(DropInfo(group_id=gid, reason=verdict, stage="ingest", version=t.version))


def _simulate(lag: int, hold: bool, steps: int = 12, b: int = 4, seed: int = 0, sampler: str = "oldest",
              actors: int = 1) -> list[list[int]]:
    """Sync-mode driver loop over the buffer table: per step the actors (serving the learner's version)
    generate within the admission rule, the learner takes B groups by `sampler` (oldest: the oldest B),
    then the weights move on.
    hold: the actors first finish everything admitted at this version (the driver's rule). Without it,
    they stop after a random part of it (the learner only needs its B groups). Returns per step the
    versions of the trained groups."""
    rng = random.Random(seed)
    t = Table(capacity=256, max_staleness=lag, batch_groups=b, sampler=sampler)
    trained = []
    for v in range(steps):
        t.version = v  # the version the actors serve (sync mode: announced after the weight sync)
        while len(t.ready()) < b or (hold and t.headroom() > 0) or (not hold and t.headroom() > 0
                                                                   and rng.random() < 0.5):
            assert t.headroom() > 0, "the admission rule stalls generation"
            _group(t, v, rng, actors)
        if hold:
            assert batch_complete(t.accepted(), sum(t.in_flight.values()), v, lag, b)
        assert not t.stale_ready(v)
        picks = t.pick(b)
        t.deliver([e.meta.group_id for e in picks])
        trained.append([e.meta.min_version for e in picks])
    return trained


@pytest.mark.parametrize("sampler, actors", [("oldest", 1), ("fair", 3)])
@pytest.mark.parametrize("lag", [0, 1, 2, 5])
def test_hold_gives_exact_lag_from_the_versions(lag, sampler, actors):
    # fair with 3 actors: it reorders the ready groups by actor, but only within one weight version
    trained = _simulate(lag, hold=True, sampler=sampler, actors=actors)
    for v, versions in enumerate(trained):
        assert versions == [max(0, v - lag)] * 4, (v, versions)
    assert [v - vs[0] for v, vs in enumerate(trained)][lag:] == [lag] * (len(trained) - lag)


def test_without_the_hold_the_lag_is_not_exact():
    trained = _simulate(2, hold=False)
    assert any(v - x != 2 for v, versions in enumerate(trained) if v >= 2 for x in versions), trained


@pytest.mark.parametrize("overrides, message", [
    (["launch.policy_lag=2"], "launch.policy_lag needs launch.mode: sync"),
    (["launch.mode=sync", "launch.policy_lag=-1"], "must be >= 0"),
    (["launch.mode=sync", "launch.policy_lag=2", "buffer.sampler=uniform"], "buffer.sampler: oldest"),
    (["launch.mode=sync", "launch.policy_lag=2", "buffer.max_reuse=2"], "buffer.max_reuse: 1"),
    (["launch.mode=sync", "launch.policy_lag=40", "learner.batch_groups=8", "learner.mini_batch_groups=8",
      "buffer.capacity=256"], "must fit buffer.capacity"),
])
def test_policy_lag_config_checks(overrides, message, tmp_path):
    with pytest.raises(Exception, match=message):
        load_config([], overrides + [f"run_dir={tmp_path / 'r'}"])


def test_policy_lag_sets_the_staleness_bound(tmp_path):
    from launch.train import Run

    cfg = load_config([], ["launch.mode=sync", "launch.policy_lag=3", f"run_dir={tmp_path / 'r'}"])
    assert Run(cfg, resume=False).cfg.buffer.max_staleness == 3
    cfg = load_config([], ["launch.mode=sync", f"run_dir={tmp_path / 'r'}"])
    assert Run(cfg, resume=False).cfg.buffer.max_staleness == 0

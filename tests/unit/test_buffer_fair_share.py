"""Fair shares of the trained samples across actors: the "fair" sampler (`Table.pick_fair`), the
per-actor counts it and admission use (rebuilt by log replay and by rewind), and a simulated fleet
whose actors' prompts pass the no-signal filter at different rates."""

import random

from archer_async.config import BufferConfig
from buffer.store import BufferStore
from buffer.table import DropInfo, GroupMeta, Table, share_slots
from tests.helpers.buffer import make_group, payload_meta


def _meta(gid: str, actor: str, version: int = 0, statuses=("pass", "fail")) -> GroupMeta:
    return GroupMeta(group_id=gid, min_version=version, max_version=version, actor_id=actor, prompt_index=0,
                     sample_ids=[f"{gid}-{i}" for i in range(len(statuses))], reward_statuses=list(statuses),
                     num_tokens=4, created_at=0.0, nbytes=1)


def _table(groups: list[tuple[str, int]], sampler: str = "fair", **kw) -> Table:
    """A table holding ready groups [(actor, min_version)], seq in list order, ids "g<seq>"."""
    t = Table(sampler=sampler, **kw)
    for i, (actor, version) in enumerate(groups):
        t.commit([t.add_group(_meta(f"g{i}", actor, version))])
    return t


def _seqs(picks) -> list[int]:
    return [e.seq for e in picks]


def test_fair_takes_the_actor_trained_least_first():
    t = _table([("a", 0), ("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1)])
    t.trained_by_actor.update({"a": 3, "b": 1})
    # version 0: c (0 trained) g3, then b (1) g2, then b and c are out of version-0 groups: a's oldest g0
    assert _seqs(t.pick(3)) == [0, 2, 3]
    assert _seqs(_table([("a", 0), ("a", 0), ("b", 0), ("c", 0)], sampler="oldest").pick(3)) == [0, 1, 2]


def test_fair_takes_actors_in_turn_oldest_first_on_ties():
    t = _table([("a", 0), ("a", 0), ("a", 0), ("b", 0), ("b", 0)])
    assert _seqs(t.pick(2)) == [0, 3]  # a's g0 is older than b's g3: a first, then b (a has one now)
    t.deliver(["g0", "g3"])
    assert dict(t.trained_by_actor) == {"a": 1, "b": 1}
    assert _seqs(t.pick(3)) == [1, 2, 4]


def test_fair_never_takes_a_newer_version_before_an_older_one():
    t = _table([("a", 0), ("a", 0), ("b", 1), ("b", 1)])
    t.trained_by_actor.update({"a": 10})
    assert _seqs(t.pick(2)) == [0, 1]  # b is behind, but its groups are of a newer version
    assert _seqs(t.pick(3)) == [0, 1, 2]


def test_fair_with_one_actor_is_oldest_first():
    groups = [("a", v) for v in (0, 0, 1, 1, 2)]
    for n in range(1, 6):
        assert _seqs(_table(groups).pick(n)) == _seqs(_table(groups, sampler="oldest").pick(n))


def test_accepted_counts_stored_groups_less_stale_drops():
    t = _table([("a", 0), ("a", 0), ("b", 0)], max_staleness=1)
    t.add_ingest_drop(DropInfo(group_id="x", reason="filtered:solve_none", stage="ingest", version=0))
    assert dict(t.accepted_by_actor) == {"a": 2, "b": 1}
    t.version = 2
    for e in t.stale_ready(2):
        t.drop_stored(e, "stale")
    assert dict(t.accepted_by_actor) == {"a": 0, "b": 0}
    assert t.accepted() == 0


def test_counts_survive_replay_and_rewind(tmp_path):
    cfg = BufferConfig(fsync=False, filter_groups=False, max_staleness=8)
    store = BufferStore(tmp_path, cfg, 2)
    groups = [make_group(i, actor=a) for i, a in enumerate(["a", "a", "a", "b", "b", "c"])]
    assert store.ingest([payload_meta(g) for g in groups]) == ["stored"] * 6
    store.commit()
    entries, _ = store.sample(2, 0, "learner", "r1")
    assert [e.meta.actor_id for e in entries] == ["a", "b"]
    state = store.table.consumed_state()
    entries, _ = store.sample(2, 1, "learner", "r2")
    assert [e.meta.actor_id for e in entries] == ["a", "c"]  # c has none trained, then a's g1 is older than b's g4
    assert dict(store.table.trained_by_actor) == {"a": 2, "b": 1, "c": 1}
    store.close()

    replayed = BufferStore(tmp_path, cfg, 2)
    assert dict(replayed.table.trained_by_actor) == {"a": 2, "b": 1, "c": 1}
    assert dict(replayed.table.accepted_by_actor) == {"a": 3, "b": 2, "c": 1}
    replayed.close()

    resumed = BufferStore(tmp_path, cfg, 2, restore_state=state)  # the learner resumes from r1's checkpoint
    assert {a: n for a, n in resumed.table.trained_by_actor.items() if n} == {"a": 1, "b": 1}
    entries, _ = resumed.sample(2, 1, "learner", "r2b")
    assert [e.meta.actor_id for e in entries] == ["a", "c"]  # the same choice as before the crash
    resumed.close()


def _simulate_fleet(fair: bool, binding: bool = True, ticks: int = 400, seed: int = 0) -> dict[str, float]:
    """Four actors (one tick per prompt); actor0's groups pass the no-signal filter 35% of the time,
    the others' 65%. binding: admission binds (eta 1, 4 groups per step, 8 prompts in flight per
    actor), the learner trains 4 groups whenever 4 are ready. Else the learner is the faster side: it
    trains every full batch at once and the actors stop at their own 4 prompts in flight, far below the
    staleness rule. fair: the policy of this buffer (admission by accepted groups plus in flight within
    max_gap 8, the fair sampler); else fewest in flight and oldest first. Returns trained shares."""
    rng = random.Random(seed)
    t = Table(capacity=256, max_staleness=1 if binding else 8, batch_groups=4,
              sampler="fair" if fair else "oldest")
    actors = [f"actor{i}" for i in range(4)]
    cap = 8 if binding else 4
    passing = {"actor0": 0.35, "actor1": 0.65, "actor2": 0.65, "actor3": 0.65}
    prompts: dict[str, list[int]] = {a: [] for a in actors}  # weight version each prompt started at
    n = 0
    for _ in range(ticks):
        for a in actors:  # prompts started last tick are done
            for version in prompts[a]:
                n += 1
                statuses = ["pass", "fail"] if rng.random() < passing[a] else ["fail", "fail"]
                meta = _meta(f"g{n}", a, version, statuses)
                verdict = t.classify(meta)
                if verdict == "store":
                    t.commit([t.add_group(meta)])
                else:
                    t.add_ingest_drop(DropInfo(group_id=meta.group_id, reason=verdict, stage="ingest",
                                               version=t.version))
            prompts[a] = []
            t.in_flight[a] = 0
        order = actors[:]
        rng.shuffle(order)  # who asks first varies
        wants = {a: cap for a in order}
        got = (share_slots(t.headroom(), wants, t.in_flight, t.accepted_by_actor, 8,
                           [a for a in actors if t.accepted_by_actor[a] > 0]) if fair
               else share_slots(t.headroom(), wants, t.in_flight))
        for a, g in got.items():
            prompts[a] += [t.version] * g
            t.in_flight[a] = g
        for _ in range(1 if binding else 100):
            for e in t.stale_ready(t.version):
                t.drop_stored(e, "stale")
            picks = t.pick(4)
            if not picks:
                break
            t.deliver([e.meta.group_id for e in picks])
            t.version += 1
    total = sum(t.trained_by_actor.values())
    assert total >= 200
    return {a: t.trained_by_actor[a] / total for a in actors}


def test_simulated_fleet_trains_fair_shares_despite_unequal_filtering():
    before = _simulate_fleet(fair=False)
    assert before["actor0"] < 0.8 / 4, before  # fewest in flight alone: actor0's groups are filtered more
    after = _simulate_fleet(fair=True)
    assert all(0.8 / 4 <= s <= 1.2 / 4 for s in after.values()), after
    assert max(after.values()) - min(after.values()) < 0.03, after


def test_simulated_fleet_is_fair_also_when_admission_does_not_bind():
    before = _simulate_fleet(fair=False, binding=False)
    assert before["actor0"] < 0.8 / 4, before  # every actor at its own cap: shares follow the filter
    after = _simulate_fleet(fair=True, binding=False)
    assert all(0.8 / 4 <= s <= 1.2 / 4 for s in after.values()), after

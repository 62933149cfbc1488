"""PromptStream: seeded order, exact resume from state_dict, disjoint shards."""

import json

import pytest

from archer_async.data import DataError, PromptStream

ROWS = [{"id": i} for i in range(23)]


def test_each_epoch_visits_every_row_once_and_reshuffles():
    s = PromptStream(ROWS, seed=7, shuffle=True)
    e0 = [i for i, _ in s.take(23)]
    e1 = [i for i, _ in s.take(23)]
    assert sorted(e0) == sorted(e1) == list(range(23))
    assert e0 != e1 and e0 != list(range(23))
    assert [i for i, _ in PromptStream(ROWS, seed=7).take(23)] == e0
    assert [i for i, _ in PromptStream(ROWS, seed=8).take(23)] != e0
    assert [i for i, _ in PromptStream(ROWS, shuffle=False).take(5)] == [0, 1, 2, 3, 4]
    idx, row = next(PromptStream(ROWS, seed=7))
    assert row is ROWS[idx]


@pytest.mark.parametrize("cut", [0, 5, 22, 23, 24, 40, 46])
def test_resume_is_exact(cut):
    ref = PromptStream(ROWS, seed=3, shuffle=True)
    expected = [i for i, _ in ref.take(cut + 30)]
    s = PromptStream(ROWS, seed=3, shuffle=True)
    s.take(cut)
    state = json.loads(json.dumps(s.state_dict()))  # survives a JSON checkpoint
    resumed = PromptStream(ROWS, seed=3, shuffle=True)
    resumed.load_state_dict(state)
    assert [i for i, _ in resumed.take(30)] == expected[cut:]


def test_shards_are_disjoint_and_cover_the_data():
    world = 3
    seen = []
    for rank in range(world):
        s = PromptStream(ROWS, seed=1, rank=rank, world=world)
        ids = [i for i, _ in s.take(len(s))]
        assert len(ids) in (7, 8) and len(set(ids)) == len(ids)
        seen += ids
    assert sorted(seen) == list(range(23))


@pytest.mark.parametrize("world", [2, 4])
def test_shards_mix_rows_of_alternating_kinds(world):
    """Rows that alternate between two kinds (the embedded data: math, code, math, ...): every shard gets
    both kinds in about equal numbers, not one kind per actor."""
    rows = [{"kind": "math" if i % 2 == 0 else "code"} for i in range(400)]
    for rank in range(world):
        s = PromptStream(rows, seed=0, rank=rank, world=world)
        math = sum(r["kind"] == "math" for _, r in s.take(len(s)))
        assert 0.4 <= math / len(s) <= 0.6, (rank, math, len(s))


def test_load_state_rejects_a_modulo_sharded_checkpoint():
    state = PromptStream(ROWS, seed=1, rank=0, world=2).state_dict()
    state.pop("sharding")
    with pytest.raises(DataError, match="modulo"):
        PromptStream(ROWS, seed=1, rank=0, world=2).load_state_dict(state)
    single = PromptStream(ROWS, seed=1).state_dict()
    single.pop("sharding")
    PromptStream(ROWS, seed=1).load_state_dict(single)  # one shard: nothing changed


def test_load_state_rejects_a_different_stream():
    s = PromptStream(ROWS, seed=1, rank=0, world=2)
    s.take(3)
    with pytest.raises(DataError, match="world"):
        PromptStream(ROWS, seed=1, rank=0, world=1).load_state_dict(s.state_dict())
    with pytest.raises(DataError, match="num_rows"):
        PromptStream(ROWS[:10], seed=1, rank=0, world=2).load_state_dict(s.state_dict())
    with pytest.raises(ValueError):
        PromptStream(ROWS, rank=2, world=2)
    with pytest.raises(DataError):
        PromptStream([], seed=0)

"""The learner's batching plan (no process group needed): every row once, equal micro-batch counts on
every rank, and gather indices that point at the logits predicting each response token."""

from __future__ import annotations

import random

import pytest


def _rows(n):
    from learner.batching import TrainRow

    rng = random.Random(n)
    out = []
    for i in range(n):
        p, t = rng.randint(1, 6), rng.randint(1, 9)
        out.append(TrainRow(f"s{i}", [rng.randrange(2, 50) for _ in range(p)], [rng.randrange(2, 50) for _ in range(t)],
                            [-1.0] * t, [0] * t, float(i)))
    return out


@pytest.mark.parametrize("n,world,mbs", [(7, 2, 2), (1, 2, 3), (10, 3, 4), (4, 1, 1)])
def test_learner_plan_covers_every_row_once_with_equal_counts(n, world, mbs):
    from learner.batching import plan_micro_batches

    rows = _rows(n)
    plans = [plan_micro_batches(rows, r, world, mbs) for r in range(world)]
    assert len({len(p) for p in plans}) == 1  # same number of micro-batches on every rank
    seen = [row.sample_id for p in plans for chunk in p for row in chunk]
    assert sorted(seen) == sorted(r.sample_id for r in rows)
    assert all(len(chunk) <= mbs for p in plans for chunk in p)


def test_learner_collate_gather_index_points_at_predicting_logits():
    from learner.batching import collate

    rows = _rows(5)
    mb = collate(rows, pad_id=0)
    first = min(len(r.prompt_ids) for r in rows) - 1
    for i, r in enumerate(rows):
        for t, tok in enumerate(r.response_ids):
            col = first + int(mb.gather_index[i, t])  # column of input_ids whose logits are used
            assert int(mb.input_ids[i, col + 1]) == tok == int(mb.response_ids[i, t])
        assert mb.response_mask[i].sum() == len(r.response_ids)
    dummy = collate([], pad_id=0, dummy_row=rows[0])
    assert dummy.num_real_rows == 0 and float(dummy.response_mask.sum()) == 0.0

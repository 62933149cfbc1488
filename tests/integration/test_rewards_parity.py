"""Real-data parity: the graders agree with each dataset's reference grader on every row of
tests/data/rewards_realdata.jsonl (see tests/data/README.md), and fail the reward hacks the references
accept (tests/data/rewards_quirks.jsonl). One RewardPool grades all rows in parallel."""

import json
from collections import Counter
from pathlib import Path

import pytest

from archer_async.config import RewardsConfig
from rewards import RewardPool
from rewards.sandbox import sandbox_processes

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pool():
    p = RewardPool(RewardsConfig(workers=4))  # Archer's limits (the defaults): rows sit at 8 s / 35 s / 40 s
    yield p
    p.close()


def _verdicts(pool, rows):
    rewards = pool.score([(r["data_source"], r["reward_model"]["ground_truth"], r["response"]) for r in rows],
                         training=False)
    return [(r, w, "pass" if w.status == "pass" else "fail" if w.status in ("fail", "timeout") else w.status)
            for r, w in zip(rows, rewards)]


def test_realdata_agrees_with_the_reference_graders(pool):
    rows = _rows("rewards_realdata.jsonl")
    cats = Counter(r["category"] for r in rows)
    assert len(rows) >= 150 and all(cats[c] >= 20 for c in ("stdin", "functional", "lcb_call", "math")), cats
    assert all(r["source"] and r["licence"] and r["expected"] in ("pass", "fail") for r in rows)
    bad = [f"{r['id']} [{r['data_source']}/{r['category']}] reference {r['expected']}, got {w.status} "
           f"({w.reason}); {r['note'][:90]}" for r, w, got in _verdicts(pool, rows) if got != r["expected"]]
    assert not bad, f"{len(bad)} of {len(rows)} rows disagree:\n" + "\n".join(bad)
    assert sandbox_processes() == []


def test_reward_hacks_accepted_by_the_references_fail(pool):
    rows = _rows("rewards_quirks.jsonl")
    assert rows and all(r["expected"] == "pass" for r in rows)  # what Archer / rllm award
    got = {r["id"]: (w.status, w.reason) for r, w, _ in _verdicts(pool, rows)}
    assert all(status == "fail" for status, _ in got.values()), got

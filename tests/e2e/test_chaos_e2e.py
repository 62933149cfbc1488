"""The chaos harness in its short form: the tiny default run, SIGKILL of an actor, an actor's vLLM engine
core, a reward worker, every actor at once (while the learner waits for data) and a learner rank at
random (seeded) moments; the actor (and the actor whose engine died) is re-placed, the step that lost
every actor ends its wait, re-places them and goes on, the learner kill stops the run with a
message naming the role, `archer-async resume` finishes it, and the accounting shows 0 samples lost and
0 trained twice. The long form (20+ kills, 5,000+ samples) is `python -m bench.chaos`."""

import pytest

pytestmark = pytest.mark.e2e

STEPS = 16  # kills land only while 3+ steps remain (`run_chaos`), so five kills need room


@pytest.mark.timeout(900)
def test_kill_actor_engine_reward_worker_and_learner_rank_then_resume_loses_nothing(tmp_path):
    from bench.chaos import run_chaos

    res = run_chaos(tmp_path / "run", seed=3, kills=5, steps=STEPS, time_limit_s=800.0,
                    kinds=("actor", "engine", "reward", "actors", "learner"), wait_range=(2.0, 6.0))
    assert res["kills"] == 5 and res["by_kind"].get("engine") == 1 and res["by_kind"].get("actors") == 1, res
    assert res["final_rc"] == 0, res
    stop = [e for e in res["events"] if e["kind"] == "learner"]
    assert stop and stop[0]["driver_rc"] == 1 and "died" in stop[0]["message"], stop
    assert res["resumes"] == 1 and res.get("actor_restarts", 0) >= 2, res
    driver_log = (tmp_path / "run" / "logs" / "driver.log").read_text(errors="replace")
    assert "stopped generating" in driver_log  # the actor whose engine died was re-placed
    assert "no actor is generating" in driver_log and "re-placing actors, then the step goes on" in driver_log
    acc = res["accounting"]
    assert acc.get("samples_lost", 0) == 0
    assert acc["groups_acked_missing_from_log"] == 0 and acc["samples_trained_twice"] == 0
    assert acc["samples_trained"] >= STEPS * 8 and acc["samples_acknowledged"] > 0, acc  # counted, not vacuous
    assert acc["trained_steps"] == STEPS and acc["ok"], acc

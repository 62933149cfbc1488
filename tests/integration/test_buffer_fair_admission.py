"""Fair admission over real ZMQ: four producers with identical speed that, like the rollout actor, ask
for every free slot they have and pause after a refusal; the learner trains from the buffer. When
admission binds (staleness bound), each producer must get a fair share of the trained groups, also when
one producer re-asks at once after a refusal while the others pause (first come, first served gives
that producer every slot the learner frees)."""

import threading
import time
from collections import Counter

import pytest

from archer_async.buffer_client import BufferClient
from tests.helpers.buffer import make_group

pytestmark = pytest.mark.integration

N_ACTORS, MAX_INFLIGHT, GEN_S, STEPS, BATCH = 4, 16, 0.08, 40, 4


def _producer(run_dir, k: int, version: list, stop: threading.Event, refused: Counter, greedy: bool) -> None:
    name = f"actor{k}"
    seq = 0
    with BufferClient.from_run_dir(run_dir, client_id=name) as c:
        pending: list[float] = []  # finish times of the prompts in flight
        while not stop.is_set():
            now = time.monotonic()
            for t in [t for t in pending if t <= now]:  # finished: deliver (within the reservation)
                pending.remove(t)
                c.put(make_group(seq, version=version[0], actor=name), timeout=60)
                seq += 1
            if len(pending) >= MAX_INFLIGHT:
                time.sleep(max(0.0, min(pending) - time.monotonic()))
                continue
            wake = threading.Event()  # a prompt that finishes while the request waits interrupts it
            timer = threading.Timer(max(0.0, min(pending) - now), wake.set) if pending else None
            if timer is not None:
                timer.start()
            granted = c.reserve(MAX_INFLIGHT - len(pending), timeout=40, wait_s=2.0, cancel=wake)
            if timer is not None:
                timer.cancel()
            if granted:
                pending += [time.monotonic() + GEN_S] * granted
            elif not wake.is_set():  # refused: pause before asking again (a greedy producer re-asks at once)
                refused[name] += 1
                stop.wait(0.002 if greedy else 0.25)


@pytest.mark.parametrize("greedy_first", [False, True], ids=["alike", "actor0-polls-in-a-tight-loop"])
def test_trained_shares_are_fair_when_admission_binds(tmp_path, buffer_server, greedy_first):
    buffer_server({"capacity": 64, "max_staleness": 1, "admission_batch_groups": BATCH})
    version, stop, refused = [0], threading.Event(), Counter()
    threads = [threading.Thread(target=_producer, args=(tmp_path, k, version, stop, refused, greedy_first and k == 0), daemon=True)
               for k in range(N_ACTORS)]
    for t in threads:
        t.start()
    trained = Counter()
    try:
        with BufferClient.from_run_dir(tmp_path, client_id="learner") as learner:
            for _ in range(STEPS):
                batch = learner.sample(BATCH, version[0], timeout=60)
                trained.update(g.actor_id for g in batch.groups)
                time.sleep(0.02)  # the optimizer step
                version[0] += 1
                learner.set_version(version[0])
            stats = learner.stats()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    total = sum(trained.values())
    shares = {a: trained[a] / total for a in (f"actor{k}" for k in range(N_ACTORS))}
    assert total == STEPS * BATCH
    assert all(0.8 / N_ACTORS <= s <= 1.2 / N_ACTORS for s in shares.values()), (shares, refused)
    assert stats["in_flight"] <= stats["admission_limit"]

"""Hypothesis state machine: append / sample / commit / checkpoint / crashes / reopen against a model.

The model is an actor that re-sends every group until it is acknowledged and a learner that trains
what it receives, checkpoints (trained counts + the consumed_state of its last reply) and, when it
crashes, returns to its checkpoint and rewinds the buffer. A buffer crash may lose everything written
after the last fsync and leave garbage. Invariants: a group is never trained more than max_reuse
times; at the end every produced group is acknowledged and either trained exactly max_reuse times or
durably dropped (filtered / stale) with a reason.
"""

import os
import shutil
import tempfile
import uuid
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from archer_async.config import BufferConfig
from buffer.store import BufferStore
from tests.helpers.buffer import make_group, payload_meta

REWARDS = {"mixed": ("pass", "fail"), "solved": ("pass", "pass"), "infra": ("pass", "infra_error")}


class BufferMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="buf-sm-"))
        self.store = None

    @initialize(max_reuse=st.sampled_from([1, 2]), sampler=st.sampled_from(["fair", "oldest", "uniform"]),
                capacity=st.integers(2, 6), segment_bytes=st.sampled_from([300, 1 << 20]))
    def init(self, max_reuse, sampler, capacity, segment_bytes):
        self.cfg = BufferConfig(capacity=capacity, max_staleness=1, sampler=sampler, max_reuse=max_reuse,
                                segment_bytes=segment_bytes, fsync=False)
        self.store = BufferStore(self.dir, self.cfg, 2)
        self.next_id = 0
        self.outbox = {}          # gid -> group, not yet acknowledged (the actor re-sends these)
        self.staged = set()       # gids whose ingest is written but not yet committed
        self.acked = set()
        self.trained = Counter()  # learner: gid -> times trained
        self.version = 0
        self.ckpt = (Counter(), {"cursor": 0, "consumed": {}, "version": 0}, 0)
        self.last_state = None    # consumed_state of the last reply the learner received
        self.inflight = None      # [req, n, gids, state, needs_retry]: sample written, reply not received
        self.synced = self._active_size()

    def _active_size(self):
        opens = sorted(self.dir.glob("*.open"))
        return (opens[-1].name, opens[-1].stat().st_size) if opens else (None, 0)

    # ---------------------------------------------------------------- actor
    @rule(k=st.integers(1, 3), kind=st.sampled_from(["mixed", "mixed", "mixed", "solved", "infra", "old"]))
    def produce(self, k, kind):
        """An actor finishes k groups and sends them."""
        new = []
        for _ in range(k):
            version = max(0, self.version - 2) if kind == "old" else self.version
            g = make_group(self.next_id, version=version, rewards=REWARDS.get(kind, REWARDS["mixed"]))
            self.next_id += 1
            self.outbox[g.group_id] = g
            new.append(g.group_id)
        for gid, status in zip(new, self.store.ingest([payload_meta(self.outbox[g]) for g in new])):
            if status != "full":
                self.staged.add(gid)

    @precondition(lambda self: self.outbox)
    @rule(data=st.data())
    def send(self, data):
        """The actor re-sends some unacknowledged groups (after "full" or a crash)."""
        gids = data.draw(st.lists(st.sampled_from(sorted(self.outbox)), min_size=1, max_size=4))
        statuses = self.store.ingest([payload_meta(self.outbox[g]) for g in gids])
        for gid, status in zip(gids, statuses):
            if gid in self.acked:
                assert status == "duplicate"
            if status != "full":
                self.staged.add(gid)

    # ---------------------------------------------------------------- buffer
    @rule()
    def commit(self):
        self.store.commit()
        self.synced = self._active_size()
        for gid in self.staged:
            self.acked.add(gid)
            self.outbox.pop(gid, None)
        self.staged.clear()
        if self.inflight is not None and not self.inflight[4]:
            _, _, gids, state, _ = self.inflight
            for gid in gids:
                self.trained[gid] += 1
                assert self.trained[gid] <= self.cfg.max_reuse, gid
            self.last_state = state
            self.inflight = None

    # ---------------------------------------------------------------- learner
    @rule(n=st.integers(1, 3))
    def sample(self, n):
        if self.inflight is not None and not self.inflight[4]:
            return  # waiting for the reply of the request in flight
        req, n = (self.inflight[0], self.inflight[1]) if self.inflight else (uuid.uuid4().hex, n)
        res = self.store.sample(n, self.version, "learner", req)
        if res is None:
            return
        entries, payloads = res
        assert len(entries) == n == len(payloads)
        assert len({e.meta.group_id for e in entries}) == n
        self.inflight = [req, n, [e.meta.group_id for e in entries], self.store.table.consumed_state(), False]

    @precondition(lambda self: self.inflight is None)
    @rule()
    def step_version(self):
        self.version += 1

    @precondition(lambda self: self.inflight is None)
    @rule()
    def checkpoint(self):
        state = self.last_state or {"cursor": 0, "consumed": {}, "version": 0}
        self.ckpt = (Counter(self.trained), state, self.version)

    @rule()
    def learner_crash(self):
        self.trained = Counter(self.ckpt[0])
        self.version = self.ckpt[2]
        self.inflight = None
        self.last_state = self.ckpt[1]
        self.store.rewind(self.ckpt[1])
        self.commit()

    def _crash_buffer(self, lose_unsynced, garbage, restore):
        if self.store.log._fd is not None:  # kill -9: no flush, no fsync, no seal
            os.close(self.store.log._fd)
        self.store = None
        if lose_unsynced:
            name, size = self.synced
            for p in self.dir.glob("*.open"):
                with open(p, "r+b") as f:
                    f.truncate(size if p.name == name else 0)
        if garbage:
            opens = sorted(self.dir.glob("*.open"))
            if opens:
                with open(opens[-1], "ab") as f:
                    f.write(garbage)
        self.store = BufferStore(self.dir, self.cfg, 2, restore_state=restore)
        self.staged.clear()  # never acknowledged: still in the outbox
        self.synced = self._active_size()

    @rule(lose_unsynced=st.booleans(), garbage=st.sampled_from([b"", b"\x07", b"\xff" * 40]))
    def buffer_crash(self, lose_unsynced, garbage):
        self._crash_buffer(lose_unsynced, garbage, None)
        if self.inflight is not None:
            self.inflight[4] = True  # the learner re-sends the same request

    @rule(lose_unsynced=st.booleans())
    def both_crash(self, lose_unsynced):
        self.trained = Counter(self.ckpt[0])
        self.version = self.ckpt[2]
        self.inflight = None
        self.last_state = self.ckpt[1]
        self._crash_buffer(lose_unsynced, b"", self.ckpt[1])

    # ---------------------------------------------------------------- checks
    @invariant()
    def never_beyond_max_reuse(self):
        if self.store is not None:
            assert all(c <= self.cfg.max_reuse for c in self.trained.values())
            assert all(self.store.table.known(g) for g in self.acked)

    def teardown(self):
        try:
            if self.store is None:
                return
            for _ in range(2000):
                if self.outbox:
                    self.send_all()
                self.commit()
                if self.inflight is not None and self.inflight[4]:
                    self.sample(1)
                    if self.inflight[4]:  # nothing was delivered by the lost request: give it up
                        self.inflight = None
                    continue
                self.sample(1)
                if self.inflight is None and not self.outbox:
                    break
            self.commit()
            assert not self.outbox and self.inflight is None
            t = self.store.table
            for gid in self.acked:
                e = t.by_id.get(gid)
                dropped = gid in t.ingest_drops or (e is not None and e.dropped is not None)
                if not dropped:
                    assert self.trained[gid] == self.cfg.max_reuse, (gid, self.trained[gid])
            assert not (set(self.trained) - self.acked)
            self.store.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def send_all(self):
        gids = sorted(self.outbox)
        for gid, status in zip(gids, self.store.ingest([payload_meta(self.outbox[g]) for g in gids])):
            if status != "full":
                self.staged.add(gid)


BufferMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("BUFFER_SM_EXAMPLES", "500")), stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_buffer_state_machine = BufferMachine.TestCase

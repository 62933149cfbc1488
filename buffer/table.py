"""The buffer's table: which groups exist, which are ready, delivered, consumed or dropped.

Pure in-memory state with no I/O; `store.BufferStore` drives it from the log (replay) and from live
requests, so replay after a crash rebuilds exactly the state the records describe.

Group states (per stored group, ordered by ``seq``, the ingest sequence number):
  pending   appended to the log, not yet covered by an fsync: never delivered, never acknowledged
  ready     durable and delivered fewer than max_reuse times (the sampler picks from these)
  consumed  delivered max_reuse times
  dropped   too stale when sampled (a DROP record says so)
Groups dropped at ingest (filtered, too stale) are never stored: only their DROP record exists.

Fairness across actors (every count below is derived from the log, so replay and `rewind` rebuild it
and nothing more is checkpointed): `accepted_by_actor` (groups stored and not dropped as stale) and
`trained_by_actor` (deliveries) per producing actor. Admission (`share_slots`) gives a free slot to
the actor with the fewest accepted groups plus prompts in flight, so an actor whose groups the filter
drops more often generates more, and (Table.share_gap, buffer.max_share_gap) none runs more than that
many groups ahead of the live actor furthest behind, also when slots are free; the "fair" sampler
delivers, among the ready groups of the oldest version, those of the actors with the fewest
deliveries so far. Together they keep each actor's share of the trained samples near 1/N even when
the actors' prompts pass the filter at different rates.

consumed_state (what the learner checkpoints): ``{"format": 1, "cursor": L, "consumed": {gid: k},
"version": v}`` where every group with seq < L is finished (consumed or dropped) and ``consumed``
lists delivery counts of groups with seq >= L. Rewinding to it makes every group delivered after
that state ready again: groups delivered but not covered by a learner checkpoint are re-delivered.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional

import msgspec

from archer_async.config import UserError
from archer_async.types import GroupHeader, no_signal


class GroupMeta(GroupHeader, frozen=True):
    """What the buffer knows about a stored group without its payload (kept in the log record): the
    producer's GroupHeader plus the size of the encoded group."""

    nbytes: int


class DropInfo(msgspec.Struct, frozen=True):
    """A durable drop: group, reason ("stale", "filtered:solve_all", ...), when and where."""

    group_id: str
    reason: str
    stage: str
    """"ingest" (never stored) or "sample" (stored, then too stale to train)."""
    version: int
    """Learner version the decision was made against."""
    seq: int = -1
    sample_ids: list[str] = []
    actor_id: str = ""
    prompt_index: int = -1
    min_version: int = 0
    at: float = 0.0


class RestoreError(UserError):
    """A consumed_state that does not match this buffer's log."""


def filter_reason(reward_statuses: list[str]) -> Optional[str]:
    """The drop reason ("filtered:<why>") of a group that cannot train (`archer_async.types.no_signal`),
    or None."""
    why = no_signal(reward_statuses)
    return None if why is None else "filtered:" + why


def share_slots(free: int, wants: dict[str, int], in_flight: dict[str, int],
                accepted: Optional[dict[str, int]] = None, max_gap: Optional[int] = None,
                peers: Iterable[str] = ()) -> dict[str, int]:
    """Divide `free` admission slots among the clients that want them (client -> prompts asked for):
    one slot at a time to the client with the fewest groups accepted so far (`accepted`, client ->
    groups stored for training; none given: 0 each) plus prompts in flight, counting the slots it was
    just given; ties go to the client that asked first (the order of `wants`). So when admission binds,
    a client that re-asks in a tight loop cannot take the slots a slower or refused client is waiting
    for, and a client whose groups are dropped as having no signal more often than the others' gets
    more prompts to make up for them: every client that wants work converges to the same number of
    groups accepted for training.

    max_gap: also when slots are free, a client gets one only while its accepted + in flight (the slot
    included) stays within max_gap of the lowest accepted + in flight among `peers` (the producers
    that count: live, with groups accepted), so no producer runs ahead of another by more than max_gap
    groups, whatever their speeds or how often the filter drops their groups. None: no such bound.
    Returns client -> granted (every client of `wants`, 0 included)."""
    accepted = accepted or {}
    peers = list(peers)
    order = {c: i for i, c in enumerate(wants)}
    got = {c: 0 for c in wants}

    def key(c: str) -> int:
        return accepted.get(c, 0) + in_flight.get(c, 0) + got.get(c, 0)

    left = max(0, int(free))
    while left > 0:
        cands = [c for c in wants if got[c] < wants[c]]
        if max_gap is not None and peers:
            floor = min(key(p) for p in peers)
            cands = [c for c in cands if key(c) + 1 <= floor + max_gap]
        if not cands:
            break
        c = min(cands, key=lambda c: (key(c), order[c]))
        got[c] += 1
        left -= 1
    return got


_NO_IDS: list = []
"""The per-sample lists of every finished group's meta (shared, never mutated)."""


def slim(meta: GroupMeta) -> GroupMeta:
    """The meta of a finished (consumed or dropped) group without its per-sample lists, which are most
    of its memory: a long run keeps one entry per group it ever stored (duplicate detection, rewind),
    so only what those need stays in memory. The full meta is in the group's log record."""
    return msgspec.structs.replace(meta, sample_ids=_NO_IDS, reward_statuses=_NO_IDS)


def is_slim(meta: GroupMeta) -> bool:
    """True for a meta cut down by `slim` (a stored group has at least one sample)."""
    return not meta.sample_ids


@dataclass(eq=False, slots=True)
class Entry:
    """One stored group."""

    seq: int
    meta: GroupMeta
    loc: object = None
    """segment_log.Location of its GROUP record once written."""
    committed: bool = False
    delivered: int = 0
    dropped: Optional[str] = None


@dataclass
class Table:
    """Table policy: capacity, staleness eta, sampler, max reuse, filtering, admission."""

    capacity: int = 256
    max_staleness: int = 4
    sampler: str = "fair"
    """"fair" (`pick_fair`), "oldest" (oldest first) or "uniform" (at random)."""
    max_reuse: int = 1
    filter_groups: bool = True
    batch_groups: int = 8
    seed: int = 0
    share_gap: Optional[int] = None
    """Admission's max_gap (`share_slots`); None: none."""
    version: int = 0
    entries: list[Entry] = field(default_factory=list)
    """Every stored group; entries[seq].seq == seq."""
    by_id: dict[str, Entry] = field(default_factory=dict)
    ingest_drops: dict[str, str] = field(default_factory=dict)
    """group_id -> reason, for groups dropped before being stored."""
    live: dict[int, Entry] = field(default_factory=dict)
    """seq -> entry of pending and ready groups."""
    counters: Counter = field(default_factory=Counter)
    in_flight: dict[str, int] = field(default_factory=dict)
    last_delivery: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    """consumer -> (request id, group ids) of its latest delivery (idempotent retries)."""
    accepted_by_actor: Counter = field(default_factory=Counter)
    """actor_id -> groups stored and not dropped as stale (admission's fair share)."""
    trained_by_actor: Counter = field(default_factory=Counter)
    """actor_id -> deliveries of its groups (the fair sampler's count)."""

    def __post_init__(self):
        self.rng = random.Random(self.seed)

    # ------------------------------------------------------------------ queries
    @property
    def next_seq(self) -> int:
        return len(self.entries)

    def known(self, group_id: str) -> bool:
        """Stored or dropped before: a re-sent group is a duplicate."""
        return group_id in self.by_id or group_id in self.ingest_drops

    def ready(self) -> list[Entry]:
        """Durable groups that may be delivered, oldest first."""
        return [e for s, e in sorted(self.live.items()) if e.committed]

    def accepted(self) -> int:
        """Groups stored for training and not dropped as stale (the admission rule's 'accepted')."""
        return len(self.entries) - self.counters["dropped_stale_stored"]

    def admission_limit(self) -> int:
        """(eta + v + 1) * batch_groups."""
        return (self.max_staleness + self.version + 1) * self.batch_groups

    def headroom(self) -> int:
        """How many more prompts actors may start now (staleness rule and capacity together)."""
        in_flight = sum(self.in_flight.values())
        stale_room = self.admission_limit() - self.accepted() - in_flight
        cap_room = self.capacity - len(self.live) - in_flight
        return max(0, min(stale_room, cap_room))

    def cursor(self) -> int:
        return min(self.live) if self.live else self.next_seq

    def consumed_state(self) -> dict:
        """The state a learner checkpoint stores (see module docstring)."""
        cur = self.cursor()
        consumed = {e.meta.group_id: e.delivered for e in self.entries[cur:]
                    if e.delivered and e.dropped is None}
        return {"format": 1, "cursor": cur, "consumed": consumed, "version": self.version}

    # ------------------------------------------------------------------ ingest
    def classify(self, meta: GroupMeta) -> str:
        """Decision for an incoming group: "duplicate", "full", "store" or a drop reason."""
        if self.known(meta.group_id):
            return "duplicate"
        if self.filter_groups:
            reason = filter_reason(meta.reward_statuses)
            if reason:
                return reason
        if meta.min_version < self.version - self.max_staleness:
            return "stale"
        if len(self.live) >= self.capacity:
            return "full"
        return "store"

    def add_group(self, meta: GroupMeta) -> Entry:
        """Store a group (pending until `commit`); its payload is in its log record only."""
        e = Entry(seq=self.next_seq, meta=meta)
        self.entries.append(e)
        self.by_id[meta.group_id] = e
        self.live[e.seq] = e
        self.counters["stored"] += 1
        self.accepted_by_actor[meta.actor_id] += 1
        return e

    def add_ingest_drop(self, info: DropInfo) -> None:
        self.ingest_drops[info.group_id] = info.reason
        self._count_drop(info.reason)

    def _count_drop(self, reason: str) -> None:
        if reason == "stale":
            self.counters["dropped_stale"] += 1
        else:
            self.counters["dropped_filtered"] += 1
        self.counters["drop:" + reason] += 1

    def commit(self, entries: list[Entry]) -> None:
        """The records of `entries` are durable: they become ready."""
        for e in entries:
            e.committed = True

    # ------------------------------------------------------------------ sample
    def stale_ready(self, version: int) -> list[Entry]:
        """Ready groups too stale to train at `version`."""
        floor = version - self.max_staleness
        return [e for e in self.ready() if e.meta.min_version < floor]

    def drop_stored(self, e: Entry, reason: str) -> None:
        """A stored group leaves the table unconsumed (recorded by a DROP record)."""
        if e.dropped is not None:
            return
        e.dropped = reason
        e.meta = slim(e.meta)
        self.live.pop(e.seq, None)
        self._count_drop(reason)
        if reason == "stale":
            self.counters["dropped_stale_stored"] += 1
            self.accepted_by_actor[e.meta.actor_id] -= 1

    def pick(self, n: int, exclude: frozenset = frozenset()) -> Optional[list[Entry]]:
        """n distinct ready groups by the sampler, or None if fewer are ready (state unchanged)."""
        ready = [e for e in self.ready() if e.seq not in exclude]
        if n <= 0 or len(ready) < n:
            return None
        if self.sampler == "uniform":
            return sorted(self.rng.sample(ready, n), key=lambda e: e.seq)
        if self.sampler == "fair":
            return self.pick_fair(ready, n)
        return ready[:n]

    def pick_fair(self, ready: list[Entry], n: int) -> list[Entry]:
        """The "fair" sampler: n of `ready` (oldest first, len >= n), returned in seq order.

        Oldest weight version first, as a whole: the groups of the lowest min_version go before any
        newer one, so reordering by actor never leaves an older group to go stale while a newer one
        trains (and sync mode's exact policy lag holds). Within one min_version, one group at a time from the actor with
        the fewest deliveries so far (`trained_by_actor`, counting the groups just picked), its oldest
        group of that version; ties go to the actor whose group is older. With every actor's groups
        ready this takes them in turn; with one actor only it is oldest version first, then by arrival."""
        count = Counter(self.trained_by_actor)
        tiers: dict[int, dict[str, list[Entry]]] = {}
        for e in reversed(ready):  # each actor's list ends with its oldest group of that version
            tiers.setdefault(e.meta.min_version, {}).setdefault(e.meta.actor_id, []).append(e)
        picks: list[Entry] = []
        for version in sorted(tiers):
            queues = tiers[version]
            while queues and len(picks) < n:
                a = min(queues, key=lambda a: (count[a], queues[a][-1].seq))
                picks.append(queues[a].pop())
                count[a] += 1
                if not queues[a]:
                    del queues[a]
        return sorted(picks, key=lambda e: e.seq)

    def deliver(self, group_ids: list[str], consumer: str = "", request_id: str = "") -> list[Entry]:
        """Count one delivery of each group; finished groups leave the live set."""
        out = []
        for gid in group_ids:
            e = self.by_id[gid]
            e.delivered += 1
            self.trained_by_actor[e.meta.actor_id] += 1
            if e.delivered >= self.max_reuse:
                self.live.pop(e.seq, None)
                e.meta = slim(e.meta)
            out.append(e)
        self.counters["delivered"] += len(out)
        if request_id:
            self.last_delivery[consumer] = (request_id, list(group_ids))
        return out

    # ------------------------------------------------------------------ rewind
    def validate_state(self, state: dict) -> tuple[int, dict[str, int], int]:
        """(cursor, consumed, version) of a consumed_state; RestoreError if it does not fit this log."""
        try:
            cursor = int(state["cursor"])
            consumed = {str(k): int(v) for k, v in dict(state.get("consumed", {})).items()}
            version = int(state.get("version", self.version))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RestoreError(f"malformed consumed_state: {e!r}") from None
        if cursor < 0 or cursor > self.next_seq:
            raise RestoreError(f"consumed_state cursor {cursor} is outside the buffer log ({self.next_seq} "
                               "groups): the buffer directory does not belong to this checkpoint")
        for gid in consumed:
            e = self.by_id.get(gid)
            if e is None or e.seq < cursor:
                raise RestoreError(f"consumed_state names group {gid!r} that this buffer log does not "
                                   "hold past the cursor")
        return cursor, consumed, version

    def rewind(self, state: dict) -> list[Entry]:
        """Return to a learner checkpoint's consumed_state: later deliveries are undone. Returns the
        entries that are live again with a slim meta (the caller restores it from their log records)."""
        cursor, consumed, version = self.validate_state(state)
        for e in self.entries:
            if e.dropped is not None:
                continue
            if e.seq < cursor:
                e.delivered = self.max_reuse
                self.live.pop(e.seq, None)
                e.meta = slim(e.meta)
            else:
                e.delivered = consumed.get(e.meta.group_id, 0)
                if e.delivered >= self.max_reuse:
                    self.live.pop(e.seq, None)
                    e.meta = slim(e.meta)
                else:
                    self.live[e.seq] = e
        self.version = version
        self.last_delivery.clear()
        self.trained_by_actor = Counter()
        for e in self.entries:
            if e.dropped is None and e.delivered:
                self.trained_by_actor[e.meta.actor_id] += e.delivered
        self.counters["rewinds"] += 1
        return [e for e in self.live.values() if is_slim(e.meta)]

    # ------------------------------------------------------------------ stats
    def depth_by_version(self) -> dict[int, int]:
        """min_version -> number of ready groups."""
        return dict(sorted(Counter(e.meta.min_version for e in self.ready()).items()))

    def stats(self) -> dict:
        c = self.counters
        return {
            "size": len(self.live),
            "ready": len(self.ready()),
            "capacity": self.capacity,
            "version": self.version,
            "accepted": self.accepted(),
            "in_flight": sum(self.in_flight.values()),
            "admission_limit": self.admission_limit(),
            "headroom": self.headroom(),
            "stored_total": c["stored"],
            "delivered_total": c["delivered"],
            "dropped_stale": c["dropped_stale"],
            "dropped_filtered": c["dropped_filtered"],
            "dropped_by_reason": {k[5:]: v for k, v in c.items() if k.startswith("drop:")},
            "depth_by_version": {str(k): v for k, v in self.depth_by_version().items()},
            "cursor": self.cursor(),
            "accepted_by_actor": dict(sorted(self.accepted_by_actor.items())),
            "trained_by_actor": dict(sorted(self.trained_by_actor.items())),
        }

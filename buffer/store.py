"""The durable table: every state change is a log record first, then a change of the Table.

Record types (body layouts):
  GROUP   u64 seq | u32 meta_len | GroupMeta msgpack | encoded TrajectoryGroup
  DELIVER msgpack {"req", "consumer", "gids", "version"}
  DROP    DropInfo msgpack
  REWIND  msgpack {"state": consumed_state}
  VERSION msgpack {"version"}

Replaying the records in order rebuilds the table exactly. Two-phase use (the server overlaps the
fsync of one batch with the CPU work of the next):

    store.ingest(items)            # write records, groups are "pending" (not ready, not acked)
    pending = store.take_pending() # what the next fsync covers
    store.log.sync()               # one fsync for the whole batch (may run in another thread)
    store.publish(pending)         # pending groups become ready; now acknowledge them

`commit()` does the last three at once. Nothing is acknowledged or delivered before its records
are durable, so a kill -9 at any point loses nothing that was acknowledged.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Optional

import msgspec

from archer_async.config import BufferConfig
from archer_async.staleness import initial_staleness
from archer_async.types import GroupHeader, Reward
from buffer.segment_log import LogCorruptError, SegmentLog
from buffer.table import DropInfo, Entry, GroupMeta, Table, is_slim

REC_GROUP, REC_DELIVER, REC_DROP, REC_REWIND, REC_VERSION = 1, 2, 3, 4, 5
RECORD_NAMES = {REC_GROUP: "group", REC_DELIVER: "deliver", REC_DROP: "drop",
                REC_REWIND: "rewind", REC_VERSION: "version"}
_GROUP_HDR = struct.Struct("<QI")
_ENC = msgspec.msgpack.Encoder()
_META_DEC = msgspec.msgpack.Decoder(GroupMeta)
_DROP_DEC = msgspec.msgpack.Decoder(DropInfo)
_MAP_DEC = msgspec.msgpack.Decoder(dict)


class _SampleView(msgspec.Struct):
    sample_id: str
    token_versions: list[int]
    reward: Reward


class _SampleCheck(msgspec.Struct):
    sample_id: str
    reward: Reward


class _GroupView(msgspec.Struct):
    """The fields of a TrajectoryGroup the buffer needs (the rest is skipped, not materialised)."""

    group_id: str
    prompt_index: int
    data_source: str
    prompt_ids: msgspec.Raw
    samples: list[_SampleView]
    actor_id: str = ""
    created_at: float = 0.0


class _GroupCheck(msgspec.Struct):
    """Structural check of a group whose index fields the producer sent (token lists skipped)."""

    group_id: str
    prompt_index: int
    data_source: str
    prompt_ids: msgspec.Raw
    samples: list[_SampleCheck]


_VIEW_DEC = msgspec.msgpack.Decoder(_GroupView)
_CHECK_DEC = msgspec.msgpack.Decoder(_GroupCheck)


def group_meta(payload) -> GroupMeta:
    """GroupMeta of an encoded TrajectoryGroup (the header derived from its bytes); ValueError when
    it is not a valid group."""
    try:
        g = _VIEW_DEC.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ValueError(f"not a TrajectoryGroup: {e}") from None
    if not g.group_id or not g.samples:
        raise ValueError("group without id or samples")
    return with_size(GroupHeader.of(g), len(payload))


def with_size(header: GroupHeader, nbytes: int) -> GroupMeta:
    """The GroupMeta of a group with this header whose encoding has `nbytes` bytes."""
    return GroupMeta(**msgspec.structs.asdict(header), nbytes=nbytes)


_GID_KEY = msgspec.msgpack.encode("group_id")


def check_group_prefix(payload, group_id: str) -> None:
    """Cheap structural check (no decode, O(len(group_id))): the payload is a msgpack map whose first
    entry is group_id == `group_id`, as encode_group writes it. ValueError if not."""
    mv = memoryview(payload)
    if len(mv) < 2:
        raise ValueError("not a TrajectoryGroup: payload too short")
    first = mv[0]
    skip = 1 if 0x80 <= first <= 0x8F else 3 if first == 0xDE else 5 if first == 0xDF else 0
    if not skip:
        raise ValueError("not a TrajectoryGroup: payload is not a msgpack map")
    want = _GID_KEY + msgspec.msgpack.encode(group_id)
    if mv[skip:skip + len(want)] != want:
        raise ValueError(f"payload does not start with group_id {group_id!r} of its header")


def meta_from_header(header: GroupHeader, payload, verify: bool = True) -> GroupMeta:
    """GroupMeta from the producer's put header (`GroupHeader.of` the group). verify: decode the payload
    and check it is a TrajectoryGroup with the same id, sample ids and rewards; otherwise only
    check_group_prefix (the producer is authenticated by the MAC). ValueError if not."""
    if not header.group_id or not header.sample_ids or len(header.sample_ids) != len(header.reward_statuses):
        raise ValueError("group header without id or samples")
    if not verify:
        check_group_prefix(payload, header.group_id)
    else:
        try:
            g = _CHECK_DEC.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ValueError(f"not a TrajectoryGroup: {e}") from None
        if (g.group_id != header.group_id or [s.sample_id for s in g.samples] != header.sample_ids
                or [s.reward.status for s in g.samples] != header.reward_statuses):
            raise ValueError(f"group {g.group_id!r} does not match its header")
    return with_size(header, len(payload))


def parse_group_record(body) -> tuple[int, GroupMeta, memoryview]:
    """(seq, meta, encoded group) of a GROUP record body."""
    body = memoryview(body)
    seq, mlen = _GROUP_HDR.unpack_from(body, 0)
    start = _GROUP_HDR.size
    meta = _META_DEC.decode(body[start:start + mlen])
    return seq, meta, body[start + mlen:]


def outcome_of(decision: str) -> str:
    """Ack status for a Table.classify decision."""
    if decision == "store":
        return "stored"
    if decision == "stale":
        return "dropped_stale"
    if decision.startswith("filtered:"):
        return "dropped_filtered"
    return decision


class BufferStore:
    """Table + SegmentLog. Single-threaded except for `log.sync` (see module docstring)."""

    def __init__(self, log_dir: str | Path, bcfg: BufferConfig, batch_groups: int,
                 restore_state: Optional[dict] = None, readonly: bool = False):
        self.cfg = bcfg
        self.table = Table(capacity=bcfg.capacity, max_staleness=initial_staleness(bcfg),
                           sampler=bcfg.sampler, max_reuse=bcfg.max_reuse,
                           filter_groups=bcfg.filter_groups, batch_groups=batch_groups,
                           seed=bcfg.sampler_seed, share_gap=bcfg.max_share_gap)
        self.log = SegmentLog(log_dir, bcfg.segment_bytes, bcfg.fsync, readonly=readonly,
                              direct=bcfg.fsync and bcfg.direct_io)
        self.record_counts = {name: 0 for name in RECORD_NAMES.values()}
        self._pending: list[Entry] = []
        self._unsynced = False
        for rtype, body, loc in self.log.replay():
            self._apply(rtype, body, loc)
        self._restore_meta([e for e in self.table.live.values() if is_slim(e.meta)])  # live after a rewind
        self.table.commit(self.table.entries)
        if restore_state is not None:
            self.rewind(restore_state)
            self.commit()

    # ------------------------------------------------------------------ replay
    def _apply(self, rtype: int, body: memoryview, loc) -> None:
        t = self.table
        name = RECORD_NAMES.get(rtype)
        if name is None:
            raise LogCorruptError(f"unknown record type {rtype} at segment {loc.segment} offset {loc.offset}")
        self.record_counts[name] += 1
        if rtype == REC_GROUP:
            seq, meta, _ = parse_group_record(body)
            if seq != t.next_seq:
                raise LogCorruptError(f"group record seq {seq}, expected {t.next_seq} (segment {loc.segment})")
            t.add_group(meta).loc = loc
        elif rtype == REC_DELIVER:
            d = _MAP_DEC.decode(body)
            t.version = d["version"]
            t.deliver(d["gids"], d["consumer"], d["req"])
        elif rtype == REC_DROP:
            info = _DROP_DEC.decode(body)
            if info.stage == "ingest":
                t.add_ingest_drop(info)
            else:
                t.drop_stored(t.by_id[info.group_id], info.reason)
        elif rtype == REC_REWIND:
            t.rewind(_MAP_DEC.decode(body)["state"])  # metas of groups live again: restored after the replay
        elif rtype == REC_VERSION:
            t.version = _MAP_DEC.decode(body)["version"]

    def _append(self, records: list) -> list:
        locs = self.log.append(records)
        self._unsynced = True
        for rtype, _ in records:
            self.record_counts[RECORD_NAMES[rtype]] += 1
        return locs

    def payload(self, e: Entry) -> bytes:
        """Encoded TrajectoryGroup of a stored entry, read back from its log record.

        Memory holds only the index: a payload is held until its record is written (by the log's
        queue), never as a second copy. That bounds the buffer's memory by its index whatever the
        groups weigh, and costs the ingest path less than keeping every received message alive
        (bench/results/buffer.md); a delivery reads B records back (checked against their XXH3)."""
        return bytes(self._group_record(e)[2])

    def _group_record(self, e: Entry) -> tuple[int, GroupMeta, memoryview]:
        """(seq, full meta, payload) of a stored entry, read from its log record."""
        rtype, body = self.log.read(e.loc)
        if rtype != REC_GROUP:
            raise LogCorruptError(f"record at {e.loc} is not a group")
        return parse_group_record(body)

    # ------------------------------------------------------------------ live operations
    def ingest(self, items: list[tuple[GroupMeta, bytes]]) -> list[str]:
        """Append groups [(meta, payload)]; returns one status each:
        stored / duplicate / dropped_stale / dropped_filtered / full. Stored groups are pending."""
        t = self.table
        decisions, records, seen = [], [], set()
        added = 0
        now = time.time()
        for meta, payload in items:
            if meta.group_id in seen:
                d = "duplicate"
            else:
                d = t.classify(meta)
                if d == "full" or (d == "store" and len(t.live) + added >= t.capacity):
                    d = "full"
            decisions.append(d)
            if d == "store":
                seen.add(meta.group_id)
                mb = _ENC.encode(meta)
                records.append((REC_GROUP, [_GROUP_HDR.pack(t.next_seq + added, len(mb)), mb, payload]))
                added += 1
            elif d not in ("duplicate", "full"):
                seen.add(meta.group_id)
                info = DropInfo(group_id=meta.group_id, reason=d, stage="ingest", version=t.version,
                                sample_ids=meta.sample_ids, actor_id=meta.actor_id,
                                prompt_index=meta.prompt_index, min_version=meta.min_version, at=now)
                records.append((REC_DROP, [_ENC.encode(info)]))
        locs = iter(self._append(records)) if records else iter(())
        out = []
        for (meta, payload), d in zip(items, decisions):
            if d == "store":
                e = t.add_group(meta)
                e.loc = next(locs)
                self._pending.append(e)
            elif d not in ("duplicate", "full"):
                next(locs)
                t.add_ingest_drop(DropInfo(group_id=meta.group_id, reason=d, stage="ingest", version=t.version))
            if d == "duplicate":
                t.counters["duplicates"] += 1
            elif d == "full":
                t.counters["full_rejections"] += 1
            out.append(outcome_of(d))
        return out

    def set_version(self, version: int) -> None:
        """The learner's current version (durable; used by staleness checks and admission)."""
        if version != self.table.version:
            self._append([(REC_VERSION, [_ENC.encode({"version": version})])])
            self.table.version = version

    def sample(self, n: int, version: int, consumer: str = "", request_id: str = ""
               ) -> Optional[tuple[list[Entry], list[bytes]]]:
        """Deliver n ready groups for training at `version`, dropping too-stale ones first.

        Returns (entries, payloads) or None when fewer than n are ready. A request id equal to the
        consumer's last delivered one returns that delivery again (the reply was lost)."""
        t = self.table
        last = t.last_delivery.get(consumer)
        if request_id and last and last[0] == request_id:
            entries = [t.by_id[g] for g in last[1]]
            return entries, [self.payload(e) for e in entries]
        self.set_version(version)
        stale = t.stale_ready(version)
        picks = t.pick(n, frozenset(e.seq for e in stale))
        now = time.time()
        records = [(REC_DROP, [_ENC.encode(DropInfo(
            group_id=e.meta.group_id, reason="stale", stage="sample", version=version, seq=e.seq,
            sample_ids=e.meta.sample_ids, actor_id=e.meta.actor_id, prompt_index=e.meta.prompt_index,
            min_version=e.meta.min_version, at=now))]) for e in stale]
        payloads = [self.payload(e) for e in picks] if picks else []
        gids = [e.meta.group_id for e in picks] if picks else []
        if picks:
            records.append((REC_DELIVER, [_ENC.encode(
                {"req": request_id, "consumer": consumer, "gids": gids, "version": version})]))
        if records:
            self._append(records)
        for e in stale:
            t.drop_stored(e, "stale")
        if not picks:
            return None
        return t.deliver(gids, consumer, request_id), payloads

    def rewind(self, state: dict) -> None:
        """Rewind to a learner checkpoint's consumed_state (validated before anything is written)."""
        self.table.validate_state(state)
        self._append([(REC_REWIND, [_ENC.encode({"state": state})])])
        self._restore_meta(self.table.rewind(state))

    def _restore_meta(self, entries: list[Entry]) -> None:
        """Full metas of groups that are live again (finished groups keep a slim one in memory)."""
        for e in entries:
            e.meta = self._group_record(e)[1]

    # ------------------------------------------------------------------ commit
    @property
    def unsynced(self) -> bool:
        return self._unsynced

    def take_pending(self) -> list[Entry]:
        """Entries the next log.sync() makes durable."""
        pending, self._pending = self._pending, []
        self._unsynced = False
        return pending

    def publish(self, pending: list[Entry]) -> None:
        """After log.sync(): pending groups become ready."""
        self.table.commit(pending)

    def commit(self) -> None:
        """One group commit: fsync everything written so far, then publish it."""
        pending = self.take_pending()
        self.log.sync()
        self.publish(pending)

    def stats(self) -> dict:
        s = self.table.stats()
        s["bytes_on_disk"] = self.log.bytes_on_disk()
        s["segments"] = len(self.log.segments())
        s["records"] = dict(self.record_counts)
        s["truncated_tail_bytes"] = self.log.tail.truncated_bytes if self.log.tail else 0
        return s

    def close(self) -> None:
        self.log.close()

"""Finished groups keep a slim meta in memory; a rewind (live or replayed) restores the full one."""

import time

from archer_async.config import BufferConfig
from buffer.store import BufferStore
from buffer.table import GroupMeta, is_slim


def _meta(k: int) -> GroupMeta:
    return GroupMeta(group_id=f"g{k}", min_version=0, max_version=0, actor_id="actor0", prompt_index=k,
                     sample_ids=[f"g{k}-{j}" for j in range(4)], reward_statuses=["pass", "fail"] * 2,
                     num_tokens=40, created_at=time.time(), nbytes=3)


def _store(tmp_path) -> BufferStore:
    return BufferStore(tmp_path / "log", BufferConfig(capacity=64, fsync=False, filter_groups=False), 2)


def test_consumed_groups_are_slim_and_a_rewind_restores_their_meta(tmp_path):
    st = _store(tmp_path)
    st.ingest([(_meta(k), b"\x80abc") for k in range(4)])
    st.commit()
    state = st.table.consumed_state()  # a checkpoint before anything was trained
    entries, _ = st.sample(2, 0, "learner", "r1")
    st.commit()
    assert [is_slim(e.meta) for e in st.table.entries] == [True, True, False, False]
    assert st.table.entries[0].meta.group_id == "g0" and st.table.entries[0].meta.min_version == 0
    st.rewind(state)
    st.commit()
    assert [e.meta.sample_ids for e in st.table.entries[:2]] == [[f"g{k}-{j}" for j in range(4)] for k in range(2)]
    st.close()
    reopened = _store(tmp_path)  # the replay of DELIVER then REWIND records ends in the same state
    assert not any(is_slim(e.meta) for e in reopened.table.entries)
    assert reopened.table.entries[1].meta.reward_statuses == ["pass", "fail"] * 2
    picked, payloads = reopened.sample(4, 0, "learner", "r2")
    assert [e.meta.group_id for e in picked] == ["g0", "g1", "g2", "g3"] and payloads[0] == b"\x80abc"
    reopened.close()

"""Wire types: what moves between actors, buffer and learner.

A `TrajectoryGroup` is the unit that moves: one prompt and its n sampled responses, scored.
Encoded with msgpack (msgspec) for ZMQ frames and the buffer's segment log. This module imports
neither torch, vllm nor ray (a test asserts it).

Producer / consumer of every field is given in its comment: A = actor, B = buffer, L = learner.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import msgspec

RewardStatus = Literal["pass", "fail", "timeout", "infra_error"]


STATUS_VALUE: dict[str, Optional[float]] = {"pass": 1.0, "fail": 0.0, "timeout": 0.0, "infra_error": None}
"""The reward value of each status: 1 for a pass, 0 for a fail or timeout, None (never trained on)
for an infrastructure error."""


def no_signal(statuses: Sequence[str]) -> Optional[str]:
    """Why a group whose samples have these reward statuses cannot train, or None when it can: "empty"
    (no samples), "infra_error" (a sample's grader broke: the group is dropped, never scored 0),
    "solve_none" (every reward 0), "solve_all" (every reward 1). All-equal rewards give every sample
    a zero GRPO advantage, so the group carries no learning signal. The one definition of the rule:
    the buffer's ingest filter and the learner's batch filter both use it."""
    if not statuses:
        return "empty"
    values = [STATUS_VALUE[s] for s in statuses]
    if any(v is None for v in values):
        return "infra_error"
    if all(v == values[0] for v in values):
        return "solve_all" if values[0] > 0 else "solve_none"
    return None


class Reward(msgspec.Struct, frozen=True):
    """Outcome of one verifiable reward. Producer: the reward pool (A). Consumer: L, dashboard."""

    status: RewardStatus
    """pass / fail / timeout (a fail by deadline) / infra_error (sandbox or grader broke)."""
    reason: str = ""
    """Short human-readable reason (first failing test, exception name, ...)."""

    @property
    def value(self) -> Optional[float]:
        """1.0 for pass, 0.0 for fail/timeout, None for infra_error (never trained on)."""
        return STATUS_VALUE[self.status]


class Sample(msgspec.Struct):
    """One response to the group's prompt."""

    sample_id: str
    """Globally unique id "<actor_id>-<seq>" (seq monotonic per actor, survives actor restarts
    through the run directory). Producer: A. Consumer: B (dedup, consumed-id set), L (exactly-once log)."""
    response_ids: list[int]
    """[T] generated token ids, T <= actors.max_response_length. Producer: A. Consumer: L."""
    behavior_logprobs: list[float]
    """[T] log mu(y_t): log-prob of each sampled token under the distribution the engine actually
    sampled from (after temperature, top-k and top-p: vLLM's processed log-probs), float32 nats.
    Producer: A. Consumer: L (IS weight)."""
    token_versions: list[int]
    """[T] learner weight version that produced each token (a response may span an update).
    Producer: A. Consumer: B (staleness admission), L (staleness metrics)."""
    finish_reason: str
    """"stop" (EOS or stop string) or "length" (hit max_response_length). Producer: A."""
    reward: Reward
    """Verifiable reward of this response. Producer: A's reward pool. Consumer: L."""
    response_text: str = ""
    """Decoded response (for logs and the dashboard). Producer: A."""
    gen_seconds: float = 0.0
    """Wall seconds from submission to completion of generation. Producer: A."""
    score_seconds: float = 0.0
    """Wall seconds spent grading. Producer: A."""

    @property
    def min_version(self) -> int:
        """Oldest weight version among this response's tokens (its staleness anchor)."""
        return min(self.token_versions) if self.token_versions else 0


class TrajectoryGroup(msgspec.Struct):
    """One prompt and its n scored samples. Producer: A. Consumer: B (stores), L (trains)."""

    group_id: str
    """Unique id "<actor_id>-g<seq>". Producer: A."""
    prompt_index: int
    """Dataset index of the prompt (`extra_info.index`). Producer: A. Consumer: L (data cursor, logs)."""
    data_source: str
    """verl `data_source` (dispatches the grader). Producer: A."""
    prompt_ids: list[int]
    """[P] prompt token ids after the chat template. Producer: A. Consumer: L."""
    samples: list[Sample]
    """n samples (actors.samples_per_prompt). Producer: A."""
    actor_id: str = ""
    """Producing actor. Producer: A. Consumer: dashboard, logs."""
    created_at: float = 0.0
    """Unix time the group was complete and scored. Producer: A."""

    @property
    def min_version(self) -> int:
        """Oldest weight version among all tokens of the group (the buffer's staleness test)."""
        return min((s.min_version for s in self.samples), default=0)

    @property
    def num_tokens(self) -> int:
        """Response tokens in the group."""
        return sum(len(s.response_ids) for s in self.samples)


class GroupHeader(msgspec.Struct, frozen=True):
    """What the buffer indexes about a group without decoding it: sent by the producer with each put
    (computed by `of`), checked and stored by the buffer beside the group's bytes.
    Producer: A (BufferClient). Consumer: B (admission, staleness, filtering, dedup, sampling)."""

    group_id: str
    """TrajectoryGroup.group_id."""
    min_version: int
    """Oldest weight version among the group's tokens (0 for a group without tokens)."""
    max_version: int
    """Newest weight version among the group's tokens."""
    actor_id: str
    """Producing actor."""
    prompt_index: int
    """Dataset index of the prompt."""
    sample_ids: list[str]
    """[n] sample ids, in order."""
    reward_statuses: list[RewardStatus]
    """[n] reward statuses, in sample order."""
    num_tokens: int
    """Response tokens in the group."""
    created_at: float
    """Unix time the group was complete and scored."""

    @classmethod
    def of(cls, group) -> "GroupHeader":
        """The header of a TrajectoryGroup (or of any decoded view with the same field names)."""
        tv = [s.token_versions for s in group.samples]  # a sample without tokens counts as version 0
        return cls(group_id=group.group_id, min_version=min((min(v) if v else 0 for v in tv), default=0),
                   max_version=max((max(v) if v else 0 for v in tv), default=0), actor_id=group.actor_id,
                   prompt_index=group.prompt_index, sample_ids=[s.sample_id for s in group.samples],
                   reward_statuses=[s.reward.status for s in group.samples],
                   num_tokens=sum(len(v) for v in tv), created_at=group.created_at)


_ENCODER = msgspec.msgpack.Encoder()
_GROUP_DECODER = msgspec.msgpack.Decoder(TrajectoryGroup)
_GROUPS_DECODER = msgspec.msgpack.Decoder(list[TrajectoryGroup])


def encode_group(group: TrajectoryGroup) -> bytes:
    """msgpack bytes of a group."""
    return _ENCODER.encode(group)


def decode_group(data: bytes) -> TrajectoryGroup:
    """Inverse of encode_group; raises msgspec.ValidationError / DecodeError on malformed bytes."""
    return _GROUP_DECODER.decode(data)


def join_groups(encoded: Sequence[bytes]) -> bytes:
    """A batch: one msgpack array of already encoded groups (the buffer's sample reply, what the
    learner passes to its ranks), built without decoding them."""
    return _ENCODER.encode([msgspec.Raw(b) for b in encoded])


def decode_groups(data) -> list[TrajectoryGroup]:
    """The groups of a `join_groups` batch (any bytes-like object)."""
    return _GROUPS_DECODER.decode(data)

"""Wire types: what moves between actors, buffer and learner.

A `TrajectoryGroup` is the unit that moves: one prompt and its n sampled responses, scored.
Encoded with msgpack (msgspec) for ZMQ frames and the buffer's segment log. This module imports
neither torch, vllm nor ray (a test asserts it).

Producer / consumer of every field is given in its comment: A = actor, B = buffer, L = learner.
"""

from __future__ import annotations

from typing import Literal, Optional

import msgspec

RewardStatus = Literal["pass", "fail", "timeout", "infra_error"]


class Reward(msgspec.Struct, frozen=True):
    """Outcome of one verifiable reward. Producer: the reward pool (A). Consumer: L, dashboard."""

    status: RewardStatus
    """pass / fail / timeout (a fail by deadline) / infra_error (sandbox or grader broke)."""
    reason: str = ""
    """Short human-readable reason (first failing test, exception name, ...)."""

    @property
    def value(self) -> Optional[float]:
        """1.0 for pass, 0.0 for fail/timeout, None for infra_error (never trained on)."""
        if self.status == "infra_error":
            return None
        return 1.0 if self.status == "pass" else 0.0


class Sample(msgspec.Struct):
    """One response to the group's prompt."""

    sample_id: str
    """Globally unique id "<actor_id>-<seq>" (seq monotonic per actor, survives actor restarts
    through the run directory). Producer: A. Consumer: B (dedup, consumed-id set), L (exactly-once log)."""
    response_ids: list[int]
    """[T] generated token ids, T <= actors.max_response_length. Producer: A. Consumer: L."""
    behavior_logprobs: list[float]
    """[T] log mu(y_t): log-prob of each sampled token under the distribution the engine actually
    sampled from (temperature-scaled, before top-p), float32 nats. Producer: A. Consumer: L (IS weight)."""
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


_ENCODER = msgspec.msgpack.Encoder()
_GROUP_DECODER = msgspec.msgpack.Decoder(TrajectoryGroup)


def encode_group(group: TrajectoryGroup) -> bytes:
    """msgpack bytes of a group."""
    return _ENCODER.encode(group)


def decode_group(data: bytes) -> TrajectoryGroup:
    """Inverse of encode_group; raises msgspec.ValidationError / DecodeError on malformed bytes."""
    return _GROUP_DECODER.decode(data)

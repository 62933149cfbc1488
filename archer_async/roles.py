"""The role contract: what the launcher may ask of each role, and where each role's code lives.

A role is a plain Python class in its own package (the buffer, a learner rank, a rollout actor); none
of them knows about Ray. The launcher never imports a role package: it builds roles by the module
path named here (`RoleSpec.target`), in a Ray worker process (`launch.roles.RoleHost`) or, for a
one-process command such as `archer-async eval`, in its own process (`construct`). The remote methods
it may call are the methods of the role's protocol below; calling anything else is an AttributeError
at the call site (`launch.roles.RoleHandle`), and a test checks that every role class implements its
protocol with the same parameters.

This module imports neither torch, vllm nor ray.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol


class BufferRole(Protocol):
    """The replay buffer's service (`buffer.service.BufferService`): it serves the ZMQ protocol of
    `archer_async.wire` on its own threads; the launcher only reads its metrics and counters and stops it."""

    def endpoints(self) -> dict:
        """{"ingest": url, "control": url, ...}: where producers and consumers connect."""

    def secret(self) -> bytes:
        """The run's secret, which every message to the buffer is authenticated with."""

    def metrics(self) -> dict:
        """Buffer metrics of the current step (`buffer/*` names, see docs/architecture.md)."""

    def stats(self) -> dict:
        """The buffer's own counters (`stored_total`, `dropped_filtered`, `dropped_stale`,
        `dropped_by_reason`, ...): what the no-progress watchdog reads."""

    def set_version(self, version: int) -> None:
        """Sync mode: the learner version the actors now serve (admission follows it)."""

    def set_max_staleness(self, max_staleness: int) -> None:
        """buffer.max_staleness auto: the new staleness bound eta (admission and staleness follow it)."""

    def stop(self, timeout_s: float = 60.0) -> None:
        """Commit what the buffer holds and stop serving."""


class LearnerRole(Protocol):
    """One FSDP2 learner rank (`learner.trainer.Learner`). Every method but `stop_waiting` is collective:
    the launcher calls it on every rank in the same order."""

    def step_from_buffer(self, poll_s: float = 10.0) -> dict:
        """One training step on a batch sampled from the buffer; the step's metrics (same on every rank),
        or {"waiting_stopped": True} on every rank when `stop_waiting` ended its wait for data."""

    def stop_waiting(self, step: int) -> None:
        """Rank 0, from another thread: if training step `step` is still waiting for data, end it
        without training (nothing sampled); the launcher re-places actors, then calls the step again."""

    def broadcast_weights(self, version: Optional[int] = None, sender_init: Any = None) -> dict:
        """Send the current weights to the actors as `version`: {"ok", "version", "seconds", "error"}."""

    def save_checkpoint(self, step: Optional[int] = None, extra_state: Optional[dict] = None) -> Path:
        """Commit model, optimizer, RNG, version and `extra_state` as checkpoints/step-N."""

    def load_checkpoint(self, path: Optional[str] = None) -> Optional[dict]:
        """Restore a checkpoint (default: `latest`); its extra_state."""

    def export_hf(self, step: Optional[int] = None) -> Path:
        """Write hf/step-N (Hugging Face format)."""

    def close(self) -> None:
        """Close the weight sender and leave the process group."""


class ActorRole(Protocol):
    """One rollout actor (`actors.rollout.RolloutActor`): an inference engine and its rollout loop."""

    def start(self) -> None:
        """Begin continuous generation within the buffer's admission."""

    def update_weights(self, version: int, timeout_s: Optional[float] = None, mode: Optional[str] = None) -> dict:
        """Receive and load weight `version` while generating (in flight)."""

    def evaluate_rewards(self, rows: list[dict], k: int, **sampling) -> list[list[Optional[float]]]:
        """k graded samples per row with the current weights: per row, k rewards (1.0 / 0.0 / None)."""

    def stats(self) -> dict:
        """Counters and rates for the step's metrics and the health check."""

    def metric_rows(self, since: int = 0) -> dict:
        """Its actor metrics rows from row `since` on: {"next", "rows"} (the driver copies them into its
        own run directory when the actor writes on another node)."""

    def data_state(self) -> dict:
        """The resumable data cursor (checkpointed by the launcher)."""

    def load_data_state(self, state: dict) -> None:
        """Restore a data cursor (before start)."""

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop generating and shut the engine down."""


@dataclass(frozen=True)
class RoleSpec:
    """A role: its protocol and the `module:Class` that implements it."""

    name: str
    protocol: type
    target: str

    @property
    def methods(self) -> frozenset[str]:
        """Names of the remote methods of this role's protocol."""
        return frozenset(n for n, f in vars(self.protocol).items() if inspect.isfunction(f) and not n.startswith("_"))


BUFFER = RoleSpec("buffer", BufferRole, "buffer.service:BufferService")
LEARNER = RoleSpec("learner", LearnerRole, "learner.trainer:Learner")
ACTOR = RoleSpec("actor", ActorRole, "actors.rollout:RolloutActor")
ROLES = (BUFFER, LEARNER, ACTOR)

COMMANDS = {
    "buffer-inspect": "buffer.inspect:inspect_main",
}
"""CLI commands implemented inside a role package (`module:function(args)`), run by `launch.cli`."""


def load(target: str) -> Any:
    """The object a `module:name` target names (imported on first use)."""
    mod_name, attr = target.split(":")
    return getattr(importlib.import_module(mod_name), attr)


def construct(role: RoleSpec, *args, **kwargs) -> Any:
    """Build `role` in this process (the object implements `role.protocol`)."""
    return load(role.target)(*args, **kwargs)

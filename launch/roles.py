"""Placing roles on a Ray cluster.

A role is a plain Python class in its package (`buffer.service:BufferService`, `learner.trainer:Learner`,
`actors.rollout:RolloutActor`); none of them knows about Ray. `RoleHost` is the one Ray actor class: it
imports the role by module path inside its worker process, sends that process's output to
RUN_DIR/logs/<role>.log, and forwards method calls. Placement comes from the resources each role
declares in the config (CPUs, GPUs, a node label).
"""

from __future__ import annotations

import importlib
import os
import socket
import time
from typing import Any, Optional

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError


class StartupError(RuntimeError):
    """A role failed to start or to answer within its deadline; the message names role and node."""


class RoleHost:
    """Hosts one role object in a Ray worker process (constructed by `construct`, after placement,
    so that addresses of placed processes can be handed to constructors)."""

    def __init__(self, role: str, run_dir: str, env: dict[str, str]):
        os.environ.update(env)
        from archer_async.runlog import setup_role_logging

        setup_role_logging(run_dir, role)
        self.role = role
        self.obj = None

    def construct(self, target: str, args: tuple = (), kwargs: Optional[dict] = None) -> str:
        """Import `module:Class` and build the role object; returns the node description."""
        mod_name, cls_name = target.split(":")
        cls = getattr(importlib.import_module(mod_name), cls_name)
        self.obj = cls(*args, **(kwargs or {}))
        return self.node()

    def node(self) -> str:
        return f"{socket.gethostname()} ({ray.util.get_node_ip_address()}, node {ray.get_runtime_context().get_node_id()[:8]})"

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        """A TCP port free on this role's node (for rendezvous hosted here)."""
        with socket.socket() as s:
            s.bind((ray.util.get_node_ip_address(), 0))
            return s.getsockname()[1]

    def call(self, method: str, *args, **kwargs) -> Any:
        return getattr(self.obj, method)(*args, **kwargs)

    def pid(self) -> int:
        return os.getpid()


def place(role: str, run_dir: str, *, num_cpus: float, num_gpus: float = 0.0, node_label: Optional[str] = None,
          env: Optional[dict] = None, max_concurrency: int = 8):
    """Start an (empty) host for role `role` on a node that has the declared resources."""
    resources = {node_label: 0.001} if node_label else None
    host_cls = ray.remote(RoleHost)
    return host_cls.options(
        num_cpus=num_cpus, num_gpus=num_gpus, resources=resources, max_concurrency=max_concurrency, max_restarts=0,
    ).remote(role, run_dir, dict(env or {}))


def wait(refs, timeout_s: float, what: str, roles: Optional[list[str]] = None):
    """ray.get with a deadline; errors name the role(s) and what they were doing."""
    who = ", ".join(roles) if roles else what
    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError:
        raise StartupError(f"{who}: no answer to {what} within {timeout_s:.0f} s (see the run's logs/ directory)") from None
    except RayActorError as e:
        raise StartupError(f"{who}: the process died during {what}: {e}") from None
    except RayTaskError as e:
        cause = getattr(e, "cause", None) or e
        raise StartupError(f"{who}: {what} failed: {type(cause).__name__}: {cause}") from None


def construct_all(hosts: dict[str, Any], specs: dict[str, tuple], timeout_s: float) -> dict[str, str]:
    """Construct every role concurrently (collective set-up needs all ranks at once) within a deadline;
    returns role -> node description. specs: role -> (target, args)."""
    refs = {role: hosts[role].construct.remote(*specs[role]) for role in specs}  # (target, args[, kwargs])
    t0 = time.time()
    out = {}
    for role, ref in refs.items():
        left = max(1.0, timeout_s - (time.time() - t0))
        out[role] = wait(ref, left, "start-up", [role])
    return out

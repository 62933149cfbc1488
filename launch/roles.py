"""Placing roles on a Ray cluster and calling them.

A role is a plain Python class in its package, named with its protocol in the role contract
(`archer_async.roles`); none of them knows about Ray. `RoleHost` is the one Ray actor class: it builds
the role by module path inside its worker process, sends that process's output to
RUN_DIR/logs/<role>.log on its own node, and forwards method calls.

Every role writes under the run directory's path on its own node (no filesystem is shared between
nodes): the learner its checkpoints and HF exports, the buffer its log, each actor its id counter and
metrics, every role its log. `ARCHER_ASYNC_NODE_ROOT` in a node's environment (given to `ray start`
or to a simulated node, `ray.cluster_utils.Cluster.add_node(env_vars=...)`) puts that node's view of
the run directory under a root of its own (`node_run_dir`): the way a test on one host simulates
nodes with separate disks. `RoleHandle` is how the launcher calls a role: only
the methods of the role's protocol exist on it. Placement comes from the resources each role declares
in the config (CPUs, GPUs, a node label).

Failures are typed (`RoleError` and its kinds): a role whose process is gone raises `RoleDied`, one
whose method raised `RoleCallFailed`, one that did not answer in time `RoleTimeout`, and a role that
could not be placed or built `StartupError`. Every message names the role and what it was doing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from typing import Any, Callable, Optional

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from archer_async.fsio import disk_full
from archer_async.roles import RoleSpec


class RoleError(RuntimeError):
    """A role failed; the message names the role (and node) and what it was doing."""


class RoleDied(RoleError):
    """The role's process is gone (killed or crashed)."""


class RoleCallFailed(RoleError):
    """A role's method raised; the message quotes the exception."""


class RoleTimeout(RoleError):
    """A role did not answer within its deadline."""


class StartupError(RoleError):
    """A role could not be placed or built (no node with its resources, or its constructor failed)."""


class RoleHandle:
    """The launcher's side of one placed role: `handle.method(*args)` returns a Ray object reference
    of `method` running in the role's process, for the methods of the role's protocol only.

        actor = RoleHandle(host, ACTOR)
        ref = actor.update_weights(3)          # -> ray.ObjectRef
        actor.updte_weights(3)                 # AttributeError: not in ActorRole
    """

    def __init__(self, host, spec: RoleSpec):
        self.host = host
        self.spec = spec

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_") or name not in self.spec.methods:
            raise AttributeError(f"{self.spec.protocol.__name__} has no remote method {name!r}")
        return lambda *args, **kwargs: self.host.call.remote(name, *args, **kwargs)


NODE_ROOT_ENV = "ARCHER_ASYNC_NODE_ROOT"
"""A node's environment variable: the root under which that node's roles see the run directory
(unset: the run directory's own path). Simulates separate disks in tests on one host."""


def node_run_dir(run_dir: str, environ: Optional[dict] = None) -> str:
    """This node's view of the run directory `run_dir` (an absolute path): `run_dir` itself, or
    `$ARCHER_ASYNC_NODE_ROOT/<run_dir without its leading />` where that variable is set."""
    root = (os.environ if environ is None else environ).get(NODE_ROOT_ENV, "")
    if not root:
        return run_dir
    return os.path.join(root, os.path.abspath(run_dir).lstrip(os.sep))


class RoleHost:
    """Hosts one role object in a Ray worker process (constructed by `construct`, after placement,
    so that addresses of placed processes can be handed to constructors).

    `run_dir` is the driver's run directory; the role works in this node's view of it (`node_run_dir`):
    a constructor argument equal to `run_dir` is replaced by that path."""

    def __init__(self, role: str, run_dir: str, env: dict[str, str]):
        os.environ.update(env)
        from launch.runlog import setup_role_logging

        self.driver_run_dir = run_dir
        self.run_dir = node_run_dir(run_dir)
        setup_role_logging(self.run_dir, role)
        self.role = role
        self.obj = None

    def construct(self, target: str, args: tuple = (), kwargs: Optional[dict] = None) -> str:
        """Build the role object of `module:Class` (a `RoleSpec.target`); returns the node description."""
        from archer_async.roles import load

        args = tuple(self._local(a) for a in args)
        kwargs = {k: self._local(v) for k, v in (kwargs or {}).items()}
        self.obj = load(target)(*args, **kwargs)
        return self.node()

    def _local(self, value: Any) -> Any:
        return self.run_dir if isinstance(value, str) and value == self.driver_run_dir else value

    def inspect(self, target: str) -> Any:
        """`module:function(run_dir)` on this node's view of the run directory (e.g. reading the
        checkpoint a resume starts from on the learner's node); its result."""
        from archer_async.roles import load

        return load(target)(self.run_dir)

    def where(self) -> dict:
        """{"node_id", "ip", "run_dir"}: this role's Ray node and its view of the run directory."""
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "run_dir": self.run_dir}

    def node(self) -> str:
        return f"{socket.gethostname()} ({ray.util.get_node_ip_address()}, node {ray.get_runtime_context().get_node_id()[:8]})"

    def gpu_ids(self) -> list[str]:
        """Identities of the GPUs Ray gave this role ([] for none): UUIDs where `nvidia-smi` names them,
        else "<node id>/gpu<index>" (`launch.colocation` compares them)."""
        ids = [str(i) for i in ray.get_gpu_ids()]
        if not ids:
            return []
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            smi = ""
        return device_identities(ids, ray.get_runtime_context().get_node_id(), smi)

    def free_port(self) -> int:
        """A TCP port free on this role's node (for rendezvous hosted here)."""
        with socket.socket() as s:
            s.bind((ray.util.get_node_ip_address(), 0))
            return s.getsockname()[1]

    def call(self, method: str, *args, **kwargs) -> Any:
        return getattr(self.obj, method)(*args, **kwargs)

    def pid(self) -> int:
        return os.getpid()


def device_identities(ids: list[str], node_id: str, nvidia_smi_csv: str = "") -> list[str]:
    """Globally unique identities of the GPUs `ids` (Ray's GPU ids on node `node_id`): the UUID that
    `nvidia-smi --query-gpu=index,uuid --format=csv,noheader` gives for an index, an id that already is
    a UUID ("GPU-..." / "MIG-...") as it is, else "<node_id>/gpu<id>"."""
    uuid_of = {}
    for line in nvidia_smi_csv.splitlines():
        index, _, uuid = (x.strip() for x in line.partition(","))
        if index and uuid:
            uuid_of[index] = uuid
    return [i if i.startswith(("GPU-", "MIG-")) else uuid_of.get(i, f"{node_id}/gpu{i}") for i in ids]


def role_process_env(env: Optional[dict], num_gpus: float) -> dict[str, str]:
    """The environment a role's process gets: `env`, and no visible GPU for a role that declares none
    (Ray leaves CUDA_VISIBLE_DEVICES alone for num_gpus=0, so such a role would otherwise see, and
    create CUDA contexts on, every GPU of its node unaccounted)."""
    out = dict(env or {})
    if not num_gpus:
        out["CUDA_VISIBLE_DEVICES"] = ""
    return out


def place(role: str, run_dir: str, *, num_cpus: float, num_gpus: float = 0.0, node_label: Optional[str] = None,
          env: Optional[dict] = None, max_concurrency: int = 8):
    """Start an (empty) host for role `role` on a node that has the declared resources (a role with
    num_gpus=0 sees no GPU: CUDA_VISIBLE_DEVICES="")."""
    resources = {node_label: 0.001} if node_label else None
    host_cls = ray.remote(RoleHost)
    return host_cls.options(
        num_cpus=num_cpus, num_gpus=num_gpus, resources=resources, max_concurrency=max_concurrency, max_restarts=0,
    ).remote(role, run_dir, role_process_env(env, num_gpus))


def wait(refs, timeout_s: float, what: str, roles: Optional[list[str]] = None, watch: Optional[dict] = None,
         check: Optional[Callable[[], None]] = None, check_every_s: float = 15.0):
    """ray.get with a deadline; errors name the role(s) and what they were doing.

    Fails fast: a reference that errors (its process died, its method raised) stops the wait at once,
    without waiting for the others. `watch` ({role: host}): roles whose death must also stop the wait
    (e.g. the buffer while the learner waits for data); checked every few seconds. `check`: called
    every `check_every_s` while waiting; it raises (a RoleError) to stop a wait that cannot succeed.
    """
    single = not isinstance(refs, (list, tuple))
    lst = [refs] if single else list(refs)
    names = roles if roles and len(roles) == len(lst) else [", ".join(roles) if roles else what] * len(lst)
    start = time.time()
    pending = {ref: names[i] for i, ref in enumerate(lst)}
    next_check = start + _WATCH_EVERY_S
    next_call = start + check_every_s
    while pending:
        left = timeout_s - (time.time() - start)
        if left <= 0:
            who = ", ".join(dict.fromkeys(pending.values()))
            raise RoleTimeout(f"{who}: no answer to {what} within {timeout_s:.0f} s (see the run's logs/ directory)")
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=min(1.0, left))
        for ref in ready:
            _get(ref, what, pending.pop(ref))
        if watch and pending and time.time() >= next_check:
            dead = dead_roles(watch)
            if dead:
                raise RoleDied(f"{', '.join(dead)}: the process died during {what} (killed or crashed; "
                               "see the run's logs/ directory)")
            next_check = time.time() + _WATCH_EVERY_S
        if check is not None and pending and time.time() >= next_call:
            check()
            next_call = time.time() + check_every_s
    out = [_get(ref, what, names[i]) for i, ref in enumerate(lst)]
    return out[0] if single else out


_WATCH_EVERY_S = 3.0


def _get(ref, what: str, who: str):
    try:
        return ray.get(ref)
    except RayActorError as e:
        raise RoleDied(f"{who}: the process died during {what}: {e}") from None
    except RayTaskError as e:
        cause = getattr(e, "cause", None) or e
        full = disk_full(cause)
        if full:  # one line naming the file, whichever role's call ran into it
            raise RoleCallFailed(f"{who}: {full}") from None
        raise RoleCallFailed(f"{who}: {what} failed: {type(cause).__name__}: {cause}") from None


def dead_roles(hosts: dict, timeout_s: float = 10.0) -> list[str]:
    """Roles (of {role: host}) whose process is gone: a ping fails with RayActorError. A slow answer
    is not death (a busy role still answers `pid` on another thread)."""
    refs = {role: h.pid.remote() for role, h in hosts.items()}
    ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    dead = []
    for role, ref in refs.items():
        try:
            ray.get(ref, timeout=0.01)
        except RayActorError:
            dead.append(role)
        except (GetTimeoutError, RayTaskError):
            pass
    return dead


def await_placement(hosts: dict[str, Any], timeout_s: float) -> dict[str, str]:
    """Wait until every role of {role: host} is placed; role -> node description. A role no node can
    host within timeout_s is a StartupError naming it."""
    roles = list(hosts)
    node_refs = [hosts[role].node.remote() for role in roles]
    ready, _ = ray.wait(node_refs, num_returns=len(node_refs), timeout=max(1.0, timeout_s))
    unplaced = [role for role, ref in zip(roles, node_refs) if ref not in ready]
    if unplaced:
        raise StartupError(f"{', '.join(unplaced)}: not placed within {timeout_s:.0f} s: no node of the Ray cluster "
                           "has the free resources the role declares (CPUs, GPUs, node label) or its process "
                           "did not start (see the run's logs/ directory)")
    return dict(zip(roles, wait(node_refs, 60, "placement", roles)))


def construct_all(hosts: dict[str, Any], specs: dict[str, tuple], timeout_s: float) -> dict[str, str]:
    """Construct every role concurrently (collective set-up needs all ranks at once) within a deadline;
    returns role -> node description. specs: role name -> (RoleSpec, args[, kwargs]).

    Placement is awaited first, so a role no node can host fails as "not placed", and a role that
    fails or hangs while constructing is named with its node ("learner1 on host (ip, node id)").
    The first failure ends the wait (fail fast)."""
    t0 = time.time()
    roles = list(specs)
    nodes = await_placement({role: hosts[role] for role in roles}, timeout_s)
    refs = [hosts[role].construct.remote(specs[role][0].target, *specs[role][1:]) for role in roles]
    left = max(1.0, timeout_s - (time.time() - t0))
    try:
        wait(refs, left, "start-up", [f"{role} on {nodes[role]}" for role in roles])
    except (RoleCallFailed, RoleTimeout) as e:
        raise StartupError(str(e)) from None
    return nodes

"""Which data plane a run's weight transfer uses, decided from the GPUs its roles were placed on.

The transfer group is learner rank 0 (the sender) plus one receiver per actor. NCCL refuses two ranks
of one communicator on one physical GPU ("Duplicate GPU detected"), which is exactly what a
co-located run (`launch/configs/single_gpu.yaml`: learner and actor on halves of one GPU) would build.
So the launcher asks every member for the identity (UUID) of the GPUs it sees and:

- `sync.backend: auto`: nccl when every member has its own GPU(s); host memory (the gloo data plane:
  the learner packs each bucket into host memory, the actor loads it into its engine) when any two
  members share a GPU or any member has none;
- `sync.backend: nccl` with two members on one GPU: a configuration error naming both roles and the GPU;
- `sync.backend: gloo`: always gloo.

Device identities are strings: the GPU's UUID ("GPU-8c1e...") when the node can tell it, otherwise
"<node id>/gpu<index>" (still unique within the cluster). See `launch.roles.RoleHost.gpu_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence


@dataclass(frozen=True)
class BackendChoice:
    """The data plane of the weight transfer and why it was chosen."""

    backend: str
    """"nccl" or "gloo" (host memory)."""
    reason: str
    """One line for the driver log."""


class ColocationError(ValueError):
    """An explicit nccl backend on a transfer group with two members on one GPU."""


def shared_devices(devices: Mapping[str, Sequence[str]]) -> list[tuple[str, str, str]]:
    """(role a, role b, device) for every pair of roles (in the mapping's order) that see one same device."""
    out, owner = [], {}
    for role, devs in devices.items():
        for d in dict.fromkeys(devs):
            if d in owner and owner[d] != role:
                out.append((owner[d], role, d))
            else:
                owner.setdefault(d, role)
    return out


def choose_backend(requested: str, devices: Mapping[str, Sequence[str]]) -> BackendChoice:
    """The transfer backend for `requested` ("auto" | "nccl" | "gloo") given each transfer-group member's
    GPU identities (`devices`: role name -> list of device ids; an empty list: the role has no GPU).

    Raises ColocationError for an explicit "nccl" when two members share a GPU (naming both) or a member
    has no GPU (naming it)."""
    if requested not in ("auto", "nccl", "gloo"):
        raise ValueError(f"sync.backend must be auto, nccl or gloo, got {requested!r}")
    if requested == "gloo":
        return BackendChoice("gloo", "sync.backend: gloo")
    shared = shared_devices(devices)
    gpuless = [role for role, devs in devices.items() if not devs]
    if requested == "nccl":
        if shared:
            a, b, d = shared[0]
            raise ColocationError(
                f"sync.backend: nccl, but {a} and {b} share GPU {d} (NCCL refuses two ranks of one communicator "
                "on one GPU); use sync.backend: auto (weights through host memory) or give each its own GPU")
        if gpuless:
            raise ColocationError(f"sync.backend: nccl, but {', '.join(gpuless)} has no GPU "
                                  "(learner.gpus_per_rank / actors.gpus_per_actor); use sync.backend: auto or gloo")
        return BackendChoice("nccl", "sync.backend: nccl")
    if gpuless:
        return BackendChoice("gloo", f"auto: {', '.join(gpuless)} without GPU: weights through host memory (gloo)")
    if shared:
        pairs = "; ".join(f"{a} and {b} on {d}" for a, b, d in shared)
        return BackendChoice("gloo", f"auto: co-located roles ({pairs}): weights through host memory (gloo)")
    return BackendChoice("nccl", "auto: every transfer-group member has its own GPU: nccl")

"""Where the roles of a run are and where they write, for a cluster whose nodes share no filesystem.

Each role writes under the run directory's path on its own node (`launch.roles.node_run_dir`); the
driver learns every role's node and directory after placement (`RoleHost.where`) and from them:

    buffer_bind_host     the address the buffer binds (buffer.host auto: loopback only when every role is
                         on the buffer's node)
    write_nodes_file     RUN_DIR/nodes.json on the driver, and which files are on another node
    copy_actor_rows      actors' metrics rows from other nodes into the driver's actor_metrics.jsonl
    resume_state_on_nodes  on resume: the checkpoint read on learner rank 0's node and the buffer log
                         checked on the buffer's node, not in the driver's run directory
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Collection

from archer_async.config import Config, UserError
from archer_async.fsio import atomic_write_text
from launch.roles import RoleError, wait

log = logging.getLogger("launch")


def buffer_bind_host(host: str, where: dict) -> str:
    """The address the buffer binds (buffer.host): as configured, or for auto 127.0.0.1 when every role
    is on the buffer's node (`where`: role -> {"node_id", "ip", ...}), else the buffer node's IP."""
    if host != "auto":
        return host
    node = where["buffer"]["node_id"]
    return "127.0.0.1" if all(w["node_id"] == node for w in where.values()) else where["buffer"]["ip"]


def driver_view(run_dir: Path) -> tuple[str, str]:
    """(Ray node id, run directory) of the driver, compared with each role's `where`."""
    import ray

    return ray.get_runtime_context().get_node_id(), str(run_dir)


def _away(w: dict, here: tuple) -> bool:
    return (w.get("node_id"), w.get("run_dir")) != tuple(here)


def write_nodes_file(run_dir: Path, where: dict, here: tuple) -> list[str]:
    """Write RUN_DIR/nodes.json ({role: {"node_id", "ip", "run_dir"}}); the console lines naming where
    the checkpoints and HF exports (learner rank 0's node) and the buffer log are when that is not the
    driver's run directory."""
    atomic_write_text(run_dir / "nodes.json", json.dumps(where, indent=1, sort_keys=True))
    lines = []
    for role, what in (("learner0", "checkpoints and HF exports"), ("buffer", "the buffer log")):
        w = where.get(role)
        if w and _away(w, here):
            lines.append(f"{what}: {w['run_dir']} on node {w['ip']} ({w['node_id'][:8]}), not on the driver's node")
    return lines


def copy_actor_rows(actors: list, live: Collection[int], where: dict, here: tuple, next_row: dict[int, int],
                    run_dir: Path) -> None:
    """Append the new metrics rows of every live actor that writes on another node (or another view of
    the run directory) to the driver's actor_metrics.jsonl, which the dashboard reads; `next_row`
    (actor -> its next row) is updated."""
    from archer_async.metrics import append_actor_metrics

    refs = {i: actors[i].metric_rows(next_row.get(i, 0)) for i in live if _away(where.get(f"actor{i}", {}), here)}
    for i, ref in refs.items():
        try:
            got = wait(ref, 30, "actor metrics", [f"actor{i}"])
        except RoleError as e:
            log.warning("actor metrics: %s", e)
            continue
        for row in got["rows"]:
            append_actor_metrics(run_dir, row)
        next_row[i] = int(got["next"])


def resume_state_on_nodes(hosts: dict, where: dict, cfg: Config, pre, say: Callable[[str], None]) -> bool:
    """Resume on a cluster without a shared disk: read the latest checkpoint on learner rank 0's node and
    check the buffer log on the buffer's node (a problem is a UserError, as in preflight), filling
    pre.checkpoint and pre.restore; False when the run is already complete (nothing more starts)."""
    got, blog = wait([hosts["learner0"].inspect.remote("launch.cluster:resume_state_on_node"),
                      hosts["buffer"].inspect.remote("launch.cluster:buffer_log_on_node")],
                     600, "resume checks", ["learner0", "buffer"])
    if "error" in got:
        raise UserError(f"{got['error']} (learner rank 0's node {where['learner0']['ip']})")
    if blog["problem"]:
        raise UserError(f"{blog['problem']} (the buffer's node {where['buffer']['ip']})")
    if (got["state"].get("extra_state") or {}).get("buffer") and not blog["has_log"]:
        raise UserError(f"{where['buffer']['run_dir']}/buffer/log: not on the node the buffer was placed on "
                        f"({where['buffer']['ip']}); the buffer must run where its log is (buffer.node_label)")
    pre.checkpoint, pre.restore = Path(got["checkpoint"]), got["state"]
    step, total = int(pre.restore["step"]), cfg.learner.total_steps
    if step >= total and got["exported"]:
        say(f"the run is complete: step {step} of learner.total_steps={total}, exported to "
            f"{Path(got['checkpoint']).parent.parent / 'hf' / f'step-{step}'} on learner rank 0's node; "
            f"`archer-async resume {cfg.run_dir} learner.total_steps=N` trains on to step N")
        return False
    return True

"""The same run on a simulated 3-node Ray cluster (ray.cluster_utils.Cluster): buffer, learner ranks and
actors pinned to different nodes by node labels (custom resources), the driver joining with
launch.ray_address. The driver log's "<role> on host (ip, node <id>)" lines say where each role ran.

No filesystem is shared: each simulated node sees the run directory under a root of its own
(ARCHER_ASYNC_NODE_ROOT in the node's environment, launch.roles.node_run_dir), the driver its own run
directory, so a role that read a file another node wrote would fail the run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from launch.roles import NODE_ROOT_ENV, node_run_dir
from tests.helpers.launch import CliRun, kill_tagged, new_tag, read_jsonl, role_nodes, run_env, wait_no_tagged

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

STEPS = 3
STORE = 100 * 1024 * 1024  # object store per node (the roles pass little through it)


def test_three_node_cluster_without_shared_disk_places_roles_by_label_and_trains(tmp_path):
    from ray.cluster_utils import Cluster

    tag = new_tag("multinode")
    saved = os.environ.get("ARCHER_TEST_TAG")
    os.environ["ARCHER_TEST_TAG"] = tag  # the cluster's processes carry the tag too (orphan check)
    cluster = None
    try:
        roots = {name: tmp_path / f"disk-{name}" for name in ("buffer", "learner", "actor")}
        for root in roots.values():
            root.mkdir()
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "resources": {"buffer_node": 1}, "object_store_memory": STORE,
            "include_dashboard": False, "env_vars": {NODE_ROOT_ENV: str(roots["buffer"])}})
        learner_node = cluster.add_node(num_cpus=2, resources={"learner_node": 4}, object_store_memory=STORE,
                                        env_vars={NODE_ROOT_ENV: str(roots["learner"])})
        actor_node = cluster.add_node(num_cpus=2, resources={"actor_node": 4}, object_store_memory=STORE,
                                      env_vars={NODE_ROOT_ENV: str(roots["actor"])})
        cluster.wait_for_nodes()
        expected = {"buffer": cluster.head_node.node_id[:8], "learner0": learner_node.node_id[:8],
                    "learner1": learner_node.node_id[:8], "actor0": actor_node.node_id[:8]}
        run_dir = tmp_path / "driver" / "run"
        run = CliRun(["train", f"run_dir={run_dir}", f"launch.ray_address={cluster.address}",
                      "buffer.node_label=buffer_node", "learner.node_label=learner_node",
                      "actors.node_label=actor_node", "actors.num_actors=1", f"learner.total_steps={STEPS}",
                      "launch.eval_every=0", "actors.max_response_length=32", "dashboard.enabled=false",
                      "wandb.mode=disabled", "learner.batch_groups=8", "learner.mini_batch_groups=8"],
                     tag, tmp_path / "train.out", env=run_env(tag))
        try:
            rc = run.wait(600)
        finally:
            if run.proc.poll() is None:
                run.kill()
        assert rc == 0, run.tail(60)
        nodes = role_nodes(run_dir)
        assert nodes == expected, (nodes, expected)
        assert len({nodes["buffer"], nodes["learner0"], nodes["actor0"]}) == 3
        assert "on 3 node(s)" in run.output()
        steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] >= 1]
        assert steps == list(range(1, STEPS + 1))
        # every role wrote under its own node's root, and nothing of one node is in another's
        view = {name: Path(node_run_dir(str(run_dir), {NODE_ROOT_ENV: str(root)})) for name, root in roots.items()}
        assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["driver.log"]
        assert not any((run_dir / d).exists() for d in ("checkpoints", "hf", "buffer", "actors"))
        logs = {name: sorted(p.name for p in (v / "logs").iterdir()) for name, v in view.items()}
        assert logs == {"buffer": ["buffer.log"], "learner": ["learner0.log", "learner1.log"],
                        "actor": ["actor0.log"]}, logs
        tops = {name: sorted(p.name for p in v.iterdir()) for name, v in view.items()}
        assert tops["buffer"] == ["buffer", "logs"], tops
        assert set(tops["learner"]) == {"checkpoints", "hf", "logs", "trained_ids.jsonl"}, tops
        assert "actors" in tops["actor"] and not {"buffer", "checkpoints", "hf"} & set(tops["actor"]), tops
        for name, root in roots.items():  # nothing outside the run directory's view on any node
            assert [p for p in root.rglob("*") if p.is_file() and view[name] not in p.parents] == []
        # the checkpoint of the last step is on the learner node, the buffer log on the buffer node
        assert (view["learner"] / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS}"
        assert (view["learner"] / "checkpoints" / f"step-{STEPS}" / "DONE").is_file()
        assert (view["learner"] / "hf" / f"step-{STEPS}" / "config.json").is_file()
        assert any((view["buffer"] / "buffer" / "log").iterdir())
        # roles on three nodes: the buffer listened on its node's address, not on loopback
        endpoints = json.loads((view["buffer"] / "buffer" / "endpoints.json").read_text())
        assert not endpoints["ingest"].startswith("tcp://127."), endpoints
        where = json.loads((run_dir / "nodes.json").read_text())
        assert where["learner0"]["run_dir"] == str(view["learner"]) and where["buffer"]["run_dir"] == str(view["buffer"])
        assert "checkpoints and HF exports: " + str(view["learner"]) in run.output()
        # the actor's metrics rows reach the driver's run directory (the dashboard's) over Ray
        assert {r["actor_id"] for r in read_jsonl(run_dir / "actor_metrics.jsonl")} == {"actor0"}
        assert (view["actor"] / "actor_metrics.jsonl").is_file()

        # resume from the driver: the checkpoint is read on the learner's node, the buffer log checked on
        # the buffer's; a complete run starts nothing, a longer one trains on from its checkpoint
        done = CliRun(["resume", str(run_dir)], tag, tmp_path / "resume-done.out", env=run_env(tag))
        assert done.wait(300) == 0, done.tail(30)
        assert "the run is complete: step 3 of learner.total_steps=3" in done.output()
        more = CliRun(["resume", str(run_dir), f"learner.total_steps={STEPS + 1}"], tag, tmp_path / "resume.out",
                      env=run_env(tag))
        try:
            rc = more.wait(600)
        finally:
            if more.proc.poll() is None:
                more.kill()
        assert rc == 0, more.tail(60)
        assert f"resumed at step {STEPS}" in more.output()
        steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] >= 1]
        assert steps == list(range(1, STEPS + 2))
        assert (view["learner"] / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS + 1}"
        assert not any((run_dir / d).exists() for d in ("checkpoints", "hf", "buffer", "actors"))
        # the driver joined the cluster and left it running (it did not start it)
        assert all(n.remaining_processes_alive() for n in cluster.list_all_nodes())
    finally:
        if cluster is not None:
            cluster.shutdown()
        if saved is None:
            os.environ.pop("ARCHER_TEST_TAG", None)
        else:
            os.environ["ARCHER_TEST_TAG"] = saved
        time.sleep(1)
        left = wait_no_tagged(tag, 30)
        kill_tagged(tag)
    assert not left, f"processes left after the cluster's shutdown: {left}"

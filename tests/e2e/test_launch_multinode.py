"""The same run on a simulated 3-node Ray cluster (ray.cluster_utils.Cluster): buffer, learner ranks and
actors pinned to different nodes by node labels (custom resources), the driver joining with
launch.ray_address. The driver log's "<role> on host (ip, node <id>)" lines say where each role ran.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.helpers.launch import CliRun, kill_tagged, new_tag, read_jsonl, role_nodes, run_env, wait_no_tagged

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

STEPS = 3
STORE = 100 * 1024 * 1024  # object store per node (the roles pass little through it)


def test_three_node_cluster_places_roles_by_label(tmp_path):
    from ray.cluster_utils import Cluster

    tag = new_tag("multinode")
    saved = os.environ.get("ARCHER_TEST_TAG")
    os.environ["ARCHER_TEST_TAG"] = tag  # the cluster's processes carry the tag too (orphan check)
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "resources": {"buffer_node": 1}, "object_store_memory": STORE,
            "include_dashboard": False})
        learner_node = cluster.add_node(num_cpus=2, resources={"learner_node": 4}, object_store_memory=STORE)
        actor_node = cluster.add_node(num_cpus=2, resources={"actor_node": 4}, object_store_memory=STORE)
        cluster.wait_for_nodes()
        expected = {"buffer": cluster.head_node.node_id[:8], "learner0": learner_node.node_id[:8],
                    "learner1": learner_node.node_id[:8], "actor0": actor_node.node_id[:8]}
        run_dir = tmp_path / "run"
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

"""Role placement on a real (small, local) Ray cluster: start-up errors are fail-fast and name the role
and the node; a role no node can host is reported as not placed within the deadline."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration


def _spec(target: str):
    """A role spec of an arbitrary `module:callable` (the start-up path does not look at the protocol)."""
    from typing import Protocol

    from archer_async.roles import RoleSpec

    return RoleSpec("test-role", Protocol, target)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_unplaceable_role_fails_within_the_deadline(ray_local, tmp_path):
    from launch.roles import StartupError, construct_all, place

    hosts = {"actor0": place("actor0", str(tmp_path), num_cpus=0.1, node_label="no_such_node_label")}
    t0 = time.time()
    with pytest.raises(StartupError, match=r"actor0: not placed within 3 s"):
        construct_all(hosts, {"actor0": (_spec("collections:OrderedDict"), ())}, 3.0)
    assert time.time() - t0 < 30
    ray_local.kill(hosts["actor0"])


def test_start_up_failure_names_role_and_node_and_fails_fast(ray_local, tmp_path):
    from launch.roles import StartupError, construct_all, place

    hosts = {r: place(r, str(tmp_path), num_cpus=0.1) for r in ("buffer", "learner0")}
    specs = {"buffer": (_spec("time:sleep"), (300,)),  # a role still starting (e.g. waiting for its peers)
             "learner0": (_spec("archer_async.no_such_module:Learner"), ())}
    t0 = time.time()
    with pytest.raises(StartupError) as err:
        construct_all(hosts, specs, 120.0)
    msg = str(err.value)
    assert msg.startswith("learner0 on ") and "node " in msg and "ModuleNotFoundError" in msg, msg
    assert time.time() - t0 < 60, "a failed role must not wait for the whole deadline"
    assert (tmp_path / "logs" / "learner0.log").is_file()  # one log per role, from its first moment
    for h in hosts.values():
        ray_local.kill(h)


def test_a_role_without_gpus_sees_none_and_reports_no_gpu_ids(ray_local, tmp_path):
    """Ray leaves CUDA_VISIBLE_DEVICES alone for num_gpus=0: the role must set it empty itself."""
    import os

    from launch.roles import place

    host = place("buffer", str(tmp_path), num_cpus=0.1, env={"X_ROLE": "1"})
    try:
        env = ray_local.get(host.__ray_call__.remote(
            lambda self: (os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("X_ROLE"))), timeout=120)
        assert env == ("", "1")
        assert ray_local.get(host.gpu_ids.remote(), timeout=60) == []
    finally:
        ray_local.kill(host)

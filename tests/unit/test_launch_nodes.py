"""Where roles listen and write on a cluster without a shared filesystem: the buffer's bind address
(buffer.host auto), each node's view of the run directory, and the roles' constructor arguments."""

from __future__ import annotations

import pytest

from archer_async.config import ConfigError, load_config
from launch.roles import NODE_ROOT_ENV, node_run_dir
from launch.nodes import buffer_bind_host


def _where(**nodes: str) -> dict:
    return {role: {"node_id": node, "ip": f"10.0.0.{node[-1]}", "run_dir": "/r"} for role, node in nodes.items()}


def test_buffer_binds_loopback_only_when_every_role_is_on_its_node():
    one = _where(buffer="n1", learner0="n1", learner1="n1", actor0="n1")
    assert buffer_bind_host("auto", one) == "127.0.0.1"
    spread = _where(buffer="n1", learner0="n2", learner1="n2", actor0="n1")
    assert buffer_bind_host("auto", spread) == "10.0.0.1"  # the buffer node's address, not a peer's
    assert buffer_bind_host("192.168.5.7", spread) == "192.168.5.7"
    assert buffer_bind_host("127.0.0.1", spread) == "127.0.0.1"  # an explicit address is kept as given


def test_buffer_host_defaults_to_auto_and_refuses_what_is_no_address():
    assert load_config([], []).buffer.host == "auto"
    for ok in ("10.1.2.3", "node-7.cluster.local", "::1", "0.0.0.0"):
        assert load_config([], [f"buffer.host={ok}"]).buffer.host == ok
    for bad in ("tcp://10.0.0.1:5555", "10.0.0.1:5555", "two words", ""):
        with pytest.raises(ConfigError, match=r"buffer\.host: .* is neither auto, an IP address nor a host name"):
            load_config([], [f"buffer.host={bad}"])


def test_node_run_dir_is_the_run_dir_unless_the_node_has_a_root_of_its_own(tmp_path):
    assert node_run_dir("/data/runs/a", {}) == "/data/runs/a"
    assert node_run_dir("/data/runs/a", {NODE_ROOT_ENV: ""}) == "/data/runs/a"
    assert node_run_dir("/data/runs/a", {NODE_ROOT_ENV: str(tmp_path)}) == str(tmp_path / "data" / "runs" / "a")


def test_role_host_maps_the_run_dir_argument_to_its_nodes_view(tmp_path, monkeypatch):
    from launch.roles import RoleHost

    monkeypatch.setenv(NODE_ROOT_ENV, str(tmp_path / "disk"))
    host = RoleHost.__new__(RoleHost)  # the Ray actor class, without Ray: only its argument mapping
    host.driver_run_dir, host.run_dir = "/runs/x", node_run_dir("/runs/x")
    assert host.run_dir == str(tmp_path / "disk" / "runs" / "x")
    assert host._local("/runs/x") == host.run_dir
    assert host._local("/runs/x/other") == "/runs/x/other" and host._local(3) == 3


def test_learners_and_actors_get_the_buffers_endpoints_and_secret_from_the_driver():
    from launch.train import Run

    run = Run(load_config([], ["run_dir=/runs/x"]), resume=False)

    class FakeSyncInit:
        def for_rank(self, r):
            return self

        def to_dict(self):
            return {"rank": 1}

    run.sync_init, run.model_path = FakeSyncInit(), "/m"
    run.buffer_kwargs = {"buffer_endpoints": {"ingest": "tcp://10.0.0.1:1", "control": "tcp://10.0.0.1:2"},
                         "buffer_secret": b"s" * 32}
    spec = run._actor_spec(0, 5)
    assert spec[1][2] == "/runs/x"  # the driver's path: each node maps it to its own view
    assert spec[2]["buffer_endpoints"]["ingest"] == "tcp://10.0.0.1:1"
    assert spec[2]["buffer_secret"] == b"s" * 32 and spec[2]["initial_version"] == 5


def test_resume_reads_the_checkpoint_and_the_buffer_log_where_they_are(tmp_path):
    import json

    from launch.cluster import buffer_log_on_node, resume_state_on_node

    got = resume_state_on_node(str(tmp_path))
    assert "no checkpoint to resume from" in got["error"]  # one line, shown by the driver with the node
    step = tmp_path / "checkpoints" / "step-3"
    step.mkdir(parents=True)
    (step / "DONE").write_text("")
    (step / "learner_state.json").write_text(json.dumps({"step": 3, "version": 3, "extra_state": {}}))
    (tmp_path / "checkpoints" / "latest").write_text("step-3")
    got = resume_state_on_node(str(tmp_path))
    assert got["checkpoint"] == str(step) and got["state"]["version"] == 3 and got["exported"] is False
    (tmp_path / "hf" / "step-3").mkdir(parents=True)
    (tmp_path / "hf" / "step-3" / "config.json").write_text("{}")
    assert resume_state_on_node(str(tmp_path))["exported"] is True
    assert buffer_log_on_node(str(tmp_path)) == {"has_log": False, "problem": ""}

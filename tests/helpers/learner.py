"""Helpers of the learner tests (a random-init small Qwen2, synthetic groups, spawning ranks)."""

from __future__ import annotations

import os
import random
import socket
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from archer_async.config import Config
from archer_async.types import Reward, Sample, TrajectoryGroup

VOCAB = 256


def make_model_dir(path: Path, seed: int = 0) -> Path:
    """Random-init small Qwen2 (head_dim 64, tied embeddings) saved in HF format with a generation config."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )
    model = Qwen2ForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    GenerationConfig(eos_token_id=1, pad_token_id=0, do_sample=True, temperature=1.0).save_pretrained(str(path))
    _save_tokenizer(path)
    return path


def _save_tokenizer(path: Path) -> None:
    """A word-level tokenizer over the model's vocabulary ("<pad>", "<eos>", "t2".."t255")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>").save_pretrained(str(path))


def make_groups(step: int, n_groups: int = 4, n_samples: int = 4, version: int = 0) -> list[TrajectoryGroup]:
    """Deterministic synthetic groups for `step` (mixed rewards, ragged prompts and responses)."""
    rng = random.Random(1000 + step)
    groups = []
    for g in range(n_groups):
        prompt = [rng.randrange(2, VOCAB) for _ in range(rng.randint(3, 10))]
        samples = []
        for s in range(n_samples):
            t = rng.randint(2, 14)
            status = "pass" if (s + g + step) % 3 == 0 else "fail"
            samples.append(Sample(
                sample_id=f"a0-{step}-{g}-{s}", response_ids=[rng.randrange(2, VOCAB) for _ in range(t)],
                behavior_logprobs=[-5.5 + rng.uniform(-0.3, 0.3) for _ in range(t)],
                token_versions=[max(0, version - rng.randint(0, 2))] * t, finish_reason="stop",
                reward=Reward(status=status),
            ))
        groups.append(TrajectoryGroup(group_id=f"a0-g{step}-{g}", prompt_index=g, data_source="tiny",
                                      prompt_ids=prompt, samples=samples))
    return groups


def small_config(run_dir: Path, **learner) -> Config:
    """A learner config for the tests: float32, deterministic, small batches."""
    base = dict(num_ranks=2, batch_groups=4, mini_batch_groups=2, ppo_epochs=1, micro_batch_size=3, lr=1e-3,
                warmup_steps=2, deterministic=True, checkpoint_every=1)
    base.update(learner)
    return Config.model_validate({"run_dir": str(run_dir), "learner": base, "sync": {"bucket_mb": 1}})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, err_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        fn(rank, world, port, *args)
    except BaseException:
        Path(err_dir, f"error-{rank}.txt").write_text(traceback.format_exc())
        raise


def spawn(fn, world: int, *args, err_dir: Path, timeout: float = 150.0) -> None:
    """Run fn(rank, world, port, *args) in `world` spawned processes; raise with the rank's traceback on failure."""
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, str(err_dir))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = sorted(Path(err_dir).glob("error-*.txt"))
    if errors:
        raise AssertionError(errors[0].read_text())
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"rank exit codes {codes}"


def full_batch_loss(model_dir: Path, loss_cfg, groups: list[TrajectoryGroup]):
    """The single-process reference: (loss, metrics, model) of the policy loss over all of `groups` as
    one padded micro-batch, with pi_prox = pi_ref = the current weights, after `loss.backward()`."""
    from transformers import AutoModelForCausalLM

    from archer_async.advantages import filter_groups, group_advantages
    from archer_async.loss import entropy_from_logits, logprobs_from_logits, policy_loss
    from learner.batching import TrainRow, collate

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    kept, _ = filter_groups(groups)
    adv = group_advantages(kept).tolist()
    rows = [TrainRow(s.sample_id, g.prompt_ids, s.response_ids, s.behavior_logprobs, s.token_versions, 0.0)
            for g in kept for s in g.samples]
    for r, a in zip(rows, adv):
        r.advantage = a
    mb = collate(rows, pad_id=0)
    logits = model(input_ids=mb.input_ids, logits_to_keep=mb.logits_to_keep).logits
    logits = logits[torch.arange(len(rows))[:, None], mb.gather_index]
    logp = logprobs_from_logits(logits, mb.response_ids, 1.0)
    ent = entropy_from_logits(logits, 1.0)
    loss, met = policy_loss(logp, logp.detach(), mb.behavior_logprobs, logp.detach(), ent, mb.advantages,
                            mb.response_mask, loss_cfg)
    loss.backward()
    return loss, met, model


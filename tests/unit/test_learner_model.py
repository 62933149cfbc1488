"""Model helpers of the learner: attention selection, activation checkpointing, weight buckets (no process group)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from learner.model import ModelPathError, enable_activation_checkpointing, resolve_model_path, select_attn_implementation
from learner.weights import iter_full_weights, named_trainable_tensors, plan_buckets


def test_learner_attention_falls_back_to_sdpa_without_flash_attn():
    assert select_attn_implementation("auto", torch.device("cpu")) == "sdpa"
    assert select_attn_implementation("eager", torch.device("cpu")) == "eager"


def test_learner_activation_checkpointing_recomputes_layers_with_equal_gradients(small_model_dir):
    path = small_model_dir
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    grads, calls = [], []
    for ac in (False, True):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa").eval()
        if ac:
            enable_activation_checkpointing(model)
        n = [0]
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: n.__setitem__(0, n[0] + 1))  # pre: recompute may stop early
        model(input_ids=ids).logits.float().logsumexp(-1).sum().backward()
        calls.append(n[0])
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad.clone())
    assert calls == [1, 2]  # the layer ran again in backward
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_learner_full_weights_single_rank_buckets_and_tied_names(small_model_dir):
    path = small_model_dir
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    named = named_trainable_tensors(model)
    assert "lm_head.weight" not in dict(named) and "model.embed_tokens.weight" in dict(named)
    buckets = plan_buckets(named, 100_000, torch.bfloat16)
    assert sorted(i for b in buckets for i in b) == list(range(len(named))) and len(buckets) > 1
    got = dict(iter_full_weights(model, 0, torch.bfloat16, 100_000))
    assert all(torch.equal(got[n], p.detach().to(torch.bfloat16)) for n, p in named)
    assert list(iter_full_weights(model, 1, torch.bfloat16, 100_000)) == []  # only rank 0 receives tensors


def test_learner_model_path_error_names_the_path(tmp_path):
    try:
        resolve_model_path(str(tmp_path), None)
    except ModelPathError as e:
        assert str(tmp_path) in str(e)
    else:
        raise AssertionError("expected ModelPathError")

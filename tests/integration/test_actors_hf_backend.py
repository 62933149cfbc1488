"""The transformers fallback backend (actors.hf_backend): same contract as the vLLM one, without vLLM."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from actors.engine import SampleParams, WeightUpdateError
from actors.hf_backend import HFBackend, _top_p_mask
from archer_async.config import ActorsConfig, SyncConfig
from learner.weight_sender import WeightSender
from archer_async.weight_sync import make_sync_init


def _model():
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(64)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  eos_token="t1", pad_token="t0")
    cfg = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                      num_key_value_heads=1, head_dim=64, tie_word_embeddings=True, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval(), tok


def _recompute(model, prompt, resp, T):
    ids = torch.tensor([prompt + resp])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float() / T
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(resp)[:, None])[:, 0]


def test_top_p_mask_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    out = _top_p_mask(logits, torch.tensor([0.7]))
    assert torch.isfinite(out[0, :2]).all() and torch.isinf(out[0, 2:]).all()


def test_hf_backend_logprobs_versions_and_update():
    model, tok = _model()
    init = make_sync_init(1, timeout_s=20)
    sender = WeightSender(init)
    t = threading.Thread(target=sender.connect)
    t.start()

    async def main():
        eng = HFBackend(model, tok, ActorsConfig(max_num_seqs=8), SyncConfig(), seed=0, version=0,
                        sync_init=init.for_rank(1).to_dict())
        T = 0.7
        prompts = [[2, 3, 4], [5, 6], [7, 8, 9, 10]]  # different lengths: left padding
        p = SampleParams(max_tokens=12, temperature=T)
        outs = await asyncio.gather(*[eng.sample(pr, p, f"r{i}") for i, pr in enumerate(prompts)])
        for pr, c in zip(prompts, outs):
            assert c.versions == [0] * len(c.token_ids) and len(c.logprobs) == len(c.token_ids)
            d = (torch.tensor(c.logprobs) - _recompute(model, pr, c.token_ids, T)).abs().max()
            assert d < 1e-4, d
        # update to version 1 with different weights
        import copy
        new = copy.deepcopy(model)
        with torch.no_grad():
            for q in new.parameters():
                q.add_(0.3 * torch.randn_like(q))
        named = [(n, q.detach()) for n, q in new.named_parameters()]
        th = threading.Thread(target=lambda: sender.send(named, 1))
        t.join()
        th.start()
        r = await eng.update_weights(1, "keep", 20)
        th.join()
        assert r["version"] == 1
        c = await eng.sample(prompts[0], p, "after")
        assert set(c.versions) == {1}
        d = (torch.tensor(c.logprobs) - _recompute(new, prompts[0], c.token_ids, T)).abs().max()
        assert d < 1e-4, d
        with pytest.raises(WeightUpdateError):
            await eng.update_weights(2, "keep", 1.5)  # nobody sends: old weights stay
        assert eng.version == 1
        await eng.close()

    asyncio.run(main())
    sender.close()

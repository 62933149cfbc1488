"""Token-budget micro-batches with sequence packing: the plan (every row once, budgets, equal counts over
ranks, deterministic) and the numbers (log-probs, entropies, loss and gradients of packed micro-batches equal
the padded computation; the loss is invariant to the token budget). One process, a small random Qwen2."""

from __future__ import annotations

import functools
import operator
import random

import pytest
import torch

from archer_async.config import Config, LossConfig


def _rows(n, seed=0, max_prompt=8, max_resp=12):
    from learner.batching import TrainRow

    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, t = rng.randint(1, max_prompt), rng.randint(1, max_resp)
        out.append(TrainRow(f"s{i}", [rng.randrange(2, 200) for _ in range(p)], [rng.randrange(2, 200) for _ in range(t)],
                            [-5.5 + rng.uniform(-0.3, 0.3) for _ in range(t)], [0] * t, rng.uniform(-1.0, 1.0)))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same random weights twice: plain SDPA (padded path) and the packed-row attention."""
    from learner.model import load_causal_lm, select_attn_implementation
    from tests.helpers.learner import make_model_dir

    path = make_model_dir(tmp_path_factory.mktemp("packing") / "model")
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    padded = load_causal_lm(path, select_attn_implementation("sdpa", cpu), cpu)
    packed = load_causal_lm(path, select_attn_implementation("auto", cpu, packed=True), cpu)
    return padded, packed


@pytest.mark.parametrize("n,world,budget", [(7, 2, 20), (1, 2, 30), (12, 3, 25), (9, 1, 10_000), (5, 2, 3)])
def test_token_plan_covers_every_row_once_within_budget_with_equal_counts(n, world, budget):
    from learner.batching import plan_token_micro_batches

    rows = _rows(n, seed=n)
    plans = [plan_token_micro_batches(rows, r, world, budget) for r in range(world)]
    assert len({len(p) for p in plans}) == 1  # same number of micro-batches on every rank
    seen = [row.sample_id for p in plans for chunk in p for row in chunk]
    assert sorted(seen) == sorted(r.sample_id for r in rows)
    for p in plans:
        for chunk in p:  # within budget, unless one row alone is longer than the budget
            assert sum(r.num_tokens for r in chunk) <= budget or len(chunk) == 1
    again = [plan_token_micro_batches(rows, r, world, budget) for r in range(world)]
    assert [[[r.sample_id for r in c] for c in p] for p in again] == [[[r.sample_id for r in c] for c in p] for p in plans]


def test_first_fit_decreasing_fills_bins_longest_first():
    from learner.batching import TrainRow, first_fit_decreasing

    rows = [TrainRow(f"r{n}", [1], [2] * (n - 1), [0.0] * (n - 1), [0] * (n - 1), 0.0) for n in (3, 9, 5, 7, 2, 4)]
    bins = first_fit_decreasing(rows, 12)
    assert [[r.num_tokens for r in b] for b in bins] == [[9, 3], [7, 5], [4, 2]]


def test_collate_packed_layout():
    from learner.batching import collate_packed

    rows = _rows(5, seed=3)
    mb = collate_packed(rows)
    assert mb.packed and mb.input_ids.shape == (1, sum(r.num_tokens for r in rows))
    assert mb.cu_seq_lens.tolist()[-1] == mb.input_ids.shape[1]
    keep = mb.logits_to_keep
    for i, r in enumerate(rows):
        a = int(mb.cu_seq_lens[i])
        assert mb.input_ids[0, a:a + r.num_tokens].tolist() == r.prompt_ids + r.response_ids
        assert mb.position_ids[0, a:a + r.num_tokens].tolist() == list(range(r.num_tokens))
        for t, tok in enumerate(r.response_ids):  # the kept position predicts response token t
            assert int(mb.input_ids[0, int(keep[mb.gather_index[i, t]]) + 1]) == tok
        assert float(mb.response_mask[i].sum()) == len(r.response_ids)
    dummy = collate_packed([], dummy_row=rows[0])
    assert dummy.num_real_rows == 0 and float(dummy.response_mask.sum()) == 0.0 and dummy.input_ids.shape == (1, 2)


def _loss_and_grads(model, mbs, loss_cfg, ref_model):
    """Micro-batch accumulation as the trainer does it: global denominators, sum of micro-batch losses."""
    from archer_async.loss import loss_denominators, policy_loss
    from learner.forward import forward_micro_batch

    with torch.no_grad():
        ents = [forward_micro_batch(model, mb, 1.0, True)[1] for mb in mbs]
        refs = [forward_micro_batch(ref_model, mb, 1.0, False)[0] + 0.05 for mb in mbs]
    dens = [loss_denominators(e, mb.response_mask, loss_cfg) for e, mb in zip(ents, mbs)]
    den = functools.reduce(operator.add, dens)  # LossDenominators.__add__: the mini-batch totals
    model.zero_grad(set_to_none=True)
    total = 0.0
    for mb, ref in zip(mbs, refs):
        logp, ent = forward_micro_batch(model, mb, 1.0, True)
        loss, _ = policy_loss(logp, logp.detach() + 0.01, mb.behavior_logprobs, ref, ent, mb.advantages,
                              mb.response_mask, loss_cfg, denominators=den)
        loss.backward()
        total += float(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return total, grads


def test_packed_logprobs_and_entropies_equal_padded(models):
    from learner.batching import collate, collate_packed
    from learner.forward import forward_micro_batch

    padded_model, packed_model = models
    rows = _rows(9, seed=1)
    a, b = collate(rows, pad_id=0), collate_packed(rows)
    with torch.no_grad():
        lp_a, ent_a = forward_micro_batch(padded_model, a, 0.9, True)
        lp_b, ent_b = forward_micro_batch(packed_model, b, 0.9, True)
        alone = [forward_micro_batch(padded_model, collate([r], pad_id=0), 0.9, False)[0] for r in rows]
    m = a.response_mask.bool()
    assert torch.equal(m, b.response_mask.bool())
    torch.testing.assert_close(lp_b[m], lp_a[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_b[m], ent_a[m], rtol=1e-5, atol=1e-5)
    for i, r in enumerate(rows):  # every packed row sees only itself: equal to the row run alone
        torch.testing.assert_close(lp_b[i, :len(r.response_ids)], alone[i][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_packed_loss_and_gradients_equal_padded(models, agg):
    from learner.batching import collate, collate_packed

    padded_model, packed_model = models
    rows = _rows(10, seed=2)
    cfg = LossConfig(loss_agg=agg, kl_coef_low_entropy=0.01, kl_coef_high_entropy=0.005)
    loss_a, g_a = _loss_and_grads(padded_model, [collate(rows, pad_id=0)], cfg, padded_model)
    loss_b, g_b = _loss_and_grads(packed_model, [collate_packed(rows)], cfg, packed_model)
    assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-6)
    assert g_a.keys() == g_b.keys() and g_a
    for n in g_a:
        torch.testing.assert_close(g_b[n], g_a[n], rtol=1e-4, atol=1e-6)


def test_loss_is_invariant_to_the_token_budget(models):
    from learner.batching import collate, collate_packed, plan_token_micro_batches

    padded_model, packed_model = models
    rows = _rows(11, seed=4)
    cfg = LossConfig(kl_coef_low_entropy=0.01)
    loss_ref, g_ref = _loss_and_grads(padded_model, [collate(rows, pad_id=0)], cfg, padded_model)
    longest = max(r.num_tokens for r in rows)
    counts = set()
    for budget in (longest, 2 * longest, 10_000):
        # two ranks' micro-batches accumulated in one process: each rank's share and the dummies included
        mbs = []
        for rank in range(2):
            plan = plan_token_micro_batches(rows, rank, 2, budget)
            mbs += [collate_packed(c, dummy_row=rows[0]) for c in plan]
        counts.add(len(mbs))
        loss, g = _loss_and_grads(packed_model, mbs, cfg, packed_model)
        assert loss == pytest.approx(loss_ref, rel=1e-5, abs=1e-6), budget
        for n in g_ref:
            torch.testing.assert_close(g[n], g_ref[n], rtol=1e-4, atol=1e-6)
    assert len(counts) > 1  # the budgets did produce different splits


def test_packed_attention_choice():
    from archer_async.config import UserError
    from learner.forward import VARLEN_SDPA
    from learner.model import select_attn_implementation

    cpu = torch.device("cpu")
    assert select_attn_implementation("auto", cpu) == "sdpa"
    assert select_attn_implementation("sdpa", cpu, packed=True) == VARLEN_SDPA
    with pytest.raises(UserError, match="max_tokens_per_micro_batch"):
        select_attn_implementation("eager", cpu, packed=True)


def test_token_budget_below_the_longest_row_is_rejected():
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch = 300: must be at least"):
        Config.model_validate({"learner": {"max_tokens_per_micro_batch": 300}})
    cfg = Config.model_validate({"data": {"max_prompt_length": 100}, "actors": {"max_response_length": 200},
                                 "learner": {"max_tokens_per_micro_batch": 300}})
    assert cfg.learner.max_tokens_per_micro_batch == 300


def test_packed_gradients_with_activation_checkpointing_equal_padded(models, tmp_path):
    from learner.batching import collate, collate_packed
    from learner.model import enable_activation_checkpointing, load_causal_lm, select_attn_implementation

    padded_model, packed_model = models
    packed_model.save_pretrained(str(tmp_path / "m"))
    cpu = torch.device("cpu")
    ckpt_model = load_causal_lm(tmp_path / "m", select_attn_implementation("sdpa", cpu, packed=True), cpu)
    enable_activation_checkpointing(ckpt_model)  # the GPU recipes train this way: row boundaries reach recomputes
    rows = _rows(8, seed=5)
    cfg = LossConfig(kl_coef_low_entropy=0.01)
    loss_a, g_a = _loss_and_grads(padded_model, [collate(rows, pad_id=0)], cfg, padded_model)
    loss_b, g_b = _loss_and_grads(ckpt_model, [collate_packed(rows)], cfg, ckpt_model)
    assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-6)
    for n in g_a:
        torch.testing.assert_close(g_b[n], g_a[n], rtol=1e-4, atol=1e-6)

"""m2po in the real learner (FSDP2 over gloo, 2 spawned ranks, micro-batches of 3): the mask's cutoff is
taken over the whole mini-batch, so the accumulated gradient equals the single-process full-batch loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.learner import full_batch_loss, make_groups, make_model_dir, small_config, spawn

pytestmark = pytest.mark.integration

TAU = 0.005  # small enough that the mask acts on the synthetic batch


def _config(run_dir: Path):
    cfg = small_config(run_dir, mini_batch_groups=4)
    cfg.loss = cfg.loss.model_copy(update={"is_correction": "m2po", "m2po_tau": TAU})
    return cfg


def _session(rank, world, port, tmp):
    from learner.batching import collate, plan_micro_batches
    from learner.distributed import all_gather_objects
    from learner.trainer import Learner

    tmp = Path(tmp)
    lrn = Learner(_config(tmp / "run"), rank, world, "127.0.0.1", port, tmp / "run", tmp / "model")
    groups_rows, _ = lrn._rows(make_groups(0))
    rows = [r for g in groups_rows for r in g]
    mbs = [collate(c, lrn.pad_id, dummy_row=rows[0]) for c in plan_micro_batches(rows, rank, world, 3)]
    proxs = [r[0] for r in lrn._no_grad_pass(lrn.model, mbs, False)]
    refs = [r[0] for r in lrn._no_grad_pass(lrn.ref_model, mbs, False)]
    import dataclasses

    cut = lrn._m2po_cutoff(mbs, proxs)
    den = dataclasses.replace(lrn._denominators(mbs, None), m2po_cutoff=cut)
    parts = lrn.accumulate_gradients(mbs, proxs, refs, den)
    grads = {}
    for n, p in lrn.model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[n] = g.clone()
    every = [p for ps in all_gather_objects(parts) for p in ps]
    lrn.optimizer.zero_grad(set_to_none=True)
    m = lrn.step(make_groups(0) if rank == 0 else None)  # the whole training step with m2po
    lrn.close()
    if rank == 0:
        torch.save(grads, tmp / "grads.pt")
        (tmp / "out.json").write_text(json.dumps({
            "cutoff": cut, "loss": sum(p["loss"] for p in every),
            "step_truncated_frac": m["is/truncated_frac"], "updated": m["learner/updated"]}))


def test_m2po_learner_gradient_equals_full_batch(tmp_path):
    make_model_dir(tmp_path / "model")
    spawn(_session, 2, str(tmp_path), err_dir=tmp_path)
    out = json.loads((tmp_path / "out.json").read_text())
    grads = torch.load(tmp_path / "grads.pt")

    cfg = _config(tmp_path / "x")
    loss, met, model = full_batch_loss(tmp_path / "model", cfg.loss, make_groups(0))
    assert 0 < met["is/truncated_frac"] < 1, met  # the mask acts, and keeps some tokens
    assert out["step_truncated_frac"] == pytest.approx(met["is/truncated_frac"], abs=1e-9)
    assert out["updated"]
    assert abs(out["loss"] - loss.item()) < 1e-6 * max(1.0, abs(loss.item()))
    ref = dict(model.named_parameters())
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name].grad, rtol=1e-4, atol=1e-6, msg=name)

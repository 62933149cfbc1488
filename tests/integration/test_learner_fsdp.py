"""Real FSDP2 over gloo, 2 spawned ranks on 127.0.0.1: gradients, training, resume, resharding, HF export,
weight broadcast. One uninterrupted 2-rank run (session A) is shared by the tests; a second 2-rank
run resumes from its step-2 checkpoint (session B) and a 1-rank run loads the same checkpoint (C)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from tests.helpers.learner import full_batch_loss, make_groups, make_model_dir, small_config, spawn

pytestmark = pytest.mark.integration

K = 2  # steps before the checkpoint; session A runs 2K
PROBE = torch.tensor([[5, 17, 33, 2, 250, 9, 77, 128, 3, 64]])


def _learner(rank, world, port, tmp, **over):
    from learner.trainer import Learner

    return Learner(small_config(Path(tmp) / "run", **over), rank, world, "127.0.0.1", port, Path(tmp) / "run",
                   Path(tmp) / "model")


def _full_weights(learner) -> dict:
    return {n: t.clone() for n, t in learner.iter_weights(dtype=torch.float32)}


def _full_grads(learner) -> dict:
    out = {}
    for n, p in learner.model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[n] = g.clone()
    return out


def _session_a(rank, world, port, tmp, sync_init):
    """Gradients of one fixed batch, 2K training steps with a checkpoint after K, export, broadcast."""
    from learner.batching import collate, plan_micro_batches

    tmp = Path(tmp)
    lrn = _learner(rank, world, port, tmp)
    groups = make_groups(0)
    # gradient of the whole batch as one mini-batch, split over 2 ranks and micro-batches of 3
    groups_rows, _ = lrn._rows(groups)
    rows = [r for g in groups_rows for r in g]
    mbs = [collate(c, lrn.pad_id, dummy_row=rows[0]) for c in plan_micro_batches(rows, rank, world, 3)]
    den = lrn._denominators(mbs, None)
    refs = [r[0] for r in lrn._no_grad_pass(lrn.ref_model, mbs, False)]
    parts = lrn.accumulate_gradients(mbs, [None] * len(mbs), refs, den)
    grads = _full_grads(lrn)
    from learner.distributed import all_gather_objects

    total_loss = sum(p["loss"] for ps in all_gather_objects(parts) for p in ps)  # every rank's contributions
    lrn.optimizer.zero_grad(set_to_none=True)
    losses, metrics = [], []
    for step in range(1, 2 * K + 1):
        m = lrn.step(groups if rank == 0 else None)
        losses.append(m["learner/losses"])
        metrics.append({k: v for k, v in m.items() if isinstance(v, (int, float, str))})
        if step == K:
            lrn.save_checkpoint(step, {"buffer_cursor": {"segment": 3, "offset": 17}, "consumed": ["a0-1"]})
            w_k = _full_weights(lrn)
    w_2k = _full_weights(lrn)
    # a step whose gradients are not finite is skipped: weights, optimizer and version unchanged
    def poison(module, inputs, output):
        output.logits = output.logits * float("nan")
        return output

    handle = lrn.model.register_forward_hook(poison)
    m = lrn.step(groups if rank == 0 else None)
    handle.remove()
    after = _full_weights(lrn)
    skipped = {"skipped": m["learner/skipped_steps"], "version": m["version"], "updated": m["learner/updated"],
               "unchanged": all(torch.equal(after[n], w_2k[n]) for n in w_2k)}
    export = lrn.export_hf(2 * K)
    with torch.no_grad():
        logits = lrn.model(input_ids=PROBE).logits
    sync = lrn.broadcast_weights(lrn.version, sync_init)
    lrn.close()
    if rank == 0:
        torch.save({"grads": grads, "w_k": w_k, "w_2k": w_2k, "logits": logits, "mb_loss": total_loss},
                   tmp / "a.pt")
        (tmp / "a.json").write_text(json.dumps({"losses": losses, "metrics": metrics, "export": str(export),
                                                "sync": sync, "skipped": skipped}))


def _session_resume(rank, world, port, tmp):
    """Load `latest` (step K) and run K more steps on the same data."""
    tmp = Path(tmp)
    lrn = _learner(rank, world, port, tmp)
    extra = lrn.load_checkpoint()
    state = {"extra": extra, "version": lrn.version, "step": lrn.step_count}
    w = _full_weights(lrn)
    losses = [lrn.step(make_groups(0) if rank == 0 else None)["learner/losses"] for _ in range(K)]
    lrn.close()
    if rank == 0:
        torch.save(w, tmp / f"w-ws{world}.pt")
        (tmp / f"resume-ws{world}.json").write_text(json.dumps({"losses": losses, **state}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run sessions A (2 ranks, with a stand-alone weight receiver in this process), B (2 ranks) and C (1 rank)."""
    from actors.weight_receiver import WeightReceiver
    from archer_async.weight_sync import make_sync_init, receiver_rank

    tmp = tmp_path_factory.mktemp("fsdp")
    make_model_dir(tmp / "model")
    init = make_sync_init(num_actors=1, backend="gloo", timeout_s=120)
    received: dict = {}

    def receive():
        try:
            rx = WeightReceiver(init.for_rank(receiver_rank(0)))
            rx.connect()
            received["weights"] = {n: t.clone() for n, t in rx.receive(expected_version=2 * K, timeout_s=150)}
        except Exception as e:  # reported by the test
            received["error"] = repr(e)

    th = threading.Thread(target=receive, daemon=True)
    th.start()
    spawn(_session_a, 2, str(tmp), init.to_dict(), err_dir=tmp)
    th.join(30)
    spawn(_session_resume, 2, str(tmp), err_dir=tmp)
    spawn(_session_resume, 1, str(tmp), err_dir=tmp)
    a = json.loads((tmp / "a.json").read_text())
    return {"tmp": tmp, "a": a, "a_t": torch.load(tmp / "a.pt"), "received": received}


def test_learner_gradients_equal_single_process(runs):
    tmp = runs["tmp"]
    cfg = small_config(tmp / "x")
    loss, _, model = full_batch_loss(tmp / "model", cfg.loss, make_groups(0))
    assert abs(runs["a_t"]["mb_loss"] - loss.item()) < 1e-6 * max(1.0, abs(loss.item()))
    grads = runs["a_t"]["grads"]
    ref = dict(model.named_parameters())
    assert set(grads) == set(ref)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


def test_learner_loss_decreases_on_fixed_batch(runs):
    a = runs["a"]
    per_step = [sum(ls) / len(ls) for ls in a["losses"]]
    assert len(a["losses"][0]) == 2  # batch 4 groups, mini-batch 2: two optimizer steps per training step
    assert per_step[-1] < per_step[0] - 0.05, per_step
    m = a["metrics"][-1]
    assert m["version"] == 2 * K and m["step"] == 2 * K
    for key in ("learner/tokens_per_s", "learner/wait_for_data_s", "staleness/mean", "staleness/max", "reward/mean",
                "groups/solve_none", "groups/solve_all", "grad_norm", "lr", "loss/pg", "is/ess", "entropy/mean"):
        assert key in m, key
    assert m["learner/tokens_per_s"] > 0 and m["lr"] == pytest.approx(1e-3)


def test_learner_non_finite_gradient_step_is_skipped(runs):
    sk = runs["a"]["skipped"]
    assert sk == {"skipped": 2, "version": 2 * K, "updated": False, "unchanged": True}, sk


def test_learner_resume_is_bitwise_deterministic(runs):
    b = json.loads((runs["tmp"] / "resume-ws2.json").read_text())
    assert b["step"] == K and b["version"] == K
    assert b["extra"] == {"buffer_cursor": {"segment": 3, "offset": 17}, "consumed": ["a0-1"]}
    assert b["losses"] == runs["a"]["losses"][K:]  # exact float equality


def test_learner_checkpoint_saved_at_2_ranks_loads_at_1(runs):
    tmp = runs["tmp"]
    w1 = torch.load(tmp / "w-ws1.pt")
    w_k = runs["a_t"]["w_k"]
    assert set(w1) == set(w_k)
    for n in w_k:
        assert torch.equal(w1[n], w_k[n]), n
    c = json.loads((tmp / "resume-ws1.json").read_text())
    assert c["step"] == K and c["extra"]["consumed"] == ["a0-1"]
    # optimizer state came along: the next steps match the 2-rank run up to float reduction order
    for got, want in zip(c["losses"], runs["a"]["losses"][K:]):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_learner_hf_export_reloads_with_identical_logits(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(runs["a"]["export"])
    assert path.name == f"step-{2 * K}"
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (path / f).is_file(), f
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits
    torch.testing.assert_close(logits, runs["a_t"]["logits"], rtol=0, atol=1e-5)
    assert AutoTokenizer.from_pretrained(str(path)).eos_token == "<eos>"


def test_learner_weight_broadcast_is_bit_identical(runs):
    rec = runs["received"]
    assert "error" not in rec, rec.get("error")
    sync = runs["a"]["sync"]
    assert sync["ok"] and sync["version"] == 2 * K, sync
    want = runs["a_t"]["w_2k"]
    got = rec["weights"]
    assert list(got) == list(want) and "lm_head.weight" not in got  # tied: sent once, HF names
    for n in want:
        assert got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]), n

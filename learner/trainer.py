"""The FSDP2 learner: one `Learner` per rank (a Ray actor or a spawned process).

    learner = Learner(cfg, rank, world_size, "127.0.0.1", port, run_dir, model_path)
    metrics = learner.step_from_buffer()        # or learner.step(groups) (groups needed on rank 0 only)
    learner.broadcast_weights(metrics["version"], sender_init)
    path = learner.save_checkpoint(step, extra_state)   # extra_state: JSON-able, returned by load
    extra = learner.load_checkpoint()                     # `latest` of run_dir/checkpoints (None if none)
    learner.export_hf(step)
    learner.close()

Every method is collective: all ranks call it in the same order. One training step (docs/algorithm.md):
rank 0 obtains B groups and broadcasts their bytes as the buffer sent them (one msgpack array); every
rank decodes them once, applies the §6 filter and GRPO advantages,
splits the batch into `batch_groups / mini_batch_groups` mini-batches, recomputes pi_prox (the
step's starting weights) and pi_ref (frozen copy) for its share of responses, then runs
`ppo_epochs` passes of mini-batches, each one AdamW step over accumulated micro-batch gradients.
Micro-batch losses use the mini-batch's global denominators (summed over ranks) and are scaled by
the world size (FSDP averages gradients), so the optimizer sees exactly the full-batch gradient.

Versions: `version` counts training steps that applied at least one optimizer update; tokens
generated from the weights after step k carry version k.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist

from archer_async.advantages import filter_groups, group_advantages
from archer_async.config import Config, UserError
from archer_async.roles import LearnerRole
from archer_async.loss import (
    LossDenominators, loss_denominators, m2po_cutoff, merge_metrics,
    policy_loss, squared_log_ratios,
)
from archer_async.types import TrajectoryGroup, decode_groups, encode_group, join_groups

from . import checkpoint as ckpt
from .batching import MicroBatch, TrainRow, collate, collate_packed, computed_positions, plan_rank, split_minibatches
from .distributed import (
    all_gather_objects, all_reduce_sum, broadcast_bytes, broadcast_object, init_process_group, pick_device,
)
from .export import export_hf
from .forward import forward_micro_batch
from .model import build_policy_and_reference, resolve_model_path, torch_dtype
from .weights import drain, iter_full_weights

log = logging.getLogger(__name__)

class Learner(LearnerRole):
    """One FSDP2 learner rank. See the module docstring for the protocol; every method is collective."""

    def __init__(
        self,
        cfg: Config,
        rank: int,
        world_size: int,
        master_addr: str = "127.0.0.1",
        master_port: int = 29500,
        run_dir: Optional[Union[str, Path]] = None,
        model_path: Optional[Union[str, Path]] = None,
        *,
        buffer_endpoints: Optional[dict] = None,
        buffer_secret: Optional[bytes] = None,
        store_token: str = "",
    ) -> None:
        """`run_dir`: this node's run directory (checkpoints/, hf/, trained_ids). `buffer_endpoints` and
        `buffer_secret`: where rank 0 samples from (the launcher passes the buffer role's, over Ray);
        None: RUN_DIR/buffer/endpoints.json and RUN_DIR/buffer/secret of this node. `store_token`: the secret
        the process group's rendezvous keys live under (the launcher draws one per run)."""
        self.cfg = cfg
        self.lcfg = cfg.learner
        self.rank, self.world_size = rank, world_size
        self.run_dir = Path(run_dir or cfg.run_dir)
        self.device = pick_device(self.lcfg.gpus_per_rank)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(self.lcfg.cpus_per_rank)))
        if self.lcfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.mesh = init_process_group(
            rank, world_size, master_addr, master_port, self.device, cfg.launch.startup_timeout_s, store_token
        )
        torch.manual_seed(self.lcfg.seed + rank)
        random.seed(self.lcfg.seed + rank)
        self.model_dir = resolve_model_path(str(model_path) if model_path else None, cfg.model.path)
        lc = cfg.loss
        self.need_ref = lc.kl_coef_low_entropy != 0 or lc.kl_coef_high_entropy != 0
        self.model, self.ref_model, self.attn_implementation = build_policy_and_reference(
            self.model_dir, self.mesh, self.device, cfg.model.dtype, self.lcfg.reduce_dtype,
            cfg.model.attn_implementation, self.lcfg.activation_checkpointing, self.need_ref,
            packed=self.lcfg.max_tokens_per_micro_batch is not None,
        )
        self.param_dtype = torch_dtype(cfg.model.dtype)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=self.lcfg.lr,
            betas=tuple(self.lcfg.betas), weight_decay=self.lcfg.weight_decay,
            foreach=True,  # on CPU too: bitwise equal to the per-tensor loop, 9.4 -> 4.3 ms per step (bench/bench_learner_ops.py)
        )
        mcfg = self.model.config
        self.pad_id = mcfg.pad_token_id if mcfg.pad_token_id is not None else (mcfg.eos_token_id or 0)
        if isinstance(self.pad_id, list):
            self.pad_id = self.pad_id[0]
        self.temperature = cfg.actors.temperature
        self.step_count = 0
        self.version = 0
        self.opt_steps = 0
        self.skipped_steps = 0
        self._sender = None  # the connected weight sender (rank 0)
        self._connecting = None  # a sender whose connect() has not succeeded yet (retried by the next sync)
        self._last_lr = self._lr()
        self._consumed_state: Optional[dict] = None  # the buffer's state after the last batch trained (rank 0)
        self._buffer = None  # BufferClient of step_from_buffer (rank 0)
        self._stop_waiting_step = 0  # stop_waiting(step): the step whose wait for data is to end (rank 0)
        self._buffer_endpoints, self._buffer_secret = buffer_endpoints, buffer_secret

    # ------------------------------------------------------------------------------------------
    # Data in

    def _rows(self, groups: list[TrajectoryGroup]) -> tuple[list[list[TrainRow]], dict[str, float]]:
        """Filter (§6), compute advantages and build per-group training rows; plus data metrics."""
        stats: dict[str, float] = {}
        values = [s.reward.value for g in groups for s in g.samples if s.reward.value is not None]
        stats["reward/mean"] = sum(values) / len(values) if values else float("nan")
        lags = [self.version - v for g in groups for s in g.samples for v in s.token_versions]
        stats["staleness/mean"] = sum(lags) / len(lags) if lags else 0.0
        stats["staleness/max"] = float(max(lags)) if lags else 0.0
        hist: dict[str, int] = {}
        for g in groups:
            for s in g.samples:
                key = str(self.version - s.min_version)
                hist[key] = hist.get(key, 0) + 1
        kept, counts = filter_groups(groups)
        stats.update({k: float(v) for k, v in counts.items()})
        out: list[list[TrainRow]] = []
        if kept:
            adv = group_advantages(kept).tolist()
            i = 0
            for g in kept:
                rows = []
                for s in g.samples:
                    if s.response_ids and g.prompt_ids:
                        rows.append(TrainRow(s.sample_id, list(g.prompt_ids), list(s.response_ids),
                                             list(s.behavior_logprobs), list(s.token_versions), adv[i]))
                    i += 1
                if rows:
                    out.append(rows)
        stats["_hist"] = hist  # type: ignore[assignment]
        return out, stats

    # ------------------------------------------------------------------------------------------
    # Forward passes

    def _forward(self, model: torch.nn.Module, mb: MicroBatch, need_entropy: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(log-probs [N, T] of the response tokens, entropies [N, T] or None) at the sampling temperature."""
        return forward_micro_batch(model, mb, self.temperature, need_entropy)

    def plan(self, rows: list[TrainRow]) -> tuple[list[MicroBatch], int]:
        """This rank's collated micro-batches of one mini-batch (on the device) and the positions every
        rank's forward passes compute for it (padding included; the same number on every rank)."""
        budget = self.lcfg.max_tokens_per_micro_batch
        packed = budget is not None
        computed = 0
        mine: list[list[TrainRow]] = []
        for r in range(self.world_size):
            chunks = plan_rank(rows, r, self.world_size, self.lcfg.micro_batch_size, budget)
            computed += computed_positions(chunks, packed, rows[0])
            if r == self.rank:
                mine = chunks
        if packed:
            mbs = [collate_packed(c, dummy_row=rows[0]) for c in mine]
        else:
            mbs = [collate(c, self.pad_id, dummy_row=rows[0]) for c in mine]
        return [mb.to(self.device) for mb in mbs], computed

    @torch.no_grad()
    def _no_grad_pass(self, model: torch.nn.Module, mbs: list[MicroBatch], need_entropy: bool) -> list[tuple]:
        return [self._forward(model, mb, need_entropy) for mb in mbs]

    def _denominators(self, mbs: list[MicroBatch], entropies: Optional[list[torch.Tensor]]) -> LossDenominators:
        """Mini-batch totals over every rank's micro-batches (one all-reduce)."""
        local = [0.0, 0.0, 0.0, 0.0]
        for i, mb in enumerate(mbs):
            d = loss_denominators(entropies[i] if entropies is not None else None, mb.response_mask, self.cfg.loss)
            local[0] += d.num_responses
            local[1] += d.num_tokens
            local[2] += d.num_low_tokens or 0
            local[3] += d.num_high_tokens or 0
        tot = [int(round(v)) for v in all_reduce_sum(local, self.device)]
        if entropies is None:
            return LossDenominators(tot[0], tot[1])
        return LossDenominators(*tot)

    def _m2po_cutoff(self, mbs: list[MicroBatch], proxs: list[torch.Tensor]) -> float:
        """m2po's cutoff over the whole mini-batch: every rank's micro-batches (one all-gather)."""
        local = [squared_log_ratios(p, mb.behavior_logprobs, mb.response_mask).cpu() for mb, p in zip(mbs, proxs)]
        every = [t for part in all_gather_objects(local) for t in part]
        return m2po_cutoff(torch.cat(every) if every else torch.zeros(0), self.cfg.loss.m2po_tau)

    # ------------------------------------------------------------------------------------------
    # Training step

    def _lr(self) -> float:
        w = self.lcfg.warmup_steps
        return self.lcfg.lr * (min(1.0, (self.opt_steps + 1) / w) if w > 0 else 1.0)

    def accumulate_gradients(self, mbs: list[MicroBatch], proxs: list[Optional[torch.Tensor]],
                             refs: list[Optional[torch.Tensor]], den: LossDenominators) -> list[dict]:
        """Forward/backward every micro-batch of this rank into `.grad` (not zeroed); returns real micro-batches' metrics."""
        parts = []
        need_entropy = True  # the loss always needs H_t for the token classes
        for mb, prox, ref in zip(mbs, proxs, refs):
            logp, ent = self._forward(self.model, mb, need_entropy)
            prox_t = logp.detach() if prox is None else prox
            loss, metrics = policy_loss(
                logp, prox_t, mb.behavior_logprobs, ref, ent, mb.advantages, mb.response_mask, self.cfg.loss,
                denominators=den,
            )
            (loss * self.world_size).backward()
            if mb.num_real_rows:
                parts.append(metrics)
        return parts

    def _optimizer_step(self) -> tuple[float, bool]:
        """Clip, then AdamW step unless the gradient norm is not finite; returns (grad norm, applied)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.lcfg.grad_clip, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        gn = float(norm)
        applied = math.isfinite(gn)
        if applied:
            lr = self._lr()
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            self.optimizer.step()
            self.opt_steps += 1
            self._last_lr = lr
        else:
            self.skipped_steps += 1
            log.warning("skipping optimizer step: gradient norm %s is not finite", gn)
        self.optimizer.zero_grad(set_to_none=True)
        return gn, applied

    def step(self, groups: Optional[Sequence[TrajectoryGroup]]) -> dict[str, Any]:
        """One training step on `groups` (rank 0's list; other ranks pass None). Returns the step's
        metrics (docs/architecture.md names plus loss/*, is/*, groups/*, learner/*), identical on
        every rank."""
        return self._step(join_groups([encode_group(g) for g in groups]) if self.rank == 0 else None, 0.0)[0]

    def _step(self, batch: Optional[bytes], wait: float) -> tuple[dict[str, Any], list[TrajectoryGroup]]:
        """One training step on rank 0's `batch` (a `join_groups` array; `wait`: the seconds rank 0
        waited for it): (the step's metrics, the groups it decoded)."""
        groups = decode_groups(broadcast_bytes(batch, src=0))
        t0 = time.perf_counter()
        groups_rows, stats = self._rows(groups)
        hist = stats.pop("_hist")
        n_mini = self.lcfg.batch_groups // self.lcfg.mini_batch_groups
        minibatches = split_minibatches(groups_rows, n_mini)
        plans, computed = [], 0
        for rows in minibatches:  # pi_prox, pi_ref and the training passes all run these same micro-batches
            mbs, n = self.plan(rows)
            plans.append(mbs)
            computed += n
        # pi_prox / pi_ref at the step's starting weights; with one mini-batch and one epoch the first
        # training forward runs at exactly these weights, so its detached log-probs are pi_prox.
        # m2po's mask needs pi_prox of the whole mini-batch before the first training forward.
        m2po = self.cfg.loss.is_correction == "m2po"
        reuse_prox = len(plans) == 1 and self.lcfg.ppo_epochs == 1 and not m2po
        need_ent_den = self.cfg.loss.loss_agg == "token-mean" and self.need_ref
        proxs, refs, ents0 = [], [], []
        for mbs in plans:
            if reuse_prox and not need_ent_den:
                proxs.append([None] * len(mbs))
                ents0.append(None)
            else:
                res = self._no_grad_pass(self.model, mbs, need_ent_den)
                proxs.append([None] * len(mbs) if reuse_prox else [r[0] for r in res])
                ents0.append([r[1] for r in res] if need_ent_den else None)
            if self.need_ref:
                refs.append([r[0] for r in self._no_grad_pass(self.ref_model, mbs, False)])
            else:
                refs.append([None] * len(mbs))
        cutoffs = [self._m2po_cutoff(mbs, proxs[i]) if m2po else None for i, mbs in enumerate(plans)]
        parts, norms, losses, applied_any = [], [], [], False
        for epoch in range(self.lcfg.ppo_epochs):
            for i, mbs in enumerate(plans):
                ents = None
                if need_ent_den:  # token classes of the current weights for the KL token-mean denominators
                    fresh = epoch == 0 and not applied_any
                    ents = ents0[i] if fresh else [r[1] for r in self._no_grad_pass(self.model, mbs, True)]
                den = self._denominators(mbs, ents)
                if m2po:
                    den = dataclasses.replace(den, m2po_cutoff=cutoffs[i])
                local = self.accumulate_gradients(mbs, proxs[i], refs[i], den)
                merged_all = [m for m in all_gather_objects(merge_metrics(local) if local else None) if m]
                merged = merge_metrics(merged_all)
                parts.append(merged)
                losses.append(merged["loss"])
                gn, applied = self._optimizer_step()
                norms.append(gn)
                applied_any |= applied
        if applied_any:
            self.version += 1
        self.step_count += 1
        elapsed = time.perf_counter() - t0
        n_tokens = sum(r.num_tokens for g in groups_rows for r in g) * self.lcfg.ppo_epochs
        out: dict[str, Any] = dict(merge_metrics(parts)) if parts else {}
        for k in ("loss", "loss/pg", "loss/kl_low", "loss/kl_high"):
            if k in out:  # merge_metrics sums contributions; per step report the mean over optimizer steps
                out[k] /= len(parts)
        out.update(stats)
        out.update({
            "step": self.step_count, "version": self.version, "lr": self._last_lr,
            "grad_norm": (sum(norms) / len(norms)) if norms else float("nan"),
            "learner/losses": losses, "learner/optimizer_steps": len(norms),
            "learner/skipped_steps": self.skipped_steps, "learner/updated": applied_any,
            "learner/wait_for_data_s": wait, "learner/step_s": elapsed,
            "learner/tokens": n_tokens, "learner/tokens_per_s": n_tokens / elapsed if elapsed > 0 else 0.0,
            "learner/padding_fraction": 1.0 - n_tokens / (computed * self.lcfg.ppo_epochs) if computed else 0.0,
            "learner/samples": sum(len(g) for g in groups_rows), "staleness/hist": hist,
        })
        return out, groups

    def step_from_buffer(self, poll_s: float = 10.0) -> dict[str, Any]:
        """One training step on `batch_groups` groups sampled from the run's replay buffer.

        Rank 0 is the buffer's only consumer. While it waits for groups trainable at the current
        version, every rank meets in a small broadcast every `poll_s` seconds, so no collective ever
        waits longer than that (however slow generation is). After the step rank 0 tells the buffer
        the new version (admission and staleness follow it).
        """
        t0 = time.perf_counter()
        batch = None
        while True:
            if self.rank == 0:
                if self._buffer is None:
                    from archer_async.buffer_client import BufferClient

                    if self._buffer_endpoints is not None and self._buffer_secret is not None:
                        self._buffer = BufferClient(self._buffer_endpoints, self._buffer_secret, client_id="learner")
                    else:
                        self._buffer = BufferClient.from_run_dir(self.run_dir, client_id="learner")
                from archer_async.buffer_client import BufferTimeout

                try:
                    batch = self._buffer.sample(self.lcfg.batch_groups, self.version, timeout=poll_s)
                except BufferTimeout:
                    batch = None
            state = broadcast_object("batch" if batch is not None else "stop" if self._stop_waiting_step
                                     == self.step_count + 1 else "wait", src=0)
            if state == "stop":  # nothing sampled: the step is called again once actors generate
                return {"waiting_stopped": True}
            if state == "batch":
                break
        out, groups = self._step(batch.payload if self.rank == 0 else None, time.perf_counter() - t0)
        if self.rank == 0:
            from learner import trained_ids

            self._consumed_state = batch.consumed_state  # checkpointed with the weights it trained
            # what entered this optimizer step (exactly-once accounting; cut back on resume)
            trained_ids.append_step(self.run_dir, self.step_count, [g.group_id for g in groups],
                                    [sm.sample_id for g in groups for sm in g.samples])
            if self.cfg.launch.mode != "sync":
                # sync mode: the driver announces the version once the actors serve it (no stale window)
                self._buffer.set_version(self.version)
        return out

    def stop_waiting(self, step: int) -> None:
        """Rank 0, called while step_from_buffer runs (another Ray thread): if step `step` is still waiting
        for data, it returns {"waiting_stopped": True} at its next poll; once its batch arrived, no effect."""
        self._stop_waiting_step = int(step)

    # ------------------------------------------------------------------------------------------
    # Weights out

    def iter_weights(self, dtype: Optional[torch.dtype] = None, bucket_bytes: Optional[int] = None):
        """Collective generator of (HF name, full tensor) on rank 0 (empty elsewhere); see learner.weights."""
        return iter_full_weights(
            self.model, self.rank, dtype or self.param_dtype, bucket_bytes or self.cfg.sync.bucket_mb << 20,
        )

    def broadcast_weights(self, version: Optional[int] = None, sender_init: Any = None) -> dict[str, Any]:
        """Send the current full weights to the actors (collective; rank 0 sends).

        `sender_init`: the rendezvous description of learner.weight_sender.WeightSender, needed
        until a connect succeeded (rank 0; ignored elsewhere); the sender is kept only once connected
        (a failed connect is retried by the next call).
        Returns {"ok", "version", "seconds", "error"} identical on every rank. A failed send leaves
        the actors on their old version; the ranks still finish the gather in step.
        """
        version = self.version if version is None else int(version)
        t0 = time.perf_counter()
        it = self.iter_weights()
        result: dict[str, Any] = {"ok": True, "version": version, "error": ""}
        if self.rank == 0:
            try:
                if self._sender is None:
                    from learner.weight_sender import WeightSender

                    if self._connecting is None:
                        if sender_init is None:
                            raise UserError("broadcast_weights: the first call needs sender_init")
                        backend = None if self.cfg.sync.backend == "auto" else self.cfg.sync.backend
                        self._connecting = WeightSender(sender_init, backend, self.cfg.sync.timeout_s)
                    # raises when a receiver is missing: the next call waits again on the same store
                    self._connecting.connect()
                    self._sender, self._connecting = self._connecting, None  # kept only once connected
                info = self._sender.send(it, version, self.cfg.sync.bucket_mb << 20)
                if isinstance(info, dict):
                    result.update({k: v for k, v in info.items() if k not in result})
            except Exception as e:  # noqa: BLE001 - reported to the caller, ranks stay in step
                result.update(ok=False, error=f"{type(e).__name__}: {e}")
                log.error("weight sync to version %d failed: %s", version, result["error"])
        drain(it)
        result["seconds"] = time.perf_counter() - t0
        return broadcast_object(result, src=0)

    def export_hf(self, step: Optional[int] = None) -> Path:
        """Write `run_dir/hf/step-N/` (transformers/vLLM loadable; collective) and return it."""
        step = self.step_count if step is None else int(step)
        return export_hf(self.model, self.rank, self.run_dir / "hf", step, self.model_dir, self.param_dtype,
                         self.cfg.sync.bucket_mb << 20, keep=self.lcfg.keep_hf_exports)

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    @property
    def checkpoint_root(self) -> Path:
        """`run_dir/checkpoints`."""
        return self.run_dir / "checkpoints"

    def save_checkpoint(self, step: Optional[int] = None, extra_state: Optional[dict] = None) -> Path:
        """Commit model, optimizer, LR schedule, RNG, version, step and `extra_state` (JSON-able) as `step-N`."""
        step = self.step_count if step is None else int(step)
        state = {
            "step": step, "step_count": self.step_count, "version": self.version, "opt_steps": self.opt_steps,
            "skipped_steps": self.skipped_steps,
            "lr_schedule": {"base_lr": self.lcfg.lr, "warmup_steps": self.lcfg.warmup_steps, "opt_steps": self.opt_steps},
            "world_size": self.world_size, "extra_state": dict(extra_state or {}),
        }
        if self.rank == 0 and self._consumed_state is not None:
            state["extra_state"]["buffer"] = self._consumed_state  # one commit with the weights it trained
        return ckpt.save_checkpoint(self.checkpoint_root, step, self.model, self.optimizer, state,
                                    self.rank, self.world_size, keep=self.lcfg.keep_checkpoints)

    def load_checkpoint(self, path: Optional[Union[str, Path]] = None) -> Optional[dict]:
        """Restore a checkpoint (default: `latest`, validated); returns its extra_state, None if there is none."""
        if path is None:
            found = ckpt.latest_checkpoint(self.checkpoint_root)
            if found is None:
                return None
            path = found
        state = ckpt.load_checkpoint(Path(path), self.model, self.optimizer, self.rank)
        self.step_count = int(state["step_count"])
        self.version = int(state["version"])
        self.opt_steps = int(state["opt_steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.rank == 0:
            from learner import trained_ids

            # steps trained after this checkpoint were lost with the crash and will be trained again
            dropped = trained_ids.truncate_after(self.run_dir, int(state["step"]))
            if dropped:
                log.info("trained-ids record: dropped %d step(s) past checkpoint step %s", dropped, state["step"])
        return state.get("extra_state", {})

    def close(self) -> None:
        """Close the weight sender and leave the process group."""
        for sender in (self._sender, self._connecting):
            if sender is not None and hasattr(sender, "close"):
                try:
                    sender.close()
                except Exception:  # noqa: BLE001
                    log.exception("closing the weight sender failed")
        self._sender = self._connecting = None
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

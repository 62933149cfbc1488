"""One micro-batch through the model: response-token log-probs and entropies, padded or packed.

Padded micro-batch (learner.batching.collate): `input_ids [N, L]`, causal attention, no mask.

Packed micro-batch (learner.batching.collate_packed): one sequence `[1, S]` of concatenated rows with
position ids restarting per row. Every row must attend only to itself; the model receives the row
boundaries as `cu_seq_lens_q/k` and `max_length_q/k` (transformers' padding-free keyword arguments):
  - flash_attention_2 / flash_attention_3 (GPU): transformers hands them to the varlen flash kernel;
  - on CPU (and on GPU without flash-attn) the model is loaded with `VARLEN_SDPA`, an attention function
    registered here that runs causal SDPA on each row's slice of the packed sequence, so no S x S mask
    is built and no position attends across rows. With no row boundaries (a padded micro-batch) it is
    plain causal SDPA, the same call transformers' "sdpa" makes.
The model keeps only the logits of positions that predict a response token (`logits_to_keep` as an
index tensor), so the vocabulary projection costs no more than the padded path's.
"""

from __future__ import annotations

from typing import Optional

import torch

from archer_async.loss import entropy_from_logits, logprobs_from_logits

from .batching import MicroBatch, select_response_logits

VARLEN_SDPA = "archer_varlen_sdpa"
"""Name under which `varlen_sdpa_attention` is registered with transformers' AttentionInterface."""

FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """Attention of a packed sequence: causal SDPA per row (query/key/value [B, H, S, D] -> [B, S, H, D]).

    Without `cu_seq_lens_q` in kwargs it is transformers' SDPA attention unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.pop("cu_seq_lens_q", None)
    for k in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(k, None)
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    assert attention_mask is None, "a packed sequence carries its row boundaries, not a mask"
    bounds = cu.tolist()
    outs = []
    for a, b in zip(bounds, bounds[1:]):
        out, _ = sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                        dropout=dropout, scaling=scaling, is_causal=True, **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=1), None


def register_varlen_sdpa() -> None:
    """Register `VARLEN_SDPA` with transformers (idempotent). No mask function is registered for it, so
    transformers builds no attention mask for it (causality comes from SDPA's is_causal)."""
    from transformers import AttentionInterface

    if VARLEN_SDPA not in AttentionInterface._global_mapping:
        AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)


def forward_micro_batch(model: torch.nn.Module, mb: MicroBatch, temperature: float,
                        need_entropy: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(log-probs [N, T] of the response tokens, entropies [N, T] or None) at the sampling temperature."""
    if mb.packed:
        return _forward_packed(model, mb, temperature, need_entropy)
    out = model(input_ids=mb.input_ids, logits_to_keep=mb.logits_to_keep, use_cache=False)
    logits = out.logits
    if mb.input_ids.shape[0] == 1:  # one row: the response logits are a contiguous slice (no copy)
        start = int(mb.gather_index[0, 0])
        logits = logits[:, start:start + mb.gather_index.shape[1]]
        if logits.shape[1] < mb.gather_index.shape[1]:
            logits = select_response_logits(out.logits, mb.gather_index)
    else:
        logits = select_response_logits(logits, mb.gather_index)
    logp = logprobs_from_logits(logits, mb.response_ids, temperature)
    ent = entropy_from_logits(logits, temperature) if need_entropy else None
    return logp, ent


def _forward_packed(model: torch.nn.Module, mb: MicroBatch, temperature: float,
                    need_entropy: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    keep = mb.logits_to_keep
    assert isinstance(keep, torch.Tensor) and mb.cu_seq_lens is not None
    out = model(input_ids=mb.input_ids, position_ids=mb.position_ids, logits_to_keep=keep, use_cache=False,
                cu_seq_lens_q=mb.cu_seq_lens, cu_seq_lens_k=mb.cu_seq_lens,
                max_length_q=mb.max_len, max_length_k=mb.max_len)
    logits = out.logits  # [1, M, V]: position keep[m] predicts token keep[m] + 1
    targets = mb.input_ids[:, keep + 1]
    logp_flat = logprobs_from_logits(logits, targets, temperature)[0]  # [M]
    logp = logp_flat[mb.gather_index]  # [N, T] (padding repeats a real value; masked by response_mask)
    ent = None
    if need_entropy:
        ent = entropy_from_logits(logits, temperature)[0][mb.gather_index]
    return logp, ent

"""Model loading and FSDP2 wrapping for the learner.

The policy is a Hugging Face causal LM loaded with float32 master weights; FSDP2
(`torch.distributed.fsdp.fully_shard`) shards every decoder layer and then the root module over a
1-D device mesh. On GPU a `MixedPrecisionPolicy` runs forward/backward in the configured parameter
dtype (bf16) and reduces gradients in `learner.reduce_dtype` (fp32); on CPU everything is float32.
Sharding keeps Hugging Face parameter names (fully_shard does not rename), so the state dict, the
weight broadcast and the HF export all use the names transformers and vLLM expect.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from archer_async.config import UserError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelPathError(UserError):
    """The model directory is missing or is not a Hugging Face causal-LM directory."""


def torch_dtype(name: str) -> torch.dtype:
    """Config dtype name ("float32", "bfloat16", "float16") -> torch.dtype."""
    return _DTYPES[name]


def resolve_model_path(model_path: Optional[str], cfg_path: Optional[str]) -> Path:
    """The model directory to load: the explicit argument, else `model.path`, else the embedded tiny model."""
    path = model_path or cfg_path
    if path is None:
        from archer_async.config import TINY_MODEL_DIR  # built on first use

        path = TINY_MODEL_DIR
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ModelPathError(f"model.path {str(p)!r}: not a Hugging Face model directory (no config.json)")
    return p


def select_attn_implementation(requested: str, device: torch.device, packed: bool = False) -> str:
    """`model.attn_implementation` -> transformers name: auto picks flash-attn on GPU when installed, else SDPA.

    `packed` (learner.max_tokens_per_micro_batch set): flash-attn runs packed sequences natively (varlen);
    SDPA becomes learner.forward.VARLEN_SDPA (causal SDPA per packed row); eager cannot honour packing."""
    attn = _select_attn(requested, device)
    if not packed:
        return attn
    from .forward import FLASH_IMPLEMENTATIONS, VARLEN_SDPA, register_varlen_sdpa

    if attn in FLASH_IMPLEMENTATIONS:
        return attn
    if attn == "sdpa":
        register_varlen_sdpa()
        return VARLEN_SDPA
    raise UserError(f"model.attn_implementation={requested}: packed micro-batches (learner.max_tokens_per_micro_batch) "
                    "need sdpa, flash_attention_2 or auto")


def _select_attn(requested: str, device: torch.device) -> str:
    if requested != "auto":
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise UserError("model.attn_implementation=flash_attention_2 but flash_attn is not installed")
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_causal_lm(path: Path, attn_implementation: str, device: torch.device,
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a Hugging Face causal LM (float32 master weights by default) on `device` (eval mode, no dropout)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=attn_implementation
    )
    model.config.use_cache = False
    model.to(device)
    model.eval()  # dropout off: the objective is defined without it and resume must be deterministic
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (model.model.layers for Qwen2/Llama-style models)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ModelPathError(f"unsupported architecture {type(model).__name__}: no model.layers")
    return list(layers)


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Apply FSDP2 to every decoder layer, then the root (embeddings, final norm and a tied lm_head stay in the root group)."""
    mp = None
    if param_dtype != torch.float32 or reduce_dtype != torch.float32:
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp is not None:
        kwargs["mp_policy"] = mp
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout probability (the objective is defined without dropout; resume must be deterministic)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    if hasattr(model, "config") and hasattr(model.config, "attention_dropout"):
        model.config.attention_dropout = 0.0


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant; parameter names unchanged).

    transformers checkpoints layers only in training mode, so the model is put in train mode with
    every dropout disabled (numerically the same as eval mode).
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    disable_dropout(model)
    model.train(True)


def build_policy_and_reference(
    path: Path,
    mesh: DeviceMesh,
    device: torch.device,
    dtype_name: str,
    reduce_dtype_name: str,
    attn_request: str,
    activation_checkpointing: bool,
    need_reference: bool,
    packed: bool = False,
) -> tuple[nn.Module, Optional[nn.Module], str]:
    """Load and shard the trainable policy and (optionally) a frozen reference copy; returns (policy, ref, attn).
    `packed`: the micro-batches are packed sequences (see select_attn_implementation)."""
    attn = select_attn_implementation(attn_request, device, packed)
    param_dtype = torch_dtype(dtype_name)
    reduce_dtype = torch_dtype(reduce_dtype_name)
    policy = load_causal_lm(path, attn, device)
    if activation_checkpointing:
        enable_activation_checkpointing(policy)
    shard_model(policy, mesh, param_dtype, reduce_dtype)
    ref = None
    if need_reference:
        ref = load_causal_lm(path, attn, device, dtype=param_dtype)  # frozen: no float32 master copy needed
        for p in ref.parameters():
            p.requires_grad_(False)
        shard_model(ref, mesh, param_dtype, reduce_dtype)
    log.info("learner model %s: attn=%s dtype=%s reference=%s", path, attn, dtype_name, need_reference)
    return policy, ref, attn

"""Hugging Face export: `RUN_DIR/hf/step-N/` loadable by transformers and vLLM with no conversion.

Contents: config.json (the source config, `dtype` set to the export dtype, use_cache on),
model.safetensors (HF parameter names; a tied lm_head is omitted as save_pretrained does),
generation_config.json (copied from the source model, else derived from the config) and the
tokenizer files of the source model directory. Written into a hidden temporary directory and
renamed into place, so a reader never sees a half-written export.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from archer_async.fsio import fsync_dir

from .checkpoint import _barrier
from .retention import prune
from .weights import iter_full_weights

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)


def export_hf(
    model: nn.Module,
    rank: int,
    out_root: Path,
    step: int,
    source_dir: Path,
    dtype: torch.dtype,
    bucket_bytes: int = 256 << 20,
    keep: int = 0,
) -> Path:
    """Gather full weights bucket by bucket (collective) and write `out_root/step-N/` on rank 0; returns the path.
    keep > 0: afterwards rank 0 deletes exports older than the newest `keep` (hidden temporary
    directories of exports being written are never touched)."""
    out_root = Path(out_root)
    final = out_root / f"step-{int(step)}"
    tensors: dict[str, torch.Tensor] = {}
    for name, t in iter_full_weights(model, rank, dtype, bucket_bytes, device=torch.device("cpu")):
        tensors[name] = t.contiguous()
    if rank == 0:
        out_root.mkdir(parents=True, exist_ok=True)
        tmp = out_root / f".tmp-step-{int(step)}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = copy.deepcopy(model.config)
        config.use_cache = True
        config.dtype = dtype
        config.save_pretrained(str(tmp))
        _write_generation_config(config, Path(source_dir), tmp)
        for fname in TOKENIZER_FILES:
            src = Path(source_dir) / fname
            if src.is_file():
                shutil.copy2(src, tmp / fname)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(out_root)
        prune(out_root, keep, lambda p: (p / "model.safetensors").is_file() and (p / "config.json").is_file(), final)
    del tensors
    _barrier()
    return final


def _write_generation_config(config, source_dir: Path, out_dir: Path) -> None:
    """Copy the source generation_config.json, or derive one from the model config."""
    src = source_dir / "generation_config.json"
    if src.is_file():
        shutil.copy2(src, out_dir / "generation_config.json")
        return
    from transformers import GenerationConfig

    GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))

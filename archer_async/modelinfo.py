"""Limits read from a Hugging Face model directory (its config.json), before any engine starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from archer_async.config import UserError


def context_length(model_dir: str | Path) -> Optional[int]:
    """The model's context length in tokens (`max_position_embeddings` of config.json, or of its
    `text_config`); None when the config does not say. Raises UserError on an unreadable config."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the model config ({type(e).__name__}: {e})") from e
    for c in (cfg, cfg.get("text_config") or {}):
        v = c.get("max_position_embeddings") if isinstance(c, dict) else None
        if isinstance(v, int) and v > 0:
            return v
    return None

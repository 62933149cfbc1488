"""`archer-async eval` fits --max-tokens to the model's context length (max_position_embeddings)."""

from __future__ import annotations

import json
import shutil

import pytest

from archer_async.config import TINY_MODEL_DIR, Config, UserError
from archer_async.modelinfo import context_length
from archer_async.taskgen import generate_tasks
from launch.evaluate import _fit_max_tokens


def _rows():
    _, ev = generate_tasks(10, 6, 0)
    return ev


def test_context_length_reads_config_and_text_config(tmp_path):
    assert context_length(TINY_MODEL_DIR) == 512
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 4096}}))
    assert context_length(tmp_path) == 4096
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x"}))
    assert context_length(tmp_path) is None
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json"):
        context_length(tmp_path)


def test_default_max_tokens_is_clamped_with_one_line_on_the_shipped_model():
    said: list[str] = []
    n, longest = _fit_max_tokens(TINY_MODEL_DIR, _rows(), 512, said.append)
    assert 0 < longest < 512 and n == 512 - longest
    assert len(said) == 1 and "--max-tokens 512" in said[0] and "512" in said[0] and str(n) in said[0]
    # the config eval builds from it is valid
    Config.model_validate({"model": {"path": str(TINY_MODEL_DIR)}, "data": {"max_prompt_length": longest},
                           "actors": {"max_response_length": n, "max_model_len": longest + n}})


def test_max_tokens_that_fits_is_kept_silently():
    said: list[str] = []
    n, _ = _fit_max_tokens(TINY_MODEL_DIR, _rows(), 64, said.append)
    assert n == 64 and said == []


def test_no_room_after_the_prompt_is_a_user_error(tmp_path):
    model = tmp_path / "m"
    shutil.copytree(TINY_MODEL_DIR, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["max_position_embeddings"] = 8
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="context length"):
        _fit_max_tokens(model, _rows(), 64, print)
    with pytest.raises(UserError, match="--max-tokens"):
        _fit_max_tokens(TINY_MODEL_DIR, _rows(), 0, print)

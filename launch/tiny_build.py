"""The embedded tiny model: a seeded, reproducible Qwen2 causal LM that RL can train on 2 CPU cores.

`build_tiny(out)` does, from nothing but a seed:

1. generates the tiny task data (`archer_async.taskgen.generate_tasks`);
2. trains a byte-level BPE tokenizer (HF `tokenizers`, single digits, chat special tokens) on the
   training split's prompts and reference responses, with a Qwen-style jinja chat template;
3. initialises a small Qwen2ForCausalLM (head_dim 64, which vLLM's CPU attention accepts;
   tied embeddings; rope);
4. runs a supervised warm start on the training split (loss on response tokens only): first every
   arithmetic answer is worked out in the `<think>` scratchpad, then most are given directly with an
   empty scratchpad. The warm-started model mostly guesses (rarely right) and only sometimes works the
   sum out (right about half the time): RL has a clear, verifiable choice to learn at the first
   response token, the kind of high-entropy "forking" token Archer's dual-token constraint is about;
5. measures held-out accuracy (greedy and T=0.8 with k samples) with the project's reward pool
   (`rewards.RewardPool`: the bubblewrap sandbox for code, math-verify for math), the graders
   every run uses; a pool that cannot start is an error, never a weaker grader;
6. saves everything in Hugging Face format (config.json, model.safetensors, tokenizer files,
   chat template, generation_config.json) plus `build_info.json` (sizes, timings, accuracies).

The result ships at `archer_async/assets/tiny/` (`tiny_model_path()`); `archer-async build-tiny`
rebuilds it. Two builds with the same spec on the same machine give bitwise-equal weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from archer_async.config import TINY_MODEL_DIR, RewardsConfig, UserError
from archer_async.data import prompt_ids

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""pad / chat-turn start / end of turn (the EOS of generation)."""
THINK_TOKENS = ("<think>", "</think>")
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Everything that determines a tiny build (same spec + same machine -> same bytes)."""

    seed: int = 0
    """Seed of the data generator, initialisation and SFT batch order."""
    num_train: int = 2000
    """Training problems generated (the same split the default RL run uses)."""
    num_eval: int = 200
    """Held-out problems generated (the default RL run's eval split)."""
    vocab_size: int = 512
    """BPE vocabulary target (bytes + merges + special tokens; the trainer may stop below it)."""
    hidden_size: int = 128
    """Model width."""
    num_layers: int = 3
    """Decoder layers."""
    num_heads: int = 2
    """Attention heads (head_dim = hidden_size / num_heads = 64)."""
    num_kv_heads: int = 2
    """Key/value heads (GQA when below num_heads)."""
    intermediate_size: int = 512
    """MLP width."""
    max_position_embeddings: int = 512
    """Longest sequence (prompt + response)."""
    sft_steps: int = 550
    """Supervised warm-start optimizer steps."""
    sft_batch_size: int = 32
    """Sequences per SFT step."""
    sft_lr: float = 3e-3
    """Peak AdamW learning rate of the warm start (linear warm-up over 10% of the steps, cosine to 10%)."""
    sft_math_fraction: float = 0.75
    """Share of SFT examples drawn from tiny_math rows (the code family is learnt much faster)."""
    sft_direct_fraction: float = 0.8
    """Share of tiny_math SFT examples answered directly, with an empty scratchpad
    (`<think></think>` then the boxed answer) instead of the worked column arithmetic. The warm
    start then mostly guesses; working the sum out is right far more often, so RL has a clear
    choice to learn at the first response token."""
    sft_direct_start: float = 0.7
    """Point of the warm start (fraction of sft_steps) from which direct answers are mixed in; before
    it every tiny_math example is worked, so the model first learns the column arithmetic."""
    eval_problems: int = 200
    """Held-out problems measured at the end of the build (0: skip the measurement)."""
    eval_k: int = 4
    """Samples per held-out problem at T=0.8."""
    max_new_tokens: int = 64
    """Generation limit of the measurement (the default actors.max_response_length)."""


def build_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (single-digit pre-split) trained on `texts`, wrapped for transformers."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TOKENS), special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in THINK_TOKENS])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", model_max_length=512)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_model(spec: TinySpec, tokenizer):
    """A freshly initialised Qwen2ForCausalLM (seeded) sized by `spec`, vocab padded to 64."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab = (len(tokenizer) + 63) // 64 * 64
    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        use_cache=True, dtype="float32")
    torch.manual_seed(spec.seed)
    return Qwen2ForCausalLM(cfg).float()


def direct_reference(reference: str) -> Optional[str]:
    """The reference with its scratchpad emptied (`<think></think>` + the answer), or None without one."""
    m = re.fullmatch(r"<think>.*?</think>(.*)", reference, flags=re.S)
    return f"<think></think>{m.group(1)}" if m else None


def _sft_examples(tokenizer, rows: list[dict]) -> list[tuple[list[int], int, Optional[list[int]]]]:
    """(ids [P+R+1], P, direct ids or None) per row: prompt, reference response, EOS (loss on the
    last R+1 tokens); the third item is the same with the direct-answer response, where one exists."""
    out = []
    eos = tokenizer.eos_token_id
    for row in rows:
        p = prompt_ids(tokenizer, row)
        ref = row["extra_info"]["reference"]
        r = tokenizer.encode(ref, add_special_tokens=False)
        d = direct_reference(ref)
        direct = p + tokenizer.encode(d, add_special_tokens=False) + [eos] if d is not None else None
        out.append((p + r + [eos], len(p), direct))
    return out


def _lr_at(step: int, total: int, warm: int, peak: float) -> float:
    """Linear warm-up to `peak` over `warm` steps, then cosine decay to peak / 10 at `total`."""
    if step < warm:
        return peak * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))


def sft(model, tokenizer, rows: list[dict], spec: TinySpec, log: Callable[[str], None] = print,
        on_step: Optional[Callable[[int], None]] = None) -> list[float]:
    """Supervised warm start: AdamW, warm-up + cosine lr, seeded source-weighted batches.

    Returns the loss curve; `on_step(step)` (if given) runs after each optimizer step."""
    import torch

    from archer_async.taskgen import MATH_SOURCE

    examples = _sft_examples(tokenizer, rows)
    n_math = sum(1 for r in rows if r["data_source"] == MATH_SOURCE)
    n_other = len(rows) - n_math
    frac = spec.sft_math_fraction if n_math and n_other else (1.0 if n_math else 0.0)
    weights = torch.tensor([frac / n_math if r["data_source"] == MATH_SOURCE else (1 - frac) / n_other
                            for r in rows], dtype=torch.float64)  # [N] sampling weight per row
    gen = torch.Generator().manual_seed(spec.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = max(1, spec.sft_steps // 10)
    model.train()
    losses = []
    for step in range(spec.sft_steps):
        idx = torch.multinomial(weights, spec.sft_batch_size, replacement=True, generator=gen).tolist()
        mix = spec.sft_direct_fraction > 0 and step >= spec.sft_direct_start * spec.sft_steps
        coins = torch.rand(len(idx), generator=gen).tolist() if mix else [1.0] * len(idx)  # [B]
        batch = [(d if d is not None and c < spec.sft_direct_fraction else ids, plen)
                 for (ids, plen, d), c in ((examples[i], c) for i, c in zip(idx, coins))]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)  # [B, L]
        labels = torch.full((len(batch), width), -100, dtype=torch.long)  # [B, L]
        attn = torch.zeros((len(batch), width), dtype=torch.long)  # [B, L]
        for b, (ids, plen) in enumerate(batch):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            labels[b, plen: len(ids)] = torch.tensor(ids[plen:])
            attn[b, : len(ids)] = 1
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, spec.sft_steps, warm, spec.sft_lr)
        loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach().item())
        if step % 50 == 0 or step == spec.sft_steps - 1:
            log(f"sft step {step:4d}/{spec.sft_steps} loss {losses[-1]:.4f}")
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    return losses


def generate(model, tokenizer, rows: list[dict], *, n: int, temperature: float, max_new_tokens: int,
             seed: int, batch_size: int = 64) -> list[list[str]]:
    """n decoded responses per row (temperature 0: greedy, n must be 1). Seeded and deterministic."""
    import torch

    if temperature == 0 and n != 1:
        raise ValueError("greedy decoding gives one response per prompt (n=1)")
    prompts = [prompt_ids(tokenizer, row) for row in rows]
    flat = [p for p in prompts for _ in range(n)]
    texts: list[str] = []
    torch.manual_seed(seed)
    for s in range(0, len(flat), batch_size):
        chunk = flat[s: s + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)  # [B, P] left-padded
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, p in enumerate(chunk):
            ids[b, width - len(p):] = torch.tensor(p)
            attn[b, width - len(p):] = 1
        kw = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else dict(do_sample=False)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kw)
        texts.extend(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))
    return [texts[i * n: (i + 1) * n] for i in range(len(rows))]


def grade(pool, rows: list[dict], responses: list[list[str]]) -> list[list[Optional[float]]]:
    """Rewards (1.0 / 0.0 / None for an infra error) of `responses` (a list per row), by the reward pool."""
    items = [(row["data_source"], row["reward_model"]["ground_truth"], r)
             for row, resp in zip(rows, responses) for r in resp]
    flat = [rw.value for rw in pool.score(items, training=False)]
    out, pos = [], 0
    for resp in responses:
        out.append(flat[pos: pos + len(resp)])
        pos += len(resp)
    return out


def evaluate(model, tokenizer, rows: list[dict], *, k: int, seed: int, max_new_tokens: int = 64,
             pool=None) -> dict:
    """Held-out accuracy: greedy (avg@1) and T=0.8 with k samples (avg@k, pass@k), overall and per
    source, graded by `pool` (a `rewards.RewardPool`; None: one with the default rewards config)."""
    from launch.evaluation import summarize
    from rewards import RewardPool

    own = pool is None
    pool = pool or RewardPool(RewardsConfig())
    report: dict = {"grader": f"rewards.RewardPool (sandbox {pool.cfg.sandbox})", "problems": len(rows), "k": k}
    try:
        for name, temp, n in (("greedy", 0.0, 1), ("t0.8", 0.8, k)):
            responses = generate(model, tokenizer, rows, n=n, temperature=temp,
                                 max_new_tokens=max_new_tokens, seed=seed)
            rewards = grade(pool, rows, responses)
            res = {"all": summarize(rewards, n)}
            for src in sorted({r["data_source"] for r in rows}):
                res[src] = summarize([rw for rw, row in zip(rewards, rows) if row["data_source"] == src], n)
            report[name] = {key: {"avg": round(v["avg_at_k"], 4), "pass": round(v["pass_at_k"], 4),
                                  "problems": v["problems"]} for key, v in res.items()}
    finally:
        if own:
            pool.close()
    return report


def build_tiny(out: str | Path, spec: TinySpec = TinySpec(), force: bool = False,
               log: Callable[[str], None] = print) -> dict:
    """Build the tiny model into `out` (HF format) and return the build report (also build_info.json)."""
    import torch

    from archer_async.taskgen import generate_tasks

    out = Path(out)
    if (out / "config.json").exists() and not force:
        raise UserError(f"build-tiny: {out} already holds a model (use --force to rebuild)")
    t0 = time.perf_counter()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        train_rows, eval_rows = generate_tasks(spec.num_train, spec.num_eval, spec.seed)
        texts = [r["prompt"][0]["content"] for r in train_rows] + [r["extra_info"]["reference"] for r in train_rows]
        tokenizer = build_tokenizer(texts, spec.vocab_size)
        model = build_model(spec, tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"tiny model: {n_params} parameters, vocab {len(tokenizer)} (padded {model.config.vocab_size})")
        t_sft = time.perf_counter()
        losses = sft(model, tokenizer, train_rows, spec, log=log)
        sft_s = time.perf_counter() - t_sft
    finally:
        torch.use_deterministic_algorithms(prev_det)

    tmp = out.with_name(out.name + ".tmp-build")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)

    report: dict = {
        "spec": dataclasses.asdict(spec), "parameters": n_params, "vocab_size": len(tokenizer),
        "sft_seconds": round(sft_s, 1), "sft_final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
    }
    if spec.eval_problems > 0:
        t_eval = time.perf_counter()
        report["heldout"] = evaluate(model, tokenizer, eval_rows[: spec.eval_problems], k=spec.eval_k,
                                     seed=spec.seed, max_new_tokens=spec.max_new_tokens)
        report["eval_seconds"] = round(time.perf_counter() - t_eval, 1)
        for name in ("greedy", "t0.8"):
            h = report["heldout"][name]
            log(f"held-out {name}: " + ", ".join(f"{s} {v['avg']:.3f}" for s, v in h.items())
                + f" (grader {report['heldout']['grader']})")
    report["build_seconds"] = round(time.perf_counter() - t0, 1)
    for f in tmp.iterdir():
        f.chmod(0o644)
    report["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    (tmp / "build_info.json").write_text(json.dumps(report, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(f"wrote {out} ({sum(report['files'].values()) / 1e6:.2f} MB) in {report['build_seconds']} s")
    return report


def build_main(args) -> int:
    """`archer-async build-tiny [--out DIR] [--force] [--sft-steps N] [--eval-problems N]`: rebuild the
    tiny model (default: the shipped dir, with the shipped spec)."""
    out = Path(args.out) if getattr(args, "out", "") else TINY_MODEL_DIR
    changes = {}
    for key, least in (("sft_steps", 1), ("eval_problems", 0)):
        value = getattr(args, key, None)
        if value is None:
            continue
        if value < least:
            raise UserError(f"build-tiny: --{key.replace('_', '-')} must be at least {least} (got {value})")
        changes[key] = value
    build_tiny(out, dataclasses.replace(TinySpec(), **changes), force=bool(getattr(args, "force", False)))
    return 0

"""Does RL have room on the shipped tiny model? A minimal on-policy GRPO loop in plain transformers.

Not the project's trainer: a single-process check of the warm start's headroom. Each step samples
`--groups` training prompts x `--n` responses at T=1.0, grades them (the project's reward pool), and takes one AdamW step on the group-normalised
policy-gradient loss (token-mean per response, mean over responses). Held-out avg@k at T=0.8 before
and after, on the same problems with the same seed.

    .venv/bin/python -m bench.tiny_rl_headroom --minutes 5
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from archer_async.config import TINY_MODEL_DIR, RewardsConfig
from archer_async.data import prompt_ids
from archer_async.taskgen import generate_tasks
from launch.tiny_build import evaluate, generate, grade
from rewards import RewardPool


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(TINY_MODEL_DIR))
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-problems", type=int, default=100)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    train, evals = generate_tasks(2000, 200, 0)
    evals = evals[: args.eval_problems]
    pool = RewardPool(RewardsConfig())
    before = evaluate(model, tok, evals, k=args.k, seed=args.seed, pool=pool)
    print("before", json.dumps({k: before[k]["all"] for k in ("greedy", "t0.8")}), flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng = torch.Generator().manual_seed(args.seed)
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < args.minutes * 60:
        idx = torch.randint(len(train), (args.groups,), generator=rng).tolist()
        rows = [train[i] for i in idx]
        model.eval()
        texts = generate(model, tok, rows, n=args.n, temperature=1.0, max_new_tokens=64, seed=args.seed + step)
        rewards = grade(pool, rows, texts)
        model.train()
        seqs, advs = [], []
        for row, resp, rw in zip(rows, texts, rewards):
            r = torch.tensor([x if x is not None else 0.0 for x in rw])
            if r.std() == 0:
                continue  # no signal in this group
            a = (r - r.mean()) / (r.std() + 1e-6)
            p = prompt_ids(tok, row)
            for text, adv in zip(resp, a.tolist()):
                seqs.append((p, tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]))
                advs.append(adv)
        mean_r = sum(sum(x or 0.0 for x in rw) for rw in rewards) / (args.groups * args.n)
        if seqs:
            width = max(len(p) + len(r) for p, r in seqs)
            ids = torch.full((len(seqs), width), tok.pad_token_id)  # [B, L]
            mask = torch.zeros((len(seqs), width))  # [B, L] response-token mask
            attn = torch.zeros((len(seqs), width), dtype=torch.long)
            for b, (p, r) in enumerate(seqs):
                ids[b, : len(p) + len(r)] = torch.tensor(p + r)
                attn[b, : len(p) + len(r)] = 1
                mask[b, len(p): len(p) + len(r)] = 1
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]  # [B, L-1, V]
            logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]  # [B, L-1]
            m = mask[:, 1:]
            per_seq = (logp * m).sum(1) / m.sum(1)  # [B]
            loss = -(torch.tensor(advs) * per_seq).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        step += 1
        print(f"step {step} t={time.perf_counter() - t0:.0f}s reward/mean {mean_r:.3f} trained {len(seqs)}", flush=True)
    model.eval()
    after = evaluate(model, tok, evals, k=args.k, seed=args.seed, pool=pool)
    pool.close()
    print("after", json.dumps({k: after[k]["all"] for k in ("greedy", "t0.8")}), flush=True)
    print(json.dumps({"steps": step, "grader": before["grader"], "before": before, "after": after}, indent=1))


if __name__ == "__main__":
    main()

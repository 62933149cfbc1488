"""Staleness lab: what policy lag does to learning on the embedded tiny model, and which correction holds.

    .venv/bin/python -m bench.staleness_lab [--variants none,m2po] [--lags 0,8] [--seeds 0] [--steps 30]
        [--lr 2e-4] [--jobs 2] [--out bench/results/staleness_lab]

Every run is one in-process GRPO loop with the project's loss (`archer_async.loss.policy_loss`,
Archer's dual-token objective with the chosen `loss.is_correction`) and an exact policy lag k: the
learner at version v trains on groups sampled by the weights of version max(0, v - k) (a ring of
weight snapshots), the definition `launch.policy_lag` gives a full run. Per step: `--groups` training
prompts x `--n` samples at T = 1 from the stale weights (their log-probs are the behaviour log-probs),
graded by the project's reward pool, groups without signal dropped, GRPO advantages, pi_prox = the
current weights (no-grad pass), pi_ref = the initial weights, one AdamW step with gradient clipping 1.
Held-out greedy accuracy on `--eval-problems` problems every `--eval-every` steps and at the end.
This is a single-process loop, not the distributed system: it isolates the effect of lag from the
machine's speed (wall time is the loop's own, for the accuracy-vs-time plot).

Variants: the corrections none, token_tis, token_mask, seq_tis, geo_mask, m2po (loss defaults
otherwise), and Archer's ablation: archer_dual (the default: dual-token clip, KL on low-entropy tokens,
token_tis), archer_uniform (one clip 0.2 for every token), archer_no_kl (no KL on low-entropy tokens).
The default grid is every correction x lags {0, 2, 8, 32} x seeds {0, 1, 2}, plus the ablation at lags
{0, 8}. Finished runs (OUT/runs/NAME.json) are skipped, so the grid resumes where it stopped.

Outputs: OUT/runs/NAME.json (per-step ESS, gradient norm, mismatch KL, truncated fraction, reward,
wall time; accuracy at each evaluation), OUT/table.md (per variant and lag: final accuracy mean and
spread over seeds, mean ESS, max gradient norm, mean mismatch KL), OUT/accuracy.svg (rows: held-out
accuracy against steps and against wall time, ESS, gradient norm, mismatch KL; one column per lag; one
line per variant, the mean over seeds; plain SVG, no plotting library needed) and OUT/accuracy.png (the
same, rendered by headless Chromium when one is installed). `--jobs N` runs N runs at once, each in its
own process (wall times are then not comparable with runs made alone).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

CORRECTIONS = ["none", "token_tis", "token_mask", "seq_tis", "geo_mask", "m2po"]
ABLATION = ["archer_dual", "archer_uniform", "archer_no_kl"]
LAGS = [0, 2, 8, 32]
ABLATION_LAGS = [0, 8]


def loss_settings(variant: str) -> dict:
    """The `loss` settings of a variant (everything else at the defaults)."""
    if variant in CORRECTIONS:
        return {"is_correction": variant}
    if variant == "archer_dual":
        return {}
    if variant == "archer_uniform":
        return {k: 0.2 for k in ("low_entropy_clip_ratio_low", "low_entropy_clip_ratio_high",
                                 "high_entropy_clip_ratio_low", "high_entropy_clip_ratio_high")}
    if variant == "archer_no_kl":
        return {"kl_coef_low_entropy": 0.0}
    raise SystemExit(f"unknown variant {variant!r} (one of {', '.join(CORRECTIONS + ABLATION)})")


def grid(variants: list[str], lags: list[int], seeds: list[int]) -> list[tuple[str, int, int]]:
    out = []
    for v in variants:
        for k in (lags if v in CORRECTIONS else [x for x in lags if x in ABLATION_LAGS] or lags):
            for s in seeds:
                out.append((v, k, s))
    return out


def settings(args) -> dict:
    """The settings a finished run must share with the current invocation to be reused."""
    return {k: getattr(args, k) for k in ("steps", "groups", "n", "lr", "max_new_tokens", "eval_problems",
                                          "eval_every")}


def run_name(variant: str, lag: int, seed: int) -> str:
    return f"{variant}-k{lag}-s{seed}"


# ---------------------------------------------------------------------------------------------- one run


def _sample(model, tok, prompts: list[list[int]], n: int, max_new: int, seed: int):
    """n samples per prompt at T = 1 from `model`: (prompt, response ids, behaviour log-probs) each."""
    flat = [p for p in prompts for _ in range(n)]
    width = max(len(p) for p in flat)
    ids = torch.full((len(flat), width), tok.pad_token_id, dtype=torch.long)  # [N, P] left-padded
    attn = torch.zeros((len(flat), width), dtype=torch.long)
    for b, p in enumerate(flat):
        ids[b, width - len(p):] = torch.tensor(p)
        attn[b, width - len(p):] = 1
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new, do_sample=True,
                             temperature=1.0, top_p=1.0, top_k=0, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, return_dict_in_generate=True, output_scores=True)
    gen = out.sequences[:, width:]  # [N, G]
    logp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)  # [N, G, V]
    tok_logp = logp.gather(-1, gen.unsqueeze(-1)).squeeze(-1)  # [N, G]
    res = []
    for b in range(len(flat)):
        ids_b = gen[b].tolist()
        length = ids_b.index(tok.eos_token_id) + 1 if tok.eos_token_id in ids_b else len(ids_b)
        res.append((flat[b], ids_b[:length], tok_logp[b, :length].tolist()))
    return res


def _logprobs(model, rows, temperature: float = 1.0):
    """[B, T] log-probs (and entropies) of each row's response under `model`, with the response mask."""
    from archer_async.loss import entropy_from_logits, logprobs_from_logits

    width = max(len(p) + len(r) for p, r, _ in rows)
    t = max(len(r) for _, r, _ in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    resp = torch.zeros((len(rows), t), dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.bool)
    gather = torch.zeros((len(rows), t), dtype=torch.long)
    for b, (p, r, _) in enumerate(rows):
        ids[b, :len(p) + len(r)] = torch.tensor(p + r)
        attn[b, :len(p) + len(r)] = 1
        resp[b, :len(r)] = torch.tensor(r)
        mask[b, :len(r)] = True
        gather[b] = torch.clamp(torch.arange(len(p) - 1, len(p) - 1 + t), max=width - 1)
    logits = model(input_ids=ids, attention_mask=attn).logits  # [B, L, V]
    logits = logits[torch.arange(len(rows))[:, None], gather]  # [B, T, V]: the logits predicting each token
    return logprobs_from_logits(logits, resp, temperature), entropy_from_logits(logits, temperature), mask


def _accuracy(model, tok, rows, pool) -> float:
    from launch.tiny_build import generate, grade

    model.eval()
    texts = generate(model, tok, rows, n=1, temperature=0.0, max_new_tokens=64, seed=0)
    rewards = grade(pool, rows, texts)
    return sum((r[0] or 0.0) for r in rewards) / len(rows)


def run_one(variant: str, lag: int, seed: int, args, pool, train, evals) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from archer_async.advantages import grpo_advantages
    from archer_async.config import LossConfig
    from archer_async.data import prompt_ids
    from archer_async.loss import policy_loss

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ref = copy.deepcopy(model).eval()
    actor = copy.deepcopy(model).eval()  # the generating (stale) weights
    cfg = LossConfig(**loss_settings(variant))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    snapshots = collections.deque([copy.deepcopy(model.state_dict())], maxlen=lag + 1)  # versions v-k .. v
    rng = torch.Generator().manual_seed(1000 + seed)
    steps, evals_out = [], [{"step": 0, "wall_s": 0.0, "accuracy": _accuracy(model, tok, evals, pool)}]
    t0 = time.perf_counter()
    for v in range(args.steps):
        actor.load_state_dict(snapshots[0])  # the weights of version max(0, v - lag)
        data_version = max(0, v - lag)
        idx = torch.randint(len(train), (args.groups,), generator=rng).tolist()
        rows_in = [train[i] for i in idx]
        samples = _sample(actor, tok, [prompt_ids(tok, r) for r in rows_in], args.n, args.max_new_tokens,
                          seed * 100003 + v)
        texts = [[tok.decode(r, skip_special_tokens=True) for _, r, _ in samples[g * args.n:(g + 1) * args.n]]
                 for g in range(args.groups)]
        from launch.tiny_build import grade

        rewards = grade(pool, rows_in, texts)
        kept, rw, gid = [], [], []
        for g, rs in enumerate(rewards):
            vals = [x if x is not None else 0.0 for x in rs]
            if None in rs or len(set(vals)) == 1:
                continue  # no signal (or an infra error): dropped, as the buffer does
            kept.extend(samples[g * args.n:(g + 1) * args.n])
            rw.extend(vals)
            gid.extend([g] * args.n)
        rec = {"step": v + 1, "data_version": data_version, "lag": v - data_version,
               "reward_mean": sum((x or 0.0) for rs in rewards for x in rs) / (args.groups * args.n),
               "groups_kept": len(set(gid))}
        if kept:
            model.train()
            adv_b = grpo_advantages(torch.tensor(rw), gid)  # [B]
            with torch.no_grad():
                prox, _, mask = _logprobs(model, kept)
                ref_lp, _, _ = _logprobs(ref, kept)
            logp, ent, _ = _logprobs(model, kept)
            t = mask.shape[1]
            behav = torch.zeros_like(prox)
            for b, (_, r, lp) in enumerate(kept):
                behav[b, :len(r)] = torch.tensor(lp)
            adv = adv_b[:, None].expand(-1, t).contiguous()
            loss, met = policy_loss(logp, prox, behav, ref_lp, ent, adv, mask, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
            if math.isfinite(gn):
                opt.step()
            rec.update({"grad_norm": gn, "ess": met["is/ess"], "mismatch_kl": met["is/mismatch_kl"],
                        "truncated_frac": met["is/truncated_frac"], "rho_max": met["is/rho_max"],
                        "loss": met["loss"]})
        rec["wall_s"] = time.perf_counter() - t0
        steps.append(rec)
        snapshots.append(copy.deepcopy(model.state_dict()))
        if (v + 1) % args.eval_every == 0 or v + 1 == args.steps:
            evals_out.append({"step": v + 1, "wall_s": time.perf_counter() - t0,
                              "accuracy": _accuracy(model, tok, evals, pool)})
        print(f"{run_name(variant, lag, seed)} step {v + 1}/{args.steps} lag {rec['lag']} reward "
              f"{rec['reward_mean']:.3f} ess {rec.get('ess', float('nan')):.3f} "
              f"gn {rec.get('grad_norm', float('nan')):.3f}", flush=True)
    return {"variant": variant, "lag": lag, "seed": seed, "loss": loss_settings(variant),
            "settings": settings(args),
            "steps": steps, "evals": evals_out, "final_accuracy": evals_out[-1]["accuracy"],
            "wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------- reports


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def table(results: list[dict]) -> str:
    by = collections.defaultdict(list)
    for r in results:
        by[(r["variant"], r["lag"])].append(r)
    lines = ["| variant | lag k | seeds | final held-out acc (mean ± sd) | acc at step 0 | mean ESS | "
             "max grad norm | mean mismatch KL | mean truncated frac |", "|---|---|---|---|---|---|---|---|---|"]
    for (variant, lag), rs in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        def vals(key):
            return [s[key] for r in rs for s in r["steps"] if key in s]
        ess, gn, kl, tr = vals("ess"), vals("grad_norm"), vals("mismatch_kl"), vals("truncated_frac")
        lines.append(
            f"| {variant} | {lag} | {len(rs)} | {_mean_sd([r['final_accuracy'] for r in rs])} | "
            f"{_mean_sd([r['evals'][0]['accuracy'] for r in rs])} | "
            f"{statistics.mean(ess) if ess else float('nan'):.3f} | {max(gn) if gn else float('nan'):.3f} | "
            f"{statistics.mean(kl) if kl else float('nan'):.4f} | {statistics.mean(tr) if tr else float('nan'):.3f} |")
    return "\n".join(lines) + "\n"


PANELS = [("held-out greedy accuracy vs step", "evals", "step", "accuracy"),
          ("held-out greedy accuracy vs wall time (s)", "evals", "wall_s", "accuracy"),
          ("ESS (normalised) vs step", "steps", "step", "ess"),
          ("gradient norm (before clipping) vs step", "steps", "step", "grad_norm"),
          ("mismatch KL (behaviour vs current) vs step", "steps", "step", "mismatch_kl")]
"""Rows of the figure: (title, the run's list, x key, y key); one column per lag."""


def _series(rs: list[dict], where: str, xk: str, yk: str) -> list[tuple[float, float]]:
    """Mean over seeds of y at each x index (x: the mean over seeds too, for wall time)."""
    by = collections.defaultdict(list)
    for r in rs:
        for i, e in enumerate(r[where]):
            if xk in e and yk in e and math.isfinite(float(e[yk])):
                by[i].append((float(e[xk]), float(e[yk])))
    return [(statistics.mean(x for x, _ in v), statistics.mean(y for _, y in v)) for _, v in sorted(by.items())]


def svg(results: list[dict]) -> str:
    """One panel per (metric, lag): accuracy against steps and against wall time, ESS, gradient norm and
    mismatch KL, each the mean over seeds, one line per variant (plain SVG, no plotting library)."""
    lags = sorted({r["lag"] for r in results})
    variants = sorted({r["variant"] for r in results})
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]
    pw, ph, m = 330, 200, 46
    w, h = pw * len(lags) + m, ph * len(PANELS) + m + 20 * len(variants) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>']
    for row, (title, where, xk, yk) in enumerate(PANELS):
        lines = {(lag, v): _series([r for r in results if r["lag"] == lag and r["variant"] == v], where, xk, yk)
                 for lag in lags for v in variants}
        pts = [p for line in lines.values() for p in line]
        if not pts:
            continue
        xhi = max(x for x, _ in pts) or 1.0
        lo, hi = min(y for _, y in pts), max(y for _, y in pts)
        hi = hi if hi > lo else lo + 0.01
        for i, lag in enumerate(lags):
            x0, y0 = m + i * pw, m + row * ph
            iw, ih = pw - m, ph - m
            out.append(f'<rect x="{x0}" y="{y0}" width="{iw}" height="{ih}" fill="none" stroke="#999"/>')
            out.append(f'<text x="{x0 + 2}" y="{y0 - 6}">lag k = {lag}: {title}</text>')
            out.append(f'<text x="{x0 - 3}" y="{y0 + 10}" text-anchor="end">{hi:.3g}</text>')
            out.append(f'<text x="{x0 - 3}" y="{y0 + ih}" text-anchor="end">{lo if abs(lo) >= 1e-6 else 0:.3g}</text>')
            out.append(f'<text x="{x0 + iw}" y="{y0 + ih + 13}" text-anchor="end">{xhi:.0f}</text>')
            for j, v in enumerate(variants):
                xy = [(x0 + iw * x / xhi, y0 + ih * (1 - (y - lo) / (hi - lo))) for x, y in lines[(lag, v)]]
                if xy:
                    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
                    out.append(f'<polyline points="{path}" fill="none" stroke="{colors[j % len(colors)]}" '
                               f'stroke-width="1.6"/>')
    for j, v in enumerate(variants):
        y = m + ph * len(PANELS) - 10 + 20 * j
        out.append(f'<line x1="{m}" y1="{y}" x2="{m + 24}" y2="{y}" stroke="{colors[j % len(colors)]}" stroke-width="3"/>')
        out.append(f'<text x="{m + 30}" y="{y + 4}">{v} (mean over seeds)</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def png_from_svg(svg_path: Path, png_path: Path) -> str:
    """Render the SVG figure to PNG with headless Chromium (no plotting library needed); says what it did."""
    import re
    import shutil
    import subprocess

    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        return f"no PNG: no chromium on PATH (the figure is {svg_path})"
    head = svg_path.read_text()[:300]
    w, h = (int(re.search(rf'{k}="(\d+)"', head).group(1)) for k in ("width", "height"))
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={png_path.resolve()}", f"--window-size={w},{h}", svg_path.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    return f"wrote {png_path}"


def _work(todo: list[tuple[str, int, int, str]], args, threads: int) -> None:
    """Run `todo` ((variant, lag, seed, result path) each) one after another in this process."""
    from archer_async.config import RewardsConfig
    from archer_async.taskgen import generate_tasks
    from rewards import RewardPool

    torch.set_num_threads(threads)
    train, evals = generate_tasks(2000, 200, 0)
    evals = evals[: args.eval_problems]
    pool = RewardPool(RewardsConfig())
    try:
        for variant, lag, seed, path in todo:
            res = run_one(variant, lag, seed, args, pool, train, evals)
            tmp = Path(path).with_suffix(".tmp")
            tmp.write_text(json.dumps(res, indent=1))
            tmp.replace(path)  # a run interrupted half-way leaves no result and is rerun
    finally:
        pool.close()


def main() -> None:
    from archer_async.config import TINY_MODEL_DIR

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=",".join(CORRECTIONS + ABLATION))
    ap.add_argument("--lags", default=",".join(map(str, LAGS)))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--eval-problems", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--model", default=str(TINY_MODEL_DIR))
    ap.add_argument("--out", default="bench/results/staleness_lab")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once, each in its own process with cores/jobs torch threads")
    args = ap.parse_args()
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    todo = []
    for variant, lag, seed in grid(args.variants.split(","), [int(x) for x in args.lags.split(",")],
                                   [int(x) for x in args.seeds.split(",")]):
        path = out / "runs" / f"{run_name(variant, lag, seed)}.json"
        if path.exists():
            done = json.loads(path.read_text())["settings"]
            if done != settings(args):
                raise SystemExit(f"{path}: finished with other settings {done}; use another --out")
            print(f"{path.name}: done before, skipped", flush=True)
            continue
        todo.append((variant, lag, seed, str(path)))
    if args.jobs <= 1:
        _work(todo, args, torch.get_num_threads())
    else:
        import concurrent.futures
        import multiprocessing

        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            for f in [ex.submit(_work, todo[i::args.jobs], args, threads) for i in range(args.jobs)]:
                f.result()
    results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    (out / "table.md").write_text(table(results))
    (out / "accuracy.svg").write_text(svg(results))
    print(png_from_svg(out / "accuracy.svg", out / "accuracy.png"), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()

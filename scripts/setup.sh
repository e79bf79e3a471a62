#!/usr/bin/env bash
# Create .venv (once) and install map2map with its test extras into it.
# PyTorch: a CPU build is installed first unless torch is already importable;
# set TORCH_SPEC (e.g. TORCH_SPEC=torch for the default CUDA build) to choose.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -q -e ".[test]"

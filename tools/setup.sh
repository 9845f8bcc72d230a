#!/usr/bin/env bash
# Create .venv in the repo root and install the package with its test extras.
# Idempotent and quick when already set up. torch==2.13.0 is the CPU wheel on these
# machines; on a GPU box set TORCH_SPEC (e.g. TORCH_SPEC="torch") to get a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.mbssl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/pip install -q "$TORCH_SPEC" 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/pip install -q -e ".[test]" 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c "import torch, mbssl_dist, mlflow, pyarrow, pymetis" 
  touch "$stamp"
fi

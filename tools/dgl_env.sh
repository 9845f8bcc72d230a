#!/usr/bin/env bash
# Build the separate, pinned DGL environment (DESIGN.md §2) at ${DGL_VENV:-.venv-dgl}.
# DGL 2.1.0 (newest on PyPI) imports only with torch <= 2.2.1, so it cannot live in .venv.
# Idempotent: a complete env (marker file present) is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DGL_VENV:-.venv-dgl}
PY=${PYTHON:-python3}
if [ -f "$VENV/.complete" ]; then
  echo "dgl env: reusing $VENV"
  exit 0
fi
rm -rf "$VENV"
start=$(date +%s)
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q \
  torch==2.2.1 dgl==2.1.0 torchdata==0.7.1 numpy==1.26.4 setuptools==65.5.0 packaging \
  pandas==3.0.6 "pyarrow==25.0.1" mlflow==3.17.2 mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 \
  scipy==1.17.1 networkx pymetis tqdm pytest
# Our own package, without re-resolving dependencies (they are pinned above).
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/python" -c "import dgl, torch; print('dgl', dgl.__version__, 'torch', torch.__version__)"
touch "$VENV/.complete"
echo "dgl env: built $VENV in $(( $(date +%s) - start )) s, size $(du -sh "$VENV" | cut -f1)"

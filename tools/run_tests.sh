#!/usr/bin/env bash
# The test suite: sets up .venv (and the DGL env), runs pytest in .venv, then the DGL
# backend's tests in .venv-dgl. Extra arguments go to the main pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true
.venv/bin/python -m pytest -q -m "not dgl" "$@"
if [ "${MBSSL_SKIP_DGL:-0}" != "1" ]; then
  bash tools/dgl_env.sh
  # only the modules that hold DGL tests: the pinned env lacks the main env's test-only
  # dependencies (hypothesis, ...), which other modules import at collection
  MBSSL_REQUIRE_DGL=1 .venv-dgl/bin/python -m pytest -q -m dgl -p no:cacheprovider $(grep -l "mark.dgl" tests/test_*.py)
fi

#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then train MBSSL on the embedded synthetic
# dataset with 2 CPU processes (gloo), logging to the local MLflow store (mlflow.db).
# Launched through `python -m mbssl_dist.launch` (torchrun that keeps the workers' exit code).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m mbssl_dist.launch --standalone --nproc_per_node 2 \
  -m mbssl_dist.train --config configs/synthetic.toml "$@"

#!/usr/bin/env bash
# Train on one machine with torchrun (through `python -m mbssl_dist.launch`: torchrun's own
# code and flags, but the exit code is the first failed worker's -- 2 config/data error,
# 3 non-finite loss -- and that worker's traceback is printed, whichever rank it was).
# Environment (names as torchrun / torchtitan use them; the older ones still work):
#   NPROC_PER_NODE  processes (torchrun --nproc_per_node; also NGPU or NPROC); default: GPUs, else 2
#   CONFIG_FILE     config file (also CONFIG); default configs/synthetic.toml
#   LOG_RANK        local ranks shown on the console (torchrun --local-ranks-filter, e.g. 0 or 0,1;
#                   also LOG_RANKS); default 0. Every rank's stdout/stderr and error file go to
#   LOG_DIR         (torchrun --log-dir; default runs/torchrun-logs), one sub-directory per launch.
#   MAX_RESTARTS    torchrun --max-restarts (restart all workers after a failure; they resume
#                   from the newest checkpoint), default 0
#   OMP_NUM_THREADS threads per process (also THREADS); default: cores / processes
# Extra arguments are passed to mbssl_dist.train (e.g. --set train.epochs=5).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NPROC_PER_NODE=${NPROC_PER_NODE:-${NGPU:-${NPROC:-}}}
if [ -z "$NPROC_PER_NODE" ]; then
  NPROC_PER_NODE=$($PY -c "import torch; print(torch.cuda.device_count() or 2)")
fi
CONFIG_FILE=${CONFIG_FILE:-${CONFIG:-configs/synthetic.toml}}
LOG_RANK=${LOG_RANK:-${LOG_RANKS:-0}}
LOG_DIR=${LOG_DIR:-runs/torchrun-logs}
CORES=$(nproc)
OMP_NUM_THREADS=${OMP_NUM_THREADS:-${THREADS:-$(( CORES / NPROC_PER_NODE > 0 ? CORES / NPROC_PER_NODE : 1 ))}}
export OMP_NUM_THREADS MLFLOW_DISABLE_TELEMETRY=true
mkdir -p "$LOG_DIR"
exec $PY -m mbssl_dist.launch --standalone --nproc_per_node "$NPROC_PER_NODE" \
  --max-restarts "${MAX_RESTARTS:-0}" --log-dir "$LOG_DIR" --tee 3 --local-ranks-filter "$LOG_RANK" --role rank \
  -m mbssl_dist.train --config "$CONFIG_FILE" "$@"

#!/usr/bin/env bash
# Train on one machine with torchrun.
#   NPROC      processes (default: number of GPUs, else 2)
#   CONFIG     config file (default configs/synthetic.toml)
#   LOG_RANKS  ranks whose console output is shown (torchrun --local-ranks-filter), default 0
#   THREADS    OMP threads per process (default: cores / NPROC)
# Extra arguments are passed to mbssl_dist.train (e.g. --set train.epochs=5).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ -z "${NPROC:-}" ]; then
  NPROC=$($PY -c "import torch; print(torch.cuda.device_count() or 2)")
fi
CONFIG=${CONFIG:-configs/synthetic.toml}
THREADS=${THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
export OMP_NUM_THREADS=$THREADS MLFLOW_DISABLE_TELEMETRY=true
exec $PY -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  --local-ranks-filter "${LOG_RANKS:-0}" -m mbssl_dist.train --config "$CONFIG" "$@"

#!/usr/bin/env bash
# GPU check, one prepared script (< 10 minutes) for a machine with >= 1 NVIDIA GPU:
#   1. the distributed correctness tests (gloo, CPU ranks) and the model tests;
#   2. a short training run with nccl on all GPUs (torchrun, one rank per GPU) on the
#      synthetic data, then the same on Retailrocket if ../shared/data is present;
#   3. prints seconds per epoch, peak GPU memory and the final metrics.
# Usage: bash launch/gpu_smoke.sh   (TORCH_SPEC=torch bash tools/setup.sh first for a CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
echo "== torch $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)'), GPUs: $NGPU"
[ "$NGPU" -ge 1 ] || { echo "no GPU visible"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

echo "== 1. distributed + model tests"
timeout 420 $PY -m pytest -q tests/test_distributed.py tests/test_model.py tests/test_losses.py tests/test_hmg.py

run() {  # name, then train args
  local name=$1; shift
  local out=runs/gpu_smoke_$name
  timeout 240 $PY -m torch.distributed.run --standalone --nproc_per_node "$NGPU" -m mbssl_dist.train \
    --set train.device=\"cuda\" --set run.name=\"gpu_smoke_$name\" --set run.progress=false "$@"
  $PY - "$out" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
recs = [json.loads(l) for l in (out / "timings.jsonl").read_text().splitlines()]
ep = [r["seconds"] for r in recs if r.get("kind") == "epoch"]
mem = max(r.get("cuda_peak_mb", 0) for r in recs if r.get("kind") == "epoch")
final = json.loads((out / "final.json").read_text())
print(f"RESULT {out.name}: world {final['world_size']}, epochs {len(ep)}, s/epoch median "
      f"{sorted(ep)[len(ep) // 2]:.2f}, rank-0 peak GPU memory {mem} MB, best epoch {final['best_epoch']}, test {final['test']}")
PYEOF
}

echo "== 2. nccl training, synthetic"
run synthetic --config configs/synthetic.toml --set train.epochs=5
if [ -d ../shared/data/Retailrocket ]; then
  echo "== 3. nccl training, Retailrocket"
  run retailrocket --config configs/retailrocket.toml --set train.epochs=3
fi

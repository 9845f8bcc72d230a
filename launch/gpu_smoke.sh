#!/usr/bin/env bash
# GPU check, one prepared script (< 10 minutes) for a machine with >= 1 NVIDIA GPU:
#   1. the distributed correctness tests (gloo, CPU ranks; scipy and torch sparse kernels),
#      the model tests and the launcher tests;
#   2. a short nccl training run on all GPUs (one rank per GPU, through mbssl_dist.launch) on
#      the synthetic data; 3. the same with one GPU; 4. Retailrocket if ../shared/data has it
#      (not in a DEVICE=cpu dry run);
#   then a summary table (step, exit code, seconds, s/epoch, peak GPU memory, test metrics).
# Every step runs even when an earlier one fails; the exit code is non-zero if any failed.
# Runs write into a fresh temp dir (run.output_dir, data.cache_dir is the repo's cache/, and
# an own sqlite MLflow store), never into runs/ or mlflow.db; the dir is printed at the end.
# Usage: bash launch/gpu_smoke.sh   (TORCH_SPEC=torch bash tools/setup.sh first for a CUDA torch)
#   DEVICE=cpu NPROC_PER_NODE=2 SKIP_TESTS=1 bash launch/gpu_smoke.sh   dry run of the script on CPU
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
export MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
OUT=$(mktemp -d "${TMPDIR:-/tmp}/mbssl-gpu-smoke.XXXXXX")
MLFLOW_URI="sqlite:///$OUT/mlflow.db"
SUMMARY=()
FAILED=0

record() {  # name rc seconds details
  SUMMARY+=("$(printf '%-22s %4s %7s  %s' "$1" "$2" "$3" "$4")")
  [ "$2" = "0" ] || FAILED=1
}

NGPU=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
echo "== torch $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>&1), GPUs: $NGPU, outputs in $OUT"
if [ "$DEVICE" = "cuda" ]; then
  if [ "$NGPU" -lt 1 ]; then
    echo "no GPU visible (DEVICE=cpu for a dry run on CPU)"
    exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  NPROC_PER_NODE=${NPROC_PER_NODE:-$NGPU}
else
  NPROC_PER_NODE=${NPROC_PER_NODE:-2}
fi

if [ "${SKIP_TESTS:-0}" != "1" ]; then
  echo "== 1. distributed, model and launcher tests"
  t0=$SECONDS
  timeout 420 $PY -m pytest -q tests/test_distributed.py tests/test_model.py tests/test_losses.py \
    tests/test_hmg.py tests/test_launch.py 2>&1 | tail -n 15
  rc=${PIPESTATUS[0]}
  record "tests" "$rc" "$((SECONDS - t0))" "pytest (gloo ranks on CPU, both sparse kernels)"
fi

run() {  # step name, processes, then train args
  local name=$1 nproc=$2; shift 2
  local log="$OUT/$name.log" t0=$SECONDS rc
  echo "== $name: $nproc process(es), device $DEVICE"
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} timeout 300 $PY -m mbssl_dist.launch --standalone --nproc_per_node "$nproc" \
    --log-dir "$OUT/torchrun-logs" -m mbssl_dist.train \
    --set "train.device=\"$DEVICE\"" --set "run.name=\"$name\"" --set "run.output_dir=\"$OUT/runs\"" \
    --set "run.tracking_uri=\"$MLFLOW_URI\"" --set run.progress=false "$@" >"$log" 2>&1
  rc=$?
  tail -n 5 "$log"
  local details
  details=$($PY - "$OUT/runs/$name" <<'PYEOF' 2>&1
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    recs = [json.loads(l) for l in (out / "timings.jsonl").read_text().splitlines()]
    ep = sorted(r["seconds"] for r in recs if r.get("kind") == "epoch")
    mem = max((r.get("cuda_peak_mb", 0) for r in recs if r.get("kind") == "epoch"), default=0)
    final = json.loads((out / "final.json").read_text())
    test = final.get("test") or {}
    print(f"world {final.get('world_size')}, {len(ep)} epochs, {ep[len(ep) // 2] if ep else float('nan'):.2f} s/epoch, "
          f"rank-0 peak GPU {mem} MB, R@10 {test.get('recall@10', float('nan')):.4f}, "
          f"N@10 {test.get('ndcg@10', float('nan')):.4f}" + (f", error: {final['error']}" if final.get("error") else ""))
except Exception as e:  # report what is missing instead of stopping the smoke run
    print(f"no results ({type(e).__name__}: {e})")
PYEOF
)
  record "$name" "$rc" "$((SECONDS - t0))" "$details"
}

run synthetic_all "$NPROC_PER_NODE" --config configs/synthetic.toml --set train.epochs=5
run synthetic_one 1 --config configs/synthetic.toml --set train.epochs=5
if [ -d ../shared/data/Retailrocket ] && [ "$DEVICE" = "cuda" ]; then
  run retailrocket "$NPROC_PER_NODE" --config configs/retailrocket.toml --set train.epochs=3
fi

echo
echo "== summary (outputs, logs and the MLflow store in $OUT)"
printf '%-22s %4s %7s  %s\n' "step" "rc" "seconds" "details"
printf '%s\n' "${SUMMARY[@]}"
if [ "$FAILED" -ne 0 ]; then
  echo "gpu_smoke: FAILED (a step above has a non-zero rc)"
  exit 1
fi
echo "gpu_smoke: all steps passed"

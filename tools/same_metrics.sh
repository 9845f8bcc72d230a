#!/usr/bin/env bash
# Are two checkouts numerically the same trainer? Runs, in each, the quickstart job (synthetic,
# 2 processes) and Taobao_MBCGCN for 2 epochs (1 thread, configs/taobao_mbcgcn.toml), both
# without MLflow, and compares their metrics.jsonl byte for byte.
#   bash tools/same_metrics.sh OLD_CHECKOUT NEW_CHECKOUT [OUT_DIR]
# e.g. OLD_CHECKOUT = `git worktree add --detach /tmp/old <commit>`. Uses this repo's .venv;
# each checkout imports its own package (PYTHONPATH) and keeps its own cache/.
set -euo pipefail
old=$(cd "$1" && pwd); new=$(cd "$2" && pwd); out=${3:-$(mktemp -d)}
py=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python
export OMP_NUM_THREADS=1 MLFLOW_DISABLE_TELEMETRY=true
run() {  # run TREE NAME
  local tree=$1 dir=$out/$2
  mkdir -p "$dir"
  (cd "$tree" && PYTHONPATH="$tree" $py -m mbssl_dist.launch --standalone --nproc_per_node 2 -m mbssl_dist.train \
     --config configs/synthetic.toml --set run.output_dir=\"$dir\" --set run.name=\"quick\" --set run.mlflow=false \
     --set run.progress=false > "$dir/quick.log" 2>&1)
  (cd "$tree" && PYTHONPATH="$tree" $py -m mbssl_dist.train --config configs/taobao_mbcgcn.toml --set train.epochs=2 \
     --set train.threads=1 --set run.output_dir=\"$dir\" --set run.name=\"taobao2\" --set run.mlflow=false \
     --set run.progress=false > "$dir/taobao2.log" 2>&1)
}
run "$old" old
run "$new" new
rc=0
for job in quick taobao2; do
  if cmp -s "$out/old/$job/metrics.jsonl" "$out/new/$job/metrics.jsonl"; then
    echo "$job: metrics.jsonl identical ($(wc -l < "$out/new/$job/metrics.jsonl") records)"
  else
    echo "$job: metrics.jsonl DIFFERS ($out/old/$job vs $out/new/$job)"; rc=1
  fi
done
exit $rc

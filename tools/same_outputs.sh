#!/usr/bin/env bash
# Same outputs before and after a refactor: the offline and run-time commands that do not
# depend on the model code (data prepare, partition edge-balanced/range/metis, swing with a
# pool and under torchrun, a 2-rank training from a partition directory, evaluate under
# torchrun and alone, recommend, two bad-input exits) run once with REV's tree (git archive)
# and once with this checkout on PYTHONPATH, then every output file is compared (Parquet
# tables, JSON without timings/paths/pids, text). Prints the differing files; exits 1 if any.
#   bash tools/same_outputs.sh [REV]      (default REV: main; about 1.5 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
REV=${1:-main}
PY=$ROOT/.venv/bin/python
TR=$ROOT/.venv/bin/torchrun
W=$(mktemp -d /tmp/mbssl-same.XXXXXX)
trap 'rm -rf "$W"' EXIT
mkdir -p "$W/src"
git archive "$REV" | tar -x -C "$W/src"
echo "before: $REV ($(git rev-parse --short "$REV")), after: this checkout ($(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ', with uncommitted changes'))"
export OMP_NUM_THREADS=1 MLFLOW_DISABLE_TELEMETRY=true PYTHONDONTWRITEBYTECODE=1
trap 'echo "same_outputs: a $tag command failed; its log ends:"; tail -n 30 "$W/$tag.log"' ERR
for tag in before after; do
  src=$W/src; [ $tag = after ] && src=$ROOT
  export PYTHONPATH=$src
  o=$W/$tag; mkdir -p "$o"
  cd "$o"
  $PY -m mbssl_dist.data prepare --format synthetic --out data >>"$W/$tag.log" 2>&1
  $PY -m mbssl_dist.partition --data data --parts 3 --method edge-balanced --out p_eb3 >>"$W/$tag.log" 2>&1
  $PY -m mbssl_dist.partition --data data --parts 2 --method edge-balanced --out p_eb2 >>"$W/$tag.log" 2>&1
  $PY -m mbssl_dist.partition --data data --parts 3 --method range --out p_range3 >>"$W/$tag.log" 2>&1
  $PY -m mbssl_dist.partition --data data --parts 2 --method metis --out p_metis2 >>"$W/$tag.log" 2>&1
  $PY -m mbssl_dist.swing --data data --out sw_w2 --workers 2 --topn 50 --no-progress >>"$W/$tag.log" 2>&1
  $TR --standalone --nproc_per_node 2 -m mbssl_dist.swing --data data --out sw_tr2 --topn 50 --no-progress >>"$W/$tag.log" 2>&1
  # 2-rank training from the partition directory (parallel.part.load_partition), then evaluate and recommend
  $TR --standalone --nproc_per_node 2 -m mbssl_dist.train --set data.format=prepared --set data.path="$o/data" \
     --set dist.partition_dir="$o"/p_eb2 --set train.epochs=2 --set run.mlflow=false --set run.output_dir="$o"/runs \
     --set data.cache_dir="$o"/cache --set run.name=t2 --set train.threads=1 >>"$W/$tag.log" 2>&1
  $TR --standalone --nproc_per_node 2 -m mbssl_dist.evaluate --run-dir runs/t2 --check > eval2.json 2>>"$W/$tag.log"
  $PY -m mbssl_dist.evaluate --run runs/t2 > eval1.json 2>>"$W/$tag.log"
  $PY -m mbssl_dist.recommend --run runs/t2 --k 10 --out recs.parquet >>"$W/$tag.log" 2>&1
  rc=0; $PY -m mbssl_dist.recommend --run runs/t2 --k 0 --out r0.parquet > bad_k.out 2> bad_k.err || rc=$?
  echo "rc $rc" >> bad_k.out
  rc=0; $PY -m mbssl_dist.evaluate --run runs/nope > bad_run.out 2> bad_run.err || rc=$?
  echo "rc $rc" >> bad_run.out
done
cd "$W"
$PY - <<'PY'
import json, sys
from pathlib import Path
import pyarrow.parquet as pq
DROP = {"elapsed_seconds", "assign_seconds", "metis_seconds", "timings", "created_utc", "path", "total_s",
        "load_s", "seconds", "time", "wall_s", "started", "finished", "git_commit", "pid"}
def clean(x):
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items() if k not in DROP and not k.endswith("_s") and not k.endswith("_seconds")}
    if isinstance(x, list):
        return [clean(v) for v in x]
    if isinstance(x, str):
        return x.replace(str(Path("before").resolve()), "").replace(str(Path("after").resolve()), "")
    return x
a, b = Path("before"), Path("after")
n = bad = 0
skipped = []
for f in sorted(p for p in a.rglob("*") if p.is_file()):
    rel = f.relative_to(a); g = b / rel
    if any(s in str(rel) for s in ("timings.jsonl", "curves.png", "checkpoints", "/cache/", "cache/")) or rel.name.endswith(".log"):
        skipped.append(str(rel)); continue
    n += 1
    if not g.exists():
        print("MISSING after:", rel); bad += 1; continue
    if rel.name == ".run.lock":
        skipped.append(str(rel)); n -= 1; continue
    if str(rel).startswith("sw_w2/") and f.suffix == ".parquet":
        # a process pool splits the rows over its part files as the workers come (main does too):
        # compare the side's rows, not the split
        from mbssl_dist.swing import load_swing
        side = rel.parts[1]
        same = all((x == y).all() for x, y in zip(load_swing(a / "sw_w2", side), load_swing(b / "sw_w2", side)))
    elif f.suffix == ".parquet":
        same = pq.read_table(f).equals(pq.read_table(g))
    elif f.suffix in (".json",) :
        same = clean(json.loads(f.read_text())) == clean(json.loads(g.read_text()))
    elif f.suffix == ".jsonl":
        same = [clean(json.loads(l)) for l in f.read_text().splitlines()] == [clean(json.loads(l)) for l in g.read_text().splitlines()]
    else:
        same = clean(f.read_text(errors="replace")) == clean(g.read_text(errors="replace"))
    if not same:
        print("DIFFERS:", rel); bad += 1
extra = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and not (a / p.relative_to(b)).exists())
for e in extra:
    print("ONLY after:", e); bad += 1
print(f"{n} files compared, {bad} differ/missing; skipped (wall-clock or cache): {len(skipped)}")
sys.exit(1 if bad else 0)
PY

#!/usr/bin/env bash
# A real 2-node Slurm cluster on this host, and the project's own launch/slurm.sbatch run on it.
#
# Installs Slurm + munge from Debian's packages if missing (needs root or sudo), writes
# slurm.conf and a munge key under a fresh temp dir, starts munged, slurmctld and two slurmd
# (`-N n1`, `-N n2`: NodeAddr 127.0.0.1, different ports, 2 CPUs each) directly (no systemd),
# then trains on the synthetic set:
#   plain   2 processes through `python -m mbssl_dist.launch --standalone` (the reference)
#   (a)     sbatch --nodes 1 --cpus-per-task 2  -> 1 node x 2 processes (CPU rule: one per CPU)
#   (b)     sbatch --nodes 2 --cpus-per-task 1  -> 2 nodes x 1 process (c10d across "nodes")
#   requeue (a) again, `scontrol requeue` once its first checkpoint is complete: the job must
#           restart (Restarts=1), resume from the checkpoint and finish  (skip: SLURM_LOCAL_REQUEUE=0;
#           SLURM_LOCAL_REQUEUE=signal: send the batch script USR1 instead, as --signal does
#           before the time limit, so that its own trap requeues the job)
# and checks that every job COMPLETED with exit code 0 and that its final.json (best epoch,
# validation and test metrics) and metrics.jsonl (every loss, HMG statistic and evaluation,
# 1e-5 relative) equal the plain run's. Every run writes under the temp dir
# (run.output_dir, data.cache_dir; MLflow, on for the plain and the requeued run, into a sqlite
# store there), never the user's mlflow.db or
# runs/. On exit (success, failure or Ctrl-C) it stops exactly the daemons it started, by pid,
# and removes the temp dir (KEEP=1 keeps it). Exits non-zero on any failure.
#   bash tools/slurm_local.sh          (CI: .ci/run; about 2-3 minutes on 2 cores)
# Environment: PY (default .venv/bin/python), EPOCHS (default 4), JOB_TIMEOUT seconds per job (300).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-$ROOT/.venv/bin/python}
EPOCHS=${EPOCHS:-4}
JOB_TIMEOUT=${JOB_TIMEOUT:-300}
REQUEUE=${SLURM_LOCAL_REQUEUE:-1}
say() { echo "slurm_local: $*"; }
die() { echo "slurm_local: FAILED: $*" >&2; exit 1; }

# ---------------------------------------------------------------- 1. packages
if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
missing=""
for b in munged slurmctld slurmd sbatch; do command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing=1; done
if [ -n "$missing" ]; then
  [ "$SUDO" != "none" ] || die "Slurm/munge missing and neither root nor sudo available to install them"
  say "installing slurmctld slurmd slurm-client munge (Debian packages)"
  t0=$SECONDS
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
  say "installed in $((SECONDS - t0)) s"
fi
export PATH="$PATH:/usr/sbin:/sbin"
[ -x "$PY" ] || die "$PY not found (run bash tools/setup.sh first)"

# ---------------------------------------------------------------- 2. temp dir, cleanup
TMP=$(mktemp -d /tmp/mbssl-slurm.XXXXXX)
chmod 700 "$TMP"
PIDS=()
cleanup() {
  local rc=$?
  set +e
  if [ -n "${SLURM_CONF:-}" ] && [ -f "$SLURM_CONF" ]; then
    for j in $(squeue -h -o %i 2>/dev/null); do scancel "$j" 2>/dev/null; done
  fi
  # stop the daemons started here (reverse order: slurmd, slurmctld, munged), by pid
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill -TERM "${PIDS[$i]}" 2>/dev/null; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null
  done
  if [ "$rc" -ne 0 ]; then
    for f in "$TMP"/log/*.log; do [ -f "$f" ] && { echo "---- $f (tail)"; tail -n 20 "$f"; }; done
  fi
  if [ "${KEEP:-0}" = "1" ]; then say "kept $TMP"; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$TMP"/{munge,state,spool,log,runs,cache,out}
chmod 700 "$TMP/munge"

free_ports() { "$PY" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}
read -r CTLD_PORT N1_PORT N2_PORT <<<"$(free_ports 3)"
HOST=$(hostname)
ME=$(id -un)

# ---------------------------------------------------------------- 3. munge
dd if=/dev/urandom of="$TMP/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$TMP/munge/munge.key"
SOCK="$TMP/munge/munge.socket"
munged -F --force --socket="$SOCK" --key-file="$TMP/munge/munge.key" --pid-file="$TMP/munge/munged.pid" \
  --log-file="$TMP/log/munged.log" --seed-file="$TMP/munge/munge.seed" >>"$TMP/log/munged.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do [ -S "$SOCK" ] && break; sleep 0.1; done
munge -S "$SOCK" -n | unmunge -S "$SOCK" >/dev/null || die "munge does not work (log: $TMP/log/munged.log)"

# ---------------------------------------------------------------- 4. slurm.conf, daemons
export SLURM_CONF="$TMP/slurm.conf"
cat > "$SLURM_CONF" <<EOF
ClusterName=mbsslci
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=$ME
SlurmdUser=$ME
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK
StateSaveLocation=$TMP/state
SlurmdSpoolDir=$TMP/spool/%n
SlurmctldPidFile=$TMP/slurmctld.pid
SlurmdPidFile=$TMP/slurmd-%n.pid
SlurmctldLogFile=$TMP/log/slurmctld.log
SlurmdLogFile=$TMP/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MpiDefault=none
SwitchType=switch/none
SlurmdParameters=config_overrides
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
MinJobAge=3600
KillWait=15
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=n1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$N1_PORT CPUs=2 State=UNKNOWN
NodeName=n2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$N2_PORT CPUs=2 State=UNKNOWN
PartitionName=ci Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
t0=$SECONDS
slurmctld -D -i -f "$SLURM_CONF" >"$TMP/log/slurmctld.stdout" 2>&1 &
PIDS+=($!)
for n in n1 n2; do
  mkdir -p "$TMP/spool/$n"
  slurmd -D -N "$n" -f "$SLURM_CONF" >"$TMP/log/slurmd-$n.stdout" 2>&1 &
  PIDS+=($!)
done
up=""
for _ in $(seq 120); do
  for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null || die "a daemon exited at start (pid $p)"; done
  if [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' (idle|mix|alloc)$')" = "2" ]; then up=1; break; fi
  sleep 0.5
done
[ -n "$up" ] || { sinfo -N 2>&1 || true; die "the 2 nodes did not come up within 60 s"; }
say "cluster up in $((SECONDS - t0)) s: $(sinfo -h -N -o '%N:%t' | tr '\n' ' ')(slurmctld :$CTLD_PORT, slurmd :$N1_PORT :$N2_PORT)"

# ---------------------------------------------------------------- 5. runs
export MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
# Small enough for 2 shared cores; the same settings for every run.
train_args() {  # run name [mlflow: true/false]
  local a=(--set "run.mlflow=${2:-false}" --set "data.cache_dir=\"$TMP/cache\"" --set "run.output_dir=\"$TMP/runs\"" --set "run.name=\"$1\""
           --set "run.tracking_uri=\"sqlite:///$TMP/mlflow.db\"" --set "train.epochs=$EPOCHS"
           --set "train.patience=0" --set "run.progress=false" --set "data.synthetic_users=300"
           --set "data.synthetic_items=200" --set "data.synthetic_clusters=4" --set "model.dim=16"
           --set "train.batch_size=64" --set "train.threads=1" --set "swing.topn=20" --set "swing.workers=1"
           --set "checkpoint.every_epochs=1")
  printf '%s\n' "${a[@]}"
}
mapfile -t A <<<"$(train_args plain true)"
say "plain run: 2 processes, torchrun --standalone (reference)"
t0=$SECONDS
OMP_NUM_THREADS=1 timeout "$JOB_TIMEOUT" "$PY" -m mbssl_dist.launch --standalone --nproc_per_node 2 \
  -m mbssl_dist.train --config configs/synthetic.toml "${A[@]}" >"$TMP/out/plain.log" 2>&1 \
  || { tail -n 30 "$TMP/out/plain.log"; die "plain run failed"; }
say "plain run done in $((SECONDS - t0)) s"

job_field() { scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1; }
wait_job() {  # job id -> waits until it ends; fails unless COMPLETED with 0:0
  local id=$1 end=$((SECONDS + JOB_TIMEOUT)) st=""
  while [ $SECONDS -lt $end ]; do
    st=$(job_field "$id" JobState)
    case "$st" in
      COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|PREEMPTED) break ;;
    esac
    sleep 1
  done
  local code; code=$(job_field "$id" ExitCode)
  if [ "$st" != "COMPLETED" ] || [ "$code" != "0:0" ]; then
    scontrol show job "$id" || true
    tail -n 40 "$TMP/out/slurm-$id.out" 2>/dev/null || true
    die "job $id ended as '${st:-still running after ${JOB_TIMEOUT}s}' exit code '${code}'"
  fi
}
submit() {  # name, mlflow (true/false), sbatch options... ; prints the job id
  local name=$1 mlflow=$2; shift 2
  mapfile -t A <<<"$(train_args "$name" "$mlflow")"
  sbatch --parsable --job-name "$name" --time 15 --output "$TMP/out/slurm-%j.out" "$@" \
    launch/slurm.sbatch configs/synthetic.toml "${A[@]}"
}
same_final() {  # run name: final.json and metrics.jsonl equal to the plain run's
  "$PY" - "$TMP/runs/plain/final.json" "$TMP/runs/$1/final.json" <<'EOF'
import json, math, sys
from pathlib import Path
a, b = (json.load(open(p)) for p in sys.argv[1:])
# metrics.jsonl holds only seed-determined values (losses, HMG statistics, evaluations)
ma, mb = ([json.loads(x) for x in (Path(p).parent / "metrics.jsonl").read_text().splitlines()] for p in sys.argv[1:])
if len(ma) != len(mb):
    sys.exit(f"{sys.argv[2]}: metrics.jsonl has {len(mb)} records, the plain run {len(ma)}")
for ra, rb in zip(ma, mb):
    for k, v in ra.items():
        w = rb.get(k)
        same = (math.isclose(v, w, rel_tol=1e-5, abs_tol=1e-7) if isinstance(v, float) and isinstance(w, float)
                else v == w)
        if not same:
            sys.exit(f"{sys.argv[2]}: metrics.jsonl {ra.get('kind')} epoch {ra.get('epoch')} {k}: {w} vs plain {v}")
def flat(d, p=""):
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            yield from flat(v, f"{p}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f"{p}{k}", float(v)
fa = dict(flat({"test": a["test"], "valid": a["valid"]}))
fb = dict(flat({"test": b["test"], "valid": b["valid"]}))
bad = [k for k in fa if k not in fb or not math.isclose(fa[k], fb[k], rel_tol=1e-6, abs_tol=1e-7)]
ok = not bad and fa.keys() == fb.keys() and a["best_epoch"] == b["best_epoch"] and b["world_size"] == a["world_size"]
print(f"{sys.argv[2]}: world {b['world_size']}, best epoch {b['best_epoch']}, test {b['test']}"
      + ("" if ok else f" -- DIFFERS from the plain run (best epoch {a['best_epoch']}, test {a['test']}; {bad})"))
sys.exit(0 if ok else 1)
EOF
}

same_job() {  # label, run name, nodes, cpus per task, processes per node: one job, checked
  local label=$1 name=$2 nodes=$3 cpus=$4 procs=$5 t0=$SECONDS id
  id=$(submit "$name" false --nodes "$nodes" --cpus-per-task "$cpus")
  say "$label job $id: sbatch --nodes $nodes --cpus-per-task $cpus"
  wait_job "$id"
  grep -q "$nodes node(s) x $procs process(es)" "$TMP/out/slurm-$id.out" \
    || die "$label did not start $nodes node(s) x $procs process(es)"
  same_final "$name" || die "$label final metrics differ from the plain run"
  say "$label done in $((SECONDS - t0)) s"
}
same_job "(a)" slurm_1x2 1 2 2
same_job "(b)" slurm_2x1 2 1 1

if [ "$REQUEUE" = "1" ] || [ "$REQUEUE" = "signal" ]; then
  t0=$SECONDS
  JR=$(submit slurm_requeue true --nodes 1 --cpus-per-task 2)
  say "requeue job $JR: waiting for its first complete checkpoint"
  end=$((SECONDS + JOB_TIMEOUT))
  until compgen -G "$TMP/runs/slurm_requeue/checkpoints/step-*" >/dev/null; do
    [ $SECONDS -lt $end ] || die "requeue job $JR wrote no checkpoint within ${JOB_TIMEOUT}s"
    case "$(job_field "$JR" JobState)" in RUNNING|PENDING|CONFIGURING) ;; *) die "requeue job $JR ended before its first checkpoint";; esac
    sleep 0.2
  done
  ck=$(basename "$(compgen -G "$TMP/runs/slurm_requeue/checkpoints/step-*" | sort | tail -n 1)")
  if [ "$REQUEUE" = "signal" ]; then
    # the time-limit path: USR1 to the batch shell (what --signal=B:USR1@300 sends), whose trap
    # runs `scontrol requeue` itself
    scancel --batch --signal=USR1 "$JR"
    say "sent USR1 to job $JR's batch script after checkpoint $ck"
  else
    scontrol requeue "$JR"
    say "requeued job $JR after checkpoint $ck"
  fi
  # a requeued job is held until a BeginTime (about 2 minutes on); release it as soon as it pends
  for _ in $(seq 180); do
    st=$(job_field "$JR" JobState)
    [ "$st" = "PENDING" ] && { scontrol update jobid="$JR" StartTime=now 2>/dev/null || true; break; }
    [ "$st" = "RUNNING" ] && [ "$(job_field "$JR" Restarts)" -ge 1 ] && break
    sleep 0.5
  done
  wait_job "$JR"
  [ "$(job_field "$JR" Restarts)" -ge 1 ] || die "requeue job $JR did not restart (Restarts=$(job_field "$JR" Restarts))"
  grep -q "resuming from" "$TMP/out/slurm-$JR.out" || die "requeue job $JR restarted but did not resume from a checkpoint"
  same_final slurm_requeue || die "requeued job's final metrics differ from the uninterrupted run"
  say "requeue done in $((SECONDS - t0)) s: $(grep -m1 -o 'resuming from .*' "$TMP/out/slurm-$JR.out" | sed "s|$TMP/||")"
else
  say "requeue test skipped (SLURM_LOCAL_REQUEUE=$REQUEUE)"
fi
say "OK"

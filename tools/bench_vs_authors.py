"""Our training step vs the MBSSL authors' code, INTERLEAVED in one session at equal threads.

    .venv/bin/python tools/bench_vs_authors.py --data cache/beibei --mirror <bare git dir of Scofield666/MBSSL> \
        [--threads 1] [--steps 2] [--warmup 1] [--rounds 2] [--only a,b,c] [--json-out bench.json]

``--data``: pv-less Beibei prepared by ``python -m mbssl_dist.data prepare --format text --input
../shared/data/incomplete/Beibei --behaviors cart,buy --out cache/beibei`` (the authors' side
reads the same split from the mirror: their ``dataset/Beibei``, pv dropped). ``--mirror``: a bare
git fetch of Scofield666/MBSSL (default ``$MIRROR``); the authors' side is
``../shared/reference/authors-bench/run_ref_bench.sh`` (its README: their loop, patched only
for CPU, pv-less data and a per-batch timer).

Comparisons (pv-less Beibei, cart -> buy):

  (a) equal model and equal batch: ours L=2 batch 256            vs authors L=2 batch 256
  (b) equal model, our recipe's batch: ours L=2 batch 2048       vs authors L=2 batch 256
  (c) our recipe vs their default: ours L=2 batch 2048, HMG r=1  vs authors L=4 batch 256

(b) and (c) keep the authors at their batch 256 (their code at 2048 is not their recipe and is
not timed here); the authors' L=2 run of a round is the partner of both (a) and (b).

One round runs, in this order, each in a fresh process: ours (a), authors L=2, ours (b),
ours (c), authors L=4, so every ratio divides two figures measured next to each other; the
rounds repeat that sequence (ours, theirs, ours, theirs). Both sides time the same number of
steps: ``--warmup`` untimed, then ``--steps`` timed batches (batch construction through the
optimizer step), and both EXTRAPOLATE seconds/epoch = the epoch's view augmentation + steps
per epoch x mean timed step (ours: ceil(21716 / batch) steps, the authors': their own
int(21716 / batch) = 84). Peak RSS is each process's ru_maxrss (the authors' includes their
set-up's dense similarity matrices). The load average is printed before and after every run;
other processes on the machine slow both sides.

Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REF_SCRIPT = ROOT.parent / "shared" / "reference" / "authors-bench" / "run_ref_bench.sh"
DEFAULT_MIRROR = "/work/.mirror/Scofield666+MBSSL/repo"

# name -> (description, ours: (layers, batch, extra --set), authors: (layers, batch))
COMPARISONS = {
    "a": ("equal model and equal batch (L=2, batch 256)", (2, 256, []), (2, 256)),
    "b": ("equal model (L=2), our recipe's batch 2048 vs their 256", (2, 2048, []), (2, 256)),
    "c": ("our recipe (L=2, batch 2048, HMG r=1) vs their default (L=4, batch 256)",
          (2, 2048, ["hmg.relax=1.0"]), (4, 256)),
}


class BenchError(Exception):
    """Bad input or a failed run: one line for the user."""


def load1() -> float:
    return os.getloadavg()[0]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ----------------------------------------------------------------------------- the two sides

def run_ours(data: str, layers: int, batch: int, sets: list[str], threads: int, steps: int, warmup: int,
             python: str) -> dict:
    """One fresh ``tools/bench_train.py --child`` process; its JSON result."""
    cmd = [python, str(ROOT / "tools" / "bench_train.py"), "--child", "--data", data, "--batch-size", str(batch),
           "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads),
           "--set", f"model.n_layers={layers}"]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise BenchError(f"our bench_train failed (rc {r.returncode}): {tail}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {"step_mean_s": res["step_mean_s"], "step_min_s": res["step_min_s"], "timed_steps": res["timed_steps"],
            "steps_per_epoch": res["steps_per_epoch"], "views_s": res["views_s"], "epoch_s": res["epoch_s"],
            "extrapolated": res["extrapolated"], "threads": res["threads"], "peak_rss_mib": res["maxrss_mib"]}


def parse_authors_output(text: str) -> list[dict]:
    """The ``REFBENCH {json}`` lines of the authors' patched loop (one per thread phase)."""
    out = []
    for line in text.splitlines():
        if line.startswith("REFBENCH "):
            out.append(json.loads(line[len("REFBENCH "):]))
    return out


def run_authors(ref_script: str, mirror: str, work: str, layers: int, batch: int, threads: int, steps: int,
                warmup: int, python: str) -> dict:
    """One run of the authors' loop (``run_ref_bench.sh``, one thread phase); its REFBENCH record."""
    env = dict(os.environ, MIRROR=mirror, WORK=work, PY=python, THREADS=str(threads), WARMUP=str(warmup),
               STEPS=str(steps), BATCH=str(batch), LAYERS="[" + ",".join(["64"] * layers) + "]")
    r = subprocess.run(["bash", ref_script], capture_output=True, text=True, cwd=ROOT, env=env)
    recs = parse_authors_output(r.stdout)
    if r.returncode != 0 or not recs:
        log = Path(work) / "last_run.log"
        tail = (r.stderr.strip().splitlines() or r.stdout.strip().splitlines() or ["(no output)"])[-1]
        raise BenchError(f"the authors' run failed (rc {r.returncode}, no REFBENCH line): {tail}; see {log}")
    rec = recs[-1]
    return {"step_mean_s": rec["batch_mean_s"], "step_min_s": rec["batch_min_s"], "timed_steps": rec["timed_batches"],
            "steps_per_epoch": rec["batches_per_epoch"], "views_s": rec["aug_views_s"],
            "epoch_s": rec["epoch_s_extrapolated"], "extrapolated": True, "threads": rec["threads"],
            "peak_rss_mib": rec["maxrss_mib"]}


# ----------------------------------------------------------------------------- schedule and summary

def schedule(only: list[str], rounds: int) -> list[tuple[int, str, str]]:
    """(round, side, comparison) in run order. An authors' configuration shared by several
    comparisons runs once per round, right after the first of its partners."""
    order = []
    for r in range(rounds):
        done_authors = set()
        for name in only:
            order.append((r, "ours", name))
            acfg = COMPARISONS[name][2]
            if acfg not in done_authors:
                done_authors.add(acfg)
                order.append((r, "authors", name))
    return order


def summarize(runs: list[dict], only: list[str]) -> dict:
    """Per comparison: our and the authors' s/epoch and peak RSS per round, ratio per round."""
    out = {}
    for name in only:
        desc, (ol, ob, osets), (al, ab) = COMPARISONS[name]
        rounds = sorted({r["round"] for r in runs})
        per_round = []
        for rd in rounds:
            ours = [r for r in runs if r["round"] == rd and r["side"] == "ours" and r["comparison"] == name]
            auth = [r for r in runs if r["round"] == rd and r["side"] == "authors"
                    and (r["layers"], r["batch"]) == (al, ab)]
            if not ours or not auth:
                continue
            o, a = ours[0], auth[0]
            per_round.append({"round": rd, "ours_epoch_s": o["epoch_s"], "authors_epoch_s": a["epoch_s"],
                              "speedup": a["epoch_s"] / o["epoch_s"], "ours_peak_rss_mib": o["peak_rss_mib"],
                              "authors_peak_rss_mib": a["peak_rss_mib"],
                              "rss_ratio": a["peak_rss_mib"] / o["peak_rss_mib"],
                              "load_range": [min(o["load_before"], a["load_before"], o["load_after"], a["load_after"]),
                                             max(o["load_before"], a["load_before"], o["load_after"], a["load_after"])]})
        out[name] = {"description": desc, "ours": {"layers": ol, "batch": ob, "set": osets},
                     "authors": {"layers": al, "batch": ab}, "rounds": per_round}
    return out


def _rng(xs: list[float], fmt: str) -> str:
    if not xs:
        return "-"
    lo, hi = min(xs), max(xs)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{format(lo, fmt)}–{format(hi, fmt)}"


def format_run(r: dict) -> str:
    return (f"round {r['round'] + 1} {r['side']:<7s} ({r['comparison']}) L={r['layers']} batch={r['batch']:<5d} "
            f"threads={r['threads']} timed={r['timed_steps']} s/step={r['step_mean_s']:.3f} "
            f"(min {r['step_min_s']:.3f}) steps/epoch={r['steps_per_epoch']} views={r['views_s']:.2f}s "
            f"s/epoch~{r['epoch_s']:.1f}{' (extrapolated)' if r['extrapolated'] else ''} "
            f"peakRSS={r['peak_rss_mib']:.0f}MiB wall={r['wall_s']:.0f}s "
            f"load {r['load_before']:.2f}->{r['load_after']:.2f}")


def format_summary(summary: dict, threads: int, steps: int) -> str:
    lines = [f"| comparison (s/epoch, pv-less Beibei, {threads} thread(s), extrapolated from {steps} timed steps "
             f"per side) | ours | authors | speed-up | peak RSS ours / authors | load |",
             "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        rs = s["rounds"]
        lines.append(
            f"| ({name}) {s['description']} | {_rng([x['ours_epoch_s'] for x in rs], '.1f')} "
            f"| {_rng([x['authors_epoch_s'] for x in rs], '.0f')} | **{_rng([x['speedup'] for x in rs], '.1f')}x** "
            f"| {_rng([x['ours_peak_rss_mib'] for x in rs], '.0f')} / {_rng([x['authors_peak_rss_mib'] for x in rs], '.0f')} MiB "
            f"| {_rng([v for x in rs for v in x['load_range']], '.2f')} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "cache" / "beibei"), help="prepared pv-less Beibei directory")
    ap.add_argument("--mirror", default=os.environ.get("MIRROR", DEFAULT_MIRROR),
                    help="bare git fetch of Scofield666/MBSSL (default $MIRROR)")
    ap.add_argument("--work", default="/tmp/mbssl-authors-bench",
                    help="scratch dir of the authors' side (kept: reuses their adjacency cache)")
    ap.add_argument("--ref-script", default=str(REF_SCRIPT), help="the authors' bench script")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per run, both sides (epoch extrapolated)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones, both sides")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    ap.add_argument("--only", default="a,b,c", help="comma list of comparisons (a, b, c)")
    ap.add_argument("--python", default=sys.executable, help="interpreter of both sides (torch, numpy, scipy)")
    ap.add_argument("--json-out", help="write runs and summary as JSON here")
    args = ap.parse_args(argv)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in only if x not in COMPARISONS]
    if bad or not only:
        raise BenchError(f"--only {args.only!r}: choose from {','.join(COMPARISONS)}")
    args.only = only
    for name in ("threads", "steps", "rounds"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {args.warmup}")
    if not (Path(args.data) / "manifest.json").is_file():
        raise BenchError(f"--data {args.data}: not a prepared dataset (no manifest.json); prepare pv-less Beibei "
                         f"with python -m mbssl_dist.data prepare --format text --input "
                         f"../shared/data/incomplete/Beibei --behaviors cart,buy --out {args.data}")
    if not Path(args.ref_script).is_file():
        raise BenchError(f"--ref-script {args.ref_script}: no such file")
    if not (Path(args.mirror) / "HEAD").is_file():
        raise BenchError(f"--mirror {args.mirror}: not a bare git directory of Scofield666/MBSSL (no HEAD); "
                         f"fetch it and pass its path")
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except BenchError as e:
        print(f"bench_vs_authors: {e}", file=sys.stderr)
        return 2
    print(f"bench_vs_authors: {os.cpu_count()} CPUs ({cpu_name()}), {args.threads} thread(s) per side, "
          f"{args.warmup} warm-up + {args.steps} timed steps per run, {args.rounds} interleaved round(s); "
          f"load average {os.getloadavg()}")
    print("s/epoch on BOTH sides is EXTRAPOLATED: view augmentation + steps/epoch x mean timed step")
    sys.stdout.flush()
    runs = []
    t_start = time.time()
    try:
        for rd, side, name in schedule(args.only, args.rounds):
            desc, (ol, ob, osets), (al, ab) = COMPARISONS[name]
            before = load1()
            t0 = time.time()
            if side == "ours":
                res = run_ours(args.data, ol, ob, osets, args.threads, args.steps, args.warmup, args.python)
                layers, batch = ol, ob
            else:
                res = run_authors(args.ref_script, args.mirror, args.work, al, ab, args.threads, args.steps,
                                  args.warmup, args.python)
                layers, batch = al, ab
            rec = {"round": rd, "side": side, "comparison": name, "layers": layers, "batch": batch, **res,
                   "wall_s": time.time() - t0, "load_before": before, "load_after": load1()}
            runs.append(rec)
            print(format_run(rec))
            sys.stdout.flush()
    except BenchError as e:
        print(f"bench_vs_authors: {e}", file=sys.stderr)
        return 2
    summary = summarize(runs, args.only)
    print()
    print(format_summary(summary, args.threads, args.steps))
    print(f"\ntotal {time.time() - t_start:.0f}s; load average {os.getloadavg()}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "cpu": cpu_name()},
            "args": {k: v for k, v in vars(args).items() if k != "json_out"},
            "extrapolated": True, "runs": runs, "summary": summary}, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Print the HMG auxiliary/target gradient-norm ratios of the first training step (before
and after HMG and ``hmg.aux_budget``) for each dataset config: whether the SSL tasks swamp the
target at the start. One optimizer step per run (``train.max_steps_per_epoch=1``), 1 thread.

    .venv/bin/python tools/hmg_first_step.py --budget 0 0.5 [--configs configs/a.toml ...]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from trainer_runs import ROOT, fresh_out, train
DEFAULT = ["taobao_mbcgcn", "retailrocket", "beibei_large_batch", "taobao", "ijcai"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="*", default=[str(ROOT / "configs" / f"{c}.toml") for c in DEFAULT])
    ap.add_argument("--budget", nargs="+", type=float, default=[0.0, 0.5])
    ap.add_argument("--set", action="append", default=[], help="extra overrides for every run")
    ap.add_argument("--out", default="runs/hmg_first_step", help="a new folder for the runs (never reused)")
    a = ap.parse_args()
    out = fresh_out(a.out, "hmg_first_step")
    print(f"load average {os.getloadavg()}")
    print("| config | aux_budget | task | norm ratio before HMG | applied ratio after | total bound |")
    print("|---|---|---|---|---|---|")
    for c in a.configs:
        for b in a.budget:
            name = f"{Path(c).stem}_b{b}"
            recs, _ = train(out, name, ["train.epochs=1", "train.max_steps_per_epoch=1", f"hmg.aux_budget={b}"]
                            + a.set, config=c)
            rec = next(r for r in recs if r.get("kind") == "epoch")
            tasks = sorted({k.split("/")[1] for k in rec if k.endswith("/norm_ratio_first_step")})
            if not tasks:
                print(f"| {Path(c).stem} | {b:g} | (no auxiliary task in this config) | | | |", flush=True)
            for t in tasks:
                print(f"| {Path(c).stem} | {b:g} | {t} | {rec[f'hmg/{t}/norm_ratio_first_step']:.4g} | "
                      f"{rec[f'hmg/{t}/applied_ratio_first_step']:.4g} | {rec.get('hmg/aux_total_bound', float('nan')):.4g} |",
                      flush=True)


if __name__ == "__main__":
    main()

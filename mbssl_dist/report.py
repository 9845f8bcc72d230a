"""``python -m mbssl_dist.report EXPERIMENT_DIR_OR_RUNS... [--out report/]``

A Markdown report of training runs from their ``final.json`` and ``metrics.jsonl``:

* an experiment directory (written by ``mbssl_dist.experiments``, with ``experiment.json``):
  one table row per grid point with test (and validation) metrics as mean ± std over its
  seeds (sample std, n - 1; blank with one seed), the best mean per column in bold; PNG
  figures: sweeps (relax-sweep, fn-sweep) as lines with error bars, training curves per
  variant (validation metric; per-task losses on a log scale), and the HMG auxiliary/target
  gradient norm ratios (``hmg/<task>/norm_ratio``) where logged. Figures and report go to the
  experiment's parent MLflow run too.
* run directories (``runs/NAME``): one row per directory (each its own "point").

Without ``--out`` the table is printed to stdout. ``--per-epoch METRIC`` prints instead one row
per run with the *test* METRIC after every evaluated epoch and the first epoch's intra-SSL
aux/target gradient norm ratio (what ``tools/report_runs.py`` printed).

Runs whose ``final.json`` is missing or not FINISHED are listed under the table as excluded,
never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger("mbssl_dist.report")

METRIC_ORDER = ("recall@10", "ndcg@10", "recall@20", "ndcg@20", "recall@50", "ndcg@50")


@dataclass
class Run:
    point: str
    seed: str
    dir: Path
    final: dict | None
    records: list[dict] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return bool(self.final) and self.final.get("status", "FINISHED") == "FINISHED" and bool(self.final.get("test"))


def _read_final(d: Path) -> dict | None:
    try:
        return json.loads((d / "final.json").read_text())
    except (OSError, ValueError):
        return None


def read_records(d: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _seed_dirs(point_dir: Path) -> list[Path]:
    return sorted((p for p in point_dir.glob("seed*") if p.is_dir()), key=lambda p: (len(p.name), p.name))


def load(paths: Sequence[str | os.PathLike]) -> tuple[list[Run], dict | None]:
    """Runs under ``paths`` and the experiment.json of the first experiment directory (if any)."""
    runs: list[Run] = []
    meta = None
    for p in map(Path, paths):
        if (p / "experiment.json").is_file():
            m = json.loads((p / "experiment.json").read_text())
            meta = meta or m
            names = [pt["name"] for pt in m.get("points", [])]
            if not names:  # search: trials are the points
                names = sorted(d.name for d in p.iterdir() if d.is_dir() and _seed_dirs(d))
            for name in names:
                seeds = _seed_dirs(p / name)
                if not seeds:
                    runs.append(Run(name, "-", p / name, None))
                for s in seeds:
                    runs.append(Run(name, s.name, s, _read_final(s), read_records(s)))
        elif _seed_dirs(p):
            for s in _seed_dirs(p):
                runs.append(Run(p.name, s.name, s, _read_final(s), read_records(s)))
        else:
            runs.append(Run(p.name, "-", p, _read_final(p), read_records(p)))
    return runs, meta


def mean_std(xs: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for one value)."""
    n = len(xs)
    mu = sum(xs) / n
    if n < 2:
        return mu, None
    return mu, math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1))


def summarize(runs: list[Run], phase: str = "test") -> tuple[list[str], dict[str, dict[str, tuple]]]:
    """(metric columns, point -> metric -> (mean, std, n)) over the FINISHED runs."""
    by_point: dict[str, list[Run]] = {}
    for r in runs:
        by_point.setdefault(r.point, [])
        if r.finished:
            by_point[r.point].append(r)
    found = {k for rs in by_point.values() for r in rs for k in (r.final.get(phase) or {}) if k != "n_users"}
    cols = [m for m in METRIC_ORDER if m in found] + sorted(found - set(METRIC_ORDER))
    out: dict[str, dict[str, tuple]] = {}
    for point, rs in by_point.items():
        out[point] = {}
        for m in cols:
            xs = [float(r.final[phase][m]) for r in rs if m in (r.final.get(phase) or {})]
            if xs:
                mu, sd = mean_std(xs)
                out[point][m] = (mu, sd, len(xs))
    return cols, out


def markdown_table(cols: list[str], summary: dict[str, dict[str, tuple]], digits: int = 4) -> str:
    """Rows = points, cells ``mean ± std``; the best mean of each column in bold."""
    best = {m: max((s[m][0] for s in summary.values() if m in s), default=None) for m in cols}
    lines = ["| point | " + " | ".join(cols) + " | seeds |", "|---|" + "---|" * (len(cols) + 1)]
    for point, s in summary.items():
        cells = []
        for m in cols:
            if m not in s:
                cells.append("")
                continue
            mu, sd, _ = s[m]
            txt = f"{mu:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")
            cells.append(f"**{txt}**" if best[m] is not None and mu == best[m] else txt)
        n = max((v[2] for v in s.values()), default=0)
        lines.append(f"| {point} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines)


def excluded(runs: list[Run]) -> list[str]:
    out = []
    for r in runs:
        if not r.finished:
            why = "no final.json" if r.final is None else f"status {r.final.get('status')}"
            out.append(f"{r.point}/{r.seed} ({why})")
    return out


def per_epoch_table(paths: Sequence[str], metric: str) -> str:
    """One row per run dir: test ``metric`` after every evaluated epoch, and the first epoch's
    intra-SSL aux/target gradient norm ratio (blank when the run had no intra SSL)."""
    rows = []
    for d in map(Path, paths):
        recs = read_records(d)
        test = {r["epoch"]: r[metric] for r in recs if r.get("kind") == "test" and metric in r}
        ratio = next((r["hmg/intra/norm_ratio"] for r in recs
                      if r.get("kind") == "epoch" and "hmg/intra/norm_ratio" in r), None)
        rows.append((d.name, test, "" if ratio is None else f"{ratio:.3g}"))
    n = max((max(t) + 1 for _, t, _ in rows if t), default=0)
    lines = ["| run | " + " | ".join(f"epoch {e + 1}" for e in range(n)) + " | intra/target grad ratio, epoch 1 |",
             "|---|" + "---|" * n + "---|"]
    for name, test, ratio in rows:
        cells = [f"{test[e]:.4f}" if e in test else "" for e in range(n)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    _plt().close(fig)
    os.replace(tmp, path)
    return path


def sweep_figure(meta: dict, cols: list[str], summary: dict, out: Path) -> Path | None:
    """Test metrics against the swept value (r or N), mean with std error bars."""
    pts = [p for p in meta.get("points", []) if p.get("value") is not None and p["name"] in summary]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in cols:
        xs = [p["value"] for p in pts if m in summary[p["name"]]]
        mus = [summary[p["name"]][m][0] for p in pts if m in summary[p["name"]]]
        sds = [summary[p["name"]][m][1] or 0.0 for p in pts if m in summary[p["name"]]]
        ax.errorbar(xs, mus, yerr=sds, marker="o", capsize=3, label=m)
    ax.set_xlabel({"relax-sweep": "HMG relax r", "fn-sweep": "false negatives N (users and items)"}
                  .get(meta.get("experiment"), "value"))
    ax.set_ylabel("test metric")
    ax.set_title(f"{meta.get('experiment')}: mean ± std over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out / "sweep.png")


def _mean_curve(runs: list[Run], kind: str, key: str) -> tuple[list[int], list[float]]:
    by_epoch: dict[int, list[float]] = {}
    for r in runs:
        for rec in r.records:
            v = rec.get(key)
            if rec.get("kind") == kind and isinstance(v, (int, float)) and math.isfinite(v):
                by_epoch.setdefault(int(rec["epoch"]), []).append(float(v))
    es = sorted(by_epoch)
    return es, [sum(by_epoch[e]) / len(by_epoch[e]) for e in es]


def curve_figures(runs: list[Run], metric: str, out: Path) -> list[Path]:
    """Per variant (mean over seeds): validation metric, per-task losses (log y), and HMG
    aux/target norm ratios (log y) where logged."""
    plt = _plt()
    by_point: dict[str, list[Run]] = {}
    for r in runs:
        if r.records:
            by_point.setdefault(r.point, []).append(r)
    if not by_point:
        return []
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    color = {p: f"C{i % 10}" for i, p in enumerate(by_point)}  # one colour per variant in every panel
    handles = [Line2D([], [], color=color[p], label=p) for p in by_point]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for point, rs in by_point.items():
        es, vs = _mean_curve(rs, "valid", metric)
        if es:
            ax.plot([e + 1 for e in es], vs, marker="o", color=color[point], label=point)
    ax.set_xlabel("epoch"), ax.set_ylabel(f"validation {metric}"), ax.set_title("validation per variant")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(handles=handles, fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, out / "valid_curves.png"))
    keys = sorted({k for rs in by_point.values() for r in rs for rec in r.records if rec.get("kind") == "epoch"
                   for k in rec if k.startswith("loss/")})
    ratio_keys = sorted({k for rs in by_point.values() for r in rs for rec in r.records
                         if rec.get("kind") == "epoch" for k in rec
                         if k.startswith("hmg/") and k.endswith("/norm_ratio")})
    for name, ks, ylabel in (("loss_curves.png", keys, "loss"), ("hmg_norm_ratio.png", ratio_keys,
                                                                   "aux/target gradient norm")):
        if not ks:
            continue
        fig, axes = plt.subplots(1, len(ks), figsize=(4 * len(ks), 3.8), squeeze=False)
        for ax, k in zip(axes[0], ks):
            for point, rs in by_point.items():
                es, vs = _mean_curve(rs, "epoch", k)
                if es:
                    ax.plot([e + 1 for e in es], vs, color=color[point], label=point)
            ys = [v for line in ax.get_lines() for v in line.get_ydata()]
            if ys and min(ys) > 0:
                ax.set_yscale("log")
                ax.set_title(k)
            else:  # e.g. the non-sampling loss is negative: log scale impossible
                ax.set_title(f"{k} (linear: values <= 0)")
            ax.set_xlabel("epoch"), ax.set_ylabel(ylabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7)
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        paths.append(_save(fig, out / name))
    return paths


def sparsity_section(runs: list[Run], out: Path) -> tuple[list[str], Path | None]:
    """Table and figure (bars: test users per group; line: mean NDCG@50, std error bars) from
    the runs' sparsity.json (written by ``experiments sparsity``)."""
    docs, names = [], []
    for r in runs:
        try:
            docs.append(json.loads((r.dir / "sparsity.json").read_text()))
            names.append(f"{r.point}/{r.seed}")
        except (OSError, ValueError):
            pass
    if not docs:
        return [], None
    labels = [g["label"] for g in docs[0]["groups"]]
    keep = [[g["label"] for g in d["groups"]] == labels for d in docs]
    same = [d for d, k in zip(docs, keep) if k]
    metrics = [m for m in METRIC_ORDER if m in docs[0]["groups"][0]["test"]] if labels else []
    kinds = {"model": "best-validation model", "checkpoint": "last checkpoint"}
    models = "; ".join(f"{n}: {kinds.get(d.get('source'), d.get('source', '?'))}, epoch {d.get('epoch')}"
                       for n, d, k in zip(names, docs, keep) if k)
    other = [n for n, k in zip(names, keep) if not k]
    lines = ["## Per user group by training purchases (sparsity)", "",
             f"{docs[0]['grouping']}; {len(same)} run(s), scored with ({models})"
             + (f"; left out, grouped otherwise: {', '.join(other)}" if other else "") + ".", "",
             "| purchases | test users | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    stats = []
    for j, lab in enumerate(labels):
        cells = []
        for m in metrics:
            xs = [d["groups"][j]["test"][m] for d in same if isinstance(d["groups"][j]["test"].get(m), (int, float))]
            mu, sd = mean_std(xs) if xs else (float("nan"), None)
            cells.append(f"{mu:.4f}" + (f" ± {sd:.4f}" if sd is not None else ""))
            if m == "ndcg@50" or (m == metrics[-1] and "ndcg@50" not in metrics):
                stats.append((mu, sd or 0.0))
        lines.append(f"| {lab} | {same[0]['groups'][j]['n_users']} | " + " | ".join(cells) + " |")
    lines.append("")
    if not labels:
        return lines, None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(range(len(labels)), [same[0]["groups"][j]["n_users"] for j in range(len(labels))], color="#bbb")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("training purchases"), ax.set_ylabel("test users")
    ax2 = ax.twinx()
    ax2.errorbar(range(len(labels)), [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", color="C3",
                 capsize=3)
    ax2.set_ylabel("ndcg@50" if "ndcg@50" in metrics else metrics[-1])
    ax.set_title("test metric per sparsity group")
    fig.tight_layout()
    return lines, _save(fig, out / "sparsity.png")


# ----------------------------------------------------------------------------- report


def write_report(paths: Sequence[str], out: Path) -> Path:
    """report.md + PNGs + summary.json in ``out``; logged to the parent MLflow run if any."""
    runs, meta = load(paths)
    out.mkdir(parents=True, exist_ok=True)
    title = meta.get("experiment") if meta else ", ".join(Path(p).name for p in paths)
    metric = (meta or {}).get("select_metric") or "recall@10"
    cols, test = summarize(runs, "test")
    vcols, valid = summarize(runs, "valid")
    md = [f"# Experiment: {title}", ""]
    if meta:
        md += [f"--data `{meta.get('data') or meta.get('config') or 'synthetic'}`; overrides: `{' '.join(meta.get('sets') or []) or '-'}`; "
               f"seeds: {meta.get('seeds')}; epochs: {meta.get('epochs') or 'config'}; processes: "
               f"{meta.get('processes')}.", ""]
        over = {p["name"]: " ".join(p.get("overrides") or []) for p in meta.get("points", [])}
        if any(over.values()):
            md += ["Points: " + "; ".join(f"`{k}` = `{v or 'base'}`" for k, v in over.items()), ""]
    md += ["## Test (at the validation-selected epoch), mean ± std over seeds", "", markdown_table(cols, test), ""]
    if vcols:
        md += ["## Validation", "", markdown_table(vcols, valid), ""]
    exc = excluded(runs)
    if exc:
        md += ["Excluded (not FINISHED): " + ", ".join(exc), ""]
    sp_lines, sp_fig = sparsity_section(runs, out)
    md += sp_lines
    figs = [sp_fig] if sp_fig else []
    if meta:
        f = sweep_figure(meta, cols, test, out)
        figs += [f] if f else []
    figs += curve_figures(runs, metric, out)
    if figs:
        md += ["## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figs] + [""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(md))
    atomic_write_json(out / "summary.json", {
        "experiment": title, "test": {p: {m: list(v) for m, v in s.items()} for p, s in test.items()},
        "valid": {p: {m: list(v) for m, v in s.items()} for p, s in valid.items()}, "excluded": exc})
    if meta and meta.get("mlflow_parent_run_id"):
        try:
            import mlflow

            mlflow.set_tracking_uri(meta["tracking_uri"])
            client = mlflow.MlflowClient()
            for f in [report, out / "summary.json", *figs]:
                client.log_artifact(meta["mlflow_parent_run_id"], str(f), artifact_path="report")
        except Exception as e:  # noqa: BLE001 - the files are written; MLflow is a mirror
            log.warning("report not logged to MLflow run %s: %s", meta["mlflow_parent_run_id"], e)
    log.info("wrote %s (%d runs, %d figures)", report, len(runs), len(figs))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mbssl_dist.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="an experiment directory (OUT/NAME) or run directories (runs/NAME)")
    ap.add_argument("--out", help="report directory (report.md, PNGs); omitted = print the table")
    ap.add_argument("--per-epoch", metavar="METRIC", help="print test METRIC after every epoch, one row per run")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    missing = [p for p in a.paths if not Path(p).exists()]
    if a.per_epoch:
        print(per_epoch_table(a.paths, a.per_epoch))
        return 0
    if missing and len(missing) == len(a.paths):
        print(f"error: {missing[0]}: no such directory", file=sys.stderr)
        return 2
    if a.out:
        write_report(a.paths, Path(a.out))
    else:
        runs, _ = load(a.paths)
        cols, test = summarize(runs)
        print(markdown_table(cols, test))
        exc = excluded(runs)
        if exc:
            print("\nExcluded (not FINISHED): " + ", ".join(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""mbssl_dist.report reads run directories the way the trainer writes them (it replaced
tools/report_runs.py)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _report(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "mbssl_dist.report", *args], capture_output=True, text=True,
                          check=True, cwd=ROOT).stdout


def test_report_per_epoch(tmp_path):
    d = tmp_path / "r1"
    d.mkdir()
    recs = [{"epoch": 0, "kind": "epoch", "hmg/intra/norm_ratio": 1234.5},
            {"epoch": 0, "kind": "valid", "recall@10": 0.9},
            {"epoch": 0, "kind": "test", "recall@10": 0.0125},
            {"epoch": 1, "kind": "epoch", "hmg/intra/norm_ratio": 3.0},
            {"epoch": 1, "kind": "test", "recall@10": 0.25}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    lines = _report("--per-epoch", "recall@10", str(d), str(tmp_path / "missing")).strip().splitlines()
    assert lines[0].startswith("| run | epoch 1 | epoch 2 |")
    assert lines[2] == "| r1 | 0.0125 | 0.2500 | 1.23e+03 |"
    assert lines[3] == "| missing |  |  |  |"


def test_report_final_table_of_run_dirs(tmp_path):
    for name, r10, status in (("x", 0.125, "FINISHED"), ("y", 0.5, "FINISHED"), ("z", 0.9, "KILLED")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "final.json").write_text(json.dumps(
            {"status": status, "test": {"recall@10": r10, "ndcg@10": 1 - r10, "n_users": 5}}))
    out = _report(str(tmp_path / "x"), str(tmp_path / "y"), str(tmp_path / "z"), str(tmp_path / "nope"))
    lines = out.strip().splitlines()
    assert lines[0] == "| point | recall@10 | ndcg@10 | seeds |"
    assert lines[2] == "| x | 0.1250 | **0.8750** | 1 |"
    assert lines[3] == "| y | **0.5000** | 0.5000 | 1 |"
    assert lines[4] == "| z |  |  | 0 |"
    assert "z/- (status KILLED)" in out and "nope/- (no final.json)" in out

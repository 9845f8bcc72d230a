"""tools/report_runs.py reads run directories the way the trainer writes them."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_report_runs_per_epoch(tmp_path):
    d = tmp_path / "r1"
    d.mkdir()
    recs = [{"epoch": 0, "kind": "epoch", "hmg/intra/norm_ratio": 1234.5},
            {"epoch": 0, "kind": "valid", "recall@10": 0.9},
            {"epoch": 0, "kind": "test", "recall@10": 0.0125},
            {"epoch": 1, "kind": "epoch", "hmg/intra/norm_ratio": 3.0},
            {"epoch": 1, "kind": "test", "recall@10": 0.25}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "report_runs.py"), "--per-epoch", "recall@10", str(d),
                          str(tmp_path / "missing")], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[0].startswith("| run | epoch 1 | epoch 2 |")
    assert lines[2] == "| r1 | 0.0125 | 0.2500 | 1.23e+03 |"
    assert lines[3] == "| missing |  |  |  |"

"""README's reproducibility promise, as it holds (issue #15): with one intra-op thread per
process (``train.threads = 1``, and under torchrun, which sets OMP_NUM_THREADS=1) two runs with
the same seed write identical ``metrics.jsonl`` (tests/test_train.py checks that); with several
threads per process the same run agrees only to rounding. This checks the second half at the
default synthetic config, where 2 threads are measurably not bit-reproducible."""

from __future__ import annotations

import json
import math
from pathlib import Path

from mbssl_dist.train import main

from .conftest import REPO


def _run(tmp: Path, name: str, threads: int) -> list[dict]:
    args = ["--config", str(REPO / "configs" / "synthetic.toml")]
    for x in [f'data.cache_dir="{tmp / "cache"}"', f'run.output_dir="{tmp / "runs"}"', f'run.name="{name}"',
              "run.mlflow=false", "run.progress=false", "train.epochs=1", "train.max_steps_per_epoch=3",
              f"train.threads={threads}"]:
        args += ["--set", x]
    assert main(args) == 0
    return [json.loads(x) for x in (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()]


def test_two_threads_agree_to_rounding(tmp_path):
    a, b = _run(tmp_path, "a", 2), _run(tmp_path, "b", 2)
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    worst = 0.0
    for ra, rb in zip(a, b):
        for k, va in ra.items():
            vb = rb[k]
            if isinstance(va, float):
                assert math.isfinite(va) and math.isfinite(vb)
                worst = max(worst, abs(va - vb) / max(abs(va), abs(vb), 1e-12))
            else:
                assert va == vb, k
    # measured on the 2-core dev machine: 1.2e-8 (1.5e-7 with MKL_CBWR=COMPATIBLE) after 3 steps
    assert worst <= 1e-5, worst

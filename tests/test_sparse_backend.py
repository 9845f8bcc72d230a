"""``train.sparse_backend``: the trainer end to end with torch's sparse kernels (the CUDA code
path) on CPU equals the scipy run; invalid combinations are config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mbssl_dist.config import ConfigError, load_config
from mbssl_dist.graph.sparse import get_sparse_backend, set_sparse_backend

from .test_train import run


@pytest.fixture
def restore_backend():
    """main() sets the process-wide backend; put back what the other tests run with."""
    prev = get_sparse_backend()
    yield
    set_sparse_backend(prev)


def test_torch_kernels_train_like_scipy(tmp_path, restore_backend):
    rc_s, out_s = run(tmp_path, "scipy", ["train.epochs=2", 'train.sparse_backend="scipy"'])
    rc_t, out_t = run(tmp_path, "torch", ["train.epochs=2", 'train.sparse_backend="torch"'])
    assert rc_s == 0 and rc_t == 0
    ms = [json.loads(x) for x in (out_s / "metrics.jsonl").read_text().splitlines()]
    mt = [json.loads(x) for x in (out_t / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in ms] == [r["kind"] for r in mt]
    n = 0
    for a, b in zip(ms, mt):
        for k, v in a.items():
            if isinstance(v, float):
                # float32 sums in another order: equal to float32 precision over 2 epochs
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (a["kind"], a.get("epoch"), k)
                n += 1
    assert n > 10
    assert get_sparse_backend() == "torch"  # the last run's choice reached the kernels


@pytest.mark.parametrize("bad, expect", [
    (['train.sparse_backend="cusparse"'], "train.sparse_backend = 'cusparse': expected auto, scipy or torch"),
    (['train.sparse_backend="scipy"', 'train.device="cuda"'], "needs CPU tensors"),
])
def test_sparse_backend_config_errors(bad, expect):
    with pytest.raises(ConfigError, match=expect.replace("(", r"\(")):
        load_config(None, bad)

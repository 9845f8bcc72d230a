"""``train.keep_freed_memory``: after :func:`keep_freed_memory`, freed 36 MB temporaries are
reused without page faults; with glibc's defaults every such allocation faults its pages in
again.
The oracle is the kernel's minor page-fault count (``getrusage``) in fresh processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    from mbssl_dist.utils.allocator import keep_freed_memory
    assert keep_freed_memory()
a = torch.ones(140000, 64)  # 36 MB: above glibc's 32 MiB ceiling of the mmap threshold
faults = []
for _ in range(8):  # a step's pattern: temporaries of that size made by torch ops, then freed
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b = a * 2.0
    c = b + a
    d = (c * b).sum(1)
    del b, c, d
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps(faults))
"""


def _faults(mode: str) -> list[int]:
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_large_blocks_are_reused_without_page_faults():
    pages = 140000 * 64 * 4 // 4096  # one temporary's pages
    default, keep = _faults("default"), _faults("keep")
    assert all(f >= pages for f in default[1:]), default  # glibc: fresh mmaps every time
    # kept: once the heap has grown to the working set (a few rounds), the same pages again
    assert all(f < pages // 20 for f in keep[-3:]), keep
    assert keep[0] >= pages  # the first time still faults its pages in


def test_the_trainer_calls_it_when_switched_on(tmp_path, monkeypatch):
    import mbssl_dist.train as T
    from tests.test_resume import args_for

    calls = []
    monkeypatch.setattr(T, "keep_freed_memory", lambda: calls.append(1) or True)
    assert T.main(args_for(tmp_path, "on", ["train.epochs=1", "train.keep_freed_memory=true"])) == 0
    assert calls == [1]
    assert T.main(args_for(tmp_path, "off", ["train.epochs=1"])) == 0  # off by default
    assert calls == [1]


def test_the_config_field():
    from mbssl_dist.config import ConfigError, load_config

    assert load_config(None, []).train.keep_freed_memory is False
    assert load_config(None, ["train.keep_freed_memory=true"]).train.keep_freed_memory is True
    with pytest.raises(ConfigError, match="train.keep_freed_memory"):
        load_config(None, ['train.keep_freed_memory="yes"'])

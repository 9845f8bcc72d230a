"""Bad input, case by case (issue #15 and item 7 of #10): each ends in a one-line error that
names the file and the 1-based line (or the config field), exit code 2, no traceback, no
output written, and the input untouched."""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mbssl_dist.data import DataError
from mbssl_dist.data.__main__ import main as data_main

from .conftest import REPO


def write(d: Path, name: str, text: str | bytes) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def text_dir(d: Path, **override: str | bytes) -> Path:
    """A small valid text dataset (view < cart < buy); ``override`` replaces files by name."""
    files: dict[str, str | bytes] = {"view.txt": "0 1 2 3\n1 0 2\n2 3 4\n", "cart.txt": "0 1 3\n2 4\n",
                                     "buy.txt": "0 1 3\n1 0 2\n2 4 3\n", "test.txt": "0 2\n1 4\n2 0\n"}
    files.update(override)
    for name, content in files.items():
        if content is not None:
            write(d, name, content)
    return d


def snapshot(d: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``d`` (the input must come out byte-identical)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def _drop_dac_override() -> None:
    """preexec_fn: root ignores directory permissions through CAP_DAC_OVERRIDE; drop it (and
    CAP_DAC_READ_SEARCH) from the bounding set so the child meets a read-only dir as a user does."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def cli(*args: str, as_user: bool = False, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``python -m mbssl_dist.data prepare ARGS``; ``as_user``: without root's DAC override."""
    pre = _drop_dac_override if as_user and os.geteuid() == 0 else None
    return subprocess.run([sys.executable, "-m", "mbssl_dist.data", "prepare", *args], capture_output=True,
                          text=True, cwd=cwd, preexec_fn=pre)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one ``error:`` line on stderr and no traceback; returns that line."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------ no data loss (#10 item 7)


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_prepare_refuses_out_overlapping_input(tmp_path, where):
    src = text_dir(tmp_path / "raw" / "in")
    before = snapshot(tmp_path / "raw")
    out = {"same": src, "parent": src.parent, "inside": src / "prepared"}[where]
    r = cli("--format", "text", "--input", str(src), "--out", str(out), "--overwrite")
    one_line_error(r, str(out), "the input", "refusing")
    assert snapshot(tmp_path / "raw") == before
    assert not (src / "prepared").exists()


def test_prepare_refuses_table_file_as_out(tmp_path):
    csv = write(tmp_path / "d", "log.csv", "user_id,item_id,behavior\na,x,buy\na,y,buy\n")
    before = snapshot(tmp_path / "d")
    for out in (csv, csv.parent):
        with pytest.raises(DataError, match="the input"):
            from mbssl_dist.data.prepare import prepare_table
            prepare_table(csv, out, overwrite=True)
    assert snapshot(tmp_path / "d") == before


def test_prepare_refuses_symlinked_out_to_input(tmp_path):
    src = text_dir(tmp_path / "in")
    before = snapshot(src)
    (tmp_path / "link").symlink_to(src)
    assert data_main(["prepare", "--format", "text", "--input", str(src), "--out", str(tmp_path / "link"),
                      "--overwrite"]) == 2
    assert snapshot(src) == before


def test_overwrite_replaces_only_a_prepared_dir(tmp_path):
    mine = tmp_path / "mine"
    write(mine, "notes.md", "my notes\n")
    assert data_main(["prepare", "--format", "synthetic", "--out", str(mine), "--overwrite"]) == 2
    assert (mine / "notes.md").read_text() == "my notes\n"
    out = tmp_path / "out"
    assert data_main(["prepare", "--format", "synthetic", "--out", str(out)]) == 0
    assert data_main(["prepare", "--format", "synthetic", "--out", str(out), "--overwrite", "--seed", "1"]) == 0


def test_prepare_read_only_out_fails_before_parsing(tmp_path):
    """The writability probe runs first: a read-only destination is exit 2, one line, and the
    input is not even opened (a corrupt input would otherwise be reported first)."""
    src = text_dir(tmp_path / "in", **{"buy.txt": "0 1\nnot-an-id 2\n"})
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for out in (ro / "out", ro / "deeper" / "out"):
            r = cli("--format", "text", "--input", str(src), "--out", str(out), as_user=True)
            line = one_line_error(r, str(out), "not writable", "Permission denied")
            assert "buy.txt" not in line
            assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)

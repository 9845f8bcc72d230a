"""Shared-memory collectives (``parallel/shm.py``) under stress, against gloo and against a
local oracle: 3 ranks on the 2-core machine, many alternating reduce-scatters and
all-gathers with random payloads that grow far past the 64 KiB minimum segment (so the
segments are re-created and re-mapped many times) and shrink again, padded uneven row
slices, float32 and float64, the caller-filled send buffer, ``async_op``, random skew
between ranks; the /dev/shm -> temporary-directory fallback with the free space faked on
one rank; the spin-barrier timeout; and no segment file left behind.

Oracle: every rank can regenerate every rank's payload from its seed, so the expected
reduce-scatter is the sum in rank order (the order shm adds in: bit-identical) and the
expected all-gather is the stack. gloo runs the same calls on the same process group and
must agree to float rounding (its summation order is its own)."""

from __future__ import annotations

import glob
import json
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from mbssl_dist.parallel.shm import shm_supported

pytestmark = pytest.mark.skipif(not shm_supported(), reason="shared-memory collectives need x86-64 Linux")

MIN_SEGMENT = 1 << 16
N_CALLS = 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def payload(call: int, rank: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * call + rank)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def call_plan(call: int, world: int) -> dict:
    """The same on every rank: kind, row count (uneven: padded slices), width, dtype, flags.
    The upper bound on the bytes grows with the call index (1 KiB -> about 2 MiB), so
    segments grow many times; each draw is uniform below it, so payloads also shrink."""
    rng = np.random.default_rng(call)
    cap_bytes = int(1024 * 2 ** (call / 9))
    dtype = torch.float32 if rng.random() < 0.5 else torch.float64
    d = int(rng.integers(1, 9))
    esize = 4 if dtype == torch.float32 else 8
    max_rows = max(1, cap_bytes // (esize * d * (world if call % 2 == 0 else 1)))
    n = int(rng.integers(1, max_rows + 1))  # rows to split over the ranks (any n, not a multiple)
    return {"kind": "rs" if call % 2 == 0 else "ag", "n": n, "d": d, "dtype": dtype,
            "async": bool(rng.random() < 0.5), "send_buffer": bool(rng.random() < 0.5)}


def fake_statvfs(free_bytes: int):
    """``os.statvfs`` that reports ``free_bytes`` available on /dev/shm, the truth elsewhere."""
    real = os.statvfs

    def statvfs(path):
        st = real(path)
        if os.fspath(path) != "/dev/shm":
            return st
        return os.statvfs_result((st.f_bsize, 1, st.f_blocks, free_bytes, free_bytes, st.f_files, st.f_ffree,
                                  st.f_favail, st.f_flag, st.f_namemax))
    return statvfs


def _stress_worker(rank: int, world: int, port: int, out_dir: str, fake_free: dict, n_calls: int,
                   timeout_case: bool) -> None:
    try:
        torch.set_num_threads(1)
        import torch.distributed as dist

        import mbssl_dist.parallel.shm as shm
        from mbssl_dist.parallel.comm import RowSlices
        from mbssl_dist.parallel.dist import DistComm

        tempfile.tempdir = str(Path(out_dir) / "tmp")  # the fallback directory, ours to inspect
        if str(rank) in fake_free:
            os.statvfs = fake_statvfs(fake_free[str(rank)])
        picks: list[tuple[int, str]] = []
        orig_pick = shm.ShmComm._pick_dir

        def recording_pick(self, nbytes):
            d = orig_pick(self, nbytes)
            picks.append((nbytes, d))
            return d
        shm.ShmComm._pick_dir = recording_pick

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        comm = shm.ShmComm()
        prefix = comm._prefix
        skew = np.random.default_rng(77 + rank)
        left_while_running = []
        max_err = 0.0
        for call in range(n_calls):
            p = call_plan(call, world)
            sl = RowSlices(p["n"], world)
            c, d, dt = sl.size, p["d"], p["dtype"]
            if skew.random() < 0.25:  # let this rank fall behind now and then
                time.sleep(float(skew.random()) * 0.003)
            if p["kind"] == "rs":
                # [P, c, d]: the rows of slice q are the first count(q) rows of send[q], padding zero
                def send_of(r):
                    s = payload(call, r, (world, c, d), dt)
                    for q in range(world):
                        s[q, sl.count(q):] = 0
                    return s
                mine = send_of(rank)
                want = sum((send_of(r)[rank] for r in range(1, world)), send_of(0)[rank].clone())
                send = mine.clone()
                if p["send_buffer"]:
                    buf = comm.reduce_scatter_send_buffer(mine.numel(), dt, "cpu")
                    send = buf.view(world, c, d)
                    send.copy_(mine)
                out = torch.full((c, d), float("nan"), dtype=dt)
                h = comm.reduce_scatter_sum_(send, out, async_op=p["async"])
                if p["async"]:
                    h.wait()
                assert torch.equal(out, want), f"call {call}: shm reduce-scatter != rank-order sum"
                ref = torch.full((c, d), float("nan"), dtype=dt)
                DistComm.reduce_scatter_sum_(comm, mine.clone(), ref)  # the same call through gloo
                # (not torch.testing.assert_close: its first call imports DTensor and sympy, ~3 s)
                tol = 1e-5 if dt == torch.float32 else 1e-12
                err = float(((out - ref).abs() / (1 + ref.abs())).max())
                assert err <= tol, f"call {call}: shm reduce-scatter differs from gloo by {err}"
                max_err = max(max_err, err)
            else:
                mine = payload(call, rank, (c, d), dt)
                want = torch.stack([payload(call, r, (c, d), dt) for r in range(world)])
                out = torch.full((world, c, d), float("nan"), dtype=dt)
                h = comm.all_gather_(mine, out, async_op=p["async"])
                if p["async"]:
                    h.wait()
                assert torch.equal(out, want), f"call {call}: shm all-gather != stack"
                ref = torch.empty_like(out)
                DistComm.all_gather_(comm, mine, ref)
                assert torch.equal(out, ref), f"call {call}: shm all-gather != gloo"
            if call % 15 == 14:  # segments are unlinked once every rank has mapped them
                dist.barrier()
                left_while_running += glob.glob(f"/dev/shm/{prefix}*") + glob.glob(f"{tempfile.tempdir}/{prefix}*")
        n_maps = len(comm._maps)
        timeout_msg = ""
        if timeout_case:
            # rank 1 never enters the next collective: rank 0's spin barrier must give up
            dist.barrier()
            if rank == 0:
                shm.SPIN_TIMEOUT_S = 0.05
                t0 = time.monotonic()
                try:
                    comm.all_gather_(torch.ones(4), torch.empty(world, 4))
                except RuntimeError as e:
                    timeout_msg = f"{e} after {time.monotonic() - t0:.2f}s"
            dist.barrier()  # rank 1 waits here until rank 0 has given up
        comm.close()
        dist.barrier()
        dist.destroy_process_group()
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({
            "prefix": prefix, "picks": picks, "left_while_running": left_while_running, "n_maps": n_maps,
            "timeout_msg": timeout_msg, "max_err": max_err}))
    except Exception:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def run_ranks(world: int, out: Path, fake_free: dict, n_calls: int = N_CALLS, timeout_case: bool = False):
    (out / "tmp").mkdir(parents=True)
    # forkserver: the ranks are forked from one clean server process that imported torch
    # once (not from pytest, whose OpenMP pool is not fork-safe), instead of 3 fresh imports
    # per test on the 2-core machine
    import multiprocessing.forkserver as fs

    fs.set_forkserver_preload(["torch", "torch.distributed", "mbssl_dist.parallel.dist", "tests.test_shm"])
    mp.start_processes(_stress_worker, args=(world, free_port(), str(out), fake_free, n_calls, timeout_case),
                       nprocs=world, join=True, start_method="forkserver")
    errs = sorted(out.glob("*.err"))
    assert not errs, errs[0].read_text()
    res = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    prefix = res[0]["prefix"]
    assert all(r["prefix"] == prefix for r in res)
    # nothing left behind in either place, during the run or after it
    assert not glob.glob(f"/dev/shm/{prefix}*") and not list((out / "tmp").iterdir())
    assert all(not r["left_while_running"] for r in res), res[0]["left_while_running"]
    return res


def test_shm_stress_three_ranks_against_gloo(tmp_path):
    """3 ranks, 100 alternating calls; rank 2 sees only 1 MiB free in /dev/shm: small segments
    stay there, the larger ones (which would not fit for all ranks) go to the temp dir."""
    fake = 1 << 20
    res = run_ranks(3, tmp_path, {"2": fake})
    picks = res[0]["picks"]
    assert [p for p in picks] == res[2]["picks"]  # every rank picked the same directory
    real_free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    for nbytes, d in picks:
        need = 2 * nbytes * 3
        assert d == ("/dev/shm" if need < fake and need < real_free else str(tmp_path / "tmp")), (nbytes, d)
    grown = [n for n, _ in picks if n >= MIN_SEGMENT]
    assert min(grown) == MIN_SEGMENT and max(grown) >= 8 * MIN_SEGMENT, grown  # far past 64 KiB
    assert len(grown) >= 10  # segments re-created (and re-mapped) many times
    assert {d for _, d in picks} == {"/dev/shm", str(tmp_path / "tmp")}  # both places used
    assert res[0]["n_maps"] == 3 * len(picks)  # one mapping per rank per segment


def test_shm_temp_dir_fallback_and_spin_timeout(tmp_path):
    """2 ranks; rank 1 sees no room in /dev/shm at all, so every segment (the flags too) goes
    to the temp dir on both ranks, and results stay exact. Then rank 1 skips a collective:
    rank 0's spin barrier raises instead of hanging."""
    res = run_ranks(2, tmp_path, {"1": 0}, n_calls=30, timeout_case=True)
    assert res[0]["picks"] and all(d == str(tmp_path / "tmp") for _, d in res[0]["picks"])
    msg = res[0]["timeout_msg"]
    assert "rank 0: a peer did not reach shared-memory barrier" in msg, msg
    assert float(msg.rsplit(" after ", 1)[1][:-1]) < 30

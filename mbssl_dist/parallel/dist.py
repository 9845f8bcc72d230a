"""``torch.distributed`` backed ``Comm`` with autograd-aware collectives, process-group
setup and teardown, and the frame of the commands that run on every rank (``run_ranked``).
Training, evaluation, recommendation and the swing CLI reach ``torch.distributed``'s
process groups and collectives only through this module (checkpoints use DCP, in
``training/checkpoint.py``).
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from typing import Any, Callable

import torch
import torch.distributed as dist

from .comm import Comm

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


# torch >= 2.10 renamed these (the old names warn); torch 2.2 only has the old ones
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _rs(comm: "DistComm", send: torch.Tensor, out: torch.Tensor, async_op: bool = False):
    """out = this rank's chunk of sum over ranks of send ([P, *out.shape]); flat views, since
    the backends chunk along dim 0. Returns ``out``, or the work handle with ``async_op``."""
    comm._count(send, comm.world_size - 1, comm.world_size)
    work = _reduce_scatter(out.view(-1), send.contiguous().view(-1), op=dist.ReduceOp.SUM, async_op=async_op)
    return work if async_op else out


def _ag(comm: "DistComm", t: torch.Tensor, out: torch.Tensor, async_op: bool = False):
    comm._count(out, comm.world_size - 1, comm.world_size)
    work = _all_gather(out.view(-1), t.contiguous().view(-1), async_op=async_op)
    return work if async_op else out


class _ReduceScatterSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: "DistComm") -> torch.Tensor:
        ctx.comm = comm
        return _rs(comm, x, x.new_empty(x.shape[1:]))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        comm = ctx.comm
        return _ag(comm, g, g.new_empty((comm.world_size,) + tuple(g.shape))), None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: "DistComm") -> torch.Tensor:
        ctx.comm = comm
        return _ag(comm, x, x.new_empty((comm.world_size,) + tuple(x.shape)))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return _rs(ctx.comm, g, g.new_empty(g.shape[1:])), None


class _AllReduceSum(torch.autograd.Function):
    """y = sum_r x_r on every rank. If every rank's loss depends on y, the gradient of the
    global loss (sum over ranks) w.r.t. x_r is sum_r dL_r/dy: an all-reduce of the grads."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: "DistComm") -> torch.Tensor:
        ctx.comm = comm
        y = x.clone()
        comm._count(y, 2 * (comm.world_size - 1), comm.world_size)
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.clone()
        ctx.comm._count(g, 2 * (ctx.comm.world_size - 1), ctx.comm.world_size)
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g, None


class _AllGatherCat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int, comm: "DistComm") -> torch.Tensor:
        ctx.sizes, ctx.rank, ctx.comm = sizes, rank, comm
        maxn = max(sizes)
        pad = x.new_zeros((maxn,) + tuple(x.shape[1:]))
        pad[: x.shape[0]] = x
        bufs = [torch.empty_like(pad) for _ in sizes]
        comm._count(pad, comm.world_size - 1, 1)
        dist.all_gather(bufs, pad.contiguous())
        return torch.cat([b[:n] for b, n in zip(bufs, sizes)], 0)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.contiguous().clone()
        ctx.comm._count(g, 2 * (ctx.comm.world_size - 1), ctx.comm.world_size)
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return g[start: start + ctx.sizes[ctx.rank]], None, None, None


class DistComm(Comm):
    def __init__(self, device: torch.device | None = None):
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device or torch.device("cpu")
        self.bytes_sent = 0  # bytes this rank puts on the wire under ring algorithms (bench_dist)

    def _count(self, t: torch.Tensor, num: int = 2, den: int = 1) -> None:
        """Charge ``num/den`` x the size of ``t``: a ring all-reduce of n bytes sends 2(P-1)/P·n
        per rank, a reduce-scatter of an n-byte input or an all-gather into an n-byte output
        (P-1)/P·n, an all-gather of an m-byte piece (P-1)·m."""
        self.bytes_sent += t.numel() * t.element_size() * num // den

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(t, self)

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n)
        sizes = [int(s.item()) for s in sizes]
        self._count(n, self.world_size - 1, 1)
        return _AllGatherCat.apply(t, sizes, self.rank, self)

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        self._count(t, 2 * (self.world_size - 1), self.world_size)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def reduce_scatter_sum(self, t: torch.Tensor) -> torch.Tensor:
        return _ReduceScatterSum.apply(t, self)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return _AllGather.apply(t, self)

    def reduce_scatter_sum_(self, send: torch.Tensor, out: torch.Tensor, async_op: bool = False):
        return _rs(self, send, out, async_op)

    def all_gather_(self, t: torch.Tensor, out: torch.Tensor, async_op: bool = False):
        return _ag(self, t, out, async_op)

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(t, src=src)
        return t

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()


def elastic_attempt_store(timeout: datetime.timedelta):
    """Under torchrun (the agent hosts the store), a client of that store whose keys are
    prefixed by the restart attempt; None elsewhere.

    Why: after ``--max-restarts`` restarts the workers, torchrun's c10d rendezvous hands the
    new workers the *same* store (same MASTER_PORT), which still holds the dead workers'
    gloo/nccl addresses under the same key names; the new process group then reads them and
    fails (``connectFullMesh ... Connection refused``) or hangs, depending on who writes
    first. torch assumes a fresh store per attempt (``rendezvous._create_c10d_store``), which
    torch 2.13's agent does not provide; a per-attempt prefix gives the same isolation."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                           is_master=False, timeout=timeout)
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    return dist.PrefixStore(f"mbssl/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/attempt_{attempt}/", client)


def init_distributed(device_pref: str = "auto", collectives: str = "auto",
                     timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> tuple[Comm, torch.device]:
    """Initialise the process group when launched by torchrun (WORLD_SIZE set), choosing
    nccl for GPUs and gloo on CPU; otherwise return a ``LocalComm``. ``collectives`` (CPU
    only): ``shm``, ``gloo`` or ``auto`` (see ``DistConfig.collectives``). ``timeout``: how
    long a collective waits for the slowest rank."""
    from .comm import LocalComm

    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world == 1 and not dist.is_initialized():
        return LocalComm(), device
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        store = elastic_attempt_store(timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]), world_size=world,
                                    timeout=timeout)
        log.info("rank %d/%d: process group up (%s) on %s", dist.get_rank(), dist.get_world_size(), backend, device)
    if not use_cuda:
        from .shm import ShmComm, shm_supported, single_host

        if collectives == "shm" and not single_host():
            raise RuntimeError("dist.collectives = 'shm' needs every rank on one host (LOCAL_WORLD_SIZE == WORLD_SIZE)")
        if collectives == "shm" or (collectives == "auto" and single_host() and shm_supported()):
            log.info("rank %d: reduce-scatter / all-gather through shared memory", dist.get_rank())
            return ShmComm(device), device
    return DistComm(device), device


def shutdown(comm: Comm | None = None) -> None:
    if comm is not None:
        comm.close()
    if dist.is_initialized():
        dist.destroy_process_group()


OpenComm = Callable[[str], tuple[Comm, torch.device]]
"""``open_comm(collectives) -> (comm, device)``, handed to the body of :func:`run_ranked`."""


def run_ranked(prog: str, errors: tuple[type[BaseException], ...], body: Callable[[OpenComm], int]) -> int:
    """The frame of a command that runs on every rank on CPU (evaluate, recommend).

    ``body(open_comm)`` checks its inputs, then calls ``open_comm(collectives)`` for the
    ``(comm, device)`` of ``init_distributed("cpu", collectives)`` with per-rank logging (rank
    0 INFO, the others WARNING); it returns the exit code. An error of ``errors`` prints one
    line ``PROG: error`` on stderr and returns 2 (no traceback); an opened comm is always
    shut down."""
    opened: list[Comm] = []

    def open_comm(collectives: str) -> tuple[Comm, torch.device]:
        comm, device = init_distributed("cpu", collectives)
        opened.append(comm)
        logging.basicConfig(level=logging.INFO if comm.rank == 0 else logging.WARNING,
                            format=f"%(asctime)s [rank {comm.rank}] %(levelname)s %(name)s: %(message)s",
                            force=True)
        return comm, device

    try:
        return body(open_comm)
    except errors as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    finally:
        for comm in opened:
            shutdown(comm)

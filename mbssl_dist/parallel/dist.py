"""``torch.distributed`` backed ``Comm`` with autograd-aware collectives, and process-group
setup. This module and ``parallel/__init__`` are the only places that touch
``torch.distributed`` in the training path.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from .comm import Comm

log = logging.getLogger(__name__)


class _AllReduceSum(torch.autograd.Function):
    """y = sum_r x_r on every rank. If every rank's loss depends on y, the gradient of the
    global loss (sum over ranks) w.r.t. x_r is sum_r dL_r/dy: an all-reduce of the grads."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: "DistComm") -> torch.Tensor:
        ctx.comm = comm
        y = x.clone()
        comm._count(y)
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.clone()
        ctx.comm._count(g)
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
        comm._count(pad)
        dist.all_gather(bufs, pad.contiguous())
        return torch.cat([b[:n] for b, n in zip(bufs, sizes)], 0)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.contiguous().clone()
        ctx.comm._count(g)
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return g[start: start + ctx.sizes[ctx.rank]], None, None, None


class DistComm(Comm):
    def __init__(self, device: torch.device | None = None):
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device or torch.device("cpu")
        self.bytes_sent = 0  # payload bytes handed to collectives (for bench_dist)

    def _count(self, t: torch.Tensor) -> None:
        self.bytes_sent += t.numel() * t.element_size()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(t, self)

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n)
        sizes = [int(s.item()) for s in sizes]
        self._count(n)
        return _AllGatherCat.apply(t, sizes, self.rank, self)

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        self._count(t)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(t, src=src)
        return t

    def barrier(self) -> None:
        dist.barrier()


def init_distributed(device_pref: str = "auto") -> tuple[Comm, torch.device]:
    """Initialise the process group when launched by torchrun (WORLD_SIZE set), choosing
    nccl for GPUs and gloo on CPU; otherwise return a ``LocalComm``."""
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
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        log.info("rank %d/%d: process group up (%s) on %s", dist.get_rank(), dist.get_world_size(), backend, device)
    return DistComm(device), device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

"""The communication interface that model, loss, HMG and evaluator code is written against.

Model code never calls ``torch.distributed``; it calls these methods. ``LocalComm`` (one
process) makes every collective the identity, so single-process training is the P = 1 case
of the distributed code path. ``DistComm`` implements the same methods with autograd-aware
collectives over ``torch.distributed`` (gloo on CPU, nccl on GPU).

Convention: the global loss is the sum over ranks of each rank's local loss. Terms that are
computed identically on every rank (e.g. over replicated item rows) must be counted once,
e.g. scaled by ``1 / world_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class RowSlices:
    """``n`` rows cut into ``parts`` contiguous slices of equal padded size ``size`` (the last
    ones may hold fewer real rows, or none): the layout of reduce-scatter / all-gather, whose
    chunks must be equal. Rank ``p`` owns rows ``[start(p), stop(p))``."""

    n: int
    parts: int

    @property
    def size(self) -> int:
        return -(-self.n // self.parts) if self.n else 0

    def start(self, p: int) -> int:
        return min(self.n, p * self.size)

    def stop(self, p: int) -> int:
        return min(self.n, (p + 1) * self.size)

    def count(self, p: int) -> int:
        return self.stop(p) - self.start(p)


class Comm:
    rank: int = 0
    world_size: int = 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Autograd-aware sum over ranks (backward: sum of the grads over ranks)."""
        raise NotImplementedError

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Autograd-aware concatenation along dim 0 of every rank's ``t`` (rank order).
        Sizes along dim 0 may differ between ranks."""
        raise NotImplementedError

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place, no-autograd sum over ranks (for gradients, metrics, scalars)."""
        raise NotImplementedError

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``src``'s picklable ``obj`` on every rank (the others pass anything, e.g. None)."""
        raise NotImplementedError

    def reduce_scatter_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Autograd-aware: ``t`` is [world_size, *chunk]; returns this rank's chunk of the sum
        over ranks (backward: all-gather of the chunk cotangents)."""
        raise NotImplementedError

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Autograd-aware: every rank's equal-shaped ``t`` stacked, [world_size, *t.shape]
        (backward: reduce-scatter of the cotangents)."""
        raise NotImplementedError

    def reduce_scatter_sum_(self, send: torch.Tensor, out: torch.Tensor, async_op: bool = False):
        """No-autograd: ``out`` (this rank's chunk) = sum over ranks of ``send[rank]``; ``send``
        is a contiguous [world_size, *out.shape] tensor (it may be clobbered). With
        ``async_op`` returns a handle: neither tensor may be touched before ``handle.wait()``
        (that is what lets the caller compute while the bytes move)."""
        raise NotImplementedError

    def all_gather_(self, t: torch.Tensor, out: torch.Tensor, async_op: bool = False):
        """No-autograd: ``out`` ([world_size, *t.shape], contiguous) = every rank's ``t``
        (``async_op``: as in :meth:`reduce_scatter_sum_`)."""
        raise NotImplementedError

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        """Release transport resources (shared-memory segments); the process group stays."""

    def reduce_scatter_send_buffer(self, numel: int, dtype: torch.dtype, device) -> torch.Tensor | None:
        """A flat buffer the caller may fill as the ``send`` of its *next*
        :meth:`reduce_scatter_sum_` to skip one copy (shared-memory transports), or None."""
        return None

    def slices(self, n: int) -> RowSlices:
        """The row slices of ``n`` replicated rows (e.g. items) over the ranks."""
        return RowSlices(int(n), self.world_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Done:
    """The handle of a collective that has already completed."""

    def wait(self) -> None:
        pass


DONE = Done()


class LocalComm(Comm):
    """Single process: all collectives are the identity."""

    rank = 0
    world_size = 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        return t

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def reduce_scatter_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t[0]

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(0)

    def reduce_scatter_sum_(self, send: torch.Tensor, out: torch.Tensor, async_op: bool = False):
        if send.data_ptr() != out.data_ptr():
            out.copy_(send[0])
        return DONE if async_op else out

    def all_gather_(self, t: torch.Tensor, out: torch.Tensor, async_op: bool = False):
        if t.data_ptr() != out.data_ptr():
            out[0].copy_(t)
        return DONE if async_op else out

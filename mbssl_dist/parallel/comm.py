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

import torch


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

    def barrier(self) -> None:
        pass

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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

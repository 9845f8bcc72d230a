"""The optimizer and everything optimizer-side a checkpoint needs."""

from __future__ import annotations

import copy
from typing import Sequence

import torch

from ..config import HMGConfig, TrainConfig
from .hmg import HMG


class TrainState:
    """Adam, the HMG norm EMAs, the seed and the (epoch, global step) counters."""

    def __init__(self, optimizer: torch.optim.Optimizer, hmg: HMG, seed: int, epoch: int = 0, step: int = 0) -> None:
        self.optimizer = optimizer
        self.hmg = hmg
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.step = int(step)  # global step counter (not reset per epoch)

    @classmethod
    def build(cls, params: Sequence[torch.Tensor], n_tasks: int, train: TrainConfig, hmg: HMGConfig) -> "TrainState":
        opt = torch.optim.Adam(params, lr=train.lr, betas=tuple(train.adam_betas))
        return cls(opt, HMG(n_tasks, hmg.strategy, hmg.relax, hmg.beta, hmg.norm_source == "ema",
                            hmg.aux_budget, hmg.aux_budget_rows), train.seed)

    def state_dict(self) -> dict:
        # deep copy: the optimizer's state tensors are updated in place by later steps
        return {"optimizer": copy.deepcopy(self.optimizer.state_dict()), "hmg": self.hmg.state_dict(),
                "seed": self.seed, "epoch": self.epoch, "step": self.step}

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        self.hmg.load_state_dict(sd["hmg"])
        self.seed, self.epoch, self.step = int(sd["seed"]), int(sd["epoch"]), int(sd["step"])

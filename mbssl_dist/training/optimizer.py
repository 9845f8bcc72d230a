"""The optimizer and everything optimizer-side a checkpoint needs."""

from __future__ import annotations

import copy
from typing import Sequence

import torch

from ..config import HMGConfig, TrainConfig
from .hmg import HMG


class TrainState:
    """Adam, its learning-rate schedule, the HMG norm EMAs, the seed and the (epoch, global
    step) counters."""

    def __init__(self, optimizer: torch.optim.Optimizer, hmg: HMG, seed: int, epoch: int = 0, step: int = 0,
                 lr_scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None) -> None:
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.hmg = hmg
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.step = int(step)  # global step counter (not reset per epoch)

    @classmethod
    def build(cls, params: Sequence[torch.Tensor], n_tasks: int, train: TrainConfig, hmg: HMGConfig) -> "TrainState":
        opt = torch.optim.Adam(params, lr=train.lr, betas=tuple(train.adam_betas))
        sched = None
        if train.lr_decay < 1:
            # strict improvement (threshold 0), as EvalHistory selects; torch's patience counts
            # the bad evaluations it tolerates, ours the one that triggers the decay
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="max", factor=train.lr_decay, patience=train.lr_patience - 1, threshold=0.0,
                threshold_mode="abs")
        return cls(opt, HMG(n_tasks, hmg.strategy, hmg.relax, hmg.beta, hmg.norm_source == "ema",
                            hmg.aux_budget, hmg.aux_budget_rows), train.seed, lr_scheduler=sched)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def after_evaluation(self, valid_metric: float) -> bool:
        """Feed the selection metric to the schedule; True when the learning rate was lowered."""
        if self.lr_scheduler is None:
            return False
        before = self.lr
        self.lr_scheduler.step(valid_metric)
        return self.lr < before

    def lr_state(self) -> dict:
        """JSON for a checkpoint: the rate of each parameter group and the schedule's counters
        (the optimizer's tensors are saved apart, without the rates)."""
        return {"lr": [float(g["lr"]) for g in self.optimizer.param_groups],
                "scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None}

    def load_lr_state(self, sd: dict | None) -> None:
        """Restore ``lr_state``; None (a checkpoint from before schedules) keeps the configured rate."""
        if sd is None:
            return
        for g, lr in zip(self.optimizer.param_groups, sd["lr"]):
            g["lr"] = float(lr)
        if self.lr_scheduler is not None and sd["scheduler"] is not None:
            self.lr_scheduler.load_state_dict(sd["scheduler"])

    def state_dict(self) -> dict:
        # deep copy: the optimizer's state tensors are updated in place by later steps
        return {"optimizer": copy.deepcopy(self.optimizer.state_dict()), "hmg": self.hmg.state_dict(),
                "seed": self.seed, "epoch": self.epoch, "step": self.step, "lr": self.lr_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        self.hmg.load_state_dict(sd["hmg"])
        self.seed, self.epoch, self.step = int(sd["seed"]), int(sd["epoch"]), int(sd["step"])
        self.load_lr_state(sd.get("lr"))

"""Where a run stands on its epoch-indexed schedules, and the learning rate there.

Every epoch-indexed schedule of every method (the LR schedule, CAW-Conv's temperature decay and
orthogonality warm-up, CwComp's layer-training windows) reads one number: the *schedule position* ``at``,
in the recipe's epochs. By default it is the epoch index (the released per-epoch behaviour). With
``train.budget_schedules`` it is training progress (the fraction of the run's steps done before this step)
mapped onto the reference horizon, updated every step, so a 3-epoch run passes through the same phases as
the 150-epoch recipe: at one third of the run it stands where the recipe stands at epoch 50, and its last
step just before epoch 150.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cawbench.config import ConfigError, OptimConfig


@dataclass(frozen=True)
class ScheduleClock:
    """Maps (epoch, step) of this run to a schedule position in the reference horizon's epochs."""

    epochs: int  # this run's epochs
    steps_per_epoch: int
    horizon: float  # reference epochs the schedules were written for
    budget: bool  # True: progress-driven (every step); False: the epoch index

    def __post_init__(self) -> None:
        if self.budget and self.epochs * self.steps_per_epoch < 1:
            raise ConfigError(
                "train.budget_schedules maps training progress onto the recipe's epochs, but this run has no "
                f"training step ({self.epochs} epochs x {self.steps_per_epoch} batches); check data.subset "
                "and train.batch_size, or set train.budget_schedules=false"
            )
        if not self.horizon > 0:
            raise ConfigError(f"the schedule horizon must be > 0 epochs, got {self.horizon!r}")

    def at(self, epoch: int, step: int = 0) -> float:
        """The schedule position of step ``step`` of epoch ``epoch`` (before that step's update)."""
        if not self.budget:
            return float(epoch)
        done, total = epoch * self.steps_per_epoch + step, self.epochs * self.steps_per_epoch
        return self.horizon * done / total  # multiplied first: whole epochs land exactly on integers

    def at_progress(self, progress: float) -> float:
        """The schedule position at a fraction ``progress`` in [0, 1] of the run (budget mode)."""
        return self.horizon * progress

    @property
    def lr_horizon(self) -> float:
        """The epochs the LR schedule spans: the reference horizon, or this run's epochs."""
        return self.horizon if self.budget else float(self.epochs)


def lr_at(cfg: OptimConfig, at: float, horizon: float) -> float:
    """The learning rate of ``cfg``'s schedule at position ``at`` of a schedule spanning ``horizon`` epochs.

    cosine: lr_min + (lr - lr_min) (1 + cos(pi at / horizon)) / 2 (PyTorch's CosineAnnealingLR, closed form);
    linear_cooldown (loeweX's FF): lr for at < horizon / 2, then lr * 2 (horizon - at) / horizon, down to 0.
    """
    if cfg.scheduler == "cosine":
        return cfg.lr_min + (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * min(at, horizon) / horizon)) / 2
    if cfg.scheduler == "linear_cooldown":
        return cfg.lr if at < horizon / 2 else cfg.lr * max(0.0, 2 * (horizon - at) / horizon)
    return cfg.lr

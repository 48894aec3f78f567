"""The cosine learning-rate schedule, re-plannable when a finished run is extended.

``torch.optim.lr_scheduler.CosineAnnealingLR`` keeps the ``T_max`` it was built with; restored
from a checkpoint of an N-step run and stepped past N (``--trainer.max_steps 2N``), its rate
climbs back towards the peak. :class:`CosineToFloor` holds its plan in its state instead (from
which step, from which rate, to which step), so the run that resumes it can re-plan.
"""

from __future__ import annotations

import math

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["CosineToFloor"]


class CosineToFloor(LRScheduler):
    """Half a cosine from the rate at ``start_step`` down to ``floor_fraction`` x the base rate at
    ``total_steps``, stepped once per optimizer step.

    A fresh schedule starts at step 0 from the base rate: the curve of ``CosineAnnealingLR``
    with ``T_max=total_steps`` and ``eta_min=floor_fraction * base_lr``. :meth:`replan` moves the
    end to a new total and starts a new half cosine from where the rate stands, so the rate
    never rises and still reaches the floor at the new end.

    Args:
        optimizer: the optimizer whose groups' rates it sets.
        total_steps: the optimizer step at which the rate reaches the floor (Trainer's max_steps), > 0.
        floor_fraction: final rate as a fraction of each group's base rate, in [0, 1].
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, floor_fraction: float = 0.05) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be a positive number of optimizer steps, got {total_steps!r}.")
        if not 0.0 <= floor_fraction <= 1.0:
            raise ValueError(f"floor_fraction must lie in [0, 1], got {floor_fraction!r}.")
        self.total_steps = int(total_steps)
        self.floor_fraction = float(floor_fraction)
        self.start_step = 0
        self.start_lrs: list[float | Tensor] | None = None  # None: each group's base rate
        super().__init__(optimizer)

    def _rates_at(self, step: int) -> list[float | Tensor]:
        starts = self.start_lrs if self.start_lrs is not None else self.base_lrs
        span = max(self.total_steps - self.start_step, 1)
        progress = min(max(step - self.start_step, 0), span) / span  # in [0, 1]
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        rates: list[float | Tensor] = []
        for base, start in zip(self.base_lrs, starts):
            floor = self.floor_fraction * base
            rates.append(floor + (start - floor) * cosine)
        return rates

    def get_lr(self) -> list[float | Tensor]:
        # Closed form in the step count: no drift from chained updates, and the same rate
        # whether the run was interrupted or not.
        return self._rates_at(self.last_epoch)

    def replan(self, total_steps: int) -> bool:
        """End the schedule at ``total_steps`` instead, from the current step and rate.

        Returns True when the plan changed (``total_steps`` differs from the current end and
        lies past the current step); the rate from here on is at most the current rate.
        """
        if total_steps == self.total_steps or total_steps <= self.last_epoch:
            return False
        self.start_lrs = self._rates_at(self.last_epoch)
        self.start_step = self.last_epoch
        self.total_steps = int(total_steps)
        return True

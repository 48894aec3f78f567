"""The two collectives GECO needs across ranks: a sum every rank gets, and an error every rank raises.

Both are one ``all_reduce`` under ``torch.distributed`` and nothing in a single process. They
exist because every rank must take the same branch: a rank that raised alone, or skipped a
collective the others entered, would leave them waiting in the next one.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor

__all__ = ["all_reduce_sum", "raise_on_every_rank"]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def all_reduce_sum(trainer: pl.Trainer, tensor: Tensor) -> Tensor:
    """Sum of ``tensor`` over all ranks, identical everywhere (summed in place under
    torch.distributed). One all-reduce: the strategy's ``reduce`` adds a barrier, a second
    collective per step. Other strategies (e.g. XLA) go through ``strategy.reduce``."""
    if trainer.world_size > 1 and _distributed():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor
    return trainer.strategy.reduce(tensor, reduce_op="sum")


def raise_on_every_rank(
    problem: Exception | None, device: torch.device, elsewhere: str, trainer: pl.Trainer | None = None
) -> None:
    """Raise ``problem`` on this rank and ``ValueError(elsewhere)`` on every other rank, together;
    nothing when no rank has a problem. Each rank checks its own data, and one rank raising alone
    would leave the others waiting in the next collective. One all-reduce of one number on
    ``device`` (NCCL needs it on the GPU): through :func:`all_reduce_sum` when the ``trainer`` is
    known (its ranks, and strategies without torch.distributed), else over torch.distributed's
    default group (a module's own check, which has no Trainer at hand)."""
    if trainer is not None or _distributed():
        flag = torch.tensor([0.0 if problem is None else 1.0], device=device)
        if trainer is not None:
            flag = all_reduce_sum(trainer, flag)
        else:
            torch.distributed.all_reduce(flag)
        if problem is None and float(flag[0]) > 0:
            raise ValueError(elsewhere)
    if problem is not None:
        raise problem

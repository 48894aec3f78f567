"""Image panels for the loggers: reconstructions next to their inputs, and prior samples."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pytorch_lightning.loggers import Logger, TensorBoardLogger, WandbLogger
from torch import Tensor
from torchvision.utils import make_grid

__all__ = ["log_image_grid", "reconstruction_grid", "sample_grid"]


def reconstruction_grid(x: Tensor, reconstruction: Tensor, columns: int = 8) -> Tensor:
    """Rows alternate inputs and their reconstructions; (3, H', W') in [0, 1]."""
    rows = []
    for start in range(0, x.shape[0], columns):
        rows += [x[start : start + columns], reconstruction[start : start + columns]]
    return make_grid(torch.cat(rows).float().clamp(0, 1).cpu(), nrow=columns, pad_value=1.0)


def sample_grid(samples: Tensor, columns: int = 8) -> Tensor:
    """Samples in a grid; (3, H', W') in [0, 1]."""
    return make_grid(samples.float().clamp(0, 1).cpu(), nrow=columns, pad_value=1.0)


def log_image_grid(loggers: Iterable[Logger], key: str, grid: Tensor, step: int) -> None:
    """Send an image to every logger that takes images (W&B, TensorBoard); others are skipped."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            # uint8 HWC is the one layout wandb.Image reads without guessing the value range.
            pixels = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            logger.log_image(key=key, images=[pixels], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, global_step=step)

"""Image panels for the loggers: reconstructions next to their inputs, and prior samples."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy
import torch
from lightning_fabric.loggers import Logger as FabricLogger
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from torch import Tensor
from torchvision.utils import make_grid, save_image

__all__ = ["DISTORTION_AXIS_LABEL", "log_image_grid", "rate_distortion_figure", "reconstruction_grid", "sample_grid", "traversal_grid"]


def reconstruction_grid(x: Tensor, reconstruction: Tensor, columns: int = 8) -> Tensor:
    """Rows alternate inputs and their reconstructions, each reconstruction under its input;
    (3, H', W') in [0, 1]. A last row shorter than ``columns`` is filled with blank tiles, so
    its inputs and reconstructions keep rows of their own."""
    columns = max(1, min(columns, x.shape[0]))
    blank = torch.ones_like(x[:1])
    rows = []
    for start in range(0, x.shape[0], columns):
        for images in (x[start : start + columns], reconstruction[start : start + columns]):
            rows += [images, blank.expand(columns - len(images), *images.shape[1:]).to(images)]
    return make_grid(torch.cat(rows).float().clamp(0, 1).cpu(), nrow=columns, pad_value=1.0)


def sample_grid(samples: Tensor, columns: int = 8) -> Tensor:
    """Samples in a grid; (3, H', W') in [0, 1]."""
    return make_grid(samples.float().clamp(0, 1).cpu(), nrow=columns, pad_value=1.0)


def traversal_grid(images: Tensor, steps: int = 9) -> Tensor:
    """Latent traversals, one latent dimension per row of ``steps`` images; (3, H', W')."""
    return make_grid(images.float().clamp(0, 1).cpu(), nrow=steps, pad_value=1.0)


#: the axis label of the per-element MSE (the default distortion reading)
DISTORTION_AXIS_LABEL = "distortion (MSE / element)"


def rate_distortion_figure(
    history: Sequence[tuple[int, float, float]],
    tolerance: float | None,
    distortion_label: str = DISTORTION_AXIS_LABEL,
) -> Tensor:
    """Distortion against rate at each validation, the path coloured by step, with the tolerance.

    Args:
        history: ``(global_step, rate in nats per image, distortion reading)`` per validation
            (the per-element MSE, or the reading ``distortion_label`` names).
        tolerance: the reading's tolerance, in its units, drawn as a horizontal line (None: no line).
        distortion_label: the y axis's label: the reading and its unit.

    Returns:
        The rendered chart, (3, H, W) float in [0, 1].
    """
    # A Figure on its own Agg canvas: no pyplot, so the caller's matplotlib backend and open
    # figures are left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [h[0] for h in history]
    rates = [h[1] for h in history]
    distortions = [h[2] for h in history]
    fig = Figure(figsize=(4.5, 3.5), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(rates, distortions, color="0.6", linewidth=1, zorder=1)
    points = ax.scatter(rates, distortions, c=steps, cmap="viridis", zorder=2)
    fig.colorbar(points, ax=ax, label="step")
    if tolerance is not None:
        ax.axhline(tolerance, color="tab:red", linestyle="--", label=f"tolerance {tolerance:g}")
        ax.legend(loc="best")  # away from the points: the latest sits near the tolerance line
    ax.set_xlabel("rate (nats / image)")
    ax.set_ylabel(distortion_label)
    ax.set_title("validation rate-distortion")
    fig.tight_layout()
    canvas.draw()
    pixels = torch.from_numpy(numpy.asarray(canvas.buffer_rgba())[..., :3].copy())
    return pixels.permute(2, 0, 1).float() / 255.0


def log_image_grid(loggers: Iterable[Logger | FabricLogger], key: str, grid: Tensor, step: int) -> None:
    """Send an image (3, H, W) in [0, 1] to every logger: W&B and TensorBoard log it; a CSVLogger,
    which has no image column, gets it as ``<log_dir>/images/<key with _ for />/step_<step>.png``;
    other loggers are skipped."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            # uint8 HWC is the one layout wandb.Image reads without guessing the value range.
            pixels = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            logger.log_image(key=key, images=[pixels], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, global_step=step)
        elif isinstance(logger, CSVLogger) and logger.log_dir:
            path = Path(logger.log_dir) / "images" / key.replace("/", "_") / f"step_{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image(grid, path)

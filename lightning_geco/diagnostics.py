"""DiagnosticPanels: the validation image panels and the rate-distortion chart, for any model.

What the panels need from a LightningModule is duck-typed, so a user's own module (no base
class of ours) gets them by having the methods; each panel is logged only when its method
exists:

- ``reconstruct(x) -> images`` (N, C, H, W) in [0, 1]: ``val/reconstructions`` (inputs over
  reconstructions, from the first validation batch);
- ``sample(n) -> images`` (n, C, H, W) in [0, 1]: ``val/samples``;
- ``latent_traversal(x, dims) -> images | None`` and ``traversal_dimensions() -> list[int]``:
  ``val/traversals`` (one row per dimension);
- always: ``val/rate_distortion``, every validation's ``(val/rate, val/distortion)`` as a point
  coloured by step, with the tolerance of the model's GECO reconstruction constraint as a line
  when it has one.

Panels go to every logger :func:`~lightning_geco.panels.log_image_grid` knows (W&B, TensorBoard,
a CSV logger's folder as PNGs), on rank 0 only, and never during the sanity check.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor

from lightning_geco.batches import batch_images
from lightning_geco.objectives import GECOObjective
from lightning_geco.panels import (
    DISTORTION_AXIS_LABEL,
    log_image_grid,
    rate_distortion_figure,
    reconstruction_grid,
    sample_grid,
    traversal_grid,
)
from lightning_geco.resume import seeded_fork

__all__ = ["PANEL_SEED", "DiagnosticPanels"]

#: seed of the panels' own random draws (the prior samples), the same at every validation
PANEL_SEED = 0


def _reconstruction_tolerance(pl_module: pl.LightningModule, reading: str) -> float | None:
    for module in pl_module.modules():
        if isinstance(module, GECOObjective):
            for constraint in module.constraints:
                if constraint.reading_name == reading:
                    return float(constraint.reading_tolerance)
    return None


class DiagnosticPanels(Callback):
    """Logs the validation panels of any model at the end of every validation (not the sanity check).

    Args:
        num_images: images in the reconstruction and sample panels (None: the model's
            ``num_logged_images`` if it has one, else 32).
        rate_key, distortion_key: the logged validation metrics the rate-distortion chart
            plots (rate in nats, distortion in the reconstruction constraint's units).
    """

    def __init__(
        self, num_images: int | None = None, rate_key: str = "val/rate", distortion_key: str = "val/distortion"
    ) -> None:
        super().__init__()
        if num_images is not None and num_images < 1:
            raise ValueError(f"DiagnosticPanels num_images must be a positive int or None, got {num_images!r}.")
        self.num_images = num_images
        self.rate_key = rate_key
        self.distortion_key = distortion_key
        #: (step, rate, distortion) of every validation so far
        self.history: list[tuple[int, float, float]] = []
        self._images: Tensor | None = None
        self._warned_not_images = False
        #: the global step of the checkpoint an evaluation (validate, test) loaded, if any
        self._checkpoint_step: int | None = None

    def _step(self, trainer: pl.Trainer) -> int:
        """The step the panels and the chart's point are of: the fit's global step, or in an
        evaluation of a checkpoint (whose Trainer counts from 0) the step the checkpoint was saved at."""
        if trainer.state.fn == "fit" or self._checkpoint_step is None:
            return trainer.global_step
        return self._checkpoint_step

    def _count(self, pl_module: pl.LightningModule) -> int:
        return self.num_images if self.num_images is not None else int(getattr(pl_module, "num_logged_images", 32))

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and not trainer.sanity_checking:
            self._images = batch_images(batch)[: self._count(pl_module)].detach()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not at epoch end: the epoch's logged values are in callback_metrics by now.
        images, self._images = self._images, None
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        if self.rate_key in metrics and self.distortion_key in metrics:
            self.history.append((self._step(trainer), float(metrics[self.rate_key]), float(metrics[self.distortion_key])))
        self._log(trainer, pl_module, images)

    @rank_zero_only
    @torch.no_grad()
    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: Tensor | None) -> None:
        step, loggers = self._step(trainer), trainer.loggers
        was_training = pl_module.training
        pl_module.eval()
        try:
            # The prior draws come from a fork, seeded: the training's random stream is the same
            # with panels or without (and on rank 0, which alone draws them, as on the others),
            # and every validation's samples decode the same codes, so the panels show the model change.
            with seeded_fork(pl_module.device, PANEL_SEED):
                self._log_images(loggers, pl_module, images, step)
        finally:
            pl_module.train(was_training)
        if self.history:
            tolerance = _reconstruction_tolerance(pl_module, self.distortion_key.removeprefix("val/"))
            # Another reading than the MSE (a BCE, a pNCC) is labelled by its key.
            label = DISTORTION_AXIS_LABEL if self.distortion_key == "val/distortion" else self.distortion_key
            chart = rate_distortion_figure(self.history, tolerance, label)
            log_image_grid(loggers, "val/rate_distortion", chart, step)

    def _log_images(self, loggers: list[Logger], pl_module: pl.LightningModule, images: Tensor | None, step: int) -> None:
        """The reconstruction, sample and traversal panels of the first validation images."""
        if images is not None and images.dim() != 4 and not self._warned_not_images:
            self._warned_not_images = True
            rank_zero_warn(
                f"DiagnosticPanels: the validation batches hold data of shape {tuple(images.shape)}, not images "
                "(N, C, H, W): no reconstruction, sample or traversal panels (the rate-distortion chart is logged)."
            )
        if images is None or images.dim() != 4:
            return
        # getattr: what the panels need is duck-typed (a user's module has what it has).
        reconstruct = getattr(pl_module, "reconstruct", None)
        sample = getattr(pl_module, "sample", None)
        traverse = getattr(pl_module, "latent_traversal", None)
        dimensions = getattr(pl_module, "traversal_dimensions", None)
        if callable(reconstruct):
            log_image_grid(loggers, "val/reconstructions", reconstruction_grid(images, reconstruct(images)), step)
        if callable(sample):
            log_image_grid(loggers, "val/samples", sample_grid(sample(images.shape[0])), step)
        if callable(traverse) and callable(dimensions):
            traversal = traverse(images, dimensions())
            if traversal is not None:
                log_image_grid(loggers, "val/traversals", traversal_grid(traversal), step)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Each fit (or test) charts its own run; a resumed one gets its history back afterwards,
        # when Lightning restores the checkpoint.
        self.history = []
        self._checkpoint_step = None

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        step = checkpoint.get("global_step")
        self._checkpoint_step = int(step) if isinstance(step, int) else None

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(step), float(rate), float(distortion)) for step, rate, distortion in state_dict.get("history", [])]

"""The calibration stream: held-out images that drive lambda under ``GECOCallback(drive="calibration")``.

A :class:`CalibrationStream` is one fit's calibration split and its schedule: which images
measurement m reads (a seeded function of the seed and m, split over the ranks), the
measurement itself (eval mode, no gradients, the training's random stream untouched) and the
checks the split must pass before it may steer lambda (no training images in it, images like
the training images, none shared with the validation set). The callback owns one per fit and
decides when it measures and what the measurement moves (:mod:`lightning_geco.callbacks`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset

from lightning_geco.batches import (
    batch_images,
    batch_labels,
    dataset_length,
    first_loader,
    gather,
    identical_images,
    shared_items,
)
from lightning_geco.collectives import raise_on_every_rank
from lightning_geco.geco import constraint_statistics
from lightning_geco.objectives import GECOObjective
from lightning_geco.records import VAEOutput
from lightning_geco.resume import forked_rng, seed_device, seeded_fork

__all__ = ["NO_CALIBRATION_SPLIT", "CalibrationStream", "ImageSummary", "loader_dataset", "why_not_measurable"]

#: the refusal of drive="calibration" without a split (train.py says it before its W&B run starts)
NO_CALIBRATION_SPLIT = (
    "GECOCallback(drive='calibration') needs a calibration split the model does not train on: set the DataModule's "
    "num_calibration (e.g. --data.num_calibration 1000, or a tenth of a smaller training set) or pass "
    "GECOCallback(calibration_dataset=...)."
)

#: (shape of one image, mean magnitude, min, max) of a batch's images
ImageSummary = tuple[tuple[int, ...], float, float, float]


def loader_dataset(loaders: Any) -> Dataset | None:
    """The dataset of a fit's loader (the first, when there are several); None when there is none."""
    return getattr(first_loader(loaders), "dataset", None)


def _image_summary(batch: Any) -> ImageSummary | None:
    """What the calibration images are checked against; None when the batch holds no images we can find."""
    try:
        x = batch_images(batch)
    except TypeError:
        return None
    if x.dim() < 2 or x.numel() == 0:
        return None
    values = x.detach()
    low, high = torch.aminmax(values)
    return tuple(x.shape[1:]), float(values.float().abs().mean()), float(low), float(high)


def _images_mismatch(training: ImageSummary | None, calibration: ImageSummary | None) -> str | None:
    """Why calibration images are unlike the training images, or None: another shape, or a mean
    magnitude more than 10x apart (images in [0, 255] beside [0, 1]: 255x; a sample's mean, not
    its extremes, so standardised or heavy-tailed data of one kind pass)."""
    if training is None or calibration is None:
        return None
    (shape, scale, low, high), (calibration_shape, calibration_scale, calibration_low, calibration_high) = training, calibration
    if calibration_shape != shape:
        return f"the calibration images have shape {calibration_shape}, the training images {shape}"
    if scale > 0 and calibration_scale > 0 and not 0.1 <= calibration_scale / scale <= 10.0:
        return (
            f"the calibration images' mean magnitude is {calibration_scale:.4g} (range [{calibration_low:.4g}, "
            f"{calibration_high:.4g}]), the first training batch's {scale:.4g} ([{low:.4g}, {high:.4g}])"
        )
    return None


def _measurement_seed(seed: int, measurement: int, stream: int = 0) -> int:
    """A seed that is a function of (seed, measurement number, stream) alone."""
    return (seed * 1_000_003 + measurement * 7_919 + stream * 104_729) % (2**63 - 1)


class _NotMeasurable(TypeError):
    """The model cannot be measured as the collection's models are; ``cause`` says why, briefly."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


def _calibration_output(pl_module: pl.LightningModule, x: Tensor, labels: Tensor | None) -> VAEOutput:
    """The model's pass on calibration images: ``model(x, labels)``, as the collection's models take
    it, or ``model(x)`` when the images have no labels (a user's ``forward(self, x)``)."""
    message = (
        f"GECOCallback(drive='calibration') reads the model as model(x, labels) -> VAEOutput (model(x) for "
        f"images without labels), as the collection's models do; {type(pl_module).__name__} {{}}. Use "
        "drive='training' with your own module, or have its forward(x, labels=None) return "
        "VAEOutput.from_terms(x, reconstruction, rate)."
    )
    try:
        output = pl_module(x) if labels is None else pl_module(x, labels)
    except TypeError as error:
        cause = f"cannot be called so ({error})"
        raise _NotMeasurable(message.format(cause), cause) from error
    if not isinstance(output, VAEOutput):
        cause = f"returned {type(output).__name__}"
        raise _NotMeasurable(message.format(cause), cause)
    return output


@contextmanager
def _measuring(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """Eval mode, no gradients and the torch random state forked (CPU, and the module's CUDA or
    MPS device) around a measurement; each submodule gets back the mode it had (one the user
    froze in eval stays so)."""
    modes = [(module, module.training) for module in pl_module.modules()]
    pl_module.eval()
    try:
        with torch.no_grad(), forked_rng(pl_module.device), trainer.precision_plugin.forward_context():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _calibration_inputs(trainer: pl.Trainer, dataset: Dataset, indices: Sequence[int]) -> tuple[Tensor, Tensor | None]:
    """``(x, labels)`` of the calibration images ``indices``, on the device and in the precision
    the training batches get."""
    batch = trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(gather(dataset, list(indices))))
    return batch_images(batch), batch_labels(batch)


def why_not_measurable(
    trainer: pl.Trainer, pl_module: pl.LightningModule, objective: GECOObjective, dataset: Dataset
) -> str | None:
    """None when a module of the user's can be measured as the collection's models are
    (``model(x, labels)`` on one image of ``dataset`` returns a VAEOutput ``objective``'s
    constraints can read), else why not: the error that call raised, for the caller to report."""
    try:
        with _measuring(trainer, pl_module):
            x, labels = _calibration_inputs(trainer, dataset, [0])
            objective.constraint_values(_calibration_output(pl_module, x, labels))
    except _NotMeasurable as error:  # the caller says what it takes: the cause alone
        return f"it {error.cause}"
    except Exception as error:  # noqa: BLE001 - a speculative call: whatever fails, train as before, and say why
        return f"{type(error).__name__}: {error}"
    return None


class CalibrationStream:
    """One fit's calibration split, what each measurement on it reads, and its checks.

    Measurement m reads ``batch_size`` images drawn with replacement from ``dataset`` by a
    generator seeded from (``seed``, m); rank r of w takes every w-th of them from the r-th on, so
    2 ranks read the same images as 1 process, and a resumed run what the uninterrupted one would.
    A dataset's random transform and the model's latent noise draw from forks seeded from
    (``seed``, m, r): the training's random stream goes on as without the measurement.

    Args:
        dataset: the calibration split, images the model does not train on.
        batch_size: images per measurement, over all ranks together.
        seed: seed of the measurements' images and latent noise.
        given: whether the user handed the split over (``GECOCallback(calibration_dataset=...)``);
            only such a split is compared, image by image, with the training and validation
            images (the DataModules carve theirs apart by construction, and generated shapes
            repeat by nature).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, given: bool = False) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.given = given
        # this rank's first training batch of the fit, which the first measurement's images are
        # checked against (None: no images found in it, or not seen yet)
        self._training_images: ImageSummary | None = None
        self._training_images_seen = False
        self._images_checked = False
        self._validation_checked = False

    def __len__(self) -> int:
        return dataset_length(self.dataset)

    def indices(self, measurement: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """The indices into the split that rank ``rank`` of ``world_size`` reads at ``measurement``."""
        generator = torch.Generator().manual_seed(_measurement_seed(self.seed, measurement))
        drawn = torch.randint(len(self), (self.batch_size,), generator=generator)
        return drawn[rank::world_size].tolist()

    def see_training_batch(self, batch: Any) -> None:
        """Keep what the fit's first training batch looks like (host reads, on that batch only)."""
        if not self._training_images_seen:
            self._training_images_seen = True
            self._training_images = _image_summary(batch)

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, objective: GECOObjective, measurement: int
    ) -> Tensor:
        """This rank's ``[sum_1..sum_K, count, nonfinite]`` of ``objective``'s constraint values on
        its share of ``measurement``'s images, to be summed over the ranks. The fit's first
        measurement checks the images first, on every rank (:meth:`check_images`)."""
        if not self._images_checked:
            self.check_images(trainer, pl_module)
        mine = self.indices(measurement, trainer.global_rank, trainer.world_size)
        if not mine:
            return torch.zeros(len(objective.constraints) + 2, device=pl_module.device)
        rank = trainer.global_rank
        with _measuring(trainer, pl_module):
            with seeded_fork(pl_module.device, _measurement_seed(self.seed, measurement, -(rank + 1))):
                x, labels = _calibration_inputs(trainer, self.dataset, mine)
            # inside _measuring's fork: the latent noise is seeded without touching the training RNG
            seed_device(pl_module.device, _measurement_seed(self.seed, measurement, rank + 1))
            values = objective.constraint_values(_calibration_output(pl_module, x, labels)).float()
        return constraint_statistics(values)

    def check_images(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse calibration images of another shape or scale than the fit's first training batch:
        a measurement on them would steer lambda by a meaningless reading (images in [0, 255]
        beside training images in [0, 1] drove lambda to 3.4 million). Every rank raises together."""
        self._images_checked = True
        first = list(range(min(self.batch_size, len(self))))
        with forked_rng(pl_module.device):  # a dataset's random transform draws here, not from training's
            images = _calibration_inputs(trainer, self.dataset, first)[0]
        problem = _images_mismatch(self._training_images, _image_summary(images))
        advice = (
            ". The calibration split must hold images like the training images (the same shape, scaling and "
            "transforms), or lambda is steered by a reading of other data."
        )
        raise_on_every_rank(
            None if problem is None else ValueError(f"GECOCallback(drive='calibration'): {problem}{advice}"),
            pl_module.device,
            "GECOCallback(drive='calibration'): another rank found the calibration images unlike its training "
            f"images (see its error){advice}",
            trainer,
        )

    def refuse_training_images(self, trainer: pl.Trainer) -> None:
        """Refuse a split that shares images with the training set: it would steer lambda by images
        the model learns, what ``drive="training"`` does, under another name. Told from the
        datasets' Subset indices (the DataModules' splits, on a device too, ``random_split``); for
        a split the user gave, two in-memory ``TensorDataset`` stores that hold identical images
        are warned (:func:`~lightning_geco.batches.identical_images`: identical is not always the
        same item); other stored datasets are not compared."""
        training = loader_dataset(trainer.train_dataloader)
        if training is None:
            return
        if shared := shared_items(self.dataset, training):
            raise ValueError(
                f"GECOCallback: the calibration split shares {shared} of its {len(self)} images "
                f"with the training set ({dataset_length(training)} images): lambda would be steered by images the "
                "model trains on. Carve the calibration split out of the training set (the DataModule's "
                "num_calibration does, e.g. --data.num_calibration 1000) or use drive='training'."
            )
        if self.given and (identical := identical_images(self.dataset, training)):
            # Stored apart: a slice of the training tensor, or images that repeat by nature.
            rank_zero_warn(
                f"GECO: {identical} of the calibration split's {len(self)} images are identical, byte "
                f"for byte, to training images: if the split was cut from the training set, lambda is steered by "
                "images the model trains on. Carve it out of the training set (the DataModule's num_calibration "
                "does) or use drive='training'; data that repeat images by nature (a finite grid) can ignore this."
            )

    def warn_validation_overlap(self, trainer: pl.Trainer) -> None:
        """Warn, once a fit, when the split shares images with the validation set: the validation
        reading, and the verdict from it, would judge images lambda was steered by."""
        if self._validation_checked:
            return
        self._validation_checked = True
        datamodule = getattr(trainer, "datamodule", None)
        validation = getattr(datamodule, "val_dataset", None)
        if validation is None:
            validation = loader_dataset(trainer.val_dataloaders)
        if validation is None:
            return
        if shared := shared_items(self.dataset, validation):
            rank_zero_warn(
                f"GECO: the calibration split shares {shared} of its {len(self)} images with the "
                f"validation set ({dataset_length(validation)} images): the validation reading, and the verdict "
                "from it, then judge images lambda was steered by, and read better than new images would. Give the "
                "calibration split images of its own (the DataModule's num_calibration carves them from the "
                "training set)."
            )
        elif self.given and (identical := identical_images(self.dataset, validation)):
            rank_zero_warn(
                f"GECO: {identical} of the calibration split's {len(self)} images are identical, byte "
                "for byte, to validation images: if the split was cut from the validation set, the verdict judges "
                "images lambda was steered by. Give the calibration split images of its own; data that repeat "
                "images by nature (a finite grid) can ignore this."
            )

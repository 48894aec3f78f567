"""Procedural dSprites-style shapes: no files, deterministic from a seed.

Each image is one white shape on black, drawn from five ground-truth factors on the grids
of dSprites (Matthey et al. 2017): shape (square, ellipse, heart), scale (6 values in
[0.5, 1]), orientation (40 values in [0, 2 pi)), position x and y (32 values each in [0, 1]).
Images are binary, float32 in {0, 1}, shape (1, S, S); the factors come with each image as a
float tensor ``[shape, scale, orientation, pos_x, pos_y]``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import Subset, TensorDataset

from .base import ImageDataModule

__all__ = [
    "FACTOR_NAMES",
    "MAX_HALF_EXTENT",
    "ORIENTATIONS",
    "POSITIONS",
    "SCALES",
    "SHAPE_NAMES",
    "ShapesDataModule",
    "render_shapes",
    "sample_factors",
]

SHAPE_NAMES = ("square", "ellipse", "heart")
FACTOR_NAMES = ("shape", "scale", "orientation", "pos_x", "pos_y")
SCALES = torch.linspace(0.5, 1.0, 6)
ORIENTATIONS = torch.arange(40) * (2 * math.pi / 40)
POSITIONS = torch.linspace(0.0, 1.0, 32)
# Largest half-extent of a shape (at scale 1), as a fraction of the image side; centres stay
# far enough from the border that every shape is fully inside the image.
MAX_HALF_EXTENT = 0.18


def sample_factors(num_images: int, seed: int) -> Tensor:
    """Factors (num_images, 5) drawn uniformly from the dSprites grids with a seeded generator."""
    g = torch.Generator().manual_seed(seed)

    def pick(values: Tensor) -> Tensor:
        return values[torch.randint(len(values), (num_images,), generator=g)]

    shape = torch.randint(len(SHAPE_NAMES), (num_images,), generator=g).float()
    return torch.stack([shape, pick(SCALES), pick(ORIENTATIONS), pick(POSITIONS), pick(POSITIONS)], dim=1)


def render_shapes(factors: Tensor, image_size: int = 64, chunk_size: int = 4096) -> Tensor:
    """Binary images (N, 1, S, S), float32 in {0, 1}, from factors (N, 5) (see module docstring)."""
    coords = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size
    py, px = torch.meshgrid(coords, coords, indexing="ij")  # (S, S), y down
    images = []
    for chunk in factors.split(chunk_size):
        shape, scale, angle, pos_x, pos_y = (f.view(-1, 1, 1) for f in chunk.T)
        margin = MAX_HALF_EXTENT * 1.3
        cx, cy = margin + (1 - 2 * margin) * pos_x, margin + (1 - 2 * margin) * pos_y
        half = MAX_HALF_EXTENT * scale
        dx, dy = px - cx, py - cy
        cos, sin = torch.cos(angle), torch.sin(angle)
        # Pixel in the shape's own frame (rotated by -angle), in units of its half extent.
        a = (cos * dx + sin * dy) / half
        b = (-sin * dx + cos * dy) / half
        square = (a.abs() <= 0.8) & (b.abs() <= 0.8)
        ellipse = a.pow(2) + (b / 0.5).pow(2) <= 1.0
        hx, hy = 1.15 * a, -1.15 * b + 0.15  # heart curve (x^2 + y^2 - 1)^3 <= x^2 y^3, point down
        heart = (hx.pow(2) + hy.pow(2) - 1).pow(3) - hx.pow(2) * hy.pow(3) <= 0
        inside = torch.where(shape == 0, square, torch.where(shape == 1, ellipse, heart))
        images.append(inside.float().unsqueeze(1))
    return torch.cat(images)


class ShapesDataModule(ImageDataModule):
    """dSprites-style shapes generated in memory (no download, no files).

    Batches are ``(images, factors)``: images (B, 1, S, S) in {0, 1}, factors (B, 5).

    Args:
        image_size: side S of the square images.
        num_train, num_val, num_test: images in each split (the test split for ``trainer.test``),
            generated from three seeds. All draw from the same finite grid of factors (737,280
            cells, fewer distinct images through the shapes' symmetries), so the validation split
            can repeat a training image: with the defaults, 105 of its 2,000 images (5.3 %) are
            also training images; a calibration split carved from the training split likewise
            (2,000 carved: about 5.5 % repeat an image left in training). The test split repeats
            none (see :meth:`build_test`), and a checkpoint's model trained on the shapes of another
            seed or size is refused it (:meth:`missing_test_split`). The real-data DataModules hold
            images out by index.
        seed: seed of the factors; the same seed gives the same images on every rank and run.
        batch_size, num_workers, shuffle, pin_memory, device, num_calibration: see
            :class:`ImageDataModule`.
    """

    def __init__(
        self,
        image_size: int = 64,
        num_train: int = 20_000,
        num_val: int = 2_000,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        shuffle: bool = True,
        pin_memory: bool = False,
        device: str | None = None,
        num_calibration: int = 0,
        num_test: int = 2_000,
    ) -> None:
        super().__init__(batch_size, num_workers, shuffle, pin_memory, device, num_calibration)
        if num_test < 1:
            raise ValueError(f"ShapesDataModule num_test must be positive, got {num_test!r}.")
        if image_size < 8:
            raise ValueError(f"ShapesDataModule image_size must be at least 8 pixels, got {image_size!r}.")
        if num_train < 1 or num_val < 1:
            raise ValueError(f"num_train and num_val must be positive, got {num_train!r} and {num_val!r}.")
        self.image_size = image_size
        self.num_train = num_train
        self.num_val = num_val
        self.num_test = num_test
        self.seed = seed
        #: the generation of the shapes a restored checkpoint's model trained on (see missing_test_split)
        self.trained_generation: dict[str, int] | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, self.image_size, self.image_size)

    def generation(self) -> dict[str, int]:
        """What the training and validation shapes are a function of, and the test split is drawn apart from."""
        return {"seed": self.seed, "num_train": self.num_train, "num_val": self.num_val, "image_size": self.image_size}

    def state_dict(self) -> dict[str, Any]:
        """:meth:`ImageDataModule.state_dict` and the :meth:`generation` of the shapes trained on."""
        return {**super().state_dict(), "generation": self.generation()}

    def check_checkpoint_data(self, state: dict[str, Any], fitting: bool | None = None) -> None:
        """:meth:`ImageDataModule.check_checkpoint_data`, and a resumed fit on shapes of another
        seed or size than its checkpoint's run trained on refused: it would train on other shapes,
        and no test split could then be drawn apart from all the shapes the model trained on.
        Another ``num_val`` (other validation shapes, none trained on) is warned."""
        super().check_checkpoint_data(state, fitting)
        trained = state.get("generation")
        if trained is None or not (self._fitting if fitting is None else fitting):
            return
        current = self.generation()
        changed = [key for key in ("seed", "num_train", "image_size") if trained.get(key) != current[key]]
        if changed:
            now = ", ".join(f"{key}={current[key]} (it trained on {trained.get(key)})" for key in changed)
            flags = " ".join(f"--data.{key} {trained.get(key)}" for key in changed)
            raise ValueError(
                f"ShapesDataModule: this resumed fit generates its shapes with {now}: it would go on training on other "
                "shapes than the checkpoint's run, and no test split could then be drawn apart from all the shapes "
                f"the model trained on. Resume with {flags}, or start a new run."
            )
        if trained.get("num_val") != current["num_val"]:
            rank_zero_warn(
                f"ShapesDataModule: the checkpoint's run validated on num_val={trained.get('num_val')} shapes; this "
                f"resumed fit validates on {current['num_val']}, other ones, so its readings are not comparable with "
                "the earlier validations' (the verdict's best reading among them)."
            )

    def remember_training(self, state_dict: dict[str, Any]) -> None:
        super().remember_training(state_dict)
        self.trained_generation = state_dict.get("generation")

    def forget_training(self) -> None:
        super().forget_training()
        self.trained_generation = None

    def missing_test_split(self) -> str | None:
        """A test split for a checkpoint's model trained on the shapes of another generation is
        refused: it is drawn apart from this DataModule's training shapes, not that model's (of
        2,000 test shapes at 32 x 32, 119 were training images of a model trained with another seed)."""
        trained = self.trained_generation
        # The training shapes are a function of these (num_val only draws the validation shapes,
        # which a resumed fit may change: none of them was trained on).
        keys = ("seed", "num_train", "image_size")
        current = self.generation()
        if trained is None or all(trained.get(key) == current[key] for key in keys):
            return super().missing_test_split()
        changed = ", ".join(f"{key}={current[key]} (it trained on {trained.get(key)})" for key in keys
                            if trained.get(key) != current[key])
        flags = " ".join(f"--data.{key} {value}" for key, value in trained.items())
        return (
            f"ShapesDataModule has {changed}: its test split is drawn apart from its own training shapes, not the "
            f"checkpoint's model's, and may hold images that model trained on. Test with {flags}."
        )

    def build_splits(self) -> tuple[TensorDataset, TensorDataset]:
        train_factors = sample_factors(self.num_train, seed=2 * self.seed)
        val_factors = sample_factors(self.num_val, seed=2 * self.seed + 1)
        return (
            TensorDataset(render_shapes(train_factors, self.image_size), train_factors),
            TensorDataset(render_shapes(val_factors, self.image_size), val_factors),
        )

    def build_test(self) -> TensorDataset:
        """``num_test`` shapes from seeds no training or validation split draws from, none of
        them an image of those splits (nor, so, of the calibration split carved from training).

        The grid is finite: of 2,000 shapes drawn at 64 x 64 with another seed, ~5 % repeat a
        training image (the same factors, or a symmetry of them); such a draw is replaced by one
        of a further seed, so the test images are a function of the seed and the split sizes.
        Telling them apart reads the training and validation images ``setup`` built, or, where
        it built none (``train.py test`` sets up the test split alone), renders them again.
        """
        seen = set()
        for split, seed, built in (
            (self.num_train, 2 * self.seed, self.train_dataset),
            (self.num_val, 2 * self.seed + 1, self.val_dataset),
        ):
            stored = built.dataset if isinstance(built, Subset) else built  # the training set less its calibration split
            if isinstance(stored, TensorDataset):
                seen.update(_image_keys(stored.tensors[0]))
                continue
            for factors in sample_factors(split, seed).split(4096):  # rendered a chunk at a time: bounded memory
                seen.update(_image_keys(render_shapes(factors, self.image_size)))
        kept_factors, kept_images, missing = [], [], self.num_test
        # Seeds 2**32 + s + k * 2**31: above every (2s, 2s + 1) of a seed in [0, 2**31).
        for round_ in range(_TEST_ROUNDS):
            factors = sample_factors(missing, seed=2**32 + self.seed + round_ * 2**31)
            images = render_shapes(factors, self.image_size)
            new = torch.tensor([key not in seen for key in _image_keys(images)])
            kept_factors.append(factors[new])
            kept_images.append(images[new])
            missing -= int(new.sum())
            if missing == 0:
                return TensorDataset(torch.cat(kept_images), torch.cat(kept_factors))
        raise ValueError(
            f"ShapesDataModule: at image_size {self.image_size} the training and validation splits ({self.num_train} "
            f"and {self.num_val} shapes) hold almost every image the grid gives ({len(seen)} distinct): {missing} of "
            f"num_test={self.num_test} test shapes were still training or validation images after {_TEST_ROUNDS} "
            "draws. Raise image_size or lower num_train."
        )


#: draws of the test split's missing shapes before it gives up (each replaces the repeats of the last)
_TEST_ROUNDS = 20


def _image_keys(images: Tensor) -> list[bytes]:
    """One bytes key per binary image (N, 1, S, S): equal keys, equal images."""
    return [row.tobytes() for row in np.packbits(images.flatten(1).numpy() > 0.5, axis=1)]

"""dSprites (Matthey et al. 2017) from the official npz file, with its latent factors.

Looked for under ``root/dsprites`` and ``root``:
``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz`` holding ``imgs`` (737280, 64, 64) uint8 in
{0, 1}, ``latents_values`` and ``latents_classes`` (737280, 6): colour, shape, scale,
orientation, position x, position y. Batches are ``(images, factors)`` with the factors
``[shape class, scale, orientation, pos_x, pos_y]``, the layout of the procedural shapes
(:mod:`datamodules.shapes`). Images stay uint8 in memory (3 GB as float32 would be 12).
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy
import torch
from torch.utils.data import Subset

from .base import (
    ImageDataModule,
    MissingDatasetError,
    UInt8Images,
    download_files,
    ensure_files,
    find_file,
    missing_files_message,
    seeded_split,
)

__all__ = ["DSpritesDataModule", "FILE_NAME", "URL"]

FILE_NAME = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
URL = "https://github.com/deepmind/dsprites-dataset/raw/master/" + FILE_NAME


class DSpritesDataModule(ImageDataModule):
    """dSprites, (1, 64, 64) in {0, 1}; batches are ``(images, factors)``.

    Args:
        root: folder holding ``dsprites/`` (or the npz file itself).
        num_val, seed: size and seed of the validation split.
        download: fetch the npz when missing (default off).
        batch_size, num_workers, shuffle, pin_memory, device, num_calibration: see
            :class:`ImageDataModule`.
    """

    validation_drawn_from_training_set = True  # seeded_split of one set

    def __init__(
        self,
        root: str = "data",
        num_val: int = 10_000,
        seed: int = 0,
        download: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        shuffle: bool = True,
        pin_memory: bool = False,
        device: str | None = None,
        num_calibration: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, shuffle, pin_memory, device, num_calibration)
        self.root, self.num_val, self.seed, self.download = Path(root), num_val, seed, download

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, 64, 64)

    def file(self) -> Path:
        folders = [self.root / "dsprites", self.root]
        path = find_file(folders, (FILE_NAME,))
        if path is None:
            raise MissingDatasetError(
                missing_files_message("dSprites", [FILE_NAME], folders, URL, folders[0], self.root, downloadable=True)
            )
        return path

    def prepare_data(self) -> None:
        ensure_files(self.download, self.file, lambda: download_files("dSprites", [URL], self.root / "dsprites"))

    def build_splits(self) -> tuple[Subset, Subset]:
        path = self.file()
        try:
            with numpy.load(path) as archive:
                images = torch.from_numpy(archive["imgs"]).to(torch.uint8).unsqueeze(1)
                values = torch.from_numpy(archive["latents_values"]).float()
                classes = torch.from_numpy(archive["latents_classes"])
        except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError, zlib.error) as error:
            raise ValueError(
                f"{path} is not the dSprites .npz or is damaged ({type(error).__name__}: {error}); download it again."
            ) from None
        factors = torch.cat([classes[:, 1:2].float(), values[:, 2:6]], dim=1)
        return seeded_split(UInt8Images(images, factors, scale=1.0), self.num_val, self.seed)

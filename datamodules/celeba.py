"""CelebA, aligned and cropped faces (Liu et al. 2015), from torchvision's folder layout.

Looked for under ``root/celeba`` (torchvision's layout) and ``root``:

    img_align_celeba/000001.jpg ...   the aligned images (178 x 218)
    list_eval_partition.txt           "<file> <0|1|2>": train, validation, test
    list_attr_celeba.txt              the 40 binary attributes

Images are center-cropped to ``crop`` pixels (148 by default, the face) and resized to
``image_size`` (64 by default). Batches are ``(images, attributes)`` with attributes (B, 40)
in {0, 1}. The official partitions give the train (0), validation (1) and test (2) sets, so the
split is the same everywhere. There is no download: the files live on Google Drive behind a quota.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .base import ImageDataModule, MissingDatasetError, missing_files_message

__all__ = ["ATTRIBUTES", "CelebADataModule", "CelebAImages", "IMAGES", "PARTITION", "SOURCE"]

IMAGES = "img_align_celeba"
PARTITION = "list_eval_partition.txt"
ATTRIBUTES = "list_attr_celeba.txt"
SOURCE = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Align&Cropped Images, and the Anno and Eval folders)"


class CelebAImages(Dataset):
    """Images read from disk on demand, transformed, with their attribute vectors."""

    def __init__(self, files: list[Path], attributes: torch.Tensor, transform) -> None:
        self.files, self.attributes, self.transform = files, attributes, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        with Image.open(self.files[index]) as image:
            return self.transform(image.convert("RGB")), self.attributes[index]


class CelebADataModule(ImageDataModule):
    """CelebA faces, (3, image_size, image_size) in [0, 1].

    Args:
        root: folder holding ``celeba/``.
        image_size: side of the square images after crop and resize.
        crop: side of the center crop taken from the 178 x 218 aligned image.
        download: must stay False (see the module docstring); True raises with instructions.
        batch_size, num_workers, shuffle, pin_memory, num_calibration: see :class:`ImageDataModule`.
    """

    def __init__(
        self,
        root: str = "data",
        image_size: int = 64,
        crop: int = 148,
        download: bool = False,
        batch_size: int = 64,
        num_workers: int = 2,
        shuffle: bool = True,
        pin_memory: bool = False,
        num_calibration: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, shuffle, pin_memory, num_calibration=num_calibration)
        if image_size < 8 or crop < image_size or crop > 178:
            raise ValueError(
                f"CelebA needs 8 <= image_size <= crop <= 178, got image_size={image_size}, crop={crop}."
            )
        self.root, self.image_size, self.crop, self.download = Path(root), image_size, crop, download

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def folder(self) -> Path:
        folders = [self.root / "celeba", self.root]
        for folder in folders:
            if (folder / IMAGES).is_dir() and (folder / PARTITION).is_file() and (folder / ATTRIBUTES).is_file():
                return folder
        missing = [
            name
            for name, ok in (
                (IMAGES + "/", (folders[0] / IMAGES).is_dir() or (folders[1] / IMAGES).is_dir()),
                (PARTITION, any((f / PARTITION).is_file() for f in folders)),
                (ATTRIBUTES, any((f / ATTRIBUTES).is_file() for f in folders)),
            )
            if not ok
        ] or [f"{IMAGES}/, {PARTITION} and {ATTRIBUTES} together in one folder"]
        raise MissingDatasetError(missing_files_message("CelebA", missing, folders, SOURCE, folders[0], self.root))

    def prepare_data(self) -> None:
        if self.download:
            raise MissingDatasetError(
                f"CelebA cannot be downloaded automatically (Google Drive quota, needs a browser). "
                f"Get it from {SOURCE}, unzip img_align_celeba.zip into {self.root / 'celeba'} next to "
                f"{PARTITION} and {ATTRIBUTES}, and leave download off."
            )
        self.folder()

    def build_splits(self) -> tuple[CelebAImages, CelebAImages]:
        return self._partition("0"), self._partition("1")

    def build_test(self) -> CelebAImages:
        """The official test partition (2)."""
        return self._partition("2")

    def _partition(self, code: str) -> CelebAImages:
        """The images of one official partition: 0 train, 1 validation, 2 test."""
        folder = self.folder()
        partition = dict(line.split() for line in (folder / PARTITION).read_text().split("\n") if line.strip())
        lines = (folder / ATTRIBUTES).read_text().split("\n")
        attributes = {}
        for line in lines[2:]:
            fields = line.split()
            if fields:
                attributes[fields[0]] = [int(v) > 0 for v in fields[1:]]
        transform = v2.Compose(
            [
                v2.PILToTensor(),
                v2.CenterCrop(self.crop),
                v2.Resize(self.image_size, antialias=True),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )

        names = sorted(name for name, part in partition.items() if part == code)
        # Checked here, not when a loader (perhaps in a worker) first reaches a missing file mid-epoch.
        present = set(os.listdir(folder / IMAGES))
        for have, what, fix in (
            (attributes, f"in {folder / PARTITION} have no line in {folder / ATTRIBUTES}",
             "the two files do not go together. Get both again from"),
            (present, f"listed in {folder / PARTITION} are not in {folder / IMAGES}",
             "unzip img_align_celeba.zip there again (was it cut short?). Get it from"),
        ):
            missing = [name for name in names if name not in have]
            if missing:
                raise MissingDatasetError(
                    f"CelebA: {len(missing)} of the {len(names)} images of partition {code} {what} (e.g. {missing[0]}): "
                    f"{fix} {SOURCE}."
                )
        attrs = torch.tensor([attributes[name] for name in names], dtype=torch.int64).reshape(len(names), 40)
        return CelebAImages([folder / IMAGES / name for name in names], attrs, transform)

"""CIFAR-10 from torchvision's folder layout (``cifar-10-batches-py``): the python pickles.

Looked for under ``root/cifar-10-batches-py`` (torchvision's layout) and ``root``:
``data_batch_1`` ... ``data_batch_5`` (50,000 training images) and ``test_batch`` (10,000).
Each pickle holds ``data`` (N, 3072) uint8, rows in C, H, W order, and ``labels``. The files are
read directly rather than through ``torchvision.datasets.CIFAR10``, whose md5 check rejects
anything but the original archive's bytes (and so every test fixture).
"""

from __future__ import annotations

import pickle
from pathlib import Path

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

__all__ = ["CIFAR10DataModule", "FILES", "FOLDER", "URL", "read_cifar_batch"]

FOLDER = "cifar-10-batches-py"
FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, 32, 32) uint8, labels (N,) int64) from one CIFAR-10 python pickle."""
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        images = torch.as_tensor(batch[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32)
        labels = torch.as_tensor(batch[b"labels"], dtype=torch.int64)
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{len(images)} images and {labels.numel()} labels")
        return images, labels
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"{path} is not a CIFAR-10 python batch or is damaged ({type(error).__name__}: {error}); download it again."
        ) from None


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10, (3, 32, 32) in [0, 1]; batches are ``(images, labels)``.

    Args:
        root: folder holding ``cifar-10-batches-py``.
        source: ``"train"`` (the five data batches) or ``"test"`` (``test_batch``).
        num_val, seed: size and seed of the validation split taken from the source.
        download: fetch and unpack the archive when files are missing (default off).
        batch_size, num_workers, shuffle, pin_memory, device, num_calibration: see
            :class:`ImageDataModule`.
    """

    validation_drawn_from_training_set = True  # seeded_split of one set

    def __init__(
        self,
        root: str = "data",
        source: str = "train",
        num_val: int = 5000,
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
        if source not in FILES:
            raise ValueError(f"CIFAR-10 source must be 'train' or 'test', got {source!r}.")
        self.root, self.source, self.num_val, self.seed, self.download = Path(root), source, num_val, seed, download

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, 32, 32)

    def files(self) -> list[Path]:
        folders = [self.root / FOLDER, self.root]
        found = {name: find_file(folders, (name,)) for name in FILES[self.source]}
        missing = [name for name, path in found.items() if path is None]
        if missing:
            raise MissingDatasetError(
                missing_files_message(f"CIFAR-10 ({self.source} split)", missing, folders, URL, folders[0], self.root, downloadable=True)
            )
        return [path for path in found.values() if path is not None]  # all found: none missing

    def prepare_data(self) -> None:
        ensure_files(self.download, self.files_to_prepare().files, self._fetch)

    def _fetch(self) -> None:
        import tarfile

        download_files("CIFAR-10", [URL], self.root)
        with tarfile.open(self.root / URL.rsplit("/", 1)[-1]) as archive:
            archive.extractall(self.root, filter="data")

    def load(self) -> UInt8Images:
        """The whole source split: images (N, 3, 32, 32) served in [0, 1], labels (N,) int64."""
        parts = [read_cifar_batch(path) for path in self.files()]
        return UInt8Images(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

    def build_splits(self) -> tuple[Subset, Subset]:
        return seeded_split(self.load(), self.num_val, self.seed)

    def build_test(self) -> UInt8Images:
        """``test_batch`` (10,000 images) when training reads the five data batches."""
        return self.with_source("test").load()

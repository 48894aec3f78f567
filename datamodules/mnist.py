"""MNIST and Fashion-MNIST from the standard idx files, gzipped or extracted. No download.

Looked for, in order, under ``root``: ``<Name>/raw`` (torchvision's layout: ``MNIST/raw``,
``FashionMNIST/raw``), ``<name>/raw`` (lower case), ``raw``, and ``root`` itself. Each of the
four files may be gzipped (``.gz``) or extracted:

    train-images-idx3-ubyte   train-labels-idx1-ubyte
    t10k-images-idx3-ubyte    t10k-labels-idx1-ubyte

``source="train"`` reads the 60,000-image training files, ``source="test"`` the 10,000-image
test files; either is split (seeded) into the DataModule's train and validation sets.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from datamodules.base import ImageDataModule, seeded_split

__all__ = ["FashionMNISTDataModule", "MNISTDataModule", "find_idx_file", "read_idx"]

_DTYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32, 0x0D: torch.float32}
_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> Tensor:
    """A tensor from an idx file (LeCun's format), gzipped or not."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    zero, dtype_code, num_dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in _DTYPES:
        raise ValueError(f"{path} is not an idx file (header {raw[:4].hex()}).")
    shape = struct.unpack(f">{num_dims}I", raw[4 : 4 + 4 * num_dims])
    dtype = _DTYPES[dtype_code]
    data = torch.frombuffer(bytearray(raw[4 + 4 * num_dims :]), dtype=dtype)
    if dtype.itemsize > 1:  # idx stores big-endian
        data = data.view(torch.uint8).view(-1, dtype.itemsize).flip(1).reshape(-1).view(dtype)
    expected = 1
    for size in shape:
        expected *= size
    if data.numel() != expected:
        raise ValueError(f"{path} holds {data.numel()} values, its header promises {shape}.")
    return data.reshape(shape)


def find_idx_file(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


class MNISTDataModule(ImageDataModule):
    """MNIST digits, (1, 28, 28) in [0, 1]; batches are ``(images, labels)``.

    Args:
        root: folder holding ``MNIST/raw`` (or ``raw``, or the files themselves).
        source: ``"train"`` (60,000 images) or ``"test"`` (10,000) idx files.
        num_val: images of the source held out (seeded) for validation.
        seed: seed of the split.
        binarize: threshold at 0.5 (for a Bernoulli likelihood or constraint).
        batch_size, num_workers, shuffle, pin_memory: see :class:`ImageDataModule`.
    """

    name = "MNIST"
    source_url = "http://yann.lecun.com/exdb/mnist/ (mirror: https://ossci-datasets.s3.amazonaws.com/mnist/)"

    def __init__(
        self,
        root: str = "data",
        source: str = "train",
        num_val: int = 5000,
        seed: int = 0,
        binarize: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        shuffle: bool = True,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, shuffle=shuffle, pin_memory=pin_memory)
        if source not in _STEMS:
            raise ValueError(f"{self.name} source must be 'train' or 'test', got {source!r}.")
        self.root = Path(root)
        self.source = source
        self.num_val = num_val
        self.seed = seed
        self.binarize = binarize

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, 28, 28)

    def candidate_folders(self) -> list[Path]:
        return [self.root / self.name / "raw", self.root / self.name.lower() / "raw", self.root / "raw", self.root]

    def files(self) -> tuple[Path, Path]:
        """The (images, labels) idx files of ``source``; a clear error naming what is missing."""
        folders = self.candidate_folders()
        found = [find_idx_file(folders, stem) for stem in _STEMS[self.source]]
        if all(found):
            return found[0], found[1]
        missing = [stem for stem, path in zip(_STEMS[self.source], found) if path is None]
        looked = "\n".join(f"  {folder}" for folder in folders)
        raise FileNotFoundError(
            f"{self.name} ({self.source} split): missing {', '.join(missing)} (or the same names with .gz).\n"
            f"Looked in:\n{looked}\n"
            f"Get the four idx files from {self.source_url} and put them in "
            f"{self.root / self.name / 'raw'} (gzipped or extracted), then pass --data.root {self.root}."
        )

    def load(self) -> TensorDataset:
        """The whole source split as tensors: images (N, 1, 28, 28) float in [0, 1], labels (N,) int64."""
        image_file, label_file = self.files()
        images = read_idx(image_file)
        labels = read_idx(label_file).long()
        if images.dim() != 3 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{image_file} holds {tuple(images.shape)} and {label_file} holds {tuple(labels.shape)}: "
                "expected (N, 28, 28) images with N labels."
            )
        images = images.unsqueeze(1).float().div_(255.0)
        if self.binarize:
            images = (images > 0.5).float()
        return TensorDataset(images, labels)

    def prepare_data(self) -> None:
        self.files()  # fail before any process loads anything

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            self.train_dataset, self.val_dataset = seeded_split(self.load(), self.num_val, self.seed)


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (Xiao et al. 2017): the MNIST file names and format, under ``FashionMNIST/raw``."""

    name = "FashionMNIST"
    source_url = "https://github.com/zalandoresearch/fashion-mnist (data/fashion/*.gz)"

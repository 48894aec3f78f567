"""MNIST and Fashion-MNIST from the standard idx files, gzipped or extracted.

Looked for, in order, under ``root``: ``<Name>/raw`` (torchvision's layout: ``MNIST/raw``,
``FashionMNIST/raw``), ``<name>/raw`` (lower case), and for MNIST (or a ``root`` named after the
dataset) also ``raw`` and ``root`` itself; the images and labels of a split come from one folder.
Each of the four files may be gzipped (``.gz``) or extracted:

    train-images-idx3-ubyte   train-labels-idx1-ubyte
    t10k-images-idx3-ubyte    t10k-labels-idx1-ubyte

``source="train"`` reads the 60,000-image training files, ``source="test"`` the 10,000-image
test files; either is split (seeded) into the DataModule's train and validation sets.
``download=True`` fetches the four gzipped files into ``<root>/<Name>/raw`` first (off by
default: nothing touches the network unless asked).
"""

from __future__ import annotations

import colorsys
import gzip
import math
import struct
import zlib
from pathlib import Path

import torch
from torch import Tensor
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

__all__ = [
    "HUES",
    "ColouredMNISTDataModule",
    "FashionMNISTDataModule",
    "KMNISTDataModule",
    "MNISTDataModule",
    "read_idx",
]

_DTYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32, 0x0D: torch.float32}
_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> Tensor:
    """A tensor from an idx file (LeCun's format), gzipped or not; a damaged file's error names it."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as error:
            raise ValueError(
                f"{path} is a damaged or truncated gzip file ({error}); download it again."
            ) from error
    if len(raw) < 4:
        raise ValueError(f"{path} is empty or truncated: {len(raw)} bytes, an idx header alone needs 4.")
    zero, dtype_code, num_dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in _DTYPES:
        raise ValueError(f"{path} is not an idx file (header {raw[:4].hex()}).")
    if len(raw) < 4 + 4 * num_dims:
        raise ValueError(f"{path} is truncated inside its header ({len(raw)} bytes for {num_dims} dimensions).")
    shape = struct.unpack(f">{num_dims}I", raw[4 : 4 + 4 * num_dims])
    dtype = _DTYPES[dtype_code]
    payload = raw[4 + 4 * num_dims :]
    if len(payload) % dtype.itemsize:
        expected_bytes = math.prod(shape) * dtype.itemsize
        raise ValueError(
            f"{path} is truncated: {len(payload)} bytes of {dtype} values after its header, which promises {shape} "
            f"({expected_bytes} bytes); download it again."
        )
    data = torch.frombuffer(bytearray(payload), dtype=dtype)
    if dtype.itemsize > 1:  # idx stores big-endian
        data = data.view(torch.uint8).view(-1, dtype.itemsize).flip(1).reshape(-1).view(dtype)
    expected = 1
    for size in shape:
        expected *= size
    if data.numel() != expected:
        raise ValueError(f"{path} holds {data.numel()} values, its header promises {shape}.")
    return data.reshape(shape)


#: lower-case folder names of the datasets that share MNIST's file names (MNIST never reads their root)
_OTHER_FOLDERS = ("fashionmnist", "kmnist")


class MNISTDataModule(ImageDataModule):
    """MNIST digits, (1, 28, 28) in [0, 1]; batches are ``(images, labels)``.

    Args:
        root: folder holding ``MNIST/raw`` (or ``raw``, or the files themselves).
        source: ``"train"`` (60,000 images) or ``"test"`` (10,000) idx files.
        num_val: images of the source held out (seeded) for validation.
        seed: seed of the split.
        binarize: threshold at 0.5 (for a Bernoulli likelihood or constraint).
        download: fetch the files when missing (default off).
        batch_size, num_workers, shuffle, pin_memory, device, num_calibration: see
            :class:`ImageDataModule`.
    """

    name = "MNIST"
    folder_name = "MNIST"
    source_url = "http://yann.lecun.com/exdb/mnist/ (mirror: https://ossci-datasets.s3.amazonaws.com/mnist/)"
    mirror = "https://ossci-datasets.s3.amazonaws.com/mnist/"

    validation_drawn_from_training_set = True  # seeded_split of one set

    def __init__(
        self,
        root: str = "data",
        source: str = "train",
        num_val: int = 5000,
        seed: int = 0,
        binarize: bool = False,
        download: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        shuffle: bool = True,
        pin_memory: bool = False,
        device: str | None = None,
        num_calibration: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, shuffle, pin_memory, device, num_calibration)
        if source not in _STEMS:
            raise ValueError(f"{self.name} source must be 'train' or 'test', got {source!r}.")
        self.root = Path(root)
        self.source = source
        self.num_val = num_val
        self.seed = seed
        self.binarize = binarize
        self.download = download

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, 28, 28)

    def candidate_folders(self) -> list[Path]:
        """Where the files are looked for, in order: ``<root>/<Name>/raw``, ``<root>/<name>/raw``,
        then ``<root>/raw`` and ``<root>`` itself, those two for a root named after the dataset
        (``FashionMNIST``, ``kmnist``, ...), or for MNIST one named after none of the others: the
        datasets share their file names, so Fashion-MNIST or KMNIST read from a folder named after
        no dataset might read MNIST's, and MNIST from ``FashionMNIST/`` Fashion-MNIST's. A root
        named ``raw`` is named by its parent (``FashionMNIST/raw`` is Fashion-MNIST's)."""
        folder = self.folder_name
        named = [self.root / folder / "raw", self.root / folder.lower() / "raw"]
        root_name = (self.root.parent.name if self.root.name.lower() == "raw" else self.root.name).lower()
        # MNIST's files anywhere but in a folder named after another dataset of the same file names.
        generic = root_name not in _OTHER_FOLDERS if folder == "MNIST" else root_name == folder.lower()
        return [*named, self.root / "raw", self.root] if generic else named

    def files(self) -> tuple[Path, Path]:
        """The (images, labels) idx files of ``source``, both from one folder (the first that holds
        both: never the images of one dataset with the labels of another); a clear error naming
        what is missing."""
        folders = self.candidate_folders()
        for folder in folders:
            images, labels = (find_file([folder], (stem, stem + ".gz")) for stem in _STEMS[self.source])
            if images is not None and labels is not None:
                return images, labels
        images, labels = (find_file(folders, (stem, stem + ".gz")) for stem in _STEMS[self.source])
        missing = [f"{stem} (or {stem}.gz)" for stem, path in zip(_STEMS[self.source], (images, labels)) if path is None]
        if images is not None and labels is not None:  # each file is somewhere, but no folder holds both
            missing = [f"{images.name} and {labels.name} in one folder (found in {images.parent} and {labels.parent})"]
        raise MissingDatasetError(
            missing_files_message(
                f"{self.name} ({self.source} split)", missing, folders, self.source_url, folders[0], self.root,
                downloadable=True,
            )
        )

    def load(self) -> UInt8Images:
        """The whole source split: images (N, 1, 28, 28) served in [0, 1], labels (N,) int64."""
        image_file, label_file = self.files()
        images = read_idx(image_file)
        labels = read_idx(label_file).long()
        if images.shape[1:] != (28, 28) or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{image_file} holds {tuple(images.shape)} and {label_file} holds {tuple(labels.shape)}: "
                "expected (N, 28, 28) images with N labels."
            )
        images = images.unsqueeze(1)
        if self.binarize:
            return UInt8Images((images > 127).to(torch.uint8), labels, scale=1.0)
        return UInt8Images(images, labels)

    def prepare_data(self) -> None:
        # File work on one process only (Lightning calls this on local rank 0).
        urls = [self.mirror + stem + ".gz" for split in _STEMS.values() for stem in split]
        ensure_files(self.download, self.files_to_prepare().files, lambda: download_files(self.name, urls, self.candidate_folders()[0]))

    def build_splits(self) -> tuple[Subset, Subset]:
        return seeded_split(self.load(), self.num_val, self.seed)

    def build_test(self) -> UInt8Images:
        """The whole test split (10,000 images) when training reads the training files."""
        return self.with_source("test").load()


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (Xiao et al. 2017): the MNIST file names and format, under ``FashionMNIST/raw``."""

    name = "FashionMNIST"
    folder_name = "FashionMNIST"
    source_url = "https://github.com/zalandoresearch/fashion-mnist (data/fashion/*.gz)"
    mirror = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


class KMNISTDataModule(MNISTDataModule):
    """Kuzushiji-MNIST (Clanuwat et al. 2018): cursive Japanese characters, the MNIST files and
    format under ``KMNIST/raw``; labels are the 10 hiragana classes.

    Read with this module's idx reader rather than ``torchvision.datasets.KMNIST``: torchvision
    reads a split only once all four files are present and extracted, so the test split alone, as
    distributed (``t10k-*.gz``), is refused; here each split is read by itself, gzipped or not.
    """

    name = "KMNIST"
    folder_name = "KMNIST"
    source_url = "https://github.com/rois-codh/kmnist (the four MNIST-format .gz files)"
    mirror = "http://codh.rois.ac.jp/kmnist/dataset/kmnist/"


# Twelve fully saturated hues, 30 degrees apart: red, orange, yellow, ..., rose.
HUES = torch.tensor([colorsys.hsv_to_rgb(i / 12, 1.0, 1.0) for i in range(12)], dtype=torch.float32)


class ColouredMNISTDataModule(MNISTDataModule):
    """Coloured MNIST, (3, 28, 28) in [0, 1], made from the MNIST files by a documented recipe.

    Recipe: image n gets hue ``k_n`` drawn uniformly from 12 saturated hues 30 degrees apart
    (``HUES``) by a generator seeded with ``colour_seed``; its RGB image is the grey digit times
    that colour, on black. Batches are ``(images, targets)`` with targets ``[digit, hue index]``
    (N, 2) int64, so the colour is a known ground-truth factor next to the digit.
    Same files, layouts and arguments as :class:`MNISTDataModule`, plus ``colour_seed``.
    """

    name = "Coloured MNIST (made from the MNIST files)"
    folder_name = "MNIST"

    def __init__(self, *args, colour_seed: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.binarize:
            # Six of the twelve hues have a channel at 0.5: a binarized digit coloured is not binary.
            raise ValueError(
                "ColouredMNISTDataModule: binarize=True gives no binary images (the hues' channels take 0, 0.5 "
                "and 1, a Bernoulli likelihood's floor above 0); leave binarize False."
            )
        self.colour_seed = colour_seed

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, 28, 28)

    def load(self) -> UInt8Images:
        grey = super().load()
        generator = torch.Generator().manual_seed(self.colour_seed)
        hue = torch.randint(len(HUES), (len(grey),), generator=generator)
        colours = HUES[hue].view(-1, 3, 1, 1)
        images = (grey.images.float() / grey.scale * colours * 255).round().to(torch.uint8)
        return UInt8Images(images, torch.stack([grey.targets, hue], dim=1))

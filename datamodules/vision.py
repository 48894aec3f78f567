"""Datasets that torchvision reads itself (EMNIST, SVHN), held in memory as uint8.

torchvision already knows these files (their layout, their quirks, their download), so these
DataModules do not read them: they build the torchvision dataset, take its stored arrays once
and serve them like every other in-memory DataModule here (a seeded validation split, the
calibration split, ``device=``, the resumable training order). What they add is the error a
user sees when the files are absent: which files, where they were looked for, and how to get
them offline, instead of torchvision's "Dataset not found".
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Subset
from torchvision.datasets import EMNIST, SVHN, VisionDataset

from .base import ImageDataModule, MissingDatasetError, UInt8Images, seeded_split

__all__ = ["EMNISTDataModule", "SVHNDataModule", "TorchvisionDataModule"]


class TorchvisionDataModule(ImageDataModule):
    """Base of the DataModules over a torchvision dataset; a subclass overrides two hooks.

    :meth:`torchvision_dataset` builds the dataset (``download`` passed through);
    :meth:`to_images` turns it into :class:`UInt8Images`. ``prepare_data`` (local rank 0) is the
    only place that may download; ``setup`` on every rank reads with ``download=False``.

    Args:
        root: the folder handed to torchvision (see each subclass for the files it expects).
        source: which of the dataset's files (each subclass lists them).
        num_val: images of the source held out (seeded) for validation.
        seed: seed of the split.
        download: let torchvision fetch (or extract) the files when missing (default off).
        batch_size, num_workers, shuffle, pin_memory, device, num_calibration: see
            :class:`ImageDataModule`.
    """

    sources: tuple[str, ...] = ("train", "test")
    #: the files torchvision expects for one source, relative to ``root`` ({source} filled in)
    expected_files: str = ""
    where_to_get: str = ""

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
        if source not in self.sources:
            raise ValueError(f"{type(self).__name__}: source must be one of {self.sources}, got {source!r}.")
        self.root, self.source, self.num_val, self.seed, self.download = Path(root), source, num_val, seed, download
        #: the dataset prepare_data read, handed to setup in the same process (then dropped)
        self._prepared: VisionDataset | None = None
        #: the same for the test files, in a test
        self._prepared_test: VisionDataset | None = None

    def torchvision_dataset(self, download: bool) -> VisionDataset:
        raise NotImplementedError

    def to_images(self, dataset: VisionDataset) -> UInt8Images:
        raise NotImplementedError

    def _read(self, download: bool) -> VisionDataset:
        try:
            return self.torchvision_dataset(download)
        except OSError as error:  # URLError, timeouts, refused connections: no network
            if not download:
                raise
            settings = vars(self)
            raise MissingDatasetError(
                f"{type(self).__name__}: download=True but torchvision's download failed ({error}). Without "
                f"network access, get {self.expected_files.format(**settings)} from "
                f"{self.where_to_get.format(**settings)} and leave download off."
            ) from error
        except RuntimeError as error:  # torchvision's "Dataset not found (or corrupted)"
            if "not found" not in str(error).lower():
                raise
            settings = vars(self)
            raise MissingDatasetError(
                f"{type(self).__name__}: torchvision found no {self.source} files under {self.root.resolve()} "
                f"({error}).\nExpected: {self.expected_files.format(**settings)}\n"
                f"Get them from {self.where_to_get.format(**settings)}, then pass --data.root {self.root}."
            ) from error

    def prepare_data(self) -> None:
        # torchvision checks the files by reading them: what it read is kept for setup in this
        # process (a full SVHN is over a GB; reading it twice doubles the start-up). A test
        # reads (or fetches) the test files alone.
        reader = self.files_to_prepare()
        if reader is not self:
            self._prepared_test = reader._read(self.download)
            return
        self._prepared = self._read(self.download)

    def build_splits(self) -> tuple[Subset, Subset]:
        dataset, self._prepared = self._prepared or self._read(download=False), None
        return seeded_split(self.to_images(dataset), self.num_val, self.seed)

    def build_test(self) -> UInt8Images:
        """The dataset's ``test`` files when training reads another source."""
        dataset, self._prepared_test = self._prepared_test or self.with_source("test")._read(download=False), None
        return self.to_images(dataset)


class EMNISTDataModule(TorchvisionDataModule):
    """EMNIST (Cohen et al. 2017): handwritten digits and letters, (1, 28, 28) in [0, 1], upright.

    Read by ``torchvision.datasets.EMNIST`` from ``<root>/EMNIST/raw/emnist-<split>-<source>-
    {images-idx3,labels-idx1}-ubyte`` (extracted; ``download=True`` extracts the official
    ``gzip.zip`` when it is already in ``EMNIST/raw``, without network). The files store each
    image transposed; it is served upright, as MNIST's are. Labels are torchvision's (for
    ``letters``, 1-26 for a-z).

    Args:
        split: one of ``byclass``, ``bymerge``, ``balanced``, ``letters``, ``digits``, ``mnist``.
        other arguments: see :class:`TorchvisionDataModule`.
    """

    expected_files = "EMNIST/raw/emnist-{split}-{source}-images-idx3-ubyte and emnist-{split}-{source}-labels-idx1-ubyte"
    where_to_get = (
        "https://www.nist.gov/itl/products-and-services/emnist-dataset: put gzip.zip in {root}/EMNIST/raw and "
        "pass --data.download true once (torchvision extracts it there; no network needed when the zip is present)"
    )

    def __init__(
        self,
        root: str = "data",
        split: str = "balanced",
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
        # torchvision would check it only at setup: fail where the bad value is given.
        if split not in EMNIST.splits:
            raise ValueError(f"EMNISTDataModule: split must be one of {EMNIST.splits}, got {split!r}.")
        self.split = split
        super().__init__(
            root, source, num_val, seed, download, batch_size, num_workers, shuffle, pin_memory, device, num_calibration
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, 28, 28)

    def torchvision_dataset(self, download: bool) -> EMNIST:
        return EMNIST(str(self.root), split=self.split, train=self.source == "train", download=download)

    def to_images(self, dataset: EMNIST) -> UInt8Images:
        return UInt8Images(dataset.data.transpose(1, 2).unsqueeze(1).contiguous(), dataset.targets.long())


class SVHNDataModule(TorchvisionDataModule):
    """SVHN (Netzer et al. 2011): house-number digits, (3, 32, 32) in [0, 1].

    Read by ``torchvision.datasets.SVHN`` from ``<root>/<source>_32x32.mat`` (``source``:
    ``train``, 73,257 images; ``test``, 26,032; ``extra``, 531,131), which torchvision checks
    against the official MD5. Reading ``.mat`` files needs scipy (``pip install scipy``).
    Labels are the digit 0-9 (the files store 0 as 10; torchvision maps it back).

    Args: see :class:`TorchvisionDataModule`.
    """

    sources = ("train", "test", "extra")
    expected_files = "{source}_32x32.mat"
    where_to_get = "http://ufldl.stanford.edu/housenumbers/ ({source}_32x32.mat, into {root})"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, 32, 32)

    def torchvision_dataset(self, download: bool) -> SVHN:
        try:
            import scipy.io  # noqa: F401  (torchvision imports it lazily; say what to install first)
        except ImportError as error:
            raise ImportError("SVHNDataModule reads .mat files with scipy: pip install scipy") from error
        return SVHN(str(self.root), split=self.source, download=download)

    def to_images(self, dataset: SVHN) -> UInt8Images:
        return UInt8Images(torch.from_numpy(dataset.data).contiguous(), torch.from_numpy(dataset.labels).long())

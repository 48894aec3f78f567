"""LightningDataModules that wrap datasets, offline-first, on a shared base."""

from .base import ImageDataModule, MissingDatasetError, UInt8Images, seeded_split
from .celeba import CelebADataModule
from .cifar import CIFAR10DataModule
from .dsprites import DSpritesDataModule
from .folder import ImageFolderDataModule
from .mnist import ColouredMNISTDataModule, FashionMNISTDataModule, MNISTDataModule
from .sampler import ResumableSampler
from .shapes import ShapesDataModule

__all__ = [
    "CIFAR10DataModule",
    "CelebADataModule",
    "ColouredMNISTDataModule",
    "DSpritesDataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "MissingDatasetError",
    "ResumableSampler",
    "ShapesDataModule",
    "UInt8Images",
    "seeded_split",
]

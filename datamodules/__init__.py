"""LightningDataModules that wrap datasets, offline-first, on a shared base."""

from datamodules.base import ImageDataModule, MissingDatasetError, UInt8Images, seeded_split
from datamodules.celeba import CelebADataModule
from datamodules.cifar import CIFAR10DataModule
from datamodules.dsprites import DSpritesDataModule
from datamodules.folder import ImageFolderDataModule
from datamodules.mnist import ColouredMNISTDataModule, FashionMNISTDataModule, MNISTDataModule
from datamodules.sampler import ResumableSampler
from datamodules.shapes import ShapesDataModule

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

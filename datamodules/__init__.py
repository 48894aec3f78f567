"""LightningDataModules that wrap datasets, offline-first, on a shared base."""

from .base import ImageDataModule, MissingDatasetError, NoTestSplitError, UInt8Images, seeded_split
from .celeba import CelebADataModule
from .cifar import CIFAR10DataModule
from .dsprites import DSpritesDataModule
from .folder import ImageFolderDataModule
from .mnist import ColouredMNISTDataModule, FashionMNISTDataModule, KMNISTDataModule, MNISTDataModule
from .omniglot import OmniglotDataModule
from .sampler import ResumableLoader, ResumableSampler
from .shapes import ShapesDataModule
from .vision import EMNISTDataModule, SVHNDataModule, TorchvisionDataModule

__all__ = [
    "CIFAR10DataModule",
    "CelebADataModule",
    "ColouredMNISTDataModule",
    "DSpritesDataModule",
    "EMNISTDataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "KMNISTDataModule",
    "MNISTDataModule",
    "MissingDatasetError",
    "NoTestSplitError",
    "OmniglotDataModule",
    "ResumableLoader",
    "ResumableSampler",
    "SVHNDataModule",
    "ShapesDataModule",
    "TorchvisionDataModule",
    "UInt8Images",
    "seeded_split",
]

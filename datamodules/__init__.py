"""LightningDataModules that wrap datasets, offline-first, on a shared base."""

from datamodules.base import ImageDataModule, seeded_split
from datamodules.mnist import FashionMNISTDataModule, MNISTDataModule
from datamodules.shapes import ShapesDataModule

__all__ = ["FashionMNISTDataModule", "ImageDataModule", "MNISTDataModule", "ShapesDataModule", "seeded_split"]

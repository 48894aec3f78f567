"""LightningDataModules that wrap datasets, offline-first, on a shared base."""

from datamodules.base import ImageDataModule, seeded_split
from datamodules.shapes import ShapesDataModule

__all__ = ["ImageDataModule", "ShapesDataModule", "seeded_split"]

"""Shared base of the DataModules: loaders, the image shape, a seeded train/val split."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["ImageDataModule", "seeded_split"]


def seeded_split(dataset: Dataset, num_val: int, seed: int) -> tuple[Subset, Subset]:
    """Deterministic (train, val) split: the same indices on every rank and every run."""
    n = len(dataset)
    if not 0 < num_val < n:
        raise ValueError(f"num_val must lie in (0, {n}) for a dataset of {n} items, got {num_val}.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, order[num_val:]), Subset(dataset, order[:num_val])


class ImageDataModule(pl.LightningDataModule):
    """Base of every DataModule: batches of ``(images, targets)``, images float in [0, 1].

    Subclasses set ``self.train_dataset`` and ``self.val_dataset`` in :meth:`setup` and
    report :attr:`image_shape` before any data is loaded (``train.py`` links it to the model).

    Args:
        batch_size: images per batch and per process (under DDP the global batch is
            ``batch_size * world_size``).
        num_workers: DataLoader worker processes.
        shuffle: shuffle the training set each epoch.
        pin_memory: pin host memory (speeds up copies to a GPU).
    """

    def __init__(self, batch_size: int = 64, num_workers: int = 0, shuffle: bool = True, pin_memory: bool = False):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers!r}.")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.pin_memory = pin_memory
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images, known before :meth:`setup`."""
        raise NotImplementedError

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not been called.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=shuffle,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

"""ImageClassifier: a small convolutional classifier for the classification and feature constraints.

Train it on any of the DataModules with ``python train.py fit --config configs/<dataset>_classifier.yaml``;
its checkpoint is what :class:`~lightning_geco.frozen.FrozenClassifier` loads. Labels are the
second item of a batch; for data whose second item is a factor table (the shapes: (N, 5)),
``label_column`` says which column is the class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_geco.batches import batch_images, batch_labels
from lightning_geco.checks import is_count
from lightning_geco.nets import ConvDownsampler, ConvEncoder

__all__ = ["ImageClassifier", "check_class_labels", "class_labels"]


def class_labels(labels: Tensor | None, label_column: int = 0) -> Tensor:
    """Integer class labels (N,) from a batch's labels: (N,) as they are, (N, K) -> column ``label_column``."""
    if labels is None:
        raise ValueError(
            "A class label is needed but the batch carries none: batches must be (images, labels) "
            "(or a dict with 'label'). Use target='prediction' to keep the classifier's prediction on x instead."
        )
    return _label_column(labels, label_column).long()


def _label_column(labels: Tensor, label_column: int) -> Tensor:
    """Labels (N,) as they are, or column ``label_column`` of (N, K) ones; a clear error past K."""
    if labels.dim() != 2:
        return labels
    if not 0 <= label_column < labels.shape[1]:
        raise ValueError(
            f"label_column {label_column} is not a column of the batch's labels, which have {labels.shape[1]} "
            f"(0 to {labels.shape[1] - 1})."
        )
    return labels[:, label_column]


def check_class_labels(labels: Tensor | None, label_column: int, num_classes: int) -> None:
    """Refuse labels a classifier of ``num_classes`` cannot read as classes: values that are not
    whole numbers (a continuous factor: the shapes' scale, 0.5 to 1, would truncate to 0 and 1)
    or outside [0, num_classes). Reads the labels on the host: call it on a first batch."""
    if labels is None:
        return
    column = _label_column(labels, label_column)
    where = f"column {label_column} of the labels" if labels.dim() == 2 else "the labels"
    if column.is_floating_point() and not torch.equal(column, column.round()):
        values = ", ".join(f"{v:.4g}" for v in column.unique()[:5].tolist())
        raise ValueError(
            f"{where} holds values that are not classes ({values}, ...): a classifier reads whole numbers in "
            f"[0, {num_classes}). Pick a column of classes (label_column), or bucket the values into classes first."
        )
    if column.numel() and not (0 <= int(column.min()) and int(column.max()) < num_classes):
        raise ValueError(
            f"{where} hold classes {int(column.min())} to {int(column.max())}, but the classifier has "
            f"num_classes={num_classes} (classes 0 to {num_classes - 1}): set num_classes to the data's, or pick "
            "another label_column."
        )


class ImageClassifier(pl.LightningModule):
    """ConvEncoder features -> linear layer -> class logits.

    Args:
        image_shape: (C, H, W); linked from the DataModule by ``train.py``.
        num_classes: number of classes.
        widths, hidden_dim: the convolutional encoder (see :class:`~lightning_geco.nets.ConvEncoder`).
        pooling: ``"flatten"`` (the last feature map flattened, as the VAEs' encoder) or ``"max"``
            (global max over positions: translation invariant; on the shapes, where a small
            object sits anywhere, "flatten" stalled at 46 % accuracy and "max" learned).
        learning_rate: Adam's learning rate.
        label_column: the column of 2-d labels that holds the class (0: the shapes' shape).
    """

    def __init__(
        self,
        image_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        widths: Sequence[int] = (32, 64, 64),
        hidden_dim: int = 128,
        pooling: str = "flatten",
        learning_rate: float = 1e-3,
        label_column: int = 0,
    ) -> None:
        super().__init__()
        if not is_count(num_classes, 2):
            raise ValueError(f"num_classes must be an int of at least 2, got {num_classes!r}.")
        if not is_count(label_column, 0):
            raise ValueError(f"label_column must be an int >= 0 (a column of 2-d labels), got {label_column!r}.")
        if pooling not in ("flatten", "max"):
            raise ValueError(f"pooling must be 'flatten' or 'max', got {pooling!r}.")
        self.save_hyperparameters()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.encoder: nn.Module
        if pooling == "flatten":
            self.encoder = ConvEncoder(self.image_shape, widths, hidden_dim)
        else:
            channels, height, width = self.image_shape
            self.encoder = nn.Sequential(
                ConvDownsampler(channels, height, width, widths),
                nn.AdaptiveMaxPool2d(1),
                nn.Flatten(),
                nn.Linear(widths[-1], hidden_dim),
                nn.SiLU(),
            )
        self.head = nn.Linear(hidden_dim, num_classes)
        self.learning_rate = learning_rate
        self.label_column = label_column
        self._labels_checked = False
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features, (N, hidden_dim)."""
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits, (N, num_classes)."""
        return self.head(self.features(x))

    def _loss(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        if not self._labels_checked:  # a host read, on the first batch only
            check_class_labels(batch_labels(batch), self.label_column, self.head.out_features)
            self._labels_checked = True
        x, labels = batch_images(batch), class_labels(batch_labels(batch), self.label_column)
        logits = self(x)
        return F.cross_entropy(logits, labels), logits, labels

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, _, _ = self._loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """``test/loss`` (cross-entropy, nats) and ``test/accuracy`` on the test split."""
        self._evaluation_step("test", batch)

    def _evaluation_step(self, stage: str, batch: Any) -> None:
        loss, logits, labels = self._loss(batch)
        # One accuracy state, reset at each epoch's end: validation and test never run at once.
        self.val_accuracy.update(logits, labels)
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, batch_size=labels.shape[0])
        self.log(f"{stage}/accuracy", self.val_accuracy, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.learning_rate)

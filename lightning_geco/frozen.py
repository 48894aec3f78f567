"""Frozen networks the constraints read: never trained by the VAE loss, always in eval mode.

Weights come from local files only (nothing is downloaded): a checkpoint of an
:class:`~lightning_geco.classifier.ImageClassifier` trained with this library, or a torchvision
architecture with a weights file the user points to.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_geco.rebuild import Rebuildable
from lightning_geco.resume import UnreadableCheckpointError, checkpoint_head, mapped_checkpoint

__all__ = ["FrozenClassifier", "FrozenNetwork", "TorchvisionFeatures"]


def _existing_file(path: str | Path, what: str, how: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: looked for {path.resolve()}. {how}")
    return path


def _plain(value: Any) -> Any:
    """Hyperparameters compared as plain values: tuples as lists, any mapping as a dict, without
    the bookkeeping keys LightningCLI adds (``_class_path``, ``_instantiator``), which a loaded
    model's ``hparams`` do not keep."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _trained_split(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The ``split`` a checkpoint's DataModule state records (``ImageDataModule.held_out_split``)."""
    for value in checkpoint.values():
        if isinstance(value, dict) and isinstance(value.get("split"), dict):
            return dict(value["split"])
    return None


class FrozenNetwork(Rebuildable, nn.Module):
    """Base of the frozen networks: parameters without gradients, eval mode whatever the parent does.

    Subclasses implement :meth:`features` (and :meth:`logits` when they classify).
    """

    def freeze(self) -> None:
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenNetwork:
        # Lightning calls model.train() before every training epoch; dropout or batch-norm
        # statistics must not change the frozen network's readings.
        return super().train(False)

    def features(self, x: Tensor) -> Tensor:
        """Features of images in [0, 1], (N, C, H, W) -> (N, ...)."""
        raise NotImplementedError


_POINT_TO_A_CLASSIFIER = (
    "Point `checkpoint` to the .ckpt of a classifier run, e.g. `python train.py fit --config "
    "configs/mnist_classifier.yaml` writes runs/checkpoints/mnist_classifier/last.ckpt."
)


def _how_to_train(checkpoint: str | Path) -> str:
    """How to get the classifier a missing ``checkpoint`` names: the classifier config that writes
    ``runs/checkpoints/<config>/last.ckpt``, with the VAE run's data flags."""
    parts = Path(checkpoint).parts
    # runs/checkpoints/<config>/last.ckpt, as the classifier configs (<name>_classifier.yaml) write it
    named = len(parts) >= 2 and parts[-1] == "last.ckpt" and parts[-2].endswith("_classifier")
    config = parts[-2] if named else "mnist_classifier"
    return (
        f"Train one first, e.g. `python train.py fit --config configs/{config}.yaml` with the same data flags "
        f"(e.g. --data.root), which writes runs/checkpoints/{config}/last.ckpt, and point `checkpoint` to it."
    )


class FrozenClassifier(FrozenNetwork):
    """An :class:`~lightning_geco.classifier.ImageClassifier` loaded from a Lightning checkpoint.

    Args:
        checkpoint: path of the ``.ckpt`` file (e.g. ``runs/checkpoints/mnist_classifier/last.ckpt``).
        architecture: the classifier's hyperparameters, recorded with it (:meth:`init_args`) so a
            model checkpoint that holds the classifier's weights (a VAE trained with a
            classification constraint) loads where ``checkpoint`` is not, or where it now holds
            another classifier: the recorded one is then built, with a warning, and takes its
            weights from that model checkpoint. Leave it None when building one yourself.
    """

    def __init__(self, checkpoint: str, architecture: dict[str, Any] | None = None) -> None:
        super().__init__()
        from lightning_geco.classifier import ImageClassifier

        #: how the classifier's DataModule held images out of its training (its checkpoint's
        #: ``held_out_split``; None: not recorded), so a VAE's DataModule can refuse to validate or
        #: calibrate on images it trained on
        self.trained_split: dict[str, Any] | None = None
        path = Path(checkpoint).expanduser()
        # Read once, memory-mapped (not the weights): its hyperparameters and its DataModule's split.
        try:
            saved = mapped_checkpoint(path) if path.is_file() else None
        except UnreadableCheckpointError as error:
            raise ValueError(f"Classifier checkpoint {error} {_POINT_TO_A_CLASSIFIER}") from error
        if architecture is not None and saved is not None and _plain(checkpoint_head(saved)[0]) != _plain(architecture):
            rank_zero_warn(
                f"Classifier checkpoint {path} now holds another classifier than the one recorded with this model "
                "(retrained at the same path?): the recorded architecture is built, and its weights must come from "
                "the checkpoint being loaded (a model trained with it holds them)."
            )
            self.classifier = ImageClassifier(**architecture)
        elif saved is not None or architecture is None:
            path = _existing_file(checkpoint, "Classifier checkpoint", _how_to_train(checkpoint))
            try:
                self.classifier = ImageClassifier.load_from_checkpoint(path, map_location="cpu")
            except Exception as error:  # noqa: BLE001 - whatever the file holds, say what it had to be
                raise ValueError(
                    f"Classifier checkpoint {path} is not an ImageClassifier checkpoint ({type(error).__name__}: "
                    f"{error}). {_POINT_TO_A_CLASSIFIER}"
                ) from error
            assert saved is not None  # _existing_file raised otherwise
            self.trained_split = _trained_split(saved)
        else:
            rank_zero_warn(
                f"Classifier checkpoint {path} not found: the classifier is built from the architecture recorded "
                "with it, and its weights must come from the checkpoint being loaded (a model trained with it "
                "holds them)."
            )
            self.classifier = ImageClassifier(**architecture)
        self.checkpoint = str(path)
        self.architecture = dict(self.classifier.hparams)
        self.image_shape = self.classifier.image_shape
        self.label_column = self.classifier.label_column
        self.num_classes = self.classifier.head.out_features
        self.freeze()

    def features(self, x: Tensor) -> Tensor:
        return self.classifier.features(x)

    def logits(self, x: Tensor) -> Tensor:
        return self.classifier(x)


class TorchvisionFeatures(FrozenNetwork):
    """Features of a torchvision architecture at one layer, with weights from a local file.

    Args:
        architecture: a name ``torchvision.models.get_model`` knows (``"resnet18"``, ``"vgg16"``, ...).
        weights: path of a ``state_dict`` file for that architecture (``torch.save(model.state_dict())``).
        layer: the node whose output is the features (``torchvision.models.feature_extraction``
            names, e.g. ``"layer2"`` for a ResNet).
        mean, std: per-channel input normalisation (ImageNet's by default). Grey images are
            repeated to 3 channels.
        weights_in_checkpoint: set in what a model checkpoint records (:meth:`init_args`): the
            checkpoint holds the weights, so where ``weights`` is missing the network is built
            without them, with a warning, and takes them from that checkpoint. Leave it False
            when building one yourself: a missing file is then an error.
    """

    mean: Tensor  # buffers, (1, C, 1, 1)
    std: Tensor

    def __init__(
        self,
        architecture: str,
        weights: str,
        layer: str,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        weights_in_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        from torchvision.models import get_model
        from torchvision.models.feature_extraction import create_feature_extractor

        path = Path(weights).expanduser()
        network = get_model(architecture, weights=None)
        if weights_in_checkpoint and not path.is_file():
            rank_zero_warn(
                f"Weights file {path} for torchvision's {architecture} not found: the network is built without "
                "weights, which must come from the checkpoint being loaded (a model trained with it holds them)."
            )
        else:
            path = _existing_file(
                weights,
                f"Weights file for torchvision's {architecture}",
                "Nothing is downloaded: save the weights with torch.save(model.state_dict(), path) on a "
                "machine that has them and point `weights` to the file.",
            )
            network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.architecture, self.weights, self.layer = architecture, str(path), layer
        self.extractor = create_feature_extractor(network, return_nodes={layer: "features"})
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.freeze()

    def init_args(self) -> dict[str, object]:
        return {
            "architecture": self.architecture,
            "weights": self.weights,
            "layer": self.layer,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            # A model checkpoint holds the weights: rebuilt from it, the file may be gone.
            "weights_in_checkpoint": True,
        }

    def features(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1 and self.mean.shape[1] == 3:
            x = x.expand(-1, 3, -1, -1)
        return self.extractor((x - self.mean) / self.std)["features"]

"""Convolutional encoder and decoder for images of any size and channel count.

Each level halves the spatial size (kernel 4, stride 2, padding 1: ``H -> floor(H / 2)``); the
decoder mirrors the encoder and asks each transposed convolution for the exact size the
encoder saw, so odd sizes (28, 33, ...) round-trip without cropping or padding tricks.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

from torch import Tensor, nn

from lightning_geco.checks import is_positive_int

__all__ = [
    "ConvDecoder",
    "ConvDownsampler",
    "ConvEncoder",
    "ConvUpsampler",
    "check_image_shape",
    "check_widths",
    "conv_feature_sizes",
]


def conv_feature_sizes(height: int, width: int, num_levels: int) -> list[tuple[int, int]]:
    """Spatial sizes ``[(H, W), (H/2, W/2), ...]`` of the ``num_levels + 1`` feature maps."""
    sizes = [(height, width)]
    for _ in range(num_levels):
        h, w = sizes[-1]
        if h < 2 or w < 2:
            raise ValueError(
                f"Images of size {height}x{width} are too small for {num_levels} stride-2 levels "
                f"(level {len(sizes)} would be {h // 2}x{w // 2}); use fewer widths or larger images."
            )
        sizes.append((h // 2, w // 2))
    return sizes


def check_widths(widths: Sequence[int]) -> list[int]:
    """``widths`` as a list of channel counts; a clear error unless it is one or more positive ints."""
    values = list(widths) if isinstance(widths, Sequence) and not isinstance(widths, str) else []
    if not values or not all(is_positive_int(c) for c in values):
        raise ValueError(
            f"widths must be the channels of one or more stride-2 levels, positive ints (e.g. [32, 64, 64]), got {widths!r}."
        )
    return [operator.index(c) for c in values]


def _check_hidden_dim(hidden_dim: int) -> int:
    if not is_positive_int(hidden_dim):
        raise ValueError(f"hidden_dim must be a positive int (the fully connected layer's width), got {hidden_dim!r}.")
    return operator.index(hidden_dim)


def check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    """``image_shape`` as ``(C, H, W)`` ints; a clear error for anything else."""
    sizes = list(image_shape) if isinstance(image_shape, Iterable) and not isinstance(image_shape, str) else []
    if len(sizes) != 3 or not all(is_positive_int(s) for s in sizes):
        raise ValueError(f"image_shape must be (channels, height, width) of positive ints, got {image_shape!r}.")
    c, h, w = (operator.index(s) for s in sizes)
    return c, h, w


class ConvDownsampler(nn.Module):
    """Feature maps (N, in_channels, H, W) -> (N, widths[-1], H / 2^L, W / 2^L), L = len(widths).

    Attributes:
        sizes: the spatial size at each level, ``[(H, W), ..., (h, w)]``.
    """

    def __init__(self, in_channels: int, height: int, width: int, widths: Sequence[int]) -> None:
        super().__init__()
        widths = check_widths(widths)
        self.sizes = conv_feature_sizes(height, width, len(widths))
        layers: list[nn.Module] = []
        for out_channels in widths:
            layers += [nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1), nn.SiLU()]
            in_channels = out_channels
        self.convs = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.convs(x)


class ConvUpsampler(nn.Module):
    """The mirror of :class:`ConvDownsampler`: (N, widths[-1], h, w) -> (N, out_channels, H, W).

    Each transposed convolution is asked for the exact size the downsampler saw, so odd sizes
    round-trip. The output is unbounded (no final activation).
    """

    def __init__(self, out_channels: int, height: int, width: int, widths: Sequence[int]) -> None:
        super().__init__()
        widths = check_widths(widths)
        self.sizes = conv_feature_sizes(height, width, len(widths))
        channels = widths[-2::-1] + [out_channels]
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1)
            for c_in, c_out in zip(widths[::-1], channels)
        )
        self.activation = nn.SiLU()

    def forward(self, h: Tensor) -> Tensor:
        targets = self.sizes[-2::-1]
        for i, (deconv, size) in enumerate(zip(self.deconvs, targets)):
            h = deconv(h, output_size=list(size))
            if i < len(self.deconvs) - 1:
                h = self.activation(h)
        return h


class ConvEncoder(ConvDownsampler):
    """Image (N, C, H, W) -> feature vector (N, hidden_dim).

    Args:
        image_shape: (C, H, W) of the inputs.
        widths: output channels of each stride-2 level.
        hidden_dim: size of the fully connected layer after the convolutions.
    """

    def __init__(self, image_shape: Sequence[int], widths: Sequence[int] = (32, 32, 64, 64), hidden_dim: int = 256):
        channels, height, width = check_image_shape(image_shape)
        super().__init__(channels, height, width, widths)
        _check_hidden_dim(hidden_dim)
        h, w = self.sizes[-1]
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(widths[-1] * h * w, hidden_dim), nn.SiLU())
        self.out_features = hidden_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(super().forward(x))


class ConvDecoder(ConvUpsampler):
    """Latent (N, latent_dim) -> decoder output (N, C, H, W), unbounded (the likelihood reads it).

    Mirrors :class:`ConvEncoder` with the same ``image_shape``, ``widths`` and ``hidden_dim``.
    """

    def __init__(
        self,
        latent_dim: int,
        image_shape: Sequence[int],
        widths: Sequence[int] = (32, 32, 64, 64),
        hidden_dim: int = 256,
    ):
        channels, height, width = check_image_shape(image_shape)
        super().__init__(channels, height, width, widths)
        _check_hidden_dim(hidden_dim)
        h, w = self.sizes[-1]
        self.top_shape = (widths[-1], h, w)
        self.fc = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, widths[-1] * h * w), nn.SiLU()
        )

    def forward(self, z: Tensor) -> Tensor:
        return super().forward(self.fc(z).view(z.shape[0], *self.top_shape))

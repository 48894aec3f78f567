"""ConvVAE: convolutional encoder and decoder, diagonal-Gaussian posterior, N(0, I) prior."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from lightning_geco.models.base import DiagonalGaussian, VAEModule
from lightning_geco.nets import ConvDecoder, ConvEncoder

__all__ = ["ConvVAE"]


class ConvVAE(VAEModule):
    """Convolutional VAE for images of any size and channel count.

    Args:
        image_shape: (C, H, W); linked from the DataModule by ``train.py``.
        latent_dim: size of z.
        widths: channels of each stride-2 level of the encoder (mirrored by the decoder).
        hidden_dim: width of the fully connected layers.
        kwargs: the base's (objective, likelihood, learning_rate, ...), see
            :class:`~lightning_geco.models.base.VAEModule`; LightningCLI lists them too.
    """

    architecture_keys = ("image_shape", "latent_dim", "widths", "hidden_dim")

    def __init__(
        self,
        image_shape: Sequence[int] = (1, 64, 64),
        latent_dim: int = 10,
        widths: Sequence[int] = (32, 32, 64, 64),
        hidden_dim: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            image_shape=image_shape,
            latent_dim=latent_dim,
            **kwargs,
        )
        self.save_hyperparameters(ignore=["objective", "likelihood"])
        self.encoder = ConvEncoder(self.image_shape, widths, hidden_dim)
        self.posterior_head = nn.Linear(hidden_dim, 2 * latent_dim)
        self.decoder = ConvDecoder(latent_dim, self.image_shape, widths, hidden_dim)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        mean, log_variance = self.posterior_head(self.encoder(x)).chunk(2, dim=1)
        return DiagonalGaussian(mean, log_variance)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

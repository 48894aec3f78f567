"""ConvVAE: convolutional encoder and decoder, diagonal-Gaussian posterior, N(0, I) prior."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_geco.likelihoods import Likelihood
from lightning_geco.models.base import DiagonalGaussian, VAEModule
from lightning_geco.nets import ConvDecoder, ConvEncoder
from lightning_geco.objectives import Objective

__all__ = ["ConvVAE"]


class ConvVAE(VAEModule):
    """Convolutional VAE for images of any size and channel count.

    Args:
        image_shape: (C, H, W); linked from the DataModule by ``train.py``.
        latent_dim: size of z.
        widths: channels of each stride-2 level of the encoder (mirrored by the decoder).
        hidden_dim: width of the fully connected layers.
        objective, likelihood, learning_rate, num_logged_images, marginal_kl_chunk_size,
        iwae_samples, active_unit_threshold, lr_schedule:
            see :class:`~lightning_geco.models.base.VAEModule`.
    """

    architecture_keys = ("image_shape", "latent_dim", "widths", "hidden_dim")

    def __init__(
        self,
        image_shape: Sequence[int] = (1, 64, 64),
        latent_dim: int = 10,
        widths: Sequence[int] = (32, 32, 64, 64),
        hidden_dim: int = 256,
        objective: Objective | None = None,
        likelihood: Likelihood | None = None,
        learning_rate: float = 1e-3,
        num_logged_images: int = 32,
        marginal_kl_chunk_size: int = 256,
        iwae_samples: int = 0,
        active_unit_threshold: float = 0.01,
        lr_schedule: str = "constant",
    ) -> None:
        super().__init__(
            image_shape=image_shape,
            latent_dim=latent_dim,
            objective=objective,
            likelihood=likelihood,
            learning_rate=learning_rate,
            num_logged_images=num_logged_images,
            marginal_kl_chunk_size=marginal_kl_chunk_size,
            iwae_samples=iwae_samples,
            active_unit_threshold=active_unit_threshold,
            lr_schedule=lr_schedule,
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

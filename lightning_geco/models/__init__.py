"""One LightningModule per VAE variant, on the shared :class:`VAEModule` base."""

from lightning_geco.models.base import DiagonalGaussian, VAEModule, VAEOutput
from lightning_geco.models.conv_vae import ConvVAE

__all__ = ["ConvVAE", "DiagonalGaussian", "VAEModule", "VAEOutput"]

"""One LightningModule per VAE variant, on the shared :class:`VAEModule` base."""

from lightning_geco.models.base import DiagonalGaussian, LatentPass, VAEModule, VAEOutput
from lightning_geco.models.conv_draw import ConvDRAW
from lightning_geco.models.conv_vae import ConvVAE
from lightning_geco.models.flow_vae import FlowVAE
from lightning_geco.models.ladder_vae import LadderVAE

__all__ = ["ConvDRAW", "ConvVAE", "DiagonalGaussian", "FlowVAE", "LadderVAE", "LatentPass", "VAEModule", "VAEOutput"]

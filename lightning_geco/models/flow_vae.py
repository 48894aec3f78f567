"""FlowVAE: a ConvVAE whose Gaussian posterior is refined by a normalising flow.

q(z|x) is the law of ``z_K = f_x(z_0)``, ``z_0 ~ N(mean(x), diag(var(x)))``, with ``f_x`` a stack
of conditional affine coupling layers (:mod:`lightning_geco.nets.flows`). Its density is
``log q(z_K|x) = log q_0(z_0|x) - sum_k log |det df_k/dz|``, so the rate has no closed form: it is
the one-sample Monte Carlo KL ``log q(z_K|x) - log N(z_K; 0, I)`` (unbiased; one draw per image).

The aggregate-posterior metrics read the flow's base Gaussian q_0(z_0|x): the only stage whose
density is a diagonal Gaussian (``val/marginal_kl`` here describes z_0, ``val/rate`` the flow).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_geco.distributions import LOG_2PI
from lightning_geco.models.base import DiagonalGaussian, LatentPass, VAEModule
from lightning_geco.nets import ConvDecoder, ConvEncoder
from lightning_geco.nets.flows import CouplingFlow

__all__ = ["FlowVAE"]



class FlowVAE(VAEModule):
    """Convolutional VAE with a coupling-flow posterior (Rezende & Mohamed 2015; Dinh et al. 2017).

    Args:
        flow_depth: number of coupling layers.
        flow_hidden_dim: width of each coupling layer's network.
        image_shape, latent_dim, widths, hidden_dim: as :class:`~lightning_geco.ConvVAE`.
        kwargs: the base's (objective, likelihood, learning_rate, ...), see
            :class:`~lightning_geco.models.base.VAEModule`; LightningCLI lists them too.
    """

    architecture_keys = ("image_shape", "latent_dim", "widths", "hidden_dim", "flow_depth", "flow_hidden_dim")

    def __init__(
        self,
        image_shape: Sequence[int] = (1, 64, 64),
        latent_dim: int = 10,
        widths: Sequence[int] = (32, 32, 64, 64),
        hidden_dim: int = 256,
        flow_depth: int = 4,
        flow_hidden_dim: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_shape=image_shape, latent_dim=latent_dim, **kwargs)
        self.save_hyperparameters(ignore=["objective", "likelihood"])
        self.encoder = ConvEncoder(self.image_shape, widths, hidden_dim)
        self.posterior_head = nn.Linear(hidden_dim, 2 * latent_dim)
        self.flow = CouplingFlow(latent_dim, hidden_dim, flow_depth, flow_hidden_dim)
        self.decoder = ConvDecoder(latent_dim, self.image_shape, widths, hidden_dim)

    def encode_with_context(self, x: Tensor) -> tuple[DiagonalGaussian, Tensor]:
        """The base Gaussian q_0(z_0|x) and the flow's context, (N, hidden_dim)."""
        features = self.encoder(x)
        mean, log_variance = self.posterior_head(features).chunk(2, dim=1)
        return DiagonalGaussian(mean, log_variance), features

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return self.encode_with_context(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def infer(self, x: Tensor) -> LatentPass:
        base, context = self.encode_with_context(x)
        noise = self.reparameterization_noise(x, base)
        if noise is None:
            noise = torch.randn_like(base.mean)
        z0 = base.rsample(noise)
        z, log_det = self.flow(z0, context)
        log_q = -0.5 * (noise.float().pow(2) + base.log_variance.float() + LOG_2PI).sum(dim=1) - log_det
        log_prior = -0.5 * (z.float().pow(2) + LOG_2PI).sum(dim=1)
        return LatentPass(
            decoder_output=self.decode(z),
            rate=log_q - log_prior,
            log_weight=log_prior - log_q,
            posterior=base,
            z=z,
        )

    def posterior_code(self, x: Tensor) -> Tensor:
        """The flow applied to the base mean (the panels' reconstructions and traversals), (N, latent_dim).

        The traversal panel moves these coordinates of z_K but orders them by the per-dimension
        KL of the base posterior z_0 (``val/kl_dim/<j>``): the flow mixes coordinates, so the
        order is a guide to z_0's informative dimensions, not z_K's.
        """
        base, context = self.encode_with_context(x)
        return self.flow(base.mean, context)[0]

"""The diagonal Gaussian every model's latents are built from: its KL, log density and draw.

A leaf module (torch and the metrics' closed-form KL only). Units: nats; shapes (N, ...) with
the batch first, sums over every other dimension.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_geco.metrics import LOG_2PI, gaussian_kl_per_dimension

__all__ = ["LOG_2PI", "DiagonalGaussian", "gaussian_kl", "normal_log_density"]

@dataclass
class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(log_variance))), each of shape (N, latent_dim) or (N, C, h, w)."""

    mean: Tensor
    log_variance: Tensor

    def rsample(self, noise: Tensor | None = None) -> Tensor:
        """Reparameterised draw ``mean + noise * std``; ``noise`` ~ N(0, I) unless given."""
        if noise is None:
            noise = torch.randn_like(self.mean)
        return self.mean + noise * torch.exp(0.5 * self.log_variance)

    def kl_to_standard_normal(self) -> Tensor:
        """KL(q || N(0, I)) in nats, summed over every latent dimension, shape (N,)."""
        return gaussian_kl_per_dimension(self.mean.float(), self.log_variance.float()).flatten(1).sum(dim=1)


    def log_density(self, z: Tensor) -> Tensor:
        """log N(z; mean, diag(var)) summed over every non-batch dimension, nats, shape (N,)."""
        return normal_log_density(z.float(), self.mean.float(), self.log_variance.float()).flatten(1).sum(dim=1)

    def whitened(self, prior: DiagonalGaussian) -> DiagonalGaussian:
        """This Gaussian in the coordinates ``(z - prior.mean) / prior.std``, where the prior is N(0, I).

        KL is invariant under that map, so ``whitened(prior).kl_to_standard_normal()`` equals
        KL(self || prior): models with learned priors hand these to the N(0, I) metrics.
        """
        return DiagonalGaussian(
            (self.mean - prior.mean) * torch.exp(-0.5 * prior.log_variance),
            self.log_variance - prior.log_variance,
        )

    def flatten(self) -> DiagonalGaussian:
        """Every dimension but the batch's flattened: (N, ...) -> (N, d)."""
        return DiagonalGaussian(self.mean.flatten(1), self.log_variance.flatten(1))

    @staticmethod
    def concatenate(parts: Sequence[DiagonalGaussian]) -> DiagonalGaussian:
        """Independent Gaussians side by side, each (N, ...) flattened: (N, sum of sizes)."""
        flat = [part.flatten() for part in parts]
        return DiagonalGaussian(torch.cat([f.mean for f in flat], 1), torch.cat([f.log_variance for f in flat], 1))


def normal_log_density(z: Tensor, mean: Tensor, log_variance: Tensor) -> Tensor:
    """Elementwise log N(z; mean, exp(log_variance)), nats, broadcast shape."""
    return -0.5 * ((z - mean).pow(2) * torch.exp(-log_variance) + log_variance + LOG_2PI)


def gaussian_kl(q: DiagonalGaussian, p: DiagonalGaussian) -> Tensor:
    """KL(q || p) of diagonal Gaussians of the same shape (N, ...), summed per example, nats, (N,)."""
    q_lv, p_lv = q.log_variance.float(), p.log_variance.float()
    kl = 0.5 * (p_lv - q_lv + (q_lv.exp() + (q.mean.float() - p.mean.float()).pow(2)) * torch.exp(-p_lv) - 1.0)
    return kl.flatten(1).sum(dim=1)

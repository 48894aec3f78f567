"""The per-pass records: what one stochastic pass through a model hands to the objective,
the constraints and the metrics.

A leaf module above :mod:`lightning_geco.distributions`. :meth:`VAEOutput.from_terms` builds
one from a user's own model's tensors, for :meth:`~lightning_geco.objectives.GECOObjective.lagrangian`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_geco.distributions import DiagonalGaussian

__all__ = ["LatentPass", "VAEOutput"]


@dataclass
class LatentPass:
    """One stochastic pass through a variant's latent variables, for a batch of N images.

    Attributes:
        decoder_output: (N, C, H, W), what the likelihood reads.
        rate: KL(q(z|x) || p(z)) in nats per image, (N,): closed form where the model has one,
            else a one-sample Monte Carlo estimate.
        log_weight: ``log p(z) - log q(z|x)`` at this pass's sample, nats, (N,); the importance
            weight of the IWAE bound (its negative is the one-sample rate estimate).
        posterior: the diagonal Gaussian the aggregate-posterior metrics read, against an
            N(0, I) prior, (N, d); each variant says what it is.
        z: the sampled code, (N, ...).
        rate_terms: the parts of the rate (per layer, per step), each (N,), summing to ``rate``;
            empty for a single-part rate. Logged as ``<stage>/rate/<name>``.
    """

    decoder_output: Tensor
    rate: Tensor
    log_weight: Tensor
    posterior: DiagonalGaussian
    z: Tensor
    rate_terms: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class VAEOutput:
    """One forward pass: the per-image terms every objective and metric reads."""

    x: Tensor
    decoder_output: Tensor
    reconstruction: Tensor
    posterior: DiagonalGaussian
    z: Tensor
    rate: Tensor
    distortion: Tensor
    log_likelihood: Tensor
    rate_terms: dict[str, Tensor] = field(default_factory=dict)
    labels: Tensor | None = None

    @property
    def elbo(self) -> Tensor:
        """Unit-weight ELBO, nats per image, shape (N,)."""
        return self.log_likelihood - self.rate

    @classmethod
    def from_terms(
        cls,
        x: Tensor,
        reconstruction: Tensor,
        rate: Tensor,
        labels: Tensor | None = None,
        decoder_output: Tensor | None = None,
    ) -> VAEOutput:
        """The record of a model that is not one of ours, from the tensors any VAE has.

        Args:
            x: the data, (N, ...) in any shape and units.
            reconstruction: the model's reconstruction of ``x``, same shape and units.
            rate: KL(q(z|x) || p(z)) per example, nats, (N,).
            labels: per-example labels, for a classification constraint.
            decoder_output: what a Bernoulli constraint reads as logits (default: ``reconstruction``).

        ``distortion`` is the per-element MSE (mean over every non-batch dimension), in the
        data's units squared. What this record does not know stays empty: ``posterior`` and
        ``z`` have zero latent dimensions, ``log_likelihood`` is NaN (no likelihood was stated),
        so only GECO's Lagrangian, not an ELBO objective, can be built from it.
        """
        if x.dim() < 2:
            raise ValueError(
                f"x must be (N, ...) with N examples first and at least one value each, got shape {tuple(x.shape)}: "
                "for one scalar per example pass x.unsqueeze(1) (shape (N, 1)), and the reconstruction alike."
            )
        if x.shape != reconstruction.shape:
            raise ValueError(
                f"x and reconstruction must have the same shape (N, ...) with N examples first, got "
                f"{tuple(x.shape)} and {tuple(reconstruction.shape)}."
            )
        if rate.shape != (x.shape[0],):
            raise ValueError(f"rate must hold one KL per example, shape ({x.shape[0]},), got {tuple(rate.shape)}.")
        # fp32 before squaring: per-example sums overflow fp16 under autocast.
        distortion = (reconstruction.float() - x.float()).pow(2).flatten(1).mean(dim=1)
        empty = x.new_zeros(x.shape[0], 0)
        return cls(
            x=x,
            decoder_output=reconstruction if decoder_output is None else decoder_output,
            reconstruction=reconstruction,
            posterior=DiagonalGaussian(empty, empty),
            z=empty,
            rate=rate,
            distortion=distortion,
            log_likelihood=torch.full_like(rate, float("nan")),
            labels=labels,
        )

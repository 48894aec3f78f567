"""Decoder likelihoods p(x | z) for ELBO reporting and ELBO-type objectives.

A decoder outputs one tensor of the image's shape (N, C, H, W); the likelihood says how to
read it: its ``mean`` (the reconstruction, in data units) and its ``log_prob`` of the data in
nats per image (summed over C, H, W).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_geco.rebuild import Rebuildable

__all__ = ["BernoulliLikelihood", "GaussianLikelihood", "Likelihood", "binary_entropy"]


def binary_entropy(x: Tensor) -> Tensor:
    """Each element's binary entropy ``-(x ln x + (1 - x) ln(1 - x))`` in nats, x in [0, 1] (0 at 0 and 1):
    the least binary cross-entropy any Bernoulli reconstruction of x can reach."""
    p = x.float().clamp(1e-7, 1 - 1e-7)
    return -(p * p.log() + (1 - p) * (1 - p).log())


class Likelihood(Rebuildable, nn.Module):
    """Interface: how to read a decoder output as a distribution over images."""

    def mean(self, decoder_output: Tensor) -> Tensor:
        """The reconstruction E[x | z], shape (N, C, H, W)."""
        raise NotImplementedError

    def log_prob(self, x: Tensor, decoder_output: Tensor) -> Tensor:
        """log p(x | z) in nats per image, shape (N,)."""
        raise NotImplementedError

    def check_data(self, x: Tensor) -> None:
        """Warn when images x (N, C, H, W), the first training batch, are data this likelihood
        does not describe (its ``log_prob``, and so ``val/elbo``, would mean something else)."""


class GaussianLikelihood(Likelihood):
    """Gaussian with the decoder output as mean (unbounded, no sigmoid) and a scalar std.

    Args:
        sigma: standard deviation in data units (initial value when learned).
        learn_sigma: learn ``log sigma`` by gradient descent (one scalar shared by all pixels).
    """

    def __init__(self, sigma: float = 0.1, learn_sigma: bool = False) -> None:
        super().__init__()
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"GaussianLikelihood sigma must be positive and finite (data units), got {sigma!r}.")
        log_sigma = torch.tensor(math.log(sigma), dtype=torch.float32)
        if learn_sigma:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> GaussianLikelihood:
        # A cast of the whole module to half precision (bf16-true, 16-true call module.to(dtype))
        # would round log sigma: ln 0.1 to -2.297 in bf16, sigma 0.1006, val/elbo 23 nats off per
        # 64x64 image. Moves keep the device; log sigma stays fp32 (log_prob computes in fp32).
        before = self.log_sigma.detach().clone()
        super()._apply(fn, recurse)
        moved = self.log_sigma
        if moved.dtype in (torch.float16, torch.bfloat16) and before.dtype == torch.float32:
            kept = before.to(moved.device)
            if isinstance(moved, nn.Parameter):
                moved.data = kept
            else:
                self._buffers["log_sigma"] = kept
        return self

    def init_args(self) -> dict[str, object]:
        # The current sigma: a learned one comes back from the state dict anyway.
        return {"sigma": float(self.log_sigma.detach().exp()), "learn_sigma": isinstance(self.log_sigma, nn.Parameter)}

    def mean(self, decoder_output: Tensor) -> Tensor:
        return decoder_output

    def log_prob(self, x: Tensor, decoder_output: Tensor) -> Tensor:
        log_sigma = self.log_sigma.float()
        squared_error = (x.float() - decoder_output.float()).pow(2).flatten(1).sum(dim=1)
        num_elements = math.prod(x.shape[1:])
        return -0.5 * squared_error * torch.exp(-2.0 * log_sigma) - num_elements * (
            log_sigma + 0.5 * math.log(2.0 * math.pi)
        )


class BernoulliLikelihood(Likelihood):
    """Bernoulli with the decoder output as logits; for binary images.

    On grey images in [0, 1] ``log_prob`` (minus the binary cross-entropy) is no normalised
    density: ``val/elbo`` and ``val/iwae`` then bound no log-likelihood and carry the data's own
    binary entropy (Fashion-MNIST: 0.24 nats per pixel, 187 nats per image), so they compare
    with no published binary-MNIST ELBO and no Gaussian run. Warned on the first training batch.
    """

    def check_data(self, x: Tensor) -> None:
        x = x.detach().float()
        grey = (x > 0) & (x < 1)
        if bool(grey.any()):
            entropy = float(binary_entropy(x).flatten(1).sum(dim=1).mean())
            rank_zero_warn(
                f"BernoulliLikelihood reads binary images, but {float(grey.float().mean()):.1%} of the first training "
                f"batch's pixels lie strictly between 0 and 1: log p(x|z) is then no normalised density, so val/elbo "
                f"and val/iwae bound no log-likelihood and include the data's own binary entropy ({entropy:.1f} nats "
                "per image on this batch). Binarize the data (--data.binarize true) for a binary-image ELBO, or use "
                "GaussianLikelihood."
            )

    def mean(self, decoder_output: Tensor) -> Tensor:
        return torch.sigmoid(decoder_output)

    def log_prob(self, x: Tensor, decoder_output: Tensor) -> Tensor:
        bce = F.binary_cross_entropy_with_logits(decoder_output.float(), x.float(), reduction="none")
        return -bce.flatten(1).sum(dim=1)

"""torchmetrics Metrics over the aggregate posterior of an evaluated set.

Estimator of the marginal KL (``AggregatePosteriorKL``)
-------------------------------------------------------
Over an evaluated set of N images with diagonal-Gaussian posteriors q(z|x_n), the aggregate
posterior is the mixture ``q(z) = 1/N sum_n q(z|x_n)``. For each n we draw one
``z_n ~ q(z|x_n)`` (so the z_n are draws from q(z)) and estimate the mutual information
``I(x; z) = mean_n [log q(z_n|x_n) - log q(z_n)]``, where
``log q(z_n) = logsumexp_m log q(z_n|x_m) - log N`` is computed exactly over all N mixture
components, in chunks of rows so memory stays O(chunk_size * N). The marginal KL follows
from the exact identity ``KL(q(z) || p(z)) = E_n[KL(q(z|x_n) || p(z))] - I(x; z)``, with the
first term (the mean rate) in closed form. Units: nats per image.

Bias, stated plainly: for the mixture of the evaluated set the estimate is unbiased (only
Monte Carlo noise from the N draws). As an estimate for the *population* aggregate posterior
it is biased: the empirical mixture is a finite sample, and the mutual information estimate can
never exceed ``log N`` (``log q(z_n) >= log q(z_n|x_n) - log N``), so the marginal KL is at
least ``rate - log N``. Expect the information to be underestimated (and the marginal KL
overestimated) once it nears ``log N``; compare runs on evaluated sets of the same size.

The draws use a fixed seed, so the estimate is a deterministic function of the posteriors and
equal on every DDP rank (states are gathered with ``dist_reduce_fx="cat"``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["AggregatePosteriorKL", "log_aggregate_posterior"]


def log_aggregate_posterior(z: Tensor, mean: Tensor, log_variance: Tensor, chunk_size: int = 1024) -> Tensor:
    """``log q(z_i)`` for the mixture ``q = 1/N sum_n N(mean_n, diag(exp(log_variance_n)))``.

    Args:
        z: points, shape (M, d).
        mean, log_variance: the N components, shape (N, d) each.
        chunk_size: rows of z per chunk; memory is O(chunk_size * N).

    Returns:
        Shape (M,), float64, nats.
    """
    z, mean, log_variance = z.double(), mean.double(), log_variance.double()
    n, d = mean.shape
    precision = torch.exp(-log_variance)  # (N, d)
    # (z - m)^2 / v expanded into matrix products: O(M * N) memory instead of O(M * N * d).
    mean_term = (mean.pow(2) * precision).sum(dim=1)  # (N,)
    log_norm = -0.5 * (log_variance.sum(dim=1) + d * math.log(2 * math.pi))  # (N,)
    out = []
    for start in range(0, z.shape[0], chunk_size):
        zc = z[start : start + chunk_size]
        quad = zc.pow(2) @ precision.T - 2.0 * zc @ (mean * precision).T + mean_term
        log_q = log_norm - 0.5 * quad.clamp_min(0.0)
        out.append(torch.logsumexp(log_q, dim=1) - math.log(n))
    return torch.cat(out)


class AggregatePosteriorKL(Metric):
    """Marginal KL(q(z) || p(z)), mutual information and mean rate over an evaluated set.

    ``update(mean, log_variance)`` with the posteriors of a batch, shape (B, d) each;
    ``compute()`` returns ``{"marginal_kl", "mutual_info", "rate"}`` in nats per image
    (see the module docstring for the estimator and its bias). p(z) = N(0, I).

    Args:
        chunk_size: rows per chunk of the N x N computation.
        seed: seed of the draws z_n ~ q(z|x_n).
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, chunk_size: int = 1024, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
        self.chunk_size = chunk_size
        self.seed = seed
        self.add_state("means", default=[], dist_reduce_fx="cat")
        self.add_state("log_variances", default=[], dist_reduce_fx="cat")

    def update(self, mean: Tensor, log_variance: Tensor) -> None:
        if mean.shape != log_variance.shape or mean.dim() != 2:
            raise ValueError(
                f"mean and log_variance must both be (batch, latent_dim), got {tuple(mean.shape)} "
                f"and {tuple(log_variance.shape)}."
            )
        self.means.append(mean.detach().float())
        self.log_variances.append(log_variance.detach().float())

    def compute(self) -> dict[str, Tensor]:
        mean = dim_zero_cat(self.means).double()
        log_variance = dim_zero_cat(self.log_variances).double()
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float64).to(mean.device)
        z = mean + noise * torch.exp(0.5 * log_variance)
        log_q_z = log_aggregate_posterior(z, mean, log_variance, self.chunk_size)
        log_q_z_given_x = -0.5 * (noise.pow(2) + log_variance + math.log(2 * math.pi)).sum(dim=1)
        mutual_info = (log_q_z_given_x - log_q_z).mean()
        rate = 0.5 * (mean.pow(2) + log_variance.exp() - 1.0 - log_variance).sum(dim=1).mean()
        marginal_kl = rate - mutual_info
        return {
            "marginal_kl": marginal_kl.float(),
            "mutual_info": mutual_info.float(),
            "rate": rate.float(),
        }

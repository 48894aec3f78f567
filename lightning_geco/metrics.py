"""torchmetrics Metrics of the latent space over an evaluated set (correct under DDP).

All values are in nats per image (or per image and latent dimension), p(z) = N(0, I), and the
posteriors q(z|x_n) = N(mean_n, diag(exp(log_variance_n))) are diagonal Gaussians.

Aggregate posterior (``AggregatePosteriorKL``)
----------------------------------------------
Over an evaluated set of N images the aggregate posterior is the mixture
``q(z) = 1/N sum_n q(z|x_n)``. For each n we draw one ``z_n ~ q(z|x_n)`` (so the z_n are draws
from q(z)) and evaluate, exactly over all N mixture components, ``log q(z_n)`` and the
per-dimension marginals ``log q(z_nj)`` (in chunks of rows: memory O(chunk_size * N)). Then

- mutual information ``I(x; z) = mean_n [log q(z_n|x_n) - log q(z_n)]``;
- marginal KL ``KL(q(z) || p(z)) = E_n[KL(q(z|x_n) || p(z))] - I(x; z)`` (an exact identity,
  the first term, the mean rate, in closed form);
- dimension-wise KL ``sum_j KL(q(z_j) || p(z_j)) = mean_n sum_j [log q(z_nj) - log p(z_nj)]``;
- total correlation ``TC = KL(q(z) || prod_j q(z_j)) = marginal KL - dimension-wise KL``.

So ``rate = mutual_info + total_correlation + dimensionwise_kl`` holds exactly (the standard
decomposition of the average KL, Hoffman & Johnson 2016; Chen et al. 2018).

Bias, stated plainly: for the mixture of the evaluated set the estimates are unbiased up to
Monte Carlo noise from the N draws. For the *population* aggregate posterior they are biased:
the empirical mixture is a finite sample, and the mutual information estimate can never exceed
``log N`` (``log q(z_n) >= log q(z_n|x_n) - log N``), so the marginal KL is at least
``rate - log N``. Expect the information to be underestimated (and the marginal KL
overestimated) once it nears ``log N``; compare runs on evaluated sets of the same size.

The draws use a fixed seed, so an estimate is a deterministic function of the posteriors and
equal on every DDP rank (states are gathered with ``dist_reduce_fx="cat"``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["AggregatePosteriorKL", "LatentActivity", "aggregate_log_densities", "gaussian_kl_per_dimension"]

_LOG_2PI = math.log(2 * math.pi)


def gaussian_kl_per_dimension(mean: Tensor, log_variance: Tensor) -> Tensor:
    """KL(N(mean, exp(log_variance)) || N(0, 1)) per example and dimension, nats, same shape."""
    return 0.5 * (mean.pow(2) + log_variance.exp() - 1.0 - log_variance)


def aggregate_log_densities(
    z: Tensor, mean: Tensor, log_variance: Tensor, chunk_size: int = 256
) -> tuple[Tensor, Tensor]:
    """``log q(z_i)`` and ``log q(z_ij)`` for the mixture ``q = 1/N sum_n N(mean_n, diag(var_n))``.

    Args:
        z: points, shape (M, d).
        mean, log_variance: the N components, shape (N, d) each.
        chunk_size: rows of z per chunk; memory is O(chunk_size * N).

    Returns:
        ``(log_q, log_q_per_dim)`` of shapes (M,) and (M, d), float64, nats.
    """
    z, mean, log_variance = z.double(), mean.double(), log_variance.double()
    n, d = mean.shape
    precision = torch.exp(-log_variance)
    log_norm = -0.5 * (log_variance + _LOG_2PI)  # (N, d)
    joint, marginals = [], []
    for start in range(0, z.shape[0], chunk_size):
        zc = z[start : start + chunk_size]
        total = torch.zeros(zc.shape[0], n, dtype=torch.float64, device=z.device)
        per_dim = []
        for j in range(d):
            log_q_j = log_norm[:, j] - 0.5 * (zc[:, j : j + 1] - mean[:, j]).pow(2) * precision[:, j]  # (chunk, N)
            total += log_q_j
            per_dim.append(torch.logsumexp(log_q_j, dim=1))
        joint.append(torch.logsumexp(total, dim=1))
        marginals.append(torch.stack(per_dim, dim=1))
    return torch.cat(joint) - math.log(n), torch.cat(marginals) - math.log(n)


class AggregatePosteriorKL(Metric):
    """Marginal KL, mutual information, total correlation and dimension-wise KL over an evaluated set.

    ``update(mean, log_variance)`` with the posteriors of a batch, shape (B, d) each;
    ``compute()`` returns ``{"marginal_kl", "mutual_info", "total_correlation",
    "dimensionwise_kl", "rate"}`` in nats per image (see the module docstring for the
    estimators and their bias).

    Args:
        chunk_size: rows per chunk of the N x N computation (bounds memory to O(chunk_size * N)).
        seed: seed of the draws z_n ~ q(z|x_n).
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, chunk_size: int = 256, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
        self.chunk_size = chunk_size
        self.seed = seed
        self.add_state("means", default=[], dist_reduce_fx="cat")
        self.add_state("log_variances", default=[], dist_reduce_fx="cat")

    def update(self, mean: Tensor, log_variance: Tensor) -> None:
        _check_posteriors(mean, log_variance)
        self.means.append(mean.detach().float())
        self.log_variances.append(log_variance.detach().float())

    def compute(self) -> dict[str, Tensor]:
        mean = dim_zero_cat(self.means).double()
        log_variance = dim_zero_cat(self.log_variances).double()
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float64).to(mean.device)
        z = mean + noise * torch.exp(0.5 * log_variance)
        log_q_z, log_q_zj = aggregate_log_densities(z, mean, log_variance, self.chunk_size)
        log_q_z_given_x = -0.5 * (noise.pow(2) + log_variance + _LOG_2PI).sum(dim=1)
        log_p_zj = -0.5 * (z.pow(2) + _LOG_2PI)
        mutual_info = (log_q_z_given_x - log_q_z).mean()
        rate = gaussian_kl_per_dimension(mean, log_variance).sum(dim=1).mean()
        marginal_kl = rate - mutual_info
        dimensionwise_kl = (log_q_zj - log_p_zj).sum(dim=1).mean()
        return {
            "marginal_kl": marginal_kl.float(),
            "mutual_info": mutual_info.float(),
            "total_correlation": (marginal_kl - dimensionwise_kl).float(),
            "dimensionwise_kl": dimensionwise_kl.float(),
            "rate": rate.float(),
        }


class LatentActivity(Metric):
    """Per-dimension KL and active units over an evaluated set (sum states: cheap under DDP).

    ``compute()`` returns ``kl_per_dim`` (d,) in nats per image (summing to the mean rate),
    ``mean_variance`` (d,): the variance over the set of the posterior mean, and
    ``active_units``: how many dimensions have ``mean_variance > threshold`` (Burda et al.
    2016 use 0.01).
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, threshold: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {threshold!r}.")
        self.threshold = threshold
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_mean", default=torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_mean_sq", default=torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_kl", default=torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, mean: Tensor, log_variance: Tensor) -> None:
        _check_posteriors(mean, log_variance)
        mean, log_variance = mean.detach().double(), log_variance.detach().double()
        if self.sum_mean.numel() == 0:
            zeros = torch.zeros(mean.shape[1], dtype=torch.float64, device=mean.device)
            self.sum_mean, self.sum_mean_sq, self.sum_kl = zeros, zeros.clone(), zeros.clone()
        self.count += mean.shape[0]
        self.sum_mean += mean.sum(dim=0)
        self.sum_mean_sq += mean.pow(2).sum(dim=0)
        self.sum_kl += gaussian_kl_per_dimension(mean, log_variance).sum(dim=0)

    def compute(self) -> dict[str, Tensor]:
        average = self.sum_mean / self.count
        mean_variance = (self.sum_mean_sq / self.count - average.pow(2)).clamp_min(0.0)
        return {
            "kl_per_dim": (self.sum_kl / self.count).float(),
            "mean_variance": mean_variance.float(),
            "active_units": (mean_variance > self.threshold).sum(),
        }


def _check_posteriors(mean: Tensor, log_variance: Tensor) -> None:
    if mean.shape != log_variance.shape or mean.dim() != 2:
        raise ValueError(
            f"mean and log_variance must both be (batch, latent_dim), got {tuple(mean.shape)} "
            f"and {tuple(log_variance.shape)}."
        )

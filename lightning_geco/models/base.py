"""The shared LightningModule of every VAE variant.

A variant implements :meth:`VAEModule.encode` and :meth:`VAEModule.decode` (and, when its
posterior is not a diagonal Gaussian, :meth:`VAEModule.posterior`); this base does the rest:
the per-image terms, the objective, the logging under the names of DESIGN.md, the
aggregate-posterior metrics and the image panels.

Units: images in [0, 1], shape (N, C, H, W). ``rate`` is KL(q(z|x) || p(z)) in nats per
image; ``distortion`` is the per-element MSE of the reconstruction (the likelihood's mean);
``log_likelihood`` is log p(x|z) in nats per image; ``elbo = log_likelihood - rate``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_geco.callbacks import is_logging_step
from lightning_geco.likelihoods import GaussianLikelihood, Likelihood
from torchmetrics import MeanMetric

from lightning_geco.metrics import AggregatePosteriorKL, LatentActivity, gaussian_kl_per_dimension
from lightning_geco.objectives import GECOObjective, Objective
from lightning_geco.panels import (
    log_image_grid,
    rate_distortion_figure,
    reconstruction_grid,
    sample_grid,
    traversal_grid,
)

__all__ = ["DiagonalGaussian", "VAEModule", "VAEOutput"]


@dataclass
class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(log_variance))), each of shape (N, latent_dim)."""

    mean: Tensor
    log_variance: Tensor

    def rsample(self, noise: Tensor | None = None) -> Tensor:
        """Reparameterised draw ``mean + noise * std``; ``noise`` ~ N(0, I) unless given."""
        if noise is None:
            noise = torch.randn_like(self.mean)
        return self.mean + noise * torch.exp(0.5 * self.log_variance)

    def kl_to_standard_normal(self) -> Tensor:
        """KL(q || N(0, I)) in nats, summed over latent dimensions, shape (N,)."""
        return gaussian_kl_per_dimension(self.mean.float(), self.log_variance.float()).sum(dim=1)


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

    @property
    def elbo(self) -> Tensor:
        """Unit-weight ELBO, nats per image, shape (N,)."""
        return self.log_likelihood - self.rate


def batch_images(batch: Any) -> Tensor:
    """The image tensor of a batch: a tensor, the first item of a tuple/list, or ``batch["image"]``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("image"), Tensor):
        return batch["image"]
    raise TypeError(
        f"Cannot find images in a batch of type {type(batch).__name__}: expected a tensor, "
        "a tuple/list whose first item is the image tensor, or a dict with key 'image'."
    )


def _as_comparable(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


class VAEModule(pl.LightningModule):
    """Base LightningModule of the VAE collection.

    Args:
        image_shape: (C, H, W) of the images the model is built for.
        latent_dim: size of z.
        objective: what the loss is (default: GECO with per-element MSE at most 0.01).
        likelihood: how the decoder output is read (default: Gaussian, sigma 0.1); used for the
            reconstruction (its mean) and the ELBO.
        learning_rate: Adam's learning rate.
        num_logged_images: images in the ``val/reconstructions`` and ``val/samples`` panels.
        marginal_kl_chunk_size: rows per chunk of the marginal-KL estimator (bounds its memory).
        iwae_samples: K of the importance-weighted bound ``val/iwae`` on log p(x) (0: not computed;
            it costs K decoder passes per validation batch).
        active_unit_threshold: variance of the posterior mean above which a latent dimension
            counts as active (``val/active_units``).
        lr_schedule: ``"constant"``, or ``"cosine"``: anneal to 5% of the rate at ``max_steps``.
            As the model stops improving, GECO's multiplier catches up with it and the
            constraint ends close to its tolerance instead of trailing below it.
    """

    #: hyperparameters that fix the parameter shapes; a checkpoint must agree on all of them
    architecture_keys: tuple[str, ...] = ("image_shape", "latent_dim")

    def __init__(
        self,
        image_shape: Sequence[int] = (1, 64, 64),
        latent_dim: int = 10,
        objective: Objective | None = None,
        likelihood: Likelihood | None = None,
        learning_rate: float = 1e-3,
        num_logged_images: int = 32,
        marginal_kl_chunk_size: int = 256,
        iwae_samples: int = 0,
        active_unit_threshold: float = 0.01,
        lr_schedule: str = "constant",
    ) -> None:
        super().__init__()
        if len(image_shape) != 3 or any(int(s) < 1 for s in image_shape):
            raise ValueError(f"image_shape must be (channels, height, width) of positive ints, got {image_shape!r}.")
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}.")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate!r}.")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}.")
        if iwae_samples < 0:
            raise ValueError(f"iwae_samples must be >= 0 (0 turns the bound off), got {iwae_samples!r}.")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.latent_dim = int(latent_dim)
        self.objective = objective if objective is not None else GECOObjective()
        self.likelihood = likelihood if likelihood is not None else GaussianLikelihood()
        self.learning_rate = learning_rate
        self.num_logged_images = num_logged_images
        self.iwae_samples = iwae_samples
        self.lr_schedule = lr_schedule
        self.aggregate_posterior = AggregatePosteriorKL(chunk_size=marginal_kl_chunk_size)
        self.latent_activity = LatentActivity(threshold=active_unit_threshold)
        self.validation_distortion = MeanMetric()
        self._rate_distortion_history: list[tuple[int, float, float]] = []
        self._panel_batch: Tensor | None = None
        self._checked_range = False

    # ------------------------------------------------------------- variants
    def encode(self, x: Tensor) -> DiagonalGaussian:
        """q(z|x) for images (N, C, H, W)."""
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        """Decoder output (N, C, H, W) for latents (N, latent_dim); the likelihood reads it."""
        raise NotImplementedError

    # ------------------------------------------------------------ the model
    def check_images(self, x: Tensor, check_range: bool = False) -> None:
        """Raise a clear error for images of the wrong shape (and, optionally, outside [0, 1])."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"{type(self).__name__} was built for images of shape (N, {', '.join(map(str, self.image_shape))}), "
                f"got a batch of shape {tuple(x.shape)}. Set the model's image_shape to the data's."
            )
        if check_range:
            low, high = float(x.min()), float(x.max())
            if low < 0.0 or high > 1.0 or math.isnan(low) or math.isnan(high):
                raise ValueError(
                    f"Images must lie in [0, 1] (the tolerances are stated in those units), got values in "
                    f"[{low:g}, {high:g}]. Rescale the data (e.g. torchvision's ToTensor) before the model."
                )

    def reparameterization_noise(self, x: Tensor, posterior: DiagonalGaussian) -> Tensor | None:
        """The N(0, I) noise of z = mean + noise * std; None draws it from torch's RNG.

        Override to make the draws a function of the data (tests comparing a 2-rank DDP run
        with a 1-process run use this so both see the same noise for the same example).
        """
        return None

    def forward(self, x: Tensor) -> VAEOutput:
        posterior = self.encode(x)
        z = posterior.rsample(self.reparameterization_noise(x, posterior))
        decoder_output = self.decode(z)
        reconstruction = self.likelihood.mean(decoder_output)
        # fp32 before squaring: per-image sums overflow fp16 under autocast.
        distortion = (reconstruction.float() - x.float()).pow(2).flatten(1).mean(dim=1)
        return VAEOutput(
            x=x,
            decoder_output=decoder_output,
            reconstruction=reconstruction,
            posterior=posterior,
            z=z,
            rate=posterior.kl_to_standard_normal(),
            distortion=distortion,
            log_likelihood=self.likelihood.log_prob(x, decoder_output),
        )

    @torch.no_grad()
    def importance_weighted_bound(self, x: Tensor, num_samples: int) -> Tensor:
        """IWAE bound (Burda et al. 2016) on log p(x) with K = ``num_samples``, nats per image, (N,).

        ``log 1/K sum_k p(x|z_k) p(z_k) / q(z_k|x)`` with z_k ~ q(z|x): equal to the ELBO in
        expectation at K = 1, non-decreasing in K in expectation, -> log p(x) as K -> inf.
        """
        posterior = self.encode(x)
        mean, log_variance = posterior.mean.float(), posterior.log_variance.float()
        log_weights = []
        for _ in range(num_samples):
            noise = torch.randn_like(mean)
            z = mean + noise * torch.exp(0.5 * log_variance)
            log_q = -0.5 * (noise.pow(2) + log_variance + math.log(2 * math.pi)).sum(dim=1)
            log_prior = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(dim=1)
            log_weights.append(self.likelihood.log_prob(x, self.decode(z.to(posterior.mean.dtype))) + log_prior - log_q)
        return torch.logsumexp(torch.stack(log_weights), dim=0) - math.log(num_samples)

    @torch.no_grad()
    def sample(self, num_samples: int) -> Tensor:
        """Images decoded from z ~ p(z), shape (num_samples, C, H, W), as the likelihood's mean."""
        z = torch.randn(num_samples, self.latent_dim, device=self.device)
        return self.likelihood.mean(self.decode(z))

    # ------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch_images(batch)
        self.check_images(x, check_range=not self._checked_range)
        self._checked_range = True
        output = self(x)
        loss = self.objective(output)
        if is_logging_step(self.trainer):
            self._log_terms("train", output, loss, on_step=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = batch_images(batch)
        self.check_images(x, check_range=batch_idx == 0)
        output = self(x)
        loss = self.objective(output)
        self._log_terms("val", output, loss, on_step=False)
        posterior = output.posterior
        self.aggregate_posterior.update(posterior.mean, posterior.log_variance)
        self.latent_activity.update(posterior.mean, posterior.log_variance)
        self.validation_distortion.update(output.distortion)
        if self.iwae_samples:
            iwae = self.importance_weighted_bound(x, self.iwae_samples)
            self.log("val/iwae", iwae.mean(), on_epoch=True, sync_dist=True, batch_size=x.shape[0])
        if batch_idx == 0:
            self._panel_batch = x[: self.num_logged_images]

    def on_validation_epoch_end(self) -> None:
        # Metrics gather every rank's states, so these cover the whole validation set and are
        # the same on every rank; no sync_dist needed.
        estimates = self.aggregate_posterior.compute()
        activity = self.latent_activity.compute()
        distortion = self.validation_distortion.compute()
        for metric in (self.aggregate_posterior, self.latent_activity, self.validation_distortion):
            metric.reset()
        for key in ("marginal_kl", "mutual_info", "total_correlation", "dimensionwise_kl"):
            self.log(f"val/{key}", estimates[key])
        self.log("val/active_units", activity["active_units"].float())
        for j, kl in enumerate(activity["kl_per_dim"]):
            self.log(f"val/kl_dim/{j}", kl)
        if self.trainer.sanity_checking:
            self._panel_batch = None
            return
        self._rate_distortion_history.append((self.global_step, float(estimates["rate"]), float(distortion)))
        if self._panel_batch is not None:
            self._log_panels(self._panel_batch, activity["kl_per_dim"])
        self._panel_batch = None

    def _log_terms(self, stage: str, output: VAEOutput, loss: Tensor | None, on_step: bool) -> None:
        # Step-level training values are rank-local (a collective per scalar per step is not
        # worth it); epoch-level validation values are reduced over all ranks.
        sync = not on_step
        terms = {
            f"{stage}/distortion": output.distortion.mean(),
            f"{stage}/rate": output.rate.mean(),
            f"{stage}/elbo": output.elbo.mean(),
        }
        if loss is not None:
            terms[f"{stage}/loss"] = loss.detach()
        batch_size = output.x.shape[0]
        self.log_dict(terms, on_step=on_step, on_epoch=not on_step, sync_dist=sync, batch_size=batch_size)

    @torch.no_grad()
    def latent_traversal(self, x: Tensor, dims: Sequence[int], steps: int = 9, span: float = 2.5) -> Tensor:
        """Decoded images, shape (len(dims) * steps, C, H, W): row r moves z[dims[r]] over
        ``[-span, span]`` with the other coordinates at the posterior mean of ``x`` (1, C, H, W)."""
        mean = self.encode(x[:1]).mean
        values = torch.linspace(-span, span, steps, device=mean.device, dtype=mean.dtype)
        z = mean.repeat(len(dims) * steps, 1)
        for row, dim in enumerate(dims):
            z[row * steps : (row + 1) * steps, dim] = values
        return self.likelihood.mean(self.decode(z))

    @torch.no_grad()
    def _log_panels(self, x: Tensor, kl_per_dim: Tensor) -> None:
        # Panels decode the posterior mean (what a user means by "the reconstruction"); the
        # logged distortion samples z, as the constraint does.
        step = self.global_step
        reconstruction = self.likelihood.mean(self.decode(self.encode(x).mean))
        log_image_grid(self.loggers, "val/reconstructions", reconstruction_grid(x, reconstruction), step)
        log_image_grid(self.loggers, "val/samples", sample_grid(self.sample(x.shape[0])), step)
        dims = torch.argsort(kl_per_dim, descending=True)[:10].tolist()  # most informative first
        log_image_grid(self.loggers, "val/traversals", traversal_grid(self.latent_traversal(x, dims)), step)
        figure = rate_distortion_figure(self._rate_distortion_history, self.distortion_tolerance())
        log_image_grid(self.loggers, "val/rate_distortion", figure, step)

    def distortion_tolerance(self) -> float | None:
        """The MSE tolerance of a reconstruction constraint, if the objective has one."""
        for constraint in getattr(self.objective, "constraints", []):
            if getattr(constraint, "reading_name", None) == "distortion":
                return float(constraint.reading_tolerance)
        return None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of a differently built model with the differing setting named."""
        saved = checkpoint.get("hyper_parameters", {})
        for key in self.architecture_keys:
            current = self.hparams.get(key, getattr(self, key, None))
            if key in saved and _as_comparable(saved[key]) != _as_comparable(current):
                raise ValueError(
                    f"The checkpoint comes from an incompatible model: it was built with {key}={saved[key]!r}, "
                    f"this model has {key}={current!r}. Build the model with the checkpoint's settings."
                )

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.learning_rate)
        if self.lr_schedule == "constant":
            return optimizer
        total_steps = self.trainer.max_steps
        if total_steps <= 0:
            raise ValueError("lr_schedule='cosine' anneals over Trainer(max_steps=...); set max_steps > 0.")
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=0.05 * self.learning_rate)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

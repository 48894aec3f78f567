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

from lightning_geco.likelihoods import GaussianLikelihood, Likelihood
from lightning_geco.metrics import AggregatePosteriorKL
from lightning_geco.objectives import GECOObjective, Objective
from lightning_geco.panels import log_image_grid, reconstruction_grid, sample_grid

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
        mean, log_variance = self.mean.float(), self.log_variance.float()
        return 0.5 * (mean.pow(2) + log_variance.exp() - 1.0 - log_variance).sum(dim=1)


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
        marginal_kl_chunk_size: int = 1024,
    ) -> None:
        super().__init__()
        if len(image_shape) != 3 or any(int(s) < 1 for s in image_shape):
            raise ValueError(f"image_shape must be (channels, height, width) of positive ints, got {image_shape!r}.")
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}.")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate!r}.")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.latent_dim = int(latent_dim)
        self.objective = objective if objective is not None else GECOObjective()
        self.likelihood = likelihood if likelihood is not None else GaussianLikelihood()
        self.learning_rate = learning_rate
        self.num_logged_images = num_logged_images
        self.aggregate_posterior = AggregatePosteriorKL(chunk_size=marginal_kl_chunk_size)
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
        self._log_terms("train", output, loss, on_step=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = batch_images(batch)
        self.check_images(x, check_range=batch_idx == 0)
        output = self(x)
        loss = self.objective(output)
        self._log_terms("val", output, loss, on_step=False)
        self.aggregate_posterior.update(output.posterior.mean, output.posterior.log_variance)
        if batch_idx == 0:
            self._panel_batch = x[: self.num_logged_images]

    def on_validation_epoch_end(self) -> None:
        estimates = self.aggregate_posterior.compute()
        self.aggregate_posterior.reset()
        self.log("val/marginal_kl", estimates["marginal_kl"])
        self.log("val/mutual_info", estimates["mutual_info"])
        if self._panel_batch is not None and not self.trainer.sanity_checking:
            self._log_panels(self._panel_batch)
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
    def _log_panels(self, x: Tensor) -> None:
        # Panels decode the posterior mean (what a user means by "the reconstruction"); the
        # logged distortion samples z, as the constraint does.
        reconstruction = self.likelihood.mean(self.decode(self.encode(x).mean))
        log_image_grid(self.loggers, "val/reconstructions", reconstruction_grid(x, reconstruction), self.global_step)
        log_image_grid(self.loggers, "val/samples", sample_grid(self.sample(x.shape[0])), self.global_step)

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

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.learning_rate)

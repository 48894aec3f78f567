"""The shared LightningModule of every VAE variant.

A variant with one diagonal-Gaussian latent and an N(0, I) prior implements
:meth:`VAEModule.encode` and :meth:`VAEModule.decode`. A variant with another latent structure
(a flow, several stochastic layers, recurrent steps) overrides :meth:`VAEModule.infer` (one
stochastic pass: decoder output, rate, its parts) and the three deterministic views the
panels use (:meth:`~VAEModule.decode_posterior_code`, :meth:`~VAEModule.generate`,
:meth:`~VAEModule.latent_traversal`). Users read images through :meth:`~VAEModule.reconstruct`
and :meth:`~VAEModule.sample`, both the likelihood's mean clamped to [0, 1]. This base does
the rest: the per-image terms, the objective, the logging under the names of
docs/ARCHITECTURE.md and the aggregate-posterior metrics; the image panels are
:class:`~lightning_geco.diagnostics.DiagnosticPanels`' (a callback any model can use), which
reads :meth:`~VAEModule.reconstruct`, :meth:`~VAEModule.sample` and the traversal methods here.

Units: images in [0, 1], shape (N, C, H, W). ``rate`` is KL(q(z|x) || p(z)) in nats per
image; ``distortion`` is the per-element MSE of the reconstruction (the likelihood's mean);
``log_likelihood`` is log p(x|z) in nats per image; ``elbo = log_likelihood - rate``.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_geco.batches import batch_images, batch_labels
from lightning_geco.callbacks import planned_steps, step_values_read, upgrade_multiplier_buffers
from lightning_geco.checks import is_count, is_number, is_positive_int, plain_numbers
from lightning_geco.distributions import LOG_2PI, DiagonalGaussian, gaussian_kl, normal_log_density
from lightning_geco.likelihoods import GaussianLikelihood, Likelihood
from lightning_geco.metrics import AggregatePosteriorKL, LatentActivity, MeanWithStandardError
from lightning_geco.nets.conv import check_image_shape
from lightning_geco.objectives import GECOObjective, Objective
from lightning_geco.rebuild import instantiate, piece_config
from lightning_geco.records import LatentPass, VAEOutput
from lightning_geco.schedules import CosineToFloor

__all__ = [
    "COSINE_FLOOR_FRACTION",
    "DiagonalGaussian",
    "LatentPass",
    "MAX_LOGGED_DIMENSIONS",
    "RANGE_CHECK_EVERY_N_STEPS",
    "VAEModule",
    "VAEOutput",
    "gaussian_kl",
    "normal_log_density",
    "traversal_codes",
]

#: per-dimension KLs are logged as ``val/kl_dim/<j>`` up to this many dimensions (spatial
#: latents have thousands; their per-part rates are logged instead)
MAX_LOGGED_DIMENSIONS = 64
#: the cosine schedule's final learning rate, as a fraction of ``learning_rate``
COSINE_FLOOR_FRACTION = 0.05
#: training batches' smallest and largest pixel values are kept on the device every step and
#: read (one host sync) every this many steps: the [0, 1] check covers every batch for the
#: cost of a min/max reduction per step
RANGE_CHECK_EVERY_N_STEPS = 50


def traversal_codes(origin: Tensor, dims: Sequence[int], steps: int, span: float) -> Tensor:
    """Codes (len(dims) * steps, d): row block r is ``origin`` (1, d) with coordinate ``dims[r]``
    moved over ``[-span, span]`` in ``steps`` steps."""
    values = torch.linspace(-span, span, steps, device=origin.device, dtype=origin.dtype)
    codes = origin.repeat(len(dims) * steps, 1)
    for row, dim in enumerate(dims):
        codes[row * steps : (row + 1) * steps, dim] = values
    return codes


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (torch < 2.4 takes no argument and knows cuda
    and cpu only; a device type autocast does not know, e.g. meta, has none)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return device_type == "cuda" and torch.is_autocast_enabled()


def _check_count(method: str, value: Any, minimum: int) -> None:
    """Raise a clear error unless ``value`` is an integer >= ``minimum``."""
    try:
        count = operator.index(value)
    except TypeError:
        count = None
    if count is None or count < minimum:
        raise ValueError(f"{method}: num_samples must be an integer >= {minimum}, got {value!r}.")


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
        num_logged_images: images in the ``val/reconstructions`` and ``val/samples`` panels of
            :class:`~lightning_geco.diagnostics.DiagnosticPanels` (unless it states its own).
        marginal_kl_chunk_size: rows per chunk of the marginal-KL estimator (bounds its memory).
        iwae_samples: K of the importance-weighted bound ``val/iwae`` on log p(x) (0: not computed;
            it costs K decoder passes per validation batch).
        active_unit_threshold: variance of the posterior mean above which a latent dimension
            counts as active (``val/active_units``).
        lr_schedule: ``"constant"``, or ``"cosine"``: anneal the learning rate to 5% of
            ``learning_rate`` at the Trainer's ``max_steps`` (without one, at the last step
            ``max_epochs`` plans). Resumed with the same ``max_steps``
            the schedule continues unchanged; with another (an extended run) it is re-planned
            from the current step and learning rate to the new end, so it never rises.
            As the model stops improving, GECO's multiplier catches up with it and the
            constraint ends close to its tolerance instead of trailing below it.
    """

    #: whether the data must lie in [0, 1] (images; the tolerances of the image constraints are
    #: stated in those units); a model of data in other units sets False and skips the range checks
    expects_unit_interval: bool = True
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
        image_shape = check_image_shape(image_shape)
        if not is_positive_int(latent_dim):
            raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}.")
        if not (is_number(learning_rate) and learning_rate > 0 and math.isfinite(learning_rate)):
            raise ValueError(f"learning_rate must be positive and finite, got {learning_rate!r}.")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}.")
        if not is_count(iwae_samples, 0):
            raise ValueError(f"iwae_samples must be an int >= 0 (0 turns the bound off), got {iwae_samples!r}.")
        if not is_positive_int(num_logged_images):
            raise ValueError(
                f"num_logged_images must be a positive int (images per panel), got {num_logged_images!r}; "
                "for no panels, leave DiagnosticPanels out of the Trainer's callbacks."
            )
        if not is_positive_int(marginal_kl_chunk_size):
            raise ValueError(f"marginal_kl_chunk_size must be a positive int (rows), got {marginal_kl_chunk_size!r}.")
        if not (is_number(active_unit_threshold) and active_unit_threshold >= 0):
            raise ValueError(f"active_unit_threshold must be >= 0 (a variance), got {active_unit_threshold!r}.")
        self.image_shape = image_shape
        self.latent_dim = int(latent_dim)
        # A checkpoint's hyperparameters carry the objective and likelihood as the configs that
        # rebuild them (see on_save_checkpoint); LightningCLI may have built them already.
        if isinstance(objective, Mapping):
            objective = instantiate(objective, "objective")
        if isinstance(likelihood, Mapping):
            likelihood = instantiate(likelihood, "likelihood")
        self.objective = objective if objective is not None else GECOObjective()
        self.likelihood = likelihood if likelihood is not None else GaussianLikelihood()
        for constraint in self.constraints:
            constraint.check_model(self)
        self.learning_rate = float(learning_rate)
        self.num_logged_images = operator.index(num_logged_images)
        self.iwae_samples = operator.index(iwae_samples)
        self.lr_schedule = lr_schedule
        self.aggregate_posterior = AggregatePosteriorKL(chunk_size=operator.index(marginal_kl_chunk_size))
        self.latent_activity = LatentActivity(threshold=float(active_unit_threshold))
        # One per constraint reading, its validation mean's standard error (the verdict's noise).
        # Built at each validation from the constraints of that moment (an objective may be
        # replaced after construction); not submodules, so checkpoints and dtype casts skip them.
        self.reading_precision: dict[str, MeanWithStandardError] = {}
        #: KL per latent dimension at the last validation (nats), for the traversal panel
        self.kl_per_dimension: Tensor | None = None
        #: the model class a checkpoint being loaded names (set by on_load_checkpoint, read by load_state_dict)
        self._checkpoint_model_class: str | None = None
        #: (class name, state) of the DataModule the loaded checkpoint's model trained with (see setup)
        self._trained_data: tuple[str, dict[str, Any]] | None = None
        self._checked_range = False
        # Running (min, max) of the training pixels since the last host check; NaN propagates.
        self._pixel_range: Tensor | None = None
        self._pixel_range_since = 0

    def save_hyperparameters(self, *args: Any, ignore: Any = None, frame: Any = None, logger: bool = True) -> None:
        """Lightning's, with NumPy numbers among the arguments kept as the Python numbers they
        hold: ``hparams.yaml`` and the checkpoint's hyperparameters stay plain data (a NumPy
        scalar became a ``!!python/object/apply`` tag that a safe YAML loader refuses)."""
        # The frame of the subclass's __init__, which Lightning would take as its own caller's.
        caller = frame if frame is not None else getattr(inspect.currentframe(), "f_back", None)
        super().save_hyperparameters(*args, ignore=ignore, frame=caller, logger=logger)
        for hparams in (self._hparams, self._hparams_initial):
            assert isinstance(hparams, MutableMapping)  # an AttributeDict
            for key, value in list(hparams.items()):
                hparams[key] = plain_numbers(value)

    @property
    def constraints(self) -> list:
        """The objective's GECO constraints (empty for ELBO-type objectives)."""
        return list(getattr(self.objective, "constraints", []))

    # ------------------------------------------------------------- variants
    def encode(self, x: Tensor) -> DiagonalGaussian:
        """q(z|x) for images (N, C, H, W)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define encode(): a VAEModule subclass overrides encode and decode "
            "(a one-Gaussian-latent model), or infer (any other latent structure)."
        )

    def decode(self, z: Tensor) -> Tensor:
        """Decoder output (N, C, H, W) for latents (N, latent_dim); the likelihood reads it."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define decode(): a VAEModule subclass overrides encode and decode "
            "(a one-Gaussian-latent model), or infer (any other latent structure)."
        )

    # ------------------------------------------------------------ the model
    def check_images(self, x: Tensor, check_range: bool = False) -> None:
        """Raise a clear error for images of the wrong shape or dtype (and, optionally, outside [0, 1])."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"{type(self).__name__} was built for images of shape (N, {', '.join(map(str, self.image_shape))}), "
                f"got a batch of shape {tuple(x.shape)}. Set the model's image_shape to the data's."
            )
        if not x.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} takes floating-point images in [0, 1], got a batch of dtype {x.dtype}. "
                "Convert it, e.g. x.float() / 255 for 8-bit images (torchvision: v2.ToDtype(torch.float32, "
                "scale=True))."
            )
        # Autocast casts float32/16 inputs to the layers' dtype; nothing casts float64 (numpy's default).
        weights = self.dtype
        autocast = _autocast_enabled(x.device.type) and x.dtype != torch.float64
        if x.dtype != weights and not autocast:
            hint = " (numpy's default is float64: torch.from_numpy(a).float())" if x.dtype == torch.float64 else ""
            raise TypeError(
                f"{type(self).__name__}'s weights are {weights}, got a batch of dtype {x.dtype}. Convert it with "
                f"x.to({weights}){hint}, or set the Trainer's precision to the batch's."
            )
        if check_range and self.expects_unit_interval:
            low, high = torch.aminmax(x.detach().float())
            self._raise_if_out_of_range(low, high, "this batch")

    @staticmethod
    def _raise_if_out_of_range(minimum: Tensor, maximum: Tensor, where: str) -> None:
        low, high = float(minimum), float(maximum)  # the host sync
        if math.isnan(low) or math.isnan(high):
            raise ValueError(
                f"The images of {where} contain NaN. Find where the data pipeline produces it "
                "(a division by zero in normalisation, a corrupt file) before training on it."
            )
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"Images must lie in [0, 1] (the tolerances are stated in those units); {where} held values in "
                f"[{low:g}, {high:g}]. Rescale the data (e.g. torchvision's ToTensor) before the model."
            )

    def _track_pixel_range(self, x: Tensor) -> None:
        """Fold this batch's min and max into a device-side running range; check it every
        :data:`RANGE_CHECK_EVERY_N_STEPS` steps, so no per-step host sync."""
        if not self.expects_unit_interval:
            return
        low, high = torch.aminmax(x.detach().float())
        batch_range = torch.stack([low, high])
        if self._pixel_range is None:
            self._pixel_range, self._pixel_range_since = batch_range, self.global_step
        else:
            # fmin/fmax would drop a NaN; minimum/maximum keep it.
            self._pixel_range = torch.stack(
                [torch.minimum(self._pixel_range[0], low), torch.maximum(self._pixel_range[1], high)]
            )
        if self.global_step + 1 - self._pixel_range_since >= RANGE_CHECK_EVERY_N_STEPS:
            self._check_pixel_range()

    def _check_pixel_range(self) -> None:
        if self._pixel_range is not None:
            since, pixel_range = self._pixel_range_since, self._pixel_range
            self._pixel_range = None
            self._raise_if_out_of_range(
                pixel_range[0], pixel_range[1], f"the training batches of steps {since} to {self.global_step}"
            )

    def on_train_end(self) -> None:
        self._check_pixel_range()  # the batches since the last check

    def reparameterization_noise(self, x: Tensor, posterior: DiagonalGaussian) -> Tensor | None:
        """The N(0, I) noise of z = mean + noise * std in the default :meth:`infer` (one Gaussian
        latent: ConvVAE, FlowVAE's base draw, the LadderVAE's top layer); None draws it from
        torch's RNG. ConvDRAW's drawing steps and the LadderVAE's lower layers draw their own
        noise from torch's RNG and do not call this.

        Override to make the draws a function of the data (tests comparing a 2-rank DDP run
        with a 1-process run use this so both see the same noise for the same example).
        """
        return None

    def infer(self, x: Tensor) -> LatentPass:
        """One stochastic pass: z ~ q(z|x), the decoder's output and the rate.

        This default is the one-Gaussian-latent model: ``encode``, reparameterise, ``decode``,
        closed-form KL to N(0, I).
        """
        posterior = self.encode(x)
        noise = self.reparameterization_noise(x, posterior)
        if noise is None:
            noise = torch.randn_like(posterior.mean)
        z = posterior.rsample(noise)
        log_q = -0.5 * (noise.float().pow(2) + posterior.log_variance.float() + LOG_2PI).sum(dim=1)
        log_prior = -0.5 * (z.float().pow(2) + LOG_2PI).sum(dim=1)
        return LatentPass(
            decoder_output=self.decode(z),
            rate=posterior.kl_to_standard_normal(),
            log_weight=log_prior - log_q,
            posterior=posterior,
            z=z,
        )

    def forward(self, x: Tensor, labels: Tensor | None = None) -> VAEOutput:
        self.check_images(x)  # a wrong shape is named here, not as a matmul error deep inside
        latent = self.infer(x)
        reconstruction = self.likelihood.mean(latent.decoder_output)
        # fp32 before squaring: per-image sums overflow fp16 under autocast.
        distortion = (reconstruction.float() - x.float()).pow(2).flatten(1).mean(dim=1)
        return VAEOutput(
            x=x,
            decoder_output=latent.decoder_output,
            reconstruction=reconstruction,
            posterior=latent.posterior,
            z=latent.z,
            rate=latent.rate,
            distortion=distortion,
            log_likelihood=self.likelihood.log_prob(x, latent.decoder_output),
            rate_terms=latent.rate_terms,
            labels=labels,
        )

    @torch.no_grad()
    def importance_weighted_bound(self, x: Tensor, num_samples: int) -> Tensor:
        """IWAE bound (Burda et al. 2016) on log p(x) with K = ``num_samples``, nats per image, (N,).

        ``log 1/K sum_k p(x|z_k) p(z_k) / q(z_k|x)`` with z_k ~ q(z|x): equal to the ELBO in
        expectation at K = 1, non-decreasing in K in expectation, -> log p(x) as K -> inf.
        """
        self.check_images(x)
        _check_count("importance_weighted_bound", num_samples, minimum=1)
        log_weights = []
        for _ in range(num_samples):
            latent = self.infer(x)
            log_weights.append(self.likelihood.log_prob(x, latent.decoder_output) + latent.log_weight)
        return torch.logsumexp(torch.stack(log_weights), dim=0) - math.log(num_samples)

    def posterior_code(self, x: Tensor) -> Tensor:
        """The deterministic code of ``x`` the panels decode (the posterior mean), (N, latent_dim)."""
        return self.encode(x).mean

    @torch.no_grad()
    def decode_posterior_code(self, x: Tensor) -> Tensor:
        """Decoder output (what the likelihood reads, e.g. logits) for the posterior code, no sampling, (N, C, H, W)."""
        return self.decode(self.posterior_code(x))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The reconstruction of images x (N, C, H, W): the likelihood's mean at the posterior
        code, clamped to [0, 1] (a Gaussian mean may overshoot), (N, C, H, W).

        Not the reconstruction the constraint and the verdict read: those decode a code *drawn*
        from the posterior (``forward``, as the ELBO's expectation has it), which reads worse. An
        MSE computed from this one comes out lower than ``val/distortion`` (15 % lower in a
        new-user trial on Fashion-MNIST); compare with ``model(x).distortion`` instead."""
        # Checked here too: some wrong sizes pass a conv encoder and come back resized, silently;
        # and images in [0, 255] came back as a plausible-looking reconstruction of nothing.
        self.check_images(x, check_range=True)
        return self.likelihood.mean(self.decode_posterior_code(x)).clamp(0, 1)

    @property
    def _weights_dtype(self) -> torch.dtype:
        """The dtype the module's weights are in (``LightningModule.dtype``, typed as a torch dtype)."""
        dtype = self.dtype
        return dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)

    @torch.no_grad()
    def generate(self, num_samples: int) -> Tensor:
        """Decoder output for codes drawn from the prior, (num_samples, C, H, W)."""
        # In the module's dtype: under bf16-true / 16-true its weights are, and the panels sample
        # outside the step hooks, where Lightning's default dtype is not set.
        return self.decode(torch.randn(num_samples, self.latent_dim, device=self.device, dtype=self._weights_dtype))

    @torch.no_grad()
    def sample(self, num_samples: int) -> Tensor:
        """Images decoded from z ~ p(z), (num_samples, C, H, W): the likelihood's mean, clamped to [0, 1]."""
        _check_count("sample", num_samples, minimum=0)
        return self.likelihood.mean(self.generate(num_samples)).clamp(0, 1)

    # ------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch_images(batch)
        self.check_images(x, check_range=not self._checked_range)
        if not self._checked_range:
            self.likelihood.check_data(x)
        self._track_pixel_range(x)
        output = self(x, batch_labels(batch))
        self._checked_range = True
        self.objective.set_step(self.global_step)
        loss = self.objective(output)  # a GECOObjective checks the first training batch against its constraints
        if step_values_read(self.trainer):
            self._log_terms("train", output, loss, on_step=True)
            for key, value in self.objective.logged_values().items():
                self.log(f"train/{key}", value, on_step=True, on_epoch=False, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step("val", batch, batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """The validation step's figures on the test set, logged as ``test/<name>``
        (``trainer.test``, ``train.py test``): lambda is read, never moved."""
        self._evaluation_step("test", batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Per image of a batch (images, or ``(images, targets)``; ``trainer.predict`` returns
        one dict per batch): ``reconstruction``, what :meth:`reconstruct` gives (N, C, H, W) in
        [0, 1], the deterministic one at the posterior mean; then one pass with a sampled code,
        as GECO and the validation read the model: its ``sampled_reconstruction`` (the
        likelihood's mean, (N, C, H, W), unclamped), and its ``distortion`` (the per-element MSE
        of that one, not of ``reconstruction``) and ``rate`` (nats), each (N,)."""
        x = batch_images(batch)
        self.check_images(x, check_range=batch_idx == 0)
        output = self(x, batch_labels(batch))
        return {
            "reconstruction": self.reconstruct(x),
            "sampled_reconstruction": output.reconstruction,
            "distortion": output.distortion,
            "rate": output.rate,
        }

    def _evaluation_step(self, stage: str, batch: Any, batch_idx: int) -> None:
        x = batch_images(batch)
        self.check_images(x, check_range=batch_idx == 0)
        output = self(x, batch_labels(batch))
        loss = self.objective(output)
        self._log_terms(stage, output, loss, on_step=False)
        self._log_constraint_readings(stage, output)
        posterior = output.posterior
        self.aggregate_posterior.update(posterior.mean, posterior.log_variance)
        self.latent_activity.update(posterior.mean, posterior.log_variance)
        if self.iwae_samples:
            iwae = self.importance_weighted_bound(x, self.iwae_samples)
            self.log(f"{stage}/iwae", iwae.mean(), on_epoch=True, sync_dist=True, batch_size=x.shape[0])

    def _evaluation_metrics(self) -> tuple:
        return (self.aggregate_posterior, self.latent_activity)

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation()

    def on_test_epoch_start(self) -> None:
        self._start_evaluation()

    def on_validation_epoch_end(self) -> None:
        activity = self._finish_evaluation("val")
        if not self.trainer.sanity_checking:
            self.kl_per_dimension = activity["kl_per_dim"].detach()

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def _start_evaluation(self) -> None:
        # Reset here too: after trainer.validate (inference mode) the states are inference
        # tensors, which the validation inside a later fit (no_grad) cannot update in place.
        for metric in self._evaluation_metrics():
            metric.reset()
        # Fresh ones each evaluation (nothing to reset), for the constraints of this moment.
        names = dict.fromkeys(c.reading_name for c in self.constraints)
        self.reading_precision = {name: MeanWithStandardError().to(self.device) for name in names}

    def _finish_evaluation(self, stage: str) -> dict[str, Tensor]:
        """Log the whole evaluated set's figures under ``<stage>/``; returns the latent activity."""
        # Metrics gather every rank's states, so these cover the whole evaluated set and are
        # the same on every rank. sync_dist averages identical values (exact), one small
        # all-reduce per key per evaluation, and keeps Lightning from warning once per key
        # under DDP that an unsynced epoch-level value may differ between ranks.
        estimates = self.aggregate_posterior.compute()
        activity = self.latent_activity.compute()
        # torchmetrics squeezes a one-element result to 0-d: one latent dimension stays (1,).
        activity["kl_per_dim"] = activity["kl_per_dim"].reshape(-1)
        # What another draw of as many images could change each reading by.
        standard_errors = {
            name: metric.compute()["standard_error"]
            for name, metric in self.reading_precision.items()
            if metric.update_called
        }
        for metric in self._evaluation_metrics():
            metric.reset()
        for key in ("marginal_kl", "mutual_info", "total_correlation", "dimensionwise_kl"):
            self.log(f"{stage}/{key}", estimates[key], sync_dist=True)
        self.log(f"{stage}/active_units", activity["active_units"].float(), sync_dist=True)
        for name, standard_error in standard_errors.items():
            self.log(f"{stage}/{name}/standard_error", standard_error, sync_dist=True)
        if len(activity["kl_per_dim"]) <= MAX_LOGGED_DIMENSIONS:
            for j, kl in enumerate(activity["kl_per_dim"]):
                self.log(f"{stage}/kl_dim/{j}", kl, sync_dist=True)
        return activity

    def _log_terms(self, stage: str, output: VAEOutput, loss: Tensor, on_step: bool) -> None:
        # Step-level training values are rank-local (a collective per scalar per step is not
        # worth it); epoch-level validation values are reduced over all ranks.
        sync = not on_step
        terms = {
            f"{stage}/distortion": output.distortion.mean(),
            f"{stage}/rate": output.rate.mean(),
            f"{stage}/elbo": output.elbo.mean(),
            f"{stage}/loss": loss.detach(),
        }
        for name, part in output.rate_terms.items():
            terms[f"{stage}/rate/{name}"] = part.mean()
        batch_size = output.x.shape[0]
        self.log_dict(terms, on_step=on_step, on_epoch=not on_step, sync_dist=sync, batch_size=batch_size)

    @torch.no_grad()
    def _log_constraint_readings(self, stage: str, output: VAEOutput) -> None:
        # The distortion is logged for every model already; other constraints' readings (pNCC,
        # class cross-entropy and accuracy, ...) go beside it, reduced over ranks.
        readings = {}
        for constraint in self.constraints:
            readings.update(constraint.readings(output))
        for name, metric in self.reading_precision.items():
            if name in readings:  # a constraint of the user's may report its reading under another key
                metric.update(readings[name])
        readings.pop("distortion", None)
        for name, values in readings.items():
            self.log(f"{stage}/{name}", values.float().mean(), on_epoch=True, sync_dist=True, batch_size=values.shape[0])

    @torch.no_grad()
    def latent_traversal(self, x: Tensor, dims: Sequence[int], steps: int = 9, span: float = 2.5) -> Tensor | None:
        """Decoded images, shape (len(dims) * steps, C, H, W): row r moves z[dims[r]] over
        ``[-span, span]`` with the other coordinates at :meth:`posterior_code` of ``x`` (1, C, H, W).

        A variant whose codes have no meaningful single coordinates returns None (no panel).
        """
        return self.likelihood.mean(self.decode(traversal_codes(self.posterior_code(x[:1]), dims, steps, span)))

    @property
    def traversable_dimensions(self) -> int:
        """How many leading coordinates of the posterior a traversal may move (all of z here)."""
        return self.latent_dim

    def traversal_dimensions(self, count: int = 10) -> list[int]:
        """The dimensions the traversal panel moves: the most informative at the last validation
        first (before any validation: the first ``count``)."""
        n = self.traversable_dimensions
        if self.kl_per_dimension is None:
            return list(range(min(count, n)))
        return torch.argsort(self.kl_per_dimension[:n], descending=True)[:count].tolist()

    @property
    def _class_path(self) -> str:
        """``module.Class`` of this model, as its checkpoints record it (``model_class``)."""
        return f"{type(self).__module__}.{type(self).__qualname__}"

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; weights of another model class (a checkpoint loaded into
        a class without its weights, e.g. ``VAEModule.load_from_checkpoint`` of a ConvVAE) are
        refused naming the class to load them with, instead of a list of unexpected keys."""
        saved_class, self._checkpoint_model_class = self._checkpoint_model_class, None
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as error:
            if not saved_class or saved_class == self._class_path:
                raise
            name = saved_class.rsplit(".", 1)[-1]
            raise ValueError(
                f"The checkpoint holds a {name} ({saved_class}), whose weights this {type(self).__name__} does not "
                f"have: load it with {name}.load_from_checkpoint(path) (strict=False takes the weights that match)."
            ) from error

    def setup(self, stage: str) -> None:
        """Before ``trainer.validate`` / ``test`` / ``predict`` of a model loaded on its own (no
        ``ckpt_path``, so Lightning restores no DataModule state), the DataModule checks what the
        model's checkpoint holds of its data, as it would from ``ckpt_path``: a validation split
        whose images the model trained on is refused, and so is a test split of its training
        images (a model trained on the test files; the shapes of another seed). The DataModule's
        own training order is left as it is."""
        trainer = self._trainer
        if stage not in ("validate", "test", "predict") or self._trained_data is None or trainer is None:
            return
        datamodule = getattr(trainer, "datamodule", None)  # set by Lightning's data connector, not declared
        name, state = self._trained_data
        if trainer.ckpt_path is not None or datamodule is None or type(datamodule).__qualname__ != name:
            return
        if stage == "validate" and callable(check := getattr(datamodule, "check_held_out_split", None)):
            check(state.get("split"), fitting=False)
        elif stage != "validate" and callable(remember := getattr(datamodule, "remember_training", None)):
            remember(state)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The objective and the likelihood are modules, which save_hyperparameters cannot
        # store: record the configs that rebuild them, so load_from_checkpoint(path) needs nothing else.
        hyperparameters = checkpoint.get("hyper_parameters")
        if hyperparameters is not None:
            hyperparameters["objective"] = piece_config(self.objective)
            hyperparameters["likelihood"] = piece_config(self.likelihood)
        # Not a buffer (a model built before its first validation has none): what orders a loaded
        # model's traversal panel as the trained one's.
        if self.kl_per_dimension is not None:
            checkpoint["kl_per_dimension"] = self.kl_per_dimension.tolist()
        # Which model the weights are (a load into another class is then named, not a key wall).
        checkpoint["model_class"] = self._class_path
        # How the DataModule held images out, kept with the model: a model loaded on its own and
        # validated on another split is refused as one restored with its DataModule is (setup).
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        held_out = getattr(datamodule, "held_out_split", None)
        if callable(held_out):
            checkpoint["held_out_split"] = {"datamodule": type(datamodule).__qualname__, "split": held_out()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of a differently built model with the differing setting named, and
        bring a checkpoint of an earlier version to this one (or say what to pass)."""
        saved = checkpoint.get("hyper_parameters", {})
        # Named if the weights then do not load (see load_state_dict).
        self._checkpoint_model_class = checkpoint.get("model_class")
        # Lightning keeps the DataModule's state under its class name, which the record names; a
        # weights-only checkpoint holds none, and the record's split stands in for it.
        record = checkpoint.get("held_out_split") or {}
        name, split = record.get("datamodule"), record.get("split")
        state = checkpoint.get(name) if isinstance(name, str) else None
        if not isinstance(state, dict) and isinstance(split, dict):
            state = {"split": split, "source": split.get("source")}
        self._trained_data = (name, state) if isinstance(name, str) and isinstance(state, dict) else None
        for key in self.architecture_keys:
            current = self.hparams.get(key, getattr(self, key, None))
            if key in saved and _as_comparable(saved[key]) != _as_comparable(current):
                raise ValueError(
                    f"The checkpoint comes from an incompatible model: it was built with {key}={saved[key]!r}, "
                    f"this model has {key}={current!r}. Build the model with the checkpoint's settings."
                )
        weights = checkpoint.get("state_dict", {})
        saved_likelihood = sorted(k.removeprefix("likelihood.") for k in weights if k.startswith("likelihood."))
        own_likelihood = sorted(self.likelihood.state_dict())
        if "state_dict" in checkpoint and saved_likelihood != own_likelihood:
            raise ValueError(
                f"The checkpoint's likelihood holds {saved_likelihood or 'no tensors'}, this model's "
                f"{type(self.likelihood).__name__} holds {own_likelihood or 'none'}: it was trained with another "
                "likelihood. Pass the trained one, e.g. load_from_checkpoint(path, likelihood=BernoulliLikelihood()) "
                "for a checkpoint with no 'likelihood.log_sigma'."
            )
        if saved and "objective" not in saved:
            rank_zero_warn(
                "This checkpoint was saved before lightning_geco recorded a model's objective: the model is "
                f"built with {type(self.objective).__name__}{self._objective_text()}. If it was trained with "
                "another, pass it: load_from_checkpoint(path, objective=...)."
            )
        upgrade_multiplier_buffers(checkpoint, self)
        if checkpoint.get("kl_per_dimension") is not None:
            self.kl_per_dimension = torch.tensor(checkpoint["kl_per_dimension"])
        # A scheduled objective (KL warm-up, capacity) weighs the terms as at the saved step.
        self.objective.set_step(int(checkpoint.get("global_step", 0)))

    def _objective_text(self) -> str:
        stated = [f"{c['name']} {c['tolerance']} {c['unit']}" for c in getattr(self.objective, "describe", list)()]
        return f" ({', '.join(stated)})" if stated else ""

    def configure_optimizers(self) -> Any:
        # Refused when training starts, not when built: a checkpoint made so still loads.
        learned = [name for name, parameter in self.likelihood.named_parameters() if parameter.requires_grad]
        if learned and not self.objective.reads_log_likelihood:
            raise ValueError(
                f"{type(self.likelihood).__name__} learns {', '.join(learned)} through its log-likelihood, which "
                f"{type(self.objective).__name__}'s loss does not contain: it would never train (and DDP stops on "
                "the unused parameter). Use GaussianLikelihood(learn_sigma=False) with this objective, or an "
                "objective that reads the likelihood (ELBO, BetaVAE, KLWarmup, CapacityBetaVAE)."
            )
        # Frozen networks inside constraints have no gradients and no place in the optimizer.
        parameters = [p for p in self.parameters() if p.requires_grad]
        # Fused Adam takes GECOCallback's non-finite-step flag on the device (as GradScaler's),
        # so a step that does not log needs no host sync; elsewhere the callback reads the flag.
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
        # Lightning refuses to clip the gradients of a fused optimizer under mixed precision (it
        # unscales them inside its step): there the optimizer is Adam's foreach kind.
        trainer = self._trainer
        if trainer is not None and trainer.gradient_clip_val and isinstance(trainer.precision_plugin, MixedPrecision):
            fused = False
        optimizer = torch.optim.Adam(parameters, lr=self.learning_rate, fused=fused)
        if self.lr_schedule == "constant":
            return optimizer
        # Under max_epochs the plan needs the training loader's length, which reading here would
        # start the loader before Lightning restores a resumed run's counters (the sampler would
        # start at batch 0): a placeholder end, planned at on_train_start.
        planned = self.trainer.max_steps if self.trainer.max_steps > 0 else 1
        scheduler = CosineToFloor(optimizer, total_steps=planned, floor_fraction=COSINE_FLOOR_FRACTION)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _planned_steps(self) -> int:
        """The optimizer steps the fit plans: ``max_steps`` or what ``max_epochs`` makes of the
        training loader, whichever ends the fit first (Lightning's ``estimated_stepping_batches``;
        read once training starts, when the loader is set up)."""
        planned = planned_steps(self.trainer)
        if planned is None:
            estimated = self.trainer.estimated_stepping_batches
            raise ValueError(
                "lr_schedule='cosine' anneals over the fit's planned optimizer steps, Trainer(max_steps=...) or "
                f"max_epochs times the batches of an epoch; got max_steps={self.trainer.max_steps} and "
                f"max_epochs={self.trainer.max_epochs} ({estimated} steps). Set max_steps > 0, or max_epochs > 0 "
                "with a training loader that has a length, or use lr_schedule='constant'."
            )
        return planned

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # A scheduled objective's step follows the steps taken, so a validation after this batch
        # weighs the terms as a checkpoint written here weighs them when loaded (its global_step).
        self.objective.set_step(self.global_step)

    def on_train_start(self) -> None:
        # Runs after Lightning restored the checkpoint's scheduler. A run resumed with the same
        # plan keeps it (and so equals the uninterrupted run); an extended (or shortened) run
        # re-plans the cosine from the current step and rate to the new end, instead of climbing
        # back up the old cosine past its end. At step 0 this sets a max_epochs run's plan.
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, CosineToFloor):
                start_step = scheduler.last_epoch
                planned = self._planned_steps()
                if scheduler.replan(planned) and start_step > 0:
                    rank_zero_info(
                        f"Cosine learning-rate schedule re-planned: from step {start_step} at "
                        f"{scheduler.get_last_lr()[0]:.3g} down to {COSINE_FLOOR_FRACTION:g} x "
                        f"{scheduler.base_lrs[0]:g} (the checkpoint's base learning rate) at the new last step "
                        f"{planned}."
                    )

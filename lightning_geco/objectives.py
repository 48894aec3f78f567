"""Training objectives: what a VAE's loss is made of, independent of the model.

Every objective maps a :class:`~lightning_geco.models.base.VAEOutput` (per-image rate,
distortion and log-likelihood) to a scalar loss in nats per image. The model always logs
the unit-weight ELBO beside the loss, so the two are never confused.
"""

from __future__ import annotations

import functools
import math
import operator
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_geco.checks import is_number, is_positive_int
from lightning_geco.collectives import raise_on_every_rank
from lightning_geco.constraints import Constraint, ConstraintList, ReconstructionMSE
from lightning_geco.distributions import LOG_2PI
from lightning_geco.geco import GECO, MultiplierState, _as_fp32
from lightning_geco.rebuild import Rebuildable
from lightning_geco.records import VAEOutput

__all__ = [
    "FIRST_BATCH_REFUSED_ELSEWHERE",
    "BetaVAE",
    "CapacityBetaVAE",
    "ELBO",
    "GECOObjective",
    "KLWarmup",
    "Objective",
    "SigmaVAE",
]


class Objective(Rebuildable, nn.Module):
    """Interface: ``loss(output) -> scalar`` (nats per image, averaged over the batch).

    Schedules read :attr:`step`, the optimizer step the model sets before each training
    step (Lightning's ``global_step``, restored on resume, so a schedule resumes exactly).
    """

    step: int = 0
    #: whether the loss contains the likelihood's ``log_prob`` (what trains a learned likelihood
    #: parameter, such as ``GaussianLikelihood(learn_sigma=True)``'s sigma)
    reads_log_likelihood: bool = True

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def logged_values(self) -> dict[str, float]:
        """Scalars the model logs under ``train/<key>`` (e.g. a scheduled beta)."""
        return {}

    def forward(self, output: VAEOutput) -> Tensor:
        """The loss (0-dim, nats per image); in eval mode too (a GECO objective reads its
        multipliers as they stand)."""
        raise NotImplementedError


def _check_steps(name: str, value: int) -> int:
    if not is_positive_int(value):
        raise ValueError(f"{name} must be a positive int (optimizer steps), got {value!r}.")
    return operator.index(value)


class ELBO(Objective):
    """Negative evidence lower bound: ``-(log p(x|z) - KL)`` under the model's likelihood."""

    def forward(self, output: VAEOutput) -> Tensor:
        return -(output.log_likelihood - output.rate).mean()


class BetaVAE(Objective):
    """beta-VAE (Higgins et al. 2017): ``-(log p(x|z) - beta * KL)`` with a fixed beta."""

    def __init__(self, beta: float = 4.0) -> None:
        super().__init__()
        if not (is_number(beta) and beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"BetaVAE beta must be >= 0 and finite, got {beta!r}.")
        self.beta = float(beta)

    def forward(self, output: VAEOutput) -> Tensor:
        return -(output.log_likelihood - self.beta * output.rate).mean()


class KLWarmup(Objective):
    """ELBO with a linear KL warm-up (Bowman et al. 2016; Sonderby et al. 2016).

    ``-(log p(x|z) - beta_t * KL)`` with ``beta_t = start_beta + (1 - start_beta) * min(1, t / warmup_steps)``
    at optimizer step t: the plain ELBO from ``warmup_steps`` on.

    Args:
        warmup_steps: optimizer steps until beta reaches 1.
        start_beta: beta at step 0, in [0, 1].
    """

    def __init__(self, warmup_steps: int = 1000, start_beta: float = 0.0) -> None:
        super().__init__()
        warmup_steps = _check_steps("KLWarmup warmup_steps", warmup_steps)
        if not (is_number(start_beta) and 0.0 <= start_beta <= 1.0):
            raise ValueError(f"KLWarmup start_beta must lie in [0, 1], got {start_beta!r}.")
        self.warmup_steps = warmup_steps
        self.start_beta = float(start_beta)

    @property
    def beta(self) -> float:
        return self.start_beta + (1.0 - self.start_beta) * min(1.0, self.step / self.warmup_steps)

    def logged_values(self) -> dict[str, float]:
        return {"beta": self.beta}

    def forward(self, output: VAEOutput) -> Tensor:
        return -(output.log_likelihood - self.beta * output.rate).mean()


class CapacityBetaVAE(Objective):
    """Capacity-controlled beta-VAE (Burgess et al. 2018, "Understanding disentangling in beta-VAE").

    ``-log p(x|z) + gamma * |KL - C_t|`` with the capacity ``C_t = max_capacity * min(1, t / capacity_steps)``
    nats at optimizer step t. The absolute value is per batch mean, as in the paper's code.

    Args:
        gamma: weight of the capacity term (the paper: 1000 for Bernoulli pixels).
        max_capacity: nats per image the KL is pushed towards at the end of the schedule.
        capacity_steps: optimizer steps over which C grows linearly from 0.
    """

    def __init__(self, gamma: float = 100.0, max_capacity: float = 25.0, capacity_steps: int = 1000) -> None:
        super().__init__()
        if not (is_number(gamma) and gamma > 0 and math.isfinite(gamma)):
            raise ValueError(f"CapacityBetaVAE gamma must be positive and finite, got {gamma!r}.")
        if not (is_number(max_capacity) and max_capacity >= 0 and math.isfinite(max_capacity)):
            raise ValueError(f"CapacityBetaVAE max_capacity must be >= 0 nats and finite, got {max_capacity!r}.")
        capacity_steps = _check_steps("CapacityBetaVAE capacity_steps", capacity_steps)
        self.gamma = float(gamma)
        self.max_capacity = float(max_capacity)
        self.capacity_steps = capacity_steps

    @property
    def capacity(self) -> float:
        return self.max_capacity * min(1.0, self.step / self.capacity_steps)

    def logged_values(self) -> dict[str, float]:
        return {"capacity": self.capacity}

    def forward(self, output: VAEOutput) -> Tensor:
        return -output.log_likelihood.mean() + self.gamma * (output.rate.mean() - self.capacity).abs()


class SigmaVAE(Objective):
    """Optimal-sigma VAE (Rybkin, Daniilidis & Levine 2021, "Simple and effective VAE training
    with calibrated decoders"): a Gaussian decoder whose one variance is the batch's MSE.

    ``rate + D * (0.5 * ln(2 pi sigma^2) + distortion / (2 sigma^2))`` per image with
    ``sigma^2 = mean over the batch of the per-element MSE`` (gradients flow through it, as in
    the authors' code) and ``ln sigma`` soft-clipped at ``min_log_sigma``. No tolerance and no
    tuning: the decoder variance calibrates itself, so the distortion ends where the ELBO puts
    it. The baseline GECO is compared with in docs/RESULTS.md; in GECO's terms its multiplier is
    ``1 / (2 sigma^2)`` with no set-point.

    Args:
        min_log_sigma: soft lower bound of ``ln sigma`` (the authors: -6).
    """

    reads_log_likelihood = False  # its own decoder term takes the likelihood's place

    def __init__(self, min_log_sigma: float = -6.0) -> None:
        super().__init__()
        if not (is_number(min_log_sigma) and math.isfinite(min_log_sigma)):
            raise ValueError(f"SigmaVAE min_log_sigma must be a finite ln sigma (the authors: -6), got {min_log_sigma!r}.")
        self.min_log_sigma = float(min_log_sigma)

    def log_sigma(self, output: VAEOutput) -> Tensor:
        """``ln sigma`` of the batch (0-dim), soft-clipped from below."""
        # Clamped above 0: a batch reconstructed exactly (log 0 = -inf) gave a finite loss and NaN gradients.
        raw = 0.5 * output.distortion.float().mean().clamp_min(torch.finfo(torch.float32).tiny).log()
        return self.min_log_sigma + torch.nn.functional.softplus(raw - self.min_log_sigma)

    def forward(self, output: VAEOutput) -> Tensor:
        log_sigma = self.log_sigma(output)
        elements = math.prod(output.x.shape[1:])
        nll = elements * (0.5 * LOG_2PI + log_sigma + output.distortion.float() * torch.exp(-2 * log_sigma) / 2)
        return (output.rate.float() + nll).mean()


class GECOObjective(Objective):
    """GECO Lagrangian: ``E[rate] + sum_k lambda_k * D_k * C_k`` (Rezende & Viola 2018).

    ``C_k`` is the stop-gradient constraint of Algorithm 1 (value: moving average, gradient:
    this batch) and ``D_k`` the constraint's elements per example, so each term is in nats per
    image like the rate. Lambda and the moving average are this objective's buffers
    (:attr:`multipliers`, a :class:`~lightning_geco.geco.MultiplierState`): saved, loaded and
    moved with the model. :class:`~lightning_geco.callbacks.GECOCallback` attaches the
    :class:`~lightning_geco.geco.GECO` that moves them; training without it raises instead of
    silently keeping lambda where it is. Evaluation reads the multipliers as they stand (a
    loaded model: the trained lambda).

    Args:
        constraints: one or more constraints; default: per-element MSE at most 0.01 (20 dB).
    """

    reads_log_likelihood = False  # its constraints take the likelihood's place

    def __init__(self, constraints: Sequence[Constraint] | None = None) -> None:
        super().__init__()
        if isinstance(constraints, Constraint):
            raise TypeError(
                f"GECOObjective takes a list of constraints, got one {type(constraints).__name__}: pass "
                f"GECOObjective([{type(constraints).__name__}(...)])."
            )
        constraints = list(constraints) if constraints is not None else [ReconstructionMSE()]
        if not constraints:
            raise ValueError("GECOObjective needs at least one constraint, got an empty list.")
        for index, constraint in enumerate(constraints):
            _check_constraint(index, constraint)
        names = [c.name for c in constraints]
        if len(set(names)) != len(names):
            raise ValueError(
                f"GECOObjective constraint names must be unique, got {names}; give each its own, e.g. "
                f"{type(constraints[-1]).__name__}(..., name='{names[-1]}_2') (the name keys its lambda and its logs)."
            )
        readers = Counter(type(c).reading_name for c in constraints)
        for constraint in constraints:
            if readers[type(constraint).reading_name] > 1:
                constraint.name_readings_apart()
        self.constraints = ConstraintList(constraints)
        self.multipliers = MultiplierState(len(constraints))
        self.geco: GECO | None = None
        # Whether the first training batch's data were checked (each constraint's check_data).
        self._data_checked = False
        # The moving average's shift for a tolerance changed since the checkpoint, applied once
        # the multipliers have loaded (set_extra_state runs before its children load).
        self._tolerance_shift: Tensor | None = None
        #: set by GECOCallback: the first training batch's check is said on every rank together by
        #: the callback, at the end of each batch until every rank has checked one (a rank may
        #: train its first batches on a loss of its own), not by a collective of the first call
        self.first_batch_check_deferred = False
        #: this rank's first training batch's problem, for the callback to raise (deferred check)
        self.first_batch_problem: ValueError | None = None
        self.register_load_state_dict_post_hook(_shift_to_the_new_tolerances)

    def init_args(self) -> dict[str, object]:
        return {"constraints": list(self.constraints)}

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.constraints]

    def describe(self) -> list[dict[str, float | str]]:
        return [c.describe() for c in self.constraints]

    @property
    def lagrange_multiplier(self) -> Tensor:
        """lambda (K,), fp32, as it stands (the trained one, for a loaded model)."""
        return self.multipliers.lagrange_multiplier

    def get_extra_state(self) -> Tensor:
        """The tolerances the multipliers are trained for, (K,) float64 in each reading's units
        (``reading_tolerance``: an MSE also when stated as a PSNR), saved beside lambda in the
        state dict. A tensor, like every other state-dict value."""
        return torch.tensor([c.reading_tolerance for c in self.constraints], dtype=torch.float64)

    def set_extra_state(self, state: Any) -> None:
        """Warn, naming both values, when a constraint now asks for another tolerance than the one
        the loaded lambda was trained for (the model's own constructor argument wins), and move
        the moving average by the change: it holds each constraint's value, reading - tolerance
        (tolerance - reading for an "at least" one), and must read against the new tolerance."""
        if not isinstance(state, Tensor) or state.numel() != len(self.constraints):
            return
        shifts = []
        for trained, constraint in zip(state.tolist(), self.constraints):
            change = trained - constraint.reading_tolerance
            shifts.append(change if constraint.lower_is_better else -change)
            if not math.isclose(trained, constraint.reading_tolerance, rel_tol=1e-9):
                rank_zero_warn(
                    f"GECO constraint {constraint.name!r} now asks for {constraint.reading_name} at "
                    f"{constraint.reading_tolerance:g} (stated: {constraint.tolerance:g} {constraint.unit}); the "
                    f"checkpoint was trained with {trained:g}. Lambda is the checkpoint's: a resumed run goes on "
                    "from it towards the new tolerance (the moving average, reading - tolerance, is moved by the "
                    "change), and a test or validation judges the model against the new tolerance. "
                    "To load the model as trained, build it with the trained tolerance (a LightningModule that "
                    "calls self.save_hyperparameters() gets it back from load_from_checkpoint)."
                )
        if any(shifts):
            self._tolerance_shift = torch.tensor(shifts, dtype=torch.float64)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # A checkpoint from before the constraints were saved here still loads.
        if prefix + "_extra_state" in missing_keys:
            missing_keys.remove(prefix + "_extra_state")

    @property
    def first_batch_checked(self) -> bool:
        """Whether this objective has checked a first training batch (its data and signs)."""
        return self._data_checked

    def attach(self, geco: GECO) -> None:
        """Hand the objective the GECO that moves its multipliers (done by GECOCallback)."""
        if geco.names != self.names:
            raise ValueError(f"GECO state is for constraints {geco.names}, objective has {self.names}.")
        if geco.state is not self.multipliers:
            raise ValueError("GECO must move this objective's own multipliers: build it with state=objective.multipliers.")
        self.geco = geco

    def lagrangian(
        self,
        rate: Tensor,
        x: Tensor,
        reconstruction: Tensor,
        labels: Tensor | None = None,
        decoder_output: Tensor | None = None,
    ) -> Tensor:
        """GECO's loss for any model: ``E[rate] + sum_k lambda_k * D_k * C_k``, nats per example.

        The path for a LightningModule that is not one of ours: hand over the per-example rate
        (KL in nats, (N,)) and what the constraints read (the data and its reconstruction in the
        data's own shape and units; labels for a classification constraint), and use the result
        as the training loss. ``GECOCallback`` finds this objective among the module's
        submodules and moves lambda as for the collection's models. See the README, "Bring your
        own model".
        """
        if decoder_output is None:
            for constraint in self.constraints:
                if constraint.reads_decoder_output:
                    raise ValueError(
                        f"{type(constraint).__name__} {constraint.name!r} reads the decoder's raw output (Bernoulli "
                        "logits), not the reconstruction: pass lagrangian(rate, x, reconstruction, decoder_output=logits)."
                    )
        return self(VAEOutput.from_terms(x, reconstruction, rate, labels=labels, decoder_output=decoder_output))

    def constraint_values(self, output: VAEOutput) -> Tensor:
        """Per-example constraint values, shape (N, K), fp32."""
        values = [_as_fp32(c(output)) for c in self.constraints]
        if not self._data_checked:  # the first batch: a wrong shape named by its constraint
            for constraint, value in zip(self.constraints, values):
                if value.shape != output.x.shape[:1]:
                    raise ValueError(
                        f"{type(constraint).__name__} {constraint.name!r}: forward() must return one value per "
                        f"example, shape ({output.x.shape[0]},), got {tuple(value.shape)}."
                    )
        return torch.stack(values, dim=1)

    def forward(self, output: VAEOutput) -> Tensor:
        """The Lagrangian; in eval mode the batch's own constraint with lambda as it stands."""
        if self.training and torch.is_grad_enabled() and not self._data_checked:
            # Once, on the first training batch (the collection's models' and lagrangian()'s): a
            # tolerance the data make impossible (or meaningless) is said now, not after the run.
            problem: ValueError | None = None
            try:
                for stated in self.constraints:
                    stated.check_data(output)
                values = self.constraint_values(output)
                for k, stated in enumerate(self.constraints):
                    _check_sign(stated, output, values[:, k])
            except ValueError as error:
                problem = error
            self._data_checked = True
            if self.first_batch_check_deferred and problem is not None:
                # Said by the callback at this batch's end, on every rank together. Until then the
                # step runs on non-finite values, which GECO skips on every rank (no weight, moment
                # or lambda moves), connected to every weight the reconstruction reads (DDP's
                # reducer waits for their gradients).
                self.first_batch_problem = problem
                values = _non_finite_values(output, len(self.constraints))
            elif not self.first_batch_check_deferred:
                raise_on_every_rank(problem, output.x.device, FIRST_BATCH_REFUSED_ELSEWHERE)
        else:
            values = self.constraint_values(output)
        if self.training:
            if self.geco is None:
                raise RuntimeError(
                    "GECOObjective has nothing to move its Lagrange multipliers: nothing would update lambda. "
                    "Add lightning_geco.GECOCallback() to Trainer(callbacks=[...])."
                )
            constraint = self.geco.constraint_term(values)
        else:
            # Validation reads lambda but never records statistics or moves the state.
            constraint = values.mean(dim=0)
        lam = self.multipliers.lagrange_multiplier
        # Summed from the first term (``sum()`` would start with an op adding 0).
        lagrangian = functools.reduce(
            operator.add, (lam[k] * c.num_elements(output) * constraint[k] for k, c in enumerate(self.constraints))
        )
        loss = _as_fp32(output.rate).mean() + lagrangian
        if self.geco is not None and self.training:
            self.geco.record_loss(loss)
        return loss


#: what a rank whose first training batch passed says when another rank's did not
FIRST_BATCH_REFUSED_ELSEWHERE = "GECOObjective: another rank refused its first training batch (see its error)."


def _non_finite_values(output: VAEOutput, k: int) -> Tensor:
    """Constraint values (N, K) of NaN, connected to the reconstruction."""
    return (output.reconstruction.flatten(1).sum(dim=1, keepdim=True) * float("nan")).float().expand(-1, k)


def _shift_to_the_new_tolerances(objective: GECOObjective, incompatible_keys: Any) -> None:
    """After a load: move the moving average by the tolerances' change set_extra_state found,
    where the load brought the checkpoint's moving average (not one kept or reset beside it)."""
    shift, objective._tolerance_shift = objective._tolerance_shift, None
    kept = any(key.endswith("multipliers.constraint_ema") for key in incompatible_keys.missing_keys)
    if shift is not None and not kept:
        ema = objective.multipliers.constraint_ema
        ema.add_(shift.to(device=ema.device, dtype=ema.dtype))


def _check_constraint(index: int, constraint: object) -> None:
    """Refuse what GECOObjective cannot read as a constraint, naming it (a bare float, a class
    missing the interface's attributes) before it fails deep inside."""
    if not isinstance(constraint, Constraint):
        raise TypeError(
            f"GECOObjective constraints must be Constraint instances, got {type(constraint).__name__} "
            f"{constraint!r} at position {index}; e.g. ReconstructionMSE(tolerance=0.01)."
        )
    missing = [name for name in ("name", "unit", "tolerance", "reading_name") if not hasattr(constraint, name)]
    if missing:
        raise TypeError(
            f"{type(constraint).__name__} (constraint {index}) does not set {', '.join(missing)}: a Constraint "
            "sets name, unit, tolerance and reading_name (the key of its validation reading, val/<reading_name>)."
        )
    tolerance = constraint.tolerance
    try:  # a number, or a one-element tensor (a buffer)
        finite = not isinstance(tolerance, bool) and math.isfinite(float(tolerance))
    except (TypeError, ValueError, RuntimeError):
        finite = False
    if not finite:
        raise ValueError(
            f"{type(constraint).__name__} {constraint.name!r} has tolerance {tolerance!r}; it must be a finite "
            f"number of {constraint.unit}."
        )


def _check_sign(constraint: Constraint, output: VAEOutput, values: Tensor) -> None:
    """On the first training batch, refuse a constraint whose ``forward`` (<= 0: met) and whose
    reading against its tolerance (:meth:`Constraint.relative_violation`) disagree clearly on
    whether it is met: lambda would be steered the wrong way, and the verdict would judge
    another quality (an "at least" PSNR with forward ``tolerance - reading`` but
    ``lower_is_better`` left True ended "met" 56 % short of it)."""
    try:
        with torch.no_grad():  # a frozen network's second pass: no graph kept
            reading = float(constraint.reading(output).float().mean())
    except NotImplementedError:
        return
    value = float(values.detach().mean())
    past = constraint.relative_violation(reading)
    if math.isfinite(value) and math.isfinite(past) and abs(past) > 0.05 and value * past < 0:
        direction = "at most" if constraint.lower_is_better else "at least"
        raise ValueError(
            f"{type(constraint).__name__} {constraint.name!r}: on the first training batch forward() gives "
            f"{value:.4g} ({'met' if value <= 0 else 'not met'}: <= 0 is met), but the reading {reading:.4g} "
            f"against the tolerance {constraint.reading_tolerance:g}, read as '{direction}' (lower_is_better="
            f"{constraint.lower_is_better}), is {100 * past:+.1f} % past it. For an 'at most' tolerance forward "
            "returns reading - tolerance; for an 'at least' one tolerance - reading, with lower_is_better = False."
        )


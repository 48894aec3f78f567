"""GECOCallback: the one place the Lagrange multipliers move.

Cadence: once per optimizer step (``on_before_optimizer_step``, which Lightning calls after
the backward pass of the last micro-batch of an accumulation window, before ``step``).
Never during validation, test or predict: those run the objective in eval mode, which reads
lambda and records nothing.

DDP: every rank contributes ``[sum of per-example constraints (K), example count, non-finite
flags]`` in fp32 to ONE all-reduce (SUM), every rank applies the same update to the same
numbers, so lambda and the moving average are bit-identical on all ranks without a
broadcast. Under automatic optimization the collective runs on every rank at every optimizer
step, whether or not this rank's batch went through the objective (a rank that recorded
nothing adds no examples); no rank-local condition can skip it. The objective's check of a
first training batch is said at the end of each batch, on every rank together, until every
rank has checked one (:meth:`GECOCallback._check_first_batches`). Under manual optimization
the update runs at the first step after the objective was called on the batch, so every rank
must call it on the same batches.

Non-finite values: a NaN/inf in any rank's constraint or loss makes the reduced flag
non-zero on every rank together: lambda is left alone, the step's gradients are dropped
(so NaN never reaches the optimizer state), the skip is counted and logged, and after
``max_nonfinite_steps`` consecutive skips training stops with an error (as it does after as
many non-finite calibration measurements in a row, which leave lambda alone).

Checkpoints: lambda and the moving average are buffers of the model's objective
(:class:`~lightning_geco.geco.MultiplierState`), saved and loaded with the weights; this
callback's :meth:`state_dict` holds what only training needs: the update counts, the
controller's state and the constraints as stated (name, tolerance, unit).
"""

from __future__ import annotations

import inspect
import math
import operator
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import Dataset

from lightning_geco.batches import dataset_length, first_loader
from lightning_geco.calibration import NO_CALIBRATION_SPLIT, CalibrationStream, why_not_measurable
from lightning_geco.checks import is_count, is_positive_int
from lightning_geco.collectives import all_reduce_sum
from lightning_geco.constraints import Constraint
from lightning_geco.controllers import CONTROLLER_NAMES, Algorithm1, MultiplierController, PIController
from lightning_geco.geco import DEFAULT_LOG_LAMBDA_BOUNDS, DRIVES, GECO, MultiplierState, constraint_means
from lightning_geco.metrics import compiler_available
from lightning_geco.objectives import FIRST_BATCH_REFUSED_ELSEWHERE, GECOObjective
from lightning_geco.verdict import StallDetector

#: what ``GECOCallback(drive=...)`` accepts: GECO's two drives, or ``"auto"`` to pick one per run
CALLBACK_DRIVES = ("auto", *DRIVES)
#: ``drive="auto"`` measures on the calibration split once a run sees its training images more
#: often than this: at 1.7 epochs (full MNIST, Fashion-MNIST) the training batches read as new
#: images do (validation within 0.6 % of the tolerance they are held at), at 11-12 (KMNIST's
#: test split as the training set, with and without a calibration split carved) they read 2 %
#: better and at 38-44 (Omniglot's small set) 14 % better, and GECO driven by them misses on
#: new images
AUTO_CALIBRATION_EPOCHS = 8.0
#: per controller, the ``(alpha, step_size)`` GECOCallback takes when they are not given:
#: Algorithm 1 as written for ``"paper"`` (an absolute nu of 1); for ``"relative"`` a nu of
#: 0.006 per unit of relative violation (``"pi"`` reads only alpha, for the loss's moving average)
CONTROLLER_DEFAULTS: dict[str, tuple[float, float]] = {"paper": (0.99, 1.0), "relative": (0.9, 0.006), "pi": (0.9, 0.006)}
#: batches between the host reads of the non-finite streak and the stall watch when the Trainer
#: writes no step logs (``log_every_n_steps=0``); else they come at its logging steps
UNLOGGED_CHECK_EVERY = 50
#: optimizer steps the stall rule looks back over in a fit with no planned end (neither
#: ``max_steps`` nor ``max_epochs``)
UNPLANNED_STALL_WINDOW = 300

__all__ = [
    "AUTO_CALIBRATION_EPOCHS",
    "CALLBACK_DRIVES",
    "CONTROLLER_DEFAULTS",
    "GECOCallback",
    "NonFiniteConstraintError",
    "ObjectiveNeverCalledError",
    "STEP_KEY_PREFIXES",
    "UNLOGGED_CHECK_EVERY",
    "UNPLANNED_STALL_WINDOW",
    "find_geco_objective",
    "is_last_batch_of_fit",
    "is_logging_step",
    "planned_steps",
    "step_values_monitored",
    "step_values_read",
    "upgrade_multiplier_buffers",
]


class ObjectiveNeverCalledError(RuntimeError):
    """A fit whose training batches never went through the model's GECOObjective (see GECOCallback)."""


class NonFiniteConstraintError(RuntimeError):
    """Raised after too many consecutive optimizer steps with a non-finite constraint or loss."""


def _nonfinite_advice(trainer: pl.Trainer) -> str:
    """What to change after a run of non-finite steps, for the precision the run trains in."""
    precision = str(getattr(trainer, "precision", "32-true"))
    if precision.startswith("16"):
        more_range = " or a precision with more range (bf16-mixed, or 32)"
    elif precision.startswith("bf16"):
        more_range = " or full precision (32)"
    else:
        more_range = ""
    return (
        "Clip the gradients (--trainer.gradient_clip_val 1.0; a run resumed from an earlier checkpoint takes it "
        f"too) or train with a lower learning rate{more_range}, and check the data."
    )


def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether values logged now reach the loggers: Lightning writes step values every
    ``log_every_n_steps`` optimizer steps, and at the fit's last step when it stops there (as
    :class:`~lightning_geco.summary.RunSummary` asks it to); the values are logged at that step too.

    Step-level ``self.log`` calls cost ~0.5-1 ms each in Lightning's bookkeeping whether or not
    they are written, which is ~10 % of a small model's step; skipping them between writes
    changes nothing any logger sees.
    """
    connector = getattr(trainer, "_logger_connector", None)
    due = connector.should_update_logs if connector is not None else True
    return due or is_last_batch_of_fit(trainer, trainer.global_step + 1)


# what the keys logged at training steps (by GECOCallback and the collection's models) start with
STEP_KEY_PREFIXES = ("geco/", "train/")


def step_values_monitored(trainer: pl.Trainer) -> bool:
    """Whether a callback (a ``ModelCheckpoint`` or ``EarlyStopping``: any with a ``monitor``) or a
    learning-rate scheduler of ``trainer`` monitors a key logged at training steps (``geco/...``,
    ``train/...``). It reads ``callback_metrics`` whenever it checks, which Lightning keeps fresh at
    every step for a value logged at every step: such keys must then be logged at every step,
    not at the loggers' steps only (:func:`is_logging_step`), or it ranks a stale value."""
    monitors = [getattr(callback, "monitor", None) for callback in trainer.callbacks]  # type: ignore[attr-defined]
    monitors += [config.monitor for config in getattr(trainer, "lr_scheduler_configs", None) or []]
    return any(isinstance(key, str) and key.startswith(STEP_KEY_PREFIXES) for key in monitors)


def step_values_read(trainer: pl.Trainer) -> bool:
    """Whether values logged at this training step are read: by the loggers
    (:func:`is_logging_step`), or by a monitor at every step (:func:`step_values_monitored`)."""
    return is_logging_step(trainer) or step_values_monitored(trainer)


def is_last_batch_of_fit(trainer: pl.Trainer, steps: int) -> bool:
    """Whether the training batch at hand is the fit's last, ``steps`` being the optimizer steps
    taken once it has stepped (``global_step + 1`` before its step, ``global_step`` after):
    ``max_steps`` reached, or the last batch of the last of ``max_epochs`` (an epoch-bounded
    fit's last step logged stale values, read before it had stepped)."""
    if 0 < trainer.max_steps <= steps:
        return True
    max_epochs = trainer.max_epochs
    last_epoch = max_epochs is not None and max_epochs > 0 and trainer.current_epoch + 1 >= max_epochs
    # Lightning's data fetcher sets this when it fetches the batch, also for a loader without a length.
    return last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


def _learning_rate(optimizer: Optimizer) -> float:
    """The first parameter group's learning rate, as a Python float (a tensor learning rate, as
    capturable optimizers keep, is read on the host: a sync on a GPU)."""
    return float(optimizer.param_groups[0]["lr"])


def planned_steps(trainer: pl.Trainer) -> int | None:
    """The fit's planned optimizer steps, from ``max_steps`` or ``max_epochs``, whichever ends it
    first (None: unbounded). Needs the training loader's length: asked at the start of training."""
    planned = trainer.estimated_stepping_batches
    return int(planned) if math.isfinite(planned) and planned > 0 else None


def _full_pass_batches(trainer: pl.Trainer) -> float:
    """Batches (per process) in one pass over the whole training set: the loader's length, not
    the epoch's (``limit_train_batches`` shortens an epoch; the DataModules' next epoch goes on
    through the shuffled set, and a loader that reshuffles each epoch draws another tenth);
    the epoch's where the loader has no length."""
    try:
        return float(len(first_loader(trainer.train_dataloader)))
    except TypeError:
        return float(trainer.num_training_batches)


def _planned_epochs(trainer: pl.Trainer, planned_steps: int | None) -> float:
    """How many times the fit goes over its training set: ``planned_steps`` over the optimizer
    steps of one pass over it (a last partial accumulation window steps too); 0 when either is
    unknown."""
    batches = _full_pass_batches(trainer)
    if planned_steps is None or not math.isfinite(batches) or batches <= 0:
        return 0.0
    return planned_steps / math.ceil(batches / max(1, trainer.accumulate_grad_batches))


#: the settings only some controllers read, and those controllers
_CONTROLLER_SETTINGS = {
    "step_size": ("relative", "paper"),
    "release_speedup": ("relative",),
    "max_relative_violation": ("relative",),
    **dict.fromkeys(
        ("proportional_gain", "integral_gain", "smoothing_steps", "integral_error_limit", "approach_steps",
         "ramp_steps", "noise_correction", "release_threshold"),
        ("pi",),
    ),
}


def _tolerance_changed(before: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether a constraint is held to another tolerance than the checkpoint's (compared in the
    reading's units; a checkpoint from before they were saved, as stated)."""
    if "reading_tolerance" in before:
        return not math.isclose(before["reading_tolerance"], now["reading_tolerance"], rel_tol=1e-9)
    return (before.get("tolerance"), before.get("unit")) != (now["tolerance"], now["unit"])


def find_geco_objective(pl_module: pl.LightningModule) -> GECOObjective:
    """The model's single :class:`GECOObjective`; a clear error when there is none or several."""
    found = [m for m in pl_module.modules() if isinstance(m, GECOObjective)]
    if len(found) != 1:
        fix = (
            "Put every constraint in one GECOObjective(constraints=[...]) (one lambda each)"
            if found
            else "Use objective=GECOObjective(...) or remove the callback"
        )
        raise ValueError(
            f"GECOCallback needs a model with exactly one GECOObjective, found {len(found)} in "
            f"{type(pl_module).__name__}. {fix}."
        )
    return found[0]


def upgrade_multiplier_buffers(checkpoint: dict[str, Any], pl_module: pl.LightningModule) -> None:
    """Give a checkpoint written before lambda and the moving average were model buffers the
    buffers its model now expects (in place; call from ``on_load_checkpoint``).

    Such a checkpoint kept them in GECOCallback's state only; they are copied from there. A
    checkpoint with neither keeps the model's own values, with a warning.
    """
    weights = checkpoint.get("state_dict")
    if weights is None:
        return
    for name, module in pl_module.named_modules():
        if not isinstance(module, MultiplierState) or f"{name}.log_lagrange_multiplier" in weights:
            continue
        saved = next(
            (
                state["geco"]
                for state in checkpoint.get("callbacks", {}).values()
                if isinstance(state, dict) and "log_lagrange_multiplier" in state.get("geco", {})
            ),
            None,
        )
        if saved is None:
            rank_zero_warn(
                f"The checkpoint holds no GECO multipliers for {name!r} (it was saved without GECOCallback, or "
                f"before they were part of the model): lambda stays at {module.lagrange_multiplier.tolist()}."
            )
            values = {key: value.clone() for key, value in module.state_dict().items()}
        else:
            values = {
                "log_lagrange_multiplier": saved["log_lagrange_multiplier"].float(),
                "constraint_ema": saved["constraint_ema"].float(),
                "seeded": torch.tensor(bool(saved["seeded"])),
            }
        for key, value in values.items():
            weights[f"{name}.{key}"] = value


class GECOCallback(Callback):
    """Moves GECO's Lagrange multipliers, identically on every rank, and watches for a hopeless run.

    Three controllers (:mod:`lightning_geco.controllers`), chosen by ``controller``:

    - ``"pi"`` (the default, chosen by the table in docs/RESULTS.md): a PI law on ``log lambda``
      with the log-ratio error ``ln(reading / tolerance)``, a clamped integrator that holds
      while the reading is already falling onto its tolerance; ``proportional_gain``,
      ``integral_gain``, ``smoothing_steps``, ``integral_error_limit``, ``approach_steps``, and
      ``ramp_steps`` (an optional second integrator for lambda's drift, off: see docs/RESULTS.md;
      ``ramp_follows_lr`` scales the drift it applies by the learning rate over the largest it
      has been in the fit, so a learned descent slows as an annealed model stops improving),
      ``noise_correction`` (each measurement's log error plus half its running variance, so noisy
      measurements are held at their mean, not their median; off: see docs/RESULTS.md),
      ``release_threshold`` (lambda released fast while the reading stays far under its
      tolerance, as after a model learns at once: on at 0.5, None turns it off).
    - ``"relative"``: the default before PI, ``log lambda += nu * C_ma / scale`` with the
      moving average ``alpha``, each rise capped at ``nu * max_relative_violation`` and falls
      ``release_speedup`` times faster; ``nu`` is ``step_size`` and has no units.
    - ``"paper"``: Algorithm 1 as written, ``log lambda += nu * C_ma`` with the absolute
      ``step_size`` nu (units: one over the constraint's) and ``alpha``.

    What drives it, chosen by ``drive``:

    - ``"auto"`` (the default): ``"calibration"`` when the training batches would read better
      than new images, and a calibration split is there; ``"training"`` otherwise. They would
      when a constraint says so (``optimistic_on_training_images``: a classifier's
      cross-entropy, the classifier having trained on those images), when the run sees each
      training image more than :data:`AUTO_CALIBRATION_EPOCHS` (8) times (its planned optimizer
      steps, from ``max_steps`` or ``max_epochs``, over an epoch's), or when
      ``calibration_dataset`` is given. Decided at the start of training, by rank 0 for every
      rank, and kept by a resumed run; choosing the calibration split is said in one line.
      A module of your own is measured so when it can be: its ``forward(x, labels)`` returns a
      :class:`~lightning_geco.VAEOutput` (tried once, on one calibration image, in eval mode
      without gradients). Without a split, or for a module that cannot be measured, it uses the
      training batches, and warns with the fix (for a module of your own, only for a
      constraint that says so).
    - ``"training"``: the training batches, every optimizer step (the paper).
    - ``"calibration"``: every ``calibration_every`` optimizer steps, ``calibration_batch_size``
      images of a calibration split the model never trains on (``num_calibration`` of the
      DataModules, or ``calibration_dataset``), read without gradients in eval mode (as the
      validation reading is). The images of measurement m are a seeded function of
      (``calibration_seed``, m), split over the ranks, and their constraint sums go through
      one all-reduce: every rank applies the same update, a resumed run measures what the
      uninterrupted one would, and 2 ranks see the same examples as 1 process.

    Lambda never moves during validation, test or predict. A NaN/inf in any rank's
    constraint or loss skips the step on every rank together (lambda left alone; a fused
    optimizer, as the models here use, gets GradScaler's device-side ``found_inf`` flag and
    leaves parameters, moments and step counts as they were; any other optimizer's gradients
    are dropped after one host read). A step that does not log reads nothing on the host (with
    ``log_every_n_steps=0``, every 50th batch reads the non-finite streak and feeds the stall watch).
    Once ``max_nonfinite_steps`` steps in a row were skipped, training stops with an error at
    the next logging step, also when the run of skips has ended by then (at once on the host path).

    ``compile=True`` fuses the per-step work: the moving average, the controller and the skip
    decision run as four ``torch.compile``-built functions instead of ~100 small tensor ops
    (see :mod:`lightning_geco.geco`), with the same results. That is for a step bound by the
    host launching kernels (a small model on a GPU); it costs seconds of compiling per process,
    and on a CPU it does not pay (entering a compiled function costs more host time there than
    the ops it replaces; README, "Benchmarks").
    Off by default: it needs a compiler and seconds at the first step, and on an H200 it bought
    back under half of what GECO costs there (GECO / ELBO throughput 0.77 -> 0.83 in fp32;
    ``benchmarks/gpu.py``, ``benchmarks/step_profile.py``).

    At every logging step a :class:`~lightning_geco.verdict.StallDetector` reads lambda and the
    regulated reading; when more lambda stops buying quality (see :mod:`lightning_geco.verdict`)
    it warns once with the figures, so a hopeless run can be stopped, and the run's verdict
    becomes ``unreachable`` unless the tolerance is met in the end.

    Args:
        controller: ``"pi"``, ``"relative"`` or ``"paper"``.
        alpha: moving-average coefficient in [0, 1) of the training constraint (the loss
            value and the logs; the input of ``"relative"`` and ``"paper"``). Default (None):
            the controller's own, :data:`CONTROLLER_DEFAULTS` (0.99 for ``"paper"``, as
            Algorithm 1; 0.9 otherwise).
        step_size: nu > 0 of ``"relative"`` (no units; default 0.006) and ``"paper"``
            (absolute, in one over the constraint's units; default 1, as Algorithm 1).
        release_speedup: >= 1, ``"relative"`` only.
        max_relative_violation: ``"relative"`` only (None: no cap).
        proportional_gain, integral_gain, smoothing_steps, integral_error_limit, approach_steps, ramp_steps,
        ramp_follows_lr, noise_correction, release_threshold:
            ``"pi"`` only, see :class:`~lightning_geco.controllers.PIController` (per optimizer step).
        drive: ``"auto"``, ``"training"`` or ``"calibration"``.
        calibration_every: optimizer steps between calibration measurements (under manual
            optimization, GECO's updates: a critic's steps do not count).
        calibration_batch_size: images per calibration measurement, over all ranks together.
        calibration_seed: seed of the measurements' images and latent noise (an int >= 0).
        calibration_dataset: the calibration split (default: ``trainer.datamodule.calibration_dataset``).
        log_lambda_bounds: clamp of log lambda, so exp() never overflows; within [-60, 60]
            (``lightning_geco.geco.LOG_LAMBDA_LIMIT``: e^60 ~ 1e26 leaves fp32 head room for the per-image sums).
        initial_lambda: lambda before the first update (the paper: 1).
        max_nonfinite_steps: consecutive non-finite optimizer steps tolerated before an error
            (a step whose batches skipped the objective neither counts nor breaks the run);
            under the calibration drive, consecutive non-finite calibration measurements too.
        stall_window: steps the unreachable rule looks back over, as a fraction of the fit's
            planned optimizer steps (``max_steps``, or what ``max_epochs`` makes of them; with
            neither, 300 steps).
        compile: run GECO's per-step bookkeeping and update as ``torch.compile``-fused functions.
    """

    def __init__(
        self,
        controller: str = "pi",
        alpha: float | None = None,
        step_size: float | None = None,
        release_speedup: float = 3.0,
        max_relative_violation: float | None = 1.0,
        proportional_gain: float = 0.5,
        integral_gain: float = 0.08,
        smoothing_steps: float = 10.0,
        integral_error_limit: float | None = 0.075,
        approach_steps: float | None = 200.0,
        ramp_steps: float | None = None,
        ramp_follows_lr: bool = False,
        noise_correction: bool = False,
        release_threshold: float | None = 0.5,
        drive: str = "auto",
        calibration_every: int = 16,
        calibration_batch_size: int = 64,
        calibration_seed: int = 0,
        calibration_dataset: Dataset | None = None,
        log_lambda_bounds: tuple[float, float] = DEFAULT_LOG_LAMBDA_BOUNDS,
        initial_lambda: float = 1.0,
        max_nonfinite_steps: int = 10,
        stall_window: float = 0.2,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if controller not in CONTROLLER_NAMES:
            raise ValueError(f"GECOCallback controller must be one of {CONTROLLER_NAMES}, got {controller!r}.")
        if drive not in CALLBACK_DRIVES:
            raise ValueError(f"GECOCallback drive must be one of {CALLBACK_DRIVES}, got {drive!r}.")
        given = {  # as passed: a controller that does not read one of these is warned below
            "step_size": step_size, "release_speedup": release_speedup, "max_relative_violation": max_relative_violation,
            "proportional_gain": proportional_gain, "integral_gain": integral_gain, "smoothing_steps": smoothing_steps,
            "integral_error_limit": integral_error_limit, "approach_steps": approach_steps, "ramp_steps": ramp_steps,
            "noise_correction": noise_correction, "release_threshold": release_threshold,
        }
        default_alpha, default_step_size = CONTROLLER_DEFAULTS[controller]
        alpha = default_alpha if alpha is None else alpha
        step_size = default_step_size if step_size is None else step_size
        # Validate now, before any Trainer exists: probe states raise the clear errors.
        GECO(["probe"], alpha, step_size, log_lambda_bounds, initial_lambda, release_speedup)
        PIController(
            proportional_gain, integral_gain, smoothing_steps, integral_error_limit=integral_error_limit,
            approach_steps=approach_steps, ramp_steps=ramp_steps, noise_correction=noise_correction,
            release_threshold=release_threshold,
        )
        if max_relative_violation is not None and not max_relative_violation > 0:
            raise ValueError(f"max_relative_violation must be positive or None, got {max_relative_violation!r}.")
        if not is_positive_int(max_nonfinite_steps):
            raise ValueError(f"max_nonfinite_steps must be a positive int, got {max_nonfinite_steps!r}.")
        for name, value in (("calibration_every", calibration_every), ("calibration_batch_size", calibration_batch_size)):
            if not is_positive_int(value):
                raise ValueError(f"GECOCallback {name} must be a positive int, got {value!r}.")
        if not is_count(calibration_seed, 0):
            # else a trace from torch's manual_seed at the first measurement, mid-fit
            raise ValueError(f"GECOCallback calibration_seed must be an int >= 0, got {calibration_seed!r}.")
        for name, flag in (("compile", compile), ("ramp_follows_lr", ramp_follows_lr)):
            if not isinstance(flag, bool):
                raise ValueError(f"GECOCallback {name} must be True or False, got {flag!r}.")
        if ramp_follows_lr and (controller != "pi" or ramp_steps is None):
            raise ValueError(
                "GECOCallback ramp_follows_lr=True paces the drift the PI controller learns with ramp_steps; "
                f"it needs controller='pi' and ramp_steps set (e.g. 300), got controller={controller!r}, "
                f"ramp_steps={ramp_steps!r}."
            )
        if not 0.0 < stall_window <= 1.0:
            raise ValueError(f"GECOCallback stall_window must lie in (0, 1] (a fraction of the planned steps), got {stall_window!r}.")
        # The defaults of the class in use (a subclass's own, where its signature names them).
        defaults = {**inspect.signature(GECOCallback.__init__).parameters, **inspect.signature(type(self).__init__).parameters}
        unread = [
            f"{name}={value!r}"
            for name, value in given.items()
            if controller not in _CONTROLLER_SETTINGS[name] and value != defaults[name].default
        ]
        if unread:
            rank_zero_warn(
                f"GECOCallback(controller={controller!r}) does not read {', '.join(unread)}: "
                f"{'they are other controllers settings and change' if len(unread) > 1 else 'it is another controller setting and changes'} "
                "nothing (see GECOCallback's docstring for which controller reads which)."
            )
        self.controller = controller
        self.alpha = alpha
        self.step_size = step_size
        self.release_speedup = release_speedup
        self.max_relative_violation = max_relative_violation
        self.proportional_gain = proportional_gain
        self.integral_gain = integral_gain
        self.smoothing_steps = smoothing_steps
        self.integral_error_limit = integral_error_limit
        self.drive = drive
        self.approach_steps = approach_steps
        self.ramp_steps = ramp_steps
        self.ramp_follows_lr = ramp_follows_lr
        self.noise_correction = noise_correction
        self.release_threshold = release_threshold
        self.calibration_every = operator.index(calibration_every)
        self.calibration_batch_size = operator.index(calibration_batch_size)
        self.calibration_seed = operator.index(calibration_seed)
        self.calibration_dataset = calibration_dataset
        lower, upper = log_lambda_bounds
        self.log_lambda_bounds: tuple[float, float] = (lower, upper)
        self.initial_lambda = initial_lambda
        self.max_nonfinite_steps = operator.index(max_nonfinite_steps)
        self.stall_window = stall_window
        self.compile = compile
        self.geco: GECO | None = None
        self.objective: GECOObjective | None = None
        self.detector: StallDetector | None = None
        # the fit's calibration stream, when the calibration split drives lambda (set up per fit)
        self._calibration: CalibrationStream | None = None
        self._last_calibration: Tensor | None = None
        self._warned_repeated_calls = False
        self._manual_updates = 0  # GECO's updates in this run under manual optimization (see _update_index)
        self._state_to_load: dict[str, Any] | None = None
        self._resumed_drive: str | None = None
        # Whether this training batch's optimizer step updated GECO (a second optimizer on the
        # same batch, under manual optimization, must not update it again).
        self._batch_updated = False
        # Fused optimizers this batch's skip decision was handed to (found_inf): the flag is taken
        # off at the batch's end, as GradScaler deletes its own after the step, or every later
        # step of that optimizer GECO does not decide would read it.
        self._flagged: list[Optimizer] = []
        # Whether the objective was recorded (and GECO updated) in this fit, and its training
        # batches so far: a training_step that never calls the objective is refused (_check_engaged).
        self._engaged = False
        self._batches_this_fit = 0
        # Whether every rank's first training batch was checked (see _check_first_batches).
        self._first_batches_checked = False
        # calibration measurements taken in this fit, and (valid ones so far, measurements then) as
        # last seen by _check_measurements
        self._measurements_this_fit = 0
        self._valid_measurements_seen = (0, 0)
        # The Trainer settings a resumed fit must share to continue its checkpoint's run
        # (saved, so a resume with others says so): precision and gradient accumulation
        self._trainer_settings: dict[str, Any] = {}
        # The largest learning rate this fit has stepped with (ramp_follows_lr); saved, so a
        # resumed run paces the drift as the uninterrupted one.
        self._peak_learning_rate: float | None = None

    # ------------------------------------------------------- guarded state
    # ``geco``, ``objective`` and the calibration split exist from ``setup()`` on; the hooks that
    # Lightning calls after it read them through these, which say so when that order is broken.
    @staticmethod
    def _not_set_up(what: str) -> RuntimeError:
        return RuntimeError(
            f"GECOCallback used before setup(): {what} is only known once the Trainer has called "
            "setup() (pass the callback to Trainer(callbacks=[...]) and fit through that Trainer)."
        )

    @property
    def _ready_geco(self) -> GECO:
        if self.geco is None:
            raise self._not_set_up("the GECO state (lambda, moving average)")
        return self.geco

    @property
    def _ready_objective(self) -> GECOObjective:
        if self.objective is None:
            raise self._not_set_up("the model's GECOObjective")
        return self.objective

    # --------------------------------------------------------------- set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._resumed_drive = None  # a fit without a checkpoint chooses afresh; a checkpoint's is restored below
        self.objective = find_geco_objective(pl_module)
        rebuilt = self.geco is None or self.geco.state is not self.objective.multipliers
        if rebuilt:
            self.geco = self._build_geco(self.objective)
        geco = self._ready_geco
        self.objective.attach(geco)
        self.objective.first_batch_check_deferred = True  # said by _check_first_batches
        # A new fit; a checkpoint's are restored below (or, with some strategies, after on_fit_start).
        self._peak_learning_rate = None
        if stage == "fit":  # each fit starts without a measurement, a resumed one with its checkpoint's
            self._last_calibration = None
            self._calibration = None
            self._manual_updates = 0  # a checkpoint's count is restored below
            self._engaged, self._batches_this_fit = False, 0
            self._first_batches_checked = False  # this fit's objective may not have checked one yet
            self._trainer_settings = {
                "precision": str(trainer.precision), "accumulate_grad_batches": trainer.accumulate_grad_batches,
            }
        if stage == "fit" and (rebuilt or self.detector is None or trainer.global_step == 0):
            # Each fit watches its own history, a resumed one its checkpoint's (restored below, or
            # after on_fit_start with some strategies), a Trainer fitted again on the same model
            # its own so far; on_train_start hands it the plan.
            self.detector = StallDetector(geco.num_constraints, UNPLANNED_STALL_WINDOW, self.log_lambda_bounds[1])
        if stage == "fit" and self.drive == "calibration":
            calibration = self._find_calibration(trainer)
            if calibration is None:
                raise ValueError(NO_CALIBRATION_SPLIT)
            self._calibration = self._stream(calibration)
        self._restore_if_pending()

    def _build_geco(self, objective: GECOObjective) -> GECO:
        constraints = list(objective.constraints)
        own_steps = [f"{c.name!r} (step_size={c.step_size!r})" for c in constraints if c.step_size is not None]
        if own_steps and self.controller != "relative":
            rank_zero_warn(
                f"GECOCallback(controller={self.controller!r}) does not read a constraint's own step_size: "
                f"{', '.join(own_steps)} change{'s' if len(own_steps) == 1 else ''} nothing (controller='relative' reads it)."
            )
        scales = [self._scale(c) for c in constraints]
        law: MultiplierController
        if self.controller == "pi":
            law = PIController(
                self.proportional_gain,
                self.integral_gain,
                self.smoothing_steps,
                self.log_lambda_bounds,
                self.integral_error_limit,
                self.approach_steps,
                ramp_steps=self.ramp_steps,
                noise_correction=self.noise_correction,
                release_threshold=self.release_threshold,
            )
        elif self.controller == "relative":
            cap = self.max_relative_violation
            law = Algorithm1(
                [self.absolute_step_size(c) for c in constraints],
                self.release_speedup,
                None if cap is None else [self.relative_step_size(c) * cap for c in constraints],
            )
        else:
            law = Algorithm1([self.step_size] * len(constraints))
        return GECO(
            [c.name for c in constraints],
            self.alpha,
            log_lambda_bounds=self.log_lambda_bounds,
            initial_lambda=self.initial_lambda,
            controller=law,
            scales=scales,
            drive=self.active_drive,
            state=objective.multipliers,
            compile=self.compile,
        )

    def relative_step_size(self, constraint: Constraint) -> float:
        """The relative nu of one constraint: its own ``step_size``, or the callback's."""
        return constraint.step_size if constraint.step_size is not None else self.step_size

    @staticmethod
    def _scale(constraint: Constraint) -> float:
        scale = constraint.scale
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(
                f"GECO steps relative to a constraint's scale, but {constraint.name!r} has scale {scale!r} "
                f"(its tolerance, {constraint.tolerance!r} {constraint.unit}, unless {type(constraint).__name__} "
                "defines scale); it must be a positive finite number."
            )
        return float(scale)

    def absolute_step_size(self, constraint: Constraint) -> float:
        """GECO's ``"relative"`` step for one constraint in 1 / (its value's units): nu over its scale."""
        return self.relative_step_size(constraint) / self._scale(constraint)

    def _find_calibration(self, trainer: pl.Trainer) -> Dataset | None:
        dataset = self.calibration_dataset
        if dataset is None:
            datamodule = getattr(trainer, "datamodule", None)
            dataset = getattr(datamodule, "calibration_dataset", None) if datamodule is not None else None
        if dataset is None or dataset_length(dataset) == 0:
            return None
        return dataset

    def _stream(self, dataset: Dataset) -> CalibrationStream:
        return CalibrationStream(
            dataset, self.calibration_batch_size, self.calibration_seed, given=self.calibration_dataset is not None
        )

    def reasons_for_calibration(self, trainer: pl.Trainer) -> list[str]:
        """Why the training batches would read better than new images in this fit (empty: they
        would not); what ``drive="auto"`` decides on. Needs the training loader's length, so it is
        asked at the start of training."""
        reasons = [
            f"{c.name!r} reads the training images optimistically (its reader may have trained on them)"
            for c in self._ready_objective.constraints
            if c.optimistic_on_training_images
        ]
        if self.calibration_dataset is not None:
            reasons.append("a calibration split was given (GECOCallback(calibration_dataset=...))")
        epochs = _planned_epochs(trainer, planned_steps(trainer))
        if epochs > AUTO_CALIBRATION_EPOCHS:
            reasons.append(
                f"the run sees each training image {epochs:.3g} times (more than {AUTO_CALIBRATION_EPOCHS:g}), "
                "and by then the training batches may read better than new images (a model can learn them by heart)"
            )
        return reasons

    def _choose_drive(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``drive="auto"``: measure on the calibration split when :meth:`reasons_for_calibration`
        finds a reason, the split is there and the model can be measured (the collection's
        models, or one whose ``model(x, labels)`` returns a VAEOutput), said in one line; else on
        the training batches (warned, with the fix, when there was a reason)."""
        from lightning_geco.models.base import VAEModule  # the models import this module's package

        reasons = self.reasons_for_calibration(trainer)
        calibration = self._find_calibration(trainer) if reasons else None
        own_module = not isinstance(pl_module, VAEModule)
        why_not = None  # why a module of the user's could not be measured, when it was tried
        if own_module and calibration is not None and self._resumed_drive is None:
            why_not = why_not_measurable(trainer, pl_module, self._ready_objective, calibration)
            if why_not is not None:
                calibration = None
        choice = "calibration" if calibration is not None else "training"
        # Rank 0 decides for all: ranks with shards of other lengths must not disagree, or only
        # some of them would enter the calibration all-reduce.
        choice = trainer.strategy.broadcast(choice, src=0)
        if self._resumed_drive is not None:
            if choice != self._resumed_drive:
                rank_zero_warn(
                    f"GECO: drive='auto' would choose {choice!r} for this fit, but the checkpoint's lambda was "
                    f"driven by {self._resumed_drive!r}; the resumed run keeps {self._resumed_drive!r}."
                )
            choice = self._resumed_drive
        if choice == "calibration" and calibration is None:
            calibration = self._find_calibration(trainer)
            if calibration is None:
                raise ValueError(
                    "GECOCallback(drive='auto') measures on the calibration split in this run (rank 0, or the "
                    "checkpoint, chose it), but this rank has none: carve it on every rank with the DataModule's "
                    "num_calibration or pass GECOCallback(calibration_dataset=...)."
                )
        self._ready_geco.drive = choice
        self._calibration = self._stream(calibration) if choice == "calibration" and calibration is not None else None
        if self._resumed_drive is not None:
            return
        if choice == "calibration":
            assert calibration is not None
            rank_zero_info(
                f"GECO: lambda is driven by the calibration split ({dataset_length(calibration)} images; "
                f"{self.calibration_batch_size} drawn from it, with replacement, every {self.calibration_every} steps): "
                + "; ".join(reasons) + "."
            )
        elif own_module and reasons:
            name = type(pl_module).__name__
            if why_not is not None:
                fix = (
                    f"drive='auto' tried {name}(x, labels) (or {name}(x): images without labels) on one "
                    f"calibration image to measure the split, and it failed ({why_not})"
                )
            else:
                fix = "there is no calibration split (the DataModule's num_calibration, or GECOCallback(calibration_dataset=...))"
            message = (
                "GECO: " + "; ".join(reasons) + f". Lambda is driven by the training batches: {fix}. A module of "
                "your own is measured on the split when its forward(x, labels=None) returns "
                "VAEOutput.from_terms(x, reconstruction, rate, labels=labels)."
            )
            # Many epochs alone are said, not warned: whether the module overfits is for its own
            # validation to say. A constraint that reads the training images optimistically is warned.
            if any(c.optimistic_on_training_images for c in self._ready_objective.constraints):
                rank_zero_warn(message + " The tolerance may be missed on new images.")
            else:
                rank_zero_info(message)
        elif reasons:  # one of the collection's models, with no split
            rank_zero_warn(
                "GECO: " + "; ".join(reasons) + ". Lambda is driven by the training batches because there is no "
                "calibration split, and the tolerance may be missed on new images: carve one with the "
                "DataModule's num_calibration (e.g. --data.num_calibration 1000, or a tenth of a smaller training set) or pass "
                "GECOCallback(calibration_dataset=...)."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.drive == "auto":
            self._choose_drive(trainer, pl_module)
        if self._calibration is not None:
            self._calibration.refuse_training_images(trainer)
        # This fit's measurements, and where the last valid one was seen (see _check_measurements).
        self._measurements_this_fit = 0
        self._valid_measurements_seen = (self._ready_geco.num_measurements, 0)
        if self.detector is not None:
            # The window is a share of the fit's planned steps, whether max_steps or max_epochs
            # ends it; only now is the training loader's length known.
            planned = planned_steps(trainer)
            self.detector.plan(max(1, round(self.stall_window * planned)) if planned else UNPLANNED_STALL_WINDOW, planned)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The validation set is known here (a fit without sanity check loads it at its first validation).
        if trainer.state.fn == "fit" and self._calibration is not None:
            self._calibration.warn_validation_overlap(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The strategy has put the model on its device by now; the statistics must live there
        # too so they can go through the collective (NCCL needs CUDA tensors).
        geco = self._ready_geco
        geco.to(pl_module.device)
        geco.reset_pending()
        geco.recorded = False
        # Decided here, where the device is known: torch.compile needs a C++ compiler on the CPU,
        # triton on CUDA.
        geco.compile = self.compile and compiler_available(pl_module.device)
        if self.compile and not geco.compile:
            rank_zero_warn(
                f"GECOCallback(compile=True): torch.compile cannot build kernels on {pl_module.device} here "
                "(no C++ compiler on the CPU, no triton on CUDA, or TORCH_COMPILE_DISABLE); GECO's per-step "
                "updates run eagerly (the same results)."
            )
        if self._last_calibration is not None:
            self._last_calibration = self._last_calibration.to(pl_module.device)

    # --------------------------------------------------------------- update
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_updated = False
        self._ready_geco.recorded_calls = 0
        if self._calibration is not None:
            self._calibration.see_training_batch(batch)  # host reads on the fit's first batch only

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        geco = self._ready_geco
        torch_optimizer = getattr(optimizer, "_optimizer", optimizer)
        # Under manual optimization several optimizers may step on one batch (a VAE-GAN's critic,
        # before or after the VAE). GECO updates once a batch, at the first step after the GECO
        # loss was computed; a step after it keeps its skip decision, and one before it (a
        # critic stepping first) has no GECO loss behind it and is left alone.
        if self._batch_updated:
            self._withhold_if_skipped(optimizer, torch_optimizer, geco.skipped)
            return
        # Under automatic optimization (one optimizer) every step updates, on every rank: a rank
        # whose batch skipped the objective must still join the others' collective, with no
        # examples. Under manual optimization a step before the GECO loss is left alone.
        if not geco.recorded and not pl_module.automatic_optimization:
            return
        self._batch_updated, geco.recorded = True, False
        if self.ramp_follows_lr and isinstance(geco.controller, PIController):
            rate = _learning_rate(torch_optimizer)
            self._peak_learning_rate = max(rate, self._peak_learning_rate or 0.0)
            geco.controller.pace.fill_(rate / self._peak_learning_rate if self._peak_learning_rate > 0 else 1.0)
        statistics = all_reduce_sum(trainer, geco.pending_statistics())
        geco.update(statistics)
        index = self._update_index(trainer)
        if self._calibration is not None and index % self.calibration_every == 0:
            measurement = self._calibration.measure(trainer, pl_module, self._ready_objective, index // self.calibration_every)
            measured = all_reduce_sum(trainer, measurement)
            valid = geco.control(measured, self.calibration_every)
            # One that moved nothing is NaN, not the 0 of its zeroed sums, which reads as "at the
            # tolerance" (in the logs, the stall watch and summary.json).
            self._last_calibration = torch.where(valid, constraint_means(measured), torch.nan)
            self._measurements_this_fit += 1
        self._manual_updates += 1
        on_device = self._withhold_if_skipped(optimizer, torch_optimizer, geco.skipped)
        logging = is_logging_step(trainer)
        # Without step logs (log_every_n_steps=0) the host reads below still come, every
        # UNLOGGED_CHECK_EVERY batches: else the non-finite stop and the stall watch never would.
        # (Trainer.log_every_n_steps is set by Lightning's logger connector, not declared on the
        # class.) Counted in batches that stepped, as Lightning's logging is: global_step counts
        # every optimizer's step.
        checking = logging or (
            getattr(trainer, "log_every_n_steps", 1) == 0
            and (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % UNLOGGED_CHECK_EVERY == 0
        )
        if logging or step_values_monitored(trainer):  # read by the logs (or a monitor) only: no ops on other steps
            # A step with a non-finite value has no batch mean (its sums left the non-finite
            # values out): NaN, not the 0 that would read as "at the tolerance".
            # So does a step whose batches, on every rank, skipped the objective (no examples).
            no_mean = geco.skipped | (statistics[-2] == 0)
            self._log(pl_module, torch.where(no_mean, torch.nan, constraint_means(statistics)))
        if checking:
            self._watch(trainer)
        # On the device path the count is read at those steps only (reading it syncs).
        if not (checking or not on_device):
            return
        self._check_skips(trainer)
        if checking:  # after the training streak's check: its message is the one that holds then
            self._check_measurements(trainer)

    def _check_skips(self, trainer: pl.Trainer) -> None:
        """Stop a fit after ``max_nonfinite_steps`` skipped optimizer steps in a row (the longest
        run since the last check: one that ended between two checks counts)."""
        geco = self._ready_geco
        longest = geco.take_longest_skips()
        if longest >= self.max_nonfinite_steps:
            ongoing = self.consecutive_nonfinite_steps
            now = (
                "A skipped step changes no weight, so the model as the last finite step left it gives non-finite "
                "values on every batch (or a step whose loss did not go through the objective, which GECO does "
                "not guard, made the weights non-finite)."
                if ongoing == longest
                else f"The run of skips has ended ({ongoing} in a row now): the non-finite values came from some "
                "batches, not from every one."
            )
            raise NonFiniteConstraintError(
                f"GECO saw a non-finite constraint or loss on {longest} consecutive optimizer steps "
                f"(max_nonfinite_steps={self.max_nonfinite_steps}; the longest run since the last check); "
                f"lambda was last {geco.lagrange_multiplier.tolist()}. {now} {_nonfinite_advice(trainer)}"
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._take_skip_flags()
        self._check_first_batches(trainer)
        calls = self._ready_geco.recorded_calls
        self._engaged = self._engaged or calls > 0
        self._batches_this_fit += 1
        if self._batches_this_fit == UNLOGGED_CHECK_EVERY:
            self._check_engaged()
        if calls > 1 and not self._warned_repeated_calls:
            self._warned_repeated_calls = True
            rank_zero_warn(
                f"GECO: the constraints were recorded {calls} times on one training batch (the objective, or its "
                "lagrangian, called more than once in training mode): every call's examples count towards lambda's "
                "update, as micro-batches do. Call it once a batch, on the batch you train on; for a figure to "
                "log, read objective.constraint_values(output), which records nothing."
            )

    def _check_first_batches(self, trainer: pl.Trainer) -> None:
        """Raise a first training batch's problem (the objective's data check) on every rank
        together, at the end of each batch until every rank has checked one: one all-reduce of
        two numbers and a host read each such batch (the first only, where every rank calls the
        objective on it). A collective in the objective's first call mismatched the others' where
        a rank trained its first batch on a loss of its own (gloo aborted)."""
        if self._first_batches_checked:
            return
        objective = self._ready_objective
        problem = objective.first_batch_problem
        flags = torch.tensor([float(problem is not None), float(not objective.first_batch_checked)], device=self._ready_geco.device)
        problems, unchecked = all_reduce_sum(trainer, flags).tolist()
        if problems:
            objective.first_batch_problem = None
            raise problem if problem is not None else ValueError(FIRST_BATCH_REFUSED_ELSEWHERE)
        self._first_batches_checked = unchecked == 0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_skip_flags()  # a fit stopped inside a batch (max_time, a callback's should_stop)
        self._check_engaged()  # a fit shorter than the check in on_train_batch_end

    def _take_skip_flags(self) -> None:
        """Take the skip flags this batch handed to fused optimizers off them again."""
        for torch_optimizer in self._flagged:
            if hasattr(torch_optimizer, "found_inf"):  # GradScaler (16-mixed) deletes its own
                del torch_optimizer.found_inf
        self._flagged.clear()

    def _check_engaged(self) -> None:
        """Refuse a fit whose training batches never went through the GECO objective: lambda never
        moved, and a verdict would describe a GECO that did not run."""
        if self._engaged or self._batches_this_fit == 0:
            return
        raise ObjectiveNeverCalledError(
            f"GECOCallback: {self._batches_this_fit} training batches, and the model's GECOObjective recorded no "
            "constraint on any of them: training_step never called it (nor its lagrangian) in training mode, so "
            "lambda never moved from its initial value. Return the loss of objective(output) or "
            "objective.lagrangian(rate, x, reconstruction) from training_step, or remove GECOCallback for a loss "
            "of your own."
        )

    def _withhold_if_skipped(self, optimizer: Optimizer, torch_optimizer: Optimizer, skip: Tensor) -> bool:
        """Keep the gradients of a skipped (non-finite) step from the optimizer; True when that
        was decided on the device, with no host read."""
        if getattr(torch_optimizer, "_step_supports_amp_scaling", False):
            # Fused optimizers (Adam/AdamW/SGD with fused=True) read GradScaler's device-side
            # flag and leave parameters, moments and step counts exactly as they were: no host sync.
            # found_inf is not an Optimizer attribute: GradScaler sets it on these fused optimizers
            # (torch.amp.GradScaler.step), and their step() reads it; we set it the same way.
            torch_optimizer.found_inf = skip.float()  # type: ignore[attr-defined]
            self._flagged.append(torch_optimizer)
            return True
        if bool(skip):  # the one host read of the step, for every other optimizer
            optimizer.zero_grad(set_to_none=True)
        return False

    @property
    def active_drive(self) -> str:
        """What drives lambda in this fit: ``drive``, or what ``"auto"`` chose at the start of
        training (the GECO's own drive; ``"training"`` before "auto" has chosen)."""
        if self.geco is not None:
            return self.geco.drive
        return "training" if self.drive == "auto" else self.drive

    @property
    def last_calibration(self) -> Tensor | None:
        """The last calibration measurement of this fit, per constraint (K,), in each constraint's
        value units (``reading - tolerance``, as ``constraint_ema``); None before the first."""
        return self._last_calibration

    @property
    def consecutive_nonfinite_steps(self) -> int:
        """Optimizer steps skipped in a row for a non-finite value (reading it syncs the host)."""
        return self.geco.num_consecutive_skips if self.geco is not None else 0

    def _update_index(self, trainer: pl.Trainer) -> int:
        """GECO's updates before the present one, which the calibration schedule is a function of:
        ``global_step`` under automatic optimization; under manual optimization, where
        ``global_step`` counts every optimizer's step (a critic's too) and a batch may step none,
        the callback's own count of GECO's updates (saved in its state, so a resumed run measures
        as the uninterrupted one)."""
        if trainer.lightning_module.automatic_optimization:
            return trainer.global_step
        return self._manual_updates

    def regulated_ratio(self) -> list[float]:
        """Per constraint, the reading the controller regulates over its tolerance (1.1: 10 % past
        it): the last calibration measurement, or the training moving average."""
        geco = self._ready_geco
        # Only the calibration drive measures; each fit starts without a measurement.
        value = self._last_calibration if self._last_calibration is not None else geco.constraint_ema
        return (1.0 + value / geco.scale).tolist()

    def _watch(self, trainer: pl.Trainer) -> None:
        geco = self._ready_geco
        if self.detector is None or not geco.seeded:
            return
        ratio = self.regulated_ratio()
        found = self.detector.observe(trainer.global_step, geco.log_lagrange_multiplier.tolist(), ratio)
        for k, (step, why) in enumerate(zip(self.detector.withdrawn_at, self.detector.withdrawn_why)):
            if step == trainer.global_step and why is not None:  # withdrawn by this observation
                rank_zero_warn(
                    f"GECO: {self._ready_objective.constraints[k].name!r}: its reading {why}: the earlier 'looks "
                    "unreachable' warning is withdrawn."
                )
        for k in found:
            constraint = self._ready_objective.constraints[k]
            stall = self.detector.stalls[k]
            if stall is None:  # observe() returns only the constraints it has just found stalled
                continue
            rank_zero_warn(
                f"GECO: the tolerance of {constraint.name!r} ({constraint.tolerance} {constraint.unit}) looks "
                f"unreachable for this model: {stall.describe()}. More lambda is not buying quality; unless the "
                "reading falls again (a plateau can break, and this warning is then withdrawn), stop the run and "
                "loosen the tolerance, or give the model more capacity or steps."
            )

    def _check_measurements(self, trainer: pl.Trainer) -> None:
        """Stop a fit whose calibration measurements have all been non-finite for
        ``max_nonfinite_steps`` of them: each left lambda where it was, and the training batches,
        finite, would go on training a model GECO no longer steers. Read at checking steps only
        (one host read); the count runs from the check that last saw a new valid one, so it can
        start late by the measurements between two checks, never early."""
        if self._calibration is None:
            return
        valid, attempts_then = self._valid_measurements_seen
        now = self._ready_geco.num_measurements
        if now != valid:
            self._valid_measurements_seen = (now, self._measurements_this_fit)
            return
        failed = self._measurements_this_fit - attempts_then
        if failed >= self.max_nonfinite_steps:
            raise NonFiniteConstraintError(
                f"GECO's calibration measurements were non-finite on the last {failed} of them (max_nonfinite_steps="
                f"{self.max_nonfinite_steps}; step {trainer.global_step}): the model's eval-mode pass without gradients "
                "gives NaN or infinity on held-out images while its training batches are finite, so lambda has not "
                f"moved since (it is {self._ready_geco.lagrange_multiplier.tolist()}). Check what eval mode changes "
                "(BatchNorm running statistics, dropout, a branch on self.training), or drive lambda from the "
                "training batches (drive='training')."
            )

    def lambda_rising(self, k: int) -> bool:
        """Whether lambda rose noticeably (> 5 %) over the last quarter of the stall window."""
        return self.detector is not None and self.detector.lambda_trend(k) > math.log(1.05)

    def _log(self, pl_module: pl.LightningModule, batch_mean: Tensor) -> None:
        geco = self._ready_geco
        values: dict[str, Tensor | float] = {}
        shown: dict[str, Tensor] = {}
        for i, name in enumerate(geco.names):
            prefix = "geco" if geco.num_constraints == 1 else f"geco/{name}"
            shown[f"{prefix}/lambda"] = geco.lagrange_multiplier[i]
            values[f"{prefix}/constraint"] = batch_mean[i]
            values[f"{prefix}/constraint_ema"] = geco.constraint_ema[i]
            if self._last_calibration is not None:
                values[f"{prefix}/calibration"] = self._last_calibration[i]
        values["geco/skipped_updates"] = float(geco.num_skipped_updates)
        # Identical on every rank after the all-reduce: no sync_dist needed.
        pl_module.log_dict(shown, on_step=True, on_epoch=False, batch_size=1, prog_bar=True)
        pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=1)

    # ----------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        if self.geco is None:
            return {}
        return {
            "geco": self.geco.state_dict(),
            "controller": self.controller,
            "constraints": self._constraints_as_trained(),
            # Also where the previous version kept it, so that version reads the streak back.
            "consecutive_nonfinite_steps": self.consecutive_nonfinite_steps,
            "active_drive": self.active_drive,
            "peak_learning_rate": self._peak_learning_rate,
            "stall_detector": self.detector.state_dict() if self.detector is not None else None,
            "last_calibration": None if self._last_calibration is None else self._last_calibration.tolist(),
            "manual_updates": self._manual_updates,
            **self._trainer_settings,
        }

    def _constraints_as_trained(self) -> list[dict[str, Any]]:
        """Each constraint as stated, and the tolerance GECO holds it to (``reading_tolerance``)."""
        if self.objective is None:
            return []
        return [{**c.describe(), "reading_tolerance": c.reading_tolerance} for c in self.objective.constraints]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._state_to_load = state_dict
            self._restore_if_pending()

    def _restore_if_pending(self) -> None:
        if self._state_to_load is None or self.geco is None or self.objective is None:
            return
        state, self._state_to_load = self._state_to_load, None
        saved = state.get("constraints", [])
        current = self._constraints_as_trained()
        if [c["name"] for c in saved] != [c["name"] for c in current]:
            raise ValueError(
                f"The checkpoint's GECO state is for constraints {[c['name'] for c in saved]}, but the model "
                f"has {[c['name'] for c in current]}: the checkpoint comes from an incompatible model."
            )
        geco_state = dict(state["geco"])
        # Checkpoints from before GECO counted skips in a row kept the count here.
        geco_state.setdefault("num_consecutive_skips", state.get("consecutive_nonfinite_steps", 0))
        trained_controller = state.get("controller")  # None: a checkpoint from before it was saved
        if trained_controller is not None and trained_controller != self.controller:
            rank_zero_warn(
                f"GECO: the checkpoint's run moved lambda with controller={trained_controller!r}; this fit uses "
                f"{self.controller!r}, which starts from the saved lambda (a bumpless transfer): it is not that run "
                "continued."
            )
        self.geco.load_state_dict(geco_state)
        # What drove lambda before: drive="auto" keeps it for the rest of the run (checkpoints from
        # before "auto" carry none and choose afresh).
        self._peak_learning_rate = state.get("peak_learning_rate")
        # Checkpoints from before the count was saved: GECO's updates, valid and skipped, are it.
        self._manual_updates = int(
            state.get("manual_updates", int(geco_state["num_updates"]) + int(geco_state.get("num_skipped_updates", 0)))
        )
        changed = [_tolerance_changed(before, now) for before, now in zip(saved, current)]
        evidence = state.get("stall_detector")
        if evidence is not None and self.detector is not None:  # a resumed fit keeps the evidence so far
            self.detector.load_state_dict(evidence)
            # ... but for a constraint whose tolerance changed (a changed tolerance is warned by the
            # objective, whose state dict holds the trained one): readings over another tolerance.
            for k, tolerance_changed in enumerate(changed):
                if tolerance_changed:
                    self.detector.forget(k)
        for setting, now in self._trainer_settings.items():
            trained = state.get(setting)
            if trained is not None and trained != now:
                rank_zero_warn(
                    f"GECO: the checkpoint's run trained with {setting}={trained!r}; this resumed fit has {now!r}, so "
                    "its numbers differ from the ones that run would have gone on with: it is not that run continued "
                    f"(Trainer({setting}={trained!r}), on the command line --trainer.{setting} {trained}, continues it)."
                )
        saved_drive = state.get("active_drive")
        if self.drive == "auto" and saved_drive in DRIVES:
            self._resumed_drive = saved_drive
            self.geco.drive = saved_drive
        # The last measurement, for a fit driven by calibration as its checkpoint was. Checkpoints
        # from before it was saved have none; under a changed tolerance it would be read against the
        # new one (it is reading - tolerance).
        last = state.get("last_calibration")
        if last is None or any(changed) or saved_drive != "calibration" or self.active_drive != "calibration":
            self._last_calibration = None
        else:
            self._last_calibration = torch.tensor(last, device=self.geco.device)

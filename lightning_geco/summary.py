"""RunSummary: the final figures of a run in ``summary.json``, next to the run's logs."""

from __future__ import annotations

import json
import math
import os
import time
import weakref
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_geco.callbacks import GECOCallback, is_last_batch_of_fit, planned_steps
from lightning_geco.constraints import Constraint
from lightning_geco.objectives import GECOObjective
from lightning_geco.resume import checkpoint_head
from lightning_geco.verdict import constraint_clause, verdict, verdict_line

__all__ = ["VALIDATION_KEYS", "RunSummary", "run_directory"]

VALIDATION_KEYS = ("distortion", "rate", "elbo", "marginal_kl", "mutual_info")


def run_directory(trainer: pl.Trainer) -> Path:
    """Where this run's own files go: the W&B run's files folder, else the folder
    ``trainer.log_dir`` names (the first logger's, or ``default_root_dir`` without one).

    Read from the logger here because ``trainer.log_dir`` broadcasts, a collective every rank
    must join, and the run folder is wanted on rank 0 alone (the summary, the saved config).
    """
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return Path(logger.experiment.dir)
    directory = None
    if trainer.loggers:
        first = trainer.loggers[0]
        directory = first.log_dir if isinstance(first, (TensorBoardLogger, CSVLogger)) else first.save_dir
    return Path(directory or trainer.default_root_dir)


def _number(value: Any) -> float | None:
    """A finite float, or None (for None, NaN or an infinity: JSON has none of them)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity, at any depth, replaced by None: ``json.dumps`` would
    write them as ``NaN`` / ``Infinity``, which strict JSON readers refuse."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _stage_readings(metrics: dict[str, Any], stage: str) -> tuple[dict[str, float], dict[str, float]]:
    """The top-level ``<stage>/<name>`` scalars of an evaluation (the docs/ARCHITECTURE.md keys
    first, then the rest sorted; per-dimension and per-part keys left out), and the standard
    error of each reading that has one (``<stage>/<reading>/standard_error``)."""
    prefix, suffix = f"{stage}/", "/standard_error"
    names = [k[len(prefix) :] for k in metrics if k.startswith(prefix) and "/" not in k[len(prefix) :]]
    ordered = [k for k in VALIDATION_KEYS if k in names] + sorted(k for k in names if k not in VALIDATION_KEYS)
    readings = {k: float(metrics[prefix + k]) for k in ordered}
    standard_errors = {
        k[len(prefix) : -len(suffix)]: float(v) for k, v in metrics.items() if k.startswith(prefix) and k.endswith(suffix)
    }
    return readings, standard_errors


def _constraint_fields(
    constraints: list[Constraint], readings: dict[str, float], standard_errors: dict[str, float]
) -> tuple[dict[str, list[Any]], list[float | None], list[float | None]]:
    """Per constraint: the summary's fields on its reading, how far each reading is past its
    tolerance (``relative_violation``) and the reading's standard error in those units."""
    violation = [
        c.relative_violation(readings[c.reading_name]) if c.reading_name in readings else None for c in constraints
    ]
    errors = [standard_errors.get(c.reading_name) for c in constraints]
    fields: dict[str, list[Any]] = {
        "tolerance": [c.reading_tolerance for c in constraints],
        "tolerance_stated": [{"value": c.tolerance, "unit": c.unit} for c in constraints],
        "reading": [c.reading_name for c in constraints],
        "relative_violation": [_number(v) for v in violation],
        "standard_error": [_number(e) for e in errors],
    }
    return fields, violation, [_relative_standard_error(c, e) for c, e in zip(constraints, errors)]


def _satisfied(constraints: list[Constraint], readings: dict[str, float]) -> bool:
    """Whether every constraint's reading meets its tolerance (strictly, no band)."""
    return all(c.reading_name in readings and c.satisfied_by(readings[c.reading_name]) for c in constraints)


def _per_constraint(constraints: list[Constraint], values: list[Any]) -> Any:
    """One constraint's value as it is; several keyed by constraint name."""
    return values[0] if len(constraints) == 1 else dict(zip([c.name for c in constraints], values))


def _relative_standard_error(constraint: Any, standard_error: float | None) -> float | None:
    """A reading's standard error in units of the constraint's scale (as ``relative_violation``)."""
    if standard_error is None or not math.isfinite(standard_error):
        return None
    # relative_violation is affine in the reading (its sign flips for a higher-is-better one)
    at_tolerance = constraint.relative_violation(constraint.reading_tolerance)
    return abs(constraint.relative_violation(constraint.reading_tolerance + standard_error) - at_tolerance)


class RunSummary(Callback):
    """Writes ``summary.json`` at the end of ``fit`` and makes sure the last step is validated;
    writes ``test_summary.json`` at the end of ``test``.

    Under ``fast_dev_run`` no file is written (:attr:`summary` and :attr:`verdict_line` are still
    set; :attr:`path` stays None), as Lightning writes no logs or checkpoints then.

    Under ``strategy="ddp_spawn"`` or ``"ddp_notebook"`` the fit runs in worker processes, and
    this object in the process that called ``fit`` stays as it was: rank 0's worker writes the
    file and logs the verdict line and the file's path (INFO), and reading :attr:`verdict_line`
    where no fit has ended warns so.

    A fit that ends at ``max_steps`` mid-epoch, or in an epoch ``check_val_every_n_epoch`` does
    not divide, is validated at its last step all the same, so the figures are the trained
    model's; where no validation could run then, the verdict line names the step they are of.

    Fields: the final validation ``distortion``, ``rate``, ``elbo``, ``marginal_kl``,
    ``mutual_info`` (per image, see the units in docs/ARCHITECTURE.md), then every other top-level validation
    scalar (e.g. ``pncc``, ``class_accuracy``, ``iwae``); for a GECO model ``lambda``,
    ``constraint_ema``, ``tolerance`` (in distortion units, MSE), ``tolerance_stated`` (value and
    unit as configured), ``reading`` (the validation key the tolerance is stated on, e.g.
    ``distortion`` or ``pncc``), ``relative_violation`` (that reading past the tolerance in units
    of the constraint's scale: -0.05 is 5 % better than asked), ``standard_error`` (of that
    validation reading, in its units: what another draw of as many images could move it by;
    None without two images), ``drive`` (what moved lambda:
    ``training`` or ``calibration``, as ``drive="auto"`` chose; with ``calibration``,
    ``calibration`` is the last measurement, in ``constraint_ema``'s units) and ``satisfied`` (every
    constraint's validation reading meets its tolerance, strictly, with no band: ``verdict`` may
    say ``met`` for a reading up to 1 % past it where this says False), ``verdict`` (``met``, ``not_met`` or
    ``unreachable``, see :mod:`lightning_geco.verdict`) and ``verdict_line`` (the sentence the
    CLI prints before the summary path, also in :attr:`verdict_line`); ``validated_step`` (the
    optimizer step of the validation the figures come from), ``global_step``,
    ``wall_clock_seconds`` (of the whole run: a resumed run adds the time before its checkpoint)
    and ``path``. With several constraints, the per-constraint fields
    are dicts keyed by constraint name.
    The W&B run summary gets the same fields.

    ``trainer.test`` (``train.py test``) writes ``test_<filename>``: the test set's figures as
    above (from ``test/*``), for a GECO model ``lambda`` (as trained), ``tolerance``,
    ``tolerance_stated``, ``reading``, ``relative_violation``, ``standard_error``,
    ``satisfied``, ``verdict`` (``met`` or ``not_met``: a test has no training to stall) and
    ``verdict_line`` (``GECO on the test set: ...``, also :attr:`test_verdict_line`), then
    ``checkpoint`` (the file tested, None for the module as it is), ``global_step`` (its step)
    and ``path``. ``trainer.validate`` (``train.py validate``) writes ``validate_<filename>``
    with the same fields from ``val/*`` (``GECO on the validation set: ...``, also
    :attr:`validate_verdict_line`); it does not change what ``fit`` writes.
    """

    def __init__(self, filename: str = "summary.json") -> None:
        super().__init__()
        self.filename = filename
        self.path: Path | None = None
        self.summary: dict[str, Any] = {}
        self._verdict_line = ""
        #: whether the last fit ended in this process (not in the one that spawned DDP workers)
        self._fit_ended = False
        #: the process this object was made in: a worker that fits a pickled copy is another
        self._made_in_process = os.getpid()
        #: what the last ``trainer.test`` gave: its fields, its verdict line and its file
        self.test_summary: dict[str, Any] = {}
        self.test_verdict_line = ""
        self.test_path: Path | None = None
        #: the same for the last ``trainer.validate`` (``validate_<filename>``)
        self.validate_summary: dict[str, Any] = {}
        self.validate_verdict_line = ""
        self.validate_path: Path | None = None
        self._validation: dict[str, float] = {}
        #: the standard error of each constraint reading's validation mean (``val/<reading>/standard_error``)
        self._standard_errors: dict[str, float] = {}
        self._history: list[tuple[int, dict[str, float]]] = []
        self._start = 0.0
        #: whether this fit ran a training step (a resumed one may have none left)
        self._trained = False
        #: the module of the last fit (a Trainer fitted again on it keeps its validations)
        self._fitted: weakref.ref[pl.LightningModule] | None = None
        #: seconds of the run before this fit started (from the checkpoint a resumed run loads)
        self._earlier_seconds = 0.0
        #: seconds of the run when the last fit ended (a Trainer fitted again goes on from them)
        self._ended_seconds = 0.0
        #: where the fit at hand is: "idle" (none, or set up by the DataModule alone), "set_up"
        #: (this callback's setup ran), "fitting" (on_fit_start ran) or "ended" (on_fit_end ran)
        self._fit_phase = "idle"
        #: the ``val/*`` entries of the Trainer's callback_metrics as the running validation started
        self._before_validation: dict[str, Any] = {}
        #: the Trainer's check_val_every_n_epoch while the last epoch validates regardless
        self._check_val_every_n_epoch: int | None = None

    @property
    def verdict_line(self) -> str:
        """The last fit's verdict line (``GECO: ...``); empty before a fit ended in this process."""
        if not self._fit_ended:
            rank_zero_warn(
                "RunSummary.verdict_line: no fit has ended in this process, so there is no verdict (none ran, or it "
                "stopped with an error). Under strategy='ddp_spawn' or 'ddp_notebook' the fit runs in worker "
                "processes: rank 0's worker logged the verdict line and wrote summary.json (its path is logged beside it)."
            )
        return self._verdict_line

    @verdict_line.setter
    def verdict_line(self, line: str) -> None:
        self._verdict_line = line

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_val_every_n_epoch = None  # every fit starts from its Trainer's own schedule
        self._start = time.monotonic()
        self._fit_phase = "fitting"
        self._trained = False
        self.verdict_line = ""
        self._fit_ended = False
        self.path = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Said up front: the verdict reads the validation set, and a fit without one ends NOT MET.
        if not trainer.enable_validation:
            rank_zero_warn(
                "RunSummary: this fit runs no validation (no validation loader, limit_val_batches=0, or no "
                "validation_step), so summary.json will hold no validation figures, and a GECO verdict has no reading "
                "to judge (its line says: no validation reading)."
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before a checkpoint is restored (which sets a resumed run's earlier seconds and validations).
        # A Trainer fitted again on the same model goes on from its step: its validations so far stay.
        if stage != "fit":
            return
        self._fit_phase = "set_up"
        again = trainer.global_step > 0 and self._fitted is not None and self._fitted() is pl_module
        # Not the time between the fits (a notebook's pause): the seconds the fits ran.
        self._earlier_seconds = self._ended_seconds if again else 0.0
        self._fitted = weakref.ref(pl_module)
        if not again:
            self._validation = {}
            self._standard_errors = {}
            self._history = []

    def __getstate__(self) -> dict[str, Any]:
        # A weak reference does not pickle (a spawned DDP process gets the callback pickled).
        return {**self.__dict__, "_fitted": None}

    def state_dict(self) -> dict[str, Any]:
        """The run's wall-clock seconds so far and its validations' figures, so a resumed run
        reports the whole run's time and best reading, and one with no step left to train
        reports the checkpoint's last validation."""
        return {
            "wall_clock_seconds": self._run_seconds(),
            "validations": [[step, dict(readings)] for step, readings in self._history],
            "standard_errors": dict(self._standard_errors),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._earlier_seconds = float(state_dict.get("wall_clock_seconds", 0.0))
        # Checkpoints from before the validations were kept carry none: the resumed fit's own count.
        self._history = [(int(step), dict(readings)) for step, readings in state_dict.get("validations", [])]
        self._validation = dict(self._history[-1][1]) if self._history else {}
        self._standard_errors = dict(state_dict.get("standard_errors", {}))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._trained = True
        if not is_last_batch_of_fit(trainer, trainer.global_step):
            return
        # Lightning validates a run stopped early but not one that reaches max_steps mid-epoch;
        # asking it to stop at its last batch gets the final validation the summary reports.
        trainer.should_stop = True
        # Nor does it validate in an epoch check_val_every_n_epoch does not divide: the summary
        # would report a model hundreds of steps older than the one trained. This one epoch,
        # every epoch is a validation epoch (restored at the end of training).
        every = trainer.check_val_every_n_epoch
        if every is not None and (trainer.current_epoch + 1) % every != 0:
            self._check_val_every_n_epoch = every
            trainer.check_val_every_n_epoch = 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_validation_schedule(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # A fit that raised (in that last validation, say) never reaches on_train_end.
        self._restore_validation_schedule(trainer)
        # A fit interrupted by Ctrl-C may be fitted again; a test's error is no fit's end.
        if self._fit_phase == "fitting":
            self._ended_seconds = self._run_seconds()
            self._write_failure(trainer, exception, started=True)
        elif trainer.state.fn == TrainerFn.FITTING and self._fit_phase in ("idle", "set_up"):
            # A fit that failed before it started (its data files missing or damaged, a checkpoint
            # refused): nothing of it ran, and nothing recorded is its own. One that failed after
            # its end (a later callback's on_fit_end) keeps the summary it wrote.
            self._write_failure(trainer, exception, started=False)
        self._fit_phase = "idle"

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._fit_phase = "idle"

    def _write_failure(self, trainer: pl.Trainer, exception: BaseException, started: bool) -> None:
        """Write a ``summary.json`` that says the fit stopped with an error (``verdict`` null): where
        fits share a folder (``logger=False``), an earlier fit's summary left in place read as this
        one's verdict. ``started``: the fit reached ``on_fit_start`` (else it has no validations and
        no seconds of its own). Writing it must not hide the fit's own error, so a failure here is
        dropped."""
        error = f"{type(exception).__name__}: {exception}".strip().rstrip(":")
        try:
            summary = {
                "verdict": None,
                "error": error if len(error) <= 1000 else error[:1000] + " ...",
                "validated_step": self._history[-1][0] if started and self._history else None,
                "global_step": trainer.global_step,
                "wall_clock_seconds": round(self._ended_seconds, 3) if started else 0.0,
            }
            self.path = self._write(trainer, self.filename, summary, "summary")
        except Exception:  # noqa: BLE001, S110 - the fit's error is the one to raise
            pass

    def _run_seconds(self) -> float:
        """Wall-clock seconds of the run so far: this fit's, and those of the fits it goes on from."""
        return self._earlier_seconds + time.monotonic() - self._start

    def _restore_validation_schedule(self, trainer: pl.Trainer) -> None:
        if self._check_val_every_n_epoch is not None:
            trainer.check_val_every_n_epoch = self._check_val_every_n_epoch
            self._check_val_every_n_epoch = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning's callback_metrics keeps every key a fit logged, so a val/* key an earlier
        # validation logged and this one did not (a module's metric of every Nth validation) would
        # read as this validation's: what was there before it is told apart by identity, since
        # Lightning computes a new tensor for every key an evaluation logs.
        self._before_validation = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._validated_alone(trainer, pl_module)
            return
        before = self._before_validation
        logged = {k: v for k, v in trainer.callback_metrics.items() if not (k in before and before[k] is v)}
        self._validation, self._standard_errors = _stage_readings(logged, "val")
        self._history.append((trainer.global_step, dict(self._validation)))

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The test set's figures and, for a GECO model, each constraint's verdict on them, in
        ``test_<filename>`` beside the run's logs (:attr:`test_summary`, :attr:`test_verdict_line`)."""
        self.test_summary = self._evaluation_summary(trainer, pl_module, "test", "GECO on the test set")
        self.test_verdict_line = self.test_summary.get("verdict_line", "")
        self.test_path = self._write(trainer, f"test_{self.filename}", self.test_summary, "test_summary")

    def _validated_alone(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``trainer.validate``'s figures and verdict, in ``validate_<filename>`` (as a test's)."""
        self.validate_summary = self._evaluation_summary(trainer, pl_module, "val", "GECO on the validation set")
        self.validate_verdict_line = self.validate_summary.get("verdict_line", "")
        self.validate_path = self._write(trainer, f"validate_{self.filename}", self.validate_summary, "validate_summary")

    @staticmethod
    def _evaluation_summary(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, label: str) -> dict[str, Any]:
        """The figures an evaluation outside ``fit`` logged as ``<stage>/*``, with each
        constraint's ``met`` / ``not_met`` on them for a GECO model, and the model's step."""
        readings, standard_errors = _stage_readings(trainer.callback_metrics, stage)
        summary: dict[str, Any] = {k: _number(v) for k, v in readings.items()}
        objective = next((m for m in pl_module.modules() if isinstance(m, GECOObjective)), None)
        if objective is not None:
            constraints = list(objective.constraints)
            fields, violation, relative_errors = _constraint_fields(constraints, readings, standard_errors)
            # Lambda is read as trained; with no training to stall the outcome is met or not_met.
            outcomes = [verdict(v, None) for v in violation]
            clauses = [
                constraint_clause(
                    c.reading_name, readings.get(c.reading_name), c.reading_tolerance, violation[k],
                    lower_is_better=c.lower_is_better, outcome=outcomes[k], standard_error=relative_errors[k],
                    stage=stage,
                )
                for k, c in enumerate(constraints)
            ]
            fields = {"lambda": objective.lagrange_multiplier.tolist(), **fields}
            summary.update({key: _per_constraint(constraints, values) for key, values in fields.items()})
            summary["satisfied"] = _satisfied(constraints, readings)
            summary["verdict"] = _per_constraint(constraints, outcomes)
            summary["verdict_line"] = verdict_line(clauses, readings.get("rate"), label=label)
        # The model evaluated: the checkpoint's step (trainer.test and trainer.validate load its
        # weights, not its loop counters, so the trainer's own step is 0), or the trainer's when
        # none was loaded.
        checkpoint = trainer.ckpt_path
        summary["checkpoint"] = str(Path(checkpoint).resolve()) if checkpoint else None
        summary["global_step"] = checkpoint_head(checkpoint)[1] if checkpoint else trainer.global_step
        return summary

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # With no training batch Lightning skips the loop and "finishes" at step 0 with exit
        # code 0; a summary of that run would say nothing true.
        if trainer.global_step == 0 and trainer.max_steps != 0:
            if trainer.limit_train_batches == 0:  # Lightning then skips the loop without counting batches
                raise ValueError("Trainer(limit_train_batches=0) runs no training step: set it > 0 to train.")
            if trainer.num_training_batches == 0:
                raise ValueError(
                    "The training loader yields no batch (0 batches per epoch): no training step ran. "
                    "Check that the training set is not empty and holds at least one full batch "
                    "(with drop_last=True, at least batch_size items)."
                )
        if not self._trained and trainer.global_step > 0:
            self._warn_nothing_trained(trainer)
        summary: dict[str, Any] = {k: _number(v) for k, v in self._validation.items()}
        summary.update(self._geco_fields(trainer))
        validated_step = self._history[-1][0] if self._history else None
        if "verdict_line" in summary:
            planned = planned_steps(trainer)
            if getattr(trainer, "fast_dev_run", False):  # a smoke test's figures, not a trained model's
                steps = f"{trainer.global_step} step{'s' if trainer.global_step != 1 else ''}"
                summary["verdict_line"] += f" (fast_dev_run: {steps}, a smoke test)"
            elif planned is not None and 0 < trainer.global_step < planned:
                # Stopped before its plan (max_time, early stopping): a learning-rate schedule and
                # lambda's catch-up planned for the whole fit did not run to their end.
                summary["verdict_line"] += f" (the fit stopped at step {trainer.global_step} of {planned} planned)"
            if validated_step is not None and validated_step != trainer.global_step:
                # A validation that could not run at the end (e.g. the validation loop turned
                # off): the figures are of an older model, and the line says which.
                summary["verdict_line"] += (
                    f" (validated at step {validated_step}; the run ended at step {trainer.global_step})"
                )
            self.verdict_line = summary["verdict_line"]
        summary["validated_step"] = validated_step
        summary["global_step"] = trainer.global_step
        self._ended_seconds, self._fit_phase = self._run_seconds(), "ended"
        summary["wall_clock_seconds"] = round(self._ended_seconds, 3)
        self.summary = summary
        self.path = self._write(trainer, self.filename, summary, "summary")
        self._fit_ended = True
        if os.getpid() != self._made_in_process and self._verdict_line:
            # ddp_spawn / ddp_notebook: this worker's copy is not the caller's, which stays empty.
            rank_zero_info(self._verdict_line + (f"\nsummary: {self.path}" if self.path is not None else ""))

    def _warn_nothing_trained(self, trainer: pl.Trainer) -> None:
        """A fit that starts where its limits end it (a resumed run with no step left) trains
        nothing: say so, what the figures are, and which limit to raise."""
        where = f"resumed from {trainer.ckpt_path} at step" if trainer.ckpt_path else "started at step"
        by_steps = 0 < trainer.max_steps <= trainer.global_step
        limit = f"max_steps={trainer.max_steps}" if by_steps else f"max_epochs={trainer.max_epochs}"
        figures = (
            f"the figures are the last validation before it (step {self._history[-1][0]})"
            if self._history
            else "no validation of this model is recorded, so there are no figures"
        )
        rank_zero_warn(
            f"This fit trained no step: it {where} {trainer.global_step}, where {limit} ends it already; "
            f"{figures}. To train on, raise {'max_steps (--trainer.max_steps)' if by_steps else 'max_epochs (--trainer.max_epochs)'}."
        )

    @staticmethod
    def _write(trainer: pl.Trainer, filename: str, summary: dict[str, Any], wandb_prefix: str) -> Path | None:
        """Write ``summary`` (with its ``path``) into the run folder on rank 0 and into the W&B
        run's summary under ``<wandb_prefix>/``; the path, or None where nothing is written."""
        if not trainer.is_global_zero:
            return None  # other ranks hold the same numbers; only rank 0 has the run folder
        # A trial of the code, which Lightning runs with no logs or checkpoints: no files either.
        # (Trainer.fast_dev_run is set by Lightning's init, not declared on the class.)
        if getattr(trainer, "fast_dev_run", False):
            return None
        directory = run_directory(trainer)
        path = directory.resolve() / filename  # absolute: the file says where it is from any folder
        summary["path"] = str(path)
        summary = _json_safe(summary)  # a lambda or moving average gone non-finite reads null, not NaN
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                update = {f"{wandb_prefix}/{k}": v for k, v in summary.items()}
                # A resumed run's summary replaces the error an interrupted segment wrote there.
                update.setdefault(f"{wandb_prefix}/error", None)
                logger.experiment.summary.update(update)
        return path

    def _geco_fields(self, trainer: pl.Trainer) -> dict[str, Any]:
        # Trainer.callbacks is set by Lightning's callback connector, not declared on the class.
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        callback = next((c for c in callbacks if isinstance(c, GECOCallback)), None)
        if callback is None or callback.geco is None or callback.objective is None:
            return {}
        constraints = list(callback.objective.constraints)
        # relative_errors: the standard error in the verdict's units (relative to the scale), for the clause.
        reading_fields, violation, relative_errors = _constraint_fields(constraints, self._validation, self._standard_errors)
        per_constraint = {
            "lambda": callback.geco.lagrange_multiplier.tolist(),
            "constraint_ema": callback.geco.constraint_ema.tolist(),
            **reading_fields,
        }
        if callback.last_calibration is not None:  # only the calibration drive measures
            # What moved lambda under the calibration drive (constraint_ema is then the training
            # batches' average, which only the loss reads).
            per_constraint["calibration"] = callback.last_calibration.tolist()
        fields: dict[str, Any] = {key: _per_constraint(constraints, values) for key, values in per_constraint.items()}
        fields["drive"] = callback.active_drive
        fields["satisfied"] = _satisfied(constraints, self._validation)
        found = callback.detector.stalls if callback.detector is not None else [None] * len(constraints)
        bests = [self._best(constraint) for constraint in constraints]
        # Met by the verdict's own rule (within its band): a model that met it can, however its
        # last validation reads and whatever lambda did since, so it is not unreachable.
        bests_met = [best is not None and verdict(c.relative_violation(best[0]), None) == "met" for c, best in zip(constraints, bests)]
        stalls = [None if met else stall for stall, met in zip(found, bests_met)]
        outcomes = [verdict(v, stall) for v, stall in zip(violation, stalls)]
        clauses = []
        for k, (constraint, outcome) in enumerate(zip(constraints, outcomes)):
            clauses.append(
                constraint_clause(
                    constraint.reading_name,
                    self._validation.get(constraint.reading_name),
                    constraint.reading_tolerance,
                    violation[k],
                    lower_is_better=constraint.lower_is_better,
                    outcome=outcome,
                    stall=stalls[k],
                    lambda_rising=callback.lambda_rising(k),
                    best=bests[k],
                    best_met=bests_met[k],
                    trained_steps=trainer.global_step or None,
                    standard_error=relative_errors[k],
                )
            )
        fields["verdict"] = _per_constraint(constraints, outcomes)
        fields["verdict_line"] = verdict_line(clauses, self._validation.get("rate"))
        return fields

    def _best(self, constraint: Any) -> tuple[float, int] | None:
        """The best validation reading of a constraint over the run and its step."""
        seen = [(v[constraint.reading_name], step) for step, v in self._history if constraint.reading_name in v]
        seen = [(r, step) for r, step in seen if math.isfinite(r)]
        if not seen:
            return None
        return min(seen, key=lambda item: constraint.relative_violation(item[0]))

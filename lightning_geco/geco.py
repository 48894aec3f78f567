"""GECO state and maths (Algorithm 1 of Rezende & Viola, "Taming VAEs", 2018).

Plain torch, no Lightning: :class:`GECO` holds one Lagrange multiplier and one moving
average per constraint, and moves the multipliers with a controller
(:mod:`lightning_geco.controllers`; by default Algorithm 1's rule). Who calls what:

- the objective, inside ``training_step``, calls :meth:`GECO.constraint_term` to turn the
  batch's per-example constraint values into the stop-gradient constraint of the loss and
  to record the batch statistics;
- :class:`lightning_geco.callbacks.GECOCallback`, once per optimizer step, reduces the
  recorded statistics over all ranks (:meth:`GECO.pending_statistics`) and applies
  :meth:`GECO.update` with the global values, identically on every rank; with the
  calibration drive it also hands :meth:`GECO.control` the reduced measurements.

Every tensor of the state is fp32, whatever autocast does around it, and lives on the
model's device so the statistics can go through a collective as they are.

Each step's bookkeeping and update are ~100 small tensor ops (a few elements each; none is
dispatched for a cast, detach or move that would return its input). On a GPU,
where a small model's step is bound by the host launching kernels, launching them costs more
than their arithmetic; with ``compile=True`` the per-step methods (:meth:`GECO.update`,
:meth:`GECO.control`, the recording half of :meth:`GECO.constraint_term` and
:meth:`GECO.record_loss`) each run as one ``torch.compile``-fused function instead, with the
same results up to float32 rounding (inductor's ``log`` can differ from ATen's in the last bit;
``tests/test_geco.py``).

Units: a constraint value is stated per element in the constraint's data units (for the
reconstruction constraint, ``per-element MSE - tolerance``); feasible when <= 0. Here the
step size of :class:`~lightning_geco.controllers.Algorithm1` has units of one over those data
units (the paper's rule, as it is); :class:`~lightning_geco.callbacks.GECOCallback`'s
``relative`` controller hands each constraint ``nu / scale``, so the ``nu`` a user states is
relative to the constraint's tolerance and has no units, and the PI controller reads
``ln(reading / tolerance)``, which has none either.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import torch
from torch import Tensor, nn

from lightning_geco.controllers import Algorithm1, MultiplierController

__all__ = [
    "DEFAULT_LOG_LAMBDA_BOUNDS",
    "DRIVES",
    "GECO",
    "LOG_LAMBDA_LIMIT",
    "MultiplierState",
    "constraint_means",
    "constraint_statistics",
    "mse_to_psnr",
    "psnr_to_mse",
]

# exp(log_lambda) must stay finite and non-zero in fp32 (max ~3.4e38, ln ~ 88.7), and
# lambda * (per-image sum) must too; +-30 leaves ~ 1e13 of head room for the sums.
DEFAULT_LOG_LAMBDA_BOUNDS = (-30.0, 30.0)
#: the widest bounds accepted: e^60 ~ 1e26 still leaves ~ 1e12 of fp32 head room for the sums
LOG_LAMBDA_LIMIT = 60.0

#: what moves lambda: the training batches, or measurements on a calibration split
DRIVES = ("training", "calibration")


def constraint_statistics(per_example: Tensor) -> Tensor:
    """``[sum_1..sum_K, count, nonfinite]`` (K + 2,), fp32, of per-example constraint values (N, K).

    What one all-reduce (SUM) carries: a constraint whose sum is not finite is left out of the
    sums and raises the flag, so a mean over ranks stays finite while the skip is decided.
    """
    total = _plain_fp32(per_example).sum(dim=0)
    finite = torch.isfinite(total)
    count = total.new_full((1,), float(per_example.shape[0]))
    # cat promotes the (1,) bool flag to fp32: one op fewer than casting it first.
    return torch.cat([torch.where(finite, total, 0.0), count, finite.logical_not().any(0, keepdim=True)])


def _as_fp32(tensor: Tensor) -> Tensor:
    """``tensor.float()``, dispatching no op when it is fp32 already (gradients kept).

    GECO's per-step work is ~100 small ops, and on a step bound by the host each dispatch
    costs host time even when the op would return its input; the check here is an attribute
    read.
    """
    return tensor if tensor.dtype == torch.float32 else tensor.float()


def _plain_fp32(tensor: Tensor) -> Tensor:
    """``tensor.detach().float()``, dispatching no op for what ``tensor`` already is (:func:`_as_fp32`)."""
    return _as_fp32(tensor.detach() if tensor.requires_grad else tensor)


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor.to(device)``, with no op dispatched when it is there already (see :func:`_plain_fp32`)."""
    return tensor if tensor.device == device else tensor.to(device)


def constraint_means(statistics: Tensor) -> Tensor:
    """Per-constraint means (K,) of ``[sum_1..sum_K, count, nonfinite]`` (K + 2,); zeros for no examples."""
    k = statistics.shape[0] - 2
    return statistics[:k] / statistics[k].clamp_min(1.0)


def psnr_to_mse(psnr_db: float) -> float:
    """Per-element MSE of a PSNR in dB for data in [0, 1] (peak value 1)."""
    if not math.isfinite(psnr_db):
        raise ValueError(f"psnr_to_mse needs a finite PSNR in dB, got {psnr_db!r}.")
    return 10.0 ** (-psnr_db / 10.0)


def mse_to_psnr(mse: float) -> float:
    """PSNR in dB of a per-element MSE for data in [0, 1] (peak value 1)."""
    if not (mse > 0 and math.isfinite(mse)):
        raise ValueError(f"mse_to_psnr needs a per-element MSE > 0 and finite (data in [0, 1]), got {mse!r}.")
    return -10.0 * math.log10(mse)


def _check_unit_interval(name: str, value: float) -> None:
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(f"GECO {name} must lie in [0, 1), got {value!r}.")


class MultiplierState(nn.Module):
    """The part of GECO that belongs to the trained model: lambda and the moving average.

    Buffers of the objective that owns them (:class:`~lightning_geco.objectives.GECOObjective`),
    so Lightning saves, loads and moves them with the weights: ``load_from_checkpoint``,
    ``trainer.validate(ckpt_path=...)`` and ``trainer.predict`` read the trained lambda.
    They are identical on every rank (every rank applies the same all-reduced update), so
    DDP's broadcast of buffers from rank 0 leaves them as they are; per-rank statistics are
    never buffers (:class:`GECO` keeps those). Written in place, so a reference to a buffer
    always sees the current value.

    Buffers:
        log_lagrange_multiplier: ``log lambda`` (K,), fp32.
        constraint_ema: moving average of the training constraint values (K,), fp32, in each
            constraint's value units (``reading - tolerance``).
        seeded: 0-dim bool, whether the moving average holds a measurement (the model has
            been trained with GECO).
    """

    log_lagrange_multiplier: Tensor
    constraint_ema: Tensor
    seeded: Tensor

    def __init__(self, num_constraints: int, initial_lambda: float = 1.0) -> None:
        super().__init__()
        if num_constraints < 1:
            raise ValueError(f"MultiplierState needs at least one constraint, got {num_constraints!r}.")
        if not (initial_lambda > 0 and math.isfinite(initial_lambda)):
            raise ValueError(f"MultiplierState initial_lambda must be positive and finite, got {initial_lambda!r}.")
        # fp32 whatever the default dtype (Lightning's -true precisions set it while a module is built)
        self.register_buffer(
            "log_lagrange_multiplier", torch.full((num_constraints,), math.log(initial_lambda), dtype=torch.float32)
        )
        self.register_buffer("constraint_ema", torch.zeros(num_constraints, dtype=torch.float32))
        self.register_buffer("seeded", torch.zeros((), dtype=torch.bool))

    @property
    def lagrange_multiplier(self) -> Tensor:
        """lambda, shape (K,), fp32, strictly positive."""
        return self.log_lagrange_multiplier.exp()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> MultiplierState:
        # Moves keep the device; a cast of the whole module (the ``bf16-true`` and ``16-true``
        # precisions call ``module.to(dtype)``) would round log lambda to steps larger than an
        # update's (frozen lambda) and overflow fp16's exp past log lambda 11: stay fp32.
        before = {name: buffer for name, buffer in self._buffers.items() if buffer is not None}
        super()._apply(fn, recurse)
        for name, buffer in before.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != buffer.dtype:  # moved only, not rounded
                self._buffers[name] = buffer.to(moved.device)
        return self

    def extra_repr(self) -> str:
        return f"num_constraints={self.log_lagrange_multiplier.numel()}"


def _state_buffer(name: str, doc: str) -> property:
    """A GECO attribute that reads and writes (in place) the buffer ``name`` of its ``state``."""

    def get(self: GECO) -> Tensor:
        return getattr(self.state, name)

    def set_(self: GECO, value: Tensor) -> None:
        getattr(self.state, name).copy_(value)

    return property(get, set_, doc=f"{doc} The buffer ``state.{name}``.")


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _compilable(method: Callable[Concatenate[GECO, _P], _R]) -> Callable[Concatenate[GECO, _P], _R]:
    """Run a per-step method of :class:`GECO` through ``torch.compile`` while its ``compile`` is on.

    One compiled function per method and process, shared by every GECO: its guards check the
    settings (``alpha``, the controller's gains, K) and the tensors' devices and dtypes, so a GECO
    with other settings compiles once more and one with the same settings reuses the kernels. A
    batch's size is left dynamic (one kernel for every batch size). When compiling fails, or a
    method has been compiled for as many settings as dynamo keeps (``recompile_limit``, 8), that
    GECO warns once and runs eagerly from then on: the same results, more ops per step.
    """
    compiled: Callable[..., _R] | None = None

    @functools.wraps(method)
    def run(self: GECO, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        nonlocal compiled
        if not self.compile:
            return method(self, *args, **kwargs)
        if compiled is None:
            compiled = torch.compile(method, dynamic=False, fullgraph=True)
        for value in args:
            if isinstance(value, Tensor) and value.dim() == 2:  # (N, K) per-example values
                torch._dynamo.maybe_mark_dynamic(value, 0)
        try:
            return compiled(self, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - compiling is an optimisation; eager is the definition
            warnings.warn(
                f"GECO could not run {method.__name__} compiled ({type(error).__name__}: {error}); "
                "its per-step updates run eagerly from now on (the same results, more ops per step).",
                stacklevel=2,
            )
            self.compile = False
            return method(self, *args, **kwargs)

    return run


class GECO:
    """Lagrange multipliers and moving averages of K constraints, moved by a controller.

    The moving average ``C_ma`` of the training constraint is always kept (it is the value of
    the stop-gradient constraint in the loss, and what the logs show). What moves ``log
    lambda`` is the ``controller`` (see :mod:`lightning_geco.controllers`), fed either by the
    training batches (:meth:`update`, every optimizer step) or, with ``drive="calibration"``,
    only by :meth:`control` with measurements on data the model does not train on.

    Every update is tensor ops on the state's device: no host sync. An invalid update (no
    examples, or a non-finite value anywhere) leaves the state as it was.

    Args:
        names: one name per constraint, used in logs and checkpoints.
        alpha: moving-average coefficient in [0, 1): ``C_ma = alpha * C_ma + (1 - alpha) * C_hat``.
        step_size: ``nu`` > 0 of the default controller, :class:`~lightning_geco.controllers.Algorithm1`
            (``log lambda += nu * C_ma``, units: 1 / constraint units); one number for every
            constraint, or one per constraint. Ignored when ``controller`` is given.
        log_lambda_bounds: clamp of ``log lambda``; keeps ``exp`` finite and positive. A
            controller with state of its own (the PI integrator) is held within it too.
        initial_lambda: the multiplier every constraint starts at (the paper: 1).
        release_speedup: >= 1, of the default controller (the paper: 1).
        max_increase: of the default controller: the most ``log lambda`` may rise in one
            update, one number or one per constraint (None: unbounded, the paper).
        controller: the update law; None: Algorithm 1 with the three arguments above.
        scales: each constraint's scale (its tolerance in value units), which the PI
            controller's log-ratio error reads; default 1.
        drive: ``"training"`` (the training batches move lambda) or ``"calibration"`` (only
            :meth:`control` does).
        state: where lambda and the moving average live (the objective's
            :class:`MultiplierState`, so they are saved with the model); None: a state of
            this GECO's own. A given state that was never trained starts at ``initial_lambda``;
            a trained one (``seeded``) keeps its lambda.
        compile: run each step's bookkeeping and update as ``torch.compile``-fused functions
            (see the module docstring); settable later (``geco.compile = True``), as
            :class:`~lightning_geco.callbacks.GECOCallback` does once it knows the device.
            The controller must then be traceable (tensor ops only, as the library's are).
    """

    def __init__(
        self,
        names: Sequence[str],
        alpha: float = 0.99,
        step_size: float | Sequence[float] = 1.0,
        log_lambda_bounds: tuple[float, float] = DEFAULT_LOG_LAMBDA_BOUNDS,
        initial_lambda: float = 1.0,
        release_speedup: float = 1.0,
        max_increase: float | Sequence[float] | None = None,
        controller: MultiplierController | None = None,
        scales: Sequence[float] | None = None,
        drive: str = "training",
        state: MultiplierState | None = None,
        compile: bool = False,
    ) -> None:
        names = list(names)
        if not names:
            raise ValueError("GECO needs at least one constraint name, got none.")
        if len(set(names)) != len(names):
            raise ValueError(f"GECO constraint names must be unique, got {names}.")
        _check_unit_interval("alpha", alpha)
        k = len(names)
        if controller is None:
            sizes = [step_size] * k if isinstance(step_size, (int, float)) else list(step_size)
            if len(sizes) != k or not all(s > 0 and math.isfinite(s) for s in sizes):
                raise ValueError(
                    f"GECO step_size (nu) must be a positive finite number, got {step_size!r} "
                    f"(one number, or one per constraint: {k})."
                )
            increases = None
            if max_increase is not None:
                increases = [max_increase] * k if isinstance(max_increase, (int, float)) else list(max_increase)
                if len(increases) != k or not all(m > 0 for m in increases):
                    raise ValueError(
                        f"GECO max_increase must be positive (one number, or one per constraint: {k}) or None, "
                        f"got {max_increase!r}."
                    )
            controller = Algorithm1(sizes, release_speedup, increases)
        low, high = log_lambda_bounds
        if not (-LOG_LAMBDA_LIMIT <= low < high <= LOG_LAMBDA_LIMIT):
            raise ValueError(
                f"GECO log_lambda_bounds must lie in [-{LOG_LAMBDA_LIMIT:g}, {LOG_LAMBDA_LIMIT:g}] with low < high, got "
                f"{log_lambda_bounds!r}: lambda = e^bound and lambda times a per-image constraint sum must stay finite "
                "in fp32 (e^88.7 is its largest number)."
            )
        if not initial_lambda > 0 or not low <= math.log(initial_lambda) <= high:
            raise ValueError(
                f"GECO initial_lambda must be positive with log(lambda) in {log_lambda_bounds}, got {initial_lambda!r}."
            )
        scales = [1.0] * k if scales is None else [float(s) for s in scales]
        if len(scales) != k or not all(math.isfinite(s) and s > 0 for s in scales):
            raise ValueError(f"GECO scales must be {k} positive finite numbers, got {scales!r}.")
        if drive not in DRIVES:
            raise ValueError(f"GECO drive must be one of {DRIVES}, got {drive!r}.")
        self.names = names
        self.alpha = float(alpha)
        self.controller = controller
        self.drive = drive
        self.scale = torch.tensor(scales, dtype=torch.float32)
        self.log_lambda_bounds = (float(low), float(high))
        if state is None:
            state = MultiplierState(k, initial_lambda)
        elif state.log_lagrange_multiplier.shape != (k,):
            raise ValueError(
                f"GECO has {k} constraints {names}, but the MultiplierState holds "
                f"{state.log_lagrange_multiplier.numel()} multipliers."
            )
        trained = bool(state.seeded)
        if not trained:
            state.log_lagrange_multiplier.fill_(math.log(initial_lambda))
        self.state = state
        self.compile = bool(compile)
        self.controller.limit_to(self.log_lambda_bounds)
        if trained:  # a trained model fitted on: lambda goes on from where it stands
            self.controller.continue_from(self.log_lagrange_multiplier)
        else:
            self.controller.reset(self.log_lagrange_multiplier)
        self._num_updates = torch.zeros((), dtype=torch.int64)
        self._num_skipped_updates = torch.zeros((), dtype=torch.int64)
        self._num_consecutive_skips = torch.zeros((), dtype=torch.int64)
        # the longest run of skips in a row since take_longest_skips() last read it: a run that
        # ends between two reads still counts (the reads come at logging steps only)
        self._longest_skips = torch.zeros((), dtype=torch.int64)
        #: 0-dim bool: whether the last :meth:`update` was skipped for a non-finite value
        self.skipped = torch.zeros((), dtype=torch.bool)
        self._num_measurements = torch.zeros((), dtype=torch.int64)
        # [sum_1..sum_K, count, nonfinite] of the coming update, summed over (micro-)batches
        self._pending = torch.zeros(k + 2, dtype=torch.float32)
        #: whether :meth:`constraint_term` recorded a batch since the callback last took the
        #: statistics (a host flag, so asking costs no device read)
        self.recorded = False
        #: how many (micro-)batches :meth:`constraint_term` recorded since the callback last reset
        #: it (each training batch): a host count, more than one when a step calls the loss twice
        self.recorded_calls = 0

    # ------------------------------------------------------------------ state
    @property
    def num_constraints(self) -> int:
        return len(self.names)

    # lambda, the moving average and its flag are the state module's buffers, written in place.
    log_lagrange_multiplier = _state_buffer("log_lagrange_multiplier", "``log lambda`` (K,), fp32.")
    constraint_ema = _state_buffer("constraint_ema", "Moving average of the training constraint values (K,), fp32.")
    _seeded = _state_buffer("seeded", "0-dim bool: whether the moving average holds a measurement.")

    @property
    def lagrange_multiplier(self) -> Tensor:
        """lambda, shape (K,), fp32, strictly positive."""
        return self.state.lagrange_multiplier

    @property
    def device(self) -> torch.device:
        return self.log_lagrange_multiplier.device

    # Counters are device tensors so an update needs no host sync; reading one syncs.
    @property
    def seeded(self) -> bool:
        """Whether the moving average holds a measurement yet."""
        return bool(self._seeded)

    @property
    def num_updates(self) -> int:
        """Valid training updates so far."""
        return int(self._num_updates)

    @property
    def num_skipped_updates(self) -> int:
        """Training updates skipped for a non-finite value."""
        return int(self._num_skipped_updates)

    @property
    def num_consecutive_skips(self) -> int:
        """Training updates skipped in a row, up to the last one (0 after a valid one)."""
        return int(self._num_consecutive_skips)

    def take_longest_skips(self) -> int:
        """The longest run of training updates skipped in a row since the last call (or since
        the start), the run still going included; resets it to the current run (reading it syncs)."""
        longest = int(self._longest_skips)
        self._longest_skips = self._num_consecutive_skips.clone()
        return longest

    @property
    def num_measurements(self) -> int:
        """Valid :meth:`control` measurements so far (calibration drive)."""
        return int(self._num_measurements)

    def to(self, device: torch.device | str) -> GECO:
        """Move every tensor of the state to ``device``, keeping dtypes."""
        self.state.to(device)
        for attr in (
            "scale",
            "_num_updates",
            "_num_skipped_updates",
            "_num_consecutive_skips",
            "_longest_skips",
            "skipped",
            "_num_measurements",
            "_pending",
        ):
            setattr(self, attr, getattr(self, attr).to(device=device))
        self.controller.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """What the training loop needs beyond the model: counters and the controller's state
        (lambda and the moving average are the model's buffers, see :class:`MultiplierState`)."""
        return {
            "names": list(self.names),
            "num_updates": self.num_updates,
            "num_skipped_updates": self.num_skipped_updates,
            "num_consecutive_skips": self.num_consecutive_skips,
            "longest_skips": int(self._longest_skips),
            "num_measurements": self.num_measurements,
            "controller": {"name": self.controller.name, **self.controller.state_dict()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ValueError(
                f"GECO state holds constraints {list(state['names'])}, but this model has {self.names}; "
                "the checkpoint comes from an incompatible model."
            )
        device = self.device
        if "log_lagrange_multiplier" in state:
            # A checkpoint written before lambda and the moving average were the model's buffers.
            self.log_lagrange_multiplier = state["log_lagrange_multiplier"]
            self.constraint_ema = state["constraint_ema"]
            self._seeded = torch.tensor(bool(state["seeded"]))
        self._num_updates = torch.tensor(int(state["num_updates"]), device=device)
        self._num_skipped_updates = torch.tensor(int(state.get("num_skipped_updates", 0)), device=device)
        self._num_consecutive_skips = torch.tensor(int(state.get("num_consecutive_skips", 0)), device=device)
        # Checkpoints from before the longest run was kept: the run going on is the longest known.
        self._longest_skips = torch.tensor(int(state.get("longest_skips", self._num_consecutive_skips)), device=device)
        self.skipped = torch.zeros((), dtype=torch.bool, device=device)
        self._num_measurements = torch.tensor(int(state.get("num_measurements", 0)), device=device)
        saved = state.get("controller")
        if saved is not None and saved.get("name") == self.controller.name:
            self.controller.load_state_dict(saved)
        else:
            # A checkpoint of another controller (or of a version before controllers): the
            # new one starts from the saved lambda, so the run continues where it stood.
            self.controller.continue_from(self.log_lagrange_multiplier)
        self.reset_pending()

    # --------------------------------------------------------------- the loss
    def moving_average_with(self, constraint: Tensor) -> Tensor:
        """The moving average as it would be after folding in ``constraint`` (K,); no state change."""
        constraint = _plain_fp32(constraint)
        averaged = self.alpha * self.constraint_ema + (1.0 - self.alpha) * constraint
        return torch.where(self._seeded, averaged, constraint)

    def constraint_term(self, per_example: Tensor) -> Tensor:
        """Stop-gradient constraint of Algorithm 1 for one (micro-)batch, and record its statistics.

        Args:
            per_example: constraint values, shape (N, K), per element in data units (<= 0 feasible).

        Returns:
            Shape (K,), fp32: value = moving average including this batch, gradient = the batch
            mean's gradient (``C_hat + stop_gradient(C_ma - C_hat)``).
        """
        if per_example.dim() != 2 or per_example.shape[1] != self.num_constraints:
            raise ValueError(
                f"GECO expects per-example constraints of shape (N, {self.num_constraints}), "
                f"got {tuple(per_example.shape)}."
            )
        per_example = _as_fp32(per_example)
        batch_mean = per_example.mean(dim=0)
        self.recorded = True
        self.recorded_calls += 1
        return batch_mean + self._record_and_smooth(per_example.detach(), batch_mean.detach())

    @_compilable
    def _record_and_smooth(self, per_example: Tensor, batch_mean: Tensor) -> Tensor:
        """Record the batch; the moving average including it, less the batch mean (K,)."""
        self.record(per_example)
        return self.moving_average_with(batch_mean) - batch_mean

    def record(self, per_example: Tensor) -> None:
        """Add a (micro-)batch's constraint values (N, K) to the statistics of the coming update.

        Tensor ops only, no host sync: a non-finite sum is counted in the flag and left out.
        """
        self._pending += _to_device(constraint_statistics(per_example), self._pending.device)

    @_compilable
    def record_loss(self, loss: Tensor) -> None:
        """Flag the coming update as non-finite when ``loss`` is (no host sync: a tensor op)."""
        finite = torch.isfinite(loss)  # bool, no gradient: needs neither detach nor a cast
        if finite.dim() > 0:
            finite = finite.all()
        # In place on the element (``pending[-1] += ...`` would add a select and a copy).
        self._pending[-1].add_(_to_device(finite.logical_not(), self._pending.device))

    def pending_statistics(self) -> Tensor:
        """fp32 vector ``[sum_1..sum_K, count, nonfinite]`` for one all-reduce (SUM) over ranks
        (a copy: the collective may work in place)."""
        return self._pending.clone()

    def reset_pending(self) -> None:
        # In place: every optimizer step clears it, and pending_statistics() hands out copies.
        self._pending.zero_()

    # ------------------------------------------------------------- the update
    def _split(self, statistics: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(mean (K,), has_examples, valid)`` of ``[sum_1..sum_K, count, nonfinite]``."""
        statistics = _plain_fp32(statistics)
        k = self.num_constraints
        # The division of constraint_means, on the count it also tests (one op less per step).
        sums, count, nonfinite = statistics[:k], statistics[k], statistics[k + 1]
        mean = sums / count.clamp_min(1.0)
        has_examples = count > 0
        valid = has_examples & (nonfinite == 0) & torch.isfinite(mean).all()
        return mean, has_examples, valid

    def _move(self, value: Tensor, ema: Tensor, period: int, valid: Tensor) -> None:
        proposed = self.controller.step(self.log_lagrange_multiplier, value, ema, self.scale, period, valid)
        low, high = self.log_lambda_bounds
        self.log_lagrange_multiplier = torch.where(valid, proposed.clamp(low, high), self.log_lagrange_multiplier)

    @_compilable
    def update(self, statistics: Tensor) -> Tensor:
        """One optimizer step's update from (already reduced) training statistics; clears the pending ones.

        Folds the batch mean into the moving average and, with ``drive="training"``, moves
        lambda (Algorithm 1's step 5, or the PI law).

        Args:
            statistics: ``[sum_1..sum_K, count, nonfinite]`` summed over every rank.

        Returns:
            0-dim bool tensor: True when the statistics were valid; False (no examples, or a
            non-finite value anywhere) leaves the state untouched. A step with examples and a
            non-finite value is *skipped* (:attr:`skipped`, counted, and counted in a row).
        """
        self.reset_pending()
        mean, has_examples, valid = self._split(statistics)
        ema = torch.where(valid, self.moving_average_with(mean), self.constraint_ema)
        if self.drive == "training":
            self._move(mean, ema, 1, valid)
        self.constraint_ema = ema
        self._seeded.logical_or_(valid)
        self._num_updates.add_(valid)
        self.skipped = has_examples & ~valid
        self._num_skipped_updates.add_(self.skipped)
        # A valid step ends the run of skips, a skipped one extends it, and one with no examples
        # (every rank's batch skipped the objective) does neither: else alternating such steps
        # would keep the stop from firing.
        self._num_consecutive_skips = torch.where(valid, 0, self._num_consecutive_skips + self.skipped)
        self._longest_skips = torch.maximum(self._longest_skips, self._num_consecutive_skips)
        return valid

    @_compilable
    def control(self, statistics: Tensor, period: int) -> Tensor:
        """Move lambda from a measurement on data the model does not train on.

        Args:
            statistics: ``[sum_1..sum_K, count, nonfinite]`` of the measurement, summed over ranks.
            period: optimizer steps since the previous measurement.

        Returns:
            0-dim bool tensor: whether the measurement was valid (else nothing moved).
        """
        mean, _, valid = self._split(statistics)
        # Algorithm 1 reads its input as the moving average: here, the measurement itself.
        self._move(mean, mean, period, valid)
        self._num_measurements.add_(valid)
        return valid

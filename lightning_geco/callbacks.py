"""GECOCallback: the one place the Lagrange multipliers move.

Cadence: once per optimizer step (``on_before_optimizer_step``, which Lightning calls after
the backward pass of the last micro-batch of an accumulation window, before ``step``).
Never during validation, test or predict: those run the objective in eval mode, which reads
lambda and records nothing.

DDP: every rank contributes ``[sum of per-example constraints (K), example count, non-finite
flags]`` in fp32 to ONE all-reduce (SUM), every rank applies the same update to the same
numbers, so lambda and the moving average are bit-identical on all ranks without a
broadcast. The collective runs on every rank at every optimizer step; no rank-local
condition can skip it.

Non-finite values: a NaN/inf in any rank's constraint or loss makes the reduced flag
non-zero on every rank together: lambda is left alone, the step's gradients are dropped
(so NaN never reaches the optimizer state), the skip is counted and logged, and after
``max_nonfinite_steps`` consecutive skips training stops with an error.

Checkpoints: :meth:`state_dict` holds lambda, the moving average, its seeded flag, the update
counts and the constraints as stated (name, tolerance, unit).
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_geco.constraints import Constraint
from lightning_geco.geco import DEFAULT_LOG_LAMBDA_BOUNDS, GECO
from lightning_geco.objectives import GECOObjective

__all__ = ["GECOCallback", "NonFiniteConstraintError", "find_geco_objective", "is_logging_step"]


class NonFiniteConstraintError(RuntimeError):
    """Raised after too many consecutive optimizer steps with a non-finite constraint or loss."""


def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether values logged now reach the loggers: Lightning writes step values every
    ``log_every_n_steps`` optimizer steps; we add the last step so a run's final values are there.

    Step-level ``self.log`` calls cost ~0.5-1 ms each in Lightning's bookkeeping whether or not
    they are written, which is ~10 % of a small model's step; skipping them between writes
    changes nothing any logger sees.
    """
    connector = getattr(trainer, "_logger_connector", None)
    due = connector.should_update_logs if connector is not None else True
    last = 0 < trainer.max_steps <= trainer.global_step + 1
    return due or last


def _all_reduce_sum(trainer: pl.Trainer, tensor: Tensor) -> Tensor:
    """Sum over all ranks, identical everywhere. One all-reduce under torch.distributed (the
    strategy's ``reduce`` adds a barrier: a second collective per step); other strategies
    (e.g. XLA) go through ``strategy.reduce``."""
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor
    return trainer.strategy.reduce(tensor, reduce_op="sum")


def find_geco_objective(pl_module: pl.LightningModule) -> GECOObjective:
    """The model's single :class:`GECOObjective`; a clear error when there is none or several."""
    found = [m for m in pl_module.modules() if isinstance(m, GECOObjective)]
    if len(found) != 1:
        raise ValueError(
            f"GECOCallback needs a model with exactly one GECOObjective, found {len(found)} in "
            f"{type(pl_module).__name__}. Use objective=GECOObjective(...) or remove the callback."
        )
    return found[0]


class GECOCallback(Callback):
    """Moves GECO's Lagrange multipliers, once per optimizer step, identically on every rank.

    The step is relative to each constraint's :attr:`~lightning_geco.constraints.Constraint.scale`
    (its tolerance, or the room below a perfect pNCC): ``log lambda_k += nu * C_ma_k / scale_k``.
    So ``nu`` has no units: a moving average 10 % over the tolerance moves ``log lambda`` by
    ``0.1 * nu`` per step, whatever the constraint, its tolerance or the data. With the paper's
    absolute step, the nu that worked was 0.4 for MSE 0.005 on the shapes, 0.1 for MSE 0.015 on
    MNIST, 0.01 for a cross-entropy of 0.15 and 0.02 for an MSE of 0.18: relative to the
    tolerance, all of them lie in 0.0008-0.005 (see docs/RESULTS.md).

    Three departures from the paper, all against the same wind-up: while the decoder is still
    learning, the violation is large whatever lambda is (an untrained decoder is 4-35x past
    its tolerance), lambda climbs past the value the trained model needs, and the run spends
    its budget coming back down, delivering more quality than asked at a higher rate.

    - alpha 0.9 instead of 0.99, so the moving average forgets the untrained decoder's
      violation within ~10 steps;
    - ``max_relative_violation`` 1: a violation counts at most 100 % of the scale, so
      ``log lambda`` rises by at most nu per step however far off the decoder starts;
    - ``release_speedup`` 3: lambda falls three times as fast as it rises, as in Genesis
      (Engelcke et al. 2020), so what overshoot remains is undone before the run ends.

    The measurements behind each (and what they cost: a noisy constraint such as pNCC settles
    slightly on the violated side under the speedup) are in docs/RESULTS.md, "Robustness".

    Args:
        alpha: moving-average coefficient in [0, 1) (the paper used 0.99).
        step_size: nu > 0, relative: ``log lambda += nu * C_ma / scale`` (no units). A
            constraint's own ``step_size`` takes precedence for that constraint.
        log_lambda_bounds: clamp of log lambda, so exp() never overflows.
        initial_lambda: lambda before the first update (the paper: 1).
        release_speedup: >= 1; how many times faster lambda falls than it rises (1: the paper).
        max_relative_violation: the update counts a violation as at most this many times the
            constraint's scale, so ``log lambda`` rises by at most ``nu * max_relative_violation``
            per step (None: unbounded, the paper).
        max_nonfinite_steps: consecutive non-finite optimizer steps tolerated before an error.
    """

    def __init__(
        self,
        alpha: float = 0.9,
        step_size: float = 0.006,
        log_lambda_bounds: tuple[float, float] = DEFAULT_LOG_LAMBDA_BOUNDS,
        initial_lambda: float = 1.0,
        release_speedup: float = 3.0,
        max_relative_violation: float | None = 1.0,
        max_nonfinite_steps: int = 10,
    ) -> None:
        super().__init__()
        # Validate now, before any Trainer exists: a probe state raises the clear errors.
        GECO(["probe"], alpha, step_size, log_lambda_bounds, initial_lambda, release_speedup)
        if max_relative_violation is not None and not max_relative_violation > 0:
            raise ValueError(f"max_relative_violation must be positive or None, got {max_relative_violation!r}.")
        if max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be a positive int, got {max_nonfinite_steps!r}.")
        self.alpha = alpha
        self.step_size = step_size
        self.log_lambda_bounds = tuple(log_lambda_bounds)
        self.initial_lambda = initial_lambda
        self.release_speedup = release_speedup
        self.max_relative_violation = max_relative_violation
        self.max_nonfinite_steps = max_nonfinite_steps
        self.geco: GECO | None = None
        self.objective: GECOObjective | None = None
        self.consecutive_nonfinite_steps = 0
        self._state_to_load: dict[str, Any] | None = None

    # --------------------------------------------------------------- set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.objective = find_geco_objective(pl_module)
        if self.geco is None or self.geco.names != self.objective.names:
            constraints = list(self.objective.constraints)
            if self.max_relative_violation is None:
                max_increase = None
            else:
                max_increase = [self.relative_step_size(c) * self.max_relative_violation for c in constraints]
            self.geco = GECO(
                self.objective.names,
                self.alpha,
                [self.absolute_step_size(c) for c in constraints],
                self.log_lambda_bounds,
                self.initial_lambda,
                self.release_speedup,
                max_increase,
            )
        self.objective.attach(self.geco)
        self._restore_if_pending()

    def relative_step_size(self, constraint: Constraint) -> float:
        """The relative nu of one constraint: its own ``step_size``, or the callback's."""
        return constraint.step_size if constraint.step_size is not None else self.step_size

    def absolute_step_size(self, constraint: Constraint) -> float:
        """GECO's step for one constraint in 1 / (its value's units): relative nu over its scale."""
        relative = self.relative_step_size(constraint)
        scale = constraint.scale
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(
                f"GECO steps relative to a constraint's scale, but {constraint.name!r} has scale {scale!r}; "
                "it must be a positive finite number."
            )
        return relative / scale

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The strategy has put the model on its device by now; the statistics must live there
        # too so they can go through the collective (NCCL needs CUDA tensors).
        self.geco.to(pl_module.device)
        self.geco.reset_pending()

    # --------------------------------------------------------------- update
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        geco = self.geco
        statistics = _all_reduce_sum(trainer, geco.pending_statistics())
        k = geco.num_constraints
        batch_mean = statistics[:k] / statistics[k].clamp_min(1.0)
        moved = geco.update(statistics)
        nonfinite = bool(statistics[k + 1] > 0) or (statistics[k] > 0 and not moved)
        if nonfinite:
            optimizer.zero_grad(set_to_none=True)
            self.consecutive_nonfinite_steps += 1
        else:
            self.consecutive_nonfinite_steps = 0
        if is_logging_step(trainer):
            self._log(pl_module, batch_mean)
        if self.consecutive_nonfinite_steps >= self.max_nonfinite_steps:
            raise NonFiniteConstraintError(
                f"GECO saw a non-finite constraint or loss on {self.consecutive_nonfinite_steps} consecutive "
                f"optimizer steps (max_nonfinite_steps={self.max_nonfinite_steps}); lambda was last "
                f"{geco.lagrange_multiplier.tolist()}. Lower the learning rate, check the data, or use a "
                "precision with more range (bf16-mixed or 32)."
            )

    def _log(self, pl_module: pl.LightningModule, batch_mean: Tensor) -> None:
        geco = self.geco
        values = {}
        for i, name in enumerate(geco.names):
            prefix = "geco" if geco.num_constraints == 1 else f"geco/{name}"
            values[f"{prefix}/lambda"] = geco.lagrange_multiplier[i]
            values[f"{prefix}/constraint"] = batch_mean[i]
            values[f"{prefix}/constraint_ema"] = geco.constraint_ema[i]
        values["geco/skipped_updates"] = float(geco.num_skipped_updates)
        # Identical on every rank after the all-reduce: no sync_dist needed.
        pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=1)

    # ----------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        if self.geco is None:
            return {}
        return {
            "geco": self.geco.state_dict(),
            "constraints": self.objective.describe() if self.objective is not None else [],
            "consecutive_nonfinite_steps": self.consecutive_nonfinite_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._state_to_load = state_dict
            self._restore_if_pending()

    def _restore_if_pending(self) -> None:
        if self._state_to_load is None or self.geco is None or self.objective is None:
            return
        state, self._state_to_load = self._state_to_load, None
        saved = state.get("constraints", [])
        current = self.objective.describe()
        if [c["name"] for c in saved] != [c["name"] for c in current]:
            raise ValueError(
                f"The checkpoint's GECO state is for constraints {[c['name'] for c in saved]}, but the model "
                f"has {[c['name'] for c in current]}: the checkpoint comes from an incompatible model."
            )
        for before, now in zip(saved, current):
            if (before["tolerance"], before["unit"]) != (now["tolerance"], now["unit"]):
                rank_zero_warn(
                    f"Resuming GECO constraint {now['name']!r} with tolerance {now['tolerance']} {now['unit']} "
                    f"(the checkpoint was trained with {before['tolerance']} {before['unit']}); lambda and the "
                    "moving average continue from the checkpoint."
                )
        self.geco.load_state_dict(state["geco"])
        self.consecutive_nonfinite_steps = int(state.get("consecutive_nonfinite_steps", 0))

"""GECO state and maths (Algorithm 1 of Rezende & Viola, "Taming VAEs", 2018).

Plain torch, no Lightning: :class:`GECO` holds one Lagrange multiplier and one moving
average per constraint, and applies the paper's update rule. Who calls what:

- the objective, inside ``training_step``, calls :meth:`GECO.constraint_term` to turn the
  batch's per-example constraint values into the stop-gradient constraint of the loss and
  to record the batch statistics;
- :class:`lightning_geco.callbacks.GECOCallback`, once per optimizer step, reduces the
  recorded statistics over all ranks (:meth:`GECO.pending_statistics`) and applies
  :meth:`GECO.update` with the global values, identically on every rank.

Every tensor of the state is fp32, whatever autocast does around it, and lives on the
model's device so the statistics can go through a collective as they are.

Units: a constraint value is stated per element in the constraint's data units (for the
reconstruction constraint, ``per-element MSE - tolerance``); feasible when <= 0. Here the
step size has units of one over those data units (the paper's rule, as it is);
:class:`~lightning_geco.callbacks.GECOCallback` hands each constraint ``nu / scale``, so the
``nu`` a user states is relative to the constraint's tolerance and has no units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["GECO", "mse_to_psnr", "psnr_to_mse"]

# exp(log_lambda) must stay finite and non-zero in fp32 (max ~3.4e38, ln ~ 88.7), and
# lambda * (per-image sum) must too; +-30 leaves ~ 1e13 of head room for the sums.
DEFAULT_LOG_LAMBDA_BOUNDS = (-30.0, 30.0)


def psnr_to_mse(psnr_db: float) -> float:
    """Per-element MSE of a PSNR in dB for data in [0, 1] (peak value 1)."""
    return 10.0 ** (-psnr_db / 10.0)


def mse_to_psnr(mse: float) -> float:
    """PSNR in dB of a per-element MSE for data in [0, 1] (peak value 1)."""
    return -10.0 * math.log10(mse)


def _check_unit_interval(name: str, value: float) -> None:
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(f"GECO {name} must lie in [0, 1), got {value!r}.")


class GECO:
    """Lagrange multipliers and moving averages of K constraints, updated as in Algorithm 1.

    Args:
        names: one name per constraint, used in logs and checkpoints.
        alpha: moving-average coefficient in [0, 1): ``C_ma = alpha * C_ma + (1 - alpha) * C_hat``.
        step_size: ``nu`` > 0 in ``log lambda += nu * C_ma`` (units: 1 / constraint units); one
            number for every constraint, or one per constraint.
        log_lambda_bounds: clamp of ``log lambda``; keeps ``exp`` finite and positive.
        initial_lambda: the multiplier every constraint starts at (the paper: 1).
        release_speedup: >= 1; a step that lowers lambda (a constraint met on average) is this
            many times larger than one that raises it (the paper: 1; Genesis, Engelcke et al.
            2020, uses 10).
        max_increase: the most ``log lambda`` may rise in one update, one number or one per
            constraint (None: unbounded, the paper).
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
    ) -> None:
        names = list(names)
        if not names:
            raise ValueError("GECO needs at least one constraint name, got none.")
        if len(set(names)) != len(names):
            raise ValueError(f"GECO constraint names must be unique, got {names}.")
        _check_unit_interval("alpha", alpha)
        step_sizes = [step_size] * len(names) if isinstance(step_size, (int, float)) else list(step_size)
        if len(step_sizes) != len(names) or not all(s > 0 and math.isfinite(s) for s in step_sizes):
            raise ValueError(
                f"GECO step_size (nu) must be a positive finite number, got {step_size!r} "
                f"(one number, or one per constraint: {len(names)})."
            )
        low, high = log_lambda_bounds
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"GECO log_lambda_bounds must be finite with low < high, got {log_lambda_bounds!r}.")
        if not initial_lambda > 0 or not low <= math.log(initial_lambda) <= high:
            raise ValueError(
                f"GECO initial_lambda must be positive with log(lambda) in {log_lambda_bounds}, got {initial_lambda!r}."
            )
        if not (math.isfinite(release_speedup) and release_speedup >= 1.0):
            raise ValueError(f"GECO release_speedup must be a finite number >= 1, got {release_speedup!r}.")
        if max_increase is None:
            increases = [math.inf] * len(names)
        else:
            increases = [max_increase] * len(names) if isinstance(max_increase, (int, float)) else list(max_increase)
        if len(increases) != len(names) or not all(m > 0 for m in increases):
            raise ValueError(
                f"GECO max_increase must be positive (one number, or one per constraint: {len(names)}) or None, "
                f"got {max_increase!r}."
            )
        self.names = names
        self.alpha = float(alpha)
        self.release_speedup = float(release_speedup)
        self.max_increase = torch.tensor(increases, dtype=torch.float32)
        self.step_size = torch.tensor(step_sizes, dtype=torch.float32)
        self.log_lambda_bounds = (float(low), float(high))
        k = len(names)
        self.log_lagrange_multiplier = torch.full((k,), math.log(initial_lambda), dtype=torch.float32)
        self.constraint_ema = torch.zeros(k, dtype=torch.float32)
        self.seeded = False
        self.num_updates = 0
        self.num_skipped_updates = 0
        self._pending_sum = torch.zeros(k, dtype=torch.float32)
        self._pending_count = torch.zeros((), dtype=torch.float32)
        self._pending_nonfinite = torch.zeros((), dtype=torch.float32)

    # ------------------------------------------------------------------ state
    @property
    def num_constraints(self) -> int:
        return len(self.names)

    @property
    def lagrange_multiplier(self) -> Tensor:
        """lambda, shape (K,), fp32, strictly positive."""
        return self.log_lagrange_multiplier.exp()

    @property
    def device(self) -> torch.device:
        return self.log_lagrange_multiplier.device

    def to(self, device: torch.device | str) -> GECO:
        """Move every tensor of the state to ``device``, keeping fp32."""
        for attr in (
            "log_lagrange_multiplier",
            "constraint_ema",
            "step_size",
            "max_increase",
            "_pending_sum",
            "_pending_count",
            "_pending_nonfinite",
        ):
            setattr(self, attr, getattr(self, attr).to(device=device, dtype=torch.float32))
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "log_lagrange_multiplier": self.log_lagrange_multiplier.detach().cpu().clone(),
            "constraint_ema": self.constraint_ema.detach().cpu().clone(),
            "seeded": self.seeded,
            "num_updates": self.num_updates,
            "num_skipped_updates": self.num_skipped_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ValueError(
                f"GECO state holds constraints {list(state['names'])}, but this model has {self.names}; "
                "the checkpoint comes from an incompatible model."
            )
        device = self.device
        self.log_lagrange_multiplier = state["log_lagrange_multiplier"].to(device=device, dtype=torch.float32).clone()
        self.constraint_ema = state["constraint_ema"].to(device=device, dtype=torch.float32).clone()
        self.seeded = bool(state["seeded"])
        self.num_updates = int(state["num_updates"])
        self.num_skipped_updates = int(state.get("num_skipped_updates", 0))
        self.reset_pending()

    # --------------------------------------------------------------- the loss
    def moving_average_with(self, constraint: Tensor) -> Tensor:
        """The moving average as it would be after folding in ``constraint`` (K,); no state change."""
        constraint = constraint.detach().float()
        if not self.seeded:
            return constraint
        return self.alpha * self.constraint_ema + (1.0 - self.alpha) * constraint

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
        per_example = per_example.float()
        batch_mean = per_example.mean(dim=0)
        self.record(per_example.detach())
        smoothed = self.moving_average_with(batch_mean)
        return batch_mean + (smoothed - batch_mean).detach()

    def record(self, per_example: Tensor) -> None:
        """Add a (micro-)batch's constraint values (N, K) to the statistics of the coming update.

        Tensor ops only, no host sync: a non-finite sum is counted in the flag and left out.
        """
        total = per_example.detach().float().sum(dim=0).to(self._pending_sum.device)
        finite = torch.isfinite(total)
        self._pending_nonfinite += (~finite).any().float()
        self._pending_sum += torch.where(finite, total, torch.zeros_like(total))
        self._pending_count += float(per_example.shape[0])

    def record_loss(self, loss: Tensor) -> None:
        """Flag the coming update as non-finite when ``loss`` is (no host sync: a tensor op)."""
        self._pending_nonfinite += (~torch.isfinite(loss.detach().float())).sum().to(self._pending_nonfinite.device)

    def pending_statistics(self) -> Tensor:
        """fp32 vector ``[sum_1..sum_K, count, nonfinite]`` for one all-reduce (SUM) over ranks."""
        return torch.cat([self._pending_sum, self._pending_count.reshape(1), self._pending_nonfinite.reshape(1)])

    def reset_pending(self) -> None:
        self._pending_sum = torch.zeros_like(self.log_lagrange_multiplier)
        self._pending_count = torch.zeros((), dtype=torch.float32, device=self.device)
        self._pending_nonfinite = torch.zeros((), dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------- the update
    def update(self, statistics: Tensor) -> bool:
        """Apply one step of Algorithm 1 from (already reduced) statistics; clears the pending ones.

        Args:
            statistics: ``[sum_1..sum_K, count, nonfinite]`` summed over every rank.

        Returns:
            True when lambda moved; False when the step was skipped (no examples, or a
            non-finite value anywhere), which leaves the state untouched.
        """
        self.reset_pending()
        statistics = statistics.detach().float()
        k = self.num_constraints
        sums, count, nonfinite = statistics[:k], statistics[k], statistics[k + 1]
        if count <= 0:
            return False
        batch_mean = sums / count
        if nonfinite > 0 or not torch.isfinite(batch_mean).all():
            self.num_skipped_updates += 1
            return False
        self.constraint_ema = self.moving_average_with(batch_mean)
        self.seeded = True
        low, high = self.log_lambda_bounds
        step = self.step_size * self.constraint_ema
        step = torch.where(step < 0, step * self.release_speedup, step).minimum(self.max_increase)
        self.log_lagrange_multiplier = (self.log_lagrange_multiplier + step).clamp(low, high)
        self.num_updates += 1
        return True

"""How GECO's Lagrange multipliers move: the update laws, kept apart from the state they move.

Each controller maps one *measurement* of K constraints to a new ``log lambda`` (K,). They
are plain torch, tensor ops only (no host sync), and never skip: the caller
(:class:`~lightning_geco.geco.GECO`) decides with ``torch.where`` whether a measurement was
valid. Two classes, three laws selectable by name (``GECOCallback(controller=...)``):

``"paper"`` (:class:`Algorithm1`)
    Algorithm 1 of Rezende & Viola (2018) as written: ``log lambda += nu * C_ma`` with the
    moving average ``C_ma`` of the constraint value (units of ``nu``: one over the value's).

``"relative"`` (:class:`Algorithm1` with per-constraint steps, a cap and a speedup; the default before PI)
    The step is relative to the constraint's scale, ``log lambda += nu * C_ma / scale``, a rise
    is capped at ``nu * max_relative_violation``, a fall is ``release_speedup`` times larger.
    Three heuristics against wind-up.

``"pi"`` (:class:`PIController`; the default)
    A proportional-integral law on ``log lambda`` with a log-ratio error (ControlVAE, Shao et
    al. 2020; the PID Lagrangian of Stooke et al. 2020; nuPI, Sohrabi et al. 2024), in the
    position form with a clamped integrator that holds while the reading is arriving::

        e_t        = ln(reading_t / tolerance)                      (0 on target, +-0.69 at 2x / 0.5x)
        xi_t       = s * xi_{t-1} + (1 - s) * e_t                   (fast average, xi_{-1} = e_0)
        zeta_t     = r * zeta_{t-1} + (1 - r) * e_t                 (slow average, zeta_{-1} = e_0)
        slope_t    = (xi_t - zeta_t) / (T_slow - T_fast)            (the error's slope per step)
        hold_t     = xi_t > 0 and slope_t < 0 and xi_t < H * -slope_t
        J_t        = clip(I_{t-1} + K_I * clip(e_t, +-L) * (not hold_t), bounds)   (I_{-1} = log initial lambda)
        I_t        = max(J_t + K_I * min(max(xi_t, zeta_t) + R, 0), min(J_t, F_{t-1}))   (the fast release)
        F_t        = min(F_{t-1}, I_t)                              (the lowest it has been, F_{-1} = I_{-1})
        log lam_t  = clip(I_t + K_P * xi_t, bounds)

    with ``s = exp(-1 / T_fast)``, ``r = exp(-1 / T_slow)`` (``smoothing_steps`` 10 and
    ``trend_steps`` 50), ``H = approach_steps`` (200) and ``R = release_threshold`` (0.5).
    Defaults K_P 0.5, K_I 0.08 per step, L 0.075: chosen by the controller table of
    docs/RESULTS.md, one setting for every cell.

    The log ratio is symmetric (a 2x violation and a 2x over-satisfaction move lambda by the
    same amount), so no release speedup is needed while the reading is near its tolerance; the
    fast release acts only far under it (both averages below ``-R``: the reading under 61 % of
    its tolerance), where the clip alone would lower lambda too slowly (see ``release_threshold``). The P term is never stored: a large early
    error raises lambda at once and lets go as soon as the error shrinks. Two things keep the
    integrator from winding up while the model is still learning, when the reading is far
    above its tolerance for reasons more lambda does not fix: it reads the error clipped to
    +-L (its rise is at most ``K_I * L`` per step), and it holds while the reading is falling
    onto the tolerance on its own (arriving within H steps at the present slope). Below the
    tolerance it always integrates: a trained model keeps improving as the learning rate
    anneals, and lambda has to follow it down. ``reading / tolerance`` is ``1 + value / scale``
    for every constraint kind (for pNCC, ``(1 - ncc) / (1 - tolerance)``).

Gains are stated per optimizer step: a controller measured every ``period`` steps (the
calibration stream) integrates ``K_I * period`` per measurement and smooths with
``s = exp(-period / smoothing_steps)`` and ``r = exp(-period / trend_steps)``, so one setting
means the same at every period. (Nearly: the slope divides by ``T_slow - T_fast``, the two
averages' lag difference at period 1; at period 16 it is 38.4 steps, so the calibration
stream's slope reads 4 % shallow, and the hold comes a little less often. Left so: the controller
table in docs/RESULTS.md was measured with it.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["CONTROLLER_NAMES", "Algorithm1", "MultiplierController", "PIController", "log_ratio_error"]

# reading / tolerance below this is treated as this (a perfect reconstruction would give
# ln 0 = -inf); e = ln(1e-6) = -13.8 is far past any real over-satisfaction.
_MIN_RATIO = 1e-6


def log_ratio_error(value: Tensor, scale: Tensor) -> Tensor:
    """``ln(reading / tolerance)`` of constraint values (K,) with their scales (K,).

    A constraint's value is ``(reading - tolerance)`` in units where ``scale`` is the
    tolerance (``1 + value / scale = reading / tolerance``); dimensionless, 0 on target.
    """
    return torch.log((1.0 + value / scale).clamp_min(_MIN_RATIO))


class MultiplierController:
    """Interface: :meth:`step` maps one measurement to a new ``log lambda`` (K,).

    State a controller keeps lives in tensors it creates in :meth:`reset` and lists in
    :meth:`state_dict`, so the owner can move and checkpoint it. ``valid`` (a 0-dim bool
    tensor) says whether the measurement counts; an invalid one (no examples, a non-finite
    value) must leave the state as it was, decided with ``torch.where``, never on the host.
    """

    #: name used in configs and checkpoints
    name: str = ""

    def reset(self, log_lambda: Tensor) -> None:
        """(Re)initialise the state for the K constraints of ``log_lambda`` (K,)."""

    def continue_from(self, log_lambda: Tensor) -> None:
        """(Re)initialise the state to go on from a trained model's ``log_lambda`` (K,), with no
        saved state of this controller (a new Trainer fitting a trained or loaded model): the
        first update must move lambda as little as any later one. :meth:`reset` by default."""
        self.reset(log_lambda)

    def to(self, device: torch.device | str) -> None:
        """Move the state's tensors to ``device``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def limit_to(self, log_lambda_bounds: tuple[float, float]) -> None:
        """Keep whatever state the controller carries within the owner's clamp of ``log lambda``
        (an integrator beyond it would wind up where the output cannot follow)."""

    def step(self, log_lambda: Tensor, value: Tensor, ema: Tensor, scale: Tensor, period: int, valid: Tensor) -> Tensor:
        """The new ``log lambda`` (K,), before the owner's clamp.

        Args:
            log_lambda: the current ``log lambda`` (K,).
            value: this measurement's constraint value, a mean over examples (K,), value units.
            ema: the moving average of the value *including* this measurement (K,).
            scale: each constraint's scale (its tolerance in value units) (K,).
            period: optimizer steps since the previous measurement (1 on the training stream).
            valid: 0-dim bool; False leaves the controller's state untouched.
        """
        raise NotImplementedError


class Algorithm1(MultiplierController):
    """Algorithm 1 of the paper, ``log lambda += nu * C_ma``, with two optional departures.

    With ``release_speedup=1`` and ``max_increase=None`` this is the paper's rule exactly
    (``nu`` in one over the value's units). The previous default of this library is the same
    arithmetic with ``nu = relative_nu / scale`` per constraint, a rise capped at
    ``relative_nu * max_relative_violation`` and ``release_speedup=3`` (see
    :meth:`relative`). Both ``nu`` and the cap are per optimizer step: fed a measurement every
    ``period`` steps (the calibration stream), one update moves ``period`` times as far.

    Args:
        step_size: ``nu`` > 0 per constraint (K,) or one number.
        release_speedup: >= 1; a step that lowers lambda is this many times larger.
        max_increase: the most ``log lambda`` may rise in one optimizer step, per constraint or
            one number (None: unbounded).
    """

    name = "paper"

    def __init__(
        self,
        step_size: float | Sequence[float] = 1.0,
        release_speedup: float = 1.0,
        max_increase: float | Sequence[float] | None = None,
    ) -> None:
        sizes = [step_size] if isinstance(step_size, (int, float)) else list(step_size)
        if not sizes or not all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in sizes):
            raise ValueError(f"GECO step_size (nu) must be a positive finite number (or one per constraint), got {step_size!r}.")
        if not (math.isfinite(release_speedup) and release_speedup >= 1.0):
            raise ValueError(f"GECO release_speedup must be a finite number >= 1, got {release_speedup!r}.")
        increases = None
        if max_increase is not None:
            increases = [max_increase] if isinstance(max_increase, (int, float)) else list(max_increase)
            if not increases or not all(m > 0 for m in increases):
                raise ValueError(f"GECO max_increase must be positive (one number, or one per constraint) or None, got {max_increase!r}.")
        self.step_size = torch.tensor(sizes, dtype=torch.float32)
        self.release_speedup = float(release_speedup)
        self.max_increase = None if increases is None else torch.tensor(increases, dtype=torch.float32)

    @classmethod
    def relative(
        cls, step_size: float, scales: Sequence[float], release_speedup: float = 3.0, max_relative_violation: float | None = 1.0
    ) -> Algorithm1:
        """The previous default: ``log lambda += nu * C_ma / scale``, rises capped at
        ``nu * max_relative_violation``, falls ``release_speedup`` times faster."""
        if max_relative_violation is not None and not max_relative_violation > 0:
            raise ValueError(f"max_relative_violation must be positive or None, got {max_relative_violation!r}.")
        increase = None if max_relative_violation is None else [step_size * max_relative_violation] * len(scales)
        return cls([step_size / s for s in scales], release_speedup, increase)

    def reset(self, log_lambda: Tensor) -> None:
        k = log_lambda.numel()
        for name, sizes in (("step_size", self.step_size), ("max_increase", self.max_increase)):
            if sizes is not None and sizes.numel() not in (1, k):
                raise ValueError(
                    f"Algorithm1 {name} has {sizes.numel()} values, but GECO has {k} constraints: "
                    f"give one number or one per constraint ({k})."
                )

    def to(self, device: torch.device | str) -> None:
        self.step_size = self.step_size.to(device)
        if self.max_increase is not None:
            self.max_increase = self.max_increase.to(device)

    def step(self, log_lambda: Tensor, value: Tensor, ema: Tensor, scale: Tensor, period: int, valid: Tensor) -> Tensor:
        # nu and the cap are per optimizer step: a measurement every ``period`` steps takes
        # ``period`` steps' worth (1 on the training stream, where this is the paper's rule exactly).
        step = self.step_size * period * ema
        step = torch.where(step < 0, step * self.release_speedup, step)
        if self.max_increase is not None:
            step = step.minimum(self.max_increase * period)
        return log_lambda + step


class PIController(MultiplierController):
    """Position-form PI on ``log lambda`` with a log-ratio error and a clamped integrator.

    Args:
        proportional_gain: ``K_P`` >= 0, dimensionless: at a steady error e the P term
            multiplies lambda by ``exp(K_P * e)`` = ``(reading / tolerance) ** K_P``.
        integral_gain: ``K_I`` > 0 per optimizer step: a steady 5 % violation (e = 0.049)
            raises ``log lambda`` by ``0.049 * K_I`` per step (an error past the clip below
            counts as the clip).
        smoothing_steps: time constant, in optimizer steps, of the moving average on the P
            path (0: none); the integrator reads the raw error (it averages by itself).
        log_lambda_bounds: clamp of the integrator and of the output.
        integral_error_limit: the integrator reads the error clipped to +-this (None: unclipped).
            While the decoder is still far from any tolerance (errors of ln 4-35 = 1.4-3.6),
            more lambda buys little, and an integrator fed the full error winds lambda up; a
            clip bounds its rise to ``K_I * limit`` per step without slowing it near the target.
        approach_steps: hold the integrator while the reading is past its tolerance but falling
            towards it fast enough to get there within this many optimizer steps (None: never
            hold). A model still learning improves its reading on its own; raising lambda for the
            whole of that descent wound it up to 100x what the trained model needed on binarized
            MNIST (rate 100 nats instead of 30, docs/RESULTS.md). Falls (readings below the
            tolerance) are never held.
        trend_steps: time constant, in optimizer steps, of the slow moving average the slope is
            read from (with the ``smoothing_steps`` one); > ``smoothing_steps``.
        ramp_steps: None (the default), or a second integrator, ``drift += K_I / ramp_steps *
            e`` per step, added to the integrator's rise (a type-2 loop): it learns the steady fall
            of ``log lambda`` a still-improving model asks for, so no standing error is needed to
            follow it (the type-1 loop trails a ramp r by ``r / (g K_I)``, on the safe side). It
            learns only while tracking (``|xi| <`` the clip, not held, the integrator off its
            bounds) and is bounded by ``K_I * integral_error_limit`` per step (unbounded without a
            clip); it moves lambda during a hold as at any other step. Measured on the controller table (docs/RESULTS.md,
            ``default_ramp300`` and ``default_ramp100``, 3 seeds, with K_I 0.06) it closes the MSE
            cells (MNIST and Fashion-MNIST 0.7 % from the tolerance instead of 2.3-2.4 %) but carries lambda on
            down as the annealed model stops improving (BCE +3.5 %, LadderVAE +3.4 % past) and
            swings a noisy classifier constraint (16.6 % mean gap), so it is off. The drift it
            applies is scaled by :attr:`pace` (1 unless set; ``GECOCallback(ramp_follows_lr=True)``
            sets it to the learning rate over the largest it has been, which takes the overshoot
            away and most of the tracking with it: ``default_ramp300_lr`` in docs/RESULTS.md).
        noise_correction: False (the default), or shift each measurement's log error by half
            the running variance of its deviation from the slow average (``trend_steps``):
            ``e + var(e) / 2``. The log of a noisy measurement averages ``var / 2`` below the log
            of its mean (exactly so for log-normal noise), so without it the loop holds the
            measurements' median at the tolerance and their mean ends above it: on the synthetic
            plant 1.05x at a coefficient of variation of 0.3 per measurement and 1.22x at 0.6
            (``python benchmarks/plant.py --cv 0.6``), against 0.94-1.01x with it. A 64-image
            batch of an MSE varies by ~5 % (a bias of ~0.1 %), a 64-image measurement of a
            classifier's cross-entropy by ~60 %. Off until the controller table measures it.
        release_threshold: the fast release (None: off). While both moving averages of the
            error (``smoothing_steps`` and ``trend_steps``) lie below ``-release_threshold`` (the
            default 0.5: the reading under ``exp(-0.5)`` = 61 % of its tolerance), the
            integrator also falls by ``K_I`` times how far past the threshold they are,
            unclipped, down to the lowest it has been in the run (``release_floor``) and no
            further. A model that learns at once while lambda stands high (a decoder stuck far
            from the tolerance that suddenly finds the data's structure) lands far under its
            tolerance, and the clip alone releases lambda by at most ``K_I * limit`` per step:
            the README's own-model example then ended 11.4 % under its tolerance, with the
            release 0.2 %. Only what lambda rose above its lowest is released, so a constraint
            slack from the start is not driven to the lower bound. It adds exactly 0 where it
            is not triggered: a loop settling from above on every optimizer step never triggers
            it, even at 60 % measurement noise; measurements ``period`` steps apart average less,
            and a noisy one's dips can (the controller table's class cross-entropy cell, once).
            The setting is the controller's argument, not saved state: a run resumed from a
            checkpoint of an earlier version gets it too (``None`` for the behaviour before).
    """

    name = "pi"

    def __init__(
        self,
        proportional_gain: float = 0.5,
        integral_gain: float = 0.08,
        smoothing_steps: float = 10.0,
        log_lambda_bounds: tuple[float, float] = (-30.0, 30.0),
        integral_error_limit: float | None = 0.075,
        approach_steps: float | None = 200.0,
        trend_steps: float = 50.0,
        ramp_steps: float | None = None,
        noise_correction: bool = False,
        release_threshold: float | None = 0.5,
    ) -> None:
        if release_threshold is not None:
            _check_positive("PIController release_threshold", release_threshold)
        if not isinstance(noise_correction, bool):
            raise ValueError(f"PIController noise_correction must be True or False, got {noise_correction!r}.")
        if ramp_steps is not None:
            _check_positive("PIController ramp_steps", ramp_steps)
        if approach_steps is not None:
            _check_positive("PIController approach_steps", approach_steps)
        if integral_error_limit is not None:
            _check_positive("PIController integral_error_limit", integral_error_limit)
        if not (isinstance(proportional_gain, (int, float)) and math.isfinite(proportional_gain) and proportional_gain >= 0):
            raise ValueError(f"PIController proportional_gain must be a finite number >= 0, got {proportional_gain!r}.")
        _check_positive("PIController integral_gain", integral_gain)
        if not (isinstance(trend_steps, (int, float)) and math.isfinite(trend_steps) and trend_steps > 0):
            raise ValueError(f"PIController trend_steps must be a finite number > 0 (optimizer steps), got {trend_steps!r}.")
        if not (isinstance(smoothing_steps, (int, float)) and 0 <= smoothing_steps < trend_steps):
            # The hold compares the two averages' slopes: the smoothing one must be the faster.
            raise ValueError(
                f"PIController smoothing_steps must be a number in [0, trend_steps) = [0, {trend_steps:g}) "
                f"(optimizer steps), got {smoothing_steps!r}."
            )
        self.proportional_gain = float(proportional_gain)
        self.integral_gain = float(integral_gain)
        self.smoothing_steps = float(smoothing_steps)
        self.log_lambda_bounds = (float(log_lambda_bounds[0]), float(log_lambda_bounds[1]))
        self.integral_error_limit = integral_error_limit
        self.approach_steps = approach_steps
        self.trend_steps = float(trend_steps)
        self.ramp_steps = ramp_steps
        self.noise_correction = noise_correction
        self.release_threshold = release_threshold
        self.reset(torch.zeros(1))

    def continue_from(self, log_lambda: Tensor) -> None:
        """Bumpless transfer: the integrator starts at ``log lambda`` less the first update's P
        term, so lambda goes on from where the trained model left it. From :meth:`reset`, the
        first update adds ``K_P * e`` in full (a new run's kick: lambda 2.5 became 5.1 in one step
        when a new Trainer fitted a trained model on, at a reading 4.3x its tolerance)."""
        self.reset(log_lambda)
        self._bumpless = True

    def reset(self, log_lambda: Tensor) -> None:
        #: whether the first valid update takes its P term out of the integrator (continue_from)
        self._bumpless = False
        self.integral = log_lambda.detach().clone().float()
        self.smoothed_error = torch.zeros_like(self.integral)
        self.slow_error = torch.zeros_like(self.integral)
        self.drift = torch.zeros_like(self.integral)
        self.error_variance = torch.zeros_like(self.integral)
        self.release_floor = self.integral.clone()
        self.started = torch.zeros((), dtype=torch.bool, device=self.integral.device)
        #: 0-dim fp32 in [0, 1]: the factor on the learned drift each step applies (1 unless
        #: set; ``GECOCallback(ramp_follows_lr=True)`` sets it every optimizer step to the
        #: learning rate over the largest it has been). The drift goes on learning whatever the
        #: pace (within its bound), so a pace that rises again applies what it learned meanwhile.
        #: Not saved state: whoever sets it sets it before every step.
        self.pace = torch.ones((), device=self.integral.device)

    def limit_to(self, log_lambda_bounds: tuple[float, float]) -> None:
        """Narrow the integrator's clamp to the owner's (``GECO(log_lambda_bounds=...)``)."""
        low, high = max(self.log_lambda_bounds[0], log_lambda_bounds[0]), min(self.log_lambda_bounds[1], log_lambda_bounds[1])
        if not low < high:
            raise ValueError(
                f"PIController log_lambda_bounds {self.log_lambda_bounds} and GECO's {tuple(log_lambda_bounds)} do not "
                "overlap: give the controller bounds within GECO's."
            )
        self.log_lambda_bounds = (low, high)

    def to(self, device: torch.device | str) -> None:
        self.integral = self.integral.to(device)
        self.smoothed_error = self.smoothed_error.to(device)
        self.slow_error = self.slow_error.to(device)
        self.drift = self.drift.to(device)
        self.error_variance = self.error_variance.to(device)
        self.release_floor = self.release_floor.to(device)
        self.started = self.started.to(device)
        self.pace = self.pace.to(device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "integral": self.integral.detach().cpu().clone(),
            "smoothed_error": self.smoothed_error.detach().cpu().clone(),
            "slow_error": self.slow_error.detach().cpu().clone(),
            "drift": self.drift.detach().cpu().clone(),
            "error_variance": self.error_variance.detach().cpu().clone(),
            "release_floor": self.release_floor.detach().cpu().clone(),
            "started": bool(self.started),
            # a checkpoint before the first valid update of a continued run keeps its bumpless start
            "bumpless": self._bumpless and not bool(self.started),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.integral.device
        self.integral = state["integral"].to(device=device, dtype=torch.float32).clone()
        self.smoothed_error = state["smoothed_error"].to(device=device, dtype=torch.float32).clone()
        # A checkpoint from before the approach hold: its slow average starts at the fast one.
        slow = state.get("slow_error", state["smoothed_error"])
        self.slow_error = slow.to(device=device, dtype=torch.float32).clone()
        # A checkpoint from before ramp tracking: no drift learned yet.
        drift = state.get("drift", torch.zeros_like(self.integral))
        self.drift = drift.to(device=device, dtype=torch.float32).clone()
        # A checkpoint from before the noise correction: no variance measured yet.
        variance = state.get("error_variance", torch.zeros_like(self.integral))
        self.error_variance = variance.to(device=device, dtype=torch.float32).clone()
        # A checkpoint from before the fast release: nothing below the saved integrator is released.
        floor = state.get("release_floor", state["integral"])
        self.release_floor = floor.to(device=device, dtype=torch.float32).clone()
        self.started = torch.tensor(bool(state["started"]), device=device)
        # Once started, the saved integrator holds its own P term out; a checkpoint of a continued
        # run written before its first valid update still takes that term out (older ones: no).
        self._bumpless = bool(state.get("bumpless", False)) and not bool(state["started"])

    def _corrected(self, error: Tensor, slow_before: Tensor, r: float, valid: Tensor) -> Tensor:
        """``e + var(e) / 2``, the variance a running mean of ``(e - slow average)^2``."""
        # The slow average carries noise of its own, (1 - r) / (1 + r) of the measurements': this
        # factor takes it out of the deviation's mean square.
        deviation = (error - slow_before).square() * ((1.0 + r) / 2.0)
        variance = torch.where(self.started, r * self.error_variance + (1.0 - r) * deviation, 0.0)
        self.error_variance = torch.where(valid, variance, self.error_variance)
        return error + 0.5 * self.error_variance

    def _released(
        self, integral: Tensor, smoothed: Tensor, slow: Tensor, threshold: float, period: int, valid: Tensor
    ) -> Tensor:
        """The integrator after the fast release: lowered by ``K_I * period`` times how far both
        averages of the error lie past ``-threshold`` (unclipped), but never below the
        lowest it has been (``release_floor``); ``integral`` as it is where not triggered."""
        far_under = (torch.maximum(smoothed, slow) + threshold).clamp(max=0.0)
        released = integral + self.integral_gain * period * far_under
        # Only what lambda rose above its lowest is released: a constraint that is slack from the
        # start (far under whatever lambda does) falls at the clip's pace as without the release,
        # so it is not driven to the lower bound while it does not bind. (No clamp to the bounds:
        # the result lies between the floor and the integrator, both already within them.)
        integral = torch.maximum(released, torch.minimum(integral, self.release_floor))
        self.release_floor = torch.where(valid, torch.minimum(self.release_floor, integral), self.release_floor)
        return integral

    def smoothing(self, period: int) -> float:
        """The P path's moving-average coefficient for measurements ``period`` steps apart."""
        return _decay(period, self.smoothing_steps)

    def step(self, log_lambda: Tensor, value: Tensor, ema: Tensor, scale: Tensor, period: int, valid: Tensor) -> Tensor:
        error = log_ratio_error(value, scale)
        # An invalid measurement's error may be NaN: every write to the state below is a
        # torch.where(valid, ...), so it never reaches the state (and the output reads the state).
        # The slow average (the approach hold's trend, the noise correction's reference), kept
        # only when one of them reads it.
        keeps_slow = self.approach_steps is not None or self.noise_correction or self.release_threshold is not None
        if keeps_slow:
            r = _decay(period, self.trend_steps)
            slow_before = torch.where(self.started, self.slow_error, error)
            if self.noise_correction:
                error = self._corrected(error, slow_before, r, valid)
            slow = r * slow_before + (1.0 - r) * error
            self.slow_error = torch.where(valid, slow, self.slow_error)
        s = self.smoothing(period)
        # xi_{-1} = e_0: the first P kick is K_P * e_0, not (1 - s) of it.
        previous = torch.where(self.started, self.smoothed_error, error)
        smoothed = s * previous + (1.0 - s) * error
        low, high = self.log_lambda_bounds
        integral_before = self.integral
        if self._bumpless:  # until the first valid update (a host flag: no read of `started`)
            integral_before = torch.where(self.started, self.integral, self.integral - self.proportional_gain * smoothed)
        limit = math.inf if self.integral_error_limit is None else self.integral_error_limit
        integrated = error if self.integral_error_limit is None else error.clamp(-limit, limit)
        held: Tensor | None = None
        if self.approach_steps is not None:
            # The error's slope per step from two moving averages: an average over T steps lags
            # a ramp by T steps, so (fast - slow) / (T_slow - T_fast) is the ramp's slope.
            slope = (smoothed - slow) / (self.trend_steps - self.smoothing_steps)
            # Past the tolerance but falling towards it fast enough to arrive within
            # approach_steps: the model is getting there on its own, so lambda is held.
            # (slope * -H is H * -slope to the bit, in one op: rounding is symmetric in sign.)
            held = (smoothed > 0) & (slope < 0) & (smoothed < slope * -self.approach_steps)
            integrated = integrated.masked_fill(held, 0.0)
        if self.ramp_steps is None:
            integral = (integral_before + self.integral_gain * period * integrated).clamp(low, high)
        else:
            # A second integrator learns the steady drift of log lambda per step that a model
            # still improving asks for, so the first needs no standing error to follow it. It
            # learns only while tracking (smoothed error within the clip band, not held, the
            # integrator off its bounds) and never drifts faster than the integrator's largest
            # rise. The drift is the trend lambda follows, so it moves lambda during a hold too.
            saturated = (integral_before <= low) | (integral_before >= high)
            tracking = (smoothed.abs() < limit) & ~saturated
            if held is not None:
                tracking = tracking & ~held
            learned = torch.where(tracking, error, 0.0) * (self.integral_gain / self.ramp_steps * period)
            bound = self.integral_gain * limit
            integral = (integral_before + period * (self.integral_gain * integrated + self.pace * self.drift)).clamp(low, high)
            self.drift = torch.where(valid, (self.drift + learned).clamp(-bound, bound), self.drift)
        if self.release_threshold is not None:
            integral = self._released(integral, smoothed, slow, self.release_threshold, period, valid)
        self.smoothed_error = torch.where(valid, smoothed, self.smoothed_error)
        self.integral = torch.where(valid, integral, self.integral)
        self.started = self.started | valid
        return (self.integral + self.proportional_gain * self.smoothed_error).clamp(low, high)


def _decay(period: int, steps: float) -> float:
    """Coefficient of a moving average with a time constant of ``steps`` optimizer steps, for
    measurements ``period`` steps apart (0 steps: no averaging)."""
    return math.exp(-period / steps) if steps > 0 else 0.0


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")


#: the names ``GECOCallback(controller=...)`` accepts
CONTROLLER_NAMES = ("paper", "relative", "pi")

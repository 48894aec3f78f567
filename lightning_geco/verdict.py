"""Whether a run got what was asked: ``met``, ``not_met`` or ``unreachable``, and how to say it.

Plain functions and one small history class, no Lightning. Who uses what:

- :class:`~lightning_geco.callbacks.GECOCallback` feeds a :class:`StallDetector` the
  multiplier and the reading it regulates, at every logging step, and warns (once per
  constraint) as soon as the detector sees that more lambda no longer buys quality;
- :class:`~lightning_geco.summary.RunSummary` turns the final validation reading and the
  detector's evidence into :func:`verdict` and the one line :func:`verdict_line` prints.

The rules (documented in the README, "The verdict"):

``met``
    the final validation reading is at most ``MET_BAND`` (1 %) past its tolerance, in units
    of the constraint's scale. The band is the precision a 1,000-10,000 image validation
    average has (its standard error is 0.5-3 % for per-image coefficients of variation of
    0.5-1); asking for "exactly on the tolerance" cannot be told apart from 1 % over.
``unreachable``
    not met, and at some point during training the regulated reading stayed clearly violated
    (at least ``MIN_VIOLATION``, 5 %, past its tolerance at every logging step) over a window
    of ``window_steps`` optimizer steps (20 % of the run; from the latest logging step at least
    that far back, so up to one logging interval more) while lambda rose at least
    ``MIN_LAMBDA_FACTOR`` (4x) and the reading improved less than ``MAX_GAIN`` (0.1) as much,
    in log terms, as lambda rose: ``-d ln(reading) / d ln(lambda) < 0.1``, e.g. lambda x4
    and the reading down by less than 13 %; and, at the pace the reading fell over that window
    (in log terms, per step), it would not reach the band by the run's last step (``max_steps``;
    without one, within another window). Lambda at its upper bound while clearly violated
    counts too, on the pace alone (no more lambda can come), from whatever history there is (two
    readings at least: one has no pace), and
    is withdrawn when that pace, judged again at each logging step, reaches the band in time. At unit gain (a Gaussian decoder in its linear regime) a 4-fold lambda lowers
    the MSE about 4-fold; a tenth of that says more lambda no longer helps, and the pace says
    the model will not get there on its own at this budget either. (Without the pace, the
    default job was called unreachable at step 719: lambda x5.6 while the MSE fell 14.5 %, 39 %
    past its tolerance, yet at that pace 616 steps from it with 781 left; it ended 6.5 %
    better than asked, with the default gains of the time, K_I 0.06.) A regulated reading that later comes within the band of its tolerance at
    ``REACHED_READINGS`` (2) logging steps in a row withdraws the stall for good: a tolerance the
    model reached is not unreachable (the README's MLP example sat ~5x past it for ~500 steps, then
    broke through). Two in a row, so that one lucky 64-image calibration measurement does not.
    A reading that, at two logging steps in a row, has fallen since the stall (the mean ``ln`` of
    its last ``RESPONSE_READINGS`` (3) readings against the window's fitted end) by at least
    ``MIN_VIOLATION`` (5 %), by at least ``MAX_GAIN`` times lambda's rise since, in log terms,
    and by twice that difference's standard error (from the window's spread about its line)
    withdraws it too: more lambda buys quality again, so the stall was a plateau, and a later
    stall is judged only on the readings from the withdrawn one's end on. So does one that has
    fallen at least half the way to the band, beyond that noise, at a pace that reaches the band
    in the steps left: the stall's "not in time" no longer holds. (On an image folder a
    new-user trial saw a plateau at 4.7x the tolerance for 300 steps, warned at step 524, then the
    reading fell to 1.29x by step 1500 at a gain of 0.32: without this it ended ``unreachable``.)
    The window's fall is read from a least-squares line through its ``ln`` readings, not from its
    two end readings: under the calibration drive each reading is one 64-image measurement
    (6-12 % noise), which made and unmade stalls by chance.
``not_met``
    otherwise: the reading ends past the band but the model was still responding to lambda
    (e.g. a run too short for its tolerance, or a controller that had not settled).

The noise of the validation reading. The verdict is decided on the final validation mean, one
value per image. Its standard error (``val/<reading>/standard_error``, in ``summary.json`` as
``standard_error``) is shown in the line, ``(+18.0 % ± 9.1 %)``, when the reading lies within
``NOISE_STANDARD_ERRORS`` (2) standard errors of the band's edge: there another draw of as many
validation images could give the other verdict, and the user should weigh it, or validate on
more images. An MSE over 1,000 MNIST images has a standard error of about 1.5 % of the
tolerance; a classifier's cross-entropy, heavy-tailed, 5-10 %. The rules above do not change
with it: ``met`` still means at most ``MET_BAND`` past.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "MAX_GAIN",
    "MET_BAND",
    "MIN_LAMBDA_FACTOR",
    "MIN_VIOLATION",
    "NOISE_STANDARD_ERRORS",
    "REACHED_READINGS",
    "RESPONSE_READINGS",
    "VERDICTS",
    "Stall",
    "StallDetector",
    "constraint_clause",
    "verdict",
    "verdict_line",
    "within_noise",
]

VERDICTS = ("met", "not_met", "unreachable")
#: a final reading this far past its tolerance (relative to the scale) still counts as met
MET_BAND = 0.01
#: the regulated reading must be at least this far past its tolerance for a stall to count
MIN_VIOLATION = 0.05
#: lambda must rise at least this many times over the window for a stall to count
MIN_LAMBDA_FACTOR = 4.0
#: a stall: the reading improves less than this fraction of lambda's rise, in log terms
MAX_GAIN = 0.1
#: a verdict this many standard errors of its validation reading from the band's edge is told as noisy
NOISE_STANDARD_ERRORS = 2.0
#: logging steps in a row within the band that show a tolerance was reached (and withdraw a stall)
REACHED_READINGS = 2
#: readings since a stall whose mean tells whether the reading fell again (see StallDetector.observe)
RESPONSE_READINGS = 3


@dataclass(frozen=True)
class Stall:
    """Evidence that more lambda no longer buys quality, for one constraint.

    Attributes:
        first_step, last_step: the window, optimizer steps.
        lambda_before, lambda_after: the multiplier at either end.
        ratio_before, ratio_after: the regulated reading over its tolerance at either end
            (1.31 is 31 % past it): of a stall on the pace, the ends of a least-squares line
            through the window's ``ln`` readings (two single readings of a noisy measurement, a
            64-image calibration draw varying by 6-12 %, made and unmade stalls by chance).
        at_bound: lambda reached its upper bound (the stall is then found on the pace alone,
            and from whatever history there is, two readings at least: no more lambda can come).
        steps_needed: optimizer steps the reading would need, at the window's pace, to reach
            the band (inf: it was not falling).
        steps_left: optimizer steps left when the stall was found (None: unknown).
        noise: the spread of the window's ``ln`` readings about that line (their residual
            standard deviation, log units); None: not fitted.
        points: readings in the window (0: not fitted).
        open_ended: the run had no last step: ``steps_left`` is the one more window the reading
            was given, not steps left in the run.
    """

    first_step: int
    last_step: int
    lambda_before: float
    lambda_after: float
    ratio_before: float
    ratio_after: float
    at_bound: bool = False
    steps_needed: float | None = None
    steps_left: int | None = None
    noise: float | None = None
    points: int = 0
    open_ended: bool = False

    def describe(self) -> str:
        """One clause with the figures, e.g. ``lambda rose 4.3x (12 -> 51.6) over steps 1100-1400
        while the reading moved -1.0 % (31.0 % -> 29.7 % past the tolerance)``."""
        factor = self.lambda_after / self.lambda_before
        moved = 100.0 * (self.ratio_after / self.ratio_before - 1.0)
        pace = ""
        if self.steps_needed is not None and self.steps_left is not None:
            if math.isinf(self.steps_needed):
                pace = "; it was not falling" + ("" if self.open_ended else f", {self.steps_left} are left")
            elif self.open_ended:  # no last step: it was given one more window
                pace = f"; at that pace it needs {self.steps_needed:.0f} more steps, more than a window ({self.steps_left})"
            else:
                pace = f"; at that pace it needs {self.steps_needed:.0f} more steps, {self.steps_left} are left"
        if self.at_bound and self.lambda_after <= 1.001 * self.lambda_before:  # at the bound throughout the window
            return (
                f"lambda was at its upper bound ({self.lambda_after:.3g}) at step {self.last_step} with the reading "
                f"{100 * (self.ratio_after - 1):.1f} % past the tolerance{pace}"
            )
        bound = " and reached its upper bound" if self.at_bound else ""
        return (
            f"lambda rose {factor:.3g}x ({self.lambda_before:.3g} -> {self.lambda_after:.3g}){bound} over steps "
            f"{self.first_step}-{self.last_step} while the reading moved {moved:+.1f} % "
            f"({100 * (self.ratio_before - 1):.1f} % -> {100 * (self.ratio_after - 1):.1f} % past the tolerance){pace}"
        )


class StallDetector:
    """History of (step, log lambda, reading / tolerance) per constraint, and the stall rule.

    Args:
        num_constraints: K.
        window_steps: optimizer steps the rule looks back over (> 0).
        log_lambda_max: the multiplier's upper bound, ``ln lambda``.
        last_step: the run's last optimizer step (``max_steps``); None: unknown, and a reading
            must then be too slow to arrive within another window.
    """

    def __init__(self, num_constraints: int, window_steps: int, log_lambda_max: float, last_step: int | None = None) -> None:
        if window_steps < 1:
            raise ValueError(f"window_steps must be a positive int (optimizer steps), got {window_steps!r}.")
        if last_step is not None and last_step < 1:
            raise ValueError(f"last_step must be a positive int (optimizer steps) or None, got {last_step!r}.")
        self.window_steps = int(window_steps)
        self.last_step = last_step
        self.log_lambda_max = float(log_lambda_max)
        self.history: list[list[tuple[int, float, float]]] = [[] for _ in range(num_constraints)]
        self.stalls: list[Stall | None] = [None] * num_constraints
        #: per constraint, the step its regulated reading was within the band for the
        #: ``REACHED_READINGS``-th logging step in a row (None: not yet)
        self.reached: list[int | None] = [None] * num_constraints
        self._in_band = [0] * num_constraints
        #: per constraint, the last stall withdrawn (None: none was): by a reached tolerance, or
        #: by a reading that fell again as lambda rose (see :meth:`observe`)
        self.withdrawn: list[Stall | None] = [None] * num_constraints
        #: per constraint, the step of that withdrawal and why, one clause (None: none)
        self.withdrawn_at: list[int | None] = [None] * num_constraints
        self.withdrawn_why: list[str | None] = [None] * num_constraints
        # Logging steps in a row whose reading says more lambda buys quality again since the stall.
        self._responding = [0] * num_constraints
        # Whether last_step is the plan the stalls were judged against (a fresh detector has none).
        self._planned = False

    def observe(self, step: int, log_lambda: Sequence[float], ratio: Sequence[float]) -> list[int]:
        """Add one logging step's values; returns the constraints newly found stalled.

        A stall is withdrawn (:attr:`withdrawn`, :attr:`withdrawn_at`, :attr:`withdrawn_why`) when
        the reading later comes within the band (``REACHED_READINGS`` logging steps in a row; for
        good: no stall is found again), or when, at ``REACHED_READINGS`` logging steps in a row,
        the reading has fallen since the stall, beyond the noise of its measurements, by at least
        ``MIN_VIOLATION`` (5 %) and by at least ``MAX_GAIN`` times lambda's rise since, in log
        terms: more lambda buys quality again (a plateau broke), or at least half the way to the
        band at a pace that reaches it in the steps left (:meth:`_judge_response`). A stall
        found again after that is judged only on what came after it.
        """
        found = []
        for k, (log_lam, r) in enumerate(zip(log_lambda, ratio)):
            if not (math.isfinite(log_lam) and math.isfinite(r) and r > 0):
                continue
            history = self.history[k]
            history.append((int(step), float(log_lam), float(r)))
            self._in_band[k] = self._in_band[k] + 1 if r <= 1.0 + MET_BAND else 0
            stall = self.stalls[k]
            if self._in_band[k] >= REACHED_READINGS and self.reached[k] is None:
                self.reached[k] = int(step)
                if stall is not None:
                    self._withdraw(k, step, f"came within 1 % of its tolerance at step {step} after all")
                continue
            if stall is not None and stall.at_bound:
                self._judge_at_bound(k, step)
            elif stall is not None:
                self._judge_response(k, stall, step, log_lam)
            if self.stalls[k] is None and self.reached[k] is None:
                stall = self._stall(self._evidence(k))
                if stall is not None:
                    self.stalls[k] = stall
                    found.append(k)
        return found

    def _judge_response(self, k: int, stall: Stall, step: int, log_lam: float) -> None:
        """Withdraw constraint ``k``'s stall once its reading has fallen again, beyond noise (see
        :meth:`observe`): at ``REACHED_READINGS`` logging steps in a row, the mean ``ln`` reading of
        the last ``RESPONSE_READINGS`` since the stall lies below the stall window's fitted end
        (``ratio_after``) by twice the standard error of that difference (from the window's
        ``noise``: single 64-image measurements vary by 6-12 %) and either

        - by at least ``MIN_VIOLATION`` (5 %) and ``MAX_GAIN`` times lambda's rise since: more
          lambda buys quality again; or
        - by at least half the way to the band, at a pace (that fall over the steps since the
          stall) that reaches the band in the steps left: the stall's other half, "it will not
          get there in time", no longer holds. (A reading that slid from 8 % to 1.5 % past over
          1200 steps while lambda rose 6-fold fell too little for the first rule, and ended
          ``unreachable`` 1.5 % past its tolerance.)"""
        since = [math.log(r) for s, _, r in self.history[k] if s > stall.last_step][-RESPONSE_READINGS:]
        if len(since) < RESPONSE_READINGS:
            return
        level = math.log(stall.ratio_after)
        latest = sum(since) / len(since)
        fall = level - latest
        rise = log_lam - math.log(stall.lambda_after)
        noise = stall.noise or 0.0
        beyond_noise = 2.0 * noise * math.sqrt(1.0 / max(stall.points, 1) + 1.0 / len(since))
        band = math.log(1.0 + MET_BAND)
        buys_quality = fall >= max(-math.log(1.0 - MIN_VIOLATION), MAX_GAIN * rise, beyond_noise)
        pace = fall / (step - stall.last_step)
        in_time = (
            fall > 0
            and fall >= max(0.5 * (level - band), beyond_noise)
            and (latest - band) / pace <= self._steps_left(step)
        )
        self._responding[k] = self._responding[k] + 1 if buys_quality or in_time else 0
        if self._responding[k] >= REACHED_READINGS:
            why = "more lambda buys quality again" if buys_quality else "at that pace it reaches its tolerance in the steps left"
            self._withdraw(
                k, step, f"fell {100 * (1 - math.exp(-fall)):.1f} % ({100 * (math.exp(level) - 1):.1f} % -> "
                f"{100 * (math.exp(latest) - 1):.1f} % past the tolerance, the stall's fitted end against the mean of "
                f"the last {len(since)} readings) over steps {stall.last_step}-{step} while lambda moved "
                f"{math.exp(rise):.3g}x: {why}"
            )

    def _steps_left(self, step: int) -> int:
        """Optimizer steps after ``step`` a reading has to reach the band: to the run's last step,
        or (no last step known) one more window."""
        return self.window_steps if self.last_step is None else max(0, self.last_step - step)

    def _judge_at_bound(self, k: int, step: int) -> None:
        """Withdraw constraint ``k``'s stall at lambda's bound once the stall rule, applied afresh to
        its evidence, no longer finds one: the reading now falls onto the band in time at its
        window's pace (no more lambda can come, so the pace is the whole question), or lambda
        left its bound. (The response rule would withdraw on any 5 % fall, and the next
        observation, still at the bound and too slow, would find the stall again.)"""
        if self._stall(self._evidence(k)) is None:
            self._withdraw(k, step, f"at its window's pace it now reaches its tolerance in the steps left (step {step})")

    def _evidence(self, k: int) -> list[tuple[int, float, float]]:
        """Constraint ``k``'s history a stall is judged on: all of it, or what came after the stall
        last withdrawn (its plateau is what broke)."""
        withdrawn = self.withdrawn[k]
        if withdrawn is None:
            return self.history[k]
        return [h for h in self.history[k] if h[0] >= withdrawn.last_step]

    def _withdraw(self, k: int, step: int, why: str) -> None:
        self.withdrawn[k], self.stalls[k] = self.stalls[k], None
        self.withdrawn_at[k], self.withdrawn_why[k] = int(step), why
        self._responding[k] = 0

    def _stall(self, history: list[tuple[int, float, float]]) -> Stall | None:
        if not history:
            return None
        step, log_lam, ratio = history[-1]
        if ratio < 1.0 + MIN_VIOLATION:
            return None
        at_bound = log_lam >= self.log_lambda_max - 1e-3
        # The window opens at the latest observation at least window_steps back: observations are
        # a logging interval apart, which need not divide window_steps.
        start = 0
        for i, (seen, _, _) in enumerate(history):
            if seen > step - self.window_steps:
                break
            start = i
        window = history[start:]
        first_step, first_log_lam, _ = window[0]
        if step - first_step < self.window_steps and not at_bound:
            return None  # not enough history yet
        if len(window) < 2:
            return None  # at the bound, but one reading has no pace: "not falling" would be unfounded
        if any(r < 1.0 + MIN_VIOLATION for _, _, r in window):
            return None
        rise = log_lam - first_log_lam
        start_level, end_level, noise = _fitted_line([(s, math.log(r)) for s, _, r in window])
        fall = start_level - end_level
        # The pace: steps to the band if ln(reading) kept falling as it did over the window.
        pace = fall / (step - first_step) if step > first_step else 0.0
        steps_needed = (end_level - math.log(1.0 + MET_BAND)) / pace if pace > 0 else math.inf
        steps_left = self._steps_left(step)
        if steps_needed <= steps_left:
            return None  # falling onto the band in time, lambda at its bound or not
        gain = fall / rise if rise > 0 else 0.0
        if at_bound or (rise >= math.log(MIN_LAMBDA_FACTOR) and gain < MAX_GAIN):
            return Stall(
                first_step, step, math.exp(first_log_lam), math.exp(log_lam), math.exp(start_level), math.exp(end_level),
                at_bound, steps_needed, steps_left, noise, len(window), self.last_step is None,
            )
        return None

    def state_dict(self) -> dict[str, Any]:
        """The history and what was found in it, as plain Python (a checkpoint's part, so a resumed
        run keeps the evidence), with the plan it was judged against (``window_steps``,
        ``last_step``: a resumed fit that trains sets its own with :meth:`plan`)."""
        return {
            "window_steps": self.window_steps,
            "last_step": self.last_step,
            "history": [[list(h) for h in history] for history in self.history],
            "stalls": [None if s is None else asdict(s) for s in self.stalls],
            "reached": list(self.reached),
            "in_band": list(self._in_band),
            "withdrawn": [None if s is None else asdict(s) for s in self.withdrawn],
            "withdrawn_at": list(self.withdrawn_at),
            "withdrawn_why": list(self.withdrawn_why),
            "responding": list(self._responding),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["history"]) != len(self.history):
            raise ValueError(
                f"The stall history is for {len(state['history'])} constraints, this detector watches {len(self.history)}."
            )
        self.history = [[(int(s), float(lam), float(r)) for s, lam, r in history] for history in state["history"]]
        self.stalls = [None if s is None else Stall(**s) for s in state["stalls"]]
        self.reached = list(state["reached"])
        self._in_band = list(state["in_band"])
        self.withdrawn = [None if s is None else Stall(**s) for s in state["withdrawn"]]
        # Checkpoints from before the withdrawal was told: a withdrawn stall was one reached.
        nothing = [None] * len(self.history)
        self.withdrawn_at = list(state.get("withdrawn_at", self.reached))
        self.withdrawn_why = list(state.get("withdrawn_why", nothing))
        self._responding = list(state.get("responding", [0] * len(self.history)))
        # The plan the stalls were judged against, until plan() sets this fit's (a fit with no
        # step left never does). Checkpoints from before it was kept do not say: their stalls stand.
        self.window_steps = int(state.get("window_steps", self.window_steps))
        self.last_step = state.get("last_step", self.last_step)
        self._planned = "last_step" in state

    def plan(self, window_steps: int, last_step: int | None) -> None:
        """Set this fit's window and last step. A stall found on the pace against another last
        step (a run extended from 3000 to 6000 steps may now have the steps its reading needs)
        is judged again at the latest observation."""
        replanned = self._planned and last_step != self.last_step
        self.window_steps, self.last_step, self._planned = int(window_steps), last_step, True
        if not replanned:
            return
        for k, stall in enumerate(self.stalls):
            if stall is not None:
                self.stalls[k] = self._stall(self._evidence(k))
                self._responding[k] = 0  # a stall judged again: its response is counted afresh

    def forget(self, k: int) -> None:
        """Drop constraint ``k``'s history and findings: they were readings against another
        tolerance (a resumed run that changed it starts its evidence afresh)."""
        self.history[k] = []
        self.stalls[k] = self.reached[k] = self.withdrawn[k] = self.withdrawn_at[k] = self.withdrawn_why[k] = None
        self._in_band[k] = self._responding[k] = 0

    def lambda_trend(self, k: int) -> float:
        """Change of ``ln lambda`` over the last quarter window (0 without enough history).

        Measured from the latest observation at least a quarter window back and scaled to a
        quarter window, so that logging sparser than that (Lightning's default 50 steps against a
        25-step quarter of a 500-step run) still sees the rise; with less history, over all of it.
        """
        history = self.history[k]
        if len(history) < 2:
            return 0.0
        step, last = history[-1][0], history[-1][1]
        quarter = max(1, self.window_steps // 4)
        before = [h for h in history[:-1] if h[0] <= step - quarter]
        first_step, first = (before[-1] if before else history[0])[:2]
        if step <= first_step:
            return 0.0
        return (last - first) * min(1.0, quarter / (step - first_step))


def _fitted_line(points: list[tuple[int, float]]) -> tuple[float, float, float]:
    """(value at the first x, value at the last x, residual standard deviation) of a
    least-squares line through ``(x, y)`` points; with fewer than 3 points, the first and last
    y and 0."""
    if len(points) < 3:
        return points[0][1], points[-1][1], 0.0
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx if sxx > 0 else 0.0
    residuals = [y - (mean_y + slope * (x - mean_x)) for x, y in points]
    noise = math.sqrt(sum(e * e for e in residuals) / (n - 2))
    return mean_y + slope * (points[0][0] - mean_x), mean_y + slope * (points[-1][0] - mean_x), noise


def verdict(relative_violation: float | None, stall: Stall | None) -> str:
    """``met``, ``not_met`` or ``unreachable`` of one constraint (see the module docstring).

    ``relative_violation`` is the final validation reading past its tolerance in units of
    the constraint's scale (None: no validation reading, which is never met).
    """
    if relative_violation is not None and math.isfinite(relative_violation) and relative_violation <= MET_BAND:
        return "met"
    return "unreachable" if stall is not None else "not_met"


def within_noise(relative_violation: float, standard_error: float | None) -> bool:
    """Whether a final reading lies within ``NOISE_STANDARD_ERRORS`` standard errors (both in
    units of the constraint's scale) of the band's edge: the verdict could go the other way on
    another draw of as many validation images."""
    if standard_error is None or not math.isfinite(standard_error):
        return False
    return abs(relative_violation - MET_BAND) < NOISE_STANDARD_ERRORS * standard_error


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def constraint_clause(
    name: str,
    reading: float | None,
    tolerance: float,
    relative_violation: float | None,
    lower_is_better: bool,
    outcome: str,
    stall: Stall | None = None,
    lambda_rising: bool = False,
    best: tuple[float, int] | None = None,
    trained_steps: int | None = None,
    standard_error: float | None = None,
    stage: str = "val",
    max_steps: int | None = None,
    best_met: bool | None = None,
) -> str:
    """The verdict of one constraint in words, with its figures.

    ``standard_error`` is the validation reading's, in the units of ``relative_violation``; it
    is shown (``± 2.3 %``) when the reading lies within ``NOISE_STANDARD_ERRORS`` (2) of them of
    the band's edge, where another draw of as many validation images could give the other verdict.
    ``stage`` is where the reading was logged (``"val"``, or ``"test"`` for ``trainer.test``).
    ``trained_steps`` is the optimizer steps the model has been trained (the run's global step:
    fewer than ``max_steps`` in a run stopped early, more in a resume with no step left);
    ``max_steps`` is its former name, deprecated. ``best_met``: whether the ``best`` reading was
    met by :func:`verdict`'s rule (within ``MET_BAND`` past the tolerance); None: read from the
    reading and the tolerance alone (at most the tolerance, no band).
    """
    if max_steps is not None:
        warnings.warn("constraint_clause(max_steps=...) is now trained_steps=...", DeprecationWarning, stacklevel=2)
        trained_steps = max_steps if trained_steps is None else trained_steps
    worse, better = (">", "<=") if lower_is_better else ("<", ">=")
    label = "UNREACHABLE" if outcome == "unreachable" else "NOT MET"
    if reading is None or relative_violation is None:
        if stage == "val":
            parts = [f"{name}: {label}: no validation reading (validation never ran, or logged no val/{name})"]
        else:
            parts = [f"{name}: {label}: no {stage} reading (logged no {stage}/{name})"]
    elif not (math.isfinite(reading) and math.isfinite(relative_violation)):
        parts = [f"{label}: {name} {_fmt(reading)} (not a finite reading; asked {better} {_fmt(tolerance)})"]
    else:
        percent = 100.0 * relative_violation
        noise = ""
        if standard_error is not None and within_noise(relative_violation, standard_error):
            noise = f" ± {100.0 * standard_error:.1f} %"
        if outcome == "met":
            if relative_violation <= 0:
                return f"{name} {_fmt(reading)} {better} {_fmt(tolerance)} ({abs(percent):.1f} %{noise} better than asked)"
            return f"{name} {_fmt(reading)} ~ {_fmt(tolerance)} ({percent:.1f} %{noise} past it, within the {100 * MET_BAND:g} % band)"
        parts = [f"{label}: {name} {_fmt(reading)} {worse} {_fmt(tolerance)} ({percent:+.1f} %{noise})"]
    if stall is not None:
        parts.append(stall.describe())
    if lambda_rising:
        parts.append("lambda still rising at the last step")
    if best is not None:
        best_reading, best_step = best
        within = best_reading <= tolerance if lower_is_better else best_reading >= tolerance
        if within or best_met:
            # A validation met it before the end: the model can; this run's last steps lost it.
            band = "" if within else f" within the {100 * MET_BAND:g} % band"
            parts.append(f"an earlier validation met it{band} ({_fmt(best_reading)} at step {best_step}), the last did not")
        else:
            steps = f" in {trained_steps} step{'s' if trained_steps != 1 else ''}" if trained_steps else ""
            parts.append(f"this model did not reach it{steps} (best {_fmt(best_reading)} at step {best_step})")
    return "; ".join(parts)


def verdict_line(clauses: Sequence[str], rate: float | None, label: str = "GECO") -> str:
    """``GECO: <clause>[ | <clause>...], rate <r> nats``: the line a person reads first
    (``label`` in place of ``GECO``, e.g. for the test set's)."""
    rate_part = f", rate {rate:.3g} nats" if rate is not None and math.isfinite(rate) else ""
    return f"{label}: " + " | ".join(clauses) + rate_part

"""The PI controller on the synthetic plant of ``tests/test_controllers.py``, with any settings.

    python benchmarks/plant.py [--integral-gain 0.08] [--integral-error-limit 0.075] [--proportional-gain 0.5] \
        [--ramp-steps N] [--noise-correction] [--release-threshold 0.5 | --no-release] [--cv 0.1]

The plant is ``ln C_t = ln c(t) - g * y_t``, ``y`` a 50-step lag of ``ln lambda``, log-normal
measurement noise of coefficient of variation ``--cv`` (0.1; its mean is the noiseless reading),
starting 5x past the tolerance (``closed_loop`` in the tests).
For each plant gain g in {0.3, 1, 3}, over two drifts (0 and 1e-4 per step: a model still
improving) and two seeds, it prints what the tests hold the default to: the largest
|C / tolerance - 1| over the last fifth of 3,000 steps (settled within 5 %), the largest
|mean ln(C / tolerance)| there (no steady-state error, within 1 %) and the smallest ratio after
the first arrival (overshoot, at least 0.75). The tests hold the default to these on one seed
(and the tail deviation with drift); this takes the worst of four runs per gain. A candidate
setting is one that passes all three at every gain, as the default does. The last column is
the tail's mean of the noiseless reading over the tolerance, worst run: where the measurements
are noisy (``--cv 0.3``, ``0.6``) it shows that the loop holds their median, not their mean.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from lightning_geco.controllers import PIController  # noqa: E402
from test_controllers import closed_loop  # noqa: E402


def worst(g: float, cv: float = 0.1, **settings: float) -> tuple[float, float, float, float]:
    """(largest tail deviation, largest |mean tail log error|, smallest ratio after arrival,
    the tail mean ratio farthest from 1)."""
    deviation, bias, lowest, mean = 0.0, 0.0, math.inf, 1.0
    for drift in (0.0, 1e-4):
        for seed in (0, 1):
            ratios = closed_loop(g, drift=drift, seed=seed, cv=cv, **settings)
            tail = ratios[-len(ratios) // 5 :]
            tail_mean = sum(tail) / len(tail)
            mean = tail_mean if abs(tail_mean - 1) > abs(mean - 1) else mean
            # a setting that never arrives has no overshoot to show, and fails on the tail
            first = next((i for i, r in enumerate(ratios) if r <= 1.0), len(ratios) - 1)
            deviation = max(deviation, max(abs(r - 1) for r in tail))
            bias = max(bias, abs(sum(math.log(r) for r in tail) / len(tail)))
            lowest = min(lowest, min(ratios[first:]))
    return deviation, bias, lowest, mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = inspect.signature(PIController).parameters  # the library's defaults, so the two never part
    parser.add_argument("--integral-gain", type=float, default=default["integral_gain"].default)
    parser.add_argument("--integral-error-limit", type=float, default=default["integral_error_limit"].default)
    parser.add_argument("--proportional-gain", type=float, default=default["proportional_gain"].default)
    parser.add_argument("--ramp-steps", type=float, default=None)
    parser.add_argument("--cv", type=float, default=0.1, help="coefficient of variation of a measurement")
    parser.add_argument("--noise-correction", action="store_true", help="PIController(noise_correction=True)")
    release = parser.add_mutually_exclusive_group()
    release.add_argument("--release-threshold", type=float, default=0.5, help="PIController(release_threshold=...)")
    release.add_argument("--no-release", action="store_true", help="PIController(release_threshold=None)")
    args = parser.parse_args()
    settings = {
        "integral_gain": args.integral_gain,
        "integral_error_limit": args.integral_error_limit,
        "proportional_gain": args.proportional_gain,
        "ramp_steps": args.ramp_steps,
        "noise_correction": args.noise_correction,
        "release_threshold": None if args.no_release else args.release_threshold,
    }
    print(f"PI {settings}, measurement noise cv {args.cv}")
    print(
        "| plant gain | tail deviation (<= 5 %) | tail mean log error (<= 1 %) | lowest after arrival (>= 0.75) "
        "| passes | tail mean reading / tolerance |"
    )
    print("|---|---|---|---|---|---|")
    for g in (0.3, 1.0, 3.0):
        deviation, bias, lowest, mean = worst(g, args.cv, **settings)
        passes = deviation < 0.05 and bias < 0.01 and lowest > 0.75
        print(
            f"| {g:g} | {100 * deviation:.1f} % | {100 * bias:.2f} % | {lowest:.3f} | {'yes' if passes else 'no'} "
            f"| {mean:.3f} |"
        )


if __name__ == "__main__":
    main()

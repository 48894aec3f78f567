"""``benchmarks/geco_vs_beta.py``'s comparison at GECO's own distortion: the sweep's curve there.

The benchmark's runs take an hour; what is tested here is the arithmetic its table rests on,
with closed forms and hand-built runs.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from geco_vs_beta import sweep_at, table  # noqa: E402


def test_sweep_at_recovers_a_quadratic_in_log_distortion_exactly() -> None:
    def rate(d: float) -> float:
        return 3.0 * math.log(d) ** 2 - 2.0 * math.log(d) + 1.0

    sweep = [(d, rate(d)) for d in (0.01, 0.012, 0.015, 0.02, 0.03)]
    for d in (0.0105, 0.013, 0.018, 0.025, 0.03):
        assert sweep_at(sweep, d) == pytest.approx(rate(d), rel=1e-9)


def test_sweep_at_reads_the_points_themselves_and_never_extrapolates() -> None:
    sweep = [(0.02, 12.0), (0.01, 40.0), (0.015, 20.0)]  # any order
    assert sweep_at(sweep, 0.015) == pytest.approx(20.0)
    assert sweep_at(sweep, 0.0099) is None  # better than every beta-VAE
    assert sweep_at(sweep, 0.0201) is None
    assert sweep_at([(0.01, 40.0)], 0.01) is None


def test_sweep_at_reads_between_the_neighbours_of_an_uneven_sweep() -> None:
    # Three betas bunched at one end: the three points nearest 0.013 would all lie left of it
    # and extrapolate (77 with a quadratic through them, above every value read here); the
    # curve is read through both neighbours, 0.0104 and 0.02.
    sweep = [(d, 1.0 / d) for d in (0.010, 0.0102, 0.0104, 0.02)]
    assert sweep_at(sweep, 0.013) == pytest.approx(1.0 / 0.013, rel=0.01)
    assert 1.0 / 0.02 < sweep_at(sweep, 0.013) < 1.0 / 0.0104


def test_sweep_at_averages_betas_of_equal_distortion() -> None:
    assert sweep_at([(0.01, 40.0), (0.01, 42.0), (0.02, 12.0)], 0.01) == pytest.approx(41.0)


def test_sweep_at_lies_below_the_chord_of_a_convex_sweep() -> None:
    # Rate falling convexly with distortion: the chord between neighbours overstates the curve
    # (it would flatter GECO); the quadratic through three points does not.
    sweep = [(d, 1.0 / d) for d in (0.01, 0.02, 0.04)]
    chord = 100.0 + (math.log(0.015) - math.log(0.01)) / (math.log(0.02) - math.log(0.01)) * (50.0 - 100.0)
    assert 1.0 / 0.015 <= sweep_at(sweep, 0.015) < chord


def _run(kind: str, beta: float, seed: int, distortion: float, rate: float, tolerance: float | None = None) -> dict:
    return {
        "dataset": "mnist", "kind": kind, "beta": beta, "seed": seed, "tolerance": tolerance, "max_steps": 10,
        "test": {"distortion": distortion, "rate": rate, "marginal_kl": rate - 5.0},
    }


def test_table_compares_geco_with_the_sweep_at_its_own_distortion() -> None:
    # One seed, a sweep linear in log distortion (the quadratic is then exact), GECO 10 % under
    # the beta-2 tolerance at 3 nats less than the sweep there, and below every beta at beta 1.
    def sweep_rate(d: float) -> float:
        return 10.0 - 20.0 * math.log(d / 0.02)

    runs = [_run("beta", b, 0, d, sweep_rate(d)) for b, d in ((1.0, 0.01), (2.0, 0.015), (4.0, 0.02))]
    runs.append(_run("geco", 1.0, 0, 0.009, 20.0, tolerance=0.01))
    runs.append(_run("geco", 2.0, 0, 0.0135, sweep_rate(0.0135) - 3.0, tolerance=0.015))
    runs.append(_run("geco", 4.0, 0, 0.021, 9.0, tolerance=0.02))  # worse than every beta-VAE
    runs.append(_run("geco", 4.0, 1, 0.019, 9.0, tolerance=0.02))  # seed 1 has no sweep (yet)
    runs.append(_run("beta", 4.0, 1, 0.02, 10.0))
    lines = [line for line in table(runs, ["mnist"], [1.0, 2.0, 4.0]).splitlines() if line.startswith("| ")]
    header, *rows = ([cell.strip() for cell in line.strip("|").split(" | ")] for line in lines)
    by_beta = {row[0]: dict(zip(header, row)) for row in rows if row[0] in ("1", "2", "4")}
    at_own = ["rate GECO - sweep at GECO's distortion", "marginal KL GECO - sweep at GECO's distortion"]
    assert [by_beta["1"][column] for column in at_own] == ["below the sweep", "below the sweep"]
    assert [by_beta["2"][column] for column in at_own] == ["-3.0", "-3.0"]
    assert by_beta["2"]["GECO \\|test/tol - 1\\| %"] == "10.0 (-10.0)"
    assert [by_beta["4"][column] for column in at_own] == ["above the sweep / no sweep"] * 2

"""The multiplier controllers: the paper's rule, the previous default, and the PI law on log lambda."""

import math
import re

import pytest
import torch

from helpers import geco_snapshot
from lightning_geco import GECO, GECOCallback, GECOObjective, ReconstructionMSE
from lightning_geco.controllers import PIController, log_ratio_error


def _statistics(values: torch.Tensor) -> torch.Tensor:
    """``[sum_1..sum_K, count, nonfinite]`` of per-example values (N, K)."""
    return torch.cat([values.sum(0), torch.tensor([float(len(values)), 0.0])])


def _callback_geco(tolerances, **kwargs) -> GECO:
    objective = GECOObjective([ReconstructionMSE(t, name=f"c{i}") for i, t in enumerate(tolerances)])
    return GECOCallback(**kwargs)._build_geco(objective)


def _batches(steps=40, seed=0):
    """Per-example constraint values of two constraints (tolerances 0.015 and 0.06), improving."""
    generator = torch.Generator().manual_seed(seed)
    for t in range(steps):
        noise = torch.randn(8, 2, generator=generator) * torch.tensor([0.01, 0.03])
        yield noise + torch.tensor([0.02 - 0.0006 * t, 0.05 - 0.001 * t]) - torch.tensor([0.015, 0.06])


def test_paper_mode_is_algorithm_1_bit_for_bit():
    # Its defaults are Algorithm 1's (alpha 0.99, an absolute nu of 1), not the relative law's 0.006.
    alpha, nu = 0.99, 1.0
    geco = _callback_geco([0.015, 0.06], controller="paper")
    ema, log_lambda = None, torch.zeros(2)
    for values in _batches():
        geco.update(_statistics(values))
        batch = values.sum(0) / float(len(values))
        ema = batch if ema is None else alpha * ema + (1 - alpha) * batch  # steps 1-2 of Algorithm 1
        log_lambda = log_lambda + nu * ema  # step 5
        assert torch.equal(geco.constraint_ema, ema)
        assert torch.equal(geco.log_lagrange_multiplier, log_lambda)


def test_relative_mode_reproduces_the_previous_default_exactly():
    # Numbers from the GECO of commit b9bea36 (the previous default: alpha 0.9, relative nu
    # 0.006, rise cap 1, release 3x) on the same 40 batches.
    geco = _callback_geco([0.015, 0.06], controller="relative")
    trajectory = []
    for values in _batches():
        geco.update(_statistics(values))
        trajectory.append(geco.log_lagrange_multiplier.tolist())
    assert trajectory[9] == [0.01984509266912937, -0.05044053494930267]
    assert trajectory[25] == [0.00564586091786623, -0.15597106516361237]
    assert trajectory[-1] == [-0.12412209808826447, -0.2951773703098297]


def test_log_ratio_error_is_symmetric_and_compresses_large_violations():
    scale = torch.tensor([0.01, 0.01, 0.01, 0.01])
    readings = torch.tensor([0.02, 0.005, 0.1, 0.01])
    error = log_ratio_error(readings - scale, scale)
    assert error.tolist() == pytest.approx([math.log(2), -math.log(2), math.log(10), 0.0], abs=1e-6)


def test_pi_first_kick_uses_the_first_error_and_integrates_the_raw_error():
    pi = PIController(proportional_gain=0.5, integral_gain=0.01, smoothing_steps=10.0, integral_error_limit=None)
    pi.reset(torch.zeros(1))
    scale, valid = torch.tensor([0.01]), torch.tensor(True)
    e0 = math.log(3.0)
    out = pi.step(torch.zeros(1), torch.tensor([0.02]), torch.tensor([0.0]), scale, 1, valid)
    # xi_{-1} = e_0, so the first P term is K_P * e_0 in full.
    assert out.item() == pytest.approx(0.01 * e0 + 0.5 * e0, rel=1e-6)
    e1 = math.log(2.0)
    out = pi.step(out, torch.tensor([0.01]), torch.tensor([0.0]), scale, 1, valid)
    s = math.exp(-1 / 10)
    assert pi.integral.item() == pytest.approx(0.01 * (e0 + e1), rel=1e-6)
    assert out.item() == pytest.approx(0.01 * (e0 + e1) + 0.5 * (s * e0 + (1 - s) * e1), rel=1e-6)


def test_pi_continuing_a_trained_lambda_moves_it_no_further_than_its_integrator_does():
    # Bumpless transfer: a new Trainer fitting a trained model on (no controller state saved)
    # took lambda from 2.5 to 5.1 in one step, the first update's P term added in full.
    pi = PIController()  # K_P 0.5, K_I 0.08, clip 0.075
    pi.continue_from(torch.tensor([2.0]))
    # A checkpoint written before the first valid update (a calibration drive measures only every
    # 16 steps) keeps the bumpless start: restored, the first update added K_P * e (0.84) in full.
    saved, pi = pi.state_dict(), PIController()
    pi.load_state_dict(saved)
    scale, e0 = torch.tensor([0.01]), math.log(3.0)
    invalid = pi.step(torch.tensor([2.0]), torch.tensor([math.nan]), torch.tensor([0.0]), scale, 1, torch.tensor(False))
    assert invalid.item() == 2.0  # a skipped first step changes nothing, and the next valid one is still bumpless
    out = pi.step(torch.tensor([2.0]), torch.tensor([0.02]), torch.tensor([0.0]), scale, 1, torch.tensor(True))
    assert out.item() == pytest.approx(2.0 + 0.08 * 0.075, abs=1e-6)
    assert pi.integral.item() == pytest.approx(2.0 - 0.5 * e0 + 0.08 * 0.075, abs=1e-6)
    # From there on it is the PI law as ever: the P term follows the smoothed error.
    s, e1 = math.exp(-1 / 10), math.log(2.0)
    out = pi.step(out, torch.tensor([0.01]), torch.tensor([0.0]), scale, 1, torch.tensor(True))
    assert out.item() == pytest.approx(pi.integral.item() + 0.5 * (s * e0 + (1 - s) * e1), abs=1e-6)
    assert pi.integral.item() == pytest.approx(2.0 - 0.5 * e0 + 2 * 0.08 * 0.075, abs=1e-6)


def test_the_integrator_reads_the_error_clipped_so_an_untrained_decoder_cannot_wind_it_up():
    pi = PIController(proportional_gain=0.0, integral_gain=0.02, integral_error_limit=0.3)
    pi.reset(torch.zeros(1))
    scale, valid = torch.tensor([0.01]), torch.tensor(True)
    for _ in range(10):  # 35x past the tolerance: e = 3.6, counted as 0.3
        pi.step(torch.zeros(1), torch.tensor([0.34]), torch.tensor([0.0]), scale, 1, valid)
    assert pi.integral.item() == pytest.approx(10 * 0.02 * 0.3, rel=1e-6)
    pi.step(torch.zeros(1), torch.tensor([-0.001]), torch.tensor([0.0]), scale, 1, valid)  # 10 % better than asked
    assert pi.integral.item() == pytest.approx(10 * 0.02 * 0.3 + 0.02 * math.log(0.9), rel=1e-6)


def test_pi_gains_are_per_step_so_the_measurement_period_does_not_change_the_integral():
    every_step, every_fourth = PIController(0.0, 0.01, integral_error_limit=None), PIController(0.0, 0.01, integral_error_limit=None)
    for pi in (every_step, every_fourth):
        pi.reset(torch.zeros(1))
    args = (torch.tensor([0.02]), torch.tensor([0.0]), torch.tensor([0.01]))
    for _ in range(8):
        every_step.step(torch.zeros(1), *args, 1, torch.tensor(True))
    for _ in range(2):
        every_fourth.step(torch.zeros(1), *args, 4, torch.tensor(True))
    assert every_fourth.integral.item() == pytest.approx(every_step.integral.item(), rel=1e-6)


@pytest.mark.parametrize("controller", ["paper", "relative"])
def test_algorithm_1_steps_are_per_optimizer_step_so_a_measurement_every_16_steps_moves_lambda_as_far(controller):
    # The calibration stream feeds one measurement every 16 steps: it must move lambda as 16
    # training updates of the same reading would, the rise cap included (it used to move 1/16 as far).
    def moved(reading: float, drive: str) -> float:
        geco = _callback_geco([0.01], controller=controller, drive=drive)
        statistics = _statistics(torch.full((8, 1), reading - 0.01))
        if drive == "training":
            for _ in range(32):
                geco.update(statistics)
        else:
            for _ in range(2):
                geco.control(statistics, 16)
        return geco.log_lagrange_multiplier.item()

    for reading in (0.015, 0.05, 0.004):  # 1.5x (uncapped), 5x (the relative law's cap), 0.4x (the release)
        training = moved(reading, "training")
        assert training != 0.0
        # the training drive's moving average starts at the first batch, so a constant reading is its own average
        assert moved(reading, "calibration") == pytest.approx(training, rel=1e-5)


def test_an_algorithm_1_sized_for_other_constraints_is_refused_with_the_counts():
    from lightning_geco.controllers import Algorithm1

    with pytest.raises(ValueError, match=re.escape(
        "Algorithm1 step_size has 2 values, but GECO has 3 constraints: give one number or one per constraint (3)."
    )):
        GECO(["a", "b", "c"], controller=Algorithm1([1.0, 2.0]))
    with pytest.raises(ValueError, match=re.escape("Algorithm1 max_increase has 2 values, but GECO has 1 constraints")):
        GECO(["a"], controller=Algorithm1(1.0, max_increase=[0.1, 0.2]))
    GECO(["a", "b"], controller=Algorithm1([1.0, 2.0], max_increase=0.1))  # one per constraint, or one for all


def test_a_pi_controller_given_to_geco_is_held_within_geco_s_bounds():
    # Its own bounds were (-30, 30) while GECO clamped the output to (-5, 5): the integrator wound
    # up to 30 and a constraint gone slack sat at the bound for thousands of steps.
    geco = GECO(["c"], log_lambda_bounds=(-5.0, 5.0), controller=PIController(), scales=[0.01])
    assert geco.controller.log_lambda_bounds == (-5.0, 5.0)
    for _ in range(5000):
        geco.update(_statistics(torch.full((8, 1), 0.01)))  # 2x the tolerance
    assert geco.log_lagrange_multiplier.item() == 5.0 and geco.controller.integral.item() == 5.0
    for _ in range(20):
        geco.update(_statistics(torch.full((8, 1), -0.002)))  # 20 % better than asked
    assert geco.log_lagrange_multiplier.item() < 5.0
    assert GECO(["c"], controller=PIController(log_lambda_bounds=(-1.0, 2.0))).controller.log_lambda_bounds == (-1.0, 2.0)
    with pytest.raises(ValueError, match=re.escape(
        "PIController log_lambda_bounds (-30.0, -20.0) and GECO's (-5.0, 5.0) do not overlap"
    )):
        GECO(["c"], log_lambda_bounds=(-5.0, 5.0), controller=PIController(log_lambda_bounds=(-30.0, -20.0)))


def test_pi_integrator_is_clamped_so_it_cannot_wind_up_past_the_bounds():
    pi = PIController(0.0, 1.0, log_lambda_bounds=(-2.0, 3.0), integral_error_limit=None)
    pi.reset(torch.zeros(1))
    for _ in range(50):
        out = pi.step(torch.zeros(1), torch.tensor([100.0]), torch.tensor([0.0]), torch.tensor([0.01]), 1, torch.tensor(True))
    assert pi.integral.item() == 3.0 and out.item() == 3.0
    # One step back below target starts lowering lambda at once (nothing wound up past 3).
    out = pi.step(out, torch.tensor([-0.009]), torch.tensor([0.0]), torch.tensor([0.01]), 1, torch.tensor(True))
    assert out.item() < 3.0


@pytest.mark.parametrize("settings", [{}, {"ramp_steps": 100.0, "noise_correction": True}])
@pytest.mark.parametrize("measured_first", [True, False])
def test_an_invalid_measurement_leaves_the_pi_state_and_lambda_untouched(settings, measured_first):
    # An invalid measurement's error is NaN or infinite; the controller never masks it, so
    # every write to its state must (the whole state is compared, every option on).
    geco = _callback_geco([0.01], controller="pi", **settings)
    if measured_first:
        for value in (0.02, 0.0105, 0.0104):  # past, then within the clip band (the drift learns)
            geco.update(_statistics(torch.full((4, 1), value - 0.01)))
    before = geco_snapshot(geco)
    for statistics in ([float("nan"), 4.0, 0.0], [float("inf"), 4.0, 0.0], [-float("inf"), 4.0, 0.0], [0.1, 4.0, 1.0]):
        geco.update(torch.tensor(statistics))  # NaN, +-inf, a sum flagged non-finite
    after = geco_snapshot(geco)
    assert torch.equal(before["log_lagrange_multiplier"], after["log_lagrange_multiplier"])
    assert before["controller"].keys() == after["controller"].keys()
    for key, value in before["controller"].items():  # the name, "started", and every tensor
        assert (torch.equal(value, after["controller"][key]) if torch.is_tensor(value) else value == after["controller"][key]), key
    assert after["num_skipped_updates"] == 4


def test_pi_state_round_trips_and_an_old_checkpoint_continues_from_its_lambda():
    geco = _callback_geco([0.01], controller="pi")
    for value in (0.05, 0.03, 0.02):
        geco.update(_statistics(torch.full((4, 1), value - 0.01)))
    restored = _callback_geco([0.01], controller="pi")
    restored.state.load_state_dict(geco.state.state_dict())  # the model's buffers
    restored.load_state_dict(geco.state_dict())  # the callback's state
    assert torch.equal(restored.controller.integral, geco.controller.integral)
    assert torch.equal(restored.controller.smoothed_error, geco.controller.smoothed_error)
    # Before controllers existed: no controller state, lambda in the callback's state.
    old = {k: v for k, v in geco_snapshot(geco).items() if k != "controller"}
    fresh = _callback_geco([0.01], controller="pi")
    fresh.load_state_dict(old)
    assert torch.equal(fresh.controller.integral, geco.log_lagrange_multiplier)


def test_calibration_drive_moves_lambda_only_through_control():
    geco = _callback_geco([0.01], controller="pi", drive="calibration")
    geco.update(_statistics(torch.full((4, 1), 0.05)))
    assert geco.log_lagrange_multiplier.item() == 0.0 and geco.num_updates == 1
    geco.control(_statistics(torch.full((4, 1), 0.01)), period=16)  # 2x the tolerance
    # The first measurement: e = ln 2, the integrator's clipped error 0.075 over 16 steps, and
    # the P term on xi_0 = e (nothing held: no slope yet; nothing released: e > -0.5).
    expected = 0.08 * 16 * 0.075 + 0.5 * math.log(2.0)
    assert geco.log_lagrange_multiplier.item() == pytest.approx(expected, rel=1e-6) and geco.num_measurements == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"controller": "pid"}, "GECOCallback controller must be one of ('paper', 'relative', 'pi'), got 'pid'."),
        ({"drive": "validation"}, "GECOCallback drive must be one of ('auto', 'training', 'calibration'), got 'validation'."),
        ({"proportional_gain": -1.0}, "PIController proportional_gain must be a finite number >= 0, got -1.0."),
        ({"integral_gain": 0.0}, "PIController integral_gain must be a positive finite number, got 0.0."),
        ({"smoothing_steps": float("nan")}, "PIController smoothing_steps must be a number in [0, trend_steps) = [0, 50) (optimizer steps), got nan."),
        ({"smoothing_steps": 60}, "PIController smoothing_steps must be a number in [0, trend_steps) = [0, 50) (optimizer steps), got 60."),
        ({"ramp_steps": -5.0}, "PIController ramp_steps must be a positive finite number, got -5.0."),
        ({"noise_correction": 1}, "PIController noise_correction must be True or False, got 1."),
        ({"release_threshold": 0.0}, "PIController release_threshold must be a positive finite number, got 0.0."),
        ({"calibration_every": 0}, "GECOCallback calibration_every must be a positive int, got 0."),
        # these failed at the first measurement, mid-fit, in a trace from torch's manual_seed
        ({"calibration_seed": 0.5}, "GECOCallback calibration_seed must be an int >= 0, got 0.5."),
        ({"calibration_seed": None}, "GECOCallback calibration_seed must be an int >= 0, got None."),
        ({"max_nonfinite_steps": 2.5}, "max_nonfinite_steps must be a positive int, got 2.5."),
        ({"stall_window": 1.5}, "GECOCallback stall_window must lie in (0, 1] (a fraction of the planned steps), got 1.5."),
    ],
)
def test_bad_controller_settings_are_refused_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GECOCallback(**kwargs)


# ---------------------------------------------------------------------------------------------
# The closed loop on a synthetic plant: reading = c(t) / lambda^g (lagged) * noise.


def closed_loop(
    g, tau=50.0, steps=3000, drift=0.0, cv=0.1, ratio0=5.0, seed=0, tolerance=0.01, learns_at=None, learned_by=1.0,
    **settings,
):
    """Run the PI controller (the default, or ``GECOCallback(**settings)``) against a plant whose
    log reading follows ``ln C_t = ln c(t) - g * y_t``, ``y`` a first-order lag (``tau`` steps)
    of ``ln lambda``: the model adapting to a new weight, with gain g (1: a Gaussian decoder in
    its linear regime), multiplicative noise of coefficient of variation ``cv`` and ``ln c``
    falling by ``drift`` per step (a model still improving), and by ``ln learned_by`` at once at
    step ``learns_at`` (a model that suddenly finds the data's structure). Returns the noiseless
    ratio C / tolerance per step. (``benchmarks/plant.py`` runs it with other settings.)"""
    callback = GECOCallback(controller="pi", **settings)
    geco = callback._build_geco(GECOObjective([ReconstructionMSE(tolerance, name="c0")]))
    generator = torch.Generator().manual_seed(seed)
    lag, ratios = 0.0, []
    for t in range(steps):
        lag += (geco.log_lagrange_multiplier.item() - lag) / tau
        log_reading = math.log(ratio0 * tolerance) - drift * t - g * lag
        if learns_at is not None and t >= learns_at:
            log_reading -= math.log(learned_by)
        noisy = math.exp(log_reading + cv * torch.randn((), generator=generator).item() - cv**2 / 2)
        geco.update(torch.tensor([noisy - tolerance, 1.0, 0.0]))
        ratios.append(math.exp(log_reading) / tolerance)
    return ratios


@pytest.mark.parametrize("g", [0.3, 1.0, 3.0])
def test_pi_settles_on_the_tolerance_with_no_steady_state_error(g):
    ratios = closed_loop(g)
    tail = ratios[-len(ratios) // 5 :]
    mean_log_error = sum(math.log(r) for r in tail) / len(tail)
    assert abs(mean_log_error) < 0.01  # no steady-state error (within 1 %)
    assert all(abs(r - 1) < 0.05 for r in tail)  # settled within 5 %
    first = next(i for i, r in enumerate(ratios) if r <= 1.0)
    assert min(ratios[first:]) > 0.75  # bounded overshoot past the target (at most 25 % better than asked)


@pytest.mark.parametrize("g", [0.3, 1.0, 3.0])
def test_pi_tracks_a_drifting_plant_within_five_percent(g):
    # The model keeps improving at a fixed lambda (ln c falls 0.3 over the run): a ramp the
    # integrator follows with a lag of drift / (g * K_I).
    ratios = closed_loop(g, drift=1e-4)
    tail = ratios[-len(ratios) // 5 :]
    assert all(abs(r - 1) < 0.05 for r in tail)


def _steps_back_within_five_percent(ratios, since):
    """Steps after ``since`` until the ratio enters the 5 % band and stays there 100 steps."""
    return next(
        i - since for i in range(since, len(ratios) - 100) if all(abs(r - 1) < 0.05 for r in ratios[i : i + 100])
    )


def test_the_fast_release_brings_lambda_down_after_a_model_learns_at_once():
    # Settled on the tolerance, the model improves 5x at once at step 1000 (a decoder finding the
    # data's structure): the reading falls to ~0.2 of the tolerance. The clipped integrator
    # releases lambda at K_I x limit = 0.006 per step; the fast release reads how far the
    # averages are past its threshold, unclipped.
    fast = closed_loop(0.3, learns_at=1000, learned_by=5.0)
    slow = closed_loop(0.3, learns_at=1000, learned_by=5.0, release_threshold=None)
    assert min(fast[1000:]) < 0.25 and fast[:1000] == slow[:1000]  # adds exactly 0 until triggered
    assert _steps_back_within_five_percent(fast, 1000) <= 400  # 264 (the clip alone: 874)
    assert _steps_back_within_five_percent(slow, 1000) >= 2 * _steps_back_within_five_percent(fast, 1000)
    for g in (0.3, 1.0, 3.0):
        fast = closed_loop(g, learns_at=1000, learned_by=5.0)
        slow = closed_loop(g, learns_at=1000, learned_by=5.0, release_threshold=None)
        assert _steps_back_within_five_percent(fast, 1000) <= _steps_back_within_five_percent(slow, 1000)
        # The way back overshoots past the tolerance by at most 10 % (gain 1: 1.093x, 71 steps
        # past 1.05x, against 1.035x without the release; gains 0.3 and 3 as without it).
        assert max(fast[1000:]) < 1.10


@pytest.mark.parametrize("cv", [0.1, 0.6])
def test_a_loop_settling_from_above_never_triggers_the_fast_release(cv):
    # Both averages must lie past the threshold: noisy measurements around the tolerance on
    # every step (cv 0.6, as a classifier's cross-entropy on 64 images) leave the trajectory
    # bit for bit as without it.
    for g in (0.3, 1.0, 3.0):
        assert closed_loop(g, cv=cv) == closed_loop(g, cv=cv, release_threshold=None)


def test_the_fast_release_never_takes_lambda_below_its_lowest():
    # A constraint far under its tolerance from the start (0.1x: slack) only ever sees lambda
    # fall: nothing rose to release, so it falls at the clip's pace, exactly as without the
    # release, and is not driven to the lower bound while it does not bind.
    for g in (0.3, 1.0, 3.0):
        assert closed_loop(g, ratio0=0.1) == closed_loop(g, ratio0=0.1, release_threshold=None)

    def integral_after_rise_and_fall(**settings):
        geco = GECOCallback(controller="pi", **settings)._build_geco(GECOObjective([ReconstructionMSE(0.01)]))
        for _ in range(200):  # the reading 5x past: lambda rises from 1 (log 0), ~0.006 per step
            geco.update(torch.tensor([0.04, 1.0, 0.0]))
        risen = geco.controller.integral.item()
        for _ in range(100):  # then 0.01x of the tolerance, whatever lambda does
            geco.update(torch.tensor([0.0001 - 0.01, 1.0, 0.0]))
        return risen, geco.controller.integral.item()

    risen, released = integral_after_rise_and_fall()
    _, clipped = integral_after_rise_and_fall(release_threshold=None)
    # The clip's crawl, 0.006 a step, held for the first two steps of the fall: the fast average
    # of the error is still above 0 there (1.02, then 0.49) and falling fast enough to arrive
    # within the 200 steps (the slope -0.012 a step, then steeper), so 98 steps crawl.
    assert risen == pytest.approx(200 * 0.006, abs=1e-5)
    assert clipped == pytest.approx(risen - 98 * 0.006, abs=1e-5)
    # The release took back what had risen, down to where lambda started (its lowest), and the
    # clip's crawl went on from there: not the ~15 in log lambda an unbounded release would fall.
    assert -100 * 0.006 <= released < 0.0


def test_the_integrator_holds_while_the_reading_falls_onto_its_tolerance_as_the_docstring_states():
    def integrals(readings, **settings):
        controller = PIController(**settings)
        controller.reset(torch.zeros(1))
        scale, valid, seen = torch.tensor([0.01]), torch.tensor(True), []
        for reading in readings:
            value = torch.tensor([reading - 0.01])
            controller.step(torch.zeros(1), value, value, scale, 1, valid)
            seen.append(controller.integral.item())
        return seen

    def documented(readings, hold=True):
        """The module docstring's law in float64 (no release: every error here is above -0.5)."""
        s, r, integral, seen, held_at = math.exp(-1 / 10), math.exp(-1 / 50), 0.0, [], []
        xi = zeta = math.log(readings[0] / 0.01)  # xi_{-1} = zeta_{-1} = e_0
        for t, reading in enumerate(readings):
            e = math.log(reading / 0.01)
            xi = s * xi + (1 - s) * e
            zeta = r * zeta + (1 - r) * e
            slope = (xi - zeta) / (50 - 10)
            held = hold and xi > 0 and slope < 0 and xi < 200 * -slope
            integral += 0.0 if held else 0.08 * max(-0.075, min(0.075, e))
            seen.append(integral)
            held_at += [t] if held else []
        return seen, held_at

    # 2x past and standing: the integrator rises by the clip, K_I * 0.075 a step, every step.
    standing = [0.02] * 40
    assert integrals(standing) == pytest.approx([0.006 * (t + 1) for t in range(40)], abs=1e-6)
    assert documented(standing)[1] == []
    # 2x past and falling 2 % a step (the error's slope -0.02 a step: at 0 in 35 steps): once the
    # averages show the slope, the integrator stops rising, as the docstring's hold says.
    falling = [0.02 * 0.98**t for t in range(40)]
    expected, held_at = documented(falling)
    assert held_at == list(range(15, 40))  # the averages need 15 steps to see the slope
    assert integrals(falling) == pytest.approx(expected, abs=1e-5)
    assert integrals(falling, approach_steps=None) == pytest.approx(documented(falling, hold=False)[0], abs=1e-5)


def test_ramp_tracking_removes_the_lag_behind_a_steep_drift():
    # A model improving fast (ln c falls 1e-3 per step) against a weak plant (g 0.3): the PI's
    # integrator needs a standing error of drift / (g K_I) = 4.2 % (8.1 % measured) to follow
    # it; a second integrator that learns the drift needs none. Measured on the
    # real cells it overshoots as the learning rate anneals (docs/RESULTS.md), so it is an option.
    def tail_log_error(**settings):
        ratios = closed_loop(0.3, drift=1e-3, **settings)
        tail = ratios[-len(ratios) // 5 :]
        return sum(math.log(r) for r in tail) / len(tail)

    assert tail_log_error() < -0.05  # the type-1 loop trails, on the safe side
    assert abs(tail_log_error(ramp_steps=300.0)) < 0.005
    for g in (0.3, 1.0, 3.0):  # and it keeps the plant tests' bounds at every gain
        ratios = closed_loop(g, ramp_steps=300.0)
        first = next(i for i, r in enumerate(ratios) if r <= 1.0)
        assert all(abs(r - 1) < 0.05 for r in ratios[-len(ratios) // 5 :]) and min(ratios[first:]) > 0.75


def test_the_learned_drift_round_trips_and_an_older_state_starts_without_one():
    geco = _callback_geco([0.01], controller="pi", ramp_steps=100.0)
    for value in (0.0105, 0.0104, 0.0103, 0.0102):  # within the clip band: the drift learns
        geco.update(_statistics(torch.full((4, 1), value - 0.01)))
    assert geco.controller.drift.abs().item() > 0
    restored = _callback_geco([0.01], controller="pi", ramp_steps=100.0)
    restored.state.load_state_dict(geco.state.state_dict())
    restored.load_state_dict(geco.state_dict())
    assert torch.equal(restored.controller.drift, geco.controller.drift)
    older = geco.state_dict()
    older["controller"] = {k: v for k, v in older["controller"].items() if k != "drift"}
    fresh = _callback_geco([0.01], controller="pi", ramp_steps=100.0)
    fresh.load_state_dict(older)
    assert fresh.controller.drift.item() == 0.0
    assert torch.equal(fresh.controller.integral, geco.controller.integral)


def test_the_release_floor_round_trips_and_an_older_state_releases_nothing_below_its_integrator():
    geco = _callback_geco([0.01], controller="pi")
    for value in (0.05,) * 30 + (0.011,) * 30 + (0.005,) * 5:  # a rise, a settle, a little fall
        geco.update(_statistics(torch.full((4, 1), value - 0.01)))
    floor = geco.controller.release_floor
    assert floor.item() == 0.0 < geco.controller.integral.item()  # the lowest: where lambda started
    restored = _callback_geco([0.01], controller="pi")
    restored.state.load_state_dict(geco.state.state_dict())
    restored.load_state_dict(geco.state_dict())
    assert torch.equal(restored.controller.release_floor, floor)
    older = geco.state_dict()
    older["controller"] = {k: v for k, v in older["controller"].items() if k != "release_floor"}
    fresh = _callback_geco([0.01], controller="pi")
    fresh.load_state_dict(older)
    assert torch.equal(fresh.controller.release_floor, geco.controller.integral)


def test_noise_correction_holds_the_mean_of_noisy_measurements_not_their_median():
    # Log-normal measurements whose mean is the true reading, 60 % noise each (a 64-image
    # measurement of a classifier's cross-entropy is about this noisy): the log-ratio error of
    # each averages var / 2 below the log of the mean, so the loop holds their median and the
    # mean ends ~20 % past the tolerance; corrected by half the running variance it ends on it.
    def tail_mean(**settings):
        ratios = closed_loop(1.0, cv=0.6, **settings)
        tail = ratios[-len(ratios) // 5 :]
        return sum(tail) / len(tail)

    assert tail_mean() > 1.15
    assert abs(tail_mean(noise_correction=True) - 1) < 0.05
    for g in (0.3, 1.0, 3.0):  # and with the plant tests' 10 % noise it keeps their bounds
        ratios = closed_loop(g, noise_correction=True)
        tail = ratios[-len(ratios) // 5 :]
        first = next(i for i, r in enumerate(ratios) if r <= 1.0)
        assert all(abs(r - 1) < 0.05 for r in tail) and min(ratios[first:]) > 0.75
        assert abs(sum(math.log(r) for r in tail) / len(tail)) < 0.01


def test_the_noise_variance_round_trips_and_an_older_state_starts_without_one():
    geco = _callback_geco([0.01], controller="pi", noise_correction=True)
    for value in (0.012, 0.008, 0.013, 0.009):
        geco.update(_statistics(torch.full((4, 1), value - 0.01)))
    assert geco.controller.error_variance.item() > 0
    restored = _callback_geco([0.01], controller="pi", noise_correction=True)
    restored.state.load_state_dict(geco.state.state_dict())
    restored.load_state_dict(geco.state_dict())
    assert torch.equal(restored.controller.error_variance, geco.controller.error_variance)
    older = geco.state_dict()
    older["controller"] = {k: v for k, v in older["controller"].items() if k != "error_variance"}
    fresh = _callback_geco([0.01], controller="pi", noise_correction=True)
    fresh.load_state_dict(older)
    assert fresh.controller.error_variance.item() == 0.0


def test_the_learned_drift_moves_lambda_in_proportion_to_its_pace():
    def integral_after(pace, ramp_steps=100.0):
        controller = PIController(ramp_steps=ramp_steps)
        controller.reset(torch.zeros(1))
        scale, valid = torch.tensor([0.01]), torch.tensor(True)
        for _ in range(40):  # 5 % over, inside the clip band: the drift learns
            controller.step(torch.zeros(1), torch.tensor([0.0005]), torch.tensor([0.0005]), scale, 1, valid)
        drift, integral = controller.drift.clone(), controller.integral.clone()
        controller.pace.fill_(pace)
        controller.step(torch.zeros(1), torch.tensor([0.0005]), torch.tensor([0.0005]), scale, 1, valid)
        return controller.integral - integral, drift

    still, drift = integral_after(0.0)
    half, _ = integral_after(0.5)
    full, _ = integral_after(1.0)
    assert drift.item() > 0
    # What the integrator adds besides the drift is the same at every pace: K_I x the error.
    torch.testing.assert_close(full - still, drift, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(half - still, 0.5 * drift, rtol=1e-5, atol=0.0)

"""The verdict: met / not_met / unreachable, from the rule and from small real runs built to end that way."""

import json
import math
import re
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from helpers import quiet_trainer, tiny_conv_vae
from lightning_geco import ConvVAE, GECOCallback, GECOObjective, PatchNCC, ReconstructionMSE, RunSummary
from lightning_geco.summary import _relative_standard_error, run_directory
from lightning_geco.verdict import (
    MET_BAND,
    Stall,
    StallDetector,
    constraint_clause,
    verdict,
    verdict_line,
    within_noise,
)


def _detector(window=100):
    return StallDetector(1, window_steps=window, log_lambda_max=30.0)


def test_lambda_rising_fourfold_while_the_reading_stays_flat_is_a_stall():
    detector = _detector()
    found = []
    for step in range(0, 201, 25):
        log_lambda = math.log(2.0) + step / 100 * math.log(5.0)  # x5 per 100 steps
        found += detector.observe(step, [log_lambda], [1.30 - 0.0001 * step])
    assert found == [0]
    stall = detector.stalls[0]
    assert (stall.first_step, stall.last_step) == (0, 100)
    assert stall.lambda_after / stall.lambda_before == pytest.approx(5.0)


@pytest.mark.parametrize("window", [200, 220, 247, 300])
def test_a_window_the_logging_interval_does_not_divide_still_finds_the_stall(window):
    # Observations every 50 steps (log_every_n_steps): a 220-step window holds none exactly 220
    # steps back, and once demanded one, so max_steps 1100 (20 %: 220) could never find a stall.
    detector = _detector(window)
    found = []
    for step in range(0, 601, 50):
        found += detector.observe(step, [step / 100 * math.log(7.0)], [1.5])  # x7 per 100 steps
        if found:
            break
    assert found == [0]
    stall = detector.stalls[0]
    # The window opens at the latest observation at least `window` steps back.
    assert stall.last_step - stall.first_step == 50 * math.ceil(window / 50)
    assert stall.last_step == 50 * math.ceil(window / 50)


def test_a_reading_that_follows_lambda_is_no_stall():
    detector = _detector()
    for step in range(0, 226, 25):
        log_lambda = step / 100 * math.log(5.0)
        # unit gain: the reading falls as lambda rises (40x past the tolerance at lambda 1)
        detector.observe(step, [log_lambda], [40.0 * math.exp(-log_lambda)])
    assert detector.stalls == [None]


def test_no_stall_is_called_before_a_whole_window_or_once_the_tolerance_is_met():
    detector = _detector(window=100)
    for step in (0, 25, 50, 75):
        assert detector.observe(step, [step / 10], [2.0]) == []
    detector = _detector(window=100)
    for step in range(0, 151, 25):
        # flat and lambda rising, but every window holds a point within 5 % of the tolerance
        ratio = 1.02 if step == 50 else 1.2
        detector.observe(step, [step / 20], [ratio])
    assert detector.stalls == [None]


def test_a_reading_on_pace_to_arrive_before_the_last_step_is_no_stall():
    # The default job at step 800: lambda x5.6 over 300 steps while the MSE fell 15 %, 35 %
    # past its tolerance. Elasticity 0.09 (< 0.1), but at that pace (ln(1.35 / 1.01) / (0.163 / 300
    # steps) = 533 more steps) it arrives before step 1500: no stall. With 300 steps left
    # (max_steps 1100), or no max_steps (another window, 300 steps), it is one.
    def observe(detector):
        for step in range(500, 801, 25):
            x = (step - 500) / 300
            detector.observe(step, [math.log(8.9) + x * math.log(5.57)], [1.588 * math.exp(-0.163 * x)])
        return detector.stalls[0]

    assert observe(StallDetector(1, window_steps=300, log_lambda_max=30.0, last_step=1500)) is None
    stall = observe(StallDetector(1, window_steps=300, log_lambda_max=30.0, last_step=1100))
    assert stall is not None and (stall.first_step, stall.last_step, stall.steps_left) == (500, 800, 300)
    assert stall.steps_needed == pytest.approx(math.log(1.588 * math.exp(-0.163) / 1.01) / (0.163 / 300))
    assert stall.describe().endswith("; at that pace it needs 533 more steps, 300 are left")
    assert observe(StallDetector(1, window_steps=300, log_lambda_max=30.0)) is not None


def test_a_flat_reading_says_it_was_not_falling():
    detector = StallDetector(1, window_steps=100, log_lambda_max=30.0, last_step=10_000)
    for step in range(0, 101, 25):
        detector.observe(step, [step / 100 * math.log(5.0)], [1.3])
    assert detector.stalls[0].describe().endswith("; it was not falling, 9900 are left")


def test_a_reading_that_reaches_its_tolerance_later_withdraws_the_stall_for_good():
    # The README's MLP example: 5x past its tolerance for 300 steps while lambda rose 5.6x,
    # then it broke through. A tolerance the model reached is not unreachable.
    detector = StallDetector(1, window_steps=100, log_lambda_max=30.0, last_step=1000)
    for step in range(0, 101, 25):
        detector.observe(step, [step / 100 * math.log(5.6)], [5.5])
    stall = detector.stalls[0]
    assert stall is not None
    detector.observe(125, [2.0], [1.009])  # within the 1 % band once: one lucky reading is not enough
    assert detector.stalls[0] is stall and detector.reached == [None]
    detector.observe(150, [2.0], [0.98])  # twice in a row
    assert detector.stalls == [None] and detector.withdrawn == [stall] and detector.reached == [150]
    assert detector.withdrawn_at == [150] and detector.withdrawn_why == ["came within 1 % of its tolerance at step 150 after all"]
    for step in range(175, 551, 25):  # flat and far past again, lambda rising: never a stall again
        assert detector.observe(step, [2.0 + step / 100], [3.0]) == []
    assert detector.stalls == [None]
    # the summary's verdict reads detector.stalls: past the band at the end is not_met, not unreachable
    assert verdict(0.02, detector.stalls[0]) == "not_met" and verdict(0.02, stall) == "unreachable"


def test_a_plateau_that_breaks_withdraws_the_stall_and_the_run_ends_not_met():
    # A new-user trial on an image folder (MSE 0.008, 1500 steps, window 300): the reading sat at
    # 4.7x its tolerance over steps 224-524 while lambda rose 5.5x (a stall, warned), then fell
    # to 1.29x by the end as lambda rose on (calibration drive: gain 0.32, three times the rule's
    # 0.1). It ended UNREACHABLE; more lambda was buying quality all along after the plateau.
    detector = StallDetector(1, window_steps=300, log_lambda_max=30.0, last_step=1500)
    noise = [1.06, 0.94, 1.06, 0.94, 1.06, 0.94, 1.0]  # a 64-image measurement varies by ~6 %
    for step, wobble in zip(range(224, 525, 50), noise):
        detector.observe(step, [math.log(2.9) + (step - 224) / 300 * math.log(5.5)], [4.7 * wobble])
    stall = detector.stalls[0]
    assert stall is not None and (stall.first_step, stall.last_step, stall.points) == (224, 524, 7)
    # The window's fitted line, not its last reading, and the readings' spread about it.
    assert stall.ratio_after == pytest.approx(4.606, abs=0.001) and stall.noise == pytest.approx(0.0641, abs=1e-4)

    def log_lambda(step):  # rising 1.2x every 50 steps after the plateau
        return [math.log(16 * 1.2 ** ((step - 524) / 50))]

    # Readings as noisy as the plateau's, no lower on average: no withdrawal.
    for step, wobble in zip(range(574, 825, 50), [0.94, 1.06, 0.94, 1.06, 0.94, 1.06]):
        detector.observe(step, log_lambda(step), [4.61 * wobble])
    assert detector.stalls[0] is stall
    # Then it falls: twice in a row the mean of the last 3 readings lies well under the stall's end.
    for step, ratio in zip(range(874, 1025, 50), [3.9, 3.5, 3.3, 3.1]):
        detector.observe(step, log_lambda(step), [ratio])
        assert (detector.stalls[0] is stall) == (step < 1024)
    assert detector.withdrawn == [stall] and detector.withdrawn_at == [1024]
    assert detector.withdrawn_why == [
        "fell 28.4 % (360.6 % -> 229.6 % past the tolerance, the stall's fitted end against the mean of the last 3 "
        "readings) over steps 524-1024 while lambda moved 6.21x: more lambda buys quality again"
    ]
    # The plateau it broke is no evidence any more: lambda rises on, but the reading falls since.
    for step, ratio in zip(range(1074, 1501, 50), [2.9, 2.7, 2.4, 2.2, 2.0, 1.8, 1.6, 1.45, 1.29]):
        assert detector.observe(step, log_lambda(step), [ratio]) == []
    assert verdict(0.29, detector.stalls[0]) == "not_met"


def test_a_reading_that_slides_onto_its_tolerance_in_time_withdraws_the_stall_though_lambda_rose_more():
    # A plateau 8 % past while lambda rose 6x (a stall), then a slide to 1.5 % past as lambda
    # rose on, 5x more: too little fall for "a tenth of lambda's rise" (0.062 against 0.18 in log
    # terms), so the run ended UNREACHABLE 1.5 % past its tolerance, quoting step 300's pace.
    def run(floor):
        detector = StallDetector(1, window_steps=300, log_lambda_max=math.log(1e6), last_step=1500)
        for step in range(0, 1501, 50):
            log_lambda = 0.006 * min(step, 600) + 0.0012 * max(0, step - 600)
            detector.observe(step, [log_lambda], [1.08 if step <= 600 else max(floor, 1.08 - 0.00011 * (step - 600))])
        return detector

    slid = run(floor=1.015)
    assert slid.stalls == [None] and slid.withdrawn[0].last_step == 300 and slid.withdrawn_at == [1150]
    assert slid.withdrawn_why[0].endswith("at that pace it reaches its tolerance in the steps left")
    assert verdict(0.015, slid.stalls[0]) == "not_met"
    # Sliding less than half the way to the band (8 % -> 5.5 % past): the stall stands.
    stuck = run(floor=1.055)
    assert stuck.stalls[0] is not None and stuck.withdrawn == [None] and verdict(0.055, stuck.stalls[0]) == "unreachable"


def test_a_reading_as_noisy_as_a_calibration_draw_withdraws_no_stall_of_an_impossible_tolerance():
    # Flat at 3x its tolerance while lambda rises 1800x over a 1500-step run, each reading one
    # 64-image measurement (6-12 % noise): the last-reading rule withdrew 7-33 % of such stalls
    # by chance, and the run ended not_met. The fitted window and the mean of 3 readings: none.
    import random

    for sigma in (0.06, 0.12):
        for seed in range(40):
            rng = random.Random(seed)
            detector = StallDetector(1, window_steps=300, log_lambda_max=30.0, last_step=1500)
            for step in range(25, 1501, 25):
                detector.observe(step, [step * 1.5 / 300], [3.0 * math.exp(rng.gauss(0.0, sigma))])
            assert verdict(2.0, detector.stalls[0]) == "unreachable", (sigma, seed)


def test_a_stall_after_a_withdrawn_one_is_found_on_the_later_evidence_alone():
    detector = StallDetector(1, window_steps=100, log_lambda_max=30.0, last_step=2000)
    for step in range(0, 101, 25):
        detector.observe(step, [step / 100 * math.log(5.0)], [3.0])
    first = detector.stalls[0]
    for step in (125, 150, 175, 200):  # the mean of 3 readings since the stall, 2 logging steps in a row
        detector.observe(step, [math.log(5.0)], [2.0])
    assert detector.stalls == [None] and detector.withdrawn == [first]
    found = []
    for step in range(175, 401, 25):  # a second plateau at 2x, lambda rising 5x per 100 steps
        found += [(step, k) for k in detector.observe(step, [math.log(5.0) * (1 + (step - 150) / 100)], [2.0])]
    # Judged on the readings from step 100 (the withdrawn stall's end) on, not on the first plateau's:
    # windows holding the fall from 3x are no stall, the first past it (150-250) is.
    assert found == [(250, 0)] and detector.stalls[0].first_step == 150


def test_the_callback_says_when_a_warned_tolerance_was_reached_after_all():
    from types import SimpleNamespace

    from lightning_geco import GECOObjective, ReconstructionMSE

    callback = GECOCallback()
    callback.objective = GECOObjective([ReconstructionMSE(0.01)])
    callback.geco = callback._build_geco(callback.objective)
    callback.geco._seeded = torch.tensor(True)
    callback.detector = StallDetector(1, window_steps=100, log_lambda_max=30.0, last_step=1000)
    for step in range(0, 101, 25):
        callback.geco.log_lagrange_multiplier = torch.tensor([step / 100 * math.log(5.6)])
        callback.geco.constraint_ema = torch.tensor([0.045])  # 5.5x the tolerance
        if step < 100:
            callback._watch(SimpleNamespace(global_step=step))
    with pytest.warns(UserWarning, match="looks unreachable for this model"):
        callback._watch(SimpleNamespace(global_step=100))
    callback.geco.constraint_ema = torch.tensor([-0.001])
    callback._watch(SimpleNamespace(global_step=125))
    message = ("GECO: 'reconstruction': its reading came within 1 % of its tolerance at step 150 after all: the "
               "earlier 'looks unreachable' warning is withdrawn.")
    with pytest.warns(UserWarning, match=re.escape(message)):
        callback._watch(SimpleNamespace(global_step=150))
    assert callback.detector.stalls == [None]


def test_lambda_at_its_upper_bound_while_violated_is_a_stall_at_its_second_reading():
    detector = StallDetector(1, window_steps=1000, log_lambda_max=5.0, last_step=2000)
    # One reading has no pace: "it was not falling" would be said of a reading never seen to move.
    assert detector.observe(10, [5.0], [3.0]) == [] and detector.stalls == [None]
    assert detector.observe(20, [5.0], [3.0]) == [0]
    assert detector.stalls[0].at_bound and detector.stalls[0].points == 2
    # Said as it is (it read "lambda rose 1x (148 -> 148) and reached its upper bound over steps 10-10").
    assert detector.stalls[0].describe() == (
        "lambda was at its upper bound (148) at step 20 with the reading 200.0 % past the tolerance; it was not "
        "falling, 1980 are left"
    )


def test_a_run_without_a_last_step_gives_the_reading_a_window_and_says_so():
    # Without max_steps the pace is judged against one more window, which the line named as the steps left.
    detector = StallDetector(1, window_steps=100, log_lambda_max=30.0)
    for step in range(0, 101, 25):
        detector.observe(step, [step / 100 * math.log(5.0)], [1.5 - 0.0005 * step])
    stall = detector.stalls[0]
    assert stall.open_ended and stall.steps_left == 100 and 100 < stall.steps_needed < math.inf
    assert stall.describe().endswith(f"; at that pace it needs {stall.steps_needed:.0f} more steps, more than a window (100)")
    flat = StallDetector(1, window_steps=100, log_lambda_max=30.0)
    for step in range(0, 101, 25):
        flat.observe(step, [step / 100 * math.log(5.0)], [1.3])
    assert flat.stalls[0].describe().endswith("(30.0 % -> 30.0 % past the tolerance); it was not falling")


def test_at_its_bound_a_reading_falling_onto_its_tolerance_in_time_is_no_stall_and_a_fall_withdraws_one():
    # Lambda pinned at a user's bound of 100 from step 50 while the reading falls from 3x towards
    # its tolerance: it was called unreachable at step 50, and stayed so when it ended 3 % past.
    bound = math.log(100.0)
    falling = StallDetector(1, window_steps=200, log_lambda_max=bound, last_step=1000)
    for step in range(25, 1001, 25):
        assert falling.observe(step, [min(bound, 0.1 * step)], [max(3.0 * math.exp(-step / 300), 1.03)]) == []
    assert falling.stalls == [None] and verdict(0.03, falling.stalls[0]) == "not_met"
    # Flat at the bound: a stall at once, and it stands while the reading stays flat...
    plateau = StallDetector(1, window_steps=200, log_lambda_max=bound, last_step=1000)
    found = []
    for step in range(25, 501, 25):
        found += [step] * len(plateau.observe(step, [min(bound, 0.1 * step)], [2.0]))
    assert found == [50] and plateau.stalls[0].at_bound and plateau.stalls[0].steps_needed == math.inf
    # ...until the reading falls again, still at the bound: more quality came, the stall is withdrawn.
    for step in range(525, 1001, 25):
        plateau.observe(step, [bound], [max(2.0 * math.exp(-(step - 500) / 150), 1.03)])
    assert plateau.stalls == [None] and plateau.withdrawn[0].at_bound
    assert plateau.withdrawn_why[0].startswith("at its window's pace it now reaches its tolerance in the steps left")
    # A steady fall too slow to arrive: one stall, kept (not withdrawn at each 5 % and found again).
    slow = StallDetector(1, window_steps=200, log_lambda_max=bound, last_step=1000)
    events = []
    for step in range(25, 1001, 25):
        events += [step] * len(slow.observe(step, [bound], [3.0 * math.exp(-0.001 * step)]))
    assert events == [50] and slow.stalls[0] is not None and slow.withdrawn == [None]


@pytest.mark.parametrize("log_every", [1, 10, 50])
def test_lambda_trend_is_its_rise_over_a_quarter_window_however_sparse_the_logging(log_every):
    # A 500-step run: a 100-step window, a 25-step quarter. Lambda rises 0.4 % a step (ln), so
    # 0.1 per quarter window; with Lightning's default log_every_n_steps=50 one observation fell
    # in the quarter and the trend read 0 ("lambda still rising" never said).
    detector = StallDetector(1, window_steps=100, log_lambda_max=30.0, last_step=500)
    for step in range(log_every, 501, log_every):
        detector.observe(step, [math.log(10.0) + 0.004 * step], [1.3])
    assert detector.lambda_trend(0) == pytest.approx(0.1)
    flat = StallDetector(1, window_steps=100, log_lambda_max=30.0, last_step=500)
    for step in range(log_every, 501, log_every):
        flat.observe(step, [math.log(10.0) + (0.004 * step if step <= 250 else 1.0)], [1.3])
    assert flat.lambda_trend(0) == pytest.approx(0.0)


def test_a_loaded_stall_is_judged_again_only_against_another_plan():
    # A reading falling 0.03 % per step while lambda rises 5x per 100 steps needs ~640 more steps
    # at step 200: with 900 left it is no stall; against the checkpoint's plan (step 300) it is one.
    def history(detector):
        for step in range(0, 201, 10):
            detector.observe(step, [step / 100 * math.log(5.0)], [1.30 * math.exp(-0.0003 * step)])
        return detector

    planned = history(StallDetector(1, window_steps=100, log_lambda_max=30.0, last_step=300))
    stall = planned.stalls[0]
    assert stall is not None and (stall.last_step, stall.steps_left) == (100, 200)
    for last_step, expected in [(300, stall), (1100, None)]:
        resumed = StallDetector(1, window_steps=1, log_lambda_max=30.0)
        resumed.load_state_dict(planned.state_dict())
        resumed.plan(100, last_step)
        assert resumed.stalls[0] == expected and resumed.history == planned.history
    # The same detector planned again (a Trainer fitted again with a later max_steps) too.
    kept = StallDetector(1, window_steps=1, log_lambda_max=30.0)
    kept.plan(100, 300)
    assert history(kept).stalls == [stall]
    kept.plan(100, 1100)
    assert kept.stalls == [None]
    at_bound = StallDetector(1, window_steps=1000, log_lambda_max=5.0, last_step=300)
    at_bound.observe(10, [5.0], [3.0])
    at_bound.observe(20, [5.0], [3.0])
    resumed = StallDetector(1, window_steps=1, log_lambda_max=5.0)
    resumed.load_state_dict(at_bound.state_dict())
    resumed.plan(1000, 100_000)
    # At its bound, with a reading that was not falling, it stands against the new plan too.
    (again,) = resumed.stalls
    assert again is not None and again.at_bound and (again.steps_needed, again.steps_left) == (math.inf, 99_980)
    resumed.forget(0)
    assert (resumed.history, resumed.stalls, resumed.reached, resumed.withdrawn) == ([[]], [None], [None], [None])


def test_verdict_rule():
    stall = Stall(0, 100, 1.0, 5.0, 1.3, 1.29)
    assert verdict(-0.2, None) == "met"
    assert verdict(MET_BAND, stall) == "met"  # a stall along the way, but the tolerance is met in the end
    assert verdict(0.02, None) == "not_met"
    assert verdict(0.02, stall) == "unreachable"
    assert verdict(None, None) == "not_met"


def test_the_former_max_steps_keyword_of_constraint_clause_still_works_and_is_deprecated():
    with pytest.warns(DeprecationWarning, match=r"constraint_clause\(max_steps=\.\.\.\) is now trained_steps=\.\.\."):
        clause = constraint_clause("distortion", 0.0131, 0.01, 0.31, True, "not_met", best=(0.0128, 1400), max_steps=1500)
    assert clause.endswith("this model did not reach it in 1500 steps (best 0.0128 at step 1400)")


def test_verdict_lines_carry_the_figures():
    met = constraint_clause("distortion", 0.00455, 0.005, -0.09, True, "met")
    assert verdict_line([met], 24.71) == "GECO: distortion 0.00455 <= 0.005 (9.0 % better than asked), rate 24.7 nats"
    exact = constraint_clause("distortion", 0.005, 0.005, 0.0, True, "met")  # it read "-0.0 % better"
    assert exact == "distortion 0.005 <= 0.005 (0.0 % better than asked)"
    close = constraint_clause("distortion", 0.01004, 0.01, 0.004, True, "met")
    assert close == "distortion 0.01004 ~ 0.01 (0.4 % past it, within the 1 % band)"
    missed = constraint_clause(
        "distortion", 0.0131, 0.01, 0.31, True, "not_met", lambda_rising=True, best=(0.0128, 1400), trained_steps=1500
    )
    assert missed == (
        "NOT MET: distortion 0.0131 > 0.01 (+31.0 %); lambda still rising at the last step; "
        "this model did not reach it in 1500 steps (best 0.0128 at step 1400)"
    )
    pncc = constraint_clause("pncc", 0.93, 0.94, 0.17, False, "unreachable", stall=Stall(100, 400, 2.0, 9.0, 1.2, 1.18))
    assert pncc.startswith("UNREACHABLE: pncc 0.93 < 0.94 (+17.0 %); lambda rose 4.5x (2 -> 9) over steps 100-400")


def test_a_tolerance_met_by_an_earlier_validation_is_not_called_out_of_reach():
    # The best validation met it (lower or higher is better): the model can; its last steps lost it.
    mse = constraint_clause("distortion", 0.006, 0.005, 0.2, True, "not_met", best=(0.0046, 1000), trained_steps=1500)
    assert mse == "NOT MET: distortion 0.006 > 0.005 (+20.0 %); an earlier validation met it (0.0046 at step 1000), the last did not"
    pncc = constraint_clause("pncc", 0.9, 0.94, 0.667, False, "not_met", best=(0.95, 1000), trained_steps=1500)
    assert pncc.endswith("; an earlier validation met it (0.95 at step 1000), the last did not")
    never = constraint_clause("pncc", 0.9, 0.94, 0.667, False, "not_met", best=(0.93, 1000), trained_steps=1500)
    assert never.endswith("; this model did not reach it in 1500 steps (best 0.93 at step 1000)")
    # Within the verdict's 1 % band past the tolerance: met by its rule, said with the band.
    band = constraint_clause("distortion", 0.006, 0.005, 0.2, True, "not_met", best=(0.00503, 1000), best_met=True)
    assert band.endswith("; an earlier validation met it within the 1 % band (0.00503 at step 1000), the last did not")
    assert constraint_clause("distortion", 0.006, 0.005, 0.2, True, "not_met", best=(0.00503, 1000)).endswith(
        "; this model did not reach it (best 0.00503 at step 1000)")


def test_a_non_finite_or_missing_reading_is_said_so_and_an_unreachable_verdict_keeps_its_word():
    nan = constraint_clause("distortion", math.nan, 0.005, math.nan, True, verdict(math.nan, None))
    assert nan == "NOT MET: distortion nan (not a finite reading; asked <= 0.005)"
    stall = Stall(100, 400, 2.0, 9.0, 1.2, 1.18)
    missing = constraint_clause("distortion", None, 0.005, None, True, verdict(None, stall), stall=stall)
    # verdict() says unreachable (the stall was seen in training), and so does the line.
    assert missing.startswith("distortion: UNREACHABLE: no validation reading (validation never ran")
    assert "; lambda rose 4.5x (2 -> 9) over steps 100-400" in missing


def test_the_line_shows_the_standard_error_only_where_the_verdict_is_within_the_noise():
    # 2.6 % under with a standard error of 2.3 %: 3.6 % from the band's edge, within 2 standard errors
    noisy_met = constraint_clause("distortion", 0.01949, 0.02, -0.026, True, "met", standard_error=0.023)
    assert noisy_met == "distortion 0.01949 <= 0.02 (2.6 % ± 2.3 % better than asked)"
    noisy_miss = constraint_clause("class_cross_entropy", 0.177, 0.15, 0.18, True, "not_met", standard_error=0.091)
    assert noisy_miss == "NOT MET: class_cross_entropy 0.177 > 0.15 (+18.0 % ± 9.1 %)"
    # far from the edge (6.5 % under, 7.5 % from it, at 3.5 standard errors): the verdict stands as it is
    clear = constraint_clause("distortion", 0.004675, 0.005, -0.065, True, "met", standard_error=0.0215)
    assert clear == "distortion 0.004675 <= 0.005 (6.5 % better than asked)"
    assert not within_noise(-0.065, 0.0215) and within_noise(-0.065, 0.0385)
    assert not within_noise(0.3, None) and not within_noise(0.3, math.nan)


# ---------------------------------------------------------------------------------------------
# Small real runs, each built to end one way.


def _images(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 16, 16, generator=g) > 0.7).float()


def _run(tmp_path, tolerance, max_steps, log_every_n_steps=1, ckpt_path=None, save_to=None, **callback_kwargs):
    pl.seed_everything(0)
    summary = RunSummary()
    geco = GECOCallback(controller="pi", **callback_kwargs)
    trainer = quiet_trainer(
        max_steps=max_steps,
        log_every_n_steps=log_every_n_steps,
        val_check_interval=max_steps,
        check_val_every_n_epoch=None,
        callbacks=[geco, summary],
        default_root_dir=tmp_path,
    )
    train = DataLoader(TensorDataset(_images()), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(_images(64, seed=1)), batch_size=64)
    trainer.fit(tiny_conv_vae(tolerance=tolerance), train, val, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return json.loads(summary.path.read_text()), summary, geco


def test_a_generous_tolerance_ends_met(tmp_path):
    summary, callback, _ = _run(tmp_path, tolerance=0.4, max_steps=20)
    assert summary["verdict"] == "met"
    assert callback.verdict_line.startswith("GECO: distortion ") and "better than asked" in callback.verdict_line


def test_a_reachable_tolerance_with_too_few_steps_ends_not_met(tmp_path):
    summary, callback, geco = _run(tmp_path, tolerance=0.12, max_steps=4)
    assert summary["relative_violation"] > MET_BAND
    assert summary["verdict"] == "not_met"
    assert geco.detector.stalls == [None]
    assert callback.verdict_line.startswith("GECO: NOT MET: distortion ")
    assert "; this model did not reach it in 4 steps (best " in callback.verdict_line


def test_a_run_stopped_early_names_the_steps_it_trained_not_the_planned_ones(tmp_path):
    class StopAtThree(pl.Callback):  # as max_time or an early-stopping callback would
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trainer.should_stop = trainer.global_step >= 3

    pl.seed_everything(0)
    summary = RunSummary()
    trainer = quiet_trainer(max_steps=40, callbacks=[GECOCallback(), StopAtThree(), summary], default_root_dir=tmp_path)
    train = DataLoader(TensorDataset(_images()), batch_size=32, shuffle=True)
    trainer.fit(tiny_conv_vae(tolerance=0.12), train, DataLoader(TensorDataset(_images(64, seed=1)), batch_size=64))
    assert trainer.global_step == 3 and summary.summary["validated_step"] == 3
    assert "; this model did not reach it in 3 steps (best " in summary.verdict_line, summary.verdict_line


def test_an_impossible_tolerance_is_called_unreachable_during_the_run(tmp_path):
    # Random pixels: no 4-dimensional code reconstructs them, so the MSE stays near their
    # variance (~0.2) whatever lambda does. Lambda rises at most 0.006 per step (the integrator's
    # clipped error), so 4x takes ~230 steps: the window is 280 of the 400 steps.
    checkpoint = tmp_path / "end.ckpt"
    with pytest.warns(UserWarning, match="looks unreachable for this model: lambda rose"):
        summary, callback, geco = _run(
            tmp_path, tolerance=1e-5, max_steps=400, log_every_n_steps=10, stall_window=0.7, save_to=checkpoint
        )
    assert summary["verdict"] == "unreachable"
    stall = geco.detector.stalls[0]
    assert stall.last_step < 399  # said before the end of the run
    assert callback.verdict_line.startswith("GECO: UNREACHABLE: distortion ")
    # Had an earlier validation met it, the tolerance is reachable: not_met, and the line says so.
    from types import SimpleNamespace

    callback._history.insert(0, (200, {"distortion": 5e-6}))
    fields = callback._geco_fields(SimpleNamespace(callbacks=[geco], global_step=400))
    callback._history.pop(0)
    assert fields["verdict"] == "not_met"
    assert fields["verdict_line"].startswith("GECO: NOT MET: distortion ")
    assert "; an earlier validation met it (5e-06 at step 200), the last did not" in fields["verdict_line"]
    assert "lambda rose" not in fields["verdict_line"]
    # Met by the verdict's rule, within its 1 % band, counts too (it was read as never reached).
    callback._history.insert(0, (200, {"distortion": 1.005e-5}))
    fields = callback._geco_fields(SimpleNamespace(callbacks=[geco], global_step=400))
    callback._history.pop(0)
    assert fields["verdict"] == "not_met" and "lambda rose" not in fields["verdict_line"]
    assert "; an earlier validation met it within the 1 % band (1.005e-05 at step 200), the last did not" in fields["verdict_line"]
    # Resumed with no step left to train, the run says so and reports the checkpoint's figures
    # and verdict (it printed "NOT MET: no validation reading" before).
    with pytest.warns(UserWarning, match=r"This fit trained no step: it resumed from \S+end.ckpt at step 400, where max_steps=400 ends it already; the figures are the last validation before it \(step 400\)\. To train on, raise max_steps"):
        again, again_summary, again_geco = _run(
            tmp_path / "again", tolerance=1e-5, max_steps=400, log_every_n_steps=10, stall_window=0.7, ckpt_path=checkpoint
        )
    assert again_summary.verdict_line == callback.verdict_line
    assert again_geco.detector.window_steps == geco.detector.window_steps == 280  # the checkpoint's plan
    assert {k: again[k] for k in ("distortion", "rate", "verdict", "validated_step")} == {
        k: summary[k] for k in ("distortion", "rate", "verdict", "validated_step")
    }
    # Extended by 10 steps from its checkpoint, the run keeps the evidence (a fresh detector
    # would have 10 steps of history and call the same run not_met), judged again against the
    # new last step: at the latest observation before the checkpoint (the last step's), with
    # 410 - 399 steps left, over a window of 0.7 * 410 steps.
    resumed, _, resumed_geco = _run(
        tmp_path / "resumed", tolerance=1e-5, max_steps=410, log_every_n_steps=10, stall_window=0.7, ckpt_path=checkpoint
    )
    assert resumed_geco.detector.history[0][: len(geco.detector.history[0])] == geco.detector.history[0]
    restated = resumed_geco.detector.stalls[0]
    assert restated.last_step == geco.detector.history[0][-1][0] == 399 and restated.steps_left == 11
    assert restated.first_step == 109 and stall.steps_left == 400 - stall.last_step
    assert resumed["verdict"] == "unreachable"
    # Resumed towards another tolerance, the evidence (readings over the old one) is dropped.
    with pytest.warns(UserWarning, match="now asks for distortion at 0.4"):
        changed, _, changed_geco = _run(
            tmp_path / "changed", tolerance=0.4, max_steps=410, log_every_n_steps=10, stall_window=0.7, ckpt_path=checkpoint
        )
    assert changed_geco.detector.stalls == [None] and [h[0] for h in changed_geco.detector.history[0]] == [409]
    assert changed["verdict"] != "unreachable"


def test_the_stall_window_is_a_share_of_the_planned_steps_also_under_max_epochs(tmp_path):
    # 256 images in batches of 32: 8 steps an epoch; 5 epochs plan 40 steps, and 20 % of them is 8.
    pl.seed_everything(0)
    geco = GECOCallback()
    trainer = quiet_trainer(max_epochs=5, limit_val_batches=0, callbacks=[geco])
    trainer.fit(tiny_conv_vae(tolerance=0.1), DataLoader(TensorDataset(_images()), batch_size=32))
    assert (geco.detector.window_steps, geco.detector.last_step) == (8, 40)


def test_the_summary_gives_the_standard_error_of_the_final_validation_reading(tmp_path, monkeypatch):
    # Record the per-image distortions the final validation reads, and compare the summary's
    # standard error with the sample formula over them.
    seen = []
    original = ReconstructionMSE.readings

    def recording(self, output):
        readings = original(self, output)
        seen.append(readings["distortion"].detach().double())
        return readings

    monkeypatch.setattr(ReconstructionMSE, "readings", recording)
    summary, _, _ = _run(tmp_path, tolerance=0.4, max_steps=6)
    final = seen[-1]  # the 64 validation images are one batch; the last validation is the final one
    assert final.numel() == 64
    assert summary["distortion"] == pytest.approx(final.mean().item(), rel=1e-5)
    assert summary["standard_error"] == pytest.approx((final.std(unbiased=True) / 8.0).item(), rel=1e-4)


def test_the_standard_error_follows_an_objective_replaced_after_construction(tmp_path):
    model = tiny_conv_vae(tolerance=0.4)
    model.objective = GECOObjective([PatchNCC(0.5, patch_size=5)])  # no MSE constraint any more
    trainer = quiet_trainer(default_root_dir=tmp_path)
    val = DataLoader(TensorDataset(_images(64, seed=1)), batch_size=32)
    logged = trainer.validate(model, val, verbose=False)[0]
    assert logged["val/pncc/standard_error"] > 0
    assert "val/distortion/standard_error" not in logged


def test_the_relative_standard_error_is_in_units_of_each_constraints_scale():
    # An MSE stated in dB is still read in MSE: the standard error over the tolerance in MSE.
    psnr = ReconstructionMSE(20.0, unit="psnr")
    assert _relative_standard_error(psnr, 0.0005) == pytest.approx(0.0005 / psnr.tolerance_mse)
    # pNCC (higher is better) is scaled by 1 - minimum: 0.01 of NCC at minimum 0.9 is 10 %.
    assert _relative_standard_error(PatchNCC(0.9), 0.01) == pytest.approx(0.1)
    assert _relative_standard_error(psnr, None) is None and _relative_standard_error(psnr, math.nan) is None


class _ValidationSteps(pl.Callback):
    """The optimizer steps at which validation ran (sanity check excluded)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)


def _fit_every_third_epoch(tmp_path, train, callbacks=(), **limits):
    """A fit that validates every third epoch (8 batches of 32 an epoch with ``_images()``)."""
    pl.seed_everything(0)
    summary, seen = RunSummary(), _ValidationSteps()
    trainer = quiet_trainer(
        **limits, check_val_every_n_epoch=3, num_sanity_val_steps=0,
        callbacks=[GECOCallback(), summary, seen, *callbacks], default_root_dir=tmp_path,
    )
    val = DataLoader(TensorDataset(_images(64, seed=1)), batch_size=64)
    trainer.fit(tiny_conv_vae(tolerance=0.4), train, val)
    return trainer, summary, seen


class _Stream(torch.utils.data.IterableDataset):
    """The same 256 images as a stream: a loader without a length."""

    def __iter__(self):
        return iter([(image,) for image in _images()])


@pytest.mark.parametrize(
    ("limits", "validated_at"),
    [
        ({"max_steps": 12}, [12]),  # ends in epoch 2 of 3: Lightning would never validate
        ({"max_epochs": 4}, [24, 32]),  # after epoch 3, and at the end of epoch 4
        ({"max_steps": 6, "accumulate_grad_batches": 2}, [6]),  # 4 optimizer steps an epoch
    ],
)
def test_the_summary_validates_the_last_step_in_an_epoch_check_val_every_n_epoch_skips(tmp_path, limits, validated_at):
    # Without it the summary reports a model up to 2 epochs older than the one trained, or none
    # (the README's own-model example reported step 1200 of 1500 so).
    train = DataLoader(TensorDataset(_images()), batch_size=32, shuffle=True)
    trainer, summary, seen = _fit_every_third_epoch(tmp_path, train, **limits)
    assert seen.steps == validated_at and trainer.global_step == validated_at[-1]
    written = json.loads(summary.path.read_text())
    assert written["validated_step"] == written["global_step"] == validated_at[-1]
    assert "validated at step" not in written["verdict_line"]
    assert trainer.check_val_every_n_epoch == 3  # the Trainer's own setting, back after the fit


def test_the_summary_validates_the_last_step_of_a_loader_without_a_length(tmp_path):
    trainer, summary, seen = _fit_every_third_epoch(tmp_path, DataLoader(_Stream(), batch_size=32), max_epochs=4)
    assert seen.steps == [24, 32] and summary.summary["validated_step"] == 32


def test_a_fit_that_raises_in_its_last_validation_leaves_the_trainer_as_it_was(tmp_path):
    class FailOnLastValidation(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            if trainer.global_step == 12:
                raise RuntimeError("the last validation failed")

    train = DataLoader(TensorDataset(_images()), batch_size=32, shuffle=True)
    summary = RunSummary()
    trainer = quiet_trainer(max_steps=12, check_val_every_n_epoch=3, num_sanity_val_steps=0,
                            callbacks=[GECOCallback(), summary, FailOnLastValidation()], default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="the last validation failed"):
        trainer.fit(tiny_conv_vae(tolerance=0.4), train, DataLoader(TensorDataset(_images(64, seed=1)), batch_size=64))
    assert trainer.check_val_every_n_epoch == 3 and summary._check_val_every_n_epoch is None
    # The folder's summary.json says so: a fit before it in this folder (logger=False) left its
    # own, which read as this fit's verdict.
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == {
        "verdict": None, "error": "RuntimeError: the last validation failed", "validated_step": 12, "global_step": 12,
        "wall_clock_seconds": written["wall_clock_seconds"], "path": str((tmp_path / "summary.json").resolve()),
    }


def test_a_fit_whose_data_fails_to_set_up_replaces_the_folders_earlier_summary(tmp_path):
    # The DataModule sets up before any callback, so the failure reaches RunSummary before its fit
    # started: the summary an earlier fit left in the folder (logger=False) read as this one's.
    class MissingFiles(pl.LightningDataModule):
        def setup(self, stage):
            raise FileNotFoundError("no train-images-idx3-ubyte")

    (tmp_path / "summary.json").write_text(json.dumps({"verdict": "met", "validated_step": 1500}))
    summary = RunSummary()
    summary._history = [(1500, {"distortion": 0.004})]  # an earlier fit's, in this callback
    trainer = quiet_trainer(max_steps=4, callbacks=[GECOCallback(), summary], default_root_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no train-images"):
        trainer.fit(tiny_conv_vae(tolerance=0.4), datamodule=MissingFiles())
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == {
        "verdict": None, "error": "FileNotFoundError: no train-images-idx3-ubyte", "validated_step": None,
        "global_step": 0, "wall_clock_seconds": 0.0, "path": str((tmp_path / "summary.json").resolve()),
    }


def test_an_error_after_the_fit_ended_keeps_its_summary(tmp_path):
    # A later callback's on_fit_end raising: the fit's summary stands (a failure summary with no
    # verdict and 0 seconds replaced it).
    class FailsAfterTheEnd(pl.Callback):
        def on_fit_end(self, trainer, pl_module):
            raise RuntimeError("a later callback failed")

    summary = RunSummary()
    trainer = quiet_trainer(max_steps=2, callbacks=[GECOCallback(), summary, FailsAfterTheEnd()], default_root_dir=tmp_path)
    loader = DataLoader(TensorDataset(_images()), batch_size=32)
    with pytest.raises(RuntimeError, match="a later callback failed"):
        trainer.fit(tiny_conv_vae(tolerance=0.4), loader, loader)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["verdict"] in ("met", "not_met") and written["validated_step"] == 2 and "error" not in written


def test_a_key_an_earlier_validation_logged_is_not_reported_as_the_last_ones(tmp_path):
    # Lightning's callback_metrics keeps every key of the fit: a metric a module logs at its first
    # validation only (an expensive one, every Nth) was written to summary.json as the last one's.
    class FirstValidationOnly(ConvVAE):
        def on_validation_epoch_end(self):
            super().on_validation_epoch_end()
            if self.global_step == 4:
                self.log("val/expensive", 0.25)

    summary = RunSummary()
    trainer = quiet_trainer(max_steps=8, val_check_interval=4, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                            callbacks=[GECOCallback(), summary], default_root_dir=tmp_path)
    loader = DataLoader(TensorDataset(_images()), batch_size=32)
    trainer.fit(tiny_conv_vae(tolerance=0.4, model_class=FirstValidationOnly), loader, loader)
    assert [(step, "expensive" in readings) for step, readings in summary._history] == [(4, True), (8, False)]
    written = json.loads(summary.path.read_text())
    assert written["validated_step"] == 8 and "expensive" not in written and written["distortion"] > 0


def test_a_fit_without_validation_is_told_up_front_that_its_verdict_has_nothing_to_read(tmp_path):
    summary = RunSummary()
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[GECOCallback(), summary], default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match=re.escape("RunSummary: this fit runs no validation (no validation loader, "
                                                   "limit_val_batches=0, or no validation_step)")):
        trainer.fit(tiny_conv_vae(tolerance=0.4), DataLoader(TensorDataset(_images()), batch_size=32))
    assert "no validation reading" in summary.verdict_line


def test_a_verdict_of_an_older_validation_names_its_step(tmp_path):
    # The validation loop turned off after the first validation (step 4 of 6): the last figures
    # are of step 4, and the line says so rather than pass them off as the trained model's.
    class TurnOffValidation(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                trainer.limit_val_batches = 0

    pl.seed_everything(0)
    summary = RunSummary()
    trainer = quiet_trainer(
        max_steps=6, val_check_interval=4, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        callbacks=[GECOCallback(), summary, TurnOffValidation()], default_root_dir=tmp_path,
    )
    train = DataLoader(TensorDataset(_images()), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(_images(64, seed=1)), batch_size=64)
    trainer.fit(tiny_conv_vae(tolerance=0.4), train, val)
    written = json.loads(summary.path.read_text())
    assert (written["validated_step"], written["global_step"]) == (4, 6)
    assert written["verdict_line"].endswith(" (validated at step 4; the run ended at step 6)")
    assert summary.verdict_line == written["verdict_line"]


@pytest.mark.parametrize("logger", ["csv", None])
def test_the_run_folder_is_found_without_a_collective(tmp_path, logger):
    # Only rank 0 asks (for summary.json and the saved config); trainer.log_dir broadcasts,
    # which under DDP waits for ranks that never call it.
    trainer = quiet_trainer(logger=CSVLogger(tmp_path) if logger else False, default_root_dir=tmp_path / "root")
    expected = trainer.log_dir  # one process: the broadcast returns its input

    def no_collective(*args, **kwargs):
        raise AssertionError("run_directory called a collective")

    trainer.strategy.broadcast = no_collective  # type: ignore[method-assign]
    assert run_directory(trainer) == Path(expected)


def test_a_fast_dev_run_writes_no_summary_file(tmp_path, monkeypatch):
    # Lightning writes no logs or checkpoints under fast_dev_run; summary.json used to land in the
    # current folder (default_root_dir).
    monkeypatch.chdir(tmp_path)
    summary = RunSummary()
    trainer = pl.Trainer(fast_dev_run=True, accelerator="cpu", callbacks=[GECOCallback(), summary],
                         enable_progress_bar=False, enable_model_summary=False)
    train = DataLoader(TensorDataset(_images()), batch_size=32)
    trainer.fit(tiny_conv_vae(), train, DataLoader(TensorDataset(_images(64, seed=1)), batch_size=64))
    assert summary.path is None and summary.verdict_line.startswith("GECO: ")
    assert summary.verdict_line.endswith(" (fast_dev_run: 1 step, a smoke test)")  # not a trained model's verdict
    assert list(tmp_path.iterdir()) == []


def test_a_fit_told_to_take_no_training_batch_says_so():
    trainer = quiet_trainer(max_steps=4, limit_train_batches=0, callbacks=[GECOCallback(), RunSummary()])
    with pytest.raises(ValueError, match=re.escape("Trainer(limit_train_batches=0) runs no training step: set it > 0 to train.")):
        trainer.fit(tiny_conv_vae(), DataLoader(TensorDataset(_images()), batch_size=32))


def test_an_error_outside_a_fit_adds_no_seconds_to_the_run():
    # A test that raised an hour after a 60-second fit (a folder has no test split) set the run's
    # seconds to 3660, and a fit after it went on from there.
    from types import SimpleNamespace

    summary = RunSummary()
    summary._ended_seconds, summary._start = 60.0, time.monotonic() - 3600.0
    from pytorch_lightning.trainer.states import TrainerFn

    summary.on_exception(SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.TESTING)), None, ValueError("no test split"))
    assert summary._ended_seconds == 60.0
    summary.on_fit_start(SimpleNamespace(), None)  # a fit interrupted (Ctrl-C) does count
    summary._earlier_seconds, summary._start = 60.0, time.monotonic() - 30.0
    summary.on_exception(SimpleNamespace(), None, KeyboardInterrupt())
    assert summary._ended_seconds == pytest.approx(90.0, abs=1.0)


def test_a_trainer_fitted_again_with_no_step_left_keeps_its_verdict(tmp_path):
    pl.seed_everything(0)
    summary, geco = RunSummary(), GECOCallback()
    trainer = quiet_trainer(max_steps=4, callbacks=[geco, summary], default_root_dir=tmp_path)
    model = tiny_conv_vae(tolerance=0.12)
    train = DataLoader(TensorDataset(_images()), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(_images(64, seed=1)), batch_size=64)
    trainer.fit(model, train, val)
    first, detector, seconds = summary.verdict_line, geco.detector, summary.summary["wall_clock_seconds"]
    time.sleep(0.2)  # a notebook's pause between the fits, not the run's time
    # As in a notebook: the same Trainer, fit again (it said "NOT MET: no validation reading").
    with pytest.warns(UserWarning, match=r"This fit trained no step: it started at step 4, where max_steps=4 ends it already; "
                      r"the figures are the last validation before it \(step 4\)"):
        start = time.monotonic()
        trainer.fit(model, train, val)
        second_fit = time.monotonic() - start
    assert summary.verdict_line == first and first.startswith("GECO: NOT MET: distortion ")
    # The run's seconds go on from the first fit's (they were the second fit's alone).
    assert seconds < summary.summary["wall_clock_seconds"] <= seconds + second_fit + 1e-3
    assert geco.detector is detector
    # Another model on the same Trainer is not the first one's run: none of its figures or evidence.
    with pytest.warns(UserWarning, match=r"it started at step 4, where max_steps=4 ends it already; no validation of this "
                      r"model is recorded"):
        trainer.fit(tiny_conv_vae(tolerance=0.12), train, val)
    assert geco.detector is not detector and summary.verdict_line.startswith("GECO: distortion: NOT MET: no validation reading")


def test_summary_json_holds_null_for_a_non_finite_number_at_any_depth(tmp_path):
    # json.dumps writes NaN / Infinity, which strict JSON readers refuse.
    from types import SimpleNamespace

    trainer = SimpleNamespace(is_global_zero=True, fast_dev_run=False, loggers=[], default_root_dir=str(tmp_path))
    summary = {
        "distortion": math.nan, "lambda": [1.5, math.inf], "relative_violation": {"a": -math.inf, "b": 0.25}, "steps": 3,
    }
    path = RunSummary._write(trainer, "summary.json", summary, "final")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    written = json.loads(text)
    assert written["distortion"] is None and written["lambda"] == [1.5, None]
    assert written["relative_violation"] == {"a": None, "b": 0.25} and written["steps"] == 3


def test_a_fit_in_a_spawned_worker_logs_its_verdict_and_the_callers_summary_says_where_it_went(tmp_path, caplog):
    # Under ddp_spawn / ddp_notebook the fit runs on a pickled copy in a worker process; the
    # caller's RunSummary stayed empty and print(summary.verdict_line) printed "" with no word.
    with pytest.warns(UserWarning, match=re.escape("RunSummary.verdict_line: no fit has ended in this process")):
        assert RunSummary().verdict_line == ""
    worker = RunSummary()
    worker._made_in_process = -1  # what a copy unpickled in another process sees
    trainer = quiet_trainer(max_steps=2, val_check_interval=2, callbacks=[GECOCallback(), worker], default_root_dir=tmp_path)
    with caplog.at_level("INFO"):
        trainer.fit(tiny_conv_vae(), DataLoader(TensorDataset(_images(32)), batch_size=16),
                    DataLoader(TensorDataset(_images(16, seed=1)), batch_size=16))
    assert f"{worker.verdict_line}\nsummary: {tmp_path / 'summary.json'}" in caplog.text
    assert worker.verdict_line.startswith("GECO: ")
    # In the process that made it, nothing more is logged (train.py prints the line itself).
    caplog.clear()
    here = RunSummary()
    trainer = quiet_trainer(max_steps=2, val_check_interval=2, callbacks=[GECOCallback(), here], default_root_dir=tmp_path)
    with caplog.at_level("INFO"):
        trainer.fit(tiny_conv_vae(), DataLoader(TensorDataset(_images(32)), batch_size=16),
                    DataLoader(TensorDataset(_images(16, seed=1)), batch_size=16))
    assert here.verdict_line not in caplog.text


def test_a_fit_stopped_before_its_plan_says_so_in_its_line():
    # max_time or an early stop ends the fit short of its planned steps: the line read as if the
    # model had had them all (its cosine schedule and lambda's catch-up had not run to their end).
    class StopAt3(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.global_step >= 3

    summary = RunSummary()
    trainer = quiet_trainer(max_steps=8, val_check_interval=2, callbacks=[GECOCallback(), summary, StopAt3()])
    trainer.fit(tiny_conv_vae(), DataLoader(TensorDataset(_images(64)), batch_size=8),
                DataLoader(TensorDataset(_images(16, seed=1)), batch_size=16))
    assert trainer.global_step == 3 and "(the fit stopped at step 3 of 8 planned)" in summary.verdict_line
    full = RunSummary()
    quiet_trainer(max_steps=4, val_check_interval=2, callbacks=[GECOCallback(), full]).fit(
        tiny_conv_vae(), DataLoader(TensorDataset(_images(64)), batch_size=8),
        DataLoader(TensorDataset(_images(16, seed=1)), batch_size=16))
    assert "stopped" not in full.verdict_line


def test_a_finished_segment_clears_the_error_an_interrupted_one_left_in_the_wandb_summary(tmp_path):
    # Ctrl-C wrote summary/error into the W&B run's summary; the resumed run (same id) finished
    # and updated its own keys, and the dashboard showed a finished run with an error.
    from types import SimpleNamespace

    from pytorch_lightning.loggers import WandbLogger

    logger = object.__new__(WandbLogger)
    logger._experiment = SimpleNamespace(summary={}, dir=str(tmp_path))
    trainer = SimpleNamespace(is_global_zero=True, fast_dev_run=False, loggers=[logger])
    RunSummary._write(trainer, "summary.json", {"verdict": None, "error": "KeyboardInterrupt"}, "summary")
    assert logger._experiment.summary["summary/error"] == "KeyboardInterrupt"
    RunSummary._write(trainer, "summary.json", {"verdict": "met", "distortion": 0.0049}, "summary")
    assert logger._experiment.summary["summary/error"] is None and logger._experiment.summary["summary/verdict"] == "met"
    assert "error" not in json.loads((tmp_path / "summary.json").read_text())

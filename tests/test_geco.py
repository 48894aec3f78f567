import copy
import math
import re

import pytest
import torch

from helpers import geco_snapshot
from lightning_geco.controllers import Algorithm1, PIController
from lightning_geco.geco import GECO, mse_to_psnr, psnr_to_mse
from lightning_geco.metrics import compiler_available


def test_psnr_mse_conversion():
    assert psnr_to_mse(20.0) == pytest.approx(0.01)
    assert mse_to_psnr(0.001) == pytest.approx(30.0)
    assert mse_to_psnr(psnr_to_mse(17.3)) == pytest.approx(17.3)


def test_starts_at_lambda_one_and_first_update_seeds_the_moving_average():
    geco = GECO(["a", "b"], alpha=0.9, step_size=0.5)
    assert geco.lagrange_multiplier.tolist() == [1.0, 1.0]
    assert not geco.seeded
    values = torch.tensor([[0.2, -0.4], [0.4, -0.2]])
    geco.constraint_term(values)
    assert geco.update(geco.pending_statistics())
    # Seeded with the first batch mean (no blending with the zero initial value).
    assert geco.constraint_ema.tolist() == pytest.approx([0.3, -0.3])
    assert geco.log_lagrange_multiplier.tolist() == pytest.approx([0.15, -0.15])
    assert geco.seeded and geco.num_updates == 1


def test_moving_average_and_log_space_update_follow_algorithm_1():
    alpha, nu = 0.8, 0.3
    geco = GECO(["c"], alpha=alpha, step_size=nu)
    ema, log_lam = None, 0.0
    for c_hat in [0.5, 0.1, -0.2, 0.05, -0.3]:
        geco.constraint_term(torch.full((4, 1), c_hat))
        geco.update(geco.pending_statistics())
        ema = c_hat if ema is None else alpha * ema + (1 - alpha) * c_hat
        log_lam += nu * ema
        assert geco.constraint_ema.item() == pytest.approx(ema, abs=1e-6)
        assert geco.lagrange_multiplier.item() == pytest.approx(math.exp(log_lam), rel=1e-5)


def test_release_speedup_multiplies_only_the_steps_that_lower_lambda():
    geco = GECO(["rises", "falls"], alpha=0.0, step_size=0.5, release_speedup=4.0)
    geco.update(torch.tensor([0.2, -0.2, 1.0, 0.0]))  # sums, count, nonfinite
    assert geco.log_lagrange_multiplier.tolist() == pytest.approx([0.5 * 0.2, -4.0 * 0.5 * 0.2])


def test_max_increase_bounds_how_far_lambda_rises_in_one_update_and_never_how_far_it_falls():
    geco = GECO(["far_over", "a_little_over", "met"], alpha=0.0, step_size=1.0, max_increase=0.05)
    geco.update(torch.tensor([3.0, 0.02, -3.0, 1.0, 0.0]))
    assert geco.log_lagrange_multiplier.tolist() == pytest.approx([0.05, 0.02, -3.0])
    with pytest.raises(ValueError, match=re.escape("GECO max_increase must be positive (one number, or one per constraint: 1) or None, got 0.0.")):
        GECO(["c"], max_increase=0.0)


def test_loss_value_is_the_moving_average_and_gradient_is_the_batch_gradient():
    geco = GECO(["c"], alpha=0.9)
    geco.constraint_term(torch.full((3, 1), 0.5))
    geco.update(geco.pending_statistics())  # ema = 0.5
    theta = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    per_example = (theta**2 / 10).unsqueeze(1)  # batch mean 14/30
    term = geco.constraint_term(per_example)
    expected_value = 0.9 * 0.5 + 0.1 * (14 / 30)
    assert term.item() == pytest.approx(expected_value, rel=1e-6)
    term.sum().backward()
    # d/dtheta of mean(theta^2 / 10) = 2 theta / 30
    assert theta.grad.tolist() == pytest.approx([2 / 30, 4 / 30, 6 / 30], rel=1e-6)


@pytest.mark.parametrize("sign, direction", [(1.0, 1), (-1.0, -1), (0.0, 0)])
def test_lambda_rises_when_violated_falls_when_satisfied_and_holds_at_zero(sign, direction):
    geco = GECO(["c"], alpha=0.5, step_size=1.0)
    previous = geco.lagrange_multiplier.item()
    for _ in range(5):
        geco.constraint_term(torch.full((2, 1), 0.1 * sign))
        geco.update(geco.pending_statistics())
        current = geco.lagrange_multiplier.item()
        if direction > 0:
            assert current > previous
        elif direction < 0:
            assert current < previous
        else:
            assert current == previous == 1.0
        previous = current


def test_log_lambda_bounds_keep_exp_finite_and_positive():
    geco = GECO(["c"], alpha=0.0, step_size=1e6, log_lambda_bounds=(-5.0, 7.0))
    geco.constraint_term(torch.full((1, 1), 1e30))
    geco.update(geco.pending_statistics())
    assert geco.log_lagrange_multiplier.item() == 7.0
    assert math.isfinite(geco.lagrange_multiplier.item())
    geco.constraint_term(torch.full((1, 1), -1e30))
    geco.update(geco.pending_statistics())
    assert geco.log_lagrange_multiplier.item() == -5.0
    assert geco.lagrange_multiplier.item() > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_skip_the_update_and_leave_the_state_intact(bad):
    geco = GECO(["c"], alpha=0.9, step_size=1.0)
    geco.constraint_term(torch.full((2, 1), 0.2))
    geco.update(geco.pending_statistics())
    before = geco_snapshot(geco)
    geco.constraint_term(torch.tensor([[0.1], [bad]]))
    assert not geco.update(geco.pending_statistics())
    after = geco_snapshot(geco)
    assert torch.equal(before["log_lagrange_multiplier"], after["log_lagrange_multiplier"])
    assert torch.equal(before["constraint_ema"], after["constraint_ema"])
    assert after["num_updates"] == 1 and after["num_skipped_updates"] == 1
    # The next finite batch updates normally from the untouched state.
    geco.constraint_term(torch.full((2, 1), 0.2))
    assert geco.update(geco.pending_statistics())
    assert torch.isfinite(geco.lagrange_multiplier).all()


def test_non_finite_loss_flag_skips_the_update():
    geco = GECO(["c"])
    geco.constraint_term(torch.full((2, 1), 0.2))
    geco.record_loss(torch.tensor(float("nan")))
    assert not geco.update(geco.pending_statistics())
    assert not geco.seeded


def test_micro_batches_accumulate_into_one_update():
    whole, parts = GECO(["c"], alpha=0.5), GECO(["c"], alpha=0.5)
    data = torch.tensor([[0.1], [0.3], [0.5], [0.9]])
    whole.constraint_term(data)
    parts.constraint_term(data[:1])
    parts.constraint_term(data[1:])
    torch.testing.assert_close(whole.pending_statistics(), parts.pending_statistics())
    whole.update(whole.pending_statistics())
    parts.update(parts.pending_statistics())
    assert parts.num_updates == 1
    torch.testing.assert_close(whole.log_lagrange_multiplier, parts.log_lagrange_multiplier)


def test_state_stays_fp32_under_autocast():
    geco = GECO(["c"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = torch.full((4, 1), 0.25, dtype=torch.bfloat16)
        term = geco.constraint_term(values)
        geco.update(geco.pending_statistics())
    assert term.dtype == torch.float32
    assert geco.lagrange_multiplier.dtype == torch.float32
    assert geco.constraint_ema.dtype == torch.float32


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.float16)])
def test_the_multiplier_state_is_moved_but_never_cast(cast):
    # The -true precisions call module.to(dtype): in bf16, log lambda near 3 moves in steps of
    # 0.016, larger than an update's, so lambda froze; in fp16, exp overflowed past log lambda 11.
    from lightning_geco.geco import MultiplierState

    state = MultiplierState(2, initial_lambda=3.0)
    state.log_lagrange_multiplier[1] = 11.5
    before = state.log_lagrange_multiplier.clone()
    cast(state)
    assert state.log_lagrange_multiplier.dtype == state.constraint_ema.dtype == torch.float32
    assert state.seeded.dtype == torch.bool
    assert torch.equal(state.log_lagrange_multiplier, before)  # not rounded on the way
    assert torch.isfinite(state.lagrange_multiplier).all()


def test_the_multiplier_state_is_fp32_when_built_under_another_default_dtype():
    # Lightning's -true precisions build the module under their dtype (trainer.init_module()).
    from lightning_geco.geco import MultiplierState

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        state = MultiplierState(1, initial_lambda=3.0)
    finally:
        torch.set_default_dtype(default)
    assert state.log_lagrange_multiplier.dtype == state.constraint_ema.dtype == torch.float32
    assert state.log_lagrange_multiplier.item() == torch.tensor(math.log(3.0)).item()


def test_state_dict_round_trip_and_incompatible_names():
    geco = GECO(["a", "b"], alpha=0.5)
    geco.constraint_term(torch.tensor([[0.1, -0.2]]))
    geco.update(geco.pending_statistics())
    restored = GECO(["a", "b"], alpha=0.5)
    restored.state.load_state_dict(geco.state.state_dict())
    restored.load_state_dict(geco.state_dict())
    assert torch.equal(restored.log_lagrange_multiplier, geco.log_lagrange_multiplier)
    assert restored.seeded and restored.num_updates == 1
    with pytest.raises(ValueError, match=r"holds constraints \['a', 'b'\], but this model has \['a'\]"):
        GECO(["a"]).load_state_dict(geco.state_dict())


def test_skips_in_a_row_are_counted_reset_by_a_valid_update_and_saved():
    geco = GECO(["a"], alpha=0.5)
    counts = []
    for value in (0.1, float("nan"), float("inf"), 0.1, float("nan")):
        geco.update(torch.tensor([value, 1.0, 0.0]))
        counts.append((geco.num_consecutive_skips, bool(geco.skipped)))
    assert counts == [(0, False), (1, True), (2, True), (0, False), (1, True)]
    restored = GECO(["a"], alpha=0.5)
    restored.load_state_dict(geco.state_dict())
    assert restored.num_consecutive_skips == 1 and restored.num_skipped_updates == 3
    geco.update(torch.tensor([0.0, 0.0, 0.0]))  # no examples: nothing skipped, and the streak goes on
    assert geco.num_consecutive_skips == 1 and not geco.skipped and geco.num_skipped_updates == 3
    geco.update(torch.tensor([0.1, 1.0, 0.0]))  # a valid update ends it
    assert geco.num_consecutive_skips == 0


def test_the_longest_run_of_skips_since_the_last_read_counts_a_run_that_has_ended():
    geco = GECO(["a"], alpha=0.5)
    for value in (float("nan"),) * 4 + (0.1,) + (float("nan"),) * 2:
        geco.update(torch.tensor([value, 1.0, 0.0]))
    saved = geco.state_dict()
    assert geco.num_consecutive_skips == 2 and geco.take_longest_skips() == 4
    assert geco.take_longest_skips() == 2  # from the last read: the run still going
    restored = GECO(["a"], alpha=0.5)
    restored.load_state_dict(saved)  # a resumed run reads what the uninterrupted one would
    assert restored.take_longest_skips() == 4 and restored.num_consecutive_skips == 2
    del saved["longest_skips"]  # a checkpoint from before it was kept: the run going on
    restored.load_state_dict(saved)
    assert restored.take_longest_skips() == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": 1.0}, r"alpha must lie in \[0, 1\), got 1.0"),
        ({"alpha": -0.1}, r"alpha must lie in \[0, 1\), got -0.1"),
        ({"step_size": 0.0}, r"step_size \(nu\) must be a positive finite number, got 0.0"),
        ({"step_size": -1.0}, r"step_size \(nu\) must be a positive finite number, got -1.0"),
        ({"log_lambda_bounds": (3.0, 1.0)}, r"log_lambda_bounds must lie in \[-60, 60\] with low < high, got \(3.0, 1.0\)"),
        # e^100 is inf in fp32: an unreachable tolerance drove lambda there, and every step was
        # skipped as non-finite, with advice about gradients
        ({"log_lambda_bounds": (-30.0, 100.0)}, r"got \(-30.0, 100.0\): lambda = e\^bound and lambda times a per-image "
                                                r"constraint sum must stay finite in fp32"),
        ({"log_lambda_bounds": (float("nan"), 1.0)}, r"log_lambda_bounds must lie in \[-60, 60\]"),
        ({"initial_lambda": 0.0}, r"initial_lambda must be positive"),
        ({"release_speedup": 0.5}, r"release_speedup must be a finite number >= 1, got 0.5"),
    ],
)
def test_bad_hyperparameters_are_rejected_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GECO(["c"], **kwargs)


def test_a_multiplier_state_refuses_an_infinite_initial_lambda():
    from lightning_geco.geco import MultiplierState

    with pytest.raises(ValueError, match=re.escape("MultiplierState initial_lambda must be positive and finite, got inf.")):
        MultiplierState(1, initial_lambda=float("inf"))


def test_constraint_shape_is_checked():
    with pytest.raises(ValueError, match=r"shape \(N, 2\), got \(4,\)"):
        GECO(["a", "b"]).constraint_term(torch.zeros(4))


needs_compiler = pytest.mark.skipif(not compiler_available("cpu"), reason="torch.compile needs a C++ compiler on the CPU")


def _state(geco: GECO) -> dict:
    """Every tensor the per-step methods write: lambda, the average, counters, pending sums, controller."""
    tensors = {
        "log_lambda": geco.log_lagrange_multiplier, "ema": geco.constraint_ema, "seeded": geco._seeded,
        "pending": geco._pending, "skipped": geco.skipped, "updates": geco._num_updates,
        "skips": geco._num_skipped_updates, "in_a_row": geco._num_consecutive_skips,
        "measurements": geco._num_measurements,
    }
    controller = {k: v for k, v in geco.controller.__dict__.items() if isinstance(v, torch.Tensor)}
    return {**tensors, **controller}


@needs_compiler
@pytest.mark.parametrize(
    ("controller", "drive"),
    [(PIController(), "training"), (PIController(), "calibration"), (PIController(ramp_steps=300), "training"),
     # a release that triggers within the 40 steps (the readings fall under 0.9x from step ~24)
     (PIController(release_threshold=0.1, trend_steps=12.0), "training"),
     (Algorithm1.relative(0.006, [0.02, 0.1]), "training"), (Algorithm1(), "training")],
    ids=["pi", "pi_calibration", "pi_ramp", "pi_release", "relative", "paper"],
)
def test_compiled_per_step_methods_agree_with_the_eager_ones(controller, drive):
    # Two GECOs on the same batches, one eager, one compiled: through valid steps, NaN-skipped
    # steps and a streak of them, the flags and counters agree exactly and every float to float32
    # rounding (inductor's vectorised log differs from ATen's in the last bit).
    eager, compiled = (
        GECO(["a", "b"], alpha=0.9, controller=copy.deepcopy(controller), scales=[0.02, 0.1], drive=drive, compile=flag)
        for flag in (False, True)
    )
    generator = torch.Generator().manual_seed(0)
    for step in range(40):
        values = torch.tensor([0.02, 0.1]) * (1.5 - step / 40) * (1 + 0.3 * torch.randn(16, 2, generator=generator))
        values = values - torch.tensor([0.02, 0.1])
        if step in (7, 20, 21):
            values[3, 0] = float("nan")
        outputs = []
        for geco in (eager, compiled):
            batch = values.clone().requires_grad_()
            term = geco.constraint_term(batch)
            term.sum().backward()
            geco.record_loss(term.sum() + 1.0)
            statistics = geco.pending_statistics()
            valid = geco.update(statistics)
            if drive == "calibration" and step % 4 == 0:
                geco.control(statistics, 4)
            outputs.append({"term": term.detach(), "gradient": batch.grad, "valid": valid, **_state(geco)})
        if step == 21:
            assert eager.num_consecutive_skips == compiled.num_consecutive_skips == 2
        a, b = outputs
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, equal_nan=True, msg=f"{key} at step {step}")
    assert eager.num_skipped_updates == compiled.num_skipped_updates == 3
    assert eager.num_updates == compiled.num_updates == 37
    assert eager.num_consecutive_skips == 0 and eager.compile is False and compiled.compile is True


@needs_compiler
def test_a_compiled_geco_past_dynamo_s_recompile_limit_warns_and_runs_eagerly(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    torch._dynamo.reset()  # nothing compiled before counts against the limit
    statistics = torch.tensor([0.05, 0.5, 16.0, 0.0])
    first = GECO(["a", "b"], alpha=0.3, controller=PIController(), scales=[0.02, 0.1], compile=True)
    first.update(statistics)
    assert first.compile  # compiled for alpha 0.3
    other, eager = (
        GECO(["a", "b"], alpha=0.7, controller=PIController(), scales=[0.02, 0.1], compile=flag) for flag in (True, False)
    )
    with pytest.warns(UserWarning, match=r"GECO could not run update compiled \(FailOnRecompileLimitHit.*run eagerly"):
        other.update(statistics)
    eager.update(statistics)
    assert not other.compile and torch.equal(other.log_lagrange_multiplier, eager.log_lagrange_multiplier)
    torch._dynamo.reset()


@needs_compiler
def test_one_compiled_kernel_serves_every_batch_size(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 3)
    torch._dynamo.reset()
    geco = GECO(["a"], alpha=0.9, controller=PIController(), scales=[0.02], compile=True)
    for n in (16, 17, 5, 64, 3, 33):  # more sizes than the limit allows variants
        geco.constraint_term(torch.full((n, 1), 0.01))
    assert geco.compile
    torch._dynamo.reset()


@pytest.mark.parametrize("mse", [0.0, -0.01, float("nan"), float("inf")])
def test_mse_to_psnr_names_a_value_it_cannot_take(mse):
    from lightning_geco import mse_to_psnr

    with pytest.raises(ValueError, match=re.escape(f"mse_to_psnr needs a per-element MSE > 0 and finite (data in [0, 1]), got {mse!r}.")):
        mse_to_psnr(mse)


def test_psnr_and_mse_convert_both_ways_and_psnr_to_mse_names_a_value_it_cannot_take():
    from lightning_geco import mse_to_psnr, psnr_to_mse

    assert mse_to_psnr(0.01) == pytest.approx(20.0) and psnr_to_mse(20.0) == pytest.approx(0.01)
    with pytest.raises(ValueError, match=re.escape("psnr_to_mse needs a finite PSNR in dB, got nan.")):
        psnr_to_mse(float("nan"))

import math
import re
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from helpers import TwoOptimizerVAE, quiet_trainer, tiny_conv_vae
from lightning_geco import ELBO, ConvVAE, GECOCallback, GECOObjective, ReconstructionMSE
from lightning_geco.callbacks import UNLOGGED_CHECK_EVERY, NonFiniteConstraintError, ObjectiveNeverCalledError
from lightning_geco.models.base import VAEModule
from lightning_geco.records import VAEOutput


def _loader(n=64, batch_size=8, shape=(1, 16, 16), seed=0):
    images = torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed)).round()
    return DataLoader(TensorDataset(images), batch_size=batch_size)


def _trainer(callbacks, **kwargs):
    kwargs.setdefault("max_steps", 6)
    return quiet_trainer(callbacks=callbacks, **kwargs)


class UpdateSpy(GECOCallback):
    """Records the reduced statistics of every update."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.seen.append(self.geco.pending_statistics().clone())
        super().on_before_optimizer_step(trainer, pl_module, optimizer)


def test_lambda_moves_once_per_optimizer_step_and_logs_the_geco_keys():
    pl.seed_everything(0)
    callback = GECOCallback()
    trainer = _trainer([callback], max_steps=6, limit_val_batches=2, val_check_interval=3)
    trainer.fit(tiny_conv_vae(), _loader(), _loader(16))
    assert callback.geco.num_updates == 6 == trainer.global_step
    for key in ("geco/lambda", "geco/constraint", "geco/constraint_ema"):
        assert key in trainer.callback_metrics
    assert trainer.callback_metrics["geco/lambda"].item() == pytest.approx(callback.geco.lagrange_multiplier.item())


class LambdaTrace(pl.Callback):
    def __init__(self):
        self.log_lambda = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.log_lambda.append(pl_module.objective.multipliers.log_lagrange_multiplier.item())


def test_a_new_trainer_fitting_a_trained_model_on_moves_lambda_no_further_than_a_step_does():
    # A new Trainer (a fine-tune of a loaded model) had no controller state: its first update added
    # the PI's P term on top of a lambda that held it already (2.5 -> 5.1 in one step).
    pl.seed_everything(0)
    model = tiny_conv_vae(tolerance=0.01)  # far past it: the P term is large (K_P * ln 4 ~ 0.7)
    _trainer([GECOCallback()], max_steps=8).fit(model, _loader())
    trained, trace = model.objective.multipliers.log_lagrange_multiplier.item(), LambdaTrace()
    _trainer([GECOCallback(), trace], max_steps=3).fit(model, _loader())
    steps = [b - a for a, b in zip([trained, *trace.log_lambda], trace.log_lambda)]
    assert steps[0] == pytest.approx(0.08 * 0.075, abs=1e-6)  # the integrator's step alone: K_I times the clip
    assert all(abs(step) < 0.02 for step in steps[1:]), steps  # and the P term moves with the error's changes only


def test_a_fit_resumed_under_another_controller_is_warned_naming_both(tmp_path):
    # Accepted without a word; lambda then moved by other rules than the checkpoint's run.
    pl.seed_everything(0)
    trainer = _trainer([GECOCallback()], max_steps=4, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(tiny_conv_vae(), _loader())
    trainer.save_checkpoint(tmp_path / "pi.ckpt")
    with pytest.warns(UserWarning, match=re.escape(
        "GECO: the checkpoint's run moved lambda with controller='pi'; this fit uses 'relative', which starts from "
        "the saved lambda (a bumpless transfer): it is not that run continued."
    )):
        _trainer([GECOCallback(controller="relative")], max_steps=6).fit(tiny_conv_vae(), _loader(), ckpt_path=tmp_path / "pi.ckpt")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="GECO: the checkpoint's run moved lambda")
        _trainer([GECOCallback()], max_steps=6).fit(tiny_conv_vae(), _loader(), ckpt_path=tmp_path / "pi.ckpt")


def test_gradient_accumulation_updates_once_per_window_from_all_micro_batches():
    pl.seed_everything(0)
    spy = UpdateSpy()
    trainer = _trainer([spy], max_steps=3, accumulate_grad_batches=2, limit_val_batches=0)
    trainer.fit(tiny_conv_vae(), _loader(batch_size=8))
    assert spy.geco.num_updates == 3
    # count (index K) = 2 micro-batches x 8 examples per update
    assert [s[1].item() for s in spy.seen] == [16.0, 16.0, 16.0]


@pytest.mark.parametrize("critic_first", [False, True], ids=["vae_first", "critic_first"])
def test_a_second_optimizer_on_a_skipped_batch_is_withheld_too(critic_first):
    # GECO updates once a batch, at the first step after its loss: a step after that keeps the
    # batch's skip decision (the second optimizer used to find no statistics, step on the NaN
    # gradients and reset the streak), and a critic stepping first, on a loss GECO does not see,
    # is left alone (the VAE used to be withheld a batch late, on the wrong step).
    pl.seed_everything(0)
    callback = GECOCallback()
    model = tiny_conv_vae(model_class=TwoOptimizerVAE, nan_batch=2, critic_first=critic_first)
    snapshots = []

    class Parameters(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append({name: p.detach().clone() for name, p in pl_module.named_parameters()})

    trainer = _trainer([callback, Parameters()], max_steps=8, limit_val_batches=0)
    trainer.fit(model, _loader())
    assert trainer.global_step == 8 and callback.geco.num_updates == 3  # 4 batches, one skipped
    assert callback.geco.num_skipped_updates == 1
    for name, before in snapshots[1].items():  # the NaN batch moved nothing but a critic stepping first
        assert torch.equal(before, snapshots[2][name]) != (critic_first and name.startswith("critic.")), name
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(snapshots[2][name], after) for name, after in snapshots[3].items() if name.startswith("encoder"))


@pytest.mark.parametrize("key", ["geco/constraint_ema", "train/distortion"])
def test_a_checkpoint_monitoring_a_step_key_between_logging_steps_ranks_that_steps_value(tmp_path, key):
    # The keys were logged at the loggers' steps only (every 10th): a checkpoint saved at steps 14,
    # 21 and 28 was ranked by step 9's or 19's value, silently; 21 and 28 tied at one stale score.
    pl.seed_everything(0)
    seen = {}

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[trainer.global_step] = float(trainer.callback_metrics[key])

    callback = GECOCallback()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor=key, save_top_k=-1, every_n_train_steps=7)
    trainer = _trainer([callback, Record(), checkpoint], max_steps=30, limit_val_batches=0, log_every_n_steps=10,
                       enable_checkpointing=True)
    trainer.fit(tiny_conv_vae(), _loader())
    scores = {int(Path(path).stem.split("step=")[1]): float(score) for path, score in checkpoint.best_k_models.items()}
    assert sorted(scores) == [7, 14, 21, 28]
    assert scores == {step: seen[step] for step in scores}  # each ranked by its own step's value
    assert len(set(seen.values())) == 30  # fresh at every step
    if key.startswith("geco/"):
        assert seen[30] == pytest.approx(float(callback.geco.constraint_ema), rel=1e-6)


class CriticEveryBatchVAE(pl.LightningModule):
    """Manual optimization, n_critic = 2: the VAE steps on even batches (batch 2 non-finite), a
    fused critic after it on every batch, alone on the odd ones."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.encoder, self.decoder, self.critic = torch.nn.Linear(256, 4), torch.nn.Linear(4, 256), torch.nn.Linear(256, 1)
        self.objective = GECOObjective([ReconstructionMSE(0.05)])
        self.critic_stepped = []

    def training_step(self, batch, batch_idx):
        vae_optimizer, critic_optimizer = self.optimizers()
        x = batch[0].flatten(1)
        if batch_idx % 2 == 0:
            z = self.encoder(x)
            reconstruction = torch.sigmoid(self.decoder(z)) * (float("nan") if batch_idx == 2 else 1.0)
            vae_optimizer.zero_grad()
            self.manual_backward(self.objective.lagrangian(0.5 * z.pow(2).sum(1), x, reconstruction))
            vae_optimizer.step()
        before = self.critic.weight.detach().clone()
        with torch.no_grad():
            fake = torch.sigmoid(self.decoder(self.encoder(x)))
        critic_optimizer.zero_grad()
        self.manual_backward(self.critic(fake).mean() - self.critic(x).mean())
        critic_optimizer.step()
        self.critic_stepped.append(not torch.equal(before, self.critic.weight))

    def configure_optimizers(self):
        vae = [*self.encoder.parameters(), *self.decoder.parameters()]
        return torch.optim.Adam(vae, lr=1e-2, fused=True), torch.optim.Adam(self.critic.parameters(), lr=1e-2, fused=True)


def test_a_skip_handed_to_a_fused_optimizer_is_taken_off_at_the_batch_end():
    # The found_inf flag of batch 2's skip stayed on the fused critic: its step alone on batch 3,
    # which GECO does not decide, was dropped too, silently, until GECO's next update.
    pl.seed_everything(0)
    model = CriticEveryBatchVAE()
    trainer = _trainer([GECOCallback()], max_steps=-1, max_epochs=1, limit_train_batches=6, limit_val_batches=0)
    trainer.fit(model, _loader(n=48))
    assert model.critic_stepped == [True, True, False, True, True, True]  # withheld on the skipped batch only
    assert not any(hasattr(optimizer, "found_inf") for optimizer in trainer.optimizers)


class NaNBetweenOwnLossesVAE(ConvVAE):
    """Every other batch trains on a loss of the module's own; the GECO batches are non-finite."""

    def training_step(self, batch, batch_idx):
        output = self(batch[0], None)
        if batch_idx % 2:
            return (output.reconstruction - output.x).pow(2).mean()
        return self.objective(VAEOutput.from_terms(output.x, output.reconstruction * float("nan"), output.rate))


def test_steps_whose_batches_skip_the_objective_neither_extend_nor_end_a_run_of_skips():
    # GECO updates on every step; one with no examples reset the run of skips, so alternating
    # them with non-finite GECO batches never reached max_nonfinite_steps.
    pl.seed_everything(0)
    callback = GECOCallback(max_nonfinite_steps=3)
    trainer = _trainer([callback], max_steps=14, limit_val_batches=0, log_every_n_steps=1)
    with pytest.raises(NonFiniteConstraintError, match="non-finite constraint or loss on 3 consecutive optimizer steps"):
        trainer.fit(tiny_conv_vae(model_class=NaNBetweenOwnLossesVAE), _loader(n=128))
    assert trainer.global_step == 4 and callback.geco.num_skipped_updates == 3  # batches 0, 2 and 4


def test_a_run_stepping_two_optimizers_a_batch_without_step_logs_still_stops_on_non_finite_steps():
    # The unlogged check counts batches, as Lightning's logging does: global_step (2 a batch here)
    # never met (step + 1) % 50.
    pl.seed_everything(0)
    callback = GECOCallback(max_nonfinite_steps=3)
    trainer = _trainer([callback], max_steps=-1, max_epochs=10, limit_val_batches=0, log_every_n_steps=0)
    with pytest.raises(NonFiniteConstraintError, match="non-finite constraint or loss on 50 consecutive"):
        trainer.fit(tiny_conv_vae(model_class=TwoOptimizerVAE, nan_batch="all"), _loader())
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == UNLOGGED_CHECK_EVERY - 1  # the 50th batch, of 80


class AlwaysNaNVAE(ConvVAE):
    def reparameterization_noise(self, x, posterior):
        return torch.full_like(posterior.mean, float("nan"))


def test_a_run_that_writes_no_step_logs_still_stops_on_non_finite_steps():
    # The fused optimizer takes the skip on the device, so the streak is read on the host only
    # at logging steps; with log_every_n_steps=0 there are none, and a max_epochs run used to skip
    # every step to its end. It is read every UNLOGGED_CHECK_EVERY (50) steps then.
    pl.seed_everything(0)
    callback = GECOCallback(max_nonfinite_steps=3)
    trainer = _trainer([callback], max_steps=-1, max_epochs=10, limit_val_batches=0, log_every_n_steps=0)
    with pytest.raises(NonFiniteConstraintError, match="non-finite constraint or loss on 50 consecutive"):
        trainer.fit(tiny_conv_vae(model_class=AlwaysNaNVAE), _loader())
    assert trainer.global_step == UNLOGGED_CHECK_EVERY - 1 < 80  # the 50th step, of 80 planned


class NaNBetweenStepsVAE(ConvVAE):
    """Non-finite on the training steps 2 to 6, finite before and after."""

    def reparameterization_noise(self, x, posterior):
        if self.training and 2 <= self.global_step <= 6:
            return torch.full_like(posterior.mean, float("nan"))
        return super().reparameterization_noise(x, posterior)


def test_a_run_of_skips_that_ends_between_two_logging_steps_still_stops_the_run():
    # The streak is read at logging steps only (every 10th here); 5 skips in a row at steps 2-6
    # had ended by step 9, whose read saw 0 in a row and let the run go on.
    pl.seed_everything(0)
    callback = GECOCallback(max_nonfinite_steps=3)
    trainer = _trainer([callback], max_steps=30, limit_val_batches=0, log_every_n_steps=10)
    message = ("GECO saw a non-finite constraint or loss on 5 consecutive optimizer steps (max_nonfinite_steps=3; "
               "the longest run since the last check)")
    with pytest.raises(NonFiniteConstraintError, match=re.escape(message)) as error:
        trainer.fit(tiny_conv_vae(model_class=NaNBetweenStepsVAE), _loader())
    assert "The run of skips has ended (0 in a row now)" in str(error.value)
    assert trainer.global_step == 9 and callback.geco.num_skipped_updates == 5


def test_a_skipped_step_logs_no_batch_mean_for_its_constraint():
    # The non-finite sums are left out of the statistics; their mean was logged as 0, which reads
    # as "exactly at the tolerance" on a dashboard.
    pl.seed_everything(0)
    logged = []

    class Logged(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            logged.append((trainer.callback_metrics["geco/constraint"].item(), trainer.callback_metrics["geco/skipped_updates"].item()))

    trainer = _trainer([GECOCallback(max_nonfinite_steps=100), Logged()], max_steps=9, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(tiny_conv_vae(model_class=NaNBetweenStepsVAE), _loader())
    assert [math.isnan(value) for value, _ in logged] == [False] * 2 + [True] * 5 + [False] * 2
    assert [skipped for _, skipped in logged] == [0, 0, 1, 2, 3, 4, 5, 5, 5]


def test_validation_and_test_never_move_lambda():
    pl.seed_everything(0)
    callback = GECOCallback()
    model = tiny_conv_vae()
    trainer = _trainer([callback], max_steps=4, limit_val_batches=0)
    trainer.fit(model, _loader())
    before = {**callback.geco.state_dict(), **{k: v.clone() for k, v in model.objective.multipliers.state_dict().items()}}
    trainer.validate(model, _loader(32))
    after = {**callback.geco.state_dict(), **model.objective.multipliers.state_dict()}
    assert torch.equal(before["log_lagrange_multiplier"], after["log_lagrange_multiplier"])
    assert torch.equal(before["constraint_ema"], after["constraint_ema"])
    assert before["num_updates"] == after["num_updates"] == 4
    assert callback.geco.pending_statistics().abs().sum() == 0


def test_training_a_geco_model_without_the_callback_fails_loudly():
    trainer = _trainer([], max_steps=2, limit_val_batches=0)
    with pytest.raises(RuntimeError, match="nothing would update lambda"):
        trainer.fit(tiny_conv_vae(), _loader())


def test_callback_on_a_model_without_a_geco_objective_is_rejected():
    trainer = _trainer([GECOCallback()], max_steps=2, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"exactly one GECOObjective, found 0 in ConvVAE. Use objective=GECOObjective"):
        trainer.fit(tiny_conv_vae(objective=ELBO()), _loader())
    # One objective per output head: the hint is to put the constraints in one.
    model = tiny_conv_vae()
    model.second = GECOObjective([ReconstructionMSE(0.02)])
    with pytest.raises(ValueError, match=re.escape(
        "exactly one GECOObjective, found 2 in ConvVAE. Put every constraint in one GECOObjective(constraints=[...])"
    )):
        GECOCallback().setup(trainer, model, "fit")


def test_elbo_model_trains_without_the_callback():
    trainer = _trainer([], max_steps=2, limit_val_batches=0)
    trainer.fit(tiny_conv_vae(objective=ELBO()), _loader())
    assert trainer.global_step == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": 1.5}, r"alpha must lie in \[0, 1\), got 1.5"),
        ({"step_size": -0.1}, r"step_size \(nu\) must be a positive finite number, got -0.1"),
        ({"max_nonfinite_steps": 0}, r"max_nonfinite_steps must be a positive int, got 0"),
        ({"release_speedup": 0.5}, r"release_speedup must be a finite number >= 1, got 0.5"),
        ({"max_relative_violation": 0.0}, r"max_relative_violation must be positive or None, got 0.0"),
        ({"compile": "yes"}, r"GECOCallback compile must be True or False, got 'yes'"),
    ],
)
def test_callback_rejects_bad_settings_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GECOCallback(**kwargs)


def test_bare_base_module_builds_but_its_forward_pass_names_what_to_override():
    # VAEModule is a concrete LightningModule (Lightning builds it, e.g. from a config); only its
    # model hooks are missing, and the first pass says which ones.
    model = VAEModule(image_shape=(1, 8, 8))
    with pytest.raises(NotImplementedError, match=r"VAEModule does not define encode\(\).*encode and decode.*or infer"):
        model(torch.zeros(1, 1, 8, 8))
    with pytest.raises(NotImplementedError, match=r"does not define decode\(\)"):
        model.decode(torch.zeros(1, model.latent_dim))


def test_compile_without_a_compiler_on_the_device_warns_and_runs_eagerly(monkeypatch):
    monkeypatch.setattr("lightning_geco.callbacks.compiler_available", lambda device: False)
    callback = GECOCallback(compile=True)
    with pytest.warns(UserWarning, match=r"compile=True\): torch.compile cannot build kernels on cpu here"):
        _trainer([callback], max_steps=2).fit(tiny_conv_vae(), _loader())
    assert callback.geco.compile is False and callback.geco.num_updates == 2


class PaceSpy(GECOCallback):
    """Records, at every optimizer step, the learning rate it stepped with and the pace set."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rates, self.paces = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.rates.append(optimizer.param_groups[0]["lr"])
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.paces.append(self.geco.controller.pace.item())


def _paced(rates):
    """Each rate over the largest before it (itself included)."""
    return [rate / max(rates[: i + 1]) for i, rate in enumerate(rates)]


def test_ramp_follows_lr_paces_the_drift_by_the_learning_rate_over_its_largest():
    spy = PaceSpy(ramp_steps=100.0, ramp_follows_lr=True)
    _trainer([spy], max_steps=6).fit(tiny_conv_vae(lr_schedule="cosine"), _loader())
    assert spy.paces == pytest.approx(_paced(spy.rates), rel=1e-6)
    assert spy.paces[0] == 1.0 and spy.paces == sorted(spy.paces, reverse=True) and spy.paces[-1] < 0.5
    without = PaceSpy(ramp_steps=100.0)
    _trainer([without], max_steps=6).fit(tiny_conv_vae(lr_schedule="cosine"), _loader())
    assert without.paces == [1.0] * 6


class WarmupThenDecay(ConvVAE):
    """A schedule whose initial rate is not its largest (as OneCycleLR's: the peak is 25x it)."""

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        factors = [0.1, 0.5, 1.0, 0.8, 0.4, 0.2, 0.1, 0.1]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factors[step])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_the_pace_is_relative_to_the_largest_rate_so_far_never_above_one():
    spy = PaceSpy(ramp_steps=100.0, ramp_follows_lr=True)
    model = tiny_conv_vae(model_class=WarmupThenDecay)
    _trainer([spy], max_steps=6).fit(model, _loader())
    assert spy.paces == pytest.approx([1.0, 1.0, 1.0, 0.8, 0.4, 0.2], rel=1e-6)


def test_a_resumed_fit_paces_from_the_saved_peak_rate(tmp_path):
    spy = PaceSpy(ramp_steps=100.0, ramp_follows_lr=True)
    trainer = _trainer([spy], max_steps=4)
    trainer.fit(tiny_conv_vae(model_class=WarmupThenDecay), _loader())
    assert spy.state_dict()["peak_learning_rate"] == pytest.approx(1e-3)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = PaceSpy(ramp_steps=100.0, ramp_follows_lr=True)
    _trainer([resumed], max_steps=6).fit(tiny_conv_vae(model_class=WarmupThenDecay), _loader(), ckpt_path=tmp_path / "half.ckpt")
    # The uninterrupted run's last two (0.4 and 0.2 of the peak); from the resumed rates alone
    # (0.4e-3, then 0.2e-3) they would be 1.0 and 0.5.
    assert resumed.rates == pytest.approx([0.4e-3, 0.2e-3], rel=1e-6)
    assert resumed.paces == pytest.approx([0.4, 0.2], rel=1e-6)


@pytest.mark.parametrize("kwargs", [{"ramp_follows_lr": True}, {"ramp_follows_lr": True, "ramp_steps": 300.0, "controller": "relative"}])
def test_ramp_follows_lr_without_a_learned_drift_is_rejected(kwargs):
    with pytest.raises(ValueError, match="ramp_follows_lr=True paces the drift the PI controller learns with ramp_steps"):
        GECOCallback(**kwargs)


def test_a_setting_the_chosen_controller_does_not_read_is_warned_with_its_value():
    # A relative run with ramp_steps=300 ended to the digit as one without: the setting was ignored, silently.
    with pytest.warns(UserWarning, match=re.escape("GECOCallback(controller='relative') does not read ramp_steps=300: it is "
                                                   "another controller setting and changes nothing")):
        GECOCallback(controller="relative", ramp_steps=300)
    with pytest.warns(UserWarning, match=re.escape("GECOCallback(controller='paper') does not read release_speedup=2.0, "
                                                   "integral_gain=0.5: they are other controllers settings and change nothing")):
        GECOCallback(controller="paper", release_speedup=2.0, integral_gain=0.5)
    with pytest.warns(UserWarning, match=re.escape("GECOCallback(controller='pi') does not read step_size=0.1")):
        GECOCallback(step_size=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GECOCallback(controller="relative", step_size=0.01, release_speedup=2.0, max_relative_violation=None)
        GECOCallback(integral_gain=0.12, ramp_steps=300, release_threshold=None)
    # A constraint's own step_size is relative's too.
    model = tiny_conv_vae(objective=GECOObjective([ReconstructionMSE(0.05, step_size=0.01)]))
    with pytest.warns(UserWarning, match=re.escape("GECOCallback(controller='pi') does not read a constraint's own step_size: "
                                                   "'reconstruction' (step_size=0.01) changes nothing")):
        GECOCallback().setup(quiet_trainer(), model, "fit")


def test_lambda_moves_under_bf16_true_precision():
    # bf16-true casts the module, GECO's buffers included: log lambda stood at ln 20 = 3.0 in bf16,
    # whose steps there (0.016) are larger than the relative law's updates.
    pl.seed_everything(0)
    callback = GECOCallback(controller="relative", initial_lambda=20.0)
    trainer = _trainer([callback], max_steps=40, precision="bf16-true", limit_val_batches=0)
    model = tiny_conv_vae(tolerance=0.01)
    trainer.fit(model, _loader())
    assert next(model.parameters()).dtype == torch.bfloat16
    assert callback.geco.log_lagrange_multiplier.dtype == torch.float32
    assert callback.geco.log_lagrange_multiplier.item() > math.log(20.0) + 0.1


class TwiceVAE(ConvVAE):
    """Calls the objective a second time on part of the batch, as a figure for the logs."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.objective(self(batch[0][:4], None))
        return loss


def test_a_loss_recorded_twice_on_one_training_batch_is_warned_once():
    # In a trial a second lagrangian call for a logged figure moved lambda to 3.5 instead of 1.7, silently.
    pl.seed_everything(0)
    message = ("GECO: the constraints were recorded 2 times on one training batch (the objective, or its lagrangian, "
               "called more than once in training mode): every call's examples count towards lambda's update, as "
               "micro-batches do. Call it once a batch, on the batch you train on; for a figure to log, read "
               "objective.constraint_values(output), which records nothing.")
    with pytest.warns(UserWarning, match=re.escape(message)) as record:
        _trainer([GECOCallback()], limit_val_batches=0).fit(tiny_conv_vae(model_class=TwiceVAE), _loader())
    assert sum("recorded 2 times" in str(w.message) for w in record) == 1
    with warnings.catch_warnings():  # once a batch, micro-batches included: nothing to say
        warnings.filterwarnings("error", message="GECO: the constraints were recorded")
        _trainer([GECOCallback()], limit_val_batches=0, accumulate_grad_batches=2).fit(tiny_conv_vae(), _loader())


class OwnLossVAE(ConvVAE):
    """Holds a GECOObjective, but its training_step returns a loss of its own (a negative ELBO)."""

    def training_step(self, batch, batch_idx):
        output = self(batch[0])
        return (output.rate + output.distortion * 100).mean()


@pytest.mark.parametrize("max_steps", [4, UNLOGGED_CHECK_EVERY + 10])
def test_a_training_step_that_never_calls_the_geco_objective_is_refused(max_steps):
    # GECOCallback in the Trainer, the objective never called in training: the run ended with a
    # verdict from lambda 1 and a moving average of 0 ("at the tolerance"), and no word.
    model = tiny_conv_vae(model_class=OwnLossVAE)
    trainer = quiet_trainer(max_steps=max_steps, limit_val_batches=0, callbacks=[GECOCallback()])
    batches = min(max_steps, UNLOGGED_CHECK_EVERY)  # at the end of a short fit, else at the 50th batch
    with pytest.raises(ObjectiveNeverCalledError, match=re.escape(
        f"GECOCallback: {batches} training batches, and the model's GECOObjective recorded no constraint on any of them"
    )):
        trainer.fit(model, DataLoader(TensorDataset(torch.rand(16, 1, 16, 16)), batch_size=4))
    assert trainer.global_step == batches


def test_a_fit_resumed_in_another_precision_or_accumulation_says_it_is_not_that_run_continued(tmp_path):
    images = DataLoader(TensorDataset(torch.rand(16, 1, 16, 16)), batch_size=4)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[GECOCallback()])
    trainer.fit(tiny_conv_vae(), images)
    trainer.save_checkpoint(tmp_path / "fp32.ckpt")
    assert torch.load(tmp_path / "fp32.ckpt", weights_only=False)["callbacks"]["GECOCallback"]["precision"] == "32-true"
    message = ("GECO: the checkpoint's run trained with precision='32-true'; this resumed fit has 'bf16-mixed', so its "
               "numbers differ from the ones that run would have gone on with: it is not that run continued "
               "(Trainer(precision='32-true'), on the command line --trainer.precision 32-true, continues it).")
    resumed = quiet_trainer(max_steps=4, limit_val_batches=0, precision="bf16-mixed", callbacks=[GECOCallback()])
    with pytest.warns(UserWarning, match=re.escape(message)):
        resumed.fit(tiny_conv_vae(), images, ckpt_path=tmp_path / "fp32.ckpt")
    # Another gradient accumulation is another global batch, as is another batch size.
    message = ("GECO: the checkpoint's run trained with accumulate_grad_batches=1; this resumed fit has 2, so its "
               "numbers differ")
    accumulating = quiet_trainer(max_steps=4, limit_val_batches=0, accumulate_grad_batches=2, callbacks=[GECOCallback()])
    with pytest.warns(UserWarning, match=re.escape(message)):
        accumulating.fit(tiny_conv_vae(), images, ckpt_path=tmp_path / "fp32.ckpt")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="GECO: the checkpoint's run trained with")
        quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[GECOCallback()]).fit(
            tiny_conv_vae(), images, ckpt_path=tmp_path / "fp32.ckpt"
        )


@pytest.mark.parametrize("with_summary", [True, False])
def test_an_epoch_bounded_fit_logs_its_last_step(tmp_path, with_summary):
    # With max_epochs and no max_steps the last step was not a logging step: the loggers got the
    # values of the last logging step again (lambda 5.34 in W&B, 5.58 in summary.json). Lightning
    # writes the last step when the fit stops there, as RunSummary asks it to (train.py adds it);
    # without it, Lightning's own schedule holds (the README says so).
    import csv

    from pytorch_lightning.loggers import CSVLogger

    from lightning_geco import RunSummary

    callback = GECOCallback()
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, log_every_n_steps=5, logger=CSVLogger(tmp_path),
                            callbacks=[callback, RunSummary()] if with_summary else [callback])
    trainer.fit(tiny_conv_vae(), DataLoader(TensorDataset(torch.rand(24, 1, 16, 16)), batch_size=4))
    assert trainer.global_step == 12
    (metrics,) = tmp_path.glob("lightning_logs/*/metrics.csv")
    rows = [row for row in csv.DictReader(metrics.open()) if row.get("geco/lambda")]
    # Lightning's steps of the 5th, 10th (and 12th) optimizer steps
    assert [int(row["step"]) for row in rows] == ([4, 9, 11] if with_summary else [4, 9])
    if with_summary:
        assert float(rows[-1]["geco/lambda"]) == callback.geco.lagrange_multiplier.item()
        assert float(rows[-1]["train/distortion"]) > 0  # the model's own step values, logged at that step too


def test_auto_drive_counts_whole_passes_over_the_data_when_epochs_are_limited():
    # 10 epochs of a tenth of the batches are one pass over the shuffled set, not 10.
    callback = GECOCallback()
    trainer = quiet_trainer(max_epochs=10, limit_train_batches=0.1, limit_val_batches=0, callbacks=[callback])
    trainer.fit(tiny_conv_vae(), DataLoader(TensorDataset(torch.rand(400, 1, 16, 16)), batch_size=4))
    assert trainer.global_step == 100 and callback.active_drive == "training"
    assert callback.reasons_for_calibration(trainer) == []


class HandAccumulatingVAE(ConvVAE):
    """Manual optimization that steps once every 64 batches, calling the objective on every one."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        loss = self.objective(self(batch[0]))
        self.manual_backward(loss / 64)
        if (batch_idx + 1) % 64 == 0:
            optimizer = self.optimizers()
            optimizer.step()
            optimizer.zero_grad()
        return loss


def test_a_fit_that_steps_less_often_than_the_check_but_calls_the_objective_is_not_refused():
    # Steps every 64 batches: refused at batch 50 as "never called", though it was on every batch.
    callback = GECOCallback()
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[callback])
    trainer.fit(tiny_conv_vae(model_class=HandAccumulatingVAE), DataLoader(TensorDataset(torch.rand(64, 1, 16, 16)), batch_size=1))
    assert trainer.global_step == 1 and callback.geco.num_updates == 1

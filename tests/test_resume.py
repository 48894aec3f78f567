"""Checkpoints: GECO state saved and restored; N + N steps equal 2N uninterrupted steps."""

import json
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from geco_run import run
from helpers import assert_same_parameters, quiet_trainer, random_images, tiny_conv_vae
from lightning_geco import GECOCallback, NonFiniteConstraintError
from lightning_geco.schedules import CosineToFloor

REPO = Path(__file__).resolve().parents[1]


def _rows(out):
    return json.loads((Path(out) / "rank0.json").read_text())


@pytest.mark.timeout(120)
def test_checkpoint_holds_the_geco_state_with_its_tolerance(tmp_path):
    run(tmp_path / "a", batch_size=64, max_steps=4, ckpt_out=str(tmp_path / "a.ckpt"))
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=False)
    # Lambda and the moving average are the model's buffers; the callback keeps the counts.
    weights = checkpoint["state_dict"]
    assert {"objective.multipliers.log_lagrange_multiplier", "objective.multipliers.constraint_ema"} <= set(weights)
    assert weights["objective.multipliers.seeded"].item() is True
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("GECOCallback")]
    assert state["geco"]["num_updates"] == 4
    assert state["constraints"] == [{"name": "reconstruction", "tolerance": 0.05, "unit": "mse", "reading_tolerance": 0.05}]


@pytest.mark.timeout(180)
def test_n_plus_n_steps_from_a_checkpoint_equal_2n_uninterrupted_steps(tmp_path):
    n = 5
    run(tmp_path / "full", batch_size=64, max_steps=2 * n, step_indexed=True)
    run(tmp_path / "first", batch_size=64, max_steps=n, ckpt_out=str(tmp_path / "half.ckpt"), step_indexed=True)
    run(tmp_path / "second", batch_size=64, max_steps=2 * n, ckpt_in=str(tmp_path / "half.ckpt"), step_indexed=True)
    full, first, second = _rows(tmp_path / "full"), _rows(tmp_path / "first"), _rows(tmp_path / "second")
    assert len(first) == n and len(second) == n
    resumed = first + second
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for a, b in zip(resumed, full):
        assert a["log_lambda"] == pytest.approx(b["log_lambda"], rel=1e-6, abs=1e-7)
        assert a["ema"] == pytest.approx(b["ema"], rel=1e-6, abs=1e-7)
        assert a["updates"] == b["updates"]
    assert_same_parameters(tmp_path / "full" / "params.pt", tmp_path / "second" / "params.pt", rtol=1e-6, atol=1e-7)


class LearningRates(pl.Callback):
    """The learning rate each optimizer step uses."""

    def __init__(self):
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def _cosine_fit(max_steps: int, ckpt_in=None, ckpt_out=None) -> list[float]:
    torch.manual_seed(0)
    model = tiny_conv_vae(learning_rate=1e-3, lr_schedule="cosine")
    rates = LearningRates()
    trainer = quiet_trainer(max_steps=max_steps, limit_val_batches=0, callbacks=[GECOCallback(), rates])
    trainer.fit(model, DataLoader(TensorDataset(random_images(64)), batch_size=16), ckpt_path=ckpt_in)
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    return rates.rates + [trainer.optimizers[0].param_groups[0]["lr"]]  # + the rate after the last step


def test_a_fresh_cosine_schedule_is_torchs_cosine_annealing():
    ours = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    torchs = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    a, b = CosineToFloor(ours, total_steps=10), torch.optim.lr_scheduler.CosineAnnealingLR(torchs, 10, eta_min=0.005)
    for _ in range(10):
        assert ours.param_groups[0]["lr"] == pytest.approx(torchs.param_groups[0]["lr"], rel=1e-12)
        ours.step(), torchs.step(), a.step(), b.step()
    assert ours.param_groups[0]["lr"] == pytest.approx(0.005)


def test_a_cosine_schedule_under_max_epochs_anneals_over_the_epochs_planned_steps():
    # 64 images in batches of 16, 3 epochs: 12 steps, the last at the floor's neighbour.
    torch.manual_seed(0)
    rates = LearningRates()
    trainer = quiet_trainer(max_steps=-1, max_epochs=3, limit_val_batches=0, callbacks=[GECOCallback(), rates])
    trainer.fit(tiny_conv_vae(learning_rate=1e-3, lr_schedule="cosine"), DataLoader(TensorDataset(random_images(64)), batch_size=16))
    assert trainer.lr_scheduler_configs[0].scheduler.total_steps == 12 == len(rates.rates)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05e-3)
    # Both set, as the configs' max_steps with --trainer.max_epochs: whichever ends the fit first
    # plans it (the schedule planned max_steps and ended the fit at 99.9 % of the rate).
    rates = LearningRates()
    both = quiet_trainer(max_steps=200, max_epochs=3, limit_val_batches=0, callbacks=[GECOCallback(), rates])
    both.fit(tiny_conv_vae(learning_rate=1e-3, lr_schedule="cosine"), DataLoader(TensorDataset(random_images(64)), batch_size=16))
    assert both.global_step == both.lr_scheduler_configs[0].scheduler.total_steps == 12 == len(rates.rates)
    assert both.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05e-3)
    unbounded = quiet_trainer(max_steps=-1, max_epochs=-1, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"got max_steps=-1 and max_epochs=-1 \(inf steps\)\. Set max_steps > 0"):
        unbounded.fit(tiny_conv_vae(lr_schedule="cosine"), DataLoader(TensorDataset(random_images(16)), batch_size=16))


@pytest.mark.parametrize("precision, clip, fused", [("bf16-mixed", 1.0, False), ("bf16-mixed", None, True), ("32-true", 1.0, True)])
def test_gradient_clipping_under_mixed_precision_trains_on_a_foreach_adam(precision, clip, fused):
    # Lightning refuses to clip a fused optimizer's gradients under mixed precision.
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, precision=precision, gradient_clip_val=clip, callbacks=[GECOCallback()])
    trainer.fit(tiny_conv_vae(), DataLoader(TensorDataset(random_images(32)), batch_size=16))
    assert trainer.global_step == 2 and trainer.optimizers[0].defaults["fused"] is fused


@pytest.mark.timeout(120)
def test_extending_a_finished_cosine_run_replans_the_schedule_and_never_raises_the_rate(tmp_path):
    n = 6
    first = _cosine_fit(n, ckpt_out=tmp_path / "n.ckpt")
    assert first[-1] == pytest.approx(0.05e-3)  # the first run ended at its floor
    extended = _cosine_fit(3 * n, ckpt_in=tmp_path / "n.ckpt")
    assert len(extended) == 2 * n + 1
    assert all(b <= a for a, b in zip([first[-1], *extended], extended)), extended
    assert extended[-1] == pytest.approx(0.05e-3)


@pytest.mark.timeout(120)
def test_resuming_with_a_changed_tolerance_warns_naming_both_values(tmp_path):
    run(tmp_path / "a", batch_size=64, max_steps=2, ckpt_out=str(tmp_path / "a.ckpt"))
    with pytest.warns(UserWarning, match=r"now asks for distortion at 0.03 \(stated: 0.03 mse\); the checkpoint was trained with 0.05\."):
        run(tmp_path / "b", batch_size=64, max_steps=3, ckpt_in=str(tmp_path / "a.ckpt"), tolerance=0.03)


@pytest.mark.timeout(120)
def test_checkpoint_from_an_incompatible_model_is_rejected(tmp_path):
    run(tmp_path / "a", batch_size=64, max_steps=2, ckpt_out=str(tmp_path / "a.ckpt"))
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=False)
    checkpoint["hyper_parameters"]["latent_dim"] = 7
    torch.save(checkpoint, tmp_path / "b.ckpt")
    with pytest.raises(ValueError, match=r"incompatible model: it was built with latent_dim=7, this model has latent_dim=4"):
        run(tmp_path / "b", batch_size=64, max_steps=3, ckpt_in=str(tmp_path / "b.ckpt"))


@pytest.mark.timeout(120)
def test_bf16_mixed_precision_trains_and_keeps_geco_in_fp32(tmp_path):
    trainer = run(tmp_path / "bf16", batch_size=32, max_steps=5, precision="bf16-mixed")
    geco = next(c for c in trainer.callbacks if isinstance(c, GECOCallback)).geco
    assert geco.num_updates == 5
    assert geco.log_lagrange_multiplier.dtype == torch.float32 == geco.constraint_ema.dtype
    assert geco.pending_statistics().dtype == torch.float32
    assert torch.isfinite(geco.lagrange_multiplier).all()


@pytest.mark.timeout(120)
def test_nan_loss_never_reaches_the_optimizer_state(tmp_path):
    trainer = run(tmp_path / "nan", batch_size=64, max_steps=3, nan_steps=[1])
    rows = _rows(tmp_path / "nan")
    assert [r["skipped"] for r in rows] == [0, 1, 1]
    optimizer = trainer.optimizers[0]
    for state in optimizer.state.values():
        assert state["step"].item() == 2  # the NaN step was not taken
        assert torch.isfinite(state["exp_avg"]).all() and torch.isfinite(state["exp_avg_sq"]).all()


@pytest.mark.timeout(120)
def test_consecutive_non_finite_steps_stop_training_with_a_clear_error(tmp_path):
    # The models' fused Adam skips a non-finite step on the device, so the count is read at the
    # next logging step (here the last, step 9): training stops there, 9 skips in a row.
    with pytest.raises(NonFiniteConstraintError, match=r"non-finite constraint or loss on 9 consecutive optimizer steps") as error:
        run(tmp_path / "nan", batch_size=32, max_steps=10, nan_steps=range(1, 10), max_nonfinite_steps=3)
    # The advice fits the precision: in 32 bits none to raise it (it said "use ... bf16-mixed or 32").
    assert str(error.value).endswith(
        "gives non-finite values on every batch (or a step whose loss did not go through the objective, which GECO "
        "does not guard, made the weights non-finite). Clip the gradients (--trainer.gradient_clip_val 1.0; a run resumed "
        "from an earlier checkpoint takes it too) or train with a lower learning rate, and check the data."
    )
    assert [r["skipped"] for r in _rows(tmp_path / "nan")] == list(range(9))


def _small_default_config(folder: Path, max_steps: int, extra_callbacks: list[dict] = ()) -> list[str]:
    """configs/default.yaml as shipped (cosine schedule, real loader, sampled noise) on less data,
    checkpointing every 10 steps and validating once, at the end; the train.py command."""
    config = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"].update(every_n_train_steps=10)
    config["trainer"]["callbacks"].extend(extra_callbacks)
    config["trainer"].update(
        max_steps=max_steps, val_check_interval=max_steps, limit_val_batches=4, num_sanity_val_steps=0,
        enable_progress_bar=False, logger=False,
    )
    config["data"]["init_args"].update(num_train=480, num_val=64, image_size=32, batch_size=16)
    folder.mkdir(parents=True, exist_ok=True)
    name = "victim.yaml" if extra_callbacks else "config.yaml"
    (folder / name).write_text(yaml.safe_dump(config))
    return [sys.executable, str(REPO / "train.py"), "fit", "--config", str(folder / name)]


ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}

# A callback that SIGKILLs its own process: the machine dying at a known step, so the kill
# always lands after a checkpoint and before the end, however fast or busy the machine is.
_SIGKILL_AT = """\
import os, signal
from pytorch_lightning import Callback

class SigkillAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
"""


def _start(command: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=cwd, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen, cwd: Path) -> tuple[dict, dict]:
    """Wait for the end; (summary.json, the final last.ckpt)."""
    out, err = proc.communicate(timeout=280)
    assert proc.returncode == 0, err[-4000:]
    summary = json.loads(Path(out.strip().splitlines()[-1]).read_text())
    return summary, torch.load(cwd / "runs" / "checkpoints" / "default" / "last.ckpt", weights_only=False)


@pytest.mark.timeout(400)
def test_a_run_killed_with_sigkill_and_resumed_ends_where_the_uninterrupted_run_ends(tmp_path):
    # Killed at step 25, five steps past its step-20 checkpoint, so the kill loses work; 40 steps
    # cross an epoch's end (30 batches an epoch) after the resume.
    steps, saved_at, killed_at = 40, 20, 25
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    command = _small_default_config(killed, steps)
    (tmp_path / "sigkill_at.py").write_text(_SIGKILL_AT)
    killer = {"class_path": "sigkill_at.SigkillAt", "init_args": {"step": killed_at}}
    uninterrupted_proc = _start(_small_default_config(whole, steps), whole)
    victim = _start(
        _small_default_config(killed, steps, [killer]), killed,
        {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))},
    )
    victim.communicate(timeout=280)
    assert victim.returncode == -signal.SIGKILL
    folder = killed / "runs" / "checkpoints" / "default"
    (run_folder,) = folder.glob("*/")
    assert torch.load(run_folder / "last.ckpt", weights_only=False)["global_step"] == saved_at

    # The same command (without the killer) plus --ckpt_path last.
    resumed, resumed_ckpt = _finish(_start([*command, "--ckpt_path", "last"], killed), killed)
    uninterrupted, uninterrupted_ckpt = _finish(uninterrupted_proc, whole)
    assert resumed["global_step"] == uninterrupted["global_step"] == steps
    assert [p.name for p in folder.glob("*/")] == [run_folder.name]  # the resumed run wrote into its own folder
    (state,) = [v for k, v in resumed_ckpt["callbacks"].items() if k.startswith("GECOCallback")]
    assert state["geco"]["num_updates"] == steps  # lambda's history continued, not restarted
    lr = [c["optimizer_states"][0]["param_groups"][0]["lr"] for c in (resumed_ckpt, uninterrupted_ckpt)]
    assert lr[0] == pytest.approx(lr[1], rel=1e-9)
    # The batches (ResumableSampler) and the noise (RandomState) after the restart are those of
    # the uninterrupted run, so the runs end on the same weights, lambda and figures, to the bit.
    # (Within 1 % would not tell: GECO holds the distortion near its tolerance whatever the noise.)
    weights = [c["state_dict"] for c in (resumed_ckpt, uninterrupted_ckpt)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=0, msg=name)
    for key in ("lambda", "distortion", "rate"):
        assert resumed[key] == uninterrupted[key], key


def _shapes_fit(folder: Path, ckpt_in=None, save_at: int | None = None, seed: int = 0, by_epochs: bool = False):
    """15 steps of a ConvVAE + GECO on shuffled shapes (6 batches an epoch, so a checkpoint at
    step 9 is mid-epoch), cosine schedule, sampled noise: the shipped kind of run, small.
    ``by_epochs``: 3 epochs instead (18 steps, the cosine planned from the loader's length),
    loaded by a worker process (which starts drawing batches as soon as its iterator exists)."""
    from lightning_geco.datamodules import ShapesDataModule

    from lightning_geco.resume import RandomState

    pl.seed_everything(seed)
    model = tiny_conv_vae(image_shape=(1, 16, 16), lr_schedule="cosine")
    data = ShapesDataModule(image_size=16, num_train=100, num_val=16, batch_size=16, num_workers=1 if by_epochs else 0)
    callbacks = [GECOCallback(controller="pi"), RandomState()]
    if save_at is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=folder, every_n_train_steps=save_at, save_top_k=-1))
    limits = {"max_steps": -1, "max_epochs": 3} if by_epochs else {"max_steps": 15}
    trainer = quiet_trainer(**limits, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=save_at is not None)
    trainer.fit(model, data, ckpt_path=ckpt_in)
    return model


@pytest.mark.parametrize("by_epochs", [False, True])
def test_a_run_resumed_mid_epoch_draws_the_same_batches_and_noise_as_the_uninterrupted_run(tmp_path, by_epochs):
    whole = _shapes_fit(tmp_path, save_at=9, by_epochs=by_epochs)
    (checkpoint,) = tmp_path.glob("*step=9.ckpt")
    assert torch.load(checkpoint, weights_only=False)["epoch"] == 1  # mid-epoch: 6 batches an epoch
    # Another seed in the resumed process: the checkpoint decides the order and the noise.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = _shapes_fit(tmp_path / "resumed", ckpt_in=checkpoint, seed=123, by_epochs=by_epochs)
    # The loader is resumable (ResumableLoader), so Lightning does not say it is not.
    assert not [w for w in caught if "not resumable" in str(w.message)]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    assert torch.equal(resumed.objective.lagrange_multiplier, whole.objective.lagrange_multiplier)


def test_without_the_random_state_a_resumed_run_draws_other_noise(tmp_path):
    # The counterfactual of the test above: the same resume with the generators left as they are.
    whole = _shapes_fit(tmp_path, save_at=9)
    (checkpoint,) = tmp_path.glob("*step=9.ckpt")
    saved = torch.load(checkpoint, weights_only=False)
    del saved["random_states"]
    torch.save(saved, checkpoint)
    resumed = _shapes_fit(tmp_path / "resumed", ckpt_in=checkpoint, seed=123)
    assert not torch.equal(resumed.objective.lagrange_multiplier, whole.objective.lagrange_multiplier)


def test_random_state_under_ddp_saves_every_ranks_generators_and_gives_each_rank_its_own(tmp_path):
    from types import SimpleNamespace

    from pytorch_lightning.trainer.states import TrainerFn

    from lightning_geco.resume import CHECKPOINT_KEY, RandomState

    mine = torch.get_rng_state()
    torch.manual_seed(1234)
    other = torch.get_rng_state()  # what the second rank's generator holds
    torch.set_rng_state(mine)

    def all_gather(tensor):  # the gloo collective as rank 0 sees it: every rank's tensor, stacked
        return torch.stack([tensor, other.to(tensor.dtype)])

    module = SimpleNamespace(device=torch.device("cpu"))
    def rank(r, world):  # the trainer as rank r of a resumed fit on `world` ranks sees it
        return SimpleNamespace(
            world_size=world, global_rank=r, strategy=SimpleNamespace(all_gather=all_gather),
            state=SimpleNamespace(fn=TrainerFn.FITTING),
        )

    checkpoint = {}
    RandomState().on_save_checkpoint(rank(0, 2), module, checkpoint)
    saved = checkpoint[CHECKPOINT_KEY]
    assert len(saved) == 2 and all(s["cpu"].dtype == torch.uint8 for s in saved)
    assert torch.equal(saved[0]["cpu"], mine) and torch.equal(saved[1]["cpu"], other)
    # Each rank's state stands alone: torch.save keeps a view's offset into the gathered tensor,
    # and torch.set_rng_state of such a view crashed the process.
    assert saved[1]["cpu"].storage_offset() == 0
    torch.save(checkpoint, tmp_path / "states.ckpt")
    # Rank 1 of a resumed 2-rank run gets its own generator back at the start of training, also
    # from a checkpoint written before that (its states views into one tensor).
    stacked = torch.stack([mine, other])
    written_before = {CHECKPOINT_KEY: [{"cpu": stacked[0]}, {"cpu": stacked[1]}]}
    for loaded in (torch.load(tmp_path / "states.ckpt", weights_only=False), written_before):
        callback = RandomState()
        callback.on_load_checkpoint(rank(1, 2), module, loaded)
        callback.on_train_start(rank(1, 2), module)
        assert torch.equal(torch.get_rng_state(), other)
        torch.set_rng_state(mine)
    # A run on another number of ranks leaves the generators as they are, and says why.
    callback = RandomState()
    with pytest.warns(UserWarning, match=re.escape(
        "The checkpoint holds the random states of 2 rank(s), this run has 4: the generators are not restored, "
        "so the resumed run draws other noise than the original."
    )):
        callback.on_load_checkpoint(rank(0, 4), module, checkpoint)
    callback.on_train_start(rank(0, 4), module)
    assert torch.equal(torch.get_rng_state(), mine)


def test_random_state_saves_and_restores_the_mps_generator_on_apple_silicon(monkeypatch):
    # No MPS device here: torch.mps's generator functions stand in for it, as on a Mac.
    from types import SimpleNamespace

    from pytorch_lightning.trainer.states import TrainerFn

    from lightning_geco.resume import CHECKPOINT_KEY, RandomState

    generator = {"state": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: generator["state"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state: generator.update(state=state))
    trainer = SimpleNamespace(world_size=1, global_rank=0, state=SimpleNamespace(fn=TrainerFn.FITTING))
    module = SimpleNamespace(device=torch.device("cpu"))
    checkpoint = {}
    RandomState().on_save_checkpoint(trainer, module, checkpoint)
    assert torch.equal(checkpoint[CHECKPOINT_KEY][0]["mps"], torch.tensor([1, 2, 3], dtype=torch.uint8))
    generator["state"] = torch.tensor([9, 9, 9], dtype=torch.uint8)  # the noise drawn after the checkpoint
    callback = RandomState()
    callback.on_load_checkpoint(trainer, module, checkpoint)
    callback.on_train_start(trainer, module)
    assert torch.equal(generator["state"], torch.tensor([1, 2, 3], dtype=torch.uint8))

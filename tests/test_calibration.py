"""The multiplier driven by a calibration split: exact under DDP and resume, eval mode, clear errors."""

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from lightning_geco.datamodules import ShapesDataModule
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from geco_run import run
from helpers import TwoOptimizerVAE, quiet_trainer, tiny_conv_vae
from lightning_geco import ConvVAE, GECOCallback, GECOObjective, ReconstructionMSE
from lightning_geco.calibration import CalibrationStream
from lightning_geco.callbacks import NonFiniteConstraintError
from lightning_geco.resume import RandomState

SCRIPT = Path(__file__).with_name("geco_run.py")


def _rows(folder: Path, rank: int = 0) -> list[dict]:
    return json.loads((folder / f"rank{rank}.json").read_text())


@pytest.mark.timeout(300)
def test_two_ranks_measure_the_same_calibration_images_as_one_process(tmp_path):
    # Two ranks under "auto", which chooses the calibration set it is given (on rank 0 for both),
    # against one process under drive="calibration": the choice and the measurements in one run.
    out = tmp_path / "ddp"
    command = [sys.executable, str(SCRIPT), "--devices", "2", "--batch-size", "8", "--max-steps", "9",
               "--calibration", "--drive", "auto", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = _rows(out, 0), _rows(out, 1)
    assert rank0 == rank1  # bit-identical lambda and controller counts on both ranks
    assert [row["measurements"] for row in rank0] == [1, 1, 1, 2, 2, 2, 3, 3, 3]  # steps 0, 3, 6
    run(tmp_path / "single", devices=1, batch_size=16, max_steps=9, calibration=True)
    single = _rows(tmp_path / "single")
    torch.testing.assert_close(
        torch.tensor([r["log_lambda"] for r in rank0]), torch.tensor([r["log_lambda"] for r in single]),
        rtol=1e-4, atol=1e-5,
    )
    assert single[-1]["log_lambda"] != single[0]["log_lambda"]  # the calibration stream moved lambda


@pytest.mark.timeout(180)
def test_calibration_driven_lambda_resumes_exactly(tmp_path):
    n = 6  # a checkpoint between two measurements (every 3 steps): the schedule is f(seed, step)
    kwargs = dict(batch_size=64, step_indexed=True, calibration=True)
    run(tmp_path / "full", max_steps=2 * n, **kwargs)
    run(tmp_path / "first", max_steps=n - 1, ckpt_out=str(tmp_path / "half.ckpt"), **kwargs)
    run(tmp_path / "second", max_steps=2 * n, ckpt_in=str(tmp_path / "half.ckpt"), **kwargs)
    resumed = _rows(tmp_path / "first") + _rows(tmp_path / "second")
    full = _rows(tmp_path / "full")
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for a, b in zip(resumed, full):
        assert a["log_lambda"] == pytest.approx(b["log_lambda"], rel=1e-6, abs=1e-7)
        assert a["measurements"] == b["measurements"]


class ModeSpy(pl.Callback):
    """Records the model's mode and grad mode at every forward pass."""

    def __init__(self, model):
        self.seen = []
        original = model.forward

        def forward(*args, **kwargs):
            self.seen.append((model.training, torch.is_grad_enabled(), args[0].shape[0]))
            return original(*args, **kwargs)

        model.forward = forward


def _images(n, seed):
    return (torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) > 0.7).float()


def test_calibration_reads_the_model_in_eval_mode_without_gradients_and_leaves_training_as_it_was():
    pl.seed_everything(0)
    model = tiny_conv_vae()
    spy = ModeSpy(model)
    callback = GECOCallback(controller="pi", drive="calibration", calibration_every=2, calibration_batch_size=5,
                            calibration_dataset=TensorDataset(_images(20, 1)))
    trainer = quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[callback])
    trainer.fit(model, DataLoader(TensorDataset(_images(64, 0)), batch_size=8))
    calibration = [s for s in spy.seen if s[2] == 5]
    training = [s for s in spy.seen if s[2] == 8]
    assert calibration == [(False, False, 5)] * 2  # steps 0 and 2
    assert all(mode and grad for mode, grad, _ in training) and len(training) == 4
    assert callback.geco.num_measurements == 2 and model.training


class RandomlyShiftedImages(torch.utils.data.Dataset):
    """Images plus a random shift of 0 times a draw from torch's global generator: the same
    values as the images, read as a random transform reads them (RandomCrop, RandomHorizontalFlip)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return (self.images[index] + 0.0 * torch.rand(()),)


def test_a_calibration_set_that_draws_random_numbers_leaves_the_training_noise_as_it_was():
    # Its draws used to come from the training's random state (the images were read outside the
    # measurement's fork), so the run's latent noise, and the weights, depended on them.
    def fit(calibration):
        pl.seed_everything(0)
        model = tiny_conv_vae()
        callback = GECOCallback(controller="pi", drive="calibration", calibration_every=2, calibration_batch_size=5,
                                calibration_dataset=calibration)
        quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[callback]).fit(
            model, DataLoader(TensorDataset(_images(64, 0)), batch_size=8))
        return callback.geco.log_lagrange_multiplier.tolist(), [p.detach().clone() for p in model.parameters()]

    images = _images(20, 1)
    plain_lambda, plain_weights = fit(TensorDataset(images))
    drawing_lambda, drawing_weights = fit(RandomlyShiftedImages(images))
    assert drawing_lambda == plain_lambda
    assert all(torch.equal(a, b) for a, b in zip(plain_weights, drawing_weights))


@pytest.mark.parametrize("critic_first", [False, True])
def test_two_optimizers_a_batch_are_measured_every_calibration_every_batches(critic_first):
    # global_step counts both optimizers' steps: keyed on it, a critic stepping first left GECO's
    # updates on odd steps, never measured (lambda frozen), and a VAE stepping first was measured
    # every 8 batches with 16 steps' gains.
    pl.seed_everything(0)
    model = tiny_conv_vae(model_class=TwoOptimizerVAE, critic_first=critic_first)
    spy = ModeSpy(model)
    callback = GECOCallback(controller="pi", drive="calibration", calibration_every=2, calibration_batch_size=5,
                            calibration_dataset=TensorDataset(_images(20, 1)))
    trainer = quiet_trainer(max_steps=16, limit_val_batches=0, callbacks=[callback])
    trainer.fit(model, DataLoader(TensorDataset(_images(64, 0)), batch_size=8))
    assert trainer.global_step == 16 and callback.geco.num_updates == 8  # 8 batches
    assert callback.geco.num_measurements == 4  # batches 0, 2, 4 and 6
    assert [s[2] for s in spy.seen] == [8, 5, 8, 8, 5, 8, 8, 5, 8, 8, 5, 8]
    assert callback.geco.log_lagrange_multiplier.item() != 0.0


def test_a_resumed_fit_keeps_the_last_calibration_measurement(tmp_path):
    # It is what the stall watch and the summary read under the calibration drive; a resumed fit
    # had none until its first measurement (and one with no step left, none at all).
    def fit(callback, max_steps, ckpt_path=None):
        pl.seed_everything(0)
        trainer = quiet_trainer(max_steps=max_steps, limit_val_batches=0, callbacks=[callback])
        trainer.fit(tiny_conv_vae(), DataLoader(TensorDataset(_images(64, 0)), batch_size=8), ckpt_path=ckpt_path)
        return trainer

    def callback():
        return GECOCallback(controller="pi", drive="calibration", calibration_every=2, calibration_batch_size=5,
                            calibration_dataset=TensorDataset(_images(20, 1)))

    first = callback()
    fit(first, 5).save_checkpoint(tmp_path / "five.ckpt")
    measured = first.last_calibration
    assert measured is not None and first.geco.num_measurements == 3
    resumed = callback()
    fit(resumed, 5, ckpt_path=tmp_path / "five.ckpt")  # no step left
    assert torch.equal(resumed.last_calibration, measured)
    assert resumed.regulated_ratio() == first.regulated_ratio()
    # A fit the training batches drive reads none (a stale one fed its stall watch before).
    training = GECOCallback(controller="pi", drive="training")
    fit(training, 5, ckpt_path=tmp_path / "five.ckpt")
    assert training.last_calibration is None


class EvalNaNVAE(ConvVAE):
    """Finite in training, non-finite in eval mode (as a blown-up BatchNorm statistic makes it)."""

    def reparameterization_noise(self, x, posterior):
        return None if self.training else torch.full_like(posterior.mean, float("nan"))


def test_a_non_finite_measurement_reads_nan_and_a_run_of_them_stops_the_fit():
    # Its zeroed sums were kept as the last measurement, 0: "at the tolerance" in the logs, the
    # summary and the stall watch, while lambda never moved and the fit trained on unsteered.
    def fit(max_steps):
        pl.seed_everything(0)
        callback = GECOCallback(controller="pi", drive="calibration", calibration_every=2, calibration_batch_size=5,
                                max_nonfinite_steps=3, calibration_dataset=TensorDataset(_images(20, 1)))
        trainer = quiet_trainer(max_steps=max_steps, limit_val_batches=0, log_every_n_steps=1, callbacks=[callback])
        trainer.fit(tiny_conv_vae(model_class=EvalNaNVAE), DataLoader(TensorDataset(_images(64, 0)), batch_size=8))
        return callback, trainer

    callback, _ = fit(4)  # measurements at steps 0 and 2: two in a row, under the limit of 3
    assert torch.isnan(callback.last_calibration).all() and callback.geco.num_measurements == 0
    assert callback.regulated_ratio() != [1.0]
    with pytest.raises(NonFiniteConstraintError, match=re.escape(
        "GECO's calibration measurements were non-finite on the last 3 of them (max_nonfinite_steps=3; step 4): the "
        "model's eval-mode pass without gradients gives NaN or infinity on held-out images while its training "
        "batches are finite, so lambda has not moved since (it is [1.0])."
    )):
        fit(20)


@pytest.mark.parametrize("calibration, message", [
    (_images(20, 1) * 255, "the calibration images' mean magnitude is {:.4g} (range [0, 255]), the first training "
                           "batch's {:.4g} ([0, 1])".format(float(_images(20, 1)[:5].mean() * 255), float(_images(64, 0)[:8].mean()))),
    (_images(20, 1)[:, :, :8], "the calibration images have shape (1, 8, 16), the training images (1, 16, 16)"),
])
def test_calibration_images_unlike_the_training_images_are_refused_before_they_move_lambda(calibration, message):
    # In a trial, images in [0, 255] as the calibration set beside training images in [0, 1] drove
    # lambda to 3.4 million while the verdict, read on the validation images, said met.
    callback = GECOCallback(controller="pi", drive="calibration", calibration_every=2, calibration_batch_size=5,
                            calibration_dataset=TensorDataset(calibration))
    trainer = quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[callback])
    with pytest.raises(ValueError, match=re.escape(
        f"GECOCallback(drive='calibration'): {message}. The calibration split must hold images like the training images "
        "(the same shape, scaling and transforms), or lambda is steered by a reading of other data."
    )):
        trainer.fit(tiny_conv_vae(), DataLoader(TensorDataset(_images(64, 0)), batch_size=8))
    assert callback.geco.num_measurements == 0


def test_calibration_images_of_one_kind_pass_the_check_however_they_are_scaled_or_tailed():
    # Extremes of 8 images against 64 refused standardised MNIST in 56 of 100 draws; a mean does not.
    from lightning_geco.calibration import _image_summary, _images_mismatch

    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        heavy = torch.distributions.StudentT(2.0).sample((72, 1, 8, 8))
        standardised = (_images(72, int(torch.randint(1000, (1,), generator=generator))) - 0.3) / 0.46
        for images in (heavy, standardised):
            assert _images_mismatch(_image_summary(images[:8]), _image_summary(images[8:])) is None
    assert _images_mismatch(_image_summary(_images(8, 0)), _image_summary(_images(64, 1) * 255)) is not None


@pytest.mark.parametrize("manual", [False, True])
def test_a_calibration_driven_run_resumed_at_an_epoch_end_measures_where_the_uninterrupted_run_does(
    tmp_path, monkeypatch, manual
):
    # Lightning's count of batches that stepped comes back one ahead from an epoch-end checkpoint
    # (a reviewer's run measured at updates 11 and 15 instead of 8 and 12 after a resume); the
    # schedule is global_step's, or under manual optimization (two optimizers a batch, the critic
    # first) the callback's own count of GECO's updates, saved in its state. (Exact lambda on
    # resume is the DataModules' and RandomState's: test_calibration_driven_lambda_resumes_exactly.)
    steps_per_batch = 2 if manual else 1
    measure = CalibrationStream.measure

    def _spy(measure, measured, callback):
        def spy(stream, *args):
            measured.append(callback.geco.num_updates - 1)  # this update's number: the count includes it
            return measure(stream, *args)

        return spy

    def fit(max_batches, ckpt_path=None):
        pl.seed_everything(0)
        model = tiny_conv_vae(model_class=TwoOptimizerVAE, critic_first=True) if manual else tiny_conv_vae()
        callback = GECOCallback(controller="pi", drive="calibration", calibration_every=3, calibration_batch_size=5,
                                calibration_dataset=TensorDataset(_images(20, 1)))
        measured = []
        monkeypatch.setattr(CalibrationStream, "measure", _spy(measure, measured, callback))
        # Saved where the configs save: at the validation after each epoch's last batch (8 a epoch).
        saving = [ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)] if ckpt_path is None else []
        trainer = quiet_trainer(max_steps=max_batches * steps_per_batch, limit_val_batches=1,
                                callbacks=[callback, *saving], enable_checkpointing=bool(saving))
        images = DataLoader(TensorDataset(_images(64, 0)), batch_size=8)
        trainer.fit(model, images, DataLoader(TensorDataset(_images(8, 2)), batch_size=8), ckpt_path=ckpt_path)
        return trainer, callback, measured

    _, uninterrupted, all_measured = fit(16)
    (after_one_epoch,) = tmp_path.glob("epoch=0-*.ckpt")
    _, resumed, then_measured = fit(16, ckpt_path=after_one_epoch)
    assert all_measured == [0, 3, 6, 9, 12, 15]
    assert then_measured == [9, 12, 15]
    assert resumed.geco.num_measurements == uninterrupted.geco.num_measurements == 6


def test_the_datamodule_calibration_split_drives_lambda(tmp_path):
    def fit(given):
        pl.seed_everything(0)
        data = ShapesDataModule(image_size=16, num_train=96, num_val=16, batch_size=16, num_calibration=32)
        data.setup("fit")
        callback = GECOCallback(controller="pi", drive="calibration", calibration_every=1, calibration_batch_size=8,
                                calibration_dataset=data.calibration_dataset if given else None)
        quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[callback]).fit(tiny_conv_vae(), data)
        return callback, callback.geco.log_lagrange_multiplier.tolist()

    found, found_lambda = fit(given=False)
    assert found.geco.num_measurements == 3 and found_lambda != [0.0]
    # The split the callback found on the DataModule is the one it measures: as if handed over.
    given, given_lambda = fit(given=True)
    assert given.geco.num_measurements == 3 and given_lambda == found_lambda
    # The training batches alone would move lambda elsewhere.
    pl.seed_everything(0)
    data = ShapesDataModule(image_size=16, num_train=96, num_val=16, batch_size=16, num_calibration=32)
    training = GECOCallback(controller="pi", drive="training")
    quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[training]).fit(tiny_conv_vae(), data)
    assert training.geco.log_lagrange_multiplier.tolist() != found_lambda


def test_calibration_without_a_split_says_how_to_get_one():
    callback = GECOCallback(drive="calibration")
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[callback])
    message = ("GECOCallback(drive='calibration') needs a calibration split the model does not train on: set the "
               "DataModule's num_calibration (e.g. --data.num_calibration 1000, or a tenth of a smaller training set) or pass "
               "GECOCallback(calibration_dataset=...).")
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.fit(tiny_conv_vae(), DataLoader(TensorDataset(_images(16, 0)), batch_size=8))


def test_a_calibration_split_of_training_images_is_refused_with_the_count():
    images = TensorDataset(_images(48, 0))
    training, calibration = torch.utils.data.random_split(images, [40, 8], generator=torch.Generator().manual_seed(0))
    # The whole training set, or a split that takes 3 of its images.
    for given, shared in ((training, 40), (torch.utils.data.Subset(images, [*calibration.indices, *training.indices[:3]]), 3)):
        callback = GECOCallback(drive="calibration", calibration_dataset=given)
        trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[callback])
        message = (f"GECOCallback: the calibration split shares {shared} of its {len(given)} images with the training set "
                   "(40 images): lambda would be steered by images the model trains on. Carve the calibration split "
                   "out of the training set (the DataModule's num_calibration does, e.g. --data.num_calibration 1000) "
                   "or use drive='training'.")
        with pytest.raises(ValueError, match=re.escape(message)):
            trainer.fit(tiny_conv_vae(), DataLoader(training, batch_size=8))
        assert callback.geco.num_measurements == 0


def test_a_calibration_split_that_is_the_validation_set_is_warned_once_and_a_split_of_its_own_is_not():
    data = ShapesDataModule(image_size=16, num_train=96, num_val=16, batch_size=16, num_calibration=32)
    data.setup("fit")
    warning = ("GECO: the calibration split shares 16 of its 16 images with the validation set (16 images): the "
               "validation reading, and the verdict from it, then judge images lambda was steered by")
    for given, warned in ((data.val_dataset, True), (data.calibration_dataset, False)):
        callback = GECOCallback(drive="calibration", calibration_every=1, calibration_batch_size=8, calibration_dataset=given)
        trainer = quiet_trainer(max_steps=4, val_check_interval=2, limit_val_batches=1, callbacks=[callback])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(tiny_conv_vae(), data)
        said = [str(w.message) for w in caught if "shares" in str(w.message)]
        assert [m[: len(warning)] for m in said] == ([warning] if warned else [])
        assert callback.geco.num_measurements == 4  # a warning: the run goes on


def test_shared_items_counts_the_stored_items_two_subsets_have_in_common():
    from torch.utils.data import Subset

    from lightning_geco.batches import identical_images, shared_items

    stored = TensorDataset(torch.arange(10.0))
    outer = Subset(Subset(stored, [9, 8, 7, 6, 5]), [0, 2, 4])  # stored items 9, 7, 5
    assert shared_items(outer, Subset(stored, [5, 6, 7])) == 2
    assert shared_items(outer, stored) == 3 and shared_items(stored, stored) == 10
    assert shared_items(outer, Subset(stored, [0, 1])) == 0
    # A copy that says what it holds (a DataModule's split moved to a device) is those items.
    copy = TensorDataset(stored.tensors[0][[5, 6]])
    copy.stored_items = (stored, [5, 6])
    assert shared_items(outer, copy) == 1 and shared_items(Subset(copy, [1]), Subset(stored, [6])) == 1
    # In-memory stores of their own (slices or copies of one tensor): identical images, by bytes.
    images = torch.rand(40, 1, 4, 4)
    assert identical_images(TensorDataset(images[:30]), TensorDataset(images[:10].clone(), torch.arange(10))) == 10
    assert identical_images(Subset(TensorDataset(images[20:].clone()), [0, 1, 19]), TensorDataset(images[:25])) == 2
    assert identical_images(TensorDataset(images[:20]), TensorDataset(images[20:])) == 0
    assert identical_images(TensorDataset(images[:5]), TensorDataset(images[:5].double())) == 0  # other bytes
    assert identical_images(outer, Subset(stored, [0])) is None  # one store: shared_items tells

    class Stored(torch.utils.data.Dataset):  # any other dataset: reading every image of both is not done
        def __len__(self):
            return 10

        def __getitem__(self, index):
            return images[index]

    assert shared_items(Stored(), TensorDataset(images)) is None and identical_images(Stored(), TensorDataset(images)) is None


def test_a_calibration_tensor_dataset_of_training_images_stored_apart_is_warned_and_a_device_split_is_not():
    # A new-user trial: TensorDataset(x[:1000]) to train on, TensorDataset(x[:300]) to calibrate on.
    images = _images(48, 0)
    callback = GECOCallback(drive="calibration", calibration_dataset=TensorDataset(images[:8].clone()))
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[callback])
    with pytest.warns(UserWarning, match=re.escape("GECO: 8 of the calibration split's 8 images are identical, byte for byte, "
                                                   "to training images: if the split was cut from the training set")):
        trainer.fit(tiny_conv_vae(), DataLoader(TensorDataset(images[:40]), batch_size=8))
    # The DataModule's own split moved to the device: told by its items, not by shapes that repeat
    # (12 of 200 generated shapes matched training ones byte for byte, and the fit was refused).
    data = ShapesDataModule(image_size=16, num_train=2000, num_val=100, num_calibration=200, batch_size=16, device="cpu")
    callback = GECOCallback(drive="calibration", calibration_every=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=2, limit_val_batches=1, callbacks=[callback]).fit(tiny_conv_vae(), data)
    assert not [w for w in caught if "calibration split" in str(w.message)] and callback.geco.num_measurements == 1
    # Nor the validation set of the shapes classifier config's sizes (5 of 2000 repeat by nature).
    data = ShapesDataModule(image_size=16, num_train=3000, num_val=2000, num_calibration=2000, batch_size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=2, limit_val_batches=1, callbacks=[GECOCallback(drive="calibration")]).fit(tiny_conv_vae(), data)
    assert not [w for w in caught if "calibration split" in str(w.message)]


def test_gather_is_default_collate_of_the_items_in_one_indexing_operation():
    from lightning_geco.datamodules import UInt8Images
    from torch.utils.data import Subset, TensorDataset, default_collate

    from lightning_geco.batches import gather

    images = torch.randint(0, 256, (20, 1, 4, 4), dtype=torch.uint8)
    stored = UInt8Images(images, torch.arange(20))
    for dataset in (stored, Subset(stored, list(range(19, -1, -1))), TensorDataset(torch.rand(20, 3), torch.arange(20))):
        indices = [3, 0, 7, 7, 11]
        expected = default_collate([dataset[i] for i in indices])
        for got, want in zip(gather(dataset, indices), expected):
            assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# drive="auto" (the default): the calibration split when the training batches would read better
# than new images, the training batches otherwise.


class OptimisticMSE(ReconstructionMSE):
    """An MSE read as if by a network fit to the training images (what a classifier's CE is)."""

    optimistic_on_training_images = True


def _fit(drive, max_steps, constraint=None, num_calibration=32, trainer_kwargs=None, ckpt_path=None,
         save_to=None, random_state=False, **callback_kwargs):
    """The shapes (64 training images, 4 batches an epoch, after ``num_calibration``) fitted for
    ``max_steps``; returns the callback and lambda after every step. ``random_state`` adds
    :class:`RandomState`, so a resumed fit draws the noise the uninterrupted one draws."""
    pl.seed_everything(0)
    data = ShapesDataModule(image_size=16, num_train=64 + num_calibration, num_val=16, batch_size=16,
                            num_calibration=num_calibration)
    model = tiny_conv_vae(objective=GECOObjective([constraint or ReconstructionMSE(0.05)]))
    callback = GECOCallback(drive=drive, calibration_every=2, calibration_batch_size=8, **callback_kwargs)
    trajectory = []

    class Trace(pl.Callback):
        def on_train_batch_end(self, *args):
            trajectory.append(callback.geco.log_lagrange_multiplier.tolist())

    extra = [RandomState()] if random_state else []
    trainer = quiet_trainer(
        max_steps=max_steps, limit_val_batches=0, callbacks=[callback, Trace(), *extra], **(trainer_kwargs or {})
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return callback, trajectory


def test_a_classifier_constraint_reads_the_training_images_optimistically():
    from lightning_geco import ClassificationConstraint, FeatureReconstruction

    assert ClassificationConstraint.optimistic_on_training_images
    assert not ReconstructionMSE.optimistic_on_training_images and not FeatureReconstruction.optimistic_on_training_images


def test_auto_drive_measures_an_optimistic_constraint_on_the_calibration_split_exactly_as_drive_calibration(caplog):
    assert GECOCallback().drive == "auto"
    with caplog.at_level("INFO"):
        auto, auto_lambda = _fit("auto", 4, OptimisticMSE(0.05))
    calibration, calibration_lambda = _fit("calibration", 4, OptimisticMSE(0.05))
    assert auto.active_drive == "calibration" and auto.geco.num_measurements == 2  # steps 0 and 2
    assert auto_lambda == calibration_lambda and auto_lambda[-1] != auto_lambda[0]
    assert ("GECO: lambda is driven by the calibration split (32 images; 8 drawn from it, with replacement, every 2 steps): 'reconstruction' reads "
            "the training images optimistically (its reader may have trained on them).") in caplog.text


def test_auto_drive_measures_on_the_calibration_split_once_a_run_sees_its_images_more_than_eight_times(caplog):
    with caplog.at_level("INFO"):
        auto, _ = _fit("auto", 36)  # 36 steps of 4 an epoch: 9 epochs
    assert auto.active_drive == "calibration" and auto.geco.num_measurements == 18
    assert "the run sees each training image 9 times (more than 8)" in caplog.text
    eight, _ = _fit("auto", 32)  # 8 epochs: not more than 8
    assert eight.active_drive == "training" and eight.geco.num_measurements == 0


def test_auto_drive_uses_the_training_batches_exactly_as_drive_training_when_they_read_as_new_images_do():
    auto, auto_lambda = _fit("auto", 4)
    training, training_lambda = _fit("training", 4)
    assert auto.active_drive == "training" and auto.geco.num_measurements == 0
    assert auto_lambda == training_lambda


def test_auto_drive_without_a_calibration_split_warns_with_the_fix_and_uses_the_training_batches():
    message = ("GECO: 'reconstruction' reads the training images optimistically (its reader may have trained on "
               "them). Lambda is driven by the training batches because there is no calibration split, and the "
               "tolerance may be missed on new images: carve one with the DataModule's num_calibration (e.g. "
               "--data.num_calibration 1000, or a tenth of a smaller training set) or pass "
               "GECOCallback(calibration_dataset=...).")
    with pytest.warns(UserWarning, match=re.escape(message)):
        auto, _ = _fit("auto", 4, OptimisticMSE(0.05), num_calibration=0)
    assert auto.active_drive == "training"


class OwnVAE(pl.LightningModule):
    """A module of the user's: one 1x1 convolution and noise (as a sampled z would draw), the rate 0;
    ``forward(x)`` alone."""

    def __init__(self, constraint):
        super().__init__()
        self.net = torch.nn.Conv2d(1, 1, 1)
        self.objective = GECOObjective([constraint])

    def output(self, x):
        from lightning_geco.records import VAEOutput

        noise = 0.1 * torch.randn_like(x)  # draws from the random state the try must leave alone
        return VAEOutput.from_terms(x, torch.sigmoid(self.net(x) + noise), torch.zeros(len(x)))

    def forward(self, x):
        return self.output(x)

    def training_step(self, batch, batch_idx):
        output = self.output(batch[0])
        return self.objective.lagrangian(output.rate, output.x, output.reconstruction)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class MeasurableOwnVAE(OwnVAE):
    """The same, taking ``model(x, labels)`` as the collection's models do."""

    def forward(self, x, labels=None):
        return self.output(x)


def _own_fit(module_class, constraint, drive="auto", max_steps=40, num_calibration=32):
    """A ``module_class(constraint)`` built after seeding, fitted on 64 shapes (after
    ``num_calibration`` more carved as the calibration split): 10 epochs at 40 steps. Returns
    the callback and the module."""
    pl.seed_everything(0)
    data = ShapesDataModule(image_size=16, num_train=64 + num_calibration, num_val=16, batch_size=16,
                            num_calibration=num_calibration)
    callback = GECOCallback(drive=drive, calibration_every=2)
    module = module_class(constraint)
    quiet_trainer(max_steps=max_steps, limit_val_batches=0, callbacks=[callback]).fit(module, data)
    return callback, module


def test_auto_drive_leaves_a_module_of_your_own_on_the_training_batches_and_says_why(recwarn, caplog):
    with caplog.at_level("INFO"):
        callback, _ = _own_fit(OwnVAE, ReconstructionMSE(0.05))
    assert callback.active_drive == "training"  # 10 epochs, but forward(x, labels) is not there to measure
    assert not [w for w in recwarn if "GECO:" in str(w.message)]  # said in one line, not warned
    said = ("Lambda is driven by the training batches: drive='auto' tried OwnVAE(x, labels) (or OwnVAE(x): images "
            "without labels) on one calibration image to measure the split, and it failed (it cannot be called so (")
    assert said in caplog.text
    # The fix is said once (it was said twice, in ~700 characters).
    assert caplog.text.count("VAEOutput.from_terms") == 1
    message = ("there is no calibration split (the DataModule's num_calibration, or GECOCallback(calibration_dataset=...)). "
               "A module of your own is measured on the split when its forward(x, labels=None) returns "
               "VAEOutput.from_terms(x, reconstruction, rate, labels=labels). The tolerance may be missed on new images.")
    with pytest.warns(UserWarning, match=re.escape(message)):
        callback, _ = _own_fit(OwnVAE, OptimisticMSE(0.05), max_steps=4, num_calibration=0)
    assert callback.active_drive == "training"


def test_a_module_of_your_own_without_labels_is_measured_on_a_split_without_labels_as_model_x():
    # A forward(self, x) was tried as model(x, None) on a split of bare images, failed, and the
    # split the user gave was dropped for the training batches.
    pl.seed_everything(0)
    data = ShapesDataModule(image_size=16, num_train=64, num_val=16, batch_size=16)
    callback = GECOCallback(drive="auto", calibration_every=2, calibration_dataset=TensorDataset(_images(8, 3)))
    quiet_trainer(max_steps=6, limit_val_batches=0, callbacks=[callback]).fit(OwnVAE(ReconstructionMSE(0.05)), data)
    assert callback.active_drive == "calibration" and callback.geco.num_measurements == 3


def test_auto_drive_measures_a_module_of_your_own_whose_forward_takes_labels_exactly_as_drive_calibration():
    # The one-image try leaves the model and the training's random state as they were: the run
    # is the explicit calibration drive's, bit for bit.
    auto, _ = _own_fit(MeasurableOwnVAE, ReconstructionMSE(0.05))
    assert auto.active_drive == "calibration" and auto.geco.num_measurements == 20
    explicit, _ = _own_fit(MeasurableOwnVAE, ReconstructionMSE(0.05), drive="calibration")
    assert torch.equal(auto.geco.log_lagrange_multiplier, explicit.geco.log_lagrange_multiplier)
    assert torch.equal(auto.geco.constraint_ema, explicit.geco.constraint_ema)


class FrozenPartOwnVAE(MeasurableOwnVAE):
    """With a submodule the user froze in eval mode (a BatchNorm kept at its running statistics)."""

    def __init__(self, constraint):
        super().__init__(constraint)
        self.frozen = torch.nn.BatchNorm2d(1).eval()


def test_measuring_leaves_each_submodule_in_the_mode_it_had():
    callback, module = _own_fit(FrozenPartOwnVAE, ReconstructionMSE(0.05))
    assert callback.active_drive == "calibration" and callback.geco.num_measurements == 20
    assert module.training and module.net.training and not module.frozen.training


@pytest.mark.parametrize(
    ("max_steps", "trainer_kwargs", "drive"),
    [
        (-1, {"max_epochs": 9}, "calibration"),  # max_epochs alone
        (-1, {"max_epochs": 8}, "training"),
        (1000, {"max_epochs": 3}, "training"),  # whichever ends the run first: 3 epochs
        (18, {"accumulate_grad_batches": 2}, "calibration"),  # 2 optimizer steps an epoch: 9 epochs
        (16, {"accumulate_grad_batches": 2}, "training"),
        (20, {"accumulate_grad_batches": 3}, "calibration"),  # ceil(4 / 3) = 2 steps an epoch: 10 epochs
    ],
)
def test_auto_drive_counts_the_epochs_the_run_will_take(max_steps, trainer_kwargs, drive):
    callback, _ = _fit("auto", max_steps, trainer_kwargs=trainer_kwargs)
    assert callback.active_drive == drive
    planned = {(-1, 9): 36, (-1, 8): 32, (1000, 3): 12}.get((max_steps, trainer_kwargs.get("max_epochs")), max_steps)
    assert callback.detector.last_step == planned  # the stall rule's horizon, from the same plan


def test_auto_drive_measures_a_calibration_set_it_is_given():
    images = _images(20, 1)
    callback, _ = _fit("auto", 4, num_calibration=0, calibration_dataset=TensorDataset(images, torch.zeros(20)))
    assert callback.active_drive == "calibration" and callback.geco.num_measurements == 2


def test_a_resumed_auto_run_keeps_the_drive_its_checkpoint_was_driven_by(tmp_path, caplog):
    path = tmp_path / "half.ckpt"
    first, first_lambda = _fit("auto", 4, OptimisticMSE(0.05), save_to=path, random_state=True)
    assert first.active_drive == "calibration"
    # The same constraint name without the reason: "auto" alone would now choose the training batches.
    message = ("GECO: drive='auto' would choose 'training' for this fit, but the checkpoint's lambda was driven by "
               "'calibration'; the resumed run keeps 'calibration'.")
    with pytest.warns(UserWarning, match=re.escape(message)):
        resumed, resumed_lambda = _fit("auto", 8, ReconstructionMSE(0.05), ckpt_path=path, random_state=True)
    assert resumed.active_drive == "calibration" and resumed.geco.num_measurements == 4  # steps 0, 2 and 4, 6
    full, full_lambda = _fit("auto", 8, OptimisticMSE(0.05), random_state=True)
    assert full.geco.num_measurements == 4
    # Goes on as the uninterrupted run, lambda to the bit (the constraints differ in their flag only).
    assert first_lambda + resumed_lambda == full_lambda and full_lambda[-1] != full_lambda[3]


def test_a_second_fit_with_the_same_callback_starts_its_watch_afresh():
    pl.seed_everything(0)
    callback = GECOCallback(calibration_every=2)
    data = ShapesDataModule(image_size=16, num_train=96, num_val=16, batch_size=16, num_calibration=32)
    model = tiny_conv_vae(objective=GECOObjective([OptimisticMSE(0.05)]))
    quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[callback]).fit(model, data)
    first = callback.detector
    assert callback.last_calibration is not None
    quiet_trainer(max_steps=40, limit_val_batches=0, callbacks=[callback]).fit(model, data)
    assert callback.detector is not first and callback.detector.last_step == 40


def test_a_fit_after_a_resumed_one_chooses_its_drive_afresh(tmp_path):
    path = tmp_path / "half.ckpt"
    _fit("auto", 4, OptimisticMSE(0.05), save_to=path)  # driven by the calibration split
    pl.seed_everything(0)
    data = ShapesDataModule(image_size=16, num_train=96, num_val=16, batch_size=16, num_calibration=32)
    callback = GECOCallback(calibration_every=2, calibration_batch_size=8)
    with pytest.warns(UserWarning, match="the resumed run keeps 'calibration'"):
        quiet_trainer(max_steps=8, limit_val_batches=0, callbacks=[callback]).fit(
            tiny_conv_vae(objective=GECOObjective([ReconstructionMSE(0.05)])), data, ckpt_path=path
        )
    assert callback.active_drive == "calibration"
    # The same callback, a new fit with no checkpoint and no reason for the split.
    quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[callback]).fit(
        tiny_conv_vae(objective=GECOObjective([ReconstructionMSE(0.05)])), data
    )
    assert callback.active_drive == "training" and callback.geco.num_measurements == 0

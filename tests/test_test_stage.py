"""The test stage: ``trainer.test`` / ``train.py test`` read a trained model on the DataModule's
test split, its verdict on those images, and ``trainer.predict``."""

import json
import re
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from lightning_geco.datamodules import (
    CelebADataModule,
    CIFAR10DataModule,
    DSpritesDataModule,
    EMNISTDataModule,
    MissingDatasetError,
    MNISTDataModule,
    NoTestSplitError,
    ShapesDataModule,
)
from lightning_geco.datamodules.dsprites import FILE_NAME
from lightning_geco.datamodules.shapes import _image_keys
from torch.utils.data import DataLoader, TensorDataset

from helpers import make_celeba, make_cifar, make_dsprites, make_mnist, quiet_trainer, random_images, tiny_conv_vae
from lightning_geco import ConvVAE, GECOCallback, GECOObjective, ReconstructionMSE, RunSummary
from lightning_geco.cli import main

REPO = Path(__file__).resolve().parents[1]


def _labelled(n=24, seed=0):
    return TensorDataset(random_images(n, (1, 16, 16), seed=seed), torch.arange(n) % 3)


def test_the_test_split_reads_as_the_validation_does_and_never_moves_lambda():
    pl.seed_everything(0)
    model = tiny_conv_vae(objective=GECOObjective([ReconstructionMSE(0.05)]))
    callback = GECOCallback()
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[callback])
    trainer.fit(model, DataLoader(_labelled(), batch_size=8))
    trained = model.objective.multipliers.log_lagrange_multiplier.clone()
    loader = DataLoader(_labelled(seed=1), batch_size=8)
    trainer = quiet_trainer(callbacks=[callback])
    pl.seed_everything(1)  # the same latent noise for both passes
    trainer.validate(model, loader, verbose=False)
    validation = {k[len("val/") :]: v.clone() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    pl.seed_everything(1)
    trainer.test(model, loader, verbose=False)
    test = {k[len("test/") :]: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    assert set(test) == set(validation) and {"distortion", "rate", "marginal_kl", "distortion/standard_error"} <= set(test)
    for key, value in validation.items():
        torch.testing.assert_close(test[key], value, rtol=0, atol=0, msg=key)
    assert torch.equal(model.objective.multipliers.log_lagrange_multiplier, trained)
    assert callback.geco.num_updates == 3


def _fit_and_save(tmp_path, tolerance, steps=3):
    pl.seed_everything(0)
    model = tiny_conv_vae(objective=GECOObjective([ReconstructionMSE(tolerance)]))
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=[GECOCallback()])
    trainer.fit(model, DataLoader(_labelled(), batch_size=8))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    return model


@pytest.mark.parametrize("tolerance, outcome", [(0.5, "met"), (0.001, "not_met")])
@pytest.mark.parametrize("stage", ["test", "validate"])
def test_the_run_summary_gives_the_verdict_on_the_evaluated_set_and_the_evaluated_step(tmp_path, tolerance, outcome, stage):
    trained = _fit_and_save(tmp_path, tolerance)
    summary = RunSummary()
    trainer = quiet_trainer(callbacks=[summary], default_root_dir=tmp_path)
    model = tiny_conv_vae(objective=GECOObjective([ReconstructionMSE(tolerance)]))
    evaluate = trainer.test if stage == "test" else trainer.validate
    evaluate(model, DataLoader(_labelled(seed=1), batch_size=8), ckpt_path=tmp_path / "model.ckpt", verbose=False)
    result, line, path = (
        (summary.test_summary, summary.test_verdict_line, summary.test_path)
        if stage == "test"
        else (summary.validate_summary, summary.validate_verdict_line, summary.validate_path)
    )
    logged = "test" if stage == "test" else "val"
    distortion = float(trainer.callback_metrics[f"{logged}/distortion"])
    assert result["distortion"] == distortion and result["global_step"] == 3
    assert result["lambda"] == trained.objective.lagrange_multiplier.item()
    assert result["relative_violation"] == pytest.approx((distortion - tolerance) / tolerance, rel=1e-12)
    assert result["verdict"] == outcome and result["satisfied"] == (outcome == "met")
    percent = 100 * result["relative_violation"]
    clause = (
        f"distortion {distortion:.4g} <= {tolerance:.4g} ({-percent:.1f} % better than asked)"
        if outcome == "met"
        else f"NOT MET: distortion {distortion:.4g} > {tolerance:.4g} ({percent:+.1f} %"
    )
    label = "GECO on the test set" if stage == "test" else "GECO on the validation set"
    assert line == result["verdict_line"] and line.startswith(f"{label}: {clause}")
    assert path == tmp_path / f"{stage}_summary.json"
    assert json.loads(path.read_text()) == {**result, "path": str(path)}
    assert summary.path is None and not (tmp_path / "summary.json").exists()  # the fit's file is not this one's
    assert summary.summary == {} and summary.verdict_line == ""
    assert result["checkpoint"] == str((tmp_path / "model.ckpt").resolve())


def test_the_test_summary_reads_the_step_of_a_weights_only_checkpoint(tmp_path):
    # A weights-only checkpoint has no callback states, so no callback hears of it being loaded.
    _fit_and_save(tmp_path, 0.05, steps=3)
    checkpoint = torch.load(tmp_path / "model.ckpt", weights_only=False)
    torch.save({k: checkpoint[k] for k in ("state_dict", "global_step", "epoch", "hyper_parameters", "pytorch-lightning_version")},
               tmp_path / "weights.ckpt")
    summary = RunSummary()
    model = tiny_conv_vae(objective=GECOObjective([ReconstructionMSE(0.05)]))
    quiet_trainer(callbacks=[summary], default_root_dir=tmp_path).test(
        model, DataLoader(_labelled(), batch_size=8), ckpt_path=tmp_path / "weights.ckpt", verbose=False
    )
    assert summary.test_summary["global_step"] == 3


def test_predict_gives_each_images_reconstruction_distortion_and_rate():
    model = tiny_conv_vae()
    dataset = _labelled(10)
    pl.seed_everything(0)
    batches = quiet_trainer().predict(model, DataLoader(dataset, batch_size=4))
    assert [b["reconstruction"].shape[0] for b in batches] == [4, 4, 2]
    images = dataset.tensors[0]
    model.eval()
    torch.testing.assert_close(torch.cat([b["reconstruction"] for b in batches]), model.reconstruct(images), rtol=0, atol=0)
    # The distortion and rate of one pass with a sampled code per image, as the validation reads
    # them. (Iterating the loader draws its base seed from the same generator as the noise.)
    pl.seed_everything(0)
    with torch.no_grad():
        passes = [model(x, labels) for x, labels in DataLoader(dataset, batch_size=4)]
    for key in ("distortion", "rate"):
        predicted = torch.cat([b[key] for b in batches])
        assert predicted.shape == (10,)
        torch.testing.assert_close(predicted, torch.cat([getattr(p, key) for p in passes]), rtol=0, atol=0, msg=key)
    # The distortion is that pass's, whose reconstruction comes with it.
    sampled = torch.cat([b["sampled_reconstruction"] for b in batches])
    torch.testing.assert_close(torch.cat([b["distortion"] for b in batches]), (sampled - images).pow(2).flatten(1).mean(1))


def test_the_mnist_family_tests_on_the_test_files_and_says_when_there_are_none(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    make_mnist(raw, 64, "train", gzipped=True)
    test_images, test_labels = make_mnist(raw, 24, "t10k", gzipped=True, seed=1)
    data = MNISTDataModule(str(tmp_path), num_val=16, batch_size=10)
    data.setup("test")
    images, labels = zip(*data.test_dataloader())
    assert data.train_dataset is None  # the test stage reads the test files alone
    assert torch.equal(torch.cat(images), test_images.unsqueeze(1).float() / 255)
    assert torch.equal(torch.cat(labels), test_labels.long())
    message = ("MNISTDataModule(source='test') trains and validates on the test files: no test split is left. "
               "Train with source='train' (--data.source train) to test on the test files.")
    with pytest.raises(NoTestSplitError, match=re.escape(message)):
        MNISTDataModule(str(tmp_path), source="test").test_dataloader()
    make_mnist(tmp_path / "other" / "MNIST" / "raw", 64, "train", gzipped=True)
    with pytest.raises(MissingDatasetError, match=re.escape("MNIST (test split)")):
        MNISTDataModule(str(tmp_path / "other")).test_dataloader()


def test_cifar_celeba_and_the_shapes_have_test_splits_and_dsprites_says_it_has_none(tmp_path):
    written = make_cifar(tmp_path / "cifar-10-batches-py", per_batch=6)
    cifar = CIFAR10DataModule(str(tmp_path), num_val=6)
    cifar.test_dataloader()
    assert torch.equal(cifar.test_dataset.images.flatten(1), written["test_batch"][0])

    make_celeba(tmp_path / "celeba", partitions=[0] * 4 + [1] * 2 + [2] * 3)
    celeba = CelebADataModule(str(tmp_path), num_workers=0)
    celeba.test_dataloader()
    assert [p.name for p in celeba.test_dataset.files] == ["000007.jpg", "000008.jpg", "000009.jpg"]

    shapes = ShapesDataModule(image_size=16, num_train=64, num_val=32, num_test=48)
    shapes.setup("fit")
    shapes.test_dataloader()
    test_images = shapes.test_dataset.tensors[0]
    assert test_images.shape == (48, 1, 16, 16)
    again = ShapesDataModule(image_size=16, num_train=64, num_val=32, num_test=48)
    again.test_dataloader()
    assert torch.equal(again.test_dataset.tensors[0], test_images)  # a function of the seed
    assert not torch.equal(shapes.val_dataset.tensors[0][:32], test_images[:32])
    # No test image is a training or validation one (the finite grid gave 5 % repeats at the defaults).
    seen = set(_image_keys(torch.cat([shapes.train_dataset.tensors[0], shapes.val_dataset.tensors[0]])))
    assert not seen & set(_image_keys(test_images))
    small = ShapesDataModule(image_size=8, num_train=64, num_val=32, num_test=48)
    small.test_dataloader()
    assert not set(_image_keys(small.test_dataset.tensors[0])) & set(
        _image_keys(torch.cat([t.tensors[0] for t in small.build_splits()]))
    )
    with pytest.raises(ValueError, match=r"at image_size 8 the training and validation splits \(5000 and 32 shapes\) hold "
                       r"almost every image the grid gives \(\d+ distinct\): \d+ of num_test=48 test shapes were still"):
        ShapesDataModule(image_size=8, num_train=5000, num_val=32, num_test=48).test_dataloader()
    with pytest.raises(ValueError, match=re.escape("ShapesDataModule num_test must be positive, got 0.")):
        ShapesDataModule(num_test=0)

    make_dsprites(tmp_path / "dsprites" / FILE_NAME, n=16)
    message = ("DSpritesDataModule has no test split: its data are one set, split into training and validation. "
               "Evaluate on the validation split (train.py validate) instead.")
    with pytest.raises(NoTestSplitError, match=re.escape(message)):
        DSpritesDataModule(str(tmp_path)).test_dataloader()


def test_emnist_tests_on_its_test_files(tmp_path):
    from test_more_datasets import _make_emnist

    _make_emnist(tmp_path, "letters", "train", 20)
    upright, _ = _make_emnist(tmp_path, "letters", "test", 12)
    data = EMNISTDataModule(str(tmp_path), split="letters", num_val=4)
    data.test_dataloader()
    assert torch.equal(data.test_dataset.images, upright.unsqueeze(1))


def _small_default(*extra):
    return ["--config", str(REPO / "configs" / "default.yaml"), "--trainer.logger", "false",
            "--data.init_args.num_train", "64", "--data.init_args.num_val", "32", "--data.init_args.num_test", "32",
            "--data.init_args.batch_size", "16", *extra]


def test_train_py_test_reads_the_last_checkpoint_and_prints_the_verdict_then_the_path(capsys):
    for subcommand in ("test", "validate"):
        with pytest.raises(SystemExit) as exit_:
            main([subcommand, *_small_default()])
        assert exit_.value.code == 2
        assert (f"train.py {subcommand} reads a trained model: pass --ckpt_path PATH, or --ckpt_path last for "
                "this config's newest run.") in capsys.readouterr().err
    # Before any training, "last" finds nothing: test and validate refuse (an untrained model's
    # figures would read as the trained one's); only fit starts afresh.
    for subcommand in ("test", "validate"):
        with pytest.raises(SystemExit) as exit_:
            main([subcommand, *_small_default("--ckpt_path", "last")])
        assert exit_.value.code == 2
        assert ("error: --ckpt_path last: no checkpoint under runs/checkpoints/default/<run id>/; train one first "
                "(train.py fit).") in capsys.readouterr().err
    main(["fit", *_small_default("--trainer.max_steps", "2", "--trainer.num_sanity_val_steps", "0")])
    capsys.readouterr()
    main(["test", *_small_default("--ckpt_path", "last")])
    lines = capsys.readouterr().out.strip().splitlines()
    path = Path(lines[-1])
    assert path == Path("runs/test_summary.json").resolve()
    result = json.loads(path.read_text())
    assert lines[-2] == result["verdict_line"] and lines[-2].startswith("GECO on the test set: ")
    assert result["global_step"] == 2 and result["verdict"] in ("met", "not_met")
    assert result["verdict"] == ("met" if result["relative_violation"] <= 0.01 else "not_met")
    (tested,) = Path("runs/checkpoints/default").glob("*/last.ckpt")
    assert result["checkpoint"] == str(tested.resolve())
    # The trained run's config stays as it trained; the test's goes beside it.
    assert yaml.safe_load(Path("runs/config.yaml").read_text())["trainer"]["max_steps"] == 2
    assert "ckpt_path" in yaml.safe_load(Path("runs/test_config.yaml").read_text())
    # validate reads the same checkpoint on the validation split, and says so as test does.
    main(["validate", *_small_default("--ckpt_path", "last")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert Path(lines[-1]) == Path("runs/validate_summary.json").resolve()
    result = json.loads(Path(lines[-1]).read_text())
    assert lines[-2] == result["verdict_line"] and lines[-2].startswith("GECO on the validation set: ")
    assert result["global_step"] == 2 and result["checkpoint"] == str(tested.resolve())
    # Lightning's "best" names a file only in the process that trained: said so, with the way.
    with pytest.raises(SystemExit):
        main(["validate", *_small_default("--ckpt_path", "best")])
    assert ("error: --ckpt_path best: validate reads a checkpoint file, and 'best' names one only in the process "
            "that trained (its ModelCheckpoint's memory); pass the file's path (the runs are under "
            "runs/checkpoints/default/<run id>/) or --ckpt_path last (the config's newest run).") in capsys.readouterr().err


def test_ckpt_path_last_says_when_it_evaluates_an_interrupted_run(capsys, caplog):
    main(["fit", *_small_default("--trainer.max_steps", "2", "--trainer.num_sanity_val_steps", "0")])
    (last,) = Path("runs/checkpoints/default").glob("*/last.ckpt")
    checkpoint = torch.load(last, weights_only=False)  # as a run stopped at step 2 of 10 leaves it
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("GECOCallback")]
    checkpoint["callbacks"][key]["stall_detector"]["last_step"] = 10
    torch.save(checkpoint, last)
    capsys.readouterr()
    with caplog.at_level("INFO"):
        main(["validate", *_small_default("--ckpt_path", "last")])
    assert (f"--ckpt_path last: validate: run {last.parent.name} at step 2, of 10 planned: a run stopped before its "
            "end (interrupted, or stopped early)") in caplog.text


def test_a_test_with_only_the_test_files_checks_those_and_trainer_predict_reads_the_test_split(tmp_path):
    # A machine that holds MNIST's t10k files alone can test (prepare_data checks the test files).
    images, _ = make_mnist(tmp_path / "MNIST" / "raw", 20, "t10k", gzipped=True)
    model = tiny_conv_vae(image_shape=(1, 28, 28))
    data = MNISTDataModule(str(tmp_path), batch_size=8)
    quiet_trainer().test(model, datamodule=data, verbose=False)
    # trainer.predict with the DataModule reads the same test split, in order.
    batches = quiet_trainer().predict(model, datamodule=MNISTDataModule(str(tmp_path), batch_size=8))
    model.eval()
    reconstructions = torch.cat([b["reconstruction"] for b in batches])
    torch.testing.assert_close(reconstructions, model.reconstruct(images.unsqueeze(1).float() / 255), rtol=0, atol=0)
    # setup() of every stage and then the test loader: the test set is built when first asked for.
    shapes = ShapesDataModule(image_size=16, num_train=32, num_val=16, num_test=24, batch_size=8)
    shapes.setup()
    assert sum(x.shape[0] for x, _ in shapes.test_dataloader()) == 24


def test_a_tested_checkpoints_random_state_does_not_reach_a_later_fit():
    from types import SimpleNamespace

    from pytorch_lightning.trainer.states import TrainerFn

    from lightning_geco.resume import CHECKPOINT_KEY, RandomState

    callback = RandomState()
    checkpoint = {CHECKPOINT_KEY: [{"cpu": torch.get_rng_state()}]}
    testing = SimpleNamespace(world_size=1, global_rank=0, state=SimpleNamespace(fn=TrainerFn.TESTING))
    callback.on_load_checkpoint(testing, None, checkpoint)
    assert callback._to_restore is None  # a test trains nothing: nothing to restore
    fitting = SimpleNamespace(world_size=1, global_rank=0, state=SimpleNamespace(fn=TrainerFn.FITTING))
    callback.on_load_checkpoint(fitting, None, checkpoint)
    assert callback._to_restore is checkpoint[CHECKPOINT_KEY]
    callback.setup(fitting, None, "fit")  # a new stage starts with nothing pending
    assert callback._to_restore is None


def test_the_classifier_tests_as_it_validates():
    from lightning_geco.classifier import ImageClassifier

    pl.seed_everything(0)
    classifier = ImageClassifier(image_shape=(1, 16, 16), num_classes=3, widths=(8, 8), hidden_dim=16)
    loader = DataLoader(_labelled(), batch_size=8)
    trainer = quiet_trainer()
    trainer.validate(classifier, loader, verbose=False)
    validation = {k: v.clone() for k, v in trainer.callback_metrics.items()}
    trainer.test(classifier, loader, verbose=False)
    for name in ("loss", "accuracy"):
        torch.testing.assert_close(trainer.callback_metrics[f"test/{name}"], validation[f"val/{name}"], rtol=0, atol=0)


def test_a_model_trained_on_the_test_files_is_never_tested_on_them(tmp_path):
    # KMNIST's config trains on the test files (source 'test'); testing its checkpoint with
    # source 'train' would read the very images it trained on as its test split.
    raw = tmp_path / "MNIST" / "raw"
    make_mnist(raw, 40, "t10k", gzipped=True)
    make_mnist(raw, 40, "train", gzipped=True, seed=1)
    model = tiny_conv_vae(image_shape=(1, 28, 28))
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[GECOCallback()])
    trainer.fit(model, datamodule=MNISTDataModule(str(tmp_path), source="test", num_val=8, batch_size=8))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    assert torch.load(tmp_path / "model.ckpt", weights_only=False)["MNISTDataModule"]["source"] == "test"
    # Only a DataModule's name of its files is recorded (Omniglot's `source` is a method).
    from lightning_geco.datamodules import OmniglotDataModule

    assert OmniglotDataModule("nowhere").state_dict() == {
        "shuffle_seed": None, "source": None,
        "split": {"seed": 0, "num_val": 500, "num_calibration": 0, "num_items": None, "source": None,
                  "dataset": "OmniglotDataModule"},
        "calibration": {"num_calibration": 0, "num_items": None}, "batch_size": 64, "world_size": None,
    }
    message = ("the checkpoint was trained on MNISTDataModule's test files (source 'test'), so its test split is its own "
               "training data. Test a model trained with source 'train' (--data.source train).")
    with pytest.raises(NoTestSplitError, match=re.escape(message)):
        quiet_trainer().test(model, datamodule=MNISTDataModule(str(tmp_path), batch_size=8), ckpt_path=tmp_path / "model.ckpt")
    # Also from a DataModule that tested another checkpoint first (its test set was cached, and
    # the refusal was asked only when the set was built).
    other = tiny_conv_vae(image_shape=(1, 28, 28))
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[GECOCallback()])
    trainer.fit(other, datamodule=MNISTDataModule(str(tmp_path), num_val=8, batch_size=8))
    trainer.save_checkpoint(tmp_path / "other.ckpt")
    data = MNISTDataModule(str(tmp_path), num_val=8, batch_size=8)
    quiet_trainer().test(other, datamodule=data, ckpt_path=tmp_path / "other.ckpt", verbose=False)
    with pytest.raises(NoTestSplitError, match=re.escape(message)):
        quiet_trainer().test(model, datamodule=data, ckpt_path=tmp_path / "model.ckpt")
    # A model loaded on its own carries where it trained (it was tested on those files, with no word).
    loaded = ConvVAE.load_from_checkpoint(tmp_path / "model.ckpt")
    with pytest.raises(NoTestSplitError, match=re.escape(message)):
        quiet_trainer().test(loaded, datamodule=MNISTDataModule(str(tmp_path), batch_size=8), verbose=False)
    with pytest.raises(NoTestSplitError, match=re.escape(message)):
        quiet_trainer().predict(loaded, datamodule=MNISTDataModule(str(tmp_path), batch_size=8))
    other_loaded = ConvVAE.load_from_checkpoint(tmp_path / "other.ckpt")
    quiet_trainer().test(other_loaded, datamodule=MNISTDataModule(str(tmp_path), batch_size=8), verbose=False)


def test_a_shapes_model_is_tested_only_on_the_test_split_drawn_apart_from_its_own_training_shapes(tmp_path):
    # The test split leaves out the DataModule's own training shapes: with another seed than the
    # model's, 119 of 2,000 test shapes at 32 x 32 were that model's training images, silently.
    shapes = lambda **kwargs: ShapesDataModule(**{"image_size": 16, "num_train": 64, "num_val": 16,  # noqa: E731
                                                  "num_test": 16, "batch_size": 8, **kwargs})
    model = tiny_conv_vae(image_shape=(1, 16, 16))
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[GECOCallback()])
    trainer.fit(model, datamodule=shapes())
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    message = ("ShapesDataModule has seed=1 (it trained on 0), num_train=32 (it trained on 64): its test split is drawn "
               "apart from its own training shapes, not the checkpoint's model's, and may hold images that model "
               "trained on. Test with --data.seed 0 --data.num_train 64 --data.num_val 16 --data.image_size 16.")
    loaded = ConvVAE.load_from_checkpoint(tmp_path / "model.ckpt")
    for run in (
        lambda data: quiet_trainer().test(model, datamodule=data, ckpt_path=tmp_path / "model.ckpt", verbose=False),
        lambda data: quiet_trainer().test(loaded, datamodule=data, verbose=False),  # on its own: its record
        lambda data: quiet_trainer().predict(loaded, datamodule=data),
    ):
        with pytest.raises(NoTestSplitError, match=re.escape(message)):
            run(shapes(seed=1, num_train=32))
        run(shapes(num_test=8))  # the same shapes trained on: another test size is fine
    # The refusal stays with that model: a model trained on the other shapes tests on them (the
    # DataModule kept the loaded model's record, and refused this one, nor kept its training order).
    other_shapes = shapes(seed=1, num_train=32)
    with pytest.raises(NoTestSplitError, match=re.escape(message)):
        quiet_trainer().test(loaded, datamodule=other_shapes, verbose=False)
    quiet_trainer().validate(loaded, datamodule=other_shapes, verbose=False)
    assert other_shapes.shuffle_seed is None
    other = tiny_conv_vae(image_shape=(1, 16, 16))
    quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[GECOCallback()]).fit(other, datamodule=other_shapes)
    quiet_trainer().test(other, datamodule=other_shapes, verbose=False)


def test_train_py_test_refuses_data_without_a_test_split_before_any_run_starts(capsys):
    from types import SimpleNamespace

    from lightning_geco.cli import GECOLightningCLI

    # before_test runs before the Trainer starts the W&B run (as before_fit's checks do).
    cli = SimpleNamespace(datamodule=DSpritesDataModule("nowhere"), resumed_run_id=None, trainer=None)
    with pytest.raises(SystemExit) as exit_:
        GECOLightningCLI.before_test(cli)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "error: DSpritesDataModule has no test split: its data are one set, split into training and validation. "
        "Evaluate on the validation split (train.py validate) instead.\n"
    )


def test_a_summary_written_under_a_relative_folder_names_its_absolute_path(tmp_path, monkeypatch):
    # A trial's own module with default_root_dir="out_calibration" wrote "path": "out_calibration/summary.json".
    _fit_and_save(tmp_path, 0.5)
    monkeypatch.chdir(tmp_path)
    summary = RunSummary()
    trainer = quiet_trainer(callbacks=[summary], default_root_dir="out")
    model = tiny_conv_vae(objective=GECOObjective([ReconstructionMSE(0.5)]))
    trainer.validate(model, DataLoader(_labelled(seed=1), batch_size=8), ckpt_path=tmp_path / "model.ckpt", verbose=False)
    assert summary.validate_summary["path"] == str((tmp_path / "out" / "validate_summary.json").resolve())


def test_a_validation_of_images_the_checkpoints_model_trained_on_is_refused(tmp_path):
    # Another split seed draws a validation set of mostly training images, a larger num_val adds
    # training images: both read optimistic figures, silently (a new-user trial's validate with
    # --data.seed 5). A smaller num_val is a subset; the test split is other files.
    raw = tmp_path / "MNIST" / "raw"
    make_mnist(raw, 48, "train", gzipped=True)
    make_mnist(raw, 16, "t10k", gzipped=True, seed=1)
    data = lambda **kwargs: MNISTDataModule(str(tmp_path), batch_size=8, **{"num_val": 16, **kwargs})  # noqa: E731
    model = tiny_conv_vae(image_shape=(1, 28, 28))
    quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[GECOCallback()]).fit(model, datamodule=data())
    checkpoint = tmp_path / "model.ckpt"
    model.trainer.save_checkpoint(checkpoint)
    assert torch.load(checkpoint, weights_only=False)["MNISTDataModule"]["split"] == {
        "seed": 0, "num_val": 16, "num_calibration": 0, "num_items": 48, "source": "train", "dataset": "MNISTDataModule"
    }
    refusals = {
        "seed=5 (it was 0): another draw, whose validation images are mostly ones the model trained on": data(seed=5),
        "num_val=24 (it was 16): the images beyond 16 were training images": data(num_val=24),
    }
    loaded = ConvVAE.load_from_checkpoint(checkpoint)  # on its own: no DataModule state restored
    for changed, datamodule in refusals.items():
        message = (f"MNISTDataModule: the checkpoint's model was trained with the split seed=0, num_val=16; this "
                   f"DataModule has {changed}. Use --data.seed 0 and --data.num_val 16 or fewer.")
        with pytest.raises(ValueError, match=re.escape(message)):
            quiet_trainer().validate(model, datamodule=datamodule, ckpt_path=checkpoint, verbose=False)
        # Load, then validate: the model carries its split (it was validated with no word).
        with pytest.raises(ValueError, match=re.escape(message)):
            quiet_trainer().validate(loaded, datamodule=data(**{"seed": 5} if "seed" in changed else {"num_val": 24}),
                                     verbose=False)
    quiet_trainer().validate(loaded, datamodule=data(num_val=8), verbose=False)  # a subset: fine
    # A checkpoint without the DataModule's state (written by hand): the model's own record of the split stands in.
    stripped = torch.load(checkpoint, weights_only=False)
    del stripped["MNISTDataModule"]
    torch.save(stripped, tmp_path / "stripped.ckpt")
    with pytest.raises(ValueError, match=re.escape("this DataModule has seed=5 (it was 0)")):
        quiet_trainer().validate(ConvVAE.load_from_checkpoint(tmp_path / "stripped.ckpt"), datamodule=data(seed=5),
                                 verbose=False)
    quiet_trainer().validate(model, datamodule=data(num_val=8), ckpt_path=checkpoint, verbose=False)
    quiet_trainer().test(model, datamodule=data(seed=5), ckpt_path=checkpoint, verbose=False)
    quiet_trainer().predict(model, datamodule=data(seed=5), ckpt_path=checkpoint)  # the test files too
    quiet_trainer().validate(model, datamodule=data(seed=5, source="test", num_val=8), ckpt_path=checkpoint, verbose=False)
    # Files with more images: the same seed draws another permutation, which nothing can check.
    make_mnist(tmp_path / "more" / "MNIST" / "raw", 56, "train", gzipped=True)
    more = MNISTDataModule(str(tmp_path / "more"), batch_size=8, num_val=16)
    with pytest.warns(UserWarning, match=r"the checkpoint's split was drawn from 48 images; this data has 56, so its split"):
        quiet_trainer().validate(model, datamodule=more, ckpt_path=checkpoint, verbose=False)
    # More calibration images than the checkpoint's run carved: the extra ones were trained on.
    message = ("MNISTDataModule: the checkpoint's run carved num_calibration=0 images from its training split; this "
               "resumed fit carves 8, and the 8 more are images the model trained on (a calibration drive would steer "
               "lambda by them). Resume with --data.num_calibration 0 or fewer.")
    with pytest.raises(ValueError, match=re.escape(message)):
        quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[GECOCallback()]).fit(
            model, datamodule=data(num_calibration=8), ckpt_path=checkpoint
        )
    # Another batch size: the resumed fit goes on with other batches (it said nothing).
    with pytest.warns(UserWarning, match=re.escape("the checkpoint's run trained with batch_size=8; this resumed fit has 16, so it")):
        quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[GECOCallback()]).fit(
            model, datamodule=MNISTDataModule(str(tmp_path), batch_size=16, num_val=16), ckpt_path=checkpoint
        )
    # Another number of processes: another global batch and order (only the random states said so).
    two_ranks = torch.load(checkpoint, weights_only=False)
    assert two_ranks["MNISTDataModule"]["world_size"] == 1
    two_ranks["MNISTDataModule"]["world_size"] = 2  # as a 2-process DDP run writes it
    torch.save(two_ranks, tmp_path / "two_ranks.ckpt")
    with pytest.warns(UserWarning, match=re.escape(
        "MNISTDataModule: the checkpoint's run trained on 2 process(es), a global batch of 16; this resumed fit runs on "
        "1, a global batch of 8, so it goes on with other batches than that run would have: it is not that run continued."
    )):
        quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[GECOCallback()]).fit(
            model, datamodule=data(), ckpt_path=tmp_path / "two_ranks.ckpt"
        )
    # The same global batch on another number of processes reads the same images in each batch
    # (ResumableSampler): nothing to say of the batches (a batch_size compared per process was warned).
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*other batches.*")
        quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[GECOCallback()]).fit(
            model, datamodule=MNISTDataModule(str(tmp_path), batch_size=16, num_val=16), ckpt_path=tmp_path / "two_ranks.ckpt"
        )
    # A resumed fit with a smaller num_val trains on the other held-out images too: warned; with a
    # calibration split, that split is another draw of the larger training split, mostly of
    # images the model trained on: refused (it steered lambda by them, silently).
    with pytest.warns(UserWarning, match=r"held out num_val=16; this resumed fit holds out 8 and trains on the other 8 too"):
        quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[GECOCallback()]).fit(
            model, datamodule=data(num_val=8), ckpt_path=checkpoint
        )
    message = ("MNISTDataModule: the checkpoint's run held out num_val=16; this resumed fit holds out 8, so its training "
               "split is larger and its calibration split another draw, mostly of images the model trained on (a calibration "
               "drive would steer lambda by them). Resume with --data.num_val 16 (a smaller num_val suits train.py validate).")
    with pytest.raises(ValueError, match=re.escape(message)):
        quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[GECOCallback()]).fit(
            model, datamodule=data(num_val=8, num_calibration=8), ckpt_path=checkpoint
        )


def test_train_py_refuses_another_split_before_its_wandb_run_starts(tmp_path, capsys):
    raw = tmp_path / "MNIST" / "raw"
    make_mnist(raw, 64, "train", gzipped=True)
    make_mnist(raw, 16, "t10k", gzipped=True, seed=1)
    config = [
        "--config", str(REPO / "configs" / "mnist_convvae_geco.yaml"), "--data.root", str(tmp_path),
        "--data.num_val", "16", "--data.num_calibration", "0", "--data.batch_size", "16",
        "--trainer.num_sanity_val_steps", "0",
    ]
    main(["fit", *config, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"])
    runs = sorted(Path("runs/wandb").glob("*run-*"))
    capsys.readouterr()
    for subcommand, extra in (("validate", []), ("fit", ["--trainer.max_steps", "4"])):
        with pytest.raises(SystemExit) as exit_:
            main([subcommand, *config, "--ckpt_path", "last", "--data.seed", "5", *extra])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.startswith(
            "error: MNISTDataModule: the checkpoint's model was trained with the split seed=0, num_val=16; this "
            "DataModule has seed=5 (it was 0)"
        )
    with pytest.raises(SystemExit):  # a resumed fit whose calibration split would be redrawn
        main(["fit", *config, "--ckpt_path", "last", "--data.num_val", "8", "--data.num_calibration", "8"])
    assert capsys.readouterr().err.startswith("error: MNISTDataModule: the checkpoint's run held out num_val=16; this resumed fit")
    assert sorted(Path("runs/wandb").glob("*run-*")) == runs  # refused before a W&B run started


def test_train_py_test_of_a_model_on_another_dataset_says_so(capsys):
    # A Fashion-MNIST checkpoint tested under the MNIST config (`last` was the newest run): Lightning
    # restores a DataModule's state by class name, so nothing was checked and nothing said.
    make_mnist(Path("data/MNIST/raw"), 40, "t10k", gzipped=True)
    main(["fit", *_small_default("--data.init_args.image_size", "28", "--trainer.max_steps", "2",
                                 "--trainer.num_sanity_val_steps", "0")])
    (last,) = Path("runs/checkpoints/default").glob("*/last.ckpt")
    capsys.readouterr()
    with pytest.warns(UserWarning, match=re.escape(
        "The checkpoint's model was trained on ShapesDataModule; this run tests it on MNISTDataModule, another dataset: "
        "its figures are of data it did not train on."
    )):
        main(["test", *_small_default("--data", "lightning_geco.datamodules.MNISTDataModule", "--data.root", "data",
                                      "--data.batch_size", "8", "--ckpt_path", str(last))])

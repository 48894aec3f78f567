"""A checkpoint is the whole model: objective, constraints, likelihood, lambda and the moving average."""

import math
import re
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from helpers import MODELS, build, quiet_trainer, random_images, save_classifier
from lightning_geco import (
    ELBO,
    BernoulliLikelihood,
    BetaVAE,
    CapacityBetaVAE,
    ClassificationConstraint,
    ConvVAE,
    FeatureReconstruction,
    FlowVAE,
    FrozenClassifier,
    GaussianLikelihood,
    GECOCallback,
    GECOObjective,
    ImageClassifier,
    KLWarmup,
    PatchNCC,
    ReconstructionBCE,
    ReconstructionMSE,
    SigmaVAE,
    TorchvisionFeatures,
)
from lightning_geco.rebuild import NotRebuildableError, instantiate, piece_config


def _resnet_weights(folder):
    import torchvision

    path = folder / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return str(path)


PIECES = {
    "ELBO": lambda tmp: ELBO(),
    "BetaVAE": lambda tmp: BetaVAE(2.5),
    "KLWarmup": lambda tmp: KLWarmup(warmup_steps=300, start_beta=0.1),
    "CapacityBetaVAE": lambda tmp: CapacityBetaVAE(gamma=50.0, max_capacity=12.0, capacity_steps=200),
    "SigmaVAE": lambda tmp: SigmaVAE(min_log_sigma=-5.0),
    "GECO, PSNR and pNCC": lambda tmp: GECOObjective(
        [ReconstructionMSE(25.0, unit="psnr"), PatchNCC(0.7, patch_size=5, stride=3, step_size=0.01)]
    ),
    "GECO, raw-unit MSE": lambda tmp: GECOObjective([ReconstructionMSE(3.0, peak=None, name="vectors")]),
    "GECO, BCE": lambda tmp: GECOObjective([ReconstructionBCE(0.2, name="bce", step_size=0.003)]),
    "GECO, classifier": lambda tmp: GECOObjective(
        [ReconstructionMSE(0.02), ClassificationConstraint(FrozenClassifier(str(save_classifier(tmp / "c.ckpt"))), 0.3, "prediction")]
    ),
    "GECO, torchvision features": lambda tmp: GECOObjective(
        [FeatureReconstruction(TorchvisionFeatures("resnet18", _resnet_weights(tmp), "layer1", mean=(0.5,) * 3, std=(0.25,) * 3), 0.4)]
    ),
    "Gaussian, learned sigma": lambda tmp: GaussianLikelihood(0.2, learn_sigma=True),
    "Bernoulli": lambda tmp: BernoulliLikelihood(),
}


@pytest.mark.parametrize("name", list(PIECES))
def test_every_piece_is_rebuilt_from_the_config_it_records(name, tmp_path):
    piece = PIECES[name](tmp_path)
    config = piece_config(piece, strict=True)
    rebuilt = instantiate(config)
    assert type(rebuilt) is type(piece)
    assert piece_config(rebuilt, strict=True) == config
    if isinstance(piece, GECOObjective):
        assert rebuilt.describe() == piece.describe()


class OwnConstraint(ReconstructionMSE):
    """A user's constraint that keeps an argument under another name."""

    def __init__(self, limit: float) -> None:
        super().__init__(limit)


def test_a_piece_that_does_not_state_its_arguments_is_recorded_by_class_and_loading_asks_for_it(tmp_path):
    objective = GECOObjective([OwnConstraint(0.05)])
    with pytest.raises(NotRebuildableError, match=r"OwnConstraint keeps no attribute for its argument\(s\) \['limit'\]"):
        piece_config(objective, strict=True)
    assert piece_config(objective) == {"class_path": "lightning_geco.objectives.GECOObjective"}
    model = _trained(build("ConvVAE", (1, 16, 16), objective=objective), tmp_path)
    with pytest.raises(NotRebuildableError, match=r"load_from_checkpoint\(path, objective=\.\.\.\)"):
        ConvVAE.load_from_checkpoint(tmp_path / "model.ckpt")
    loaded = ConvVAE.load_from_checkpoint(tmp_path / "model.ckpt", objective=GECOObjective([OwnConstraint(0.05)]))
    assert torch.equal(loaded.objective.lagrange_multiplier, model.objective.lagrange_multiplier)


class PassedOnConstraint(ReconstructionMSE):
    """A user's thin subclass that passes its arguments on through **kwargs."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)


def test_a_piece_that_passes_its_arguments_on_through_kwargs_is_recorded_by_class_alone():
    # Recorded with init_args {}: rebuilt with the defaults (MSE 0.01, named "reconstruction",
    # no step size) for a PSNR of 23 dB named "pix", silently.
    objective = GECOObjective([PassedOnConstraint(tolerance=23.0, unit="psnr", name="pix", step_size=0.5)])
    with pytest.raises(NotRebuildableError, match=re.escape(
        "PassedOnConstraint takes **kwargs, whose arguments are not recorded: name each argument in __init__, or "
        "override init_args() to state the arguments it was built with."
    )):
        piece_config(objective, strict=True)
    assert piece_config(objective) == {"class_path": "lightning_geco.objectives.GECOObjective"}
    assert piece_config(ELBO(), strict=True) == {"class_path": "lightning_geco.objectives.ELBO", "init_args": {}}


def test_a_checkpoint_naming_a_callable_that_is_no_piece_is_refused_before_it_is_called(tmp_path):
    # The file is data: a hyperparameter {"class_path": "os.system", "init_args": {...}} ran its command.
    _trained(build("ConvVAE", (1, 16, 16)), tmp_path)
    checkpoint = torch.load(tmp_path / "model.ckpt", weights_only=False)
    marker = tmp_path / "ran"
    checkpoint["hyper_parameters"]["objective"] = {"class_path": "os.makedirs", "init_args": {"name": str(marker)}}
    torch.save(checkpoint, tmp_path / "tampered.ckpt")
    with pytest.raises(NotRebuildableError, match=re.escape(
        "The checkpoint's objective is os.makedirs, which is not a Rebuildable piece (an objective, constraint, "
        "likelihood or frozen network), so it is not built from the file."
    )):
        ConvVAE.load_from_checkpoint(tmp_path / "tampered.ckpt")
    assert not marker.exists()


def _trained(model, folder, steps=6, callbacks=None, binary=False):
    torch.manual_seed(0)
    x = random_images(24, model.image_shape)
    x = (x > 0.5).float() if binary else x
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=callbacks if callbacks is not None else [GECOCallback()])
    trainer.fit(model, DataLoader(x, batch_size=8))
    trainer.save_checkpoint(folder / "model.ckpt")
    return model


def _same_outputs(a, b, x):
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a.reconstruct(x), b.reconstruct(x), rtol=0, atol=0)
        torch.manual_seed(1)
        first = a(x)
        torch.manual_seed(1)
        second = b(x)
    torch.testing.assert_close(first.rate, second.rate, rtol=0, atol=0)
    torch.testing.assert_close(a.objective(first), b.objective(second), rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_load_from_checkpoint_with_no_arguments_is_the_trained_geco_model(name, tmp_path):
    objective = GECOObjective([ReconstructionMSE(0.03), PatchNCC(0.6, patch_size=4, stride=4)])
    model = _trained(build(name, (1, 16, 16), objective=objective, likelihood=GaussianLikelihood(0.2)), tmp_path)
    assert bool(model.objective.multipliers.seeded)
    loaded = type(model).load_from_checkpoint(tmp_path / "model.ckpt")
    assert loaded.objective.describe() == [
        {"name": "reconstruction", "tolerance": 0.03, "unit": "mse"},
        {"name": "pncc", "tolerance": 0.6, "unit": "ncc"},
    ]
    for key, value in model.objective.multipliers.state_dict().items():
        assert torch.equal(loaded.objective.multipliers.state_dict()[key], value), key
    assert not torch.equal(loaded.objective.lagrange_multiplier, torch.ones(2))  # the trained lambda, not 1
    assert torch.equal(loaded.likelihood.log_sigma, model.likelihood.log_sigma)
    _same_outputs(model, loaded, random_images(4, (1, 16, 16), seed=3))


def test_a_model_with_torchvision_features_loads_where_the_weights_file_is_not(tmp_path):
    # Refused: the weights file had to exist wherever the model was loaded, though the model
    # checkpoint holds the network's weights (a FrozenClassifier's missing file was warned).
    torch.manual_seed(0)
    features = TorchvisionFeatures("resnet18", _resnet_weights(tmp_path), "layer1")
    model = _trained(build("ConvVAE", (1, 16, 16), objective=GECOObjective([FeatureReconstruction(features, 0.4)])), tmp_path)
    (tmp_path / "resnet18.pt").unlink()
    with pytest.warns(UserWarning, match=re.escape(f"Weights file {tmp_path / 'resnet18.pt'} for torchvision's resnet18 "
                                                   "not found: the network is built without weights")):
        loaded = ConvVAE.load_from_checkpoint(tmp_path / "model.ckpt")
    for name, value in model.objective.constraints[0].network.state_dict().items():
        assert torch.equal(loaded.objective.constraints[0].network.state_dict()[name], value), name
    with pytest.raises(FileNotFoundError, match="Weights file for torchvision's resnet18 not found"):
        TorchvisionFeatures("resnet18", str(tmp_path / "resnet18.pt"), "layer1")  # built by hand: still an error


def test_a_checkpoint_loaded_into_another_model_class_names_the_class_to_load_it_with(tmp_path):
    from lightning_geco.models.base import VAEModule

    model = _trained(build("ConvVAE", (1, 16, 16)), tmp_path)
    # The base class (or another variant) has other weights: a wall of unexpected keys before.
    message = ("The checkpoint holds a ConvVAE (lightning_geco.models.conv_vae.ConvVAE), whose weights this VAEModule "
               "does not have: load it with ConvVAE.load_from_checkpoint(path) (strict=False takes the weights that match).")
    with pytest.raises(ValueError, match=re.escape(message)):
        VAEModule.load_from_checkpoint(tmp_path / "model.ckpt")
    # strict=False takes the weights that match, as Lightning's load does (an encoder carried over).
    flow = FlowVAE.load_from_checkpoint(tmp_path / "model.ckpt", strict=False)
    assert torch.equal(flow.state_dict()["encoder.convs.0.weight"], model.state_dict()["encoder.convs.0.weight"])
    # The model's own class from a checkpoint of an earlier format loads (its keys upgraded on load).
    checkpoint = torch.load(tmp_path / "model.ckpt", weights_only=False)
    for key in [k for k in checkpoint["state_dict"] if k.startswith("objective.multipliers.")]:
        del checkpoint["state_dict"][key]
    torch.save(checkpoint, tmp_path / "earlier.ckpt")
    with pytest.warns(UserWarning):
        ConvVAE.load_from_checkpoint(tmp_path / "earlier.ckpt")

    class OwnHook(ConvVAE):  # a variant that overrides a hook has the same weights: it loads
        def reparameterization_noise(self, x, posterior):
            return super().reparameterization_noise(x, posterior)

    loaded = OwnHook.load_from_checkpoint(tmp_path / "model.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_a_model_with_a_classifier_constraint_loads_where_the_classifier_file_is_not(tmp_path):
    # The model checkpoint holds the classifier's weights; its file stayed on the training machine.
    classifier_file = save_classifier(tmp_path / "classifier.ckpt", bias=[0.5, -1.0, 2.0])
    constraint = ClassificationConstraint(FrozenClassifier(str(classifier_file)), 0.3, "prediction")
    model = _trained(build("ConvVAE", (1, 16, 16), objective=GECOObjective([ReconstructionMSE(0.02), constraint])), tmp_path)
    # A classifier trained by train.py carries LightningCLI's _class_path and _instantiator among
    # its hyperparameters, which the loaded model's hparams do not: still the same classifier
    # (every load warned "now holds another classifier").
    saved = torch.load(classifier_file, weights_only=False)
    saved["hyper_parameters"].update(_class_path="lightning_geco.ImageClassifier", _instantiator="pytorch_lightning.cli.instantiate_module")
    torch.save(saved, classifier_file)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*now holds another classifier.*")
        ConvVAE.load_from_checkpoint(tmp_path / "model.ckpt")
    classifier_file.unlink()
    with pytest.warns(UserWarning, match=re.escape(f"Classifier checkpoint {classifier_file} not found: the classifier is built")):
        loaded = ConvVAE.load_from_checkpoint(tmp_path / "model.ckpt")
    for name, value in model.objective.constraints[1].state_dict().items():
        assert torch.equal(loaded.objective.constraints[1].state_dict()[name], value), name
    assert loaded.objective.constraints[1].classifier.classifier.head.bias.tolist() == [0.5, -1.0, 2.0]
    _same_outputs(model, loaded, random_images(4, (1, 16, 16), seed=3))
    with pytest.raises(FileNotFoundError, match="Classifier checkpoint not found"):  # built by hand: the file is needed
        FrozenClassifier(str(classifier_file))
    # The file retrained at the same path with another architecture: the recorded one is built
    # (the file's, loaded first, could not take the model's weights: "Missing key(s)").
    other = ImageClassifier(image_shape=(1, 16, 16), num_classes=3, widths=(8, 8), hidden_dim=16, pooling="max")
    torch.save({"state_dict": other.state_dict(), "hyper_parameters": dict(other.hparams),
                "pytorch-lightning_version": pl.__version__}, classifier_file)
    with pytest.warns(UserWarning, match=re.escape(f"Classifier checkpoint {classifier_file} now holds another classifier")):
        retrained = ConvVAE.load_from_checkpoint(tmp_path / "model.ckpt")
    assert retrained.objective.constraints[1].classifier.classifier.head.bias.tolist() == [0.5, -1.0, 2.0]
    # A file that is no classifier's (the VAE's own checkpoint) is named so.
    with pytest.raises(ValueError, match=re.escape(f"Classifier checkpoint {tmp_path / 'model.ckpt'} is not an ImageClassifier checkpoint")):
        FrozenClassifier(str(tmp_path / "model.ckpt"))
    # Nor is a file torch cannot read (a save cut short): the same advice, not an unpickling trace.
    classifier_file.write_bytes(classifier_file.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(f"Classifier checkpoint {classifier_file} is not a checkpoint torch "
                                                   "can read (")) as refused:
        FrozenClassifier(str(classifier_file))
    assert str(refused.value).endswith("writes runs/checkpoints/mnist_classifier/last.ckpt.")


@pytest.mark.parametrize(
    "objective", [ELBO(), BetaVAE(3.0), KLWarmup(100, 0.2), CapacityBetaVAE(20.0, 5.0, 50), SigmaVAE(-4.0)], ids=type
)
def test_every_objective_kind_comes_back_from_a_checkpoint(objective, tmp_path):
    # A learned sigma where the loss reads the likelihood (it trains there, and comes back).
    likelihood = GaussianLikelihood(0.2, learn_sigma=objective.reads_log_likelihood)
    model = _trained(build("ConvVAE", (1, 16, 16), objective=objective, likelihood=likelihood), tmp_path, callbacks=[])
    loaded = ConvVAE.load_from_checkpoint(tmp_path / "model.ckpt")
    assert piece_config(loaded.objective, strict=True) == piece_config(objective, strict=True)
    # A schedule at the step the model reached, trained or loaded (the trained one stood a step
    # behind: a capacity 0.1 nats lower, a val/loss 2.5 nats apart in a user's run)
    assert loaded.objective.step == model.objective.step == model.global_step > 0
    assert loaded.objective.logged_values() == model.objective.logged_values()
    if objective.reads_log_likelihood:
        assert isinstance(loaded.likelihood.log_sigma, torch.nn.Parameter) and loaded.likelihood.log_sigma != math.log(0.2)
        assert torch.equal(loaded.likelihood.log_sigma, model.likelihood.log_sigma)
    _same_outputs(model, loaded, random_images(4, (1, 16, 16), seed=3))


@pytest.mark.parametrize("objective", [GECOObjective(), SigmaVAE()], ids=type)
def test_a_learned_sigma_that_the_loss_never_reads_is_refused(objective):
    message = (
        f"GaussianLikelihood learns log_sigma through its log-likelihood, which {type(objective).__name__}'s loss does "
        "not contain: it would never train (and DDP stops on the unused parameter). Use "
        "GaussianLikelihood(learn_sigma=False) with this objective"
    )
    # Refused when training starts: built (or loaded from a checkpoint made so) it is accepted.
    model = build("ConvVAE", (1, 16, 16), objective=objective, likelihood=GaussianLikelihood(0.2, learn_sigma=True))
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[GECOCallback()] if isinstance(objective, GECOObjective) else [])
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.fit(model, DataLoader(random_images(8, (1, 16, 16)), batch_size=4))


def test_a_bernoulli_model_loads_with_its_likelihood(tmp_path):
    model = build("ConvVAE", (1, 16, 16), objective=GECOObjective([ReconstructionBCE(0.3)]), likelihood=BernoulliLikelihood())
    _trained(model, tmp_path, binary=True)
    x = (random_images(4, (1, 16, 16), seed=3) > 0.5).float()
    loaded = ConvVAE.load_from_checkpoint(tmp_path / "model.ckpt")
    assert isinstance(loaded.likelihood, BernoulliLikelihood)
    assert loaded.objective.describe() == [{"name": "reconstruction", "tolerance": 0.3, "unit": "nats/element"}]
    _same_outputs(model, loaded, x)


def test_a_loaded_model_orders_its_traversal_panel_as_the_trained_one(tmp_path):
    # The per-dimension KL of the last validation picks the dimensions the panel moves; a loaded
    # model had none until it validated again, and moved dimensions 0, 1, 2, ... instead.
    model = build("ConvVAE", (1, 16, 16), objective=GECOObjective([ReconstructionMSE(0.03)]))
    torch.manual_seed(0)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[GECOCallback()])
    trainer.fit(model, DataLoader(random_images(16, model.image_shape), batch_size=8))
    model.kl_per_dimension = torch.tensor([0.1, 0.5, 0.0, 0.3] + [0.0] * (model.latent_dim - 4))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = ConvVAE.load_from_checkpoint(tmp_path / "model.ckpt")
    assert loaded.traversal_dimensions(3) == model.traversal_dimensions(3) == [1, 3, 0]
    assert ConvVAE(image_shape=(1, 16, 16)).traversal_dimensions(3) == [0, 1, 2]  # never validated


def test_validate_and_predict_from_a_checkpoint_read_the_trained_lambda(tmp_path):
    model = _trained(build("ConvVAE", (1, 16, 16), objective=GECOObjective([ReconstructionMSE(0.03)])), tmp_path)
    trained = float(model.objective.lagrange_multiplier)
    assert trained != 1.0
    fresh = build("ConvVAE", (1, 16, 16), objective=GECOObjective([ReconstructionMSE(0.03)]))
    trainer = quiet_trainer()  # no GECOCallback: validation only reads lambda
    loader = DataLoader(random_images(8, (1, 16, 16), seed=5), batch_size=8)
    trainer.validate(fresh, loader, ckpt_path=tmp_path / "model.ckpt", verbose=False)
    assert float(fresh.objective.lagrange_multiplier) == trained
    # The validation loss is the Lagrangian with the trained lambda: rate + lambda * D * C.
    metrics = trainer.callback_metrics
    constraint = float(metrics["val/distortion"]) - 0.03
    expected = float(metrics["val/rate"]) + trained * 256 * constraint
    assert float(metrics["val/loss"]) == pytest.approx(expected, rel=1e-4)
    loaded = ConvVAE.load_from_checkpoint(tmp_path / "model.ckpt")
    assert float(loaded.objective.lagrange_multiplier) == trained


def test_resuming_keeps_lambda_in_the_model_and_the_controller_state_in_the_callback(tmp_path):
    callback = GECOCallback(controller="pi")
    _trained(build("ConvVAE", (1, 16, 16), objective=GECOObjective([ReconstructionMSE(0.03)])), tmp_path, callbacks=[callback])
    checkpoint = torch.load(tmp_path / "model.ckpt", weights_only=False)
    assert "objective.multipliers.log_lagrange_multiplier" in checkpoint["state_dict"]
    saved = checkpoint["callbacks"]["GECOCallback"]["geco"]
    assert "log_lagrange_multiplier" not in saved and set(saved["controller"]) >= {"name", "integral"}


def _old_format(path, drop_likelihood=False):
    """Rewrite a checkpoint as the previous version wrote it: lambda only in the callback's state,
    no objective or likelihood among the hyperparameters."""
    checkpoint = torch.load(path, weights_only=False)
    weights = checkpoint["state_dict"]
    geco = checkpoint["callbacks"]["GECOCallback"]["geco"]
    geco["log_lagrange_multiplier"] = weights.pop("objective.multipliers.log_lagrange_multiplier")
    geco["constraint_ema"] = weights.pop("objective.multipliers.constraint_ema")
    geco["seeded"] = bool(weights.pop("objective.multipliers.seeded"))
    del checkpoint["hyper_parameters"]["objective"], checkpoint["hyper_parameters"]["likelihood"]
    torch.save(checkpoint, path)
    return geco


def test_a_checkpoint_of_the_previous_version_loads_its_lambda_and_says_what_to_pass(tmp_path):
    _trained(build("ConvVAE", (1, 16, 16), objective=GECOObjective([ReconstructionMSE(0.03)])), tmp_path)
    geco = _old_format(tmp_path / "model.ckpt")
    with pytest.warns(UserWarning, match=r"saved before lightning_geco recorded a model's objective.*objective=\.\.\."):
        loaded = ConvVAE.load_from_checkpoint(tmp_path / "model.ckpt")
    assert torch.equal(loaded.objective.multipliers.log_lagrange_multiplier, geco["log_lagrange_multiplier"])
    # Resuming it continues from the same lambda.
    model = build("ConvVAE", (1, 16, 16), objective=GECOObjective([ReconstructionMSE(0.03)]))
    callback, at_start = GECOCallback(), []

    class AtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            at_start.append(pl_module.objective.multipliers.log_lagrange_multiplier.clone())

    trainer = quiet_trainer(max_steps=7, limit_val_batches=0, callbacks=[callback, AtStart()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(random_images(24, (1, 16, 16)), batch_size=8), ckpt_path=tmp_path / "model.ckpt")
    messages = [str(w.message) for w in caught]
    assert any("recorded a model's objective" in m for m in messages)
    assert not any("holds no GECO multipliers" in m for m in messages)  # found in the callback's state
    assert trainer.global_step == 7 and callback.geco.num_updates == 7  # 6 saved + 1
    assert torch.equal(at_start[0], geco["log_lagrange_multiplier"])


def test_a_checkpoint_with_no_multipliers_anywhere_keeps_the_models_lambda_and_says_so(tmp_path):
    _trained(build("ConvVAE", (1, 16, 16), objective=GECOObjective([ReconstructionMSE(0.03)])), tmp_path)
    checkpoint = torch.load(tmp_path / "model.ckpt", weights_only=False)
    for key in [k for k in checkpoint["state_dict"] if k.startswith("objective.multipliers.")]:
        del checkpoint["state_dict"][key]
    del checkpoint["callbacks"]  # as saved without GECOCallback
    torch.save(checkpoint, tmp_path / "model.ckpt")
    message = ("The checkpoint holds no GECO multipliers for 'objective.multipliers' (it was saved without GECOCallback, or before "
               "they were part of the model): lambda stays at [1.0].")
    with pytest.warns(UserWarning, match=re.escape(message)):
        loaded = ConvVAE.load_from_checkpoint(tmp_path / "model.ckpt")
    assert loaded.objective.lagrange_multiplier.tolist() == [1.0]


def test_a_checkpoint_that_kept_the_skip_streak_in_the_callback_restores_it(tmp_path):
    callback = GECOCallback()
    _trained(build("ConvVAE", (1, 16, 16), objective=GECOObjective([ReconstructionMSE(0.03)])), tmp_path, callbacks=[callback])
    state = callback.state_dict()
    # Written in both places, so the previous version, which reads the callback's key, gets it too.
    assert state["geco"]["num_consecutive_skips"] == state["consecutive_nonfinite_steps"] == 0
    del state["geco"]["num_consecutive_skips"]
    state["consecutive_nonfinite_steps"] = 3  # a checkpoint of the previous version
    callback.load_state_dict(state)
    assert callback.consecutive_nonfinite_steps == callback.geco.num_consecutive_skips == 3


def test_an_old_bernoulli_checkpoint_says_which_likelihood_to_pass(tmp_path):
    model = build("ConvVAE", (1, 16, 16), objective=GECOObjective([ReconstructionBCE(0.3)]), likelihood=BernoulliLikelihood())
    _trained(model, tmp_path, binary=True)
    _old_format(tmp_path / "model.ckpt")
    message = re.escape("pass the trained one, e.g. load_from_checkpoint(path, likelihood=BernoulliLikelihood())")
    with pytest.raises(ValueError, match=f"(?i){message}"):
        ConvVAE.load_from_checkpoint(tmp_path / "model.ckpt")
    # Passing both is what the messages ask for; then nothing is left to warn about.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*recorded a model's objective")
        loaded = ConvVAE.load_from_checkpoint(
            tmp_path / "model.ckpt", likelihood=BernoulliLikelihood(), objective=GECOObjective([ReconstructionBCE(0.3)])
        )
    assert torch.equal(loaded.objective.lagrange_multiplier, model.objective.lagrange_multiplier)


class OwnVAE(pl.LightningModule):
    """A user's module (no base class of ours) holding a GECOObjective."""

    def __init__(self, tolerance: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = torch.nn.Linear(6, 4)
        self.decoder = torch.nn.Linear(2, 6)
        self.objective = GECOObjective([ReconstructionMSE(tolerance, peak=None)])

    def training_step(self, batch, batch_idx):
        mean, log_variance = self.encoder(batch).chunk(2, dim=1)
        z = mean + torch.randn_like(mean) * (0.5 * log_variance).exp()
        rate = 0.5 * (mean**2 + log_variance.exp() - 1 - log_variance).sum(dim=1)
        return self.objective.lagrangian(rate, batch, self.decoder(z))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_a_users_own_module_saves_and_loads_the_trained_lambda_with_its_weights(tmp_path):
    torch.manual_seed(0)
    model = OwnVAE(tolerance=0.5)
    trainer = quiet_trainer(max_steps=5, callbacks=[GECOCallback()])
    trainer.fit(model, DataLoader(3 * torch.randn(40, 6), batch_size=8))
    trainer.save_checkpoint(tmp_path / "own.ckpt")
    loaded = OwnVAE.load_from_checkpoint(tmp_path / "own.ckpt")
    assert float(model.objective.lagrange_multiplier) != 1.0
    assert torch.equal(loaded.objective.lagrange_multiplier, model.objective.lagrange_multiplier)
    assert torch.equal(loaded.objective.multipliers.constraint_ema, model.objective.multipliers.constraint_ema)


class _OwnVAE(pl.LightningModule):
    """A user's module that does not call save_hyperparameters: load_from_checkpoint rebuilds it
    from its constructor's defaults."""

    def __init__(self, tolerance: float = 0.5) -> None:
        super().__init__()
        self.net = torch.nn.Linear(6, 6)
        self.objective = GECOObjective([ReconstructionMSE(tolerance, peak=None)])

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.objective.lagrangian(torch.zeros(len(x)), x, self.net(x))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_module_loaded_with_another_tolerance_than_it_was_trained_for_warns_naming_both(tmp_path):
    model = _OwnVAE(tolerance=0.2)
    data = DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 6)), batch_size=8)
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[GECOCallback()])
    trainer.fit(model, data)
    trainer.save_checkpoint(tmp_path / "own.ckpt")
    with pytest.warns(UserWarning, match=r"'reconstruction' now asks for distortion at 0.5 \(stated: 0.5 mse\); the checkpoint was trained with 0.2\."):
        loaded = _OwnVAE.load_from_checkpoint(tmp_path / "own.ckpt")
    assert torch.equal(loaded.objective.lagrange_multiplier, model.objective.lagrange_multiplier)
    # The moving average holds reading - tolerance: read against 0.5 it is 0.3 lower (it was kept
    # as reading - 0.2, so a zero-step resume reported it "met" against a tighter tolerance).
    trained_ema = model.objective.multipliers.constraint_ema
    torch.testing.assert_close(loaded.objective.multipliers.constraint_ema, trained_ema - 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same tolerance loads quietly, its moving average as saved
        same = _OwnVAE.load_from_checkpoint(tmp_path / "own.ckpt", tolerance=0.2)
    assert torch.equal(same.objective.multipliers.constraint_ema, trained_ema)
    # An "at least" constraint's value is tolerance - reading: a higher minimum raises it.
    ncc = GECOObjective([PatchNCC(0.8)])
    ncc.multipliers.constraint_ema.fill_(0.01)
    stricter = GECOObjective([PatchNCC(0.9)])
    with pytest.warns(UserWarning, match="now asks for pncc at 0.9"):
        stricter.load_state_dict(ncc.state_dict())
    torch.testing.assert_close(stricter.multipliers.constraint_ema, torch.tensor([0.11]))
    # A load that does not bring the moving average leaves the one there alone.
    partial = GECOObjective([PatchNCC(0.9)])
    partial.multipliers.constraint_ema.fill_(0.02)
    weights = {k: v for k, v in ncc.state_dict().items() if not k.endswith("constraint_ema")}
    with pytest.warns(UserWarning, match="now asks for pncc at 0.9"):
        partial.load_state_dict(weights, strict=False)
    torch.testing.assert_close(partial.multipliers.constraint_ema, torch.tensor([0.02]))
    # A checkpoint from before the objective saved its constraints still loads, quietly.
    checkpoint = torch.load(tmp_path / "own.ckpt", weights_only=False)
    del checkpoint["state_dict"]["objective._extra_state"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _OwnVAE.load_from_checkpoint(tmp_path / "old.ckpt")

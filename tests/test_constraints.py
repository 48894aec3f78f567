"""The constraint kinds: values on hand-made inputs, frozen networks, tolerance checks, several at once."""

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from helpers import attach_fixed_lambda, quiet_trainer, random_images, save_classifier, tiny_conv_vae
from lightning_geco import (
    GECO,
    BernoulliLikelihood,
    ClassificationConstraint,
    FeatureReconstruction,
    FrozenClassifier,
    GECOCallback,
    GECOObjective,
    ImageClassifier,
    PatchNCC,
    ReconstructionBCE,
    ReconstructionMSE,
    TorchvisionFeatures,
    constraints,
)
from lightning_geco.constraints import patch_ncc
from lightning_geco.models.base import VAEOutput


def fake_output(x, reconstruction=None, decoder_output=None, labels=None):
    """A VAEOutput carrying only what constraints read."""
    reconstruction = x if reconstruction is None else reconstruction
    n = x.shape[0]
    zeros = torch.zeros(n)
    return VAEOutput(
        x=x, decoder_output=reconstruction if decoder_output is None else decoder_output,
        reconstruction=reconstruction, posterior=None, z=None, rate=zeros,
        distortion=(reconstruction - x).pow(2).flatten(1).mean(1), log_likelihood=zeros, labels=labels,
    )


# ------------------------------------------------------------------- binary cross-entropy
def test_bce_is_the_per_element_cross_entropy_of_the_logits():
    x = (random_images(4) > 0.5).float()
    assert torch.allclose(ReconstructionBCE(0.1).reading(fake_output(x, decoder_output=torch.zeros_like(x))), torch.full((4,), math.log(2)))
    confident = fake_output(x, decoder_output=(2 * x - 1) * 30.0)
    assert ReconstructionBCE(0.1).reading(confident).max() < 1e-12
    torch.testing.assert_close(ReconstructionBCE(0.1)(confident), torch.full((4,), -0.1), atol=1e-12, rtol=0)


def test_bce_needs_a_bernoulli_decoder_and_data_it_can_reach():
    with pytest.raises(ValueError, match="ReconstructionBCE reads the decoder output as Bernoulli logits, but the model's likelihood is GaussianLikelihood"):
        tiny_conv_vae(objective=GECOObjective([ReconstructionBCE(0.1)]))
    grey = torch.full((2, 1, 16, 16), 0.5)
    with pytest.raises(ValueError, match=re.escape("ReconstructionBCE tolerance 0.1 nats/element cannot be met: the data's own entropy, the least cross-entropy any reconstruction can reach, is 0.6931")):
        ReconstructionBCE(0.1).check_data(fake_output(grey))
    ReconstructionBCE(0.1).check_data(fake_output((grey > 0.4).float()))  # binary data: floor 0
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ReconstructionBCE tolerance must be a positive finite number of nats per element"):
            ReconstructionBCE(bad)


# ------------------------------------------------------------------------------- pNCC
def test_pncc_is_one_for_identical_images_and_for_brightness_and_contrast_changes():
    x = random_images(3, (2, 14, 14))
    constraint = PatchNCC(minimum=0.9, patch_size=7, stride=7)
    for y in (x, x + 0.3, 0.5 * x, 0.25 * x + 0.6, 3.0 * x):  # contrast kept down to a quarter
        torch.testing.assert_close(constraint.reading(fake_output(x, y)), torch.ones(3), atol=2e-5, rtol=0)
    torch.testing.assert_close(constraint(fake_output(x, 0.5 * x + 0.1)), torch.full((3,), -0.1), atol=2e-5, rtol=0)
    flat = torch.zeros(1, 1, 7, 7)
    assert patch_ncc(flat, flat).item() == pytest.approx(1.0, abs=1e-6)
    # nothing to match (to within the 1e-5 floor under its standard deviation, times y's)
    assert patch_ncc(flat, random_images(1, (1, 7, 7))).item() == pytest.approx(1.0, abs=0.01)


def test_pncc_of_a_flat_or_washed_out_reconstruction_of_a_patch_with_structure_is_low():
    # SSIM's structure term alone, (cov + c) / (std std + c), read 0.99 here: a blank image met any minimum.
    strokes = (random_images(2, (1, 28, 28)) > 0.7).float()
    c, k = 0.03**2 / 2, 0.25
    variance = F.avg_pool2d(strokes * strokes, 7) - F.avg_pool2d(strokes, 7).pow(2)
    for blank in (torch.zeros_like(strokes), torch.full_like(strokes, 0.5)):
        torch.testing.assert_close(patch_ncc(strokes, blank), c / (k * variance + c), atol=1e-5, rtol=1e-4)
    assert (patch_ncc(strokes, torch.zeros_like(strokes)) < 0.05).all()
    blank_reading = PatchNCC(0.5).reading(fake_output(strokes, torch.zeros_like(strokes)))
    assert not PatchNCC(0.5).satisfied_by(blank_reading.mean().item())
    # Washed out to a tenth of its contrast: about 0.1 / 0.25 of a match.
    torch.testing.assert_close(patch_ncc(strokes, 0.1 * strokes + 0.4), (0.1 * variance + c) / (k * variance + c),
                               atol=1e-5, rtol=1e-4)


def test_pncc_of_a_hand_made_patch_pair_matches_the_formula():
    a = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    b = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    c = 0.03**2 / 2
    # var(a) = var(b) = 0.25, cov(a, b) = mean(ab) - mean(a) mean(b) = 0.25 - 0.25 = 0
    assert patch_ncc(a, b, patch_size=2, stride=2).item() == pytest.approx(c / (0.25 + c), rel=1e-5)
    assert patch_ncc(a, 1 - a, patch_size=2, stride=2).item() == pytest.approx((-0.25 + c) / (0.25 + c), rel=1e-5)


def test_pncc_counts_patches_as_its_elements_and_checks_its_minimum():
    x = random_images(2, (3, 28, 28))
    assert PatchNCC(0.5, patch_size=7, stride=7).num_elements(fake_output(x)) == 3 * 4 * 4
    assert PatchNCC(0.5, patch_size=8, stride=4).num_elements(fake_output(x)) == 3 * 6 * 6
    for bad in (1.0, 1.5, -1.0):
        with pytest.raises(ValueError, match=re.escape(f"PatchNCC minimum must lie in (-1, 1), got {bad!r}")):
            PatchNCC(bad)
    with pytest.raises(ValueError, match="PatchNCC patch_size 32 is larger than the 16x16 images"):
        tiny_conv_vae(objective=GECOObjective([PatchNCC(0.5, patch_size=32)]))
    assert PatchNCC(0.8).satisfied_by(0.85) and not PatchNCC(0.8).satisfied_by(0.75)
    # 0.7 falls short of 0.8 by half the room below a perfect 1
    assert PatchNCC(0.8).relative_violation(0.7) == pytest.approx(0.5)
    assert ReconstructionMSE(0.01).relative_violation(0.009) == pytest.approx(-0.1)


# ----------------------------------------------------------------------- classification
def test_classification_cross_entropy_and_accuracy_for_a_known_classifier_output(tmp_path):
    bias = [2.0, 0.5, -1.0]
    classifier = FrozenClassifier(str(save_classifier(tmp_path / "c.ckpt", bias=bias)))
    constraint = ClassificationConstraint(classifier, tolerance=0.5)
    labels = torch.tensor([0, 1, 2, 0])
    output = fake_output(random_images(4), labels=labels)
    log_softmax = torch.log_softmax(torch.tensor(bias), 0)
    torch.testing.assert_close(constraint.reading(output), -log_softmax[labels])
    torch.testing.assert_close(constraint(output), -log_softmax[labels] - 0.5)
    assert constraint.readings(output)["class_accuracy"].tolist() == [1.0, 0.0, 0.0, 1.0]
    torch.testing.assert_close(constraint.readings(output)["class_cross_entropy"], constraint.reading(output))
    assert constraint.num_elements(output) == 1
    # target="prediction": the class predicted on x (class 0 everywhere), no labels needed.
    by_prediction = ClassificationConstraint(classifier, tolerance=0.5, target="prediction")
    torch.testing.assert_close(by_prediction.reading(fake_output(random_images(4))), torch.full((4,), -log_softmax[0].item()))


def test_classification_reads_a_factor_column_and_reports_missing_labels(tmp_path):
    classifier = FrozenClassifier(str(save_classifier(tmp_path / "c.ckpt", bias=[0.0, 3.0, 0.0], label_column=2)))
    factors = torch.tensor([[0.0, 0.5, 1.0, 0.1, 0.2], [2.0, 0.5, 0.0, 0.1, 0.2]])
    accuracy = ClassificationConstraint(classifier).readings(fake_output(random_images(2), labels=factors))
    assert accuracy["class_accuracy"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="A class label is needed but the batch carries none"):
        ClassificationConstraint(classifier).reading(fake_output(random_images(2)))


def test_labels_a_classifier_cannot_read_as_classes_are_refused_on_the_first_batch(tmp_path):
    # A continuous column truncated silently into other classes (the shapes' scale, 0.5 to 1:
    # classes 0 and 1); a column past the table and a class past num_classes were IndexErrors.
    classifier = FrozenClassifier(str(save_classifier(tmp_path / "c.ckpt", num_classes=3, label_column=1)))
    constraint = ClassificationConstraint(classifier, tolerance=5.0)
    scales = torch.tensor([[0.0, 0.5, 0.0], [1.0, 0.6, 0.0], [2.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match=re.escape(
        "column 1 of the labels holds values that are not classes (0.5, 0.6, 1, ...): a classifier reads whole numbers "
        "in [0, 3). Pick a column of classes (label_column), or bucket the values into classes first."
    )):
        constraint.check_data(fake_output(random_images(3), labels=scales))
    with pytest.raises(ValueError, match=re.escape(
        "the labels hold classes 0 to 8, but the classifier has num_classes=3 (classes 0 to 2): set num_classes to the "
        "data's, or pick another label_column."
    )):
        constraint.check_data(fake_output(random_images(3), labels=torch.tensor([0, 8, 2])))
    for read in (constraint.reading, constraint.check_data):  # the first batch's check names the column too
        with pytest.raises(ValueError, match=re.escape(
            "label_column 1 is not a column of the batch's labels, which have 1 (0 to 0)."
        )):
            read(fake_output(random_images(3), labels=torch.tensor([[0.5], [1.0], [2.0]])))
    constraint.check_data(fake_output(random_images(3), labels=torch.tensor([[2.0, 1.0], [0.0, 2.0], [1.0, 0.0]])))
    with pytest.raises(ValueError, match=re.escape("label_column must be an int >= 0 (a column of 2-d labels), got -1.")):
        ImageClassifier(label_column=-1)


def test_classification_tolerance_and_checkpoint_errors(tmp_path):
    missing = tmp_path / "nowhere" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match=re.escape(f"Classifier checkpoint not found: looked for {missing.resolve()}. Train one first, e.g. `python train.py fit --config configs/mnist_classifier.yaml`")):
        FrozenClassifier(str(missing))
    classifier = FrozenClassifier(str(save_classifier(tmp_path / "c.ckpt")))
    with pytest.raises(ValueError, match="ClassificationConstraint tolerance must be a positive finite number of nats per image, got 0"):
        ClassificationConstraint(classifier, tolerance=0)
    with pytest.raises(ValueError, match="ClassificationConstraint target must be 'label' or 'prediction', got 'logits'"):
        ClassificationConstraint(classifier, target="logits")
    with pytest.raises(ValueError, match=re.escape("The classifier was trained on images of shape (1, 16, 16), the model makes (1, 20, 20)")):
        tiny_conv_vae(image_shape=(1, 20, 20), objective=GECOObjective([ClassificationConstraint(classifier)]))
    # The feature constraint too (a max-pooling classifier read features of any size, silently).
    with pytest.raises(ValueError, match=re.escape("The classifier was trained on images of shape (1, 16, 16), the model makes (1, 20, 20)")):
        tiny_conv_vae(image_shape=(1, 20, 20), objective=GECOObjective([FeatureReconstruction(classifier, 0.5)]))
    # A classifier that is wrong on the real images: the tolerance can't be met by a faithful reconstruction.
    wrong = ClassificationConstraint(FrozenClassifier(str(save_classifier(tmp_path / "w.ckpt", bias=[0.0, 5.0, 0.0]))), tolerance=0.1)
    with pytest.warns(UserWarning, match=re.escape("The classifier's cross-entropy on the real images is 5.013 nats (+-0, the "
                                                   "standard error over the first batch's 2 images), above the tolerance 0.1")):
        wrong.check_data(fake_output(random_images(2), labels=torch.tensor([0, 0])))
    # One misread image among many is the heavy tail of a good classifier, not a bad one: no warning.
    right = ClassificationConstraint(FrozenClassifier(str(save_classifier(tmp_path / "r.ckpt", bias=[5.0, 0.0, 0.0]))),
                                     tolerance=0.15)
    labels = torch.zeros(64, dtype=torch.long)
    labels[:2] = 1  # two read as class 0 at 5 nats each: the batch mean 0.17 > 0.15, its standard error 0.11
    mean, _ = constraints._mean_and_standard_error(
        torch.nn.functional.cross_entropy(right.classifier.logits(random_images(64)), labels, reduction="none")
    )
    assert mean > 0.15
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        right.check_data(fake_output(random_images(64), labels=labels))


def test_gradients_reach_the_decoder_and_never_the_frozen_networks(tmp_path):
    torch.manual_seed(0)
    classifier = FrozenClassifier(str(save_classifier(tmp_path / "c.ckpt")))
    features = FrozenClassifier(str(save_classifier(tmp_path / "f.ckpt")))
    objective = GECOObjective([
        ReconstructionMSE(0.01), ClassificationConstraint(classifier, target="prediction"), FeatureReconstruction(features, 1e-4),
    ])
    model = tiny_conv_vae(objective=objective)
    attach_fixed_lambda(objective, 2.0)
    model.train()
    assert not classifier.training and not features.training  # model.train() leaves them in eval mode
    model.objective(model(random_images(8))).backward()
    frozen = list(classifier.parameters()) + list(features.parameters())
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())
    optimized = {id(p) for group in model.configure_optimizers().param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in frozen}


# ------------------------------------------------------------------ feature reconstruction
def test_torchvision_features_come_from_a_local_weights_file_and_are_frozen(tmp_path):
    import torchvision

    torch.manual_seed(0)
    network = torchvision.models.resnet18(weights=None)
    torch.save(network.state_dict(), tmp_path / "resnet18.pt")
    frozen = TorchvisionFeatures("resnet18", str(tmp_path / "resnet18.pt"), layer="layer1")
    x = random_images(2, (1, 32, 32))
    network.eval()
    normalised = (x.expand(-1, 3, -1, -1) - frozen.mean) / frozen.std
    expected = network.layer1(network.maxpool(network.relu(network.bn1(network.conv1(normalised)))))
    torch.testing.assert_close(frozen.features(x), expected)
    constraint = FeatureReconstruction(frozen, tolerance=0.01)
    assert constraint.reading(fake_output(x)).abs().max() == 0
    assert constraint.num_elements(fake_output(x)) == expected[0].numel()
    assert constraint.reading(fake_output(x, 1 - x)).min() > 0
    with pytest.raises(FileNotFoundError, match="Weights file for torchvision's resnet18 not found: looked for .*missing.pt. Nothing is downloaded"):
        TorchvisionFeatures("resnet18", str(tmp_path / "missing.pt"), layer="layer1")
    with pytest.raises(ValueError, match="FeatureReconstruction tolerance must be a positive finite number of squared feature units, got -1"):
        FeatureReconstruction(frozen, tolerance=-1)


# ------------------------------------------------------------------------- several at once
def test_per_constraint_step_sizes_move_each_multiplier_by_its_own_nu():
    geco = GECO(["a", "b"], alpha=0.0, step_size=[0.5, 2.0])
    geco.update(torch.tensor([0.2, 0.2, 1.0, 0.0]))  # sums, count, nonfinite
    torch.testing.assert_close(geco.log_lagrange_multiplier, torch.tensor([0.1, 0.4]))
    with pytest.raises(ValueError, match=re.escape("GECO step_size (nu) must be a positive finite number, got [1.0] (one number, or one per constraint: 2).")):
        GECO(["a", "b"], step_size=[1.0])


def test_two_constraint_run_moves_each_multiplier_towards_its_own_constraint():
    torch.manual_seed(0)
    images = random_images(256, (1, 16, 16))
    met, violated = ReconstructionMSE(0.5, name="mse"), PatchNCC(0.95, patch_size=4, stride=4, step_size=0.025)
    model = tiny_conv_vae(objective=GECOObjective([met, violated]))
    callback = GECOCallback()
    trainer = quiet_trainer(max_steps=30, callbacks=[callback], log_every_n_steps=1)
    trainer.fit(model, DataLoader(TensorDataset(images), batch_size=32))
    lam = dict(zip(callback.geco.names, callback.geco.lagrange_multiplier.tolist()))
    assert lam["mse"] < 0.8, lam  # an MSE of at most 0.5 holds from the start: lambda shrinks from 1
    assert lam["pncc"] > 2.0, lam  # pNCC 0.95 is far off: lambda grows
    for name in ("mse", "pncc"):
        for key in ("lambda", "constraint", "constraint_ema"):
            assert f"geco/{name}/{key}" in trainer.callback_metrics


def test_classifier_learns_a_class_the_images_show_and_logs_its_accuracy():
    # Class k: noise plus a bright k-th quadrant; labels as (N, 2) factors with the class in column 1.
    g = torch.Generator().manual_seed(0)
    classes = torch.randint(0, 4, (1200,), generator=g)
    images = 0.5 * torch.rand(1200, 1, 16, 16, generator=g)
    for k in range(4):
        rows, cols = divmod(k, 2)
        images[classes == k, :, 8 * rows : 8 * rows + 8, 8 * cols : 8 * cols + 8] += 0.5
    factors = torch.stack([torch.zeros(1200), classes.float()], dim=1)
    train, val = TensorDataset(images[:1000], factors[:1000]), TensorDataset(images[1000:], factors[1000:])
    model = ImageClassifier(image_shape=(1, 16, 16), num_classes=4, widths=(8, 16), hidden_dim=32, learning_rate=3e-3, label_column=1)
    trainer = quiet_trainer(max_steps=100, num_sanity_val_steps=0, check_val_every_n_epoch=None, val_check_interval=50)
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=100))
    assert trainer.callback_metrics["val/accuracy"] > 0.95
    assert trainer.callback_metrics["val/loss"] < 0.3


def test_an_unattainable_bce_tolerance_stops_training_on_the_first_batch():
    model = tiny_conv_vae(objective=GECOObjective([ReconstructionBCE(0.1)]), likelihood=BernoulliLikelihood())
    grey = torch.full((16, 1, 16, 16), 0.5)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = quiet_trainer(max_steps=3, callbacks=[GECOCallback()])
    with pytest.raises(ValueError, match="ReconstructionBCE tolerance 0.1 nats/element cannot be met"):
        trainer.fit(model, DataLoader(TensorDataset(grey), batch_size=8))
    # Said at the first batch's end, on every rank together; its step was skipped: nothing moved.
    assert trainer.global_step <= 1 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert model.objective.lagrange_multiplier.tolist() == [1.0]


def test_a_callback_fitting_a_second_model_says_its_first_batch_refusal_too():
    # The callback's "every rank has checked a first batch" stayed set from its first fit: the
    # second model's refused batch was skipped on NaN values, step after step, and never said.
    grey = DataLoader(TensorDataset(torch.full((16, 1, 16, 16), 0.5)), batch_size=8)
    callback = GECOCallback()
    quiet_trainer(max_steps=2, callbacks=[callback]).fit(tiny_conv_vae(), grey)
    model = tiny_conv_vae(objective=GECOObjective([ReconstructionBCE(0.1)]), likelihood=BernoulliLikelihood())
    with pytest.raises(ValueError, match="ReconstructionBCE tolerance 0.1 nats/element cannot be met"):
        quiet_trainer(max_steps=3, callbacks=[callback]).fit(model, grey)


def test_classifier_rejects_unknown_pooling_and_few_classes():
    with pytest.raises(ValueError, match="pooling must be 'flatten' or 'max', got 'mean'"):
        ImageClassifier(pooling="mean")
    with pytest.raises(ValueError, match="num_classes must be an int of at least 2, got 1"):
        ImageClassifier(num_classes=1)
    pooled = ImageClassifier(image_shape=(1, 20, 24), num_classes=3, widths=(8, 8), hidden_dim=16, pooling="max")
    assert pooled(random_images(2, (1, 20, 24))).shape == (2, 3)
    assert pooled.features(random_images(2, (1, 20, 24))).shape == (2, 16)
    # Batches as the library reads them anywhere: a dict with "image" and "label" too (KeyError(0) before).
    x, y = random_images(4, (1, 20, 24)), torch.tensor([0, 1, 2, 1])
    assert pooled._loss({"image": x, "label": y})[0] == pooled._loss((x, y))[0]


# ------------------------------------------------------------------------- relative step size
@pytest.mark.parametrize(
    "constraint, scale",
    [
        (ReconstructionMSE(0.005), 0.005),
        (ReconstructionMSE(20.0, unit="psnr"), 0.01),
        (ReconstructionBCE(0.08), 0.08),
        (PatchNCC(0.94), 0.06),
    ],
)
def test_a_violation_of_ten_percent_of_the_scale_moves_log_lambda_by_a_tenth_of_nu(constraint, scale):
    assert constraint.scale == pytest.approx(scale)
    callback = GECOCallback(controller="relative", alpha=0.0, step_size=0.003)
    geco = GECO([constraint.name], alpha=0.0, step_size=callback.absolute_step_size(constraint))
    geco.update(torch.tensor([0.1 * scale * 64, 64.0, 0.0]))  # 64 examples, each 10 % over
    assert geco.log_lagrange_multiplier.item() == pytest.approx(0.1 * 0.003, rel=1e-5)


def test_a_constraints_own_step_size_is_relative_too_and_a_bad_scale_is_refused():
    callback = GECOCallback(controller="relative", step_size=0.003)
    assert callback.absolute_step_size(PatchNCC(0.9, step_size=0.01)) == pytest.approx(0.01 / 0.1)
    assert callback.absolute_step_size(ReconstructionMSE(0.02, step_size=0.01)) == pytest.approx(0.01 / 0.02)
    assert callback.absolute_step_size(ReconstructionMSE(0.02)) == pytest.approx(0.003 / 0.02)
    with pytest.raises(ValueError, match=re.escape("ReconstructionMSE step_size must be a positive finite number or None, got -1.0.")):
        ReconstructionMSE(0.02, step_size=-1.0)

    class Unscaled(ReconstructionMSE):
        scale = 0.0

    with pytest.raises(ValueError, match=re.escape("GECO steps relative to a constraint's scale, but 'reconstruction' has scale 0.0 (its tolerance, 0.01 mse, "
                                                   "unless Unscaled defines scale); it must be a positive finite number.")):
        callback.absolute_step_size(Unscaled(0.01))


def test_the_callback_gives_each_constraint_nu_over_its_scale_and_caps_each_rise_at_nu():
    objective = GECOObjective([ReconstructionMSE(0.015, name="mse"), PatchNCC(0.94, patch_size=4, stride=4)])
    model = tiny_conv_vae(objective=objective)
    callback = GECOCallback(controller="relative", step_size=0.003, max_relative_violation=1.0)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[callback])
    trainer.fit(model, DataLoader(TensorDataset(random_images(8)), batch_size=8))
    torch.testing.assert_close(callback.geco.controller.step_size, torch.tensor([0.003 / 0.015, 0.003 / 0.06]))
    torch.testing.assert_close(callback.geco.controller.max_increase, torch.tensor([0.003, 0.003]))
    # Random images are far from both tolerances on the first step: both rise by the cap, nu.
    torch.testing.assert_close(callback.geco.log_lagrange_multiplier, torch.tensor([0.003, 0.003]))


def test_two_constraints_of_one_kind_log_their_readings_apart_and_each_verdict_reads_its_own(tmp_path):
    # Two pNCC scales would share val/pncc (the coarse reading overwrote the fine one, and both
    # verdicts read it); the objective names them apart, <reading>_<name>.
    from lightning_geco import RunSummary

    objective = GECOObjective([PatchNCC(0.9, 4, 4, name="fine"), PatchNCC(0.5, 8, 8, name="coarse")])
    assert [c.reading_name for c in objective.constraints] == ["pncc_fine", "pncc_coarse"]
    assert GECOObjective([PatchNCC(0.5, 8, 8)]).constraints[0].reading_name == "pncc"  # alone: as before
    summary = RunSummary()
    trainer = quiet_trainer(max_steps=2, callbacks=[GECOCallback(), summary], default_root_dir=tmp_path)
    images = random_images(32, (1, 16, 16))
    trainer.fit(tiny_conv_vae(objective=objective), DataLoader(TensorDataset(images), batch_size=16),
                DataLoader(TensorDataset(images), batch_size=16))
    fine, coarse = (trainer.callback_metrics[f"val/pncc_{n}"].item() for n in ("fine", "coarse"))
    assert fine != coarse and "val/pncc" not in trainer.callback_metrics
    assert summary.summary["reading"] == {"fine": "pncc_fine", "coarse": "pncc_coarse"}
    assert summary.summary["relative_violation"]["fine"] == pytest.approx((0.9 - fine) / (1 - 0.9), rel=1e-5)


class _PSNRAtLeast(constraints.Constraint):
    """A user's "at least" constraint: PSNR in dB per image, forward ``tolerance - reading``."""

    unit = "dB"
    reading_name = "psnr"
    lower_is_better = False

    def __init__(self, tolerance, name="psnr"):
        super().__init__()
        self.tolerance, self.name = tolerance, name

    def reading(self, output):
        return -10 * torch.log10((output.reconstruction - output.x).pow(2).flatten(1).mean(dim=1))

    def forward(self, output):
        return self.tolerance - self.reading(output)


def _lagrangian_on_first_batch(constraint, x, reconstruction):
    objective = GECOObjective([constraint])
    attach_fixed_lambda(objective, 1.0)
    return objective.lagrangian(torch.zeros(x.shape[0]), x, reconstruction)


def test_a_users_at_least_constraint_is_judged_below_its_tolerance_and_a_flipped_sign_is_refused():
    # A PSNR of 17.7 dB against "at least 40" read "55.8 % better than asked", verdict met: the
    # base class read every reading as "at most".
    at_least = _PSNRAtLeast(40.0)
    assert at_least.relative_violation(17.66) == pytest.approx((40 - 17.66) / 40)
    assert not at_least.satisfied_by(17.66) and at_least.satisfied_by(41.0)
    x = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    noisy = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))  # ~20 dB
    with warnings.catch_warnings():  # the check reads no tensor that needs a gradient (torch warned on every run)
        warnings.simplefilter("error")
        _lagrangian_on_first_batch(at_least, x, noisy.requires_grad_())  # forward and reading agree: not met

    class Flipped(_PSNRAtLeast):
        lower_is_better = True  # left at the default: forward says "not met", the reading "met"

    with pytest.raises(ValueError, match=re.escape(
        "Flipped 'psnr': on the first training batch forward() gives 20.33 (not met: <= 0 is met), but the reading "
        "19.67 against the tolerance 40"
    )) as error:
        _lagrangian_on_first_batch(Flipped(40.0), x, noisy)
    assert "read as 'at most' (lower_is_better=True), is -50.8 % past it" in str(error.value)
    assert "for an 'at least' one tolerance - reading, with lower_is_better = False" in str(error.value)


def test_a_users_constraint_mistakes_are_named_before_they_fail_deep_inside():
    with pytest.raises(TypeError, match=re.escape(
        "GECOObjective constraints must be Constraint instances, got float 0.01 at position 0; e.g. ReconstructionMSE(tolerance=0.01)."
    )):
        GECOObjective([0.01])

    class Unnamed(_PSNRAtLeast):
        pass

    del _PSNRAtLeast.reading_name
    try:
        with pytest.raises(TypeError, match=r"Unnamed \(constraint 1\) does not set reading_name: a Constraint sets"):
            GECOObjective([ReconstructionMSE(0.01), Unnamed(30.0)])
    finally:
        _PSNRAtLeast.reading_name = "psnr"
    with pytest.raises(ValueError, match=r"_PSNRAtLeast 'psnr' has tolerance nan; it must be a finite number of dB\."):
        GECOObjective([_PSNRAtLeast(math.nan)])
    with pytest.raises(TypeError, match=re.escape("ReconstructionMSE tolerance must be a number (in unit 'mse'), got '0.01'.")):
        ReconstructionMSE("0.01")
    with pytest.raises(ValueError, match=re.escape(
        "constraint names must be unique, got ['reconstruction', 'reconstruction']; give each its own, e.g. "
        "ReconstructionBCE(..., name='reconstruction_2')"
    )):
        GECOObjective([ReconstructionMSE(0.01), ReconstructionBCE(0.1)])

    class Columns(_PSNRAtLeast):
        def forward(self, output):
            return super().forward(output)[:, None]

    x = torch.rand(8, 1, 6, 6)
    with pytest.raises(ValueError, match=re.escape("Columns 'psnr': forward() must return one value per example, shape (8,), got (8, 1).")):
        _lagrangian_on_first_batch(Columns(10.0), x, x * 0.9)


def test_a_tolerance_a_constant_grey_image_meets_is_warned():
    # --tolerance psnr=0.5 (an MSE of 0.89 for images in [0, 1]) asked nothing, with no word.
    with pytest.warns(UserWarning, match=re.escape(
        "ReconstructionMSE 'reconstruction': a PSNR of 0.5 dB (MSE 0.8913) is met by a constant mid-grey image, whose "
        "MSE is at most 0.25 (a PSNR of 6.02 dB) for data of range 1: the constraint asks nothing of the model."
    )):
        ReconstructionMSE(0.5, unit="psnr")
    with pytest.warns(UserWarning, match=r"an MSE of 0.3 \(MSE 0.3\) is met by a constant mid-grey image"):
        ReconstructionMSE(0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ReconstructionMSE(0.2), ReconstructionMSE(8.0, unit="psnr"), ReconstructionMSE(0.9, peak=None)


class _Features(torch.nn.Module):
    """A stand-in frozen network: an image's pixels pooled to ``size`` x ``size``."""

    def __init__(self, size):
        super().__init__()
        self.size = size

    def features(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, self.size)


def test_a_feature_tolerance_the_batch_mean_image_meets_is_warned():
    # A network too weak to tell images apart read a blank reconstruction "met", 40 % under, unwarned.
    x = random_images(16, (1, 16, 16))
    weak = FeatureReconstruction(_Features(1), tolerance=0.01)  # one number per image: its mean grey
    blank = (x.mean(dim=(1, 2, 3)) - x.mean()).pow(2).mean().item()
    assert blank < 0.01
    with pytest.warns(UserWarning, match=re.escape(
        f"FeatureReconstruction 'features': the first batch's mean image, given for every image, reads a feature "
        f"distance of {blank:.4g}, within the tolerance 0.01: a model that learned nothing meets it."
    )):
        weak.check_data(fake_output(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FeatureReconstruction(_Features(16), tolerance=0.01).check_data(fake_output(x))  # pixels: the mean misses

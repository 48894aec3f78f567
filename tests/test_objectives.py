import collections
import math
import re
import warnings

import numpy as np
import pytest
import torch
import yaml

from helpers import attach_fixed_lambda, random_images, tiny_conv_vae
from lightning_geco import (
    ELBO,
    BetaVAE,
    CapacityBetaVAE,
    ConvVAE,
    GaussianLikelihood,
    GECOObjective,
    KLWarmup,
    LadderVAE,
    PatchNCC,
    ReconstructionBCE,
    ReconstructionMSE,
    SigmaVAE,
)
from lightning_geco.checks import plain_numbers
from lightning_geco.records import VAEOutput


def _grads(loss, model):
    return torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)


@pytest.mark.parametrize("lam", [0.3, 2.0, 25.0])
def test_geco_gradient_at_fixed_lambda_equals_gaussian_elbo_with_sigma2_one_over_two_lambda(lam):
    torch.manual_seed(0)
    sigma = math.sqrt(1.0 / (2.0 * lam))
    model = tiny_conv_vae(likelihood=GaussianLikelihood(sigma=sigma))
    attach_fixed_lambda(model.objective, lam)
    model.train()
    x = random_images()
    output = model(x)
    geco_loss = model.objective(output)
    elbo_loss = ELBO()(output)
    for g_geco, g_elbo in zip(_grads(geco_loss, model), _grads(elbo_loss, model)):
        torch.testing.assert_close(g_geco, g_elbo, rtol=1e-4, atol=1e-6)


def test_geco_loss_value_is_rate_plus_lambda_times_per_image_constraint():
    torch.manual_seed(0)
    model = tiny_conv_vae(tolerance=0.02)
    attach_fixed_lambda(model.objective, 3.0)
    model.train()
    output = model(random_images())
    loss = model.objective(output)
    d = output.x[0].numel()
    # First step: the moving average is seeded with this batch, so value = batch mean.
    expected = output.rate.mean() + 3.0 * d * (output.distortion.mean() - 0.02)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)


def test_elbo_and_beta_vae_match_their_formulas():
    torch.manual_seed(0)
    model = tiny_conv_vae(objective=ELBO(), likelihood=GaussianLikelihood(sigma=0.2))
    output = model(random_images())
    x, mean = output.x, output.reconstruction
    d = x[0].numel()
    log_lik = -((x - mean) ** 2).flatten(1).sum(1) / (2 * 0.04) - d * math.log(0.2 * math.sqrt(2 * math.pi))
    torch.testing.assert_close(output.log_likelihood, log_lik, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(ELBO()(output), -(log_lik - output.rate).mean(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(BetaVAE(4.0)(output), -(log_lik - 4.0 * output.rate).mean(), rtol=1e-5, atol=1e-3)


def test_rate_is_the_closed_form_gaussian_kl():
    torch.manual_seed(0)
    model = tiny_conv_vae()
    output = model(random_images())
    q = torch.distributions.Normal(output.posterior.mean, (0.5 * output.posterior.log_variance).exp())
    p = torch.distributions.Normal(0.0, 1.0)
    torch.testing.assert_close(output.rate, torch.distributions.kl_divergence(q, p).sum(1), rtol=1e-5, atol=1e-6)


def test_distortion_is_per_element_mse_of_the_reconstruction():
    torch.manual_seed(0)
    model = tiny_conv_vae()
    output = model(random_images())
    torch.testing.assert_close(output.distortion, ((output.x - output.reconstruction) ** 2).mean(dim=(1, 2, 3)))


def test_geco_objective_without_callback_fails_loudly_in_training():
    model = tiny_conv_vae()
    model.train()
    with pytest.raises(RuntimeError, match=r"nothing would update lambda\. Add lightning_geco\.GECOCallback"):
        model.objective(model(random_images()))


def test_validation_loss_reads_lambda_without_recording():
    model = tiny_conv_vae()
    geco = attach_fixed_lambda(model.objective, 2.0)
    model.eval()
    with torch.no_grad():
        model.objective(model(random_images()))
    assert geco.pending_statistics().abs().sum() == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tolerance": 0.0}, r"tolerance 0.0 \(unit 'mse'\) cannot be expressed: .* must lie in \[1e-10, 1\] \(a PSNR of at most 100 dB\)"),
        # 120 dB: no reading tells it apart, and lambda wound up to its bound (psnr=120 was refused)
        ({"tolerance": 1e-12}, r"tolerance 1e-12 \(unit 'mse'\) cannot be expressed: .* must lie in \[1e-10, 1\]"),
        ({"tolerance": -0.01}, r"tolerance -0.01 \(unit 'mse'\) cannot be expressed"),
        ({"tolerance": 1.5}, r"tolerance 1.5 \(unit 'mse'\) cannot be expressed: .*peak: null\)\.$"),
        ({"tolerance": 20}, r"cannot be expressed: .* A PSNR of 20 dB is unit='psnr' \(on the command line --tolerance psnr=20\)\.$"),
        ({"tolerance": 0.0, "unit": "psnr"}, r"tolerance 0.0 \(unit 'psnr'\) is out of range: .* \(0, 100\]"),
        ({"tolerance": 140.0, "unit": "psnr"}, r"tolerance 140.0 \(unit 'psnr'\) is out of range"),
        ({"tolerance": 0.01, "unit": "db"}, r"unit must be 'mse' or 'psnr', got 'db'"),
    ],
)
def test_bad_tolerances_are_rejected_with_the_value_and_the_accepted_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReconstructionMSE(**kwargs)


def test_psnr_tolerance_is_converted_to_mse():
    constraint = ReconstructionMSE(20.0, unit="psnr")
    assert constraint.tolerance_mse == pytest.approx(0.01)
    assert constraint.tolerance_psnr == pytest.approx(20.0)


def test_numpy_numbers_are_taken_as_the_python_numbers_they_hold():
    # np.int64 steps, np.float32 tolerances (a value read from an array, a sweep's grid) were
    # refused with messages that contradicted the value: "must be a positive int, got 1000"
    model = ConvVAE(image_shape=np.array([1, 16, 16]), latent_dim=np.int64(4), widths=[8], hidden_dim=16,
                    num_logged_images=np.int64(8), marginal_kl_chunk_size=np.int64(64))
    assert (model.image_shape, model.num_logged_images, model.aggregate_posterior.chunk_size) == ((1, 16, 16), 8, 64)
    assert type(model.aggregate_posterior.chunk_size) is int
    # hparams.yaml stays plain data: a NumPy scalar was a !!python/object/apply tag yaml.safe_load refuses
    assert yaml.safe_load(yaml.safe_dump(dict(model.hparams_initial))) == {
        "image_shape": [1, 16, 16], "latent_dim": 4, "widths": [8], "hidden_dim": 16, "num_logged_images": 8,
        "marginal_kl_chunk_size": 64,
    }
    assert KLWarmup(np.int64(1000)).warmup_steps == 1000
    assert CapacityBetaVAE(capacity_steps=np.int64(500)).capacity_steps == 500
    assert ReconstructionMSE(np.float32(0.01)).tolerance_mse == pytest.approx(0.01)
    assert ReconstructionMSE(np.float32(20), unit="psnr", peak=np.float64(1)).tolerance_mse == pytest.approx(0.01)
    assert ReconstructionBCE(np.float32(0.1)).tolerance == pytest.approx(0.1)
    assert PatchNCC(np.float32(0.8), patch_size=np.int64(5), stride=np.int64(5)).patch_size == 5
    assert LadderVAE(image_shape=(1, 16, 16), latent_dims=np.array([4, 2]), widths=[8], hidden_dim=16).latent_dims == [4, 2]
    point = collections.namedtuple("Point", "x y")(np.int64(1), 2)  # an argument of a user's subclass: kept as it is
    assert plain_numbers([point, np.float32(0.5), {"a": np.array([1, 2])}]) == [point, 0.5, {"a": [1, 2]}]
    with pytest.raises(TypeError, match=re.escape("ReconstructionMSE tolerance must be a number (in unit 'mse'), got True.")):
        ReconstructionMSE(True)
    with pytest.raises(ValueError, match=re.escape("PatchNCC needs ints patch_size >= 2 and stride >= 1, got 7.5 and 7.")):
        PatchNCC(patch_size=7.5)


def test_one_constraint_not_in_a_list_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=re.escape(
        "GECOObjective takes a list of constraints, got one ReconstructionMSE: pass GECOObjective([ReconstructionMSE(...)])."
    )):
        GECOObjective(ReconstructionMSE(0.005))


def test_duplicate_constraint_names_are_rejected():
    with pytest.raises(ValueError, match="constraint names must be unique"):
        GECOObjective([ReconstructionMSE(0.1), ReconstructionMSE(0.2)])


def test_kl_warmup_moves_beta_linearly_from_its_start_to_one_and_stays_there():
    torch.manual_seed(0)
    model = tiny_conv_vae(objective=ELBO())
    output = model(random_images())
    warmup = KLWarmup(warmup_steps=100, start_beta=0.2)
    log_lik, rate = output.log_likelihood, output.rate
    for step, beta in [(0, 0.2), (50, 0.6), (100, 1.0), (1000, 1.0)]:
        warmup.set_step(step)
        assert warmup.logged_values() == {"beta": pytest.approx(beta)}
        torch.testing.assert_close(warmup(output), -(log_lik - beta * rate).mean())
    torch.testing.assert_close(warmup(output), ELBO()(output))


def test_capacity_beta_vae_penalises_the_distance_of_the_kl_from_a_growing_capacity():
    torch.manual_seed(0)
    model = tiny_conv_vae(objective=ELBO())
    output = model(random_images())
    objective = CapacityBetaVAE(gamma=50.0, max_capacity=20.0, capacity_steps=200)
    for step, capacity in [(0, 0.0), (50, 5.0), (200, 20.0), (500, 20.0)]:
        objective.set_step(step)
        assert objective.capacity == pytest.approx(capacity)
        expected = -output.log_likelihood.mean() + 50.0 * (output.rate.mean() - capacity).abs()
        torch.testing.assert_close(objective(output), expected)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: KLWarmup(warmup_steps=0), "KLWarmup warmup_steps must be a positive int (optimizer steps), got 0"),
        (lambda: KLWarmup(start_beta=1.5), "KLWarmup start_beta must lie in [0, 1], got 1.5"),
        (lambda: CapacityBetaVAE(gamma=0.0), "CapacityBetaVAE gamma must be positive and finite, got 0.0"),
        (lambda: CapacityBetaVAE(max_capacity=-1.0), "CapacityBetaVAE max_capacity must be >= 0 nats and finite, got -1.0"),
        (lambda: CapacityBetaVAE(capacity_steps=2.5), "CapacityBetaVAE capacity_steps must be a positive int"),
    ],
)
def test_scheduled_objectives_reject_bad_settings(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def test_scheduled_objective_follows_the_trainers_step_and_logs_its_weight():
    from helpers import quiet_trainer

    model = tiny_conv_vae(objective=KLWarmup(warmup_steps=10))
    images = random_images(64)
    trainer = quiet_trainer(max_steps=6, log_every_n_steps=1)
    trainer.fit(model, torch.utils.data.DataLoader(images, batch_size=8))
    # The last training step ran at global_step 5: beta = 5 / 10; after it the schedule stands at
    # the 6 steps taken, as a checkpoint written there loads it.
    assert trainer.callback_metrics["train/beta"].item() == pytest.approx(0.5)
    assert model.objective.step == 6


def test_mse_tolerances_in_the_datas_own_units():
    assert ReconstructionMSE(5.0, peak=None).reading_tolerance == 5.0
    assert ReconstructionMSE(20.0, unit="psnr", peak=255.0).reading_tolerance == pytest.approx(255.0**2 * 0.01)
    with pytest.raises(ValueError, match=re.escape("must lie in [1e-10, 1] (a PSNR of at most 100 dB); for data in other units pass peak=None (in a config: peak: null).")):
        ReconstructionMSE(5.0)
    with pytest.raises(ValueError, match=re.escape("ReconstructionMSE unit 'psnr' needs the data's peak value; got peak=None.")):
        ReconstructionMSE(20.0, unit="psnr", peak=None)


def test_the_lagrangian_of_a_users_own_tensors_is_the_objective_of_their_record():
    objective = GECOObjective([ReconstructionMSE(0.5, peak=None)])
    objective.multipliers.log_lagrange_multiplier.fill_(math.log(2.0))  # as trained; eval reads it as it stands
    objective.eval()
    g = torch.Generator().manual_seed(0)
    x, reconstruction, rate = torch.randn(8, 20, generator=g) * 3, torch.randn(8, 20, generator=g), torch.rand(8, generator=g)
    loss = objective.lagrangian(rate, x, reconstruction)
    distortion = (reconstruction - x).pow(2).mean(dim=1)
    assert loss.item() == pytest.approx((rate.mean() + 2.0 * 20 * (distortion.mean() - 0.5)).item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"rate must hold one KL per example, shape \(8,\), got \(8, 1\)"):
        VAEOutput.from_terms(x, reconstruction, rate[:, None])
    with pytest.raises(ValueError, match=r"x and reconstruction must have the same shape"):
        VAEOutput.from_terms(x, reconstruction[:, :5], rate)


def test_the_lagrangian_checks_the_first_training_batch_once_as_the_collections_models_do():
    rate = torch.zeros(8)
    # A PSNR stated against the default peak 1 on data in raw units means another quality.
    def objective(*constraints):
        built = GECOObjective(list(constraints))
        attach_fixed_lambda(built, 1.0)
        return built

    psnr = objective(ReconstructionMSE(20, unit="psnr"))
    raw = torch.linspace(-24, 52, 160).reshape(8, 20)
    with torch.no_grad():  # a validation step: not checked
        psnr.lagrangian(rate, raw, raw)
    with pytest.warns(UserWarning, match=re.escape(
        "ReconstructionMSE 'reconstruction': a PSNR of 20 dB is stated against peak 1 (data whose range is 1, e.g. "
        "[0, 1]), but the first training batch spans [-24, 52]: the quality it holds is not the one asked for. Scale the "
        "data to a range of 1, pass peak= the data's range (max - min: 2 for data in [-1, 1]), or state the tolerance "
        "as an MSE (unit='mse', peak=None: the data's units squared)."
    )):
        psnr.lagrangian(rate, raw, raw)
    with pytest.warns(UserWarning, match=re.escape("a PSNR of 30 dB is stated against peak 255 (data whose range is 255, "
                                                   "e.g. [0, 255]), but the first training batch spans [0, 1]")):
        images = torch.linspace(0, 1, 160).reshape(8, 20)  # peak 255 on images in [0, 1]: 48 dB off
        objective(ReconstructionMSE(30, unit="psnr", peak=255)).lagrangian(rate, images, images)
    # An MSE against the default peak 1 on images in [0, 255] (it drove lambda to 6e12, then non-finite).
    with pytest.warns(UserWarning, match=re.escape(
        "ReconstructionMSE 'reconstruction': an MSE of 0.03 is stated against peak 1 (data whose range is 1, e.g. "
        "[0, 1]), but the first training batch spans [0, 255]: the quality it holds is not the one asked for. Scale the "
        "data to a range of 1, pass peak= the data's range (max - min: 2 for data in [-1, 1]), or pass peak=None (in a "
        "config: peak: null) for an MSE in the data's own units squared."
    )):
        bytes_ = torch.linspace(0, 255, 160).reshape(8, 20)
        objective(ReconstructionMSE(0.03)).lagrangian(rate, bytes_, bytes_)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        psnr.lagrangian(rate, raw, raw)  # once
        objective(ReconstructionMSE(0.03)).lagrangian(rate, torch.linspace(0, 1, 160).reshape(8, 20), raw)
        objective(ReconstructionMSE(0.03, peak=None)).lagrangian(rate, raw, raw)  # data in their own units
        objective(ReconstructionMSE(20, unit="psnr", peak=255)).lagrangian(rate, raw.abs() * 4, raw.abs())
        # Data normalised to [-1, 1] (Normalize(0.5, 0.5)): a PSNR against their range, 2 (it warned "data in [0, 2]").
        signed = torch.linspace(-1, 1, 160).reshape(8, 20)
        objective(ReconstructionMSE(20, unit="psnr", peak=2.0)).lagrangian(rate, signed, signed)
    # Targets outside [0, 1] under a cross-entropy: no floor (images in [0, 255] read -9313, "met").
    with pytest.raises(ValueError, match=re.escape(
        "ReconstructionBCE reads the data as probabilities in [0, 1], but the first training batch spans [0, 255]. "
        "Scale the data to [0, 1] (e.g. x / 255), or use ReconstructionMSE."
    )):
        objective(ReconstructionBCE(0.1)).lagrangian(rate, bytes_, bytes_, decoder_output=bytes_)
    # A tolerance below the data's own entropy is refused at the first batch, as in training_step.
    with pytest.raises(ValueError, match=r"ReconstructionBCE tolerance 0.01 nats/element cannot be met"):
        objective(ReconstructionBCE(0.01)).lagrangian(rate, torch.full((8, 4), 0.5), torch.zeros(8, 4), decoder_output=torch.zeros(8, 4))
    # Within 10 % above it: one batch's entropy is a sample of it, warned.
    grey = torch.full((8, 4), 0.5)  # 0.6931 nats/element
    with pytest.warns(UserWarning, match=re.escape("ReconstructionBCE tolerance 0.74 nats/element lies within 10 % of "
                                                   "the data's own entropy on the first batch (0.6931 nats/element)")):
        objective(ReconstructionBCE(0.74)).lagrangian(rate, grey, grey, decoder_output=torch.zeros(8, 4))


def test_a_users_own_tensors_get_errors_that_name_what_to_pass():
    rate = torch.zeros(8)
    with pytest.raises(ValueError, match=r"reads the decoder's raw output \(Bernoulli logits\), not the reconstruction: "
                       r"pass lagrangian\(rate, x, reconstruction, decoder_output=logits\)"):
        GECOObjective([ReconstructionBCE(0.2)]).lagrangian(rate, torch.rand(8, 1, 4, 4), torch.rand(8, 1, 4, 4))
    with pytest.raises(ValueError, match=r"got shape \(8,\): for one scalar per example pass x.unsqueeze\(1\)"):
        GECOObjective([ReconstructionMSE(1.0, peak=None)]).lagrangian(rate, torch.randn(8), torch.randn(8))
    with pytest.raises(ValueError, match=r"pNCC compares 7x7 patches of images \(N, C, H, W\) at least that large; "
                       r"got data of shape \(8, 20\)"):
        GECOObjective([PatchNCC(0.8)]).lagrangian(rate, torch.rand(8, 20), torch.rand(8, 20))
    with pytest.raises(ValueError, match=r"a PSNR in dB \(peak 255\) must lie in \(0, 100\]"):
        ReconstructionMSE(130, unit="psnr", peak=255)


def _first_batch_on_rank(rank, world_size, port, out):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        objective = GECOObjective([ReconstructionBCE(0.5)])
        attach_fixed_lambda(objective, 1.0)
        x = torch.full((4, 3), 1.0 if rank == 0 else 255.0)  # rank 1's batch alone is out of [0, 1]
        try:
            objective.lagrangian(torch.zeros(4), x, x.clamp(0, 1), decoder_output=torch.zeros(4, 3))
            said = "no error"
        except ValueError as error:
            said = str(error)
        with open(f"{out}/rank{rank}.txt", "w") as handle:
            handle.write(said)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(120)
def test_a_first_batch_refused_on_one_rank_is_refused_on_every_rank(tmp_path):
    # Each rank checks its own first batch: one raising alone left the others waiting in the
    # gradients' all-reduce.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_first_batch_on_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0.txt").read_text() == "GECOObjective: another rank refused its first training batch (see its error)."
    assert (tmp_path / "rank1.txt").read_text().startswith("ReconstructionBCE reads the data as probabilities in [0, 1]")


def test_sigma_vae_on_a_batch_reconstructed_exactly_has_finite_gradients():
    # log of a zero MSE is -inf: the loss stayed finite and the gradients were NaN, which Adam
    # wrote into the weights (no GECO skip guards this objective).
    x = torch.full((2, 1, 4, 4), 0.5)
    reconstruction = x.clone().requires_grad_(True)
    rate = torch.zeros(2, requires_grad=True)
    objective = SigmaVAE()
    loss = objective(VAEOutput.from_terms(x, reconstruction, rate))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(reconstruction.grad).all() and torch.isfinite(rate.grad).all()
    assert objective.log_sigma(VAEOutput.from_terms(x, reconstruction, rate)).item() == pytest.approx(-6.0)  # its floor


def test_a_bce_tolerance_a_constant_decoder_meets_is_warned():
    message = ("ReconstructionBCE 'reconstruction': a tolerance of 0.7 nats/element is met by a decoder that outputs "
               "p = 1/2 everywhere, whose cross-entropy is ln 2 = 0.6931 nats/element on any data in [0, 1]")
    with pytest.warns(UserWarning, match=re.escape(message)):
        ReconstructionBCE(0.7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ReconstructionBCE(0.5)

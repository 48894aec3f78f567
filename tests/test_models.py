"""The VAE collection: every variant's shapes, rates, closed forms and a short GECO training run."""

import math
import re
import warnings

import pytest
import torch
from lightning_geco.datamodules import ShapesDataModule
from torch.utils.data import DataLoader

from helpers import MODELS, build, quiet_trainer, random_images, tiny_conv_vae
from lightning_geco import (
    ELBO,
    BernoulliLikelihood,
    BetaVAE,
    CapacityBetaVAE,
    ConvDRAW,
    ConvVAE,
    DiagnosticPanels,
    FlowVAE,
    GaussianLikelihood,
    GECOCallback,
    GECOObjective,
    KLWarmup,
    LadderVAE,
    ReconstructionMSE,
    SigmaVAE,
)
from lightning_geco.metrics import gaussian_kl_per_dimension
from lightning_geco.models.base import DiagonalGaussian, gaussian_kl
from lightning_geco.nets.flows import CouplingFlow


def _randomise(model, seed=0):
    """Give zero-initialised layers (the flows' last layers) random weights, so tests see a non-trivial model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("image_shape", [(1, 32, 32), (3, 28, 20)])
def test_every_model_gives_finite_terms_of_the_right_shapes(name, image_shape):
    torch.manual_seed(0)
    model = _randomise(build(name, image_shape, objective=ELBO()))
    x = random_images(5, image_shape)
    output = model(x)
    assert output.decoder_output.shape == output.reconstruction.shape == x.shape
    for term in (output.rate, output.distortion, output.log_likelihood, output.elbo):
        assert term.shape == (5,) and torch.isfinite(term).all()
    assert output.posterior.mean.shape == output.posterior.log_variance.shape == (5, model.latent_dim)
    model.objective(output).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.sample(3).shape == (3, *image_shape)
    assert model.reconstruct(x).shape == x.shape
    for images in (model.sample(3), model.reconstruct(x)):  # images, not logits or overshooting means
        assert 0 <= images.min() and images.max() <= 1
    assert torch.isfinite(model.importance_weighted_bound(x, 4)).all()
    traversal = model.latent_traversal(x, dims=[0, 1], steps=3)
    assert traversal is None if name == "ConvDRAW" else traversal.shape == (6, *image_shape)


@pytest.mark.parametrize("name", ["LadderVAE", "ConvDRAW"])
def test_rate_is_the_sum_of_its_parts_and_the_whitened_posterior_carries_it_exactly(name):
    torch.manual_seed(0)
    model = _randomise(build(name, (1, 32, 32), objective=ELBO()))
    output = model(random_images(4, (1, 32, 32)))
    expected_parts = [f"layer_{layer}" for layer in (1, 2)] if name == "LadderVAE" else [f"step_{t}" for t in (1, 2, 3)]
    assert list(output.rate_terms) == expected_parts
    torch.testing.assert_close(sum(output.rate_terms.values()), output.rate)
    # The N(0, I) metrics read the whitened posterior: its KL is the model's rate, image by image.
    torch.testing.assert_close(output.posterior.kl_to_standard_normal(), output.rate, rtol=1e-5, atol=1e-5)


def test_convdraw_step_rates_are_the_closed_form_kls_between_its_posteriors_and_priors():
    torch.manual_seed(0)
    model = _randomise(build("ConvDRAW", (1, 32, 32), objective=ELBO()))
    x = random_images(4, (1, 32, 32))
    torch.manual_seed(1)
    steps, _ = model.draw(x, 4)
    torch.manual_seed(1)
    output = model(x)
    for t, (posterior, prior, z) in enumerate(steps):
        assert z.shape == (4, 2, 8, 8)
        q = torch.distributions.Normal(posterior.mean, (0.5 * posterior.log_variance).exp())
        p = torch.distributions.Normal(prior.mean, (0.5 * prior.log_variance).exp())
        expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
        torch.testing.assert_close(output.rate_terms[f"step_{t + 1}"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.rate, sum(output.rate_terms[f"step_{t}"] for t in (1, 2, 3)))


def test_gaussian_kl_and_whitening_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    q = DiagonalGaussian(torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g))
    p = DiagonalGaussian(torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g))
    normal = lambda d: torch.distributions.Normal(d.mean, (0.5 * d.log_variance).exp())  # noqa: E731
    expected = torch.distributions.kl_divergence(normal(q), normal(p)).sum(1)
    torch.testing.assert_close(gaussian_kl(q, p), expected)
    torch.testing.assert_close(q.whitened(p).kl_to_standard_normal(), expected)
    z = torch.randn(3, 5, generator=g)
    torch.testing.assert_close(q.log_density(z), normal(q).log_prob(z).sum(1))


def test_coupling_flow_log_determinant_equals_autograd_jacobian():
    torch.manual_seed(0)
    flow = _randomise(CouplingFlow(dim=5, context_dim=3, depth=4, hidden_dim=16), seed=1).double()
    z = torch.randn(4, 5, dtype=torch.float64)
    context = torch.randn(4, 3, dtype=torch.float64)
    _, log_det = flow(z, context)
    for n in range(4):
        jacobian = torch.autograd.functional.jacobian(lambda v: flow(v[None], context[n : n + 1])[0][0], z[n])
        expected = torch.linalg.slogdet(jacobian).logabsdet
        torch.testing.assert_close(log_det[n].double(), expected, rtol=1e-5, atol=1e-6)


def test_a_fresh_flow_is_the_identity_and_its_monte_carlo_rate_averages_to_the_base_kl():
    torch.manual_seed(0)
    model = build("FlowVAE", (1, 32, 32), objective=ELBO())
    x = random_images(3, (1, 32, 32))
    base = model.encode(x)
    z, log_det = model.flow(base.mean, model.encode_with_context(x)[1])
    torch.testing.assert_close(z, base.mean)
    assert torch.all(log_det == 0)
    with torch.no_grad():  # 4000 independent draws per image, in one batch
        rates = model(x.repeat(4000, 1, 1, 1)).rate.view(4000, 3)
    closed_form = gaussian_kl_per_dimension(base.mean, base.log_variance).sum(1)
    standard_error = rates.std(0) / math.sqrt(rates.shape[0])
    assert torch.all((rates.mean(0) - closed_form).abs() < 4 * standard_error + 1e-4)


def test_flow_rate_and_importance_weight_are_the_same_monte_carlo_log_ratio():
    torch.manual_seed(0)
    model = _randomise(build("FlowVAE", (1, 32, 32), objective=ELBO()))
    latent = model.infer(random_images(3, (1, 32, 32)))
    torch.testing.assert_close(latent.log_weight, -latent.rate)


def test_ladder_vae_needs_two_layers_and_convdraw_positive_sizes():
    with pytest.raises(ValueError, match=re.escape("LadderVAE needs at least two stochastic layers of positive int size (e.g. latent_dims=[16, 8]), got latent_dims=(8,).")):
        LadderVAE(latent_dims=(8,))
    with pytest.raises(ValueError, match="ConvDRAW num_steps, latent_channels and hidden_channels must be positive"):
        ConvDRAW(num_steps=0)
    with pytest.raises(ValueError, match="A coupling flow needs a code of at least 2 dimensions, got latent_dim=1"):
        FlowVAE(latent_dim=1)


@pytest.mark.parametrize("build_it, message", [
    # these failed with an IndexError, torch's "negative dimension", a TypeError of duplicate
    # keywords, or not at all (hidden_dim 0 built a posterior that ignores its input)
    (lambda: ConvVAE(widths=()), "widths must be the channels of one or more stride-2 levels, positive ints (e.g. [32, 64, 64]), got ()."),
    (lambda: ConvDRAW(widths=[8, -1]), "widths must be the channels of one or more stride-2 levels, positive ints (e.g. [32, 64, 64]), got [8, -1]."),
    (lambda: ConvVAE(hidden_dim=0), "hidden_dim must be a positive int (the fully connected layer's width), got 0."),
    (lambda: LadderVAE(latent_dim=5), "LadderVAE takes latent_dims, one size per stochastic layer (its latent_dim is their sum), got latent_dim=5: pass e.g. latent_dims=[16, 8]."),
    (lambda: ConvDRAW(latent_dim=5), "ConvDRAW derives its latent_dim (num_steps x latent_channels x the reader's output size), got latent_dim=5: set num_steps and latent_channels instead."),
    (lambda: ConvDRAW(num_steps=2.5), "ConvDRAW num_steps, latent_channels and hidden_channels must be positive ints, got 2.5, 4, 64."),
    # 0 built couplings that ignore their input; 4.7 and -3 failed inside torch without the name
    (lambda: FlowVAE(flow_hidden_dim=0), "flow hidden_dim must be a positive int (flow_hidden_dim: each coupling network's width), got 0."),
    (lambda: FlowVAE(flow_depth=2.0), "flow depth must be a positive int (flow_depth: coupling layers), got 2.0."),
    (lambda: ConvVAE(latent_dim=4.7), "latent_dim must be a positive int, got 4.7."),
    (lambda: ConvVAE(iwae_samples=2.5), "iwae_samples must be an int >= 0 (0 turns the bound off), got 2.5."),
    (lambda: ConvVAE(learning_rate=float("inf")), "learning_rate must be positive and finite, got inf."),
    (lambda: GaussianLikelihood(sigma=float("inf")), "GaussianLikelihood sigma must be positive and finite (data units), got inf."),
    (lambda: SigmaVAE(min_log_sigma=float("nan")), "SigmaVAE min_log_sigma must be a finite ln sigma (the authors: -6), got nan."),
    (lambda: BetaVAE(beta=float("inf")), "BetaVAE beta must be >= 0 and finite, got inf."),
    # these failed inside Python's len() or int(), or a comparison with None, without the name;
    # the floats were truncated silently
    (lambda: ConvVAE(image_shape=28), "image_shape must be (channels, height, width) of positive ints, got 28."),
    (lambda: ConvVAE(image_shape=(1, 28.5, 28)), "image_shape must be (channels, height, width) of positive ints, got (1, 28.5, 28)."),
    (lambda: LadderVAE(latent_dims=8), "LadderVAE needs at least two stochastic layers of positive int size (e.g. latent_dims=[16, 8]), got latent_dims=8."),
    (lambda: LadderVAE(latent_dims=[4.7, 3]), "got latent_dims=[4.7, 3]."),
    (lambda: ConvVAE(learning_rate=None), "learning_rate must be positive and finite, got None."),
    (lambda: ConvVAE(active_unit_threshold="0.01"), "active_unit_threshold must be >= 0 (a variance), got '0.01'."),
    (lambda: BetaVAE(beta=None), "BetaVAE beta must be >= 0 and finite, got None."),
    (lambda: KLWarmup(start_beta=None), "KLWarmup start_beta must lie in [0, 1], got None."),
    (lambda: CapacityBetaVAE(gamma="100"), "CapacityBetaVAE gamma must be positive and finite, got '100'."),
])
def test_a_bad_architecture_is_refused_naming_the_value(build_it, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_it()


def test_numpy_integers_are_sizes_like_python_ones():
    import numpy as np

    model = ConvVAE(image_shape=(1, 16, 16), widths=[np.int64(8), np.int64(8)], hidden_dim=np.int64(16), latent_dim=4)
    assert model.encoder.fc[1].out_features == 16
    ConvDRAW(image_shape=(1, 16, 16), num_steps=np.int64(2), widths=[8, 8])


def test_a_bernoulli_likelihood_on_grey_images_warns_that_the_elbo_bounds_nothing():
    def fit(images):
        model = tiny_conv_vae(objective=ELBO(), likelihood=BernoulliLikelihood())
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(model, DataLoader(images, batch_size=8))

    grey = torch.full((8, 1, 16, 16), 0.5)
    grey[:, :, :8] = 0.0
    expected = ("BernoulliLikelihood reads binary images, but 50.0% of the first training batch's pixels lie strictly "
                "between 0 and 1: log p(x|z) is then no normalised density, so val/elbo and val/iwae bound no "
                f"log-likelihood and include the data's own binary entropy ({128 * math.log(2):.1f} nats per image on "
                "this batch). Binarize the data (--data.binarize true) for a binary-image ELBO, or use GaussianLikelihood.")
    with pytest.warns(UserWarning, match=re.escape(expected)):
        fit(grey)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="BernoulliLikelihood")
        fit((grey > 0.25).float())  # binary: nothing to say


@pytest.mark.parametrize("name", MODELS)
def test_every_model_trains_with_geco_on_the_shapes_and_reduces_its_distortion(name):
    # validate() before fit() also checks that the validation metrics survive the switch from
    # validate's inference mode to fit's no_grad validation.
    torch.manual_seed(0)
    data = ShapesDataModule(image_size=32, num_train=3000, num_val=256, batch_size=32)
    data.setup("fit")
    model = build(name, data.image_shape, objective=GECOObjective([ReconstructionMSE(0.02)]), learning_rate=2e-3)
    val = DataLoader(data.val_dataset, batch_size=256)
    trainer = quiet_trainer(max_steps=300, callbacks=[GECOCallback()], num_sanity_val_steps=0, limit_val_batches=1)
    before = trainer.validate(model, val, verbose=False)[0]["val/distortion"]
    trainer = quiet_trainer(max_steps=300, callbacks=[GECOCallback()], num_sanity_val_steps=0, check_val_every_n_epoch=None, val_check_interval=300)
    trainer.fit(model, data.train_dataloader(), val)
    after = trainer.callback_metrics["val/distortion"].item()
    assert after < 0.6 * before, (before, after)
    parts = {"LadderVAE": ["layer_1", "layer_2"], "ConvDRAW": ["step_1", "step_2", "step_3"]}.get(name, [])
    logged = sum(trainer.callback_metrics[f"val/rate/{part}"] for part in parts) if parts else None
    if parts:
        torch.testing.assert_close(logged, trainer.callback_metrics["val/rate"], rtol=1e-4, atol=1e-4)


def test_images_out_of_range_after_the_first_batch_and_nan_are_named(monkeypatch):
    import lightning_geco.models.base as base

    monkeypatch.setattr(base, "RANGE_CHECK_EVERY_N_STEPS", 4)
    model = tiny_conv_vae()
    batches = [random_images(8, seed=i) for i in range(8)]
    batches[5] = batches[5] * 255  # a bad batch well after the first
    with pytest.raises(ValueError, match=r"training batches of steps 4 to 7 held values in \[0\.000\d+, 25\d\.\d+\]"):
        quiet_trainer(max_steps=8, limit_val_batches=0, callbacks=[GECOCallback()]).fit(model, DataLoader(batches, batch_size=None))
    nan = random_images(8)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="The images of this batch contain NaN"):
        tiny_conv_vae().check_images(nan, check_range=True)
    # reconstruct (a loaded model's first call) reads images in [0, 255] as it reads training's.
    with pytest.raises(ValueError, match=r"Images must lie in \[0, 1\] .*this batch held values in \[0\.\d+, 25\d\.\d+\]"):
        tiny_conv_vae().reconstruct(random_images(4) * 255)


@pytest.mark.parametrize("call", ["forward", "reconstruct", "importance_weighted_bound"])
def test_a_wrong_shape_passed_to_the_model_is_named(call):
    model = tiny_conv_vae()
    # 18x18 passes the 16x16 model's convolutions and came back resized from reconstruct, silently.
    for size in (18, 28):
        with pytest.raises(ValueError, match=rf"ConvVAE was built for images of shape \(N, 1, 16, 16\), got a batch of shape \(2, 1, {size}, {size}\)"):
            if call == "importance_weighted_bound":
                model.importance_weighted_bound(torch.rand(2, 1, size, size), 2)
            else:
                getattr(model, call)(torch.rand(2, 1, size, size))


def test_a_bad_number_of_samples_is_named():
    model = tiny_conv_vae()
    for bad in (-1, 2.5, "3"):
        with pytest.raises(ValueError, match=re.escape(f"sample: num_samples must be an integer >= 0, got {bad!r}.")):
            model.sample(bad)
    with pytest.raises(ValueError, match=re.escape("importance_weighted_bound: num_samples must be an integer >= 1, got 0.")):
        model.importance_weighted_bound(random_images(2), 0)
    assert model.sample(0).shape == (0, 1, 16, 16) and model.sample(torch.tensor(3)).shape == (3, 1, 16, 16)


def test_reconstruct_of_a_bernoulli_model_is_its_mean_not_its_logits():
    model = tiny_conv_vae(likelihood=BernoulliLikelihood(), objective=ELBO())
    x = random_images(3)
    torch.testing.assert_close(model.reconstruct(x), torch.sigmoid(model.decode_posterior_code(x)))


def test_a_one_dimensional_latent_trains_validates_and_draws_its_panels():
    # torchmetrics squeezes a one-element result to 0-d: the validation stopped at len() of it.
    model = ConvVAE(image_shape=(1, 16, 16), latent_dim=1, widths=(8, 8), hidden_dim=32)
    trainer = quiet_trainer(max_steps=2, callbacks=[GECOCallback(), DiagnosticPanels()])
    trainer.fit(model, DataLoader(random_images(16), batch_size=8), DataLoader(random_images(8, seed=1), batch_size=8))
    metrics = trainer.callback_metrics
    torch.testing.assert_close(metrics["val/kl_dim/0"], metrics["val/rate"], rtol=1e-5, atol=1e-7)
    assert model.kl_per_dimension.shape == (1,)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_trains_validates_and_draws_its_panels_in_bf16_true(name):
    # bf16-true casts the weights; the panels sample outside the step hooks, where Lightning's
    # default dtype is not set: the prior draw was fp32 and the first validation stopped there.
    torch.manual_seed(0)
    model = build(name, (1, 16, 16))
    panels = DiagnosticPanels(num_images=4)
    trainer = quiet_trainer(max_steps=2, precision="bf16-true", num_sanity_val_steps=0, callbacks=[GECOCallback(), panels])
    trainer.fit(model, DataLoader(random_images(16), batch_size=8), DataLoader(random_images(8, seed=1), batch_size=8))
    assert len(panels.history) == 1 and model.sample(3).dtype == torch.bfloat16
    assert torch.isfinite(trainer.callback_metrics["val/elbo"])


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_a_half_precision_cast_keeps_the_gaussian_sigma_in_fp32(learn_sigma):
    # Rounded to bf16, ln 0.1 read -2.297: sigma 0.1006, and val/elbo 23 nats off per 64x64 image.
    likelihood = GaussianLikelihood(sigma=0.1, learn_sigma=learn_sigma)
    x, mean = random_images(2, (1, 64, 64)), random_images(2, (1, 64, 64), seed=1)
    expected = likelihood.log_prob(x, mean)
    likelihood.to(torch.bfloat16)
    assert likelihood.log_sigma.dtype == torch.float32 and isinstance(likelihood.log_sigma, torch.nn.Parameter) == learn_sigma
    assert likelihood.init_args()["sigma"] == pytest.approx(0.1, rel=1e-6)
    torch.testing.assert_close(likelihood.log_prob(x, mean.bfloat16()), GaussianLikelihood(0.1).log_prob(x, mean.bfloat16()))
    assert torch.equal(likelihood.log_prob(x, mean), expected)
    likelihood.to(torch.float64)  # a cast to more precision is the user's to make
    assert likelihood.log_sigma.dtype == torch.float64

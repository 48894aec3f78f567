import re

import pytest
import torch

from helpers import random_images, tiny_conv_vae
from lightning_geco import ConvVAE, GaussianLikelihood


@pytest.mark.parametrize("image_shape", [(1, 28, 28), (3, 33, 47), (3, 64, 64), (2, 16, 16)])
def test_forward_shapes_and_finiteness_at_any_size_and_channel_count(image_shape):
    model = ConvVAE(image_shape=image_shape, latent_dim=5, widths=(8, 16, 16), hidden_dim=32)
    x = torch.rand(3, *image_shape)
    out = model(x)
    assert out.reconstruction.shape == x.shape
    assert out.z.shape == (3, 5)
    for term in (out.rate, out.distortion, out.log_likelihood):
        assert term.shape == (3,) and torch.isfinite(term).all()
    assert (out.rate >= 0).all()
    assert model.sample(4).shape == (4, *image_shape)


def test_wrong_image_shape_gets_a_clear_error():
    model = tiny_conv_vae(image_shape=(1, 16, 16))
    with pytest.raises(ValueError, match=r"built for images of shape \(N, 1, 16, 16\), got a batch of shape \(2, 3, 16, 16\)"):
        model.check_images(torch.rand(2, 3, 16, 16))


def test_a_batch_of_the_wrong_dtype_is_named_not_left_to_the_first_convolution():
    model = tiny_conv_vae(image_shape=(1, 16, 16))
    x = torch.rand(2, 1, 16, 16)
    with pytest.raises(TypeError, match=r"takes floating-point images in \[0, 1\], got a batch of dtype torch.uint8\. .*/ 255"):
        model.reconstruct((x * 255).to(torch.uint8))
    with pytest.raises(TypeError, match=r"weights are torch.float32, got a batch of dtype torch.float64\. .*x\.to\(torch.float32\) \(numpy"):
        model(x.double())
    with pytest.raises(TypeError, match=r"got a batch of dtype torch.bfloat16\. Convert it with x\.to\(torch.float32\), or"):
        model.reconstruct(x.bfloat16())
    # Autocast casts a float32 batch to bf16 layers, so that passes; a float64 one it does not cast.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.reconstruct(x).shape == x.shape
        with pytest.raises(TypeError, match="got a batch of dtype torch.float64"):
            model.importance_weighted_bound(x.double(), num_samples=2)
    assert model.double().reconstruct(x.double()).dtype == torch.float64


def test_the_dtype_check_runs_on_a_torch_whose_autocast_query_takes_no_device(monkeypatch):
    # torch < 2.4 (pyproject allows 2.1): is_autocast_enabled() takes no argument, and the
    # check raised "takes no arguments" on every forward.
    def old_query(*args):
        if args:
            raise TypeError("is_autocast_enabled() takes no arguments (1 given)")
        return False

    monkeypatch.setattr(torch, "is_autocast_enabled", old_query)
    monkeypatch.setattr(torch, "is_autocast_cpu_enabled", lambda: False)
    model = tiny_conv_vae(image_shape=(1, 16, 16))
    assert model.reconstruct(torch.rand(2, 1, 16, 16)).shape == (2, 1, 16, 16)
    with pytest.raises(TypeError, match="got a batch of dtype torch.float64"):
        model(torch.rand(2, 1, 16, 16, dtype=torch.float64))


def test_images_outside_unit_interval_get_a_clear_error():
    model = tiny_conv_vae(image_shape=(1, 16, 16))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\] .* held values in \[-0.5, 2\]"):
        x = torch.rand(2, 1, 16, 16)
        x[0, 0, 0, 0], x[1, 0, 0, 0] = -0.5, 2.0
        model.check_images(x, check_range=True)


def test_images_too_small_for_the_number_of_levels_are_rejected():
    with pytest.raises(ValueError, match=r"Images of size 6x6 are too small for 4 stride-2 levels"):
        ConvVAE(image_shape=(1, 6, 6), widths=(8, 8, 8, 8))


def test_bad_model_arguments_are_rejected():
    with pytest.raises(ValueError, match=r"latent_dim must be a positive int, got 0"):
        ConvVAE(latent_dim=0)
    with pytest.raises(ValueError, match=r"image_shape must be \(channels, height, width\)"):
        ConvVAE(image_shape=(28, 28))
    # Named as the model's arguments, with their ranges (the metrics they build used their own names).
    for kwargs, message in [
        ({"num_logged_images": 0}, "num_logged_images must be a positive int (images per panel), got 0; for no panels"),
        ({"marginal_kl_chunk_size": 0}, "marginal_kl_chunk_size must be a positive int (rows), got 0."),
        ({"active_unit_threshold": -1.0}, "active_unit_threshold must be >= 0 (a variance), got -1.0."),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            ConvVAE(**kwargs)


def test_iwae_bound_equals_the_elbo_at_k1_in_expectation_and_grows_with_k():
    torch.manual_seed(0)
    model = tiny_conv_vae(likelihood=GaussianLikelihood(sigma=0.3)).eval()
    x = random_images(4)
    repeats = 400
    with torch.no_grad():
        iwae_1 = torch.stack([model.importance_weighted_bound(x, 1) for _ in range(repeats)])
        elbo = torch.stack([model(x).elbo for _ in range(repeats)])
        difference = iwae_1.mean(0) - elbo.mean(0)
        standard_error = (iwae_1.var(0) / repeats + elbo.var(0) / repeats).sqrt()
        assert (difference.abs() < 4 * standard_error).all()
        by_k = [torch.stack([model.importance_weighted_bound(x, k) for _ in range(40)]).mean().item() for k in (1, 10, 100)]
    assert by_k[0] < by_k[1] < by_k[2]


def test_traversal_moves_one_latent_per_row():
    torch.manual_seed(0)
    model = tiny_conv_vae().eval()
    x = random_images(1)
    seen = []
    decode = model.decode
    model.decode = lambda z: seen.append(z.clone()) or decode(z)
    images = model.latent_traversal(x, dims=[2, 0], steps=5, span=2.0)
    assert images.shape == (10, 1, 16, 16)
    (z,) = seen
    mean = model.encode(x).mean[0]
    values = torch.linspace(-2.0, 2.0, 5)
    torch.testing.assert_close(z[:5, 2], values)
    torch.testing.assert_close(z[5:, 0], values)
    for row, dim in ((slice(0, 5), 2), (slice(5, 10), 0)):
        others = [j for j in range(4) if j != dim]
        torch.testing.assert_close(z[row][:, others], mean[others].expand(5, 3))

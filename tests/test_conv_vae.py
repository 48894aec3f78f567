import pytest
import torch

from helpers import tiny_conv_vae
from lightning_geco import ConvVAE


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


def test_images_outside_unit_interval_get_a_clear_error():
    model = tiny_conv_vae(image_shape=(1, 16, 16))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\] .* got values in \[-0.5, 2\]"):
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

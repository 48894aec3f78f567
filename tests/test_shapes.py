import math

import pytest
import torch
from lightning_geco.datamodules import ShapesDataModule
from lightning_geco.datamodules.shapes import (
    FACTOR_NAMES,
    ORIENTATIONS,
    POSITIONS,
    SCALES,
    render_shapes,
    sample_factors,
)


def test_same_seed_same_images_different_seed_different_images():
    a = render_shapes(sample_factors(50, seed=3), 32)
    b = render_shapes(sample_factors(50, seed=3), 32)
    c = render_shapes(sample_factors(50, seed=4), 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_images_are_binary_float_with_the_requested_shape():
    images = render_shapes(sample_factors(20, seed=0), 40)
    assert images.shape == (20, 1, 40, 40)
    assert images.dtype == torch.float32
    assert set(images.unique().tolist()) <= {0.0, 1.0}


def test_factors_lie_on_the_dsprites_grids():
    factors = sample_factors(500, seed=1)
    assert factors.shape == (500, len(FACTOR_NAMES))
    assert set(factors[:, 0].unique().tolist()) == {0.0, 1.0, 2.0}
    for column, grid in ((1, SCALES), (2, ORIENTATIONS), (3, POSITIONS), (4, POSITIONS)):
        assert torch.isin(factors[:, column], grid).all()


def test_every_shape_is_drawn_and_fully_inside_the_image():
    images = render_shapes(sample_factors(300, seed=2), 64)
    assert (images.flatten(1).sum(1) > 10).all()
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    assert border.sum() == 0


def test_area_grows_with_scale_and_position_moves_the_centre():
    base = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.5]])
    big = base.clone()
    big[0, 1] = 1.0
    assert render_shapes(big, 64).sum() > 2.5 * render_shapes(base, 64).sum()  # area ~ scale^2 = 4x, pixelised
    left, right = base.clone(), base.clone()
    left[0, 3], right[0, 3] = 0.0, 1.0
    columns = torch.arange(64, dtype=torch.float32)

    def centre_x(f):
        image = render_shapes(f, 64)[0, 0]
        return (image.sum(0) * columns).sum() / image.sum()

    assert centre_x(left) < 25 < 39 < centre_x(right)


def test_square_rotation_by_a_quarter_turn_gives_the_same_image():
    square = torch.tensor([[0.0, 1.0, 0.0, 0.5, 0.5]])
    turned = square.clone()
    turned[0, 2] = math.pi / 2
    assert (render_shapes(square, 64) != render_shapes(turned, 64)).sum() <= 4


def test_datamodule_knows_its_shape_before_setup_and_yields_images_with_factors():
    dm = ShapesDataModule(image_size=24, num_train=100, num_val=30, batch_size=16)
    assert dm.image_shape == (1, 24, 24)
    dm.setup("fit")
    assert len(dm.train_dataset) == 100 and len(dm.val_dataset) == 30
    images, factors = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 1, 24, 24) and factors.shape == (16, 5)
    val_images, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(val_images, dm.val_dataset.tensors[0][:16])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 4}, r"image_size must be at least 8 pixels, got 4"),
        ({"num_train": 0}, r"num_train and num_val must be positive, got 0 and 2000"),
        ({"batch_size": 0}, r"batch_size must be a positive int, got 0"),
        ({"batch_size": 2.5}, r"batch_size must be a positive int, got 2.5"),  # failed deep in the sampler
        ({"num_calibration": 2.5}, r"num_calibration must be an int >= 0, got 2.5"),
        ({"num_workers": True}, r"num_workers must be an int >= 0, got True"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShapesDataModule(**kwargs)


def test_a_resumed_fit_on_shapes_with_more_calibration_images_is_refused_and_with_fewer_warned(tmp_path):
    # The shapes draw their validation split apart, so no split record held the calibration
    # split, and a resume that carved more calibration images from the training set (images the
    # model had trained on) went on without a word.
    import re

    from helpers import quiet_trainer, tiny_conv_vae
    from lightning_geco import GECOCallback

    def data(num_calibration):
        return ShapesDataModule(image_size=16, num_train=64, num_val=16, batch_size=8, num_calibration=num_calibration)

    def fit(num_calibration, **kwargs):
        trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[GECOCallback()])
        trainer.fit(model, datamodule=data(num_calibration), **kwargs)
        return trainer

    model = tiny_conv_vae()
    fit(8).save_checkpoint(tmp_path / "run.ckpt")
    message = ("ShapesDataModule: the checkpoint's run carved num_calibration=8 images from its training split; this "
               "resumed fit carves 16, and the 8 more are images the model trained on")
    with pytest.raises(ValueError, match=re.escape(message)):
        fit(16, ckpt_path=tmp_path / "run.ckpt")
    with pytest.warns(UserWarning, match=re.escape("the checkpoint's run carved num_calibration=8 images from its "
                                                   "training split; this one carves 4: the resumed run trains")):
        fit(4, ckpt_path=tmp_path / "run.ckpt")

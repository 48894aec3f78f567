"""ImageFolderDataModule on real PNG files written with PIL: both layouts, shapes, labels, splits, errors."""

import re
from pathlib import Path

import lightning_geco.datamodules.folder as folder_module
import numpy
import pytest
import torch
from lightning_geco.datamodules import ImageFolderDataModule, MissingDatasetError
from lightning_geco.datamodules.folder import LAYOUTS
from PIL import Image

from helpers import quiet_trainer, tiny_conv_vae
from lightning_geco import GECOCallback

CLASSES = ("cats", "dogs", "zebras")
# Sources of different sizes, aspect ratios and modes (RGB, grayscale, RGBA).
SOURCES = [((20, 30), "RGB"), ((16, 16), "L"), ((40, 24), "RGBA"), ((17, 19), "RGB")]


def write_png(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    width, height = size
    pixels = numpy.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=numpy.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)


def make_class_folders(root: Path, per_class: int = 8) -> Path:
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            size, mode = SOURCES[i % len(SOURCES)]
            write_png(root / name / f"{i:03d}.png", size, mode, seed=100 * c + i)
    return root


def make_flat(root: Path, n: int = 10) -> Path:
    for i in range(n):
        size, mode = SOURCES[i % len(SOURCES)]
        write_png(root / f"img_{i:03d}.png", size, mode, seed=i)
    return root


def _setup(**kwargs) -> ImageFolderDataModule:
    data = ImageFolderDataModule(**kwargs)
    data.prepare_data()
    data.setup("fit")
    return data


def _all(dataset):
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


@pytest.mark.parametrize("channels", [1, 3])
def test_class_folders_give_shapes_range_labels_and_split_sizes(tmp_path, channels):
    root = make_class_folders(tmp_path / "images")
    data = ImageFolderDataModule(root, image_size=12, channels=channels, num_val=6, batch_size=4)
    assert data.image_shape == (channels, 12, 12)  # before setup
    data.setup("fit")
    assert len(data.train_dataset) == 18 and len(data.val_dataset) == 6
    train_x, train_y = _all(data.train_dataset)
    val_x, val_y = _all(data.val_dataset)
    assert train_x.shape == (18, channels, 12, 12) and train_x.dtype == torch.float32
    assert 0 <= train_x.min() and train_x.max() <= 1 and train_x.std() > 0.1
    labels = torch.cat([train_y, val_y]).sort().values
    assert labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8  # class index, folders sorted by name
    images, targets = next(iter(data.train_dataloader()))
    assert images.shape == (4, channels, 12, 12) and targets.dtype == torch.int64


def test_flat_folder_gives_label_zero_and_rectangular_sizes(tmp_path):
    root = make_flat(tmp_path / "flat")
    data = _setup(root=str(root), image_size=(8, 14), channels=3, num_val=3)
    assert data.image_shape == (3, 8, 14)
    x, y = _all(data.train_dataset)
    assert x.shape == (7, 3, 8, 14) and (y == 0).all() and len(data.val_dataset) == 3


def test_grayscale_source_becomes_three_equal_channels_and_values_match_the_file(tmp_path):
    root = tmp_path / "flat"
    write_png(root / "a.png", (16, 16), "L", seed=0)
    write_png(root / "b.png", (16, 16), "L", seed=1)
    data = _setup(root=root, image_size=16, channels=3, num_val=1)
    x, _ = _all(torch.utils.data.ConcatDataset([data.train_dataset, data.val_dataset]))
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    # Same size: no resampling, so each image is exactly its file's bytes / 255.
    for name in ("a.png", "b.png"):
        expected = torch.from_numpy(numpy.array(Image.open(root / name))).float() / 255
        assert any(torch.equal(image, expected) for image in x[:, 0])


def test_16_bit_and_float_grayscale_are_scaled_to_the_unit_interval_not_clipped(tmp_path):
    # PIL's convert("L") clips: a 16-bit ramp came out 99.6 % white, a float one in [0, 1] black.
    root = tmp_path / "flat"
    root.mkdir()
    ramp = numpy.linspace(0.0, 1.0, 16 * 16).reshape(16, 16)
    Image.fromarray(numpy.rint(ramp * 65535).astype(numpy.uint16)).save(root / "a16.png")
    Image.fromarray(ramp.astype(numpy.float32), "F").save(root / "float.tif")
    Image.fromarray(numpy.rint(ramp * 255).astype(numpy.int32), "I").save(root / "i8.tif")  # 8-bit values in 32 bits
    with Image.open(root / "a16.png") as a16, Image.open(root / "float.tif") as floats, Image.open(root / "i8.tif") as i8:
        assert (a16.mode, floats.mode, i8.mode) == ("I;16", "F", "I")
    data = _setup(root=root, image_size=16, channels=1, num_val=1)
    x, _ = _all(torch.utils.data.ConcatDataset([data.train_dataset, data.val_dataset]))
    expected = torch.from_numpy(numpy.rint(ramp * 255) / 255).float()
    for image in x[:, 0]:  # 8 bits of each: within half a level of the ramp
        torch.testing.assert_close(image, expected, rtol=0, atol=1e-6)
    # A float image beyond [0, 1] or an integer one past 16 bits has no known white: refused, named.
    Image.fromarray((ramp * 3).astype(numpy.float32), "F").save(root / "float.tif")
    with pytest.raises(ValueError, match=re.escape(f"{root / 'float.tif'} (ValueError: a float image must lie in [0, 1]; "
                                                   "this one holds [0, 3])")):
        _setup(root=root, image_size=16, channels=1, num_val=1)
    (root / "float.tif").unlink()
    (root / "i8.tif").unlink()
    Image.fromarray((ramp * 70000).astype(numpy.int32), "I").save(root / "wide.tif")
    with pytest.raises(ValueError, match=re.escape("an integer image (PIL mode I) holds [0, 70000], past 16 bits' [0, 65535]")):
        _setup(root=root, image_size=16, channels=1, num_val=1)


def test_a_dark_16_bit_frame_is_scaled_as_16_bits_whatever_it_holds(tmp_path):
    # A 16-bit PGM opens as PIL mode "I"; one whose values all lie in [0, 255] was read as 8-bit,
    # 257x too bright beside the brighter frames of the same folder.
    from lightning_geco.datamodules.folder import read_image

    for value in (200, 40000):
        Image.fromarray(numpy.full((4, 4), value, numpy.uint16)).save(tmp_path / f"{value}.pgm")
        with Image.open(tmp_path / f"{value}.pgm") as opened:
            assert opened.mode == "I"
        assert numpy.asarray(read_image(tmp_path / f"{value}.pgm", "L")).max() == round(value * 255 / 65535)


def test_a_photo_is_read_upright_by_its_exif_orientation(tmp_path):
    # A phone stores a portrait photo as landscape pixels with Orientation 6 (rotate 90 clockwise).
    from lightning_geco.datamodules.folder import read_image

    pixels = numpy.zeros((20, 40, 3), numpy.uint8)
    pixels[:, :10] = 255  # a white band at the stored image's left edge: its top once upright
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "phone.png", exif=exif)
    upright = numpy.asarray(read_image(tmp_path / "phone.png", "L"))
    assert upright.shape == (40, 20)
    assert upright[:10].min() == 255 and upright[10:].max() == 0


def test_split_is_deterministic_and_follows_the_seed(tmp_path):
    root = make_class_folders(tmp_path / "images")

    def val_images(seed):
        return _all(_setup(root=root, image_size=8, channels=1, num_val=5, seed=seed).val_dataset)[0]

    assert torch.equal(val_images(0), val_images(0))
    assert not torch.equal(val_images(0), val_images(1))


def test_calibration_is_carved_from_the_training_split(tmp_path):
    root = make_class_folders(tmp_path / "images")
    data = _setup(root=root, image_size=8, channels=3, num_val=4, num_calibration=5)
    assert len(data.train_dataset) == 15 and len(data.calibration_dataset) == 5 and len(data.val_dataset) == 4
    train = set(data.train_dataset.indices)
    assert not train & set(data.calibration_dataset.indices)
    assert not (train | set(data.calibration_dataset.indices)) & set(data.val_dataset.indices)


def test_device_mode_holds_float_tensors(tmp_path):
    data = _setup(root=make_flat(tmp_path / "flat"), image_size=8, channels=1, num_val=2, device="cpu", batch_size=4)
    images, targets = next(iter(data.train_dataloader()))
    assert images.shape == (4, 1, 8, 8) and images.dtype == torch.float32 and (targets == 0).all()


def test_too_large_for_memory_reads_lazily_with_the_same_values(tmp_path, monkeypatch):
    root = make_class_folders(tmp_path / "images", per_class=3)
    in_memory = _setup(root=root, image_size=10, channels=3, num_val=2)
    monkeypatch.setattr(folder_module, "IN_MEMORY_LIMIT", 100)
    lazy = _setup(root=root, image_size=10, channels=3, num_val=2)
    assert not isinstance(lazy.train_dataset.dataset, folder_module.UInt8Images)
    for a, b in zip(_all(in_memory.train_dataset), _all(lazy.train_dataset)):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-6, rtol=0)
    message = (
        f"ImageFolderDataModule(device='cpu') needs the images in memory, but the 9 images under {root} "
        "take 0.00 GiB decoded, more than the 0.00 GiB limit (IN_MEMORY_LIMIT); leave device unset or lower "
        "image_size."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        _setup(root=root, image_size=10, channels=3, num_val=2, device="cpu")


def test_hidden_files_folders_and_other_files_are_skipped(tmp_path):
    root = make_class_folders(tmp_path / "images", per_class=2)
    write_png(root / ".ipynb_checkpoints" / "x.png", (8, 8), "RGB", seed=0)
    (root / "empty_class").mkdir()
    (root / "cats" / "notes.txt").write_text("not an image")
    # Inside a class folder too: macOS's AppleDouble files (not images) and a hidden folder.
    (root / "cats" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata")
    write_png(root / "dogs" / ".thumbnails" / "t.png", (8, 8), "RGB", seed=1)
    data = _setup(root=root, image_size=8, channels=3, num_val=1)
    assert len(data.train_dataset) + len(data.val_dataset) == 6
    assert _all(data.train_dataset)[1].max() <= 2


def test_missing_root_names_the_path_and_the_layouts(tmp_path):
    missing = tmp_path / "nowhere"
    data = ImageFolderDataModule(missing, image_size=8, channels=3, num_val=1)
    message = (
        f"ImageFolderDataModule: no folder at {missing} (resolved: {missing.resolve()}). "
        f"Expected {LAYOUTS}; pass --data.init_args.root <folder>."
    )
    with pytest.raises(MissingDatasetError, match=re.escape(message)):
        data.prepare_data()
    with pytest.raises(MissingDatasetError, match=re.escape(message)):
        data.setup("fit")


def test_folder_without_images_says_what_it_looked_for(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    message = (
        f"ImageFolderDataModule: no images under {tmp_path / 'empty'} (looked for files ending in "
        ".jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp). "
        f"Expected {LAYOUTS}."
    )
    with pytest.raises(MissingDatasetError, match=re.escape(message)):
        _setup(root=tmp_path / "empty", image_size=8, channels=3, num_val=1)


def test_mixed_layouts_are_refused(tmp_path):
    root = make_class_folders(tmp_path / "images", per_class=1)
    write_png(root / "stray.png", (8, 8), "RGB", seed=0)
    message = (
        f"ImageFolderDataModule: {root} holds both images (stray.png, ...) and class folders "
        f"(cats/, ...); use one layout: {LAYOUTS}."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        _setup(root=root, image_size=8, channels=3, num_val=1)


def test_corrupt_image_names_the_file(tmp_path):
    root = make_flat(tmp_path / "flat", n=3)
    bad = root / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(ValueError, match=re.escape(f"ImageFolderDataModule: cannot read image file {bad} (")) as info:
        _setup(root=root, image_size=8, channels=3, num_val=1)
    assert str(info.value).endswith("); remove or replace it.")


def test_truncated_image_names_the_file(tmp_path):
    root = make_class_folders(tmp_path / "images", per_class=2)
    good = root / "dogs" / "000.png"
    truncated = root / "dogs" / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ValueError, match=re.escape(f"cannot read image file {truncated} (")):
        _setup(root=root, image_size=8, channels=3, num_val=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"channels": 2}, "ImageFolderDataModule: channels must be 1 (grayscale) or 3 (RGB), got 2."),
        ({"channels": 4}, "ImageFolderDataModule: channels must be 1 (grayscale) or 3 (RGB), got 4."),
        (
            {"image_size": 0},
            "ImageFolderDataModule: image_size must be a positive int or a pair (H, W) of positive ints, got 0.",
        ),
        (
            {"image_size": (8, 8, 8)},
            "ImageFolderDataModule: image_size must be a positive int or a pair (H, W) of positive ints, "
            "got (8, 8, 8).",
        ),
        (
            {"image_size": (8, -1)},
            "ImageFolderDataModule: image_size must be a positive int or a pair (H, W) of positive ints, "
            "got (8, -1).",
        ),
        ({"num_val": 0}, "ImageFolderDataModule: num_val must be an int in [1, number of images - 1], got 0."),
    ],
)
def test_bad_arguments_name_the_value_and_the_range(tmp_path, kwargs, message):
    arguments = {"root": tmp_path, "image_size": 8, "channels": 3, "num_val": 1, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        ImageFolderDataModule(**arguments)


def test_num_val_too_large_for_the_folder(tmp_path):
    root = make_flat(tmp_path / "flat", n=4)
    message = f"ImageFolderDataModule: num_val must lie in [1, 3] for the 4 images under {root}, got 4 (--data.num_val)."
    with pytest.raises(ValueError, match=re.escape(message)):
        _setup(root=root, image_size=8, channels=3, num_val=4)


@pytest.mark.timeout(120)
def test_conv_vae_with_geco_trains_three_steps_on_a_folder(tmp_path):
    root = make_class_folders(tmp_path / "images")
    data = ImageFolderDataModule(root, image_size=16, channels=3, num_val=4, batch_size=4)
    model = tiny_conv_vae(image_shape=data.image_shape)
    trainer = quiet_trainer(max_steps=3, callbacks=[GECOCallback()], limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3


@pytest.mark.timeout(120)
def test_a_classifier_split_is_compared_with_a_run_on_its_own_folder_only(tmp_path):
    # Two folders of one size draw the same indices from one seed: a classifier trained on the
    # first was compared with a VAE run on the second, and refused it for images it never saw.
    first, second = make_flat(tmp_path / "first", n=12), make_flat(tmp_path / "second", n=12)
    classifier_data = _setup(root=first, image_size=8, channels=1, num_val=2)
    trained = classifier_data.held_out_split()
    assert trained["folder"] == str(first.resolve()) and trained["num_items"] == 12

    def fit(root, num_val):
        model = tiny_conv_vae(image_shape=(1, 8, 8))
        model.reader = torch.nn.Module()  # what a FrozenClassifier records of its own training split
        model.reader.trained_split = trained
        data = ImageFolderDataModule(root, image_size=8, channels=1, num_val=num_val, batch_size=4)
        quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[GECOCallback()]).fit(model, data)

    fit(second, num_val=6)  # the other folder: its validation images were never the classifier's
    # The same folder by another path: the classifier trained on some of these validation images.
    with pytest.raises(ValueError, match=r"ImageFolderDataModule: the classifier \w+ trained on [1-9]\d* of this run's 6"):
        fit(tmp_path / "first" / ".." / "first", num_val=6)
    fit(first, num_val=2)  # its own split
    # A record from before folders were named is compared by size, as it was.
    del trained["folder"]
    with pytest.raises(ValueError, match=r"trained on [1-9]\d* of this run's 6 validation images"):
        fit(second, num_val=6)

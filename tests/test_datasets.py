"""CIFAR-10, dSprites, coloured MNIST and CelebA from fixtures in their real file formats."""

import re
import time

import pytest
import torch
from lightning_geco.datamodules import (
    CelebADataModule,
    CIFAR10DataModule,
    ColouredMNISTDataModule,
    DSpritesDataModule,
    MissingDatasetError,
    MNISTDataModule,
    ShapesDataModule,
)
from lightning_geco.datamodules.dsprites import FILE_NAME
from lightning_geco.datamodules.mnist import HUES

from helpers import make_celeba, make_cifar, make_dsprites, make_mnist


def test_cifar10_loads_the_pickles_in_chw_order(tmp_path):
    written = make_cifar(tmp_path / "cifar-10-batches-py", per_batch=20)
    dm = CIFAR10DataModule(root=str(tmp_path), num_val=10, batch_size=8)
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_dataset) == 90 and len(dm.val_dataset) == 10
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    full = dm.train_dataset.dataset
    first, first_labels = written["data_batch_1"]
    torch.testing.assert_close(full.images[0], first[0].reshape(3, 32, 32))
    assert full.targets[:20].tolist() == first_labels
    test = CIFAR10DataModule(root=str(tmp_path), source="test", num_val=5)
    test.setup()
    assert len(test.train_dataset) + len(test.val_dataset) == 20


def test_dsprites_loads_images_and_factors_in_the_shapes_layout(tmp_path):
    arrays = make_dsprites(tmp_path / "dsprites" / FILE_NAME, n=50)
    dm = DSpritesDataModule(root=str(tmp_path), num_val=10, batch_size=5)
    dm.setup()
    assert dm.image_shape == ShapesDataModule().image_shape == (1, 64, 64)
    images, factors = next(iter(dm.val_dataloader()))
    assert images.shape == (5, 1, 64, 64) and set(images.unique().tolist()) <= {0.0, 1.0}
    assert factors.shape == (5, 5)
    full = dm.train_dataset.dataset
    assert torch.equal(full.images[:, 0], torch.from_numpy(arrays["imgs"]))
    assert full.targets[3, 0].item() == arrays["latents_classes"][3, 1]
    assert full.targets[3, 1:].tolist() == pytest.approx(arrays["latents_values"][3, 2:].tolist())


def test_coloured_mnist_refuses_binarize_whose_colours_are_not_binary():
    # It served pixels in {0, 0.502, 1}: a Bernoulli likelihood's or BCE's floor above 0.
    with pytest.raises(ValueError, match=r"binarize=True gives no binary images \(the hues' channels take 0, 0.5 and 1"):
        ColouredMNISTDataModule(binarize=True)


def test_coloured_mnist_follows_its_recipe(tmp_path):
    grey, labels = make_mnist(tmp_path / "MNIST" / "raw", 60, "train", gzipped=True)
    dm = ColouredMNISTDataModule(root=str(tmp_path), num_val=10, colour_seed=3)
    dm.setup()
    assert dm.image_shape == (3, 28, 28)
    full = dm.train_dataset.dataset
    targets = full.targets
    assert targets.shape == (60, 2) and torch.equal(targets[:, 0], labels.long())
    hue = torch.randint(len(HUES), (60,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(targets[:, 1], hue)
    expected = (grey.float().unsqueeze(1) / 255 * HUES[hue].view(-1, 3, 1, 1) * 255).round()
    torch.testing.assert_close(full.images.float(), expected)


def test_celeba_crops_resizes_and_uses_the_official_partitions(tmp_path):
    make_celeba(tmp_path / "celeba", partitions=[0, 0, 0, 1, 1, 2])
    dm = CelebADataModule(root=str(tmp_path), image_size=32, batch_size=2, num_workers=0)
    dm.prepare_data()
    dm.setup()
    assert dm.image_shape == (3, 32, 32)
    assert len(dm.train_dataset) == 3 and len(dm.val_dataset) == 2
    images, attributes = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 32, 32) and 0.0 <= images.min() and images.max() <= 1.0
    assert attributes.shape == (2, 40) and set(attributes.unique().tolist()) <= {0, 1}


def test_celeba_refuses_listed_images_missing_from_its_folder_at_setup(tmp_path):
    # A partly unzipped folder passed setup and failed mid-epoch, in a loader, with a bare
    # FileNotFoundError; a partition name without attributes, with a KeyError.
    make_celeba(tmp_path / "celeba", partitions=[0, 0, 0, 1, 1, 2])
    (tmp_path / "celeba" / "img_align_celeba" / "000002.jpg").unlink()
    dm = CelebADataModule(root=str(tmp_path), image_size=32, batch_size=2, num_workers=0)
    dm.prepare_data()
    with pytest.raises(MissingDatasetError, match=re.escape(
        f"CelebA: 1 of the 3 images of partition 0 listed in {tmp_path / 'celeba' / 'list_eval_partition.txt'} are not "
        f"in {tmp_path / 'celeba' / 'img_align_celeba'} (e.g. 000002.jpg): unzip img_align_celeba.zip there again"
    )):
        dm.setup("fit")
    make_celeba(tmp_path / "whole" / "celeba", partitions=[0, 0, 0, 1, 1, 2])
    attributes = tmp_path / "whole" / "celeba" / "list_attr_celeba.txt"
    attributes.write_text("\n".join(attributes.read_text().split("\n")[:-3]) + "\n")  # the last two images' lines
    with pytest.raises(MissingDatasetError, match=re.escape("CelebA: 1 of the 2 images of partition 1 in ")):
        CelebADataModule(root=str(tmp_path / "whole"), image_size=32, num_workers=0).build_splits()


@pytest.mark.parametrize(
    "module, kwargs, expected",
    [
        (CIFAR10DataModule, {}, ["CIFAR-10 (train split): missing data_batch_1", "cifar-10-batches-py", "cs.toronto.edu"]),
        (DSpritesDataModule, {}, ["dSprites: missing " + FILE_NAME, "dsprites", "deepmind/dsprites-dataset"]),
        (CelebADataModule, {}, ["CelebA: missing img_align_celeba/", "list_eval_partition.txt", "mmlab.ie.cuhk.edu.hk"]),
        (ColouredMNISTDataModule, {}, ["Coloured MNIST (made from the MNIST files) (train split): missing", "MNIST/raw"]),
    ],
)
def test_missing_files_get_one_clear_error(tmp_path, module, kwargs, expected):
    with pytest.raises(MissingDatasetError) as error:
        module(root=str(tmp_path), **kwargs).prepare_data()
    message = str(error.value)
    for text in expected + [str(tmp_path), f"--data.root {tmp_path}"]:
        assert text in message, (text, message)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("module", [MNISTDataModule, CIFAR10DataModule, DSpritesDataModule])
def test_download_without_network_fails_within_seconds_and_leaves_nothing(tmp_path, monkeypatch, module):
    # A closed local port stands in for "no network": the connection is refused at once.
    import lightning_geco.datamodules.cifar as cifar
    import lightning_geco.datamodules.dsprites as dsprites

    monkeypatch.setattr(MNISTDataModule, "mirror", "http://127.0.0.1:9/")
    monkeypatch.setattr(cifar, "URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    monkeypatch.setattr(dsprites, "URL", "http://127.0.0.1:9/" + FILE_NAME)
    start = time.monotonic()
    with pytest.raises(MissingDatasetError, match=r"download=True but fetching http://127\.0\.0\.1:9/.* failed"):
        module(root=str(tmp_path), download=True).prepare_data()
    assert time.monotonic() - start < 10
    assert not list(tmp_path.rglob("*.part"))


def test_celeba_download_explains_the_manual_route(tmp_path):
    with pytest.raises(MissingDatasetError, match="CelebA cannot be downloaded automatically"):
        CelebADataModule(root=str(tmp_path), download=True).prepare_data()


def test_in_memory_device_option_serves_the_same_batches(tmp_path):
    make_mnist(tmp_path / "MNIST" / "raw", 40, "train", gzipped=False)
    on_disk = MNISTDataModule(root=str(tmp_path), num_val=8, batch_size=8, shuffle=False)
    in_memory = MNISTDataModule(root=str(tmp_path), num_val=8, batch_size=8, shuffle=False, device="cpu")
    for dm in (on_disk, in_memory):
        dm.setup()
    for (a, ya), (b, yb) in zip(on_disk.train_dataloader(), in_memory.train_dataloader()):
        torch.testing.assert_close(a, b)
        assert torch.equal(ya, yb)
    assert in_memory.train_dataloader().num_workers == 0
    # The split's items alone are converted to float (the whole set was, then indexed: twice the memory).
    converted, to_float = [], torch.Tensor.float
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "float", lambda self, *a, **k: converted.append(self.shape[0]) or to_float(self, *a, **k))
        assert in_memory.train_dataloader().dataset.tensors[0].shape == (32, 1, 28, 28)
    assert converted == [32]
    celeba = CelebADataModule(root=str(tmp_path))
    celeba.device = "cpu"
    celeba.train_dataset = torch.utils.data.Dataset()
    with pytest.raises(ValueError, match=r"needs an in-memory dataset; Dataset reads from disk"):
        celeba.train_dataloader()
    # A device torch does not know, or this machine does not have, is named when the DataModule is built.
    with pytest.raises(ValueError, match=r"MNISTDataModule\(device='banana'\): not a torch device \(.*\); use e\.g\. 'cuda'"):
        MNISTDataModule(root=str(tmp_path), device="banana")
    missing = f"cuda:{torch.cuda.device_count()}"
    elsewhere = MNISTDataModule(root=str(tmp_path), num_val=8, batch_size=8, device=missing)  # built anywhere; refused when set up
    with pytest.raises(ValueError, match=rf"MNISTDataModule\(device='{missing}'\): this machine has {torch.cuda.device_count()} cuda device\(s\); leave device unset"):
        elsewhere.setup()
        elsewhere.train_dataloader()


def _base_indices(dataset) -> set[int]:
    assert isinstance(dataset, torch.utils.data.Subset)  # one level, over the stored images
    return set(dataset.indices)


def test_calibration_split_is_carved_from_train_disjoint_and_deterministic(tmp_path):
    make_mnist(tmp_path / "MNIST" / "raw", 40, "train", gzipped=False)
    first, second = (MNISTDataModule(root=str(tmp_path), num_val=8, num_calibration=5) for _ in range(2))
    for dm in (first, second):
        dm.setup()
    train, val, calibration = (_base_indices(d) for d in (first.train_dataset, first.val_dataset, first.calibration_dataset))
    assert (len(train), len(val), len(calibration)) == (27, 8, 5)
    assert not train & calibration and not val & calibration and train | val | calibration == set(range(40))
    assert first.calibration_dataset.indices == second.calibration_dataset.indices
    image, label = first.calibration_dataset[0]
    assert image.shape == (1, 28, 28) and label.dtype == torch.int64
    first.setup("validate")  # a second stage keeps the split it has
    assert _base_indices(first.calibration_dataset) == calibration
    assert MNISTDataModule(root=str(tmp_path)).calibration_dataset is None


def test_calibration_split_works_for_generated_data_and_in_memory_mode(tmp_path):
    shapes = ShapesDataModule(image_size=8, num_train=30, num_val=4, num_calibration=6)
    shapes.setup()
    assert len(shapes.train_dataset) == 24 and len(shapes.calibration_dataset) == 6
    make_mnist(tmp_path / "MNIST" / "raw", 40, "train", gzipped=False)
    on_disk = MNISTDataModule(root=str(tmp_path), num_val=8, num_calibration=5)
    in_memory = MNISTDataModule(root=str(tmp_path), num_val=8, num_calibration=5, device="cpu")
    for dm in (on_disk, in_memory):
        dm.setup()
    assert isinstance(in_memory.calibration_dataset, torch.utils.data.TensorDataset)
    for i in range(5):
        torch.testing.assert_close(in_memory.calibration_dataset[i][0], on_disk.calibration_dataset[i][0])


def test_calibration_split_as_large_as_train_names_both_numbers(tmp_path):
    dm = ShapesDataModule(image_size=8, num_train=10, num_val=2, num_calibration=10)
    with pytest.raises(ValueError, match=r"num_calibration must lie in \[0, 10\) for a training set of 10 images, got 10 "
                       r"\(--data.num_calibration; 0 carves no calibration split\)"):
        dm.setup()
    with pytest.raises(ValueError, match="num_calibration must be an int >= 0, got -1"):
        ShapesDataModule(num_calibration=-1)


def test_an_empty_training_set_or_one_smaller_than_a_batch_is_an_error_and_an_empty_val_set_warns(tmp_path):
    make_celeba(tmp_path / "celeba", partitions=[1, 1, 2])
    with pytest.raises(ValueError, match=r"CelebADataModule: the training set is empty \(0 images\)"):
        CelebADataModule(root=str(tmp_path), num_workers=0).setup()
    make_celeba(tmp_path / "other" / "celeba", partitions=[0, 0, 2])
    with pytest.warns(UserWarning, match=r"the validation set is empty \(0 images\)"):
        CelebADataModule(root=str(tmp_path / "other"), num_workers=0).setup()
    small = ShapesDataModule(image_size=8, num_train=10, num_val=2, batch_size=16)
    small.setup()
    with pytest.raises(ValueError, match=r"the training set has 10 images, fewer than batch_size 16"):
        small.train_dataloader()

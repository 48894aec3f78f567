import re
from pathlib import Path

import pytest
import torch
from lightning_geco.datamodules.mnist import FashionMNISTDataModule, KMNISTDataModule, MNISTDataModule, read_idx

from helpers import make_mnist, write_idx

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize("gzipped", [True, False])
def test_idx_round_trip(tmp_path, gzipped):
    data = torch.randint(0, 256, (5, 3, 4), dtype=torch.uint8)
    write_idx(tmp_path / "x.idx", data, gzipped)
    assert torch.equal(read_idx(tmp_path / "x.idx"), data)


def test_read_idx_rejects_other_files(tmp_path):
    (tmp_path / "x").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="is not an idx file"):
        read_idx(tmp_path / "x")


@pytest.mark.parametrize("layout", ["MNIST/raw", "mnist/raw", "raw", "."])
@pytest.mark.parametrize("gzipped", [True, False])
def test_mnist_loads_from_every_layout_gzipped_or_not(tmp_path, layout, gzipped):
    images, labels = make_mnist(tmp_path / layout, 120, "train", gzipped)
    dm = MNISTDataModule(root=str(tmp_path), num_val=20, batch_size=16)
    dm.setup("fit")
    assert len(dm.train_dataset) == 100 and len(dm.val_dataset) == 20
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    all_images, all_labels = dm.train_dataset.dataset.images.float() / 255, dm.train_dataset.dataset.targets
    assert 0.0 <= all_images.min() and all_images.max() <= 1.0
    torch.testing.assert_close(all_images[:, 0] * 255, images.float(), rtol=0, atol=1e-4)
    assert torch.equal(all_labels, labels.long())


def test_split_is_seeded_and_disjoint(tmp_path):
    make_mnist(tmp_path / "MNIST" / "raw", 100, "t10k", True)
    a = MNISTDataModule(root=str(tmp_path), source="test", num_val=30, seed=1)
    b = MNISTDataModule(root=str(tmp_path), source="test", num_val=30, seed=1)
    c = MNISTDataModule(root=str(tmp_path), source="test", num_val=30, seed=2)
    for dm in (a, b, c):
        dm.setup()
    assert a.val_dataset.indices == b.val_dataset.indices != c.val_dataset.indices
    assert not set(a.train_dataset.indices) & set(a.val_dataset.indices)


@pytest.mark.parametrize("kwargs, message", [
    # a traceback from a slice, a comparison or torch's manual_seed; True was taken as 1
    ({"num_val": 30.0}, "num_val must be an int in (0, 100) for a dataset of 100 items, got 30.0 (--data.num_val)."),
    ({"num_val": "30"}, "num_val must be an int in (0, 100) for a dataset of 100 items, got '30' (--data.num_val)."),
    ({"num_val": True}, "num_val must be an int in (0, 100) for a dataset of 100 items, got True (--data.num_val)."),
    ({"num_val": 100}, "num_val must be an int in (0, 100) for a dataset of 100 items, got 100 (--data.num_val)."),
    ({"seed": 0.5}, "seed must be an int in [0, 2**64), got 0.5 (--data.seed)."),
    ({"seed": 2**70}, f"seed must be an int in [0, 2**64), got {2**70} (--data.seed)."),
    ({"seed": -1}, "seed must be an int in [0, 2**64), got -1 (--data.seed)."),
])
def test_a_bad_split_is_refused_naming_the_value(tmp_path, kwargs, message):
    make_mnist(tmp_path / "MNIST" / "raw", 100, "t10k", True)
    data = MNISTDataModule(root=str(tmp_path), source="test", **{"num_val": 30, **kwargs})
    with pytest.raises(ValueError, match=re.escape(message)):
        data.setup("fit")


def test_an_idx_file_of_other_sized_images_is_refused_naming_it(tmp_path):
    # 32x32 images were served as they were, under an image_shape of (1, 28, 28): the model
    # failed at its first forward pass.
    folder = tmp_path / "MNIST" / "raw"
    make_mnist(folder, 10, "t10k", False)
    write_idx(folder / "t10k-images-idx3-ubyte", torch.zeros(10, 32, 32, dtype=torch.uint8), False)
    data = MNISTDataModule(root=str(tmp_path), source="test", num_val=2)
    with pytest.raises(ValueError, match=re.escape(
        f"{folder / 't10k-images-idx3-ubyte'} holds (10, 32, 32) and {folder / 't10k-labels-idx1-ubyte'} holds (10,): "
        "expected (N, 28, 28) images with N labels."
    )):
        data.setup("fit")


def test_missing_files_get_one_error_naming_paths_files_and_source(tmp_path):
    make_mnist(tmp_path / "MNIST" / "raw", 10, "train", True)
    (tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as error:
        MNISTDataModule(root=str(tmp_path)).prepare_data()
    message = str(error.value)
    assert "MNIST (train split): missing train-labels-idx1-ubyte (or train-labels-idx1-ubyte.gz)" in message
    for folder in ("MNIST/raw", "mnist/raw", "raw"):
        assert str(tmp_path / folder) in message
    assert "yann.lecun.com" in message and f"--data.root {tmp_path}" in message


def test_fashion_mnist_uses_its_own_folder_and_names_it_in_errors(tmp_path):
    make_mnist(tmp_path / "FashionMNIST" / "raw", 40, "t10k", False)
    dm = FashionMNISTDataModule(root=str(tmp_path), source="test", num_val=10)
    dm.setup()
    assert len(dm.train_dataset) == 30
    with pytest.raises(FileNotFoundError, match=r"(?s)FashionMNIST \(train split\): missing .*fashion-mnist"):
        FashionMNISTDataModule(root=str(tmp_path)).prepare_data()


def test_fashion_mnist_and_kmnist_never_read_mnists_files_nor_mix_two_folders(tmp_path):
    # The four datasets share their file names: MNIST's files in raw/ or the root itself were
    # read as Fashion-MNIST or KMNIST, silently.
    make_mnist(tmp_path / "raw", 40, "t10k", False, seed=1)
    for module in (FashionMNISTDataModule, KMNISTDataModule):
        with pytest.raises(FileNotFoundError, match=r"missing t10k-images-idx3-ubyte"):
            module(root=str(tmp_path), source="test", num_val=10).files()
    # A root named after the dataset holds its own files (zalando's and torchvision's folders).
    fashion_images, _ = make_mnist(tmp_path / "FashionMNIST", 40, "t10k", False, seed=2)
    root_named = FashionMNISTDataModule(root=str(tmp_path / "FashionMNIST"), source="test", num_val=10)
    assert root_named.files()[0].parent == tmp_path / "FashionMNIST"
    assert torch.equal(root_named.load().images[:, 0], fashion_images)
    # Nor does MNIST read Fashion-MNIST's files from a root named after it.
    with pytest.raises(FileNotFoundError, match=r"missing t10k-images-idx3-ubyte"):
        MNISTDataModule(root=str(tmp_path / "FashionMNIST"), source="test", num_val=10).files()
    # ... nor from its raw/ folder (read as MNIST, silently), which is Fashion-MNIST's own.
    fashion_raw, _ = make_mnist(tmp_path / "fashionmnist" / "raw", 40, "t10k", False, seed=3)
    with pytest.raises(FileNotFoundError, match=r"missing t10k-images-idx3-ubyte"):
        MNISTDataModule(root=str(tmp_path / "fashionmnist" / "raw"), source="test", num_val=10).files()
    raw_named = FashionMNISTDataModule(root=str(tmp_path / "fashionmnist" / "raw"), source="test", num_val=10)
    assert torch.equal(raw_named.load().images[:, 0], fashion_raw)
    # Images in one folder, labels in another: never paired, the error says where each was found.
    (tmp_path / "mnist" / "raw").mkdir(parents=True)
    (tmp_path / "raw" / "t10k-labels-idx1-ubyte").rename(tmp_path / "mnist" / "raw" / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match=re.escape(
        f"missing t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte in one folder (found in {tmp_path / 'raw'} and "
        f"{tmp_path / 'mnist' / 'raw'})"
    )):
        MNISTDataModule(root=str(tmp_path), source="test", num_val=10).files()


def test_bad_source_is_rejected():
    with pytest.raises(ValueError, match="source must be 'train' or 'test', got 'val'"):
        MNISTDataModule(source="val")


@pytest.mark.skipif(not (SHARED_MNIST / "mnist" / "raw").exists(), reason="real MNIST test split not present")
def test_real_mnist_test_split_has_the_known_label_counts():
    dm = MNISTDataModule(root=str(SHARED_MNIST), source="test", num_val=1000)
    dm.setup()
    images, labels = dm.train_dataset.dataset.images.float() / 255, dm.train_dataset.dataset.targets
    assert images.shape == (10_000, 1, 28, 28)
    assert torch.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert images.min() == 0.0 and images.max() == 1.0


def test_a_truncated_gz_or_empty_idx_file_is_named_in_the_error(tmp_path):
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    write_idx(tmp_path / "a.gz", images, gzipped=True)
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes((tmp_path / "a.gz").read_bytes()[:40])
    with pytest.raises(ValueError, match=rf"{truncated} is a damaged or truncated gzip file"):
        read_idx(truncated)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty is empty or truncated: 0 bytes, an idx header alone needs 4"):
        read_idx(tmp_path / "empty")
    # int32 values cut mid-value: named, with the bytes its header promises
    (tmp_path / "ints").write_bytes(b"\x00\x00\x0c\x01\x00\x00\x00\x03" + bytes(10))
    with pytest.raises(ValueError, match=re.escape(
        f"{tmp_path / 'ints'} is truncated: 10 bytes of torch.int32 values after its header, which promises (3,) (12 bytes)"
    )):
        read_idx(tmp_path / "ints")
    (tmp_path / "header").write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(ValueError, match=r"header is truncated inside its header \(6 bytes for 3 dimensions\)"):
        read_idx(tmp_path / "header")


def test_a_classifier_that_trained_on_the_held_out_images_is_refused_with_the_split_to_use(tmp_path):
    # A classifier trained holding out num_val=20, num_calibration=20; a VAE run holding out
    # num_val=40 validated and calibrated on images the classifier trained on, with no word.
    import pytorch_lightning as pl

    from helpers import quiet_trainer, tiny_conv_vae
    from lightning_geco import ClassificationConstraint, FrozenClassifier, GECOCallback, GECOObjective, ImageClassifier

    make_mnist(tmp_path / "MNIST" / "raw", 120, "train", True)
    classifier = ImageClassifier(image_shape=(1, 28, 28), widths=(4, 4), hidden_dim=8)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(classifier, MNISTDataModule(root=str(tmp_path), num_val=20, num_calibration=20, batch_size=16))
    trainer.save_checkpoint(tmp_path / "classifier.ckpt")
    reader = FrozenClassifier(str(tmp_path / "classifier.ckpt"))
    assert reader.trained_split == {
        "seed": 0, "num_val": 20, "num_calibration": 20, "num_items": 120, "source": "train", "dataset": "MNISTDataModule"
    }

    def fit(**split):
        pl.seed_everything(0)
        model = tiny_conv_vae((1, 28, 28), objective=GECOObjective([ClassificationConstraint(reader, tolerance=5.0)]))
        data = MNISTDataModule(root=str(tmp_path), batch_size=16, **split)
        quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[GECOCallback()]).fit(model, data)

    with pytest.raises(ValueError, match=re.escape(
        f"MNISTDataModule: the classifier {tmp_path / 'classifier.ckpt'} trained on "
    )) as error:
        fit(num_val=40, num_calibration=20)
    assert "(it held out num_val=20, num_calibration=20 with seed=0; this DataModule holds out num_val=40" in str(error.value)
    assert str(error.value).endswith(
        "Use --data.num_val 20 --data.num_calibration 20 --data.seed 0, or train the classifier with this run's split."
    )
    fit(num_val=20, num_calibration=20)  # the classifier's own split: held out from it too
    fit(num_val=20, num_calibration=0)  # its validation images alone (the features config's)

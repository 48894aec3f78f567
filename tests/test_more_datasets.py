"""KMNIST, EMNIST, SVHN and Omniglot from fixtures in their real file formats (and the real
KMNIST and Omniglot files where ``../shared/data`` has them)."""

import pickle
import re
import zipfile
from pathlib import Path

import pytest
import torch
from lightning_geco.datamodules import (
    CIFAR10DataModule,
    DSpritesDataModule,
    EMNISTDataModule,
    KMNISTDataModule,
    MissingDatasetError,
    OmniglotDataModule,
    SVHNDataModule,
)
from lightning_geco.datamodules.dsprites import FILE_NAME
from lightning_geco.datamodules.omniglot import read_omniglot
from PIL import Image

from helpers import make_cifar, make_dsprites, make_mnist, make_omniglot, write_idx

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _served(module) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image and label of a set-up DataModule, in stored order (train and val together)."""
    module.setup()
    stored = module.train_dataset.dataset
    return stored.images.float() / stored.scale, stored.targets


def test_kmnist_reads_the_test_split_alone_gzipped_as_distributed(tmp_path):
    images, labels = make_mnist(tmp_path / "KMNIST" / "raw", 40, "t10k", gzipped=True)
    served, targets = _served(KMNISTDataModule(str(tmp_path), source="test", num_val=10))
    assert torch.equal(served, images.unsqueeze(1).float() / 255)
    assert torch.equal(targets, labels.long())
    with pytest.raises(MissingDatasetError) as error:
        KMNISTDataModule(str(tmp_path), source="train").prepare_data()
    for text in ["KMNIST (train split): missing train-images-idx3-ubyte", "KMNIST/raw", "rois-codh/kmnist"]:
        assert text in str(error.value)


@pytest.mark.skipif(not (SHARED_DATA / "KMNIST" / "raw").is_dir(), reason="../shared/data/KMNIST is absent")
def test_real_kmnist_test_split_has_1000_images_per_class():
    _, targets = _served(KMNISTDataModule(str(SHARED_DATA), source="test", num_val=1000))
    assert torch.equal(torch.bincount(targets), torch.full((10,), 1000))


def _make_emnist(root: Path, split: str, source: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EMNIST's files as torchvision leaves them after extraction (idx, transposed images)."""
    upright = torch.arange(n, dtype=torch.uint8).view(n, 1, 1).repeat(1, 28, 28)
    upright[:, 2:6, :] = 255  # a bar across the top: visibly wrong when served transposed
    labels = torch.arange(n, dtype=torch.uint8) % 26 + 1
    raw = root / "EMNIST" / "raw"
    write_idx(raw / f"emnist-{split}-{source}-images-idx3-ubyte", upright.transpose(1, 2).contiguous(), gzipped=False)
    write_idx(raw / f"emnist-{split}-{source}-labels-idx1-ubyte", labels, gzipped=False)
    return upright, labels


def test_emnist_is_read_by_torchvision_and_served_upright(tmp_path):
    from torchvision.datasets import EMNIST

    upright, labels = _make_emnist(tmp_path, "letters", "test", 30)
    served, targets = _served(EMNISTDataModule(str(tmp_path), split="letters", source="test", num_val=5))
    assert torch.equal(served, upright.unsqueeze(1).float() / 255)
    assert served[:, 0, 2:6, :].min() >= 1.0 - 1e-6  # the bar is a row band, not a column band
    assert torch.equal(targets, labels.long())
    stored = EMNIST(str(tmp_path), split="letters", train=False).data  # torchvision's own read
    assert torch.equal(served[:, 0].mul(255).round().to(torch.uint8), stored.transpose(1, 2))


def test_emnist_missing_files_and_bad_split_name_what_to_do(tmp_path):
    with pytest.raises(MissingDatasetError) as error:
        EMNISTDataModule(str(tmp_path), split="digits").prepare_data()
    for text in ["EMNIST/raw/emnist-digits-train-images-idx3-ubyte", "gzip.zip", f"--data.root {tmp_path}"]:
        assert text in str(error.value)
    with pytest.raises(ValueError, match=r"split must be one of \('byclass', .*'mnist'\), got 'letter'"):
        EMNISTDataModule(str(tmp_path), split="letter")


def _make_svhn(path: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An SVHN ``.mat`` file: X (32, 32, 3, N) uint8, y (N, 1) with the digit 0 stored as 10."""
    import numpy as np
    import scipy.io

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    digits = torch.arange(n) % 10
    y = np.where(digits.numpy() == 0, 10, digits.numpy()).reshape(n, 1).astype(np.uint8)
    scipy.io.savemat(path, {"X": images.permute(2, 3, 1, 0).numpy(), "y": y})
    return images, digits


def test_svhn_is_read_by_torchvision_in_chw_with_zero_as_zero(tmp_path, monkeypatch):
    pytest.importorskip("scipy")
    from torchvision.datasets import SVHN

    images, digits = _make_svhn(tmp_path / "test_32x32.mat", 20)
    # A fixture cannot carry the official file's MD5, which torchvision checks before reading.
    monkeypatch.setattr(SVHN, "_check_integrity", lambda self: True)
    served, targets = _served(SVHNDataModule(str(tmp_path), source="test", num_val=4))
    assert torch.equal(served, images.float() / 255)
    assert torch.equal(targets, digits)


def test_svhn_missing_or_corrupt_file_names_it_and_the_source(tmp_path):
    pytest.importorskip("scipy")
    for attempt in range(2):
        with pytest.raises(MissingDatasetError) as error:
            SVHNDataModule(str(tmp_path), source="extra").prepare_data()
        for text in ["extra_32x32.mat", "ufldl.stanford.edu/housenumbers", f"--data.root {tmp_path}"]:
            assert text in str(error.value)
        (tmp_path / "extra_32x32.mat").write_bytes(b"not the official file")  # second try: corrupt
    with pytest.raises(ValueError, match=r"source must be one of \('train', 'test', 'extra'\), got 'val'"):
        SVHNDataModule(str(tmp_path), source="val")


def _pixels(image: Image.Image) -> torch.Tensor:
    """A PIL image's grey levels, (H, W) int64."""
    import numpy as np

    return torch.from_numpy(np.array(image.convert("L"))).long()


def test_omniglot_reads_zip_and_folder_alike_inverted_with_sorted_character_numbers(tmp_path):
    glyphs = make_omniglot(tmp_path, "background")
    from_zip = read_omniglot(tmp_path / "images_background.zip", image_size=105)
    from_folder = read_omniglot(tmp_path / "omniglot-py" / "images_background", image_size=105)
    assert torch.equal(from_zip.images, from_folder.images) and torch.equal(from_zip.targets, from_folder.targets)
    # Sorted: Greek/character01 (3 images) is 0, Latin/character01 (1) is 1, Latin/character02 (2) is 2.
    assert from_zip.targets.tolist() == [0, 0, 0, 1, 2, 2]
    first = _pixels(glyphs["Greek/character01/0000_01.png"])
    assert torch.equal(from_zip.images[0, 0].long(), 255 - first)  # strokes 255, paper 0
    # The DataModule prefers the extracted folder (torchvision's layout) and resizes.
    module = OmniglotDataModule(str(tmp_path), subset="background", image_size=28, num_val=2)
    assert module.source() == tmp_path / "omniglot-py" / "images_background"
    served, targets = _served(module)
    assert served.shape == (6, 1, 28, 28) and torch.equal(targets, from_zip.targets)


def test_omniglot_skips_macos_files_and_warns_a_set_of_other_counts(tmp_path):
    # A zip made again on macOS holds __MACOSX/.../._<image>.png resource forks, an extracted
    # folder ._ files beside the images: both were refused as "cannot read image", download again.
    make_omniglot(tmp_path, "background")
    before = read_omniglot(tmp_path / "images_background.zip", image_size=28)
    with zipfile.ZipFile(tmp_path / "images_background.zip", "a") as archive:
        archive.writestr("__MACOSX/images_background/Greek/character01/._0000_01.png", b"\x00\x05\x16\x07 fork")
        archive.writestr("images_background/Greek/.hidden/0000_01.png", b"not an image")
    folder = tmp_path / "omniglot-py" / "images_background"
    (folder / "Greek" / "character01" / "._0000_01.png").write_bytes(b"\x00\x05\x16\x07 fork")
    for source in (tmp_path / "images_background.zip", folder):
        after = read_omniglot(source, image_size=28)
        assert torch.equal(after.images, before.images) and torch.equal(after.targets, before.targets)
    # 6 images of 3 characters is not the official set: said, with the counts.
    with pytest.warns(UserWarning, match=re.escape(
        f"OmniglotDataModule: {folder} holds 6 images of 3 characters; the official images_background has 19280 of 964."
    )):
        OmniglotDataModule(str(tmp_path), subset="background", num_val=2).setup()


def test_omniglot_holds_the_same_images_and_characters_as_torchvision(tmp_path, monkeypatch):
    from torchvision.datasets import Omniglot

    make_omniglot(tmp_path, "background")
    # torchvision also wants the official zip (its MD5) beside the folder, which a fixture cannot be.
    monkeypatch.setattr(Omniglot, "_check_integrity", lambda self: True)
    ours = read_omniglot(tmp_path / "omniglot-py" / "images_background", image_size=105)
    theirs = Omniglot(str(tmp_path), background=True)
    names = theirs._characters  # torchvision's numbering: file-system order
    pairs_theirs = sorted(
        (names[label], (255 - _pixels(image)).flatten().tolist()) for image, label in theirs
    )
    ours_names = sorted(names)
    pairs_ours = sorted(
        (ours_names[label], image.flatten().long().tolist()) for image, label in zip(ours.images, ours.targets.tolist())
    )
    assert pairs_ours == pairs_theirs


def test_omniglot_missing_files_and_bad_arguments_say_what_is_accepted(tmp_path):
    with pytest.raises(MissingDatasetError) as error:
        OmniglotDataModule(str(tmp_path), subset="evaluation").prepare_data()
    for text in ["images_evaluation.zip (or the folder images_evaluation/)", "omniglot-py", "brendenlake/omniglot"]:
        assert text in str(error.value)
    with pytest.raises(ValueError, match=r"subset must be one of \('background', .*\), got 'train'"):
        OmniglotDataModule(str(tmp_path), subset="train")
    with pytest.raises(ValueError, match=r"image_size must be an int in \[8, 105\] pixels, got 200"):
        OmniglotDataModule(str(tmp_path), image_size=200)


@pytest.mark.skipif(not (SHARED_DATA / "omniglot").is_dir(), reason="../shared/data/omniglot is absent")
@pytest.mark.parametrize("subset, characters, images", [("background_small1", 136, 2720), ("background_small2", 156, 3120)])
def test_real_omniglot_small_sets_have_their_official_counts(subset, characters, images):
    served, targets = _served(OmniglotDataModule(str(SHARED_DATA), subset=subset, num_val=100))
    assert served.shape == (images, 1, 28, 28)
    assert torch.equal(torch.bincount(targets), torch.full((characters,), 20))
    assert 0.05 < served.mean() < 0.2  # strokes are the minority, as in MNIST


@pytest.mark.timeout(60)
@pytest.mark.parametrize("module", [EMNISTDataModule, SVHNDataModule])
def test_a_torchvision_download_without_network_is_one_clear_error(tmp_path, monkeypatch, module):
    import urllib.request

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(urllib.request.OpenerDirector, "open", refuse)
    with pytest.raises(MissingDatasetError, match=r"download=True but torchvision's download failed \(.*\)\. Without network"):
        module(root=str(tmp_path), download=True).prepare_data()


def test_prepare_data_then_setup_reads_the_files_once(tmp_path, monkeypatch):
    _make_emnist(tmp_path, "letters", "train", 30)
    module = EMNISTDataModule(str(tmp_path), split="letters", source="train", num_val=5)
    reads = []
    read = module.torchvision_dataset
    monkeypatch.setattr(module, "torchvision_dataset", lambda download: reads.append(download) or read(download))
    module.prepare_data()
    module.setup()
    assert reads == [False] and len(module.train_dataset) == 25


def test_a_damaged_file_of_any_reader_is_named_with_what_to_do(tmp_path):
    # The readers' own errors named no file: "pickle data was truncated", "File is not a zip file",
    # "cannot identify image file <_io.BytesIO ...>".
    make_cifar(tmp_path / "cifar-10-batches-py", per_batch=4)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(f"{batch} is not a CIFAR-10 python batch or is damaged (UnpicklingError: ")):
        CIFAR10DataModule(root=str(tmp_path), num_val=2).setup()
    # A batch with a label short: UInt8Images' generic count error, which named no file.
    with open(batch, "wb") as handle:
        pickle.dump({b"data": torch.zeros(4, 3072, dtype=torch.uint8).numpy(), b"labels": [0, 1, 2]}, handle)
    with pytest.raises(ValueError, match=re.escape(f"{batch} is not a CIFAR-10 python batch or is damaged (ValueError: "
                                                   "4 images and 3 labels); download it again.")):
        CIFAR10DataModule(root=str(tmp_path), num_val=2).setup()
    npz = tmp_path / "dsprites" / FILE_NAME
    make_dsprites(npz, n=8)
    npz.write_bytes(npz.read_bytes()[:200])
    with pytest.raises(ValueError, match=re.escape(f"{npz} is not the dSprites .npz or is damaged (BadZipFile: ")):
        DSpritesDataModule(root=str(tmp_path), num_val=2).setup()
    make_omniglot(tmp_path / "omniglot", "background")
    zipped = tmp_path / "omniglot" / "images_background.zip"
    with zipfile.ZipFile(zipped, "a") as archive:
        archive.writestr("images_background/Latin/character02/broken.png", b"\x89PNG not really")
    with pytest.raises(ValueError, match=re.escape(
        f"{zipped}: cannot read image Latin/character02/broken.png (UnidentifiedImageError: "
    )):
        read_omniglot(zipped, image_size=28)
    zipped.write_bytes(zipped.read_bytes()[:50])
    with pytest.raises(ValueError, match=re.escape(f"{zipped} is not a zip file or is damaged (")):
        read_omniglot(zipped, image_size=28)

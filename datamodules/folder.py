"""Your own images from a folder, in either of two layouts, detected automatically:

    root/<class>/<image>   torchvision's ``ImageFolder`` layout; labels are the class indices
                           (class folders sorted by name; images may sit in subfolders of a class)
    root/<image>           a flat folder of images; every label is 0

Images are files ending in .jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff or .webp (any case);
hidden files and folders (names starting with ".") are skipped. Each image is converted to
``channels`` (1: grayscale, 3: RGB; an alpha channel is dropped; 16-bit and float grayscale
scaled to 8 bits, see :func:`read_image`), resized so it covers
``image_size`` keeping its aspect ratio, and center-cropped to it. A seeded split holds
``num_val`` images out for validation.

When the decoded images fit in :data:`IN_MEMORY_LIMIT` bytes (uint8, C x H x W each) every file
is decoded once in ``setup`` and kept in memory, so ``device=`` works as for the other in-memory
DataModules; otherwise each image is read from disk per item (and ``device=`` is refused).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from .base import ImageDataModule, MissingDatasetError, UInt8Images, seeded_split

__all__ = ["IN_MEMORY_LIMIT", "FlatImages", "ImageFolderDataModule", "LAYOUTS", "read_image"]

# Largest dataset (uint8 bytes once decoded) kept in memory; larger ones are read per item.
IN_MEMORY_LIMIT = 2 * 1024**3
LAYOUTS = "root/<class>/<image> (ImageFolder layout, labels = class index) or root/<image> (flat, labels 0)"


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(IMG_EXTENSIONS)


def _is_visible_image(path: Path, root: Path) -> bool:
    """An image file with no hidden file or folder on its path below ``root``."""
    return _is_image(path) and not any(part.startswith(".") for part in path.relative_to(root).parts)


def _has_images(folder: Path) -> bool:
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(_is_image(Path(dirpath) / name) for name in filenames):
            return True
    return False


def read_image(path: str | Path, mode: str) -> Image.Image:
    """The image at ``path`` fully decoded in PIL ``mode`` ("L" or "RGB"), turned upright by its
    EXIF orientation (as a viewer shows it); a clear error naming a bad file.

    Grayscale of more than 8 bits is scaled to 8 (PIL's ``convert`` clips it instead: a 16-bit
    image came out nearly all white, a float one in [0, 1] nearly black): 16-bit integers (PIL
    modes ``I;16*``, a file PIL reads as ``I`` that stores 16 bits, as a PGM of maxval 65535, and
    an ``I`` of 32-bit values past 255, up to 65535) by 255 / 65535, whatever the image holds (a
    dark 16-bit frame is not 8-bit); floats (``F``) in [0, 1] by 255; an ``I`` image of 32-bit
    values within [0, 255] is read as 8-bit, as ``convert`` reads it; a float image outside
    [0, 1] or a 32-bit one past 65535 is refused, since its white is unknown.
    """
    try:
        with Image.open(path) as image:
            sixteen_bits = _stores_16_bits(image)  # before load(), which drops the file's layout
            image.load()
            # As a viewer shows it: a phone's photo is stored sideways with an EXIF orientation.
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I") or image.mode == "F":
                image = _to_8_bit(image, sixteen_bits)
            return image.convert(mode)
    except (OSError, ValueError, SyntaxError) as error:  # UnidentifiedImageError is an OSError
        raise ValueError(
            f"ImageFolderDataModule: cannot read image file {path} ({type(error).__name__}: {error}); "
            "remove or replace it."
        ) from error


def _stores_16_bits(image: Image.Image) -> bool:
    """Whether the file stores 16-bit samples (its raw mode, e.g. ``I;16B``), whatever mode PIL
    opens it in."""
    for tile in getattr(image, "tile", None) or ():
        raw_mode = tile.args[0] if isinstance(tile.args, tuple) and tile.args else tile.args
        if isinstance(raw_mode, str) and raw_mode.startswith("I;16"):
            return True
    return False


def _to_8_bit(image: Image.Image, sixteen_bits: bool = False) -> Image.Image:
    """A 16-bit integer or float grayscale image as 8-bit "L", scaled (see :func:`read_image`)."""
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "F":
        if low < 0.0 or high > 1.0 or math.isnan(low) or math.isnan(high):
            raise ValueError(f"a float image must lie in [0, 1]; this one holds [{low:g}, {high:g}]")
        white = 1.0
    elif image.mode == "I" and not sixteen_bits and low >= 0.0 and high <= 255.0:  # 32-bit integers holding 8-bit values
        white = 255.0
    else:
        if low < 0.0 or high > 65535.0:
            raise ValueError(f"an integer image (PIL mode {image.mode}) holds [{low:g}, {high:g}], past 16 bits' [0, 65535]")
        white = 65535.0
    return Image.fromarray(np.rint(values * (255.0 / white)).astype(np.uint8))  # 2-d uint8: mode "L"


class _CoverCrop:
    """Resize (aspect ratio kept, antialiased) so the image covers (H, W), then center-crop to it."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        scale = max(self.size[0] / height, self.size[1] / width)
        covering = [max(self.size[0], round(height * scale)), max(self.size[1], round(width * scale))]
        return v2.CenterCrop(self.size)(v2.Resize(covering, antialias=True)(image))


class FlatImages(Dataset):
    """The image files of one flat folder, transformed, each with label 0."""

    def __init__(self, files: list[Path], transform, loader) -> None:
        self.files, self.transform, self.loader = files, transform, loader
        self.targets = [0] * len(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        return self.transform(self.loader(self.files[index])), 0


class _ClassFolders(ImageFolder):
    """torchvision's ImageFolder whose classes are the non-hidden subfolders holding at least one
    image, and whose images are the files :func:`_is_image` takes with no hidden folder on their
    way down from the class folder (torchvision takes every file with an image extension,
    macOS's ``._name.png`` metadata files and ``.thumbnails/`` included)."""

    def __init__(self, root: str, **kwargs) -> None:
        super().__init__(root, is_valid_file=lambda path: _is_visible_image(Path(path), Path(root)), **kwargs)

    def find_classes(self, directory):
        classes = sorted(
            entry.name
            for entry in os.scandir(directory)
            if entry.is_dir() and not entry.name.startswith(".") and _has_images(Path(entry.path))
        )
        return classes, {name: index for index, name in enumerate(classes)}


class ImageFolderDataModule(ImageDataModule):
    """Images from a folder (ImageFolder or flat layout), (channels, H, W) in [0, 1].

    Batches are ``(images, labels)``: the class index in the ImageFolder layout, 0 in a flat folder.

    Args:
        root: the folder (see the module docstring for the two layouts).
        image_size: side of the square images, or (H, W).
        channels: 1 (grayscale) or 3 (RGB), whatever the files hold.
        num_val: images held out (seeded) for validation, in [1, number of images - 1].
        seed: seed of the split.
        batch_size, num_workers, shuffle, pin_memory, device, num_calibration: see
            :class:`ImageDataModule` (``device`` needs the images to fit :data:`IN_MEMORY_LIMIT`).
    """

    validation_drawn_from_training_set = True  # seeded_split of one set

    def __init__(
        self,
        root: str | Path,
        image_size: int | tuple[int, int],
        channels: int,
        num_val: int,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        shuffle: bool = True,
        pin_memory: bool = False,
        device: str | None = None,
        num_calibration: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, shuffle, pin_memory, device, num_calibration)
        if channels not in (1, 3) or isinstance(channels, bool):
            raise ValueError(f"ImageFolderDataModule: channels must be 1 (grayscale) or 3 (RGB), got {channels!r}.")
        self.size = self._check_size(image_size)
        if isinstance(num_val, bool) or not isinstance(num_val, int) or num_val < 1:
            raise ValueError(
                f"ImageFolderDataModule: num_val must be an int in [1, number of images - 1], got {num_val!r}."
            )
        self.root, self.channels, self.num_val, self.seed = Path(root), channels, num_val, seed

    @staticmethod
    def _check_size(image_size) -> tuple[int, int]:
        sizes = [image_size] if isinstance(image_size, int) else image_size
        if (
            not isinstance(sizes, Sequence)
            or len(sizes) not in (1, 2)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)
        ):
            raise ValueError(
                "ImageFolderDataModule: image_size must be a positive int or a pair (H, W) of positive ints, "
                f"got {image_size!r}."
            )
        return (sizes[0], sizes[-1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)

    def layout(self) -> str:
        """``"classes"`` or ``"flat"``; a clear error when the root is missing, empty or mixes both."""
        if not self.root.is_dir():
            raise MissingDatasetError(
                f"ImageFolderDataModule: no folder at {self.root} (resolved: {self.root.resolve()}). "
                f"Expected {LAYOUTS}; pass --data.init_args.root <folder>."
            )
        flat = [path for path in self.root.iterdir() if _is_image(path)]
        classes = [
            path for path in self.root.iterdir() if path.is_dir() and not path.name.startswith(".") and _has_images(path)
        ]
        if flat and classes:
            raise ValueError(
                f"ImageFolderDataModule: {self.root} holds both images ({flat[0].name}, ...) and class folders "
                f"({classes[0].name}/, ...); use one layout: {LAYOUTS}."
            )
        if not flat and not classes:
            raise MissingDatasetError(
                f"ImageFolderDataModule: no images under {self.root} (looked for files ending in "
                f"{', '.join(IMG_EXTENSIONS)}). Expected {LAYOUTS}."
            )
        return "classes" if classes else "flat"

    def prepare_data(self) -> None:
        self.layout()

    def _dataset(self, transform) -> ImageFolder | FlatImages:
        mode = "L" if self.channels == 1 else "RGB"

        def loader(path):
            return read_image(path, mode)

        if self.layout() == "classes":
            return _ClassFolders(str(self.root), transform=transform, loader=loader, allow_empty=True)
        files = sorted(path for path in self.root.iterdir() if _is_image(path))
        return FlatImages(files, transform, loader)

    def held_out_split(self) -> dict[str, Any] | None:
        """The base class's record, and the ``folder`` read (resolved): two folders of one size
        draw the same indices from one seed, which are not the same images."""
        split = super().held_out_split()
        return None if split is None else {**split, "folder": str(self.root.resolve())}

    def build_splits(self) -> tuple[Subset, Subset]:
        as_uint8 = v2.Compose([v2.ToImage(), _CoverCrop(self.size), v2.ToPureTensor()])
        dataset: Dataset = self._dataset(as_uint8)
        n = len(dataset)  # type: ignore[arg-type]
        if not self.num_val < n:
            raise ValueError(
                f"ImageFolderDataModule: num_val must lie in [1, {n - 1}] for the {n} images under {self.root}, "
                f"got {self.num_val} (--data.num_val)."
            )
        size = n * math.prod(self.image_shape)
        if size > IN_MEMORY_LIMIT and self.device is not None:
            raise ValueError(
                f"ImageFolderDataModule(device={self.device!r}) needs the images in memory, but the {n} images "
                f"under {self.root} take {size / 2**30:.2f} GiB decoded, more than the {IN_MEMORY_LIMIT / 2**30:.2f} "
                "GiB limit (IN_MEMORY_LIMIT); leave device unset or lower image_size."
            )
        if size <= IN_MEMORY_LIMIT:
            images, targets = [], []
            # Decode once, in parallel when there are workers; uint8 keeps a quarter of float32's memory.
            for batch_images, batch_targets in DataLoader(dataset, batch_size=256, num_workers=self.num_workers):
                images.append(batch_images)
                targets.append(batch_targets)
            dataset = UInt8Images(torch.cat(images), torch.cat(targets).long())
        else:
            dataset = self._dataset(v2.Compose([as_uint8, v2.ToDtype(torch.float32, scale=True)]))
        return seeded_split(dataset, self.num_val, self.seed)

"""Omniglot (Lake et al. 2015): handwritten characters of 50 alphabets, read from the official zips.

Looked for, under ``root``, ``omniglot-py/`` (torchvision's layout), ``omniglot/`` and ``root``
itself: first the extracted folder ``images_<subset>/``, then the official zip
``images_<subset>.zip``, which is read in place (a data folder may be read-only; nothing is
extracted). ``subset`` is ``background`` (964 characters, 19,280 images), ``evaluation``
(659 characters, 13,180), or the official small background sets ``background_small1`` (136
characters, 2,720 images) and ``background_small2`` (156, 3,120).

Why not ``torchvision.datasets.Omniglot``: it reads only ``background`` and ``evaluation``,
only once extracted into ``omniglot-py/`` with the official zip kept beside it, and lists folders in the file system's order, so
the same files give a different character numbering (and a different seeded split) on another
machine. Here characters are numbered in sorted ``<alphabet>/<character>`` order and images
sorted by name within each, the same on every machine, from a folder or a zip alike.

Each 105 x 105 binary image (white paper, black strokes) is inverted (strokes 1, paper 0, as
in MNIST) and resized, antialiased, to ``image_size``: (1, image_size, image_size) in [0, 1].
Labels are the character index.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import torch
from PIL import Image
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import Subset
from torchvision.transforms import v2

from .base import ImageDataModule, MissingDatasetError, UInt8Images, missing_files_message, seeded_split

__all__ = ["OMNIGLOT_SUBSETS", "OmniglotDataModule", "read_omniglot"]

#: subset -> (characters, images) of the official files
OMNIGLOT_SUBSETS = {
    "background": (964, 19280),
    "evaluation": (659, 13180),
    "background_small1": (136, 2720),
    "background_small2": (156, 3120),
}


def read_omniglot(source: Path, image_size: int) -> UInt8Images:
    """Every image of an Omniglot folder or zip ``images_<subset>[.zip]``: (N, 1, S, S) uint8, labels (N,).

    ``source`` holds ``<alphabet>/<character>/<image>.png`` (in a zip, under one top folder).
    Characters are numbered in sorted (alphabet, character) order, images sorted by name. Hidden
    files and folders (a name starting with ".", as macOS's ``._<image>.png``) and a zip's
    ``__MACOSX/`` tree are not images of the set and are skipped.
    """
    if source.is_dir():
        files = {
            path.relative_to(source).as_posix(): path
            for path in source.glob("*/*/*.png")
            if not _hidden(PurePosixPath(path.relative_to(source).as_posix()))
        }

        def read(name: str) -> bytes:
            return files[name].read_bytes()

        names = sorted(files)
        archive = None
    else:
        try:
            archive = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, OSError) as error:
            raise ValueError(f"{source} is not a zip file or is damaged ({error}); download it again.") from None
        entries = [PurePosixPath(name) for name in archive.namelist() if name.endswith(".png")]
        entries = [entry for entry in entries if not _hidden(entry)]
        # Drop the zip's top folder so both sources name images <alphabet>/<character>/<file>.
        by_name = {str(PurePosixPath(*entry.parts[-3:])): str(entry) for entry in entries if len(entry.parts) >= 3}
        names = sorted(by_name)

        def read(name: str) -> bytes:
            return archive.read(by_name[name])

    if not names:
        raise MissingDatasetError(f"OmniglotDataModule: no <alphabet>/<character>/<image>.png in {source}.")
    characters = sorted({str(PurePosixPath(name).parent) for name in names})
    index = {character: i for i, character in enumerate(characters)}
    resize = v2.Resize([image_size, image_size], antialias=True)
    images = torch.empty(len(names), 1, image_size, image_size, dtype=torch.uint8)
    try:
        for i, name in enumerate(names):
            try:
                with Image.open(io.BytesIO(read(name))) as image:
                    strokes = 255 - torch.frombuffer(bytearray(image.convert("L").tobytes()), dtype=torch.uint8)
                    images[i] = resize(strokes.view(1, image.height, image.width))
            except (OSError, ValueError, SyntaxError, EOFError, zipfile.BadZipFile, zlib.error) as error:
                raise ValueError(
                    f"{source}: cannot read image {name} ({type(error).__name__}: {error}); download the set again."
                ) from None
    finally:
        if archive is not None:
            archive.close()
    labels = torch.tensor([index[str(PurePosixPath(name).parent)] for name in names])
    return UInt8Images(images, labels)


def _hidden(path: PurePosixPath) -> bool:
    """A hidden file or folder on the path, or macOS's ``__MACOSX`` tree in a zip."""
    return any(part.startswith(".") or part == "__MACOSX" for part in path.parts)


class OmniglotDataModule(ImageDataModule):
    """Omniglot characters, (1, image_size, image_size) in [0, 1]; batches are ``(images, character)``.

    Args:
        root: folder holding ``images_<subset>/`` or ``images_<subset>.zip`` (see the module docstring).
        subset: one of :data:`OMNIGLOT_SUBSETS`.
        image_size: side of the served images in pixels (the files are 105 x 105), in [8, 105].
        num_val: images held out (seeded) for validation.
        seed: seed of the split.
        batch_size, num_workers, shuffle, pin_memory, device, num_calibration: see
            :class:`ImageDataModule`.
    """

    source_url = "https://github.com/brendenlake/omniglot (python/images_<subset>.zip)"

    validation_drawn_from_training_set = True  # seeded_split of one set

    def __init__(
        self,
        root: str = "data",
        subset: str = "background",
        image_size: int = 28,
        num_val: int = 500,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        shuffle: bool = True,
        pin_memory: bool = False,
        device: str | None = None,
        num_calibration: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, shuffle, pin_memory, device, num_calibration)
        if subset not in OMNIGLOT_SUBSETS:
            raise ValueError(f"OmniglotDataModule: subset must be one of {tuple(OMNIGLOT_SUBSETS)}, got {subset!r}.")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 105:
            raise ValueError(f"OmniglotDataModule: image_size must be an int in [8, 105] pixels, got {image_size!r}.")
        self.root, self.subset, self.image_size, self.num_val, self.seed = Path(root), subset, image_size, num_val, seed

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, self.image_size, self.image_size)

    def candidate_folders(self) -> list[Path]:
        return [self.root / "omniglot-py", self.root / "omniglot", self.root]

    def source(self) -> Path:
        """The extracted folder if there is one, else the zip; a clear error naming both when neither is found."""
        name = f"images_{self.subset}"
        for candidate in [folder / name for folder in self.candidate_folders()] + [
            folder / f"{name}.zip" for folder in self.candidate_folders()
        ]:
            if candidate.is_dir() or candidate.is_file():
                return candidate
        raise MissingDatasetError(
            missing_files_message(
                f"Omniglot ({self.subset})",
                [f"{name}.zip (or the folder {name}/)"],
                self.candidate_folders(),
                self.source_url,
                self.candidate_folders()[1],
                self.root,
            )
        )

    def prepare_data(self) -> None:
        self.source()

    def build_splits(self) -> tuple[Subset, Subset]:
        source = self.source()
        images = read_omniglot(source, self.image_size)
        characters, count = OMNIGLOT_SUBSETS[self.subset]
        found = (int(images.targets.max()) + 1, len(images.targets))
        if found != (characters, count):
            # A partial extraction, or a zip holding a set twice (one copy of each name is read).
            rank_zero_warn(
                f"OmniglotDataModule: {source} holds {found[1]} images of {found[0]} characters; the official "
                f"images_{self.subset} has {count} of {characters}. Download the set again if this was not meant."
            )
        return seeded_split(images, self.num_val, self.seed)

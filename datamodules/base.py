"""Shared base of the DataModules: loaders, the image shape, a seeded train/val split and an
optional calibration split carved from the training set."""

from __future__ import annotations

import copy
import operator
from collections.abc import Sized
from pathlib import Path
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_geco.batches import dataset_length
from lightning_geco.checks import is_count

from .sampler import ResumableLoader, ResumableSampler

__all__ = [
    "CALIBRATION_SEED",
    "ImageDataModule",
    "MissingDatasetError",
    "NoTestSplitError",
    "UInt8Images",
    "carve_calibration",
    "dataset_length",
    "download_files",
    "ensure_files",
    "find_file",
    "missing_files_message",
    "seeded_split",
    "split_indices",
    "subset",
]

# Seed of the calibration draw. A constant of its own, not the DataModule's ``seed``: the
# calibration images are then the same on every rank and run. They are positions in the training
# split, so they are other images when the split's own seed changes.
CALIBRATION_SEED = 0x0CA1

_DataModule = TypeVar("_DataModule", bound="ImageDataModule")


class NoTestSplitError(ValueError):
    """A DataModule asked for a test set its data do not hold."""


class MissingDatasetError(FileNotFoundError):
    """A dataset's files are not where the DataModule looked; the message says where and how to get them."""


def missing_files_message(
    dataset: str,
    missing: list[str],
    looked_in: list[Path],
    where_to_get: str,
    put_in: Path,
    root: Path,
    downloadable: bool = False,
) -> str:
    """One error text: the dataset, every path looked at, the expected files and where to get them
    (``downloadable``: also that the DataModule's ``download`` fetches them)."""
    folders = "\n".join(f"  {folder}" for folder in looked_in)
    fetch = " Or pass --data.download true to fetch them (needs network access)." if downloadable else ""
    return (
        f"{dataset}: missing {', '.join(missing)}.\n"
        f"Looked in:\n{folders}\n"
        f"Get the files from {where_to_get} and put them in {put_in}, then pass --data.root {root}.{fetch}"
    )


def find_file(folders: list[Path], names: tuple[str, ...]) -> Path | None:
    """The first ``folder / name`` that is a file, trying every name in every folder in order."""
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


class UInt8Images(Dataset):
    """Images stored as uint8 (N, C, H, W), served as float in [0, 1], with their targets.

    A quarter of the memory of float32, which is what lets dSprites (737,280 images) stay in RAM.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, scale: float = 255.0) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(targets):
            raise ValueError(
                f"UInt8Images wants uint8 images (N, C, H, W) and N targets, got {images.dtype} "
                f"{tuple(images.shape)} and {len(targets)} targets."
            )
        self.images, self.targets, self.scale = images, targets, scale

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index].float() / self.scale, self.targets[index]

    def batch(self, indices: list[int]) -> list[torch.Tensor]:
        """Items ``indices`` collated, in one indexing operation per tensor (what
        ``default_collate`` of the items gives)."""
        return [self.images[indices].float() / self.scale, self.targets[indices]]

    def to(self, device: torch.device | str, indices: torch.Tensor | None = None) -> TensorDataset:
        """The set, or its items ``indices`` (in that order), as float tensors on ``device`` (see
        ``ImageDataModule(device=...)``). Indexed first and moved as uint8, so the device holds
        only the items' float copy (and, while converting, their uint8 one)."""
        images, targets = (self.images, self.targets) if indices is None else (self.images[indices], self.targets[indices])
        return TensorDataset(images.to(device).float().div_(self.scale), targets.to(device))


def _epoch_limit(limit: int | float | None, sampler: ResumableSampler) -> int | None:
    """The batches of a training epoch that ``limit_train_batches`` sets, as Lightning parses it
    (an int is a count, a fraction that share of a pass; None: the whole pass), before
    :meth:`ResumableSampler.batches_after` caps it at a pass. Worked out here, not read from
    ``trainer.num_training_batches``: a loader with workers draws its first indices before
    Lightning has set that."""
    if limit is None:
        return None
    return int(sampler.batches_per_epoch * limit) if isinstance(limit, float) else int(limit)


def seeded_split(dataset: Dataset, num_val: int, seed: int) -> tuple[Subset, Subset]:
    """Deterministic (train, val) split: the same indices on every rank and every run."""
    n = dataset_length(dataset)
    if not (is_count(num_val, 1) and num_val < n):
        raise ValueError(
            f"num_val must be an int in (0, {n}) for a dataset of {n} items, got {num_val!r} (--data.num_val)."
        )
    if not (is_count(seed, 0) and seed < 2**64):  # torch.manual_seed's range (a negative one aliases 2**64 - s)
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r} (--data.seed).")
    num_val = operator.index(num_val)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(operator.index(seed))).tolist()
    return Subset(dataset, order[num_val:]), Subset(dataset, order[:num_val])


def _split_identity(split: dict[str, Any]) -> tuple[str, ...]:
    """The keys of a split record that say which images it drew from: two records that agree on
    them drew the same indices from the same images. A record of a folder names it (records of
    checkpoints from before it did are compared by size alone)."""
    return ("dataset", "source", "num_items", *(("folder",) if "folder" in split else ()))


def split_indices(split: dict[str, Any]) -> tuple[set[int], set[int], set[int]]:
    """The (training, validation, calibration) item indices a ``held_out_split()`` record draws
    (``seed``, ``num_val``, ``num_calibration``, ``num_items``), by :func:`seeded_split` and
    :func:`carve_calibration` as :meth:`ImageDataModule.setup` draws them."""
    items = TensorDataset(torch.arange(int(split["num_items"])))  # only the count matters
    train, val = seeded_split(items, int(split["num_val"]), int(split["seed"]))
    calibration: list[int] = []
    if split.get("num_calibration"):
        train, carved = carve_calibration(train, int(split["num_calibration"]))
        calibration = list(carved.indices)
    return set(train.indices), set(val.indices), set(calibration)


def subset(dataset: Dataset, indices: list[int]) -> Subset:
    """``Subset(dataset, indices)``, flattened when ``dataset`` is itself a Subset.

    One level of Subset over the stored images is what ``ImageDataModule(device=...)`` moves
    to the device in one indexing operation.
    """
    if isinstance(dataset, Subset):
        return Subset(dataset.dataset, [dataset.indices[i] for i in indices])
    return Subset(dataset, indices)


def carve_calibration(train: Dataset, num_calibration: int) -> tuple[Subset, Subset]:
    """(rest of train, calibration): ``num_calibration`` items drawn with :data:`CALIBRATION_SEED`.

    The rest keeps the training set's order, so only the carved items go missing from it.
    """
    n = dataset_length(train)
    if not 0 < num_calibration < n:
        raise ValueError(
            f"num_calibration must lie in [0, {n}) for a training set of {n} images, got {num_calibration} "
            "(--data.num_calibration; 0 carves no calibration split)."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(CALIBRATION_SEED))
    chosen = order[:num_calibration].sort().values.tolist()
    keep = torch.ones(n, dtype=torch.bool)
    keep[chosen] = False
    return subset(train, keep.nonzero().flatten().tolist()), subset(train, chosen)


class ImageDataModule(pl.LightningDataModule):
    """Base of every DataModule: batches of ``(images, targets)``, images float in [0, 1].

    Subclasses build their (train, val) datasets in :meth:`build_splits` and report
    :attr:`image_shape` before any data is loaded (``train.py`` links it to the model).
    :meth:`setup` calls :meth:`build_splits` once and then carves the calibration split, so
    every subclass gets it without code of its own.

    Args:
        batch_size: images per batch and per process (under DDP the global batch is
            ``batch_size * world_size``).
        num_workers: DataLoader worker processes.
        shuffle: shuffle the training set each epoch, in an order that depends only on a seed
            and the epoch and that a resumed run picks up at the batch its checkpoint stopped at
            (:class:`~datamodules.sampler.ResumableSampler`; the seed is drawn from torch's
            initial seed, the same on every rank, and saved in the checkpoint).
        pin_memory: pin host memory (speeds up copies to a GPU).
        device: hold the whole (in-memory) dataset as float tensors on this device, e.g.
            ``"cuda"``, and load batches with no workers. Worth it when the model is small enough
            that the loader, not the GPU, sets the pace (MNIST-sized data with a ConvVAE);
            costs 4 bytes per pixel of device memory.
        num_calibration: images carved from the training split into :attr:`calibration_dataset`
            (and removed from :attr:`train_dataset`), drawn with the fixed seed
            :data:`CALIBRATION_SEED`: the same images on every rank and every run with the same
            split seed (positions in the training split: another split seed gives other
            images). 0 (default) carves none and leaves ``calibration_dataset`` None.
    """

    #: whether the validation split is drawn from the same set as the training split (with
    #: ``seed`` and ``num_val``, :func:`seeded_split`): a checkpoint then records the draw, and
    #: a validation with another is refused (:meth:`held_out_split`). Set by the subclasses
    #: whose ``build_splits`` calls :func:`seeded_split`.
    validation_drawn_from_training_set: bool = False

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        shuffle: bool = True,
        pin_memory: bool = False,
        device: str | None = None,
        num_calibration: int = 0,
    ):
        super().__init__()
        if not is_count(batch_size, 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        if not is_count(num_workers, 0):
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}.")
        if not is_count(num_calibration, 0):
            raise ValueError(f"num_calibration must be an int >= 0, got {num_calibration!r}.")
        if device is not None:
            self._parse_device(device)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.pin_memory = pin_memory
        self.device = device
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        #: the test set (``trainer.test``), built from :meth:`build_test` when its loader is first asked for
        self.test_dataset: Dataset | None = None
        self.num_calibration = num_calibration
        # Items yield what train's do: (image, target); a TensorDataset on ``device`` when set.
        self.calibration_dataset: Dataset | None = None
        #: seed of the training order; drawn when the first training loader is built, restored on resume
        self.shuffle_seed: int | None = None
        #: the ``source`` a loaded checkpoint was trained on (None: no checkpoint, or no source)
        self.trained_source: str | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images, known before :meth:`setup`."""
        raise NotImplementedError

    def build_splits(self) -> tuple[Dataset, Dataset]:
        """The (train, val) datasets; subclasses load or generate their data here."""
        raise NotImplementedError

    def build_test(self) -> Dataset:
        """The test set (``trainer.test``): images set apart from the training, validation and
        calibration splits, e.g. a dataset's official test files. A subclass whose data hold
        one overrides this (and :meth:`missing_test_split` where that depends on its settings)."""
        raise NoTestSplitError(self.missing_test_split())

    @property
    def files_source(self) -> str | None:
        """Which of the dataset's files training reads (``source``: ``"train"``, ``"test"``, ...),
        for the DataModules that take one; None for the others."""
        source = getattr(self, "source", None)  # Omniglot's `source` is a method: a path, not a name
        return source if isinstance(source, str) else None

    def missing_test_split(self) -> str | None:
        """Why this DataModule, as configured, has no test split; None when it has one. Cheap
        (no data read), so ``train.py test`` asks before it starts a run."""
        if type(self).build_test is ImageDataModule.build_test:
            return (
                f"{type(self).__name__} has no test split: its data are one set, split into training and "
                "validation. Evaluate on the validation split (train.py validate) instead."
            )
        if self.files_source == "test":
            return (
                f"{type(self).__name__}(source='test') trains and validates on the test files: no test split is "
                "left. Train with source='train' (--data.source train) to test on the test files."
            )
        if self.trained_source == "test":
            # What a checkpoint trained on the test files (source 'test') would be tested on.
            return (
                f"the checkpoint was trained on {type(self).__name__}'s test files (source 'test'), so its test split is "
                "its own training data. Test a model trained with source 'train' (--data.source train)."
            )
        return None

    def with_source(self: _DataModule, source: str) -> _DataModule:
        """This DataModule as if built with ``source=source`` (a shallow copy, for reading another
        of the dataset's files with the same settings: the test files for :meth:`build_test`)."""
        other = copy.copy(self)
        other.source = source  # type: ignore[attr-defined]
        return other

    def files_to_prepare(self: _DataModule) -> _DataModule:
        """The DataModule whose files ``prepare_data`` checks (or fetches): while the trainer tests
        or predicts, which read the test split alone, its test-files twin (:meth:`with_source`),
        else itself."""
        trainer = self.trainer
        testing = trainer is not None and trainer.state.fn in (TrainerFn.TESTING, TrainerFn.PREDICTING)
        return self.with_source("test") if testing and self.files_source not in (None, "test") else self

    def setup(self, stage: str | None = None) -> None:
        """Build the splits once (every stage shares them), then carve the calibration split.
        ``"test"`` and ``"predict"`` build nothing here: they read the test set alone, built when
        its loader is asked for (after a checkpoint's DataModule state is back). What an earlier
        checkpoint's run trained on is forgotten here: each stage's own checkpoint (or loaded
        model) says it again after setup."""
        self.forget_training()
        if stage in ("test", "predict"):
            return
        if self.train_dataset is not None:
            return
        train, val = self.build_splits()
        name = type(self).__name__
        if dataset_length(train) == 0:
            raise ValueError(f"{name}: the training set is empty (0 images); check the data's files and sizes.")
        if dataset_length(val) == 0:
            rank_zero_warn(
                f"{name}: the validation set is empty (0 images): no validation figures, and summary.json "
                "cannot say whether the constraints are satisfied."
            )
        if self.num_calibration:
            train, calibration = carve_calibration(train, self.num_calibration)
            self.calibration_dataset = (
                calibration if self.device is None else self._on_device(calibration, self.device)
            )
        self.train_dataset, self.val_dataset = train, val
        self.check_readers_trained_apart()

    def check_readers_trained_apart(self) -> None:
        """Refuse held-out images (validation, calibration) that a frozen network the model reads
        was trained on: a classifier of a classification constraint, whose checkpoint records its
        own DataModule's split (``FrozenClassifier.trained_split``). Its readings of its training
        images are optimistic: the validation reading, the verdict, and a calibration drive (which
        exists to avoid exactly that) would read them. (A classifier trained with num_val 1000 read
        971 of 2000 validation images and 1935 of 2000 calibration images of a VAE run with
        --data.num_val 2000.) Splits of another DataModule class, other files (``source``) or
        another size, or another image folder (the ``folder`` a split record names), are not compared."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        current = self.held_out_split()
        if module is None or current is None:
            return
        readers: list[tuple[Any, dict[str, Any]]] = [
            (reader, trained)
            for reader in module.modules()
            if isinstance(trained := getattr(reader, "trained_split", None), dict)
            and all(trained.get(k) == current.get(k) for k in _split_identity(trained))
        ]
        if not readers:
            return  # nothing to compare: no redraw of the splits at every setup
        _, validation, calibration = split_indices(current)
        for reader, trained in readers:
            reader_training = split_indices(trained)[0]
            seen_val, seen_cal = len(validation & reader_training), len(calibration & reader_training)
            if not (seen_val or seen_cal):
                continue
            what = getattr(reader, "checkpoint", type(reader).__name__)
            raise ValueError(
                f"{type(self).__name__}: the classifier {what} trained on {seen_val} of this run's {len(validation)} "
                f"validation images and {seen_cal} of its {len(calibration)} calibration images (it held out "
                f"num_val={trained['num_val']}, num_calibration={trained['num_calibration']} with seed={trained['seed']}; "
                f"this DataModule holds out num_val={current['num_val']}, num_calibration={current['num_calibration']} "
                f"with seed={current['seed']}): its readings of them are optimistic, and so would be the validation "
                f"reading, the verdict and lambda's calibration. Use --data.num_val {trained['num_val']} "
                f"--data.num_calibration {trained['num_calibration']} --data.seed {trained['seed']}, or train the "
                "classifier with this run's split."
            )

    def _loader(self, dataset: Dataset | None, shuffle: bool, training: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not been called.")
        in_memory = self.device is not None
        if self.device is not None:
            dataset = self._on_device(dataset, self.device)
        workers = 0 if in_memory else self.num_workers
        sampler = self._training_sampler(dataset) if shuffle else None
        # Each new iterator draws a base seed from the loader's generator: a private one, so
        # when a loader starts (a resumed run starts one mid-epoch) never moves the global
        # generator the latent noise comes from.
        generator = None if sampler is None else torch.Generator().manual_seed(sampler.seed)
        loader_class = DataLoader if sampler is None else ResumableLoader
        return loader_class(
            dataset,
            batch_size=self.batch_size,
            shuffle=False if sampler is not None else shuffle,
            sampler=sampler,
            generator=generator,
            num_workers=workers,
            pin_memory=self.pin_memory and not in_memory,
            # Each new iterator of a loader without a generator of its own draws its workers' base
            # seed from the global generator the latent noise comes from: a persistent validation
            # loader drew once per process, so a resumed run's validations drew other noise than the
            # uninterrupted run's (and than with num_workers 0). Started afresh at each validation,
            # they draw alike; the training loader keeps its workers, as before.
            persistent_workers=workers > 0 and training,
            drop_last=shuffle,
        )

    def _training_sampler(self, dataset: Dataset) -> ResumableSampler | None:
        if not isinstance(dataset, Sized):
            return None
        trainer = self.trainer
        if self.shuffle_seed is None:
            seed = int(torch.initial_seed() % 2**31)
            # Every rank must shuffle alike: rank 0's seed.
            self.shuffle_seed = int(trainer.strategy.broadcast(seed)) if trainer is not None else seed
        if trainer is None:
            return ResumableSampler(dataset, self.batch_size, seed=self.shuffle_seed)
        sampler = ResumableSampler(
            dataset, self.batch_size, seed=self.shuffle_seed, num_replicas=trainer.world_size, rank=trainer.global_rank
        )
        def batches_done() -> int:
            # The batches per rank training has consumed, from the optimizer steps (what a
            # checkpoint restores exactly), the accumulation and each epoch's last, shorter
            # window, at the epoch's end limit_train_batches sets (num_training_batches).
            module = trainer.lightning_module
            if module is not None and not module.automatic_optimization:
                # Manual optimization may step several optimizers on a batch, each counted in
                # global_step; Lightning's count of batches that stepped counts the batch once.
                return trainer.fit_loop.epoch_loop._batches_that_stepped
            return sampler.batches_after(
                trainer.global_step, trainer.accumulate_grad_batches, _epoch_limit(trainer.limit_train_batches, sampler)
            )

        sampler.batches_done = batches_done
        return sampler

    def held_out_split(self) -> dict[str, Any] | None:
        """What decides which images were held out of training, for a DataModule whose
        validation split is drawn from the same set as its training split (:func:`seeded_split`):
        ``seed``, ``num_val``, ``num_calibration``, the set's size ``num_items`` (None before
        :meth:`setup`), ``source`` (the files read, where the DataModule has several) and
        ``dataset`` (the DataModule's class name); None
        for one that draws its splits apart (the generated shapes) or does not say."""
        seed, num_val = getattr(self, "seed", None), getattr(self, "num_val", None)
        if not self.validation_drawn_from_training_set or not isinstance(seed, int) or not isinstance(num_val, int):
            return None
        built = [d for d in (self.train_dataset, self.val_dataset, self.calibration_dataset) if d is not None]
        num_items = sum(dataset_length(d) for d in built) if self.train_dataset is not None else None
        return {
            "seed": seed, "num_val": num_val, "num_calibration": self.num_calibration, "num_items": num_items,
            "source": self.files_source, "dataset": type(self).__name__,
        }

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the seed of the training order; the files it trained on
        (``source``, where the DataModule has one), so a test never reads them as its test split;
        and how the held-out images were drawn (:meth:`held_out_split`), so a validation never
        reads images the model trained on; the ``batch_size`` and the number of processes
        (``world_size``), so a resumed fit with another says so."""
        return {
            "shuffle_seed": self.shuffle_seed, "source": self.files_source, "split": self.held_out_split(),
            "calibration": self.calibration_split(),
            "batch_size": self.batch_size, "world_size": self.trainer.world_size if self.trainer is not None else None,
        }

    def calibration_split(self) -> dict[str, Any]:
        """How the calibration split was carved from the training set: ``num_calibration`` and
        the size of the set it was carved from, ``num_items`` (None before :meth:`setup`). The
        split is the first ``num_calibration`` of an order fixed by that size
        (:func:`carve_calibration`); kept for every DataModule, since one whose validation split
        is drawn apart (the shapes) has no :meth:`held_out_split` record to hold it."""
        built = [d for d in (self.train_dataset, self.calibration_dataset) if d is not None]
        num_items = sum(dataset_length(d) for d in built) if self.train_dataset is not None else None
        return {"num_calibration": self.num_calibration, "num_items": num_items}

    def remember_training(self, state_dict: dict[str, Any]) -> None:
        """Keep what a checkpoint's run trained on, from its DataModule state (:meth:`state_dict`):
        its files (``source``), which the test split then refuses. :meth:`load_state_dict` calls
        it, and so does ``VAEModule.setup`` for a model loaded on its own (without the training
        order a restore also takes back); :meth:`setup` forgets it."""
        self.trained_source = state_dict.get("source")

    def forget_training(self) -> None:
        """Forget what :meth:`remember_training` kept (a DataModule used again for another model)."""
        self.trained_source = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shuffle_seed = state_dict.get("shuffle_seed", self.shuffle_seed)
        self.remember_training(state_dict)
        self.check_checkpoint_data(state_dict)
        self._compare_batches(state_dict.get("batch_size"), state_dict.get("world_size"))

    def check_checkpoint_data(self, state: dict[str, Any], fitting: bool | None = None) -> None:
        """Refuse (or warn) this DataModule's data against what a checkpoint's run trained on:
        ``state`` is the checkpoint's :meth:`state_dict` of it; :meth:`check_held_out_split`,
        :meth:`check_calibration_split`, and what a subclass adds. ``fitting``: whether a fit
        resumes from it (None: as the attached Trainer says). Called by :meth:`load_state_dict`,
        and by ``train.py`` before its W&B run starts."""
        self.check_held_out_split(state.get("split"), fitting)
        self.check_calibration_split(state.get("calibration"), fitting)

    def _compare_batches(self, trained_batch: int | None, trained_ranks: int | None) -> None:
        """Warn a resumed fit whose global batch (``batch_size`` per process, summed over the
        processes) is not its checkpoint's: it draws other batches. Another number of processes
        with the same global batch reads the same images in each (:class:`ResumableSampler`); its
        random states are :class:`~lightning_geco.resume.RandomState`'s to warn about."""
        if not self._fitting or trained_batch is None:
            return
        name, ranks = type(self).__name__, self.trainer.world_size if self.trainer is not None else None
        if trained_ranks is None or ranks is None or trained_ranks == ranks:
            if trained_batch != self.batch_size:
                rank_zero_warn(
                    f"{name}: the checkpoint's run trained with batch_size={trained_batch}; this resumed fit has "
                    f"{self.batch_size}, so it goes on with other batches than that run would have: it is not that "
                    "run continued."
                )
        elif trained_ranks * trained_batch != ranks * self.batch_size:
            rank_zero_warn(
                f"{name}: the checkpoint's run trained on {trained_ranks} process(es), a global batch of "
                f"{trained_ranks * trained_batch}; this resumed fit runs on {ranks}, a global batch of "
                f"{ranks * self.batch_size}, so it goes on with other batches than that run would have: it is not "
                "that run continued."
            )

    @property
    def _fitting(self) -> bool:
        """Whether the attached Trainer is fitting (a checkpoint restored now resumes a fit)."""
        return self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING

    def check_held_out_split(self, trained: dict[str, Any] | None, fitting: bool | None = None) -> None:
        """Refuse a split that would validate on images the checkpoint's model trained on: another
        ``seed`` (a new draw: most of its validation images were training images), or a larger
        ``num_val`` (the extra ones were); a smaller ``num_val`` is a subset, and so fine to
        validate on. A resumed fit with a smaller ``num_val`` and a calibration split is refused
        (the larger training split draws another calibration split, mostly of images the model
        trained on), as is one with a larger ``num_calibration`` (the extra images were trained
        on); without a calibration split, and with a smaller ``num_calibration``, it trains on
        another set: warned. The test split (other files) is not concerned. ``trained``: the checkpoint's
        ``held_out_split()`` (None: not recorded, nothing to check); ``fitting``: whether a fit
        resumes from it (None: as the attached Trainer says); called by :meth:`load_state_dict`,
        and by ``train.py`` before its W&B run starts."""
        current = self.held_out_split()
        trainer = self.trainer
        evaluating_test_files = trainer is not None and trainer.state.fn in (TrainerFn.TESTING, TrainerFn.PREDICTING)
        if trained is None or current is None or evaluating_test_files or trained.get("source") != current["source"]:
            return  # nothing recorded, nothing to compare, or other files than the checkpoint's split
        name = type(self).__name__
        trained_items, items = trained.get("num_items"), current["num_items"]
        if trained_items is not None and items is not None and trained_items != items:
            # Another set size draws another permutation from the same seed: nothing can be told.
            rank_zero_warn(
                f"{name}: the checkpoint's split was drawn from {trained_items} images; this data has {items}, so its "
                "split is another draw, and its validation images may include ones the model trained on."
            )
            return
        if current["seed"] != trained["seed"] or current["num_val"] > trained["num_val"]:
            changed = (
                f"seed={current['seed']} (it was {trained['seed']}): another draw, whose validation images are mostly "
                "ones the model trained on"
                if current["seed"] != trained["seed"]
                else f"num_val={current['num_val']} (it was {trained['num_val']}): the images beyond "
                f"{trained['num_val']} were training images"
            )
            raise ValueError(
                f"{name}: the checkpoint's model was trained with the split seed={trained['seed']}, "
                f"num_val={trained['num_val']}; this DataModule has {changed}. Use --data.seed {trained['seed']} and "
                f"--data.num_val {trained['num_val']} or fewer."
            )
        if fitting is None:
            fitting = self._fitting
        if fitting and current["num_val"] < trained["num_val"]:
            if current["num_calibration"]:
                raise ValueError(
                    f"{name}: the checkpoint's run held out num_val={trained['num_val']}; this resumed fit holds out "
                    f"{current['num_val']}, so its training split is larger and its calibration split another draw, "
                    "mostly of images the model trained on (a calibration drive would steer lambda by them). Resume "
                    f"with --data.num_val {trained['num_val']} (a smaller num_val suits train.py validate)."
                )
            rank_zero_warn(
                f"{name}: the checkpoint's run held out num_val={trained['num_val']}; this resumed fit holds out "
                f"{current['num_val']} and trains on the other {trained['num_val'] - current['num_val']} too, in "
                "another order than the checkpoint's run: it is not that run continued."
            )
        if fitting:
            self._compare_calibration(trained["num_calibration"], current["num_calibration"])

    def check_calibration_split(self, trained: dict[str, Any] | None, fitting: bool | None = None) -> None:
        """For a DataModule whose validation split is drawn apart (no :meth:`held_out_split` record
        to compare, as for the shapes): refuse a resumed fit that carves more calibration images
        than its checkpoint's run did (the extra ones were trained on), warn one that carves
        others. ``trained``: the checkpoint's :meth:`calibration_split` (None: not recorded);
        ``fitting``: as in :meth:`check_held_out_split`; called by :meth:`load_state_dict`, and by
        ``train.py`` before its W&B run starts (before setup, when the set's size is not known yet)."""
        if trained is None or self.held_out_split() is not None:
            return  # nothing recorded, or check_held_out_split compares it with the split
        if not (self._fitting if fitting is None else fitting):
            return
        items, trained_items = self.calibration_split()["num_items"], trained.get("num_items")
        if items is not None and trained_items is not None and items != trained_items:
            return  # carved from another set: another draw, nothing to compare
        self._compare_calibration(int(trained.get("num_calibration", 0)), self.num_calibration)

    def _compare_calibration(self, trained: int, current: int) -> None:
        """A resumed fit's calibration split against its checkpoint's (``num_calibration`` carved
        from a training set of the same size): a larger one is refused, another one warned."""
        name = type(self).__name__
        if current > trained:
            # The split is the first num_calibration of one seeded order: the extra ones were trained on.
            raise ValueError(
                f"{name}: the checkpoint's run carved num_calibration={trained} images from its training split; this "
                f"resumed fit carves {current}, and the {current - trained} more are images the model trained on (a "
                f"calibration drive would steer lambda by them). Resume with --data.num_calibration {trained} or fewer."
            )
        if current != trained:
            rank_zero_warn(
                f"{name}: the checkpoint's run carved num_calibration={trained} images from its training split; this "
                f"one carves {current}: the resumed run trains, and measures its calibration split, on other images "
                "than the checkpoint's run did."
            )

    def _parse_device(self, device: str) -> torch.device:
        """``device`` as a torch device; refused, naming the value, when torch does not know it."""
        try:
            return torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(
                f"{type(self).__name__}(device={device!r}): not a torch device ({error}); use e.g. 'cuda', 'cuda:1', "
                "'mps' or 'cpu', or leave it unset to load batches from host memory."
            ) from None

    def _check_device(self, device: str) -> None:
        """Refuse, naming the value, a device this machine does not have (checked when the data
        are set up, so the DataModule can be built, and its config printed, anywhere)."""
        name = f"{type(self).__name__}(device={device!r})"
        parsed = self._parse_device(device)
        available = {
            "cuda": torch.cuda.device_count(),
            "mps": int(torch.backends.mps.is_available()),
        }.get(parsed.type)
        if available is not None and (parsed.index or 0) >= available:
            raise ValueError(
                f"{name}: this machine has {available} {parsed.type} device(s); leave device unset to load batches "
                "from host memory."
            )

    def _on_device(self, dataset: Dataset, device: str) -> TensorDataset:
        self._check_device(device)
        indices = None
        if isinstance(dataset, Subset):
            indices = torch.as_tensor(dataset.indices)
            dataset = dataset.dataset
        # The items are taken before the move: moving the whole set first held it on the device
        # twice over (dSprites on a GPU: 12 GB of float images, then the training split's 12 more).
        moved: Dataset
        if isinstance(dataset, UInt8Images):
            moved = dataset.to(device, indices)
        elif isinstance(dataset, TensorDataset):
            moved = TensorDataset(*(t.to(device) if indices is None else t[indices].to(device) for t in dataset.tensors))
        else:
            raise ValueError(
                f"{type(self).__name__}(device={self.device!r}) needs an in-memory dataset; "
                f"{type(dataset).__name__} reads from disk. Leave device unset."
            )
        # Which stored items the copy holds: the splits' overlap is then told from indices, as
        # for the Subsets it replaces (batches.shared_items), not from images that look alike.
        moved.stored_items = (dataset, None if indices is None else indices.tolist())  # type: ignore[attr-defined]
        return moved

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset
        if isinstance(dataset, Sized) and self.shuffle and len(dataset) < self.batch_size:
            # drop_last would leave no batch: Lightning would "finish" at step 0 with exit code 0.
            raise ValueError(
                f"{type(self).__name__}: the training set has {len(dataset)} images, fewer than "
                f"batch_size {self.batch_size}; no full batch, so no training step. Lower batch_size to at most "
                f"{len(dataset)} or use more training images."
            )
        return self._loader(self.train_dataset, shuffle=self.shuffle, training=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def _test_set(self) -> Dataset:
        # Asked every time, not only when building: a later checkpoint restored into this
        # DataModule may have trained on the test files the cached set holds.
        reason = self.missing_test_split()
        if reason is not None:
            raise NoTestSplitError(reason)
        if self.test_dataset is None:
            self.test_dataset = self.build_test()
        return self.test_dataset

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._test_set(), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split, in order: what ``trainer.predict(model, datamodule=...)`` reads."""
        return self._loader(self._test_set(), shuffle=False)


def download_files(dataset: str, urls: list[str], folder: Path, timeout_s: float = 10.0) -> None:
    """Fetch every URL into ``folder``; a clear error within ``timeout_s`` when there is no network.

    Files are written as ``<name>.part`` and renamed when complete, so a failed download
    leaves nothing half-written behind.
    """
    import shutil
    import urllib.request

    folder.mkdir(parents=True, exist_ok=True)
    for url in urls:
        target = folder / url.rsplit("/", 1)[-1]
        if target.is_file():
            continue
        partial = target.with_name(target.name + ".part")
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, open(partial, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as error:  # URLError, timeouts and refused connections are all OSErrors
            partial.unlink(missing_ok=True)
            raise MissingDatasetError(
                f"{dataset}: download=True but fetching {url} failed ({error}). Without network access, "
                f"download the files by hand into {folder} and leave download off."
            ) from error
        partial.replace(target)


def ensure_files(download: bool, check, fetch) -> None:
    """``prepare_data``'s file work: when ``download`` is on and ``check()`` finds files missing,
    ``fetch()`` them; then ``check()`` again, raising its clear error if they are still missing."""
    if download:
        try:
            check()
        except MissingDatasetError:
            fetch()
    check()

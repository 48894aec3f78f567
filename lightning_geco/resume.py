"""Exact resume: the random numbers after a restart are those the uninterrupted run draws.

Lightning's checkpoint restores weights, optimizer, schedule and loop counters, not the state
of torch's random generators; every training step draws its latent noise from them, so a run
resumed from a checkpoint draws other noise than the run that wrote it. :class:`RandomState`
saves every rank's generator states in the checkpoint and restores them when training goes on.
(The batches' order is the DataModules' :class:`~lightning_geco.datamodules.sampler.ResumableSampler`.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

__all__ = [
    "CHECKPOINT_KEY",
    "RandomState",
    "UnreadableCheckpointError",
    "checkpoint_head",
    "forked_rng",
    "mapped_checkpoint",
    "seed_device",
    "seeded_fork",
]

#: key of the saved states in the checkpoint
CHECKPOINT_KEY = "random_states"


class UnreadableCheckpointError(ValueError):
    """A file that is not a Lightning checkpoint torch can read (damaged, cut short, or another file)."""


def mapped_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's dict, memory-mapped, so reading its small parts does not read the weights
    and optimizer state (the Trainer reads them when it restores); a checkpoint in torch's legacy
    format cannot be mapped and is read whole.

    Raises:
        UnreadableCheckpointError: the file does not load, or holds no Lightning checkpoint (a
            dict with a ``state_dict``); its message starts with the path.
    """
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - whatever torch says of the file, it is not a checkpoint
        cause = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UnreadableCheckpointError(
            f"{path} is not a checkpoint torch can read ({type(error).__name__}: {cause[:200]}); a save cut short "
            "(the run killed while writing it) reads so too."
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UnreadableCheckpointError(
            f"{path} holds a {type(checkpoint).__name__}, not a Lightning checkpoint (a dict with a state_dict, as "
            "ModelCheckpoint and trainer.save_checkpoint write)."
        )
    return checkpoint


def checkpoint_head(checkpoint: str | Path | dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """A checkpoint's ``hyper_parameters`` and ``global_step``, read without reading the weights
    (:func:`mapped_checkpoint`); ``checkpoint``: its path, or the dict that function returned."""
    if not isinstance(checkpoint, dict):
        checkpoint = mapped_checkpoint(checkpoint)
    return dict(checkpoint.get("hyper_parameters", {})), checkpoint.get("global_step")


def seed_device(device: torch.device, seed: int) -> None:
    """Seed the generators the model's noise on ``device`` comes from: the CPU's, and the CUDA
    device's (or MPS's) when it is one. What ``torch.manual_seed`` does for them, without its seeding of
    every other backend (with CUDA present but not started, that queues a lazy call that formats
    a stack trace: 0.5 ms, a tenth of a calibration measurement on the CPU)."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    elif device.type == "mps":
        torch.mps.manual_seed(seed)


def forked_rng(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """torch's random state forked: the CPU's, and ``device``'s when it is a CUDA or MPS one."""
    kind = device.type
    devices = [device] if kind in ("cuda", "mps") else []
    return torch.random.fork_rng(devices=devices, device_type=kind if devices else None)


@contextlib.contextmanager
def seeded_fork(device: torch.device, seed: int) -> Iterator[None]:
    """A fork of torch's random state (:func:`forked_rng`) seeded with ``seed``: what is drawn
    inside is a function of ``seed`` alone, and the random stream outside goes on as if nothing
    had been drawn."""
    with forked_rng(device):
        seed_device(device, seed)
        yield


def _generator_states() -> dict[str, Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    if torch.backends.mps.is_available():  # Apple silicon: the latent noise is drawn there
        states["mps"] = torch.mps.get_rng_state()
    return states


class RandomState(Callback):
    """Saves each rank's torch generator states (CPU, the current CUDA device's, MPS's) in the
    checkpoint and restores them when a resumed fit starts training.

    Restored at ``on_train_start``, after the sanity check (whose validation draws noise too),
    so the first resumed step draws what the uninterrupted run drew after the checkpoint. Under
    DDP every rank's states are gathered into the checkpoint (rank 0 writes it), and each rank
    gets its own back; a checkpoint from a different number of ranks leaves the generators as
    they are, with a warning. Python's and NumPy's generators are not used by the library's
    training and are not saved.
    """

    def __init__(self) -> None:
        super().__init__()
        self._to_restore: list[dict[str, Tensor]] | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = _generator_states()
        if trainer.world_size == 1:
            checkpoint[CHECKPOINT_KEY] = [states]
            return
        # Every rank calls this (the checkpoint is assembled everywhere, written by rank 0): gather.
        gathered: dict[str, Tensor] = {}
        for name, state in states.items():
            as_ints = state.to(device=pl_module.device, dtype=torch.int32)
            gathered[name] = trainer.strategy.all_gather(as_ints).to(device="cpu", dtype=torch.uint8)
        # Each rank's row cloned: a row of the gathered tensor is a view at an offset into its
        # storage, which torch.save keeps, and torch.set_rng_state reads from the storage's start
        # (it crashed rank 1 of a resumed run).
        checkpoint[CHECKPOINT_KEY] = [
            {name: gathered[name][rank].clone() for name in gathered} for rank in range(trainer.world_size)
        ]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._to_restore = None  # nothing carried over from an earlier stage of this callback

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        # Lightning restores callbacks for trainer.test(ckpt_path=...) too; only a resumed fit trains on.
        if saved is None or trainer.state.fn != TrainerFn.FITTING:
            return
        if len(saved) != trainer.world_size:
            rank_zero_warn(
                f"The checkpoint holds the random states of {len(saved)} rank(s), this run has {trainer.world_size}: "
                "the generators are not restored, so the resumed run draws other noise than the original."
            )
            return
        self._to_restore = saved

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._to_restore is None:
            return
        states, self._to_restore = self._to_restore[trainer.global_rank], None
        # clone(): a checkpoint written before the fix above holds views at an offset.
        torch.set_rng_state(states["cpu"].clone())
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"].clone())
        if "mps" in states and torch.backends.mps.is_available():
            torch.mps.set_rng_state(states["mps"].clone())

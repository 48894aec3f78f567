"""Small builders shared by the tests."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_geco import GECO, ConvVAE, GECOObjective, ReconstructionMSE


def tiny_conv_vae(image_shape=(1, 16, 16), tolerance=0.05, **kwargs) -> ConvVAE:
    kwargs.setdefault("objective", GECOObjective([ReconstructionMSE(tolerance)]))
    return ConvVAE(image_shape=image_shape, latent_dim=4, widths=(8, 8), hidden_dim=32, **kwargs)


def attach_fixed_lambda(objective: GECOObjective, value: float) -> GECO:
    geco = GECO(objective.names)
    geco.log_lagrange_multiplier.fill_(math.log(value))
    objective.attach(geco)
    return geco


def random_images(n=6, shape=(1, 16, 16), seed=0) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A CPU Trainer with no logger, checkpoints, progress bar or model summary."""
    for key in ("logger", "enable_checkpointing", "enable_progress_bar", "enable_model_summary"):
        kwargs.setdefault(key, False)
    return pl.Trainer(accelerator="cpu", **kwargs)


def assert_same_parameters(saved_a, saved_b, rtol: float, atol: float) -> None:
    """Two ``state_dict`` files hold the same tensors up to the tolerances."""
    a, b = torch.load(saved_a), torch.load(saved_b)
    assert a.keys() == b.keys()
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=rtol, atol=atol, msg=name)


def write_idx(path: Path, data: torch.Tensor, gzipped: bool) -> None:
    """Write ``data`` (uint8) in LeCun's idx format, optionally gzipped."""
    header = struct.pack(">HBB", 0, 0x08, data.dim()) + struct.pack(f">{data.dim()}I", *data.shape)
    raw = header + data.to(torch.uint8).numpy().tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gzipped else raw)


def make_mnist(folder: Path, n: int, prefix: str, gzipped: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
    suffix = ".gz" if gzipped else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, gzipped)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gzipped)
    return images, labels

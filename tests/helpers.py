"""Small builders shared by the tests."""

from __future__ import annotations

import math

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

"""End to end on the linear-Gaussian case, where the rate-distortion curve is known.

Data x ~ N(0, diag(s)) in n dimensions. A linear VAE trained with GECO at per-element
tolerance tau must land on the Gaussian rate-distortion curve (reverse water-filling at water
level theta = 1 / (2 lambda)):

    distortion = sum_i min(s_i, theta) = n * tau        (per image)
    rate       = 1/2 sum_i max(0, ln(s_i / theta))      (nats per image)
"""


import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from helpers import quiet_trainer
from lightning_geco import GECOCallback, GECOObjective, ReconstructionMSE
from lightning_geco.models.base import DiagonalGaussian, VAEModule

SPECTRUM = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.05, 0.02])
WATER_LEVEL = 0.25  # theta: encodes the first four dimensions


def water_filling(theta: float) -> tuple[float, float]:
    """(distortion per image, rate in nats per image) at water level theta."""
    distortion = torch.clamp(SPECTRUM, max=theta).sum().item()
    rate = 0.5 * torch.log(torch.clamp(SPECTRUM / theta, min=1.0)).sum().item()
    return distortion, rate


def solve_water_level(distortion: float) -> float:
    low, high = 1e-6, SPECTRUM.max().item()
    for _ in range(100):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if water_filling(mid)[0] < distortion else (low, mid)
    return 0.5 * (low + high)


class LinearVAE(VAEModule):
    """Linear encoder and decoder on vectors stored as (N, 1, 1, n) 'images'."""

    def __init__(self, dim: int, objective, learning_rate: float):
        super().__init__(image_shape=(1, 1, dim), latent_dim=dim, objective=objective, learning_rate=learning_rate)
        self.encoder = nn.Linear(dim, 2 * dim)
        self.decoder = nn.Linear(dim, dim)

    expects_unit_interval = False  # Gaussian data are not in [0, 1]

    def encode(self, x):
        mean, log_variance = self.encoder(x.flatten(1)).chunk(2, dim=1)
        return DiagonalGaussian(mean, log_variance)

    def decode(self, z):
        return self.decoder(z).view(-1, *self.image_shape)


@pytest.mark.timeout(240)
def test_linear_vae_with_geco_lands_on_the_gaussian_rate_distortion_curve():
    pl.seed_everything(0)
    n = len(SPECTRUM)
    target_distortion, target_rate = water_filling(WATER_LEVEL)
    tolerance = target_distortion / n  # per element
    data = torch.randn(50_000, n, generator=torch.Generator().manual_seed(0)) * SPECTRUM.sqrt()
    dataset = TensorDataset(data.view(-1, 1, 1, n))
    # Whole batches by fancy indexing: no per-example collate for a model this small.
    batches = BatchSampler(RandomSampler(dataset), batch_size=500, drop_last=True)
    loader = DataLoader(dataset, sampler=batches, batch_size=None)
    model = LinearVAE(n, GECOObjective([ReconstructionMSE(tolerance)]), learning_rate=1e-2)
    # The default settings: the same the image configs use, at an MSE ~36x the shapes'.
    callback = GECOCallback()
    trainer = quiet_trainer(
        max_steps=2500,
        limit_val_batches=0,
        callbacks=[callback],
    )
    trainer.fit(model, loader)

    model.eval()
    with torch.no_grad():
        output = model(data[:20_000].view(-1, 1, 1, n))
    distortion = output.distortion.mean().item() * n
    rate = output.rate.mean().item()
    lam = callback.geco.lagrange_multiplier.item()
    # GECO meets the tolerance ...
    assert distortion == pytest.approx(target_distortion, rel=0.03)
    # ... at the rate-distortion optimum for the distortion it reached ...
    theta = solve_water_level(distortion)
    assert rate == pytest.approx(water_filling(theta)[1], rel=0.03)
    # ... with lambda at the water level's multiplier, 1 / (2 theta).
    assert lam == pytest.approx(1.0 / (2.0 * theta), rel=0.05)
    assert rate == pytest.approx(target_rate, rel=0.05)
    assert lam == pytest.approx(1.0 / (2.0 * WATER_LEVEL), rel=0.05)

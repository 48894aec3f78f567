"""DiagnosticPanels: the validation panels for any LightningModule, ours or a user's own."""

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from helpers import quiet_trainer, random_images, tiny_conv_vae
from lightning_geco import DiagnosticPanels, GECOCallback, GECOObjective, ReconstructionMSE


class OwnImageVAE(pl.LightningModule):
    """A user's own image VAE: no base class of ours, a reconstruct and a sample method."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 8))
        self.decoder = nn.Sequential(nn.Linear(4, 64), nn.Sigmoid(), nn.Unflatten(1, (1, 8, 8)))
        self.objective = GECOObjective([ReconstructionMSE(0.05)])

    def forward(self, x):
        mean, log_variance = self.encoder(x).chunk(2, dim=1)
        z = mean + torch.randn_like(mean) * (0.5 * log_variance).exp()
        return 0.5 * (mean**2 + log_variance.exp() - 1 - log_variance).sum(dim=1), self.decoder(z)

    def training_step(self, x, batch_idx):
        rate, reconstruction = self(x)
        return self.objective.lagrangian(rate, x, reconstruction)

    def validation_step(self, x, batch_idx):
        rate, reconstruction = self(x)
        self.log("val/distortion", (reconstruction - x).pow(2).mean())
        self.log("val/rate", rate.mean())

    def reconstruct(self, x):
        return self.decoder(self.encoder(x).chunk(2, dim=1)[0])

    def sample(self, n):
        return self.decoder(torch.randn(n, 4))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _panels(log_dir):
    return {folder.name: sorted(p.name for p in folder.iterdir()) for folder in (log_dir / "images").iterdir()}


def test_a_users_own_module_gets_the_reconstruction_sample_and_rate_distortion_panels(tmp_path):
    torch.manual_seed(0)
    logger = CSVLogger(tmp_path)
    panels = DiagnosticPanels(num_images=8)
    trainer = quiet_trainer(max_steps=4, val_check_interval=2, logger=logger, callbacks=[GECOCallback(), panels])
    x = random_images(32, (1, 8, 8))
    trainer.fit(OwnImageVAE(), DataLoader(x, batch_size=8), DataLoader(x[:16], batch_size=8))
    found = _panels(tmp_path / "lightning_logs" / "version_0")
    steps = ["step_0000002.png", "step_0000004.png"]
    assert found == {"val_reconstructions": steps, "val_samples": steps, "val_rate_distortion": steps}
    assert [step for step, _, _ in panels.history] == [2, 4]  # one point per validation, none for the sanity check


def test_a_module_on_vectors_is_told_once_why_it_gets_no_image_panels(tmp_path):
    class OwnVectorVAE(OwnImageVAE):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(64, 8)
            self.decoder = nn.Linear(4, 64)
            self.objective = GECOObjective([ReconstructionMSE(0.05, peak=None)])

    panels = DiagnosticPanels(num_images=8)
    trainer = quiet_trainer(max_steps=4, val_check_interval=2, logger=CSVLogger(tmp_path), callbacks=[GECOCallback(), panels])
    x = torch.rand(32, 64)
    with pytest.warns(UserWarning, match=r"data of shape \(8, 64\), not images \(N, C, H, W\): no reconstruction") as caught:
        trainer.fit(OwnVectorVAE(), DataLoader(x, batch_size=8), DataLoader(x[:16], batch_size=8))
    assert sum("not images" in str(w.message) for w in caught) == 1
    assert _panels(tmp_path / "lightning_logs" / "version_0") == {"val_rate_distortion": ["step_0000002.png", "step_0000004.png"]}


def test_the_collection_s_models_get_their_traversals_and_the_history_survives_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    logger = CSVLogger(tmp_path)
    panels = DiagnosticPanels()
    model = tiny_conv_vae()
    trainer = quiet_trainer(max_steps=4, val_check_interval=2, logger=logger, callbacks=[GECOCallback(), panels])
    x = random_images(32)
    trainer.fit(model, DataLoader(x, batch_size=8), DataLoader(x[:8], batch_size=8))
    found = _panels(tmp_path / "lightning_logs" / "version_0")
    assert set(found) == {"val_reconstructions", "val_samples", "val_traversals", "val_rate_distortion"}
    assert model.traversal_dimensions(count=3) == torch.argsort(model.kl_per_dimension, descending=True)[:3].tolist()
    restored = DiagnosticPanels()
    restored.load_state_dict(panels.state_dict())
    assert restored.history == panels.history and len(panels.history) == 2


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"DiagnosticPanels num_images must be a positive int or None, got 0\."):
        DiagnosticPanels(num_images=0)


def test_the_rate_distortion_chart_labels_another_reading_by_its_key(monkeypatch):
    from lightning_geco import diagnostics
    from lightning_geco.panels import rate_distortion_figure

    history = [(2, 30.0, 0.2), (4, 25.0, 0.15)]
    assert not torch.equal(rate_distortion_figure(history, 0.1, "val/bce"), rate_distortion_figure(history, 0.1))
    labels = []
    monkeypatch.setattr(diagnostics, "rate_distortion_figure", lambda history, tolerance, label: labels.append(label) or torch.zeros(3, 4, 4))
    for key in ("val/distortion", "val/elbo"):  # the MSE says so on its axis; another reading was labelled MSE too
        trainer = quiet_trainer(max_steps=2, val_check_interval=2, callbacks=[GECOCallback(), DiagnosticPanels(distortion_key=key)])
        trainer.fit(tiny_conv_vae(), DataLoader(random_images(16), batch_size=8), DataLoader(random_images(8), batch_size=8))
    assert labels == ["distortion (MSE / element)", "val/elbo"]

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


def _fit_with(panels, tmp_path):
    pl.seed_everything(0)
    model = tiny_conv_vae()
    callbacks = [GECOCallback()] + ([panels] if panels is not None else [])
    trainer = quiet_trainer(max_steps=6, val_check_interval=2, logger=CSVLogger(tmp_path), callbacks=callbacks)
    x = random_images(32)
    trainer.fit(model, DataLoader(x, batch_size=8), DataLoader(x[:8], batch_size=8))
    return trainer, model


def test_the_panels_draw_from_their_own_seeded_stream_not_the_training_one(tmp_path):
    # The prior samples came from torch's global generator, on rank 0 alone: the training's noise
    # after each validation depended on whether the panels were attached (and drifted on rank 0).
    _, with_panels = _fit_with(DiagnosticPanels(num_images=4), tmp_path / "a")
    _, without = _fit_with(None, tmp_path / "b")
    for (name, a), b in zip(with_panels.state_dict().items(), without.state_dict().values()):
        assert torch.equal(a, b), name
    # The same codes at every validation: the sample panel shows the model change, not the draw.
    panels = DiagnosticPanels(num_images=4)
    trainer, model = _fit_with(panels, tmp_path / "c")
    drawn = []
    model.sample = lambda n, sample=model.sample: drawn.append(torch.randn(2)) or sample(n)
    for _ in range(2):
        panels._log(trainer, model, random_images(4))
    assert torch.equal(drawn[0], drawn[1])


def test_an_evaluation_of_a_checkpoint_charts_it_at_the_step_it_was_saved(tmp_path):
    # trainer.validate(ckpt_path=...) counts from step 0: the validated model was drawn as step 0,
    # over the fit's own last point, and its panels logged at step 0.
    panels = DiagnosticPanels(num_images=4)
    trainer, model = _fit_with(panels, tmp_path / "fit")
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    evaluation = quiet_trainer(logger=CSVLogger(tmp_path / "validate"), callbacks=[GECOCallback(), panels])
    evaluation.validate(model, DataLoader(random_images(8), batch_size=8), ckpt_path=tmp_path / "model.ckpt")
    assert [step for step, _, _ in panels.history] == [2, 4, 6, 6]
    found = _panels(tmp_path / "validate" / "lightning_logs" / "version_0")
    assert found["val_samples"] == ["step_0000006.png"]


@pytest.mark.parametrize("n", [12, 5, 16])
def test_every_reconstruction_sits_under_its_input_whatever_the_count(n):
    # 12 images in rows of 8 put the last 4 inputs and their 4 reconstructions in one row.
    from lightning_geco.panels import reconstruction_grid

    side, pad = 4, 2
    x = torch.arange(1, n + 1, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, side, side) / 100
    grid = reconstruction_grid(x, x + 0.5, columns=8)
    columns = min(8, n)

    def tile(row, column):
        top, left = pad + row * (side + pad), pad + column * (side + pad)
        return grid[0, top : top + side, left : left + side]

    for i in range(n):
        row, column = divmod(i, columns)
        assert torch.allclose(tile(2 * row, column), torch.full((side, side), (i + 1) / 100))
        assert torch.allclose(tile(2 * row + 1, column), torch.full((side, side), (i + 1) / 100 + 0.5))
    last = 2 * ((n - 1) // columns)
    for column in range(n % columns or columns, columns):  # the last two rows' blank tiles
        assert torch.equal(tile(last, column), torch.ones(side, side))
        assert torch.equal(tile(last + 1, column), torch.ones(side, side))

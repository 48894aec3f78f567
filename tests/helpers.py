"""Small builders shared by the tests."""

from __future__ import annotations

import gzip
import io
import math
import struct
import zipfile
from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image

from lightning_geco import (
    GECO,
    ConvDRAW,
    ConvVAE,
    FlowVAE,
    GECOObjective,
    ImageClassifier,
    LadderVAE,
    ReconstructionMSE,
)


def build(name, image_shape, **kwargs):
    """A small model of each kind (two stride-2 levels, narrow layers)."""
    if name == "ConvVAE":
        return ConvVAE(image_shape=image_shape, latent_dim=4, widths=(8, 16), hidden_dim=32, **kwargs)
    if name == "FlowVAE":
        return FlowVAE(image_shape=image_shape, latent_dim=4, widths=(8, 16), hidden_dim=32, flow_depth=3, flow_hidden_dim=16, **kwargs)
    if name == "LadderVAE":
        return LadderVAE(image_shape=image_shape, latent_dims=(6, 3), widths=(8, 16), hidden_dim=32, **kwargs)
    if name == "ConvDRAW":
        return ConvDRAW(image_shape=image_shape, num_steps=3, latent_channels=2, hidden_channels=8, widths=(8, 16), **kwargs)
    raise KeyError(name)


MODELS = ["ConvVAE", "FlowVAE", "LadderVAE", "ConvDRAW"]


def tiny_conv_vae(image_shape=(1, 16, 16), tolerance=0.05, model_class=ConvVAE, **kwargs) -> ConvVAE:
    kwargs.setdefault("objective", GECOObjective([ReconstructionMSE(tolerance)]))
    return model_class(image_shape=image_shape, latent_dim=4, widths=(8, 8), hidden_dim=32, **kwargs)


def attach_fixed_lambda(objective: GECOObjective, value: float) -> GECO:
    geco = GECO(objective.names, state=objective.multipliers)
    geco.log_lagrange_multiplier.fill_(math.log(value))
    objective.attach(geco)
    return geco


def geco_snapshot(geco: GECO) -> dict:
    """Everything a GECO holds, copied: its training state and its multipliers' buffers (written in place)."""
    buffers = {key: value.clone() for key, value in geco.state.state_dict().items()}
    return {**geco.state_dict(), **buffers}


def random_images(n=6, shape=(1, 16, 16), seed=0) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A Trainer (on the CPU unless ``accelerator`` says otherwise) with no logger, checkpoints,
    progress bar or model summary."""
    for key in ("logger", "enable_checkpointing", "enable_progress_bar", "enable_model_summary"):
        kwargs.setdefault(key, False)
    kwargs.setdefault("accelerator", "cpu")
    return pl.Trainer(**kwargs)


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


def make_cifar(folder: Path, per_batch: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, list[int]]]:
    """CIFAR-10 python pickles (five data batches and the test batch) with random content."""
    import pickle

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = torch.randint(0, 256, (per_batch, 3072), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (per_batch,), generator=g).tolist()
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": data.numpy(), b"labels": labels, b"batch_label": name.encode()}, handle)
        written[name] = (data, labels)
    return written


def make_dsprites(path: Path, n: int, seed: int = 0) -> dict:
    """A dSprites-format npz: imgs (n, 64, 64) uint8 in {0, 1}, latents_values / latents_classes (n, 6)."""
    import numpy

    rng = numpy.random.default_rng(seed)
    arrays = {
        "imgs": rng.integers(0, 2, (n, 64, 64), dtype=numpy.uint8),
        "latents_classes": numpy.stack(
            [numpy.zeros(n), rng.integers(0, 3, n), rng.integers(0, 6, n), rng.integers(0, 40, n),
             rng.integers(0, 32, n), rng.integers(0, 32, n)], axis=1).astype(numpy.int64),
    }
    arrays["latents_values"] = numpy.stack(
        [numpy.ones(n), arrays["latents_classes"][:, 1] + 1.0, 0.5 + arrays["latents_classes"][:, 2] / 10,
         arrays["latents_classes"][:, 3] * 2 * numpy.pi / 40, arrays["latents_classes"][:, 4] / 31,
         arrays["latents_classes"][:, 5] / 31], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    numpy.savez_compressed(path, **arrays)
    return arrays


def make_celeba(folder: Path, partitions: list[int], seed: int = 0) -> None:
    """A CelebA folder: aligned 178x218 JPEGs, the partition list and the attribute table."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    (folder / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(partitions))]
    attribute_names = [f"Attr_{j}" for j in range(40)]
    rows = []
    for name in names:
        pixels = torch.randint(0, 256, (218, 178, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / "img_align_celeba" / name)
        signs = (torch.randint(0, 2, (40,), generator=g) * 2 - 1).tolist()
        rows.append(name + " " + " ".join(f"{s:2d}" for s in signs))
    (folder / "list_eval_partition.txt").write_text("\n".join(f"{n} {p}" for n, p in zip(names, partitions)) + "\n")
    (folder / "list_attr_celeba.txt").write_text(
        f"{len(names)}\n" + " ".join(attribute_names) + "\n" + "\n".join(rows) + "\n"
    )


def save_classifier(path, image_shape=(1, 16, 16), num_classes=3, bias=None, label_column=0):
    """An ImageClassifier checkpoint; with ``bias`` its logits are that constant vector for every image."""
    model = ImageClassifier(image_shape=image_shape, num_classes=num_classes, widths=(8, 8), hidden_dim=16, label_column=label_column)
    if bias is not None:
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.copy_(torch.tensor(bias))
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "pytorch-lightning_version": pl.__version__},
        path,
    )
    return path


# Three characters in two alphabets, listed out of order to show the numbering is sorted.
OMNIGLOT_CHARACTERS = [("Latin", "character02", 2), ("Greek", "character01", 3), ("Latin", "character01", 1)]


def omniglot_glyph(seed: int) -> Image.Image:
    """A 105 x 105 one-bit Omniglot-like image: white paper (1) with black strokes (0)."""
    g = torch.Generator().manual_seed(seed)
    paper = torch.rand(105, 105, generator=g) > 0.1
    return Image.fromarray(paper.numpy()).convert("1")


def make_omniglot(root: Path, subset: str, copies: int = 1) -> dict[str, Image.Image]:
    """The same images as the official zip (one top folder) and as torchvision's extracted layout;
    ``copies`` times the images per character of :data:`OMNIGLOT_CHARACTERS`."""
    glyphs = {}
    for alphabet, character, count in OMNIGLOT_CHARACTERS:
        for k in range(count * copies):
            glyphs[f"{alphabet}/{character}/{k:04d}_{k + 1:02d}.png"] = omniglot_glyph(len(glyphs))
    root.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(root / f"images_{subset}.zip", "w") as archive:
        for name, glyph in glyphs.items():
            buffer = io.BytesIO()
            glyph.save(buffer, format="PNG")
            archive.writestr(f"images_{subset}/{name}", buffer.getvalue())
    for name, glyph in glyphs.items():
        path = root / "omniglot-py" / f"images_{subset}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        glyph.save(path)
    return glyphs


class TwoOptimizerVAE(ConvVAE):
    """Manual optimization with a second optimizer stepping on every batch (a critic's, as a
    VAE-GAN has); the batch ``nan_batch`` makes the decoder's input non-finite (-1: none, "all":
    every batch). By default the VAE steps first, on one loss with the critic's term; with
    ``critic_first`` the critic steps first, on a loss of the images alone, then the VAE."""

    def __init__(self, nan_batch: int | str = -1, critic_first: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.critic = torch.nn.Linear(self.latent_dim, 1)
        self.nan_batch, self.critic_first = nan_batch, critic_first
        self.batches = 0

    def reparameterization_noise(self, x, posterior):
        noise = torch.randn_like(posterior.mean)
        nan = self.nan_batch == "all" or self.batches == self.nan_batch
        return noise * float("nan") if self.training and nan else noise

    def configure_optimizers(self):
        vae = [p for name, p in self.named_parameters() if not name.startswith("critic.")]
        return torch.optim.Adam(vae, lr=1e-3, fused=True), torch.optim.Adam(self.critic.parameters(), lr=1e-3)

    def training_step(self, batch, batch_idx):
        vae_optimizer, critic_optimizer = self.optimizers()
        output = self(batch[0], None)
        self.batches += 1
        if self.critic_first:
            critic_optimizer.zero_grad()
            self.manual_backward(self.critic(batch[0].flatten(1)[:, : self.latent_dim]).pow(2).mean())
            critic_optimizer.step()
            vae_optimizer.zero_grad()
            self.manual_backward(self.objective(output))
            vae_optimizer.step()
            return
        loss = self.objective(output) + self.critic(output.z).pow(2).mean()
        vae_optimizer.zero_grad()
        critic_optimizer.zero_grad()
        self.manual_backward(loss)
        vae_optimizer.step()
        critic_optimizer.step()  # global_step counts both: 2 per batch

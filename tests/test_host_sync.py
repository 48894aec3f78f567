"""GECO's optimizer-step work stays on the device: no host read on a step that does not log."""

import contextlib

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers import quiet_trainer, tiny_conv_vae
from lightning_geco import GECOCallback
from lightning_geco.callbacks import is_logging_step
from lightning_geco.metrics import compiler_available
from lightning_geco.models.conv_vae import ConvVAE

# Every way a tensor's value reaches Python (each is a device-to-host sync on a GPU).
HOST_READS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__")

# On a GPU the same tests run there (one device), with CUDA's own check armed: any sync in the
# callback's optimizer-step work raises.
CUDA = pytest.param(
    {"accelerator": "gpu", "devices": 1}, id="cuda",
    marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
)
DEVICES = [pytest.param({"accelerator": "cpu"}, id="cpu"), CUDA]


@contextlib.contextmanager
def counting_host_reads(counts: list, forbid_cuda_sync: bool = True):
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name):
        def read(self, *args, **kwargs):
            counts.append(name)
            return originals[name](self, *args, **kwargs)

        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, counted(name))
    sync_mode = None
    if forbid_cuda_sync and torch.cuda.is_available():
        sync_mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        if sync_mode is not None:
            torch.cuda.set_sync_debug_mode(sync_mode)


def count_reads(reads: dict[int, list[str]], trainer, first_silent_step: int, call):
    """``call()``, its host reads kept as ``reads[global_step]``; on CUDA a sync raises in a step
    that does not log, from ``first_silent_step`` on."""
    counts: list[str] = []
    silent = not is_logging_step(trainer) and trainer.global_step >= first_silent_step
    with counting_host_reads(counts, forbid_cuda_sync=silent):
        result = call()
    reads[trainer.global_step] = counts
    return result


class CountingCallback(GECOCallback):
    """Counts the host reads of each optimizer step's GECO work; on CUDA, a sync in a step that
    does not log, from ``first_silent_step`` on, raises."""

    def __init__(self, first_silent_step: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.first_silent_step = first_silent_step
        self.reads: dict[int, list[str]] = {}
        self.logging_steps: list[int] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if is_logging_step(trainer):
            self.logging_steps.append(trainer.global_step)
        step = super().on_before_optimizer_step
        count_reads(self.reads, trainer, self.first_silent_step, lambda: step(trainer, pl_module, optimizer))


class FusedAdamVAE(ConvVAE):
    """A ConvVAE on fused Adam, which takes GECO's skip flag on the device; NaN at chosen steps."""

    def __init__(self, nan_steps=(), **kwargs):
        super().__init__(**kwargs)
        self.nan_steps = set(nan_steps)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)

    def reparameterization_noise(self, x, posterior):
        noise = torch.randn_like(posterior.mean)
        if self.training and self.global_step in self.nan_steps:
            noise = noise * float("nan")
        return noise


def _fused_model(**kwargs) -> FusedAdamVAE:
    return FusedAdamVAE(image_shape=(1, 16, 16), latent_dim=4, widths=(8, 8), hidden_dim=32, **kwargs)


def _loader():
    images = (torch.rand(128, 1, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    return DataLoader(TensorDataset(images), batch_size=16)


def count_training_step_reads(model) -> dict[int, list[str]]:
    """Host reads of the model's ``training_step`` (forward, GECO's objective, the loss), per
    step; on CUDA a sync in one that does not log, after the first, raises."""
    reads: dict[int, list[str]] = {}
    training_step = model.training_step

    def counted(*args, **kwargs):
        # From the second step: the first batch's pixel range is checked on the host once, by design.
        return count_reads(reads, model.trainer, 1, lambda: training_step(*args, **kwargs))

    model.training_step = counted
    return reads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("controller", ["pi", "relative"])
def test_a_step_that_does_not_log_reads_nothing_on_the_host(controller, device):
    pl.seed_everything(0)
    callback = CountingCallback(controller=controller)
    model = tiny_conv_vae()
    step_reads = count_training_step_reads(model)
    trainer = quiet_trainer(max_steps=6, log_every_n_steps=4, limit_val_batches=0, callbacks=[callback], **device)
    trainer.fit(model, _loader())  # the library's own optimizer: fused Adam
    silent = [step for step in callback.reads if step not in callback.logging_steps]
    assert len(silent) >= 3 and callback.logging_steps
    assert all(callback.reads[step] == [] for step in silent), callback.reads
    assert all(callback.reads[step] for step in callback.logging_steps)  # a logging step reads what it writes
    # The training step around GECO's objective reads nothing either, once the first batch is
    # checked: its range (minimum and maximum, by the model and by the MSE against its peak) and
    # that the constraint's value and its reading agree on whether it is met (two means).
    assert set(step_reads) == set(callback.reads)
    assert step_reads[0] == ["__float__"] * 6
    assert all(step_reads[step] == [] for step in silent if step > 0), step_reads


@pytest.mark.parametrize("device", DEVICES)
def test_a_non_finite_step_on_a_fused_optimizer_leaves_its_state_as_if_it_had_not_happened(device):
    pl.seed_everything(0)
    model = _fused_model(nan_steps=[2])
    states = []

    class OptimizerState(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            optimizer = trainer.optimizers[0]
            states.append({
                "params": [p.detach().clone() for p in pl_module.parameters()],
                "state": [{k: v.clone() for k, v in optimizer.state[p].items()} for p in pl_module.parameters()],
            })

    callback = GECOCallback(controller="pi")
    trainer = quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[callback, OptimizerState()], **device)
    trainer.fit(model, _loader())
    before, after = states[1], states[2]  # after steps 1 and 2 (the NaN step)
    for a, b in zip(before["params"], after["params"]):
        assert torch.equal(a, b)
    for a, b in zip(before["state"], after["state"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert callback.geco.num_skipped_updates == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


class LambdaTrace(pl.Callback):
    def __init__(self):
        self.log_lambdas = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.log_lambdas.append(pl_module.objective.multipliers.log_lagrange_multiplier.clone())


@pytest.mark.parametrize("device", DEVICES)
def test_a_compiled_geco_trains_as_the_eager_one_and_reads_nothing_on_the_host(device):
    if not compiler_available("cuda" if device["accelerator"] == "gpu" else "cpu"):
        # Without one, compile=True falls back to the eager functions: nothing compiled to test.
        pytest.skip("torch.compile cannot build kernels for this device (a C++ compiler on CPU, triton on CUDA)")
    runs = {}
    for compile in (False, True):
        pl.seed_everything(0)
        # The first step compiles, and tracing reads a few scalars once.
        callback = CountingCallback(controller="pi", compile=compile, first_silent_step=1)
        trace = LambdaTrace()
        trainer = quiet_trainer(
            max_steps=8, log_every_n_steps=4, limit_val_batches=0, callbacks=[callback, trace], **device
        )
        trainer.fit(_fused_model(nan_steps=[2, 3]), _loader())
        runs[compile] = callback, trace.log_lambdas
    (eager, eager_lambdas), (compiled, compiled_lambdas) = runs[False], runs[True]
    assert compiled.geco.compile and compiled.geco.num_skipped_updates == eager.geco.num_skipped_updates == 2
    torch.testing.assert_close(torch.stack(compiled_lambdas), torch.stack(eager_lambdas), rtol=1e-4, atol=1e-6)
    silent = [step for step in compiled.reads if step not in compiled.logging_steps and step > 0]
    assert len(silent) >= 4 and all(compiled.reads[step] == [] for step in silent), compiled.reads

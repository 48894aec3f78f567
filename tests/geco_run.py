"""A small, fully deterministic GECO training run shared by the DDP, resume and precision tests.

Run in-process through :func:`run`, or as a script (DDP re-executes the script once per rank):

    python tests/geco_run.py --devices 2 --batch-size 8 --max-steps 10 --out DIR

Each rank writes ``DIR/rank<r>.json`` with lambda and the moving average after every optimizer
step, and rank 0 writes ``DIR/params.pt`` with the final parameters.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_geco.datamodules import ResumableSampler
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from helpers import quiet_trainer
from lightning_geco import ConvVAE, GECOCallback, GECOObjective, ReconstructionMSE, RunSummary
from lightning_geco.resume import RandomState

IMAGE_SHAPE = (1, 16, 16)


class DataSeededNoiseVAE(ConvVAE):
    """ConvVAE whose reparameterisation noise is a fixed function of each image.

    A 2-rank run with batch B and a 1-process run with batch 2B then see identical noise for
    identical examples, so their trajectories must agree to float tolerance.
    """

    def __init__(self, nan_steps=(), nan_rank: int = 0, own_loss_steps=(), own_loss_rank: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.nan_steps = set(nan_steps)
        self.nan_rank = nan_rank
        # steps at which rank own_loss_rank trains on a loss of its own, without the objective
        self.own_loss_steps = set(own_loss_steps)
        self.own_loss_rank = own_loss_rank
        generator = torch.Generator().manual_seed(123)
        self.register_buffer("projection", torch.randn(math.prod(IMAGE_SHAPE), self.latent_dim, generator=generator))

    #: when set, training batches are a function of the optimizer step (see ``run(step_indexed=...)``)
    batch_for_step = None

    def training_step(self, batch, batch_idx):
        if self.batch_for_step is not None:
            batch = self.batch_for_step(self.global_step).to(self.device)
        if self.global_step in self.own_loss_steps and self.global_rank == self.own_loss_rank:
            output = self(batch[0] if isinstance(batch, (list, tuple)) else batch, None)
            return (output.reconstruction - output.x).pow(2).mean() + 0.0 * output.rate.mean()
        return super().training_step(batch, batch_idx)

    def reparameterization_noise(self, x, posterior):
        noise = torch.sin(3.0 * (x.flatten(1).float() @ self.projection)).to(posterior.mean.dtype)
        if self.training and self.global_step in self.nan_steps and self.global_rank == self.nan_rank:
            noise = noise * float("nan")
        return noise


class Trajectory(pl.Callback):
    """lambda and the moving average after every optimizer step, on this rank."""

    def __init__(self):
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        geco = next(c for c in trainer.callbacks if isinstance(c, GECOCallback)).geco
        self.rows.append(
            {
                "step": trainer.global_step,
                "log_lambda": geco.log_lagrange_multiplier.tolist(),
                "ema": geco.constraint_ema.tolist(),
                "skipped": geco.num_skipped_updates,
                "updates": geco.num_updates,
                "measurements": geco.num_measurements,
            }
        )


def dataset(num_images: int = 512, seed: int = 7) -> TensorDataset:
    images = torch.rand(num_images, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(seed))
    return TensorDataset((images > 0.7).float())


def distributed_order(n: int, seed: int = 0) -> list[int]:
    """The order DistributedSampler(shuffle=True, seed=seed) visits in epoch 0, over all ranks."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def build_model(nan_steps=(), nan_rank: int = 0, tolerance: float = 0.05, own_loss_steps=()) -> DataSeededNoiseVAE:
    torch.manual_seed(0)
    return DataSeededNoiseVAE(
        nan_steps=nan_steps,
        nan_rank=nan_rank,
        own_loss_steps=own_loss_steps,
        own_loss_rank=1,
        image_shape=IMAGE_SHAPE,
        latent_dim=4,
        widths=(8, 8),
        hidden_dim=32,
        learning_rate=3e-3,
        objective=GECOObjective([ReconstructionMSE(tolerance)]),
    )


def run(
    out: str | Path,
    devices: int = 1,
    batch_size: int = 16,
    max_steps: int = 10,
    accumulate: int = 1,
    precision: str = "32-true",
    nan_steps=(),
    nan_rank: int = 0,
    ckpt_in: str | None = None,
    ckpt_out: str | None = None,
    step_indexed: bool = False,
    tolerance: float = 0.05,
    max_nonfinite_steps: int = 10,
    calibration: bool = False,
    resumable_sampler: bool = False,
    drive: str = "calibration",
    compile: bool = False,
    summary: bool = False,
    random_state: bool = False,
    ckpt_every: int = 0,
    own_loss_steps=(),
) -> pl.Trainer:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trajectory = Trajectory()
    if calibration:
        # The PI controller on a calibration stream: 24 images every 3 steps, drawn from a
        # separate seeded set and split over the ranks.
        geco = GECOCallback(
            controller="pi",
            drive=drive,  # "auto" chooses the calibration set it is given
            calibration_every=3,
            calibration_batch_size=24,
            calibration_dataset=dataset(96, seed=8),
            max_nonfinite_steps=max_nonfinite_steps,
            compile=compile,
        )
    else:
        geco = GECOCallback(alpha=0.9, max_nonfinite_steps=max_nonfinite_steps, compile=compile)
    callbacks = [geco, trajectory]
    if summary:  # summary.json in the run folder (no logger: default_root_dir), written by rank 0
        callbacks.append(RunSummary())
    if random_state:  # every rank's generators in the checkpoint, restored on resume
        callbacks.append(RandomState())
    if ckpt_every:  # a checkpoint every ckpt_every steps, in out/checkpoints (step=N in the name)
        callbacks.append(ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=ckpt_every, save_top_k=-1))
    trainer = quiet_trainer(
        default_root_dir=out,
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        precision=precision,
        limit_val_batches=0,
        callbacks=callbacks,
        enable_checkpointing=bool(ckpt_every),
    )
    data = dataset()
    if resumable_sampler:
        # The DataModules' sampler: rank r takes the r-th run of batch_size in each global batch,
        # so one process with the global batch sees the same examples at every step.
        sampler = ResumableSampler(
            data, batch_size, lambda: trainer.global_step * accumulate, seed=0, num_replicas=devices, rank=trainer.global_rank
        )
        loader = DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=True)
    elif devices == 1:
        # Lightning gives DDP training a DistributedSampler(shuffle=True, seed=0): epoch 0 visits
        # randperm(n) with rank r taking every devices-th index, so one process walking the same
        # permutation with the global batch sees the same examples at every step.
        loader = DataLoader(data, batch_size=batch_size, sampler=distributed_order(len(data)))
    else:
        loader = DataLoader(data, batch_size=batch_size)
    model = build_model(nan_steps, nan_rank, tolerance, own_loss_steps)
    if step_indexed:
        # Lightning restarts a non-stateful loader at the start of an epoch on resume (and
        # replays a batch after an end-of-epoch checkpoint), so a resume test that must match
        # an uninterrupted run draws step t's batch from the step number itself.
        images, order = data.tensors[0], distributed_order(len(data))

        def batch_for_step(step: int) -> torch.Tensor:
            start = (step * batch_size) % len(order)
            return images[order[start : start + batch_size]]

        model.batch_for_step = batch_for_step
    try:
        trainer.fit(model, loader, ckpt_path=ckpt_in)
    finally:
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(trajectory.rows))
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    if trainer.global_rank == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / "params.pt")
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--nan-at-step", type=int, default=-1)
    parser.add_argument("--nan-rank", type=int, default=0)
    parser.add_argument("--own-loss-at-step", type=int, default=-1, help="rank 1 skips the objective at this step")
    parser.add_argument("--calibration", action="store_true")
    parser.add_argument("--resumable-sampler", action="store_true")
    parser.add_argument("--drive", default="calibration", help="the drive of --calibration runs")
    parser.add_argument("--compile", action="store_true", help="GECOCallback(compile=True)")
    parser.add_argument("--summary", action="store_true", help="add RunSummary (no logger)")
    parser.add_argument("--random-state", action="store_true", help="add RandomState")
    parser.add_argument("--ckpt-in", help="resume from this checkpoint")
    parser.add_argument("--ckpt-out", help="save a checkpoint here at the end")
    parser.add_argument("--ckpt-every", type=int, default=0, help="a checkpoint every N steps, in OUT/checkpoints")
    args = parser.parse_args()
    run(
        args.out,
        devices=args.devices,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        accumulate=args.accumulate,
        precision=args.precision,
        nan_steps=[args.nan_at_step] if args.nan_at_step >= 0 else [],
        nan_rank=args.nan_rank,
        calibration=args.calibration,
        resumable_sampler=args.resumable_sampler,
        drive=args.drive,
        compile=args.compile,
        summary=args.summary,
        random_state=args.random_state,
        ckpt_in=args.ckpt_in,
        ckpt_out=args.ckpt_out,
        ckpt_every=args.ckpt_every,
        own_loss_steps=[args.own_loss_at_step] if args.own_loss_at_step >= 0 else [],
    )

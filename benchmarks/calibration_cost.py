"""What the calibration stream costs: the share of training time GECO spends measuring it.

    python benchmarks/calibration_cost.py [--image-size 28] [--batch-size 64] [--steps 400] [--rounds 3] \
        [--calibration-every 16]

``GECOCallback(drive="calibration")`` reads ``calibration_batch_size`` held-out images (64)
without gradients every ``calibration_every`` optimizer steps (16). This trains the default
ConvVAE on generated shapes with that drive and times, inside the same run, the calibration
measurements (``CalibrationStream.measure``: drawing the images, the no-grad eval-mode pass and the
constraint sums) and the training steps (``on_train_batch_start`` to ``on_train_batch_end``,
which holds the measurement: GECO takes it in ``on_before_optimizer_step``). Both timings come
from one run, so the machine's noise between runs does not enter the ratio.

Printed per round and as the median: the calibration share = time in the measurements / time
in the training steps (the goal of issue 13 is at most 2 %), and how much of a measurement is
the model's own no-grad forward pass (the rest: drawing the images, the eval/train switch, the
seeded noise).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning_geco.calibration as calibration  # noqa: E402
from datamodules.shapes import ShapesDataModule  # noqa: E402
from lightning_geco import ConvVAE, GECOCallback, GECOObjective, ReconstructionMSE  # noqa: E402


class _Timer(pl.Callback):
    """Wall time of the training steps after ``warmup`` optimizer steps, hooks to hooks."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.total, self._begin = warmup, 0.0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._begin = time.perf_counter() if trainer.global_step >= self.warmup else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._begin is not None:
            self.total += time.perf_counter() - self._begin


def one_round(args, seed: int) -> dict:
    torch.manual_seed(seed)
    data = ShapesDataModule(
        image_size=args.image_size, num_train=args.batch_size * 64, num_val=args.batch_size,
        batch_size=args.batch_size, num_calibration=1000, seed=seed,
    )
    model = ConvVAE(objective=GECOObjective(constraints=[ReconstructionMSE(0.005)]), image_shape=data.image_shape)
    geco = GECOCallback(drive="calibration", calibration_every=args.calibration_every)
    measuring = {"seconds": 0.0, "count": 0, "forward": 0.0, "timed": False}
    measure, forward = calibration.CalibrationStream.measure, calibration._calibration_output

    def timed_forward(pl_module, x, labels):
        begin = time.perf_counter()
        output = forward(pl_module, x, labels)
        if measuring["timed"]:
            measuring["forward"] += time.perf_counter() - begin
        return output

    def timed_measure(stream, trainer, pl_module, objective, measurement):
        measuring["timed"] = trainer.global_step >= args.warmup
        begin = time.perf_counter()
        result = measure(stream, trainer, pl_module, objective, measurement)
        if trainer.global_step >= args.warmup:
            measuring["seconds"] += time.perf_counter() - begin
            measuring["count"] += 1
        return result

    calibration.CalibrationStream.measure = timed_measure  # type: ignore[method-assign]
    calibration._calibration_output = timed_forward
    timer = _Timer(args.warmup)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[timer, geco],
    )
    try:
        trainer.fit(model, data)
    finally:
        calibration.CalibrationStream.measure = measure  # type: ignore[method-assign]
        calibration._calibration_output = forward
    return {
        "forward_ms": 1e3 * measuring["forward"] / max(1, measuring["count"]),
        "step_ms": 1e3 * timer.total / args.steps,
        "measurement_ms": 1e3 * measuring["seconds"] / max(1, measuring["count"]),
        "measurements": measuring["count"],
        "fraction": measuring["seconds"] / timer.total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calibration-every", type=int, default=16, help="optimizer steps between measurements")
    args = parser.parse_args()
    rows = []
    for seed in range(args.rounds):
        row = one_round(args, seed)
        rows.append(row)
        print(
            f"round {seed + 1}: step {row['step_ms']:.2f} ms, one measurement {row['measurement_ms']:.2f} ms "
            f"({row['measurements']} of them; the model's forward {row['forward_ms']:.2f} ms of it), "
            f"calibration share {row['fraction']:.2%}",
            flush=True,
        )
    print(
        f"ConvVAE {args.image_size}x{args.image_size}, batch {args.batch_size}, calibration 64 images every "
        f"{args.calibration_every} steps, "
        f"{args.steps} timed steps x {args.rounds} rounds, {torch.get_num_threads()} threads: "
        f"median calibration share {statistics.median(r['fraction'] for r in rows):.2%} of training time "
        f"(goal <= 2 %); median step {statistics.median(r['step_ms'] for r in rows):.2f} ms"
    )


if __name__ == "__main__":
    main()

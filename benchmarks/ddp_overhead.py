"""Per-step cost of GECO's cross-rank reduction: 2-process CPU DDP (gloo), GECO vs ELBO.

    python benchmarks/ddp_overhead.py [--steps 60] [--warmup 10] [--repeats 3] [--image-size 32]

Both variants train the same ConvVAE under ``strategy="ddp"`` on 2 CPU processes; ``geco``
adds ``GECOCallback``, whose one all-reduce of ``[sums, count, flag]`` per optimizer step is
the only extra communication. Reported: median step time of each variant (rank 0), their
ratio, and the median time spent inside ``GECOCallback.on_before_optimizer_step`` (reduction
and update together). Variants are interleaved over ``--repeats`` rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The repository root, for the top-level datamodules (this runs without installing the package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from datamodules.shapes import render_shapes, sample_factors  # noqa: E402
from lightning_geco import ELBO, ConvVAE, GECOCallback, GECOObjective, ReconstructionMSE  # noqa: E402


class TimedGECOCallback(GECOCallback):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.update_seconds: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        start = time.perf_counter()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.update_seconds.append(time.perf_counter() - start)


class StepTimes(pl.Callback):
    def __init__(self):
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds.append(time.perf_counter() - self._start)


def run_variant(args) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    images = render_shapes(sample_factors(args.batch_size * 2 * 64, seed=0), args.image_size)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=args.batch_size)
    geco = args.variant == "geco"
    objective = GECOObjective([ReconstructionMSE(0.005)]) if geco else ELBO()
    torch.manual_seed(0)
    model = ConvVAE(image_shape=(1, args.image_size, args.image_size), widths=(32, 32, 64), objective=objective)
    times = StepTimes()
    callbacks = [times] + ([TimedGECOCallback()] if geco else [])
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(model, loader)
    if trainer.global_rank == 0:
        result = {"step_seconds": statistics.median(times.seconds[args.warmup :])}
        if geco:
            result["update_seconds"] = statistics.median(callbacks[1].update_seconds[args.warmup :])
        Path(args.out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--variant", choices=["elbo", "geco"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_variant(args)
        return

    results: dict[str, list[dict]] = {"elbo": [], "geco": []}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.repeats):
            for variant in results:
                out = os.path.join(folder, f"{variant}{round_}.json")
                command = [sys.executable, __file__, "--variant", variant, "--out", out, *sys.argv[1:]]
                subprocess.run(command, capture_output=True, text=True, check=True)
                results[variant].append(json.loads(Path(out).read_text()))
            print(f"round {round_ + 1}/{args.repeats} done", file=sys.stderr)
    elbo = statistics.median(r["step_seconds"] for r in results["elbo"])
    geco = statistics.median(r["step_seconds"] for r in results["geco"])
    update = statistics.median(r["update_seconds"] for r in results["geco"])
    print(f"2-process CPU DDP (gloo), ConvVAE {args.image_size}x{args.image_size}, batch {args.batch_size} per rank, "
          f"median over {args.steps - args.warmup} steps x {args.repeats} rounds")
    print(f"step time, DDP + ELBO:  {elbo * 1e3:8.2f} ms")
    print(f"step time, DDP + GECO:  {geco * 1e3:8.2f} ms   ({geco / elbo - 1:+.1%})")
    print(f"inside GECOCallback.on_before_optimizer_step (all-reduce + update): {update * 1e3:.3f} ms per step")


if __name__ == "__main__":
    main()

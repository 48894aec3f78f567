"""Training throughput of ConvVAE: Lightning + GECO vs Lightning + ELBO vs a plain PyTorch loop.

    python benchmarks/throughput.py [--steps 60] [--warmup 10] [--repeats 5] [--image-size 64] [--flush-denormal]

All three variants train the same ConvVAE with the same Adam and the same DataLoader over the
same in-memory shapes; only the loop differs:

- ``plain``: a hand-written PyTorch loop, loss = rate + lambda * ||x - g(z)||^2 with a fixed
  lambda (no Lightning, no GECO): the floor;
- ``elbo``: ``Trainer.fit`` with the ELBO objective;
- ``geco``: ``Trainer.fit`` with the GECO objective and ``GECOCallback``.

Each variant runs in its own process (so peak memory is its own), the variants are interleaved
over ``--repeats`` rounds (so machine noise hits them alike), and the medians are compared.
Reported: images/s, peak memory (GPU: max allocated; CPU: peak RSS growth of the process),
and the fraction of step time spent outside the training step (waiting on data and the loop).
On the CPU also the process's CPU time per image (every thread's, ``time.process_time``): on a
shared machine other jobs stretch the wall clock by tens of percent from one run to the next,
while the CPU time a run itself spends moves far less, so its ratios are the ones that resolve
a few percent (the OpenMP threads wait passively, ``OMP_WAIT_POLICY=PASSIVE``, so a thread
spinning for work is not counted as work).

``--flush-denormal`` sets ``torch.set_flush_denormal(True)`` in every variant alike. On CPU,
values that decay towards zero (in a model whose KL term has switched latent units off) go
denormal and each operation on them costs ~100x; which variant hits them depends on its
training trajectory, not on its loop, so this flag separates the two.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The repository root, for the top-level datamodules (this runs without installing the package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from datamodules.shapes import render_shapes, sample_factors  # noqa: E402


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _loader(image_size: int, batch_size: int, device: str):
    images = render_shapes(sample_factors(batch_size * 64, seed=0), image_size)
    dataset = torch.utils.data.TensorDataset(images)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)


def build_model(image_size: int, objective):
    """The benchmarked ConvVAE (default architecture) for (1, S, S) images, seeded weights."""
    from lightning_geco import ConvVAE

    torch.manual_seed(0)
    return ConvVAE(image_shape=(1, image_size, image_size), objective=objective)


def make_objective(geco: bool):
    """The Lightning variants' objective: GECO (MSE at most 0.005, as on the shapes) or the ELBO."""
    from lightning_geco import ELBO, GECOObjective, ReconstructionMSE

    return GECOObjective([ReconstructionMSE(0.005)]) if geco else ELBO()


#: the plain loop's fixed weight on the summed squared error (no GECO moves it)
PLAIN_LAMBDA = 5.0


def plain_loss(out, x: torch.Tensor) -> torch.Tensor:
    """The plain loop's loss, nats-like per image: rate + lambda * ||x - g(z)||^2 (a scalar)."""
    return (out.rate + PLAIN_LAMBDA * x[0].numel() * out.distortion).mean()


def sync_device(device: str) -> None:
    """Wait for queued CUDA work, so a wall-clock reading covers it (no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def run_plain(args) -> dict:
    from lightning_geco import ELBO

    model = build_model(args.image_size, ELBO()).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    step, started, in_step = 0, 0.0, 0.0
    loader = _loader(args.image_size, args.batch_size, args.device)
    while step < args.steps:
        for (x,) in loader:
            if step == args.warmup:
                sync_device(args.device)
                started, in_step, cpu_started = time.perf_counter(), 0.0, time.process_time()
            begin = time.perf_counter()
            x = x.to(args.device, non_blocking=True)
            out = model(x)
            loss = plain_loss(out, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sync_device(args.device)
            in_step += time.perf_counter() - begin
            step += 1
            if step == args.steps:
                break
    elapsed = time.perf_counter() - started
    return {"seconds": elapsed, "in_step": in_step, "cpu_seconds": time.process_time() - cpu_started}


def run_lightning(args, geco: bool) -> dict:
    import pytorch_lightning as pl

    from lightning_geco import GECOCallback

    class StepTimer(pl.Callback):
        def __init__(self):
            self.started = 0.0
            self.in_step = 0.0
            self._begin = 0.0
            self.finished = 0.0
            self.cpu_started = 0.0
            self.cpu_finished = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == args.warmup:
                sync_device(args.device)
                self.started, self.in_step, self.cpu_started = time.perf_counter(), 0.0, time.process_time()
            self._begin = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync_device(args.device)
            now = time.perf_counter()
            self.in_step += now - self._begin
            self.finished, self.cpu_finished = now, time.process_time()

    objective = make_objective(geco)
    timer = StepTimer()
    callbacks = [timer] + ([GECOCallback()] if geco else [])
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(build_model(args.image_size, objective), _loader(args.image_size, args.batch_size, args.device))
    return {
        "seconds": timer.finished - timer.started,
        "in_step": timer.in_step,
        "cpu_seconds": timer.cpu_finished - timer.cpu_started,
    }


def worker(args) -> None:
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    baseline = _rss_mb()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = run_plain(args) if args.variant == "plain" else run_lightning(args, geco=args.variant == "geco")
    timed = args.steps - args.warmup
    result["images_per_s"] = timed * args.batch_size / result["seconds"]
    result["cpu_ms_per_image"] = 1e3 * result["cpu_seconds"] / (timed * args.batch_size)
    result["outside_step_fraction"] = max(0.0, 1.0 - result["in_step"] / result["seconds"])
    if args.device == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_memory_mb"] = _rss_mb() - baseline
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--flush-denormal", action="store_true", help="flush denormals to zero in every variant")
    parser.add_argument("--variant", choices=["plain", "elbo", "geco"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        worker(args)
        return

    variants = ("plain", "elbo", "geco")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for round_ in range(args.repeats):
        for variant in variants:
            command = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
            environment = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
            out = subprocess.run(command, capture_output=True, text=True, check=True, env=environment).stdout
            results[variant].append(json.loads(out.strip().splitlines()[-1]))
        print(f"round {round_ + 1}/{args.repeats} done", file=sys.stderr)

    def median(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in results[variant])

    print(f"ConvVAE {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.steps - args.warmup} timed "
          f"steps, median of {args.repeats} interleaved runs, device {args.device}"
          f"{', denormals flushed' if args.flush_denormal else ''}")
    print(f"{'variant':<8} {'images/s':>10} {'peak MB':>9} {'outside step':>13}")
    for variant in variants:
        print(f"{variant:<8} {median(variant, 'images_per_s'):>10.1f} {median(variant, 'peak_memory_mb'):>9.1f} "
              f"{median(variant, 'outside_step_fraction'):>12.1%}")
    plain, elbo, geco = (median(v, "images_per_s") for v in variants)
    print(f"GECO cost over ELBO (Lightning):     {elbo / geco - 1:+.1%} time per image (goal <= +2%)")
    print(f"Lightning + GECO over the plain loop: {plain / geco - 1:+.1%} time per image (goal <= +5%)")
    # Per-round ratios: each round's three runs share the machine's state at that moment.
    per_round = [r_p["images_per_s"] / r_g["images_per_s"] - 1 for r_p, r_g in zip(results["plain"], results["geco"])]
    print(f"  (per-round GECO-vs-plain ratios: {', '.join(f'{x:+.1%}' for x in per_round)})")
    if args.device == "cpu":
        # CPU time per image, each round's ratio within the round, then the median of those ratios.
        def cpu_ratios(a: str, b: str) -> list[float]:
            return [r_b["cpu_ms_per_image"] / r_a["cpu_ms_per_image"] - 1 for r_a, r_b in zip(results[a], results[b])]

        print("CPU time per image (ms): " + ", ".join(f"{v} {median(v, 'cpu_ms_per_image'):.3f}" for v in variants))
        for a, b, goal in (("elbo", "geco", "+2%"), ("plain", "geco", "+5%"), ("plain", "elbo", "")):
            ratios = cpu_ratios(a, b)
            spread = f"{min(ratios):+.1%} to {max(ratios):+.1%}"
            print(f"  CPU time, {b} over {a}: median {statistics.median(ratios):+.1%} per round ({spread})"
                  + (f" (goal <= {goal})" if goal else ""))


if __name__ == "__main__":
    main()

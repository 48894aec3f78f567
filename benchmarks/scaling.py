"""How a GECO training step's cost grows with the image size and the batch size.

    python benchmarks/scaling.py [--sizes 32 64 128] [--batches 16 64 256] [--steps 20] [--device cpu]

Times Lightning + GECO steps of the benchmarked ConvVAE (default architecture, shapes held in
memory, no logger, no validation) at each image size (batch 64) and at each batch size (64x64),
prints ms per step and images per second, and the fitted exponent of step time in the number of
pixels per image and in the batch size (the slope of a least-squares line on log-log axes).
The marginal KL's growth in N is ``benchmarks/marginal_kl.py``'s (it prints its own exponent).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from lightning_geco import ConvVAE, GECOCallback, GECOObjective, ReconstructionMSE  # noqa: E402
from step_profile import StepClock, bare_trainer, loader  # noqa: E402


def step_ms(device: str, image_size: int, batch_size: int, steps: int, warmup: int) -> float:
    """Wall-clock ms per optimizer step of Lightning + GECO, after ``warmup`` steps."""
    args = argparse.Namespace(image_size=image_size, batch_size=batch_size, device=device)
    torch.manual_seed(0)
    model = ConvVAE(image_shape=(1, image_size, image_size), objective=GECOObjective([ReconstructionMSE(0.005)]))
    clock = StepClock(warmup, device)
    bare_trainer(device, warmup + steps, [GECOCallback(), clock]).fit(model, train_dataloaders=loader(args))
    return 1e3 * clock.seconds / max(1, clock.steps)


def exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) on log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", type=int, default=[32, 64, 128])
    parser.add_argument("--batches", nargs="*", type=int, default=[16, 64, 256])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    lines = [
        f"Lightning + GECO, ConvVAE, {args.steps} timed steps after {args.warmup}, device {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "| image size | batch | ms / step | images / s |",
        "|---|---|---|---|",
    ]
    by_size = [step_ms(args.device, s, 64, args.steps, args.warmup) for s in args.sizes]
    for size, ms in zip(args.sizes, by_size):
        lines.append(f"| {size}x{size} | 64 | {ms:.1f} | {64e3 / ms:.0f} |")
    by_batch = [step_ms(args.device, 64, b, args.steps, args.warmup) for b in args.batches]
    for batch, ms in zip(args.batches, by_batch):
        lines.append(f"| 64x64 | {batch} | {ms:.1f} | {batch * 1e3 / ms:.0f} |")
    pixels = [s * s for s in args.sizes]
    if len(set(pixels)) > 1:
        lines.append(f"step time ~ pixels^{exponent(pixels, by_size):.2f} (batch 64)")
    if len(set(args.batches)) > 1:
        lines.append(f"step time ~ batch^{exponent(args.batches, by_batch):.2f} (64x64)")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()

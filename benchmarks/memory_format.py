"""The model's memory layout: ConvVAE training steps with NCHW weights against ``channels_last``.

    python benchmarks/memory_format.py [--rounds 7] [--steps 5] [--batch-size 64]

One optimizer step = forward, rate + 100 x the per-image squared error, backward, Adam. For
each image shape (1x28x28, 1x64x64, 3x32x32) two copies of one freshly initialised ConvVAE, one
as built and one ``model.to(memory_format=torch.channels_last)``, train on the same batch in
interleaved rounds (``--steps`` steps a round, after 3 warm-up steps each); printed: the median
ms per step of each and their ratio (< 1: channels_last faster). The two layouts run different
kernels, so their results agree to float32 rounding, not bit for bit (also printed: the largest
parameter difference after the timed steps). Runs from the repository root without installing
the package.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_geco import ConvVAE  # noqa: E402

SHAPES = ((1, 28, 28), (1, 64, 64), (3, 32, 32))


def trainer_step(model: torch.nn.Module, x: torch.Tensor):
    """One Adam step of ``model`` on ``x`` (the same loss for either layout)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        output = model(x)
        loss = 100.0 * output.distortion.sum() + output.rate.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and layout")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, batch {args.batch_size}, "
          f"{args.rounds} interleaved rounds of {args.steps} steps")
    print("| image | NCHW ms / step | channels_last ms / step | channels_last / NCHW | largest parameter difference |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        torch.manual_seed(0)
        built = ConvVAE(image_shape=shape)
        x = torch.rand(args.batch_size, *shape)
        models = {"nchw": copy.deepcopy(built), "channels_last": copy.deepcopy(built).to(memory_format=torch.channels_last)}
        steps = {name: trainer_step(model, x) for name, model in models.items()}
        times: dict[str, list[float]] = {name: [] for name in models}
        for step in steps.values():
            for _ in range(3):
                step()
        for _ in range(args.rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[name].append(1e3 * (time.perf_counter() - start) / args.steps)
        nchw, last = statistics.median(times["nchw"]), statistics.median(times["channels_last"])
        difference = max(
            (a - b).abs().max().item()
            for a, b in zip(models["nchw"].parameters(), models["channels_last"].parameters())
        )
        print(f"| {'x'.join(map(str, shape))} | {nchw:.1f} | {last:.1f} | {last / nchw:.2f} | {difference:.1e} |")


if __name__ == "__main__":
    main()

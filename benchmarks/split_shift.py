"""How much of a test-split gap is the split: one trained model read on every split it has.

    python benchmarks/split_shift.py [--cells mnist_mse fashion_mse mnist_bce mnist_laddervae mnist_flowvae mnist_convdraw] \
        [--seed 0] [--data-root ../shared/data] [--out docs/results/controllers/splits.md]

The controller table (``benchmarks/controllers.py``) scores a run on the TEST split, which
neither the model nor the multiplier saw. When the test split reads differently from the
training distribution, part of a cell's gap is the split, not the controller. This trains the
``default`` run of each cell as the table does (same config, seed and data, in this process)
and reads the trained model, in the validation mode, on: the test split (first, as the table
does, so the reading is the table's run's to the bit when the training is), the validation split
(held out of training, what the run's verdict reads), the calibration split (held out too; on
these cells nothing reads it during training) and 10,000 training images (seen; 1.7-1.8 epochs).
Printed: each reading of the cell's first constraint (an MSE or a BCE), its standard error
(``s / sqrt(N)``) and its gap to the tolerance in %.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import controllers  # noqa: E402

TRAINING_SAMPLE = 10_000


def read_splits(cell: str, seed: int, data_root: str) -> list[dict]:
    """Train ``cell``'s default run and read its first constraint on each split."""
    import torch
    from torch.utils.data import DataLoader, Subset

    config = controllers.run_config(cell, "default", seed, 1500, data_root)
    constraint = config["model"]["init_args"]["objective"]["init_args"]["constraints"][0]
    key, _ = controllers.RATIOS[constraint["class_path"].rsplit(".", 1)[-1]]
    if key not in ("distortion", "bce"):
        raise ValueError(f"split_shift reads a cell's first constraint, an MSE or a BCE; {cell}'s is {key}.")
    tolerance = constraint["init_args"]["tolerance"]
    out = controllers.REPO / "runs" / "benchmarks" / "split_shift"
    cli, _, test, _ = controllers.train_and_test(config, out / "configs" / f"{cell}_{seed}.yaml", out)
    data = cli.datamodule
    rows = [{
        # The official test splits of MNIST and Fashion-MNIST hold 10,000 images.
        "cell": cell, "split": "test", "images": 10_000, "reading": key, "tolerance": tolerance,
        "value": test[f"val/{key}"], "standard_error": test[f"val/{key}/standard_error"],
    }]
    order = torch.randperm(len(data.train_dataset), generator=torch.Generator().manual_seed(seed))
    splits = {
        "validation": data.val_dataset,
        "calibration": data.calibration_dataset,
        f"training ({TRAINING_SAMPLE:,} seen)": Subset(data.train_dataset, order[:TRAINING_SAMPLE].tolist()),
    }
    for name, dataset in splits.items():
        cli.trainer.validate(cli.model, dataloaders=DataLoader(dataset, batch_size=500), verbose=False)
        metrics = cli.trainer.callback_metrics
        rows.append({
            "cell": cell, "split": name, "images": len(dataset), "reading": key, "tolerance": tolerance,
            "value": float(metrics[f"val/{key}"]), "standard_error": float(metrics[f"val/{key}/standard_error"]),
        })
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| cell | split | images | reading (± SE) | gap to the tolerance |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        gap = 100 * (row["value"] / row["tolerance"] - 1)
        error = 100 * row["standard_error"] / row["tolerance"]
        lines.append(
            f"| {row['cell']} | {row['split']} | {row['images']:,} | {row['reading']} {row['value']:.5f} "
            f"± {row['standard_error']:.5f} | {gap:+.1f} % ± {error:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="*", default=["mnist_mse", "fashion_mse", "mnist_bce", "mnist_laddervae", "mnist_flowvae", "mnist_convdraw"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=str(controllers.REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args()
    rows = []
    for cell in args.cells:
        rows += read_splits(cell, args.seed, str(Path(args.data_root).resolve()))
    text = markdown(rows)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

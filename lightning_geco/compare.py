"""Compare finished runs: a table and PNG plots of rate, distortion and marginal KL.

    python -m lightning_geco.compare RUN [RUN ...] --out DIR [--names NAME ...]
    lightning-geco-compare RUN [RUN ...] --out DIR [--names NAME ...]

Each RUN is a W&B run folder (``runs/wandb/offline-run-...``), its ``files`` folder, or a
``summary.json`` (from any logger). Writes to DIR: ``comparison.md`` and ``comparison.csv``
(one row per run), ``rate_distortion.png`` (the rate-distortion plane, one point per run, with
each run's tolerance), ``metrics.png`` (rate, distortion and marginal KL per run) and, when the
runs have W&B histories, ``curves.png`` (distortion, rate, lambda and marginal KL over steps).
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_geco.wandb_records import read_history

__all__ = ["COLUMNS", "CURVES", "Run", "load_run", "main", "markdown_table"]

COLUMNS = ("distortion", "tolerance", "satisfied", "rate", "marginal_kl", "mutual_info", "lambda", "global_step")
CURVES = (
    ("train/distortion", "distortion (MSE / element)"),
    ("train/rate", "rate (nats / image)"),
    ("geco/lambda", "lambda"),
    ("val/marginal_kl", "marginal KL (nats / image)"),
)


@dataclass
class Run:
    name: str
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def load_run(path: str | Path) -> Run:
    """A run from a W&B run folder, its ``files`` folder, or a ``summary.json``."""
    path = Path(path)
    if path.is_dir() and (path / "files" / "summary.json").exists():
        summary_file = path / "files" / "summary.json"
    elif path.is_dir() and (path / "summary.json").exists():
        summary_file = path / "summary.json"
    elif path.is_file() and path.suffix == ".json":
        summary_file = path
    else:
        raise FileNotFoundError(
            f"No run at {path}: expected a W&B run folder (with files/summary.json), a folder holding "
            "summary.json, or a summary.json file."
        )
    summary = json.loads(summary_file.read_text())
    run_dir = summary_file.parent.parent if summary_file.parent.name == "files" else summary_file.parent
    history = read_history(run_dir) if list(run_dir.glob("run-*.wandb")) else []
    return Run(name=run_dir.name, summary=summary, history=history)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return "" if value is None else str(value)


def markdown_table(runs: Sequence[Run]) -> str:
    lines = ["| run | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for run in runs:
        lines.append(f"| {run.name} | " + " | ".join(_cell(run.summary.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)


def _scalar(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _plot_rate_distortion(runs: Sequence[Run], path: Path, plt) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=100)
    for i, run in enumerate(runs):
        rate, distortion = _scalar(run.summary.get("rate")), _scalar(run.summary.get("distortion"))
        if rate is None or distortion is None:
            continue
        color = f"C{i % 10}"
        ax.scatter([rate], [distortion], color=color, label=run.name, zorder=2)
        tolerance = _scalar(run.summary.get("tolerance"))
        if tolerance is not None:
            ax.axhline(tolerance, color=color, linestyle="--", linewidth=0.8, zorder=1)
    ax.set_xlabel("rate (nats / image)")
    ax.set_ylabel("distortion (MSE / element)")
    ax.set_title("rate-distortion plane (dashed: tolerance)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_metrics(runs: Sequence[Run], path: Path, plt) -> None:
    keys = (("rate", "rate (nats / image)"), ("distortion", "distortion (MSE)"), ("marginal_kl", "marginal KL (nats)"))
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.5), dpi=100)
    names = [run.name for run in runs]
    for ax, (key, label) in zip(axes, keys):
        ax.bar(range(len(runs)), [_scalar(run.summary.get(key)) or 0.0 for run in runs], color="C0")
        ax.set_xticks(range(len(runs)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_curves(runs: Sequence[Run], path: Path, plt) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), dpi=100)
    for ax, (key, label) in zip(axes.flat, CURVES):
        for i, run in enumerate(runs):
            points = [(row["trainer/global_step"], row[key]) for row in run.history if key in row and "trainer/global_step" in row]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, color=f"C{i % 10}", label=run.name, marker="o" if len(points) < 20 else None)
        if key == "train/distortion":
            for i, run in enumerate(runs):
                tolerance = _scalar(run.summary.get("tolerance"))
                if tolerance is not None:
                    ax.axhline(tolerance, color=f"C{i % 10}", linestyle="--", linewidth=0.8)
            ax.set_yscale("log")
        if key == "geco/lambda":
            ax.set_yscale("log")
        ax.set_title(label)
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="W&B run folders, their files/ folders, or summary.json files")
    parser.add_argument("--out", required=True, help="folder for the table and the plots")
    parser.add_argument("--names", nargs="+", help="labels for the runs, in order (default: folder names)")
    args = parser.parse_args(argv)
    if args.names and len(args.names) != len(args.runs):
        parser.error(f"--names got {len(args.names)} labels for {len(args.runs)} runs")

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    runs = [load_run(path) for path in args.runs]
    for run, name in zip(runs, args.names or []):
        run.name = name
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    (out / "comparison.md").write_text(table + "\n")
    with open(out / "comparison.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", *COLUMNS])
        for run in runs:
            writer.writerow([run.name, *(_cell(run.summary.get(c)) for c in COLUMNS)])
    written = [out / "comparison.md", out / "comparison.csv", out / "rate_distortion.png", out / "metrics.png"]
    _plot_rate_distortion(runs, written[2], plt)
    _plot_metrics(runs, written[3], plt)
    if any(run.history for run in runs):
        written.append(out / "curves.png")
        _plot_curves(runs, written[-1], plt)
    print(table)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()

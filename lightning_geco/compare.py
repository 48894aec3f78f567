"""Compare finished runs: a table and PNG plots of rate, distortion and marginal KL.

    python -m lightning_geco.compare RUN [RUN ...] --out DIR [--names NAME ...]
    lightning-geco-compare RUN [RUN ...] --out DIR [--names NAME ...]

Each RUN is a W&B run folder (``runs/wandb/offline-run-...``), its ``files`` folder, or a
``summary.json`` (from any logger). Writes to DIR: ``comparison.md`` and ``comparison.csv``
(one row per run), ``rate_distortion.png`` (the rate-distortion plane, one point per run, with
each run's tolerance on the distortion; a BCE's or pNCC's is not on that axis), ``metrics.png``
(rate, distortion and marginal KL per run) and, when the runs have W&B histories, ``curves.png`` (distortion, rate, lambda and marginal KL over steps;
a resumed run's curves join every W&B folder of its run id, the resumed part replacing what the
interrupted one logged past the checkpoint, and its row is its newest folder's summary). A
``test_summary.json`` or ``validate_summary.json`` row is named after the checkpoint's run
folder, ``<run id> (test set)`` or ``<run id> (validation set)``. Exits 0, or 2 with one line
for a path that is no run or two paths of one run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_geco.wandb_records import read_history

__all__ = ["COLUMNS", "CURVES", "STEP", "NotARunError", "Run", "compare", "joined_history", "load_run", "main", "markdown_table"]

#: the table's columns: the summary's figures of those names, but ``reading``, each constraint's
#: own reading as ``<reading name>=<value>`` (``pncc=0.9399``; the distortion for an MSE constraint)
COLUMNS = (
    "distortion", "reading", "tolerance", "satisfied", "verdict", "rate", "marginal_kl", "mutual_info", "lambda", "global_step"
)
#: the history key of the optimizer step (Lightning's WandbLogger logs it with every row)
STEP = "trainer/global_step"
CURVES = (
    ("train/distortion", "distortion (MSE / element)"),
    ("train/rate", "rate (nats / image)"),
    ("geco/lambda", "lambda"),
    ("val/marginal_kl", "marginal KL (nats / image)"),
)


class NotARunError(FileNotFoundError):
    """A path that holds no finished run (or a second path of one already given, or an ``--out``
    that is not a folder): the command's one-line refusals."""


@dataclass
class Run:
    name: str
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    #: what the row reads: the run's first folder and the summary's file name
    source: tuple[Path, str] | None = None


def load_run(path: str | Path) -> Run:
    """A run from a W&B run folder, its ``files`` folder, or a ``summary.json``."""
    # A link (W&B's latest-run) is read as the folder it points at: its run id, its segments.
    path = Path(path)
    if any(part.is_symlink() for part in (path, *path.parents)):
        path = path.resolve()
    named: str | None = None  # a folder given that holds no summary keeps its name on the row
    if path.is_dir() and not (path / "files" / "summary.json").exists() and _wandb_run_id(path) is not None:
        # A segment stopped before its end (killed, then resumed) writes none: the run's row is its
        # newest summary, as for any other folder of it.
        written = [s for s in _segments(path) if (s / "files" / "summary.json").exists()]
        if written:
            named, path = path.name, written[-1]
    if path.is_dir() and (path / "files" / "summary.json").exists():
        summary_file = path / "files" / "summary.json"
    elif path.is_dir() and (path / "summary.json").exists():
        summary_file = path / "summary.json"
    elif path.is_file() and path.suffix == ".json":
        summary_file = path
    else:
        # A test or validate run writes test_summary.json / validate_summary.json: read by path.
        evaluations = sorted(
            f for folder in (path / "files", path) if folder.is_dir() for f in folder.glob("*_summary.json")
        )
        if evaluations:
            raise NotARunError(
                f"No summary.json at {path}: it holds {', '.join(f.name for f in evaluations)} (a test or "
                f"validate run's); pass the file itself, e.g. {evaluations[0]}."
            )
        raise NotARunError(
            f"No run at {path}: expected a W&B run folder (with files/summary.json), a folder holding "
            "summary.json, or a summary.json file (a run killed before its end writes none)."
        )
    run_dir = summary_file.parent.parent if summary_file.parent.name == "files" else summary_file.parent
    segments = _segments(run_dir)
    last_segment = None
    unfinished = ""
    if summary_file.name == "summary.json" and not path.is_file():
        # A resumed run's figures are its newest segment's (the folder given may be an earlier one).
        newest = [s / "files" / "summary.json" for s in segments if (s / "files" / "summary.json").exists()]
        summary_file = newest[-1] if newest else summary_file
        if _wandb_run_id(run_dir) is not None and not (segments[-1] / "files" / "summary.json").exists():
            # killed, or still running
            unfinished = f" (its newest segment, {segments[-1].name}, wrote no summary: an earlier fit's figures)"
    elif summary_file.name == "summary.json" and run_dir.resolve() != segments[-1].resolve():
        # A file named by path is read as it is: an extended run's earlier summary (before a longer
        # fit or another tolerance), with the curves up to it, apart from the run's newest.
        last_segment = run_dir
    try:
        summary = json.loads(summary_file.read_text())
    except ValueError as error:  # a file cut short, or not JSON
        raise NotARunError(f"{summary_file} is not a summary: {error}.") from error
    if not isinstance(summary, dict):
        raise NotARunError(f"{summary_file} is not a summary: it holds a JSON {type(summary).__name__}, not an object.")
    # A test's or a validation's figures (train.py test / validate) are named so in the table,
    # after the trained run whose checkpoint they read.
    stage = {"test_summary.json": " (test set)", "validate_summary.json": " (validation set)"}.get(summary_file.name, "")
    checkpoint = summary.get("checkpoint") if stage else None
    name = _trained_run(Path(checkpoint)) if checkpoint else (named or run_dir.name)
    source = (segments[0].resolve(), summary_file.name) if last_segment is None else (summary_file.resolve(), "")
    # An evaluation's W&B folder logs its one validation or test at step 0: no curve of the run.
    try:
        history = [] if stage else joined_history(run_dir, last_segment)
    except ValueError as error:  # a run-*.wandb file that is not W&B's log (a header that is not its)
        raise NotARunError(f"{run_dir}: its curves cannot be read: {error}") from error
    return Run(name=name + unfinished + stage, summary=summary, history=history, source=source)


def _trained_run(checkpoint: Path) -> str:
    """The run a checkpoint belongs to: its folder, ``<dirpath>/<run id>/`` as ``train.py`` writes
    them, or the one above Lightning's ``<version or run id>/checkpoints/``."""
    folder = checkpoint.parent
    return folder.parent.name if folder.name == "checkpoints" else folder.name


_WANDB_FOLDER = re.compile(r"(?:offline-)?run-(\d{8}_\d{6})-(.+)")


def _wandb_folder(folder: Path) -> tuple[str, str, int] | None:
    """``(start time, run id, n)`` of a W&B run folder, ``[offline-]run-<date>_<time>-<id>[-<n>]``
    (W&B adds ``-<n>`` where the name is taken: a resume in the same second); None: not one.

    The id is read from the run's log file, ``run-<id>.wandb``: in the name alone an id with a
    hyphen (``--trainer.logger.init_args.id exp-2``) reads as id ``exp`` and n 2. A folder without
    the file (nothing logged yet) is taken as its name says, n 0.
    """
    match = _WANDB_FOLDER.fullmatch(folder.name)
    if match is None:
        return None
    started, rest = match.groups()
    # Only a name with a hyphen after the time is ambiguous (W&B's own ids have none): no file read for the rest.
    logs = sorted(folder.glob("run-*.wandb")) if "-" in rest and folder.is_dir() else []
    run_id = logs[0].name[len("run-") : -len(".wandb")] if logs else rest
    n = rest[len(run_id) + 1 :] if rest.startswith(run_id + "-") else ""
    return started, run_id, int(n) if n.isdigit() else 0


def _wandb_run_id(folder: Path) -> str | None:
    """The run id of a W&B run folder (None: not one); see :func:`_wandb_folder`."""
    parts = _wandb_folder(folder)
    return parts[1] if parts else None


def _segments(run_dir: Path) -> list[Path]:
    """The W&B folders of ``run_dir``'s run (a resumed run writes one per segment offline),
    oldest first, by the start time in their names (not by name: ``offline-run-*`` would sort
    before every online ``run-*``); ``[run_dir]`` for a folder that is not a W&B run's."""
    run_id = _wandb_run_id(run_dir)
    if run_id is None:
        return [run_dir]
    folders = {f: _wandb_folder(f) for f in run_dir.parent.iterdir()}
    ours = {f: (parts[0], parts[2]) for f, parts in folders.items() if parts is not None and parts[1] == run_id}
    return sorted(ours, key=lambda f: ours[f])


#: row keys that are W&B's or Lightning's bookkeeping, not a logged figure
_BOOKKEEPING = frozenset({STEP, "epoch", "_step", "_runtime", "_timestamp"})


def joined_history(run_dir: Path, last_segment: Path | None = None) -> list[dict[str, Any]]:
    """The W&B history of a run across its resumed segments: every folder beside ``run_dir``
    with the same run id (a resumed run writes a new one offline), oldest first, up to
    ``last_segment`` (None: the newest). Empty without W&B records.

    From a later segment's first step on (a resume starts over from its checkpoint's step), an
    earlier row goes where the later segment logged a figure of it at the same step, and stays
    where it did not: a resumed fit logs its first training row one step early (Lightning's
    count of batches that stepped comes back one behind) at the step of the earlier segment's
    last validation, which it does not repeat, and that validation is the checkpoint's."""
    rows: list[dict[str, Any]] = []
    segments = _segments(run_dir)
    if last_segment is not None:
        segments = segments[: [s.resolve() for s in segments].index(last_segment.resolve()) + 1]
    for segment in segments:
        if not list(segment.glob("run-*.wandb")):
            continue
        later = read_history(segment)
        steps = [row[STEP] for row in later if STEP in row]
        if steps:
            first = min(steps)
            logged: dict[Any, set[str]] = {}
            for row in later:
                if STEP in row:
                    logged.setdefault(row[STEP], set()).update(set(row) - _BOOKKEEPING)
            rows = [
                row for row in rows
                if row.get(STEP, -1) < first or not (set(row) - _BOOKKEEPING) & logged.get(row[STEP], set())
            ]
        rows = sorted(rows + later, key=lambda row: row.get(STEP, -1))  # stable: each step's rows in order
    return rows


def _cell(value: Any, digits: int | None = 4) -> str:
    """A table cell: floats to ``digits`` significant digits (None: as stored, for the CSV a
    script reads), a dict as ``k=v`` pairs."""
    if isinstance(value, float):
        return repr(value) if digits is None else f"{value:.{digits}g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v, digits)}" for k, v in value.items())
    return "" if value is None else str(value)


def _readings(summary: dict[str, Any]) -> dict[str, Any] | None:
    """Each constraint's reading, ``{reading name: value}``: a pNCC's tolerance is read beside
    the pNCC, not the distortion. None for a summary that names no reading."""
    names = summary.get("reading")
    if isinstance(names, str):
        return {names: summary.get(names)}
    if isinstance(names, dict):
        return {reading: summary.get(reading) for reading in names.values()}
    return None


def _distortion_tolerance(summary: dict[str, Any]) -> float | None:
    """The tolerance on the distortion (MSE per element), to draw on its axis; None where no
    constraint reads the distortion (a BCE, a pNCC, ...). A summary naming no reading is an MSE run's."""
    names, tolerance = summary.get("reading", "distortion"), summary.get("tolerance")
    if isinstance(names, dict) and isinstance(tolerance, dict):
        return next((_scalar(tolerance.get(name)) for name, reading in names.items() if reading == "distortion"), None)
    return _scalar(tolerance) if names == "distortion" else None


def _row(run: Run, digits: int | None = 4) -> list[str]:
    return [_cell(_readings(run.summary) if c == "reading" else _value(run.summary, c), digits) for c in COLUMNS]


def _value(summary: dict[str, Any], column: str) -> Any:
    """A column's value; the verdict of a fit that stopped with an error is that error."""
    if column == "verdict" and summary.get("verdict") is None and summary.get("error"):
        error = str(summary["error"])
        return "failed: " + (error if len(error) <= 80 else error[:77] + "...")
    return summary.get(column)


def markdown_table(runs: Sequence[Run]) -> str:
    lines = ["| run | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for run in runs:
        lines.append(f"| {run.name} | " + " | ".join(_row(run)) + " |")
    return "\n".join(lines)


def _scalar(value: Any) -> float | None:
    """A finite number, else None (a missing, non-numeric or non-finite figure)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _plot_rate_distortion(runs: Sequence[Run], path: Path, plt) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=100)
    for i, run in enumerate(runs):
        rate, distortion = _scalar(run.summary.get("rate")), _scalar(run.summary.get("distortion"))
        if rate is None or distortion is None:
            continue
        color = f"C{i % 10}"
        ax.scatter([rate], [distortion], color=color, label=run.name, zorder=2)
        tolerance = _distortion_tolerance(run.summary)
        if tolerance is not None:
            ax.axhline(tolerance, color=color, linestyle="--", linewidth=0.8, zorder=1)
    ax.set_xlabel("rate (nats / image)")
    ax.set_ylabel("distortion (MSE / element)")
    ax.set_title("rate-distortion plane (dashed: tolerance)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_metrics(runs: Sequence[Run], path: Path, plt) -> None:
    keys = (("rate", "rate (nats / image)"), ("distortion", "distortion (MSE)"), ("marginal_kl", "marginal KL (nats)"))
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.5), dpi=100)
    names = [run.name for run in runs]
    for ax, (key, label) in zip(axes, keys):
        values = [_scalar(run.summary.get(key)) for run in runs]
        # A figure the run does not have is marked n/a: a bar of 0 would read as a perfect one.
        ax.bar(range(len(runs)), [math.nan if v is None else v for v in values], color="C0")
        for x, value in enumerate(values):
            if value is None:
                ax.text(x, 0.0, "n/a", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(runs)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_curves(runs: Sequence[Run], path: Path, plt) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), dpi=100)
    for ax, (key, label) in zip(axes.flat, CURVES):
        for i, run in enumerate(runs):
            for curve, suffix, style in _curve_keys(run, key):
                points = [(row[STEP], row[curve]) for row in run.history if curve in row and STEP in row]
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, color=f"C{i % 10}", linestyle=style, label=run.name + suffix,
                            marker="o" if len(points) < 20 else None)
        if key == "train/distortion":
            for i, run in enumerate(runs):
                tolerance = _distortion_tolerance(run.summary)
                if tolerance is not None and any(key in row for row in run.history):  # beside its own curve only
                    ax.axhline(tolerance, color=f"C{i % 10}", linestyle="--", linewidth=0.8)
            ax.set_yscale("log")
        if key == "geco/lambda":
            ax.set_yscale("log")
        ax.set_title(label)
        ax.set_xlabel("step")
    if axes.flat[0].get_legend_handles_labels()[0]:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _number_repeated_names(runs: Sequence[Run]) -> None:
    """Rows of one name (two test summaries of one checkpoint, two runs written into one folder)
    numbered ``name [1]``, ``name [2]`` in the order given, so no row reads as another's."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.name] = counts.get(run.name, 0) + 1
    seen: dict[str, int] = {}
    for run in runs:
        if counts[run.name] > 1:
            seen[run.name] = seen.get(run.name, 0) + 1
            run.name = f"{run.name} [{seen[run.name]}]"


_LINE_STYLES = ("-", "--", ":", "-.")


def _curve_keys(run: Run, key: str) -> list[tuple[str, str, str]]:
    """(history key, label suffix, line style) of the curves ``key`` stands for in ``run``: itself,
    or for ``geco/lambda`` in a run with several constraints, which logs ``geco/<name>/lambda``
    per constraint, one line each."""
    if key != "geco/lambda" or any(key in row for row in run.history):
        return [(key, "", "-")]
    names = sorted({k.split("/")[1] for row in run.history for k in row if k.startswith("geco/") and k.endswith("/lambda")})
    return [(f"geco/{name}/lambda", f" ({name})", _LINE_STYLES[j % len(_LINE_STYLES)]) for j, name in enumerate(names)]


def main(argv: Sequence[str] | None = None) -> int:
    """The command: 0 once the table and plots are written, 2 (and one line) for a path that is
    no run, or two paths of one run."""
    try:
        compare(argv)
    except NotARunError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    return 0


def compare(argv: Sequence[str] | None = None) -> list[Path]:
    """Write the table and the plots for the runs ``argv`` names; returns the files written."""
    parser = argparse.ArgumentParser(prog="lightning-geco-compare", description=__doc__.split("\n\n")[0])
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
    given: dict[Any, str] = {}
    for path, run in zip(args.runs, runs):
        if run.source in given:
            raise NotARunError(
                f"{path} and {given[run.source]} are the same run (a resumed run's W&B folders are one run): pass one of them."
            )
        given[run.source] = path
    for run, name in zip(runs, args.names or []):
        run.name = name
    _number_repeated_names(runs)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotARunError(f"--out {out} is a file; it names the folder the table and the plots go to.")
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    (out / "comparison.md").write_text(table + "\n")
    with open(out / "comparison.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", *COLUMNS])
        for run in runs:
            writer.writerow([run.name, *_row(run, digits=None)])  # every digit summary.json holds
    written = [out / "comparison.md", out / "comparison.csv", out / "rate_distortion.png", out / "metrics.png"]
    _plot_rate_distortion(runs, written[2], plt)
    _plot_metrics(runs, written[3], plt)
    if any(run.history for run in runs):
        written.append(out / "curves.png")
        _plot_curves(runs, written[-1], plt)
    elif (out / "curves.png").exists():
        (out / "curves.png").unlink()  # another comparison's curves, beside this one's table
    print(table)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    sys.exit(main())

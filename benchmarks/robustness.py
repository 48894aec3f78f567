"""Robustness and tolerance sweeps: one GECO setting (alpha, nu) across models, datasets and tolerances.

    python benchmarks/robustness.py --data-root ../shared/data --source test --out docs/results/robustness
    python benchmarks/robustness.py --constraints --data-root ../shared/data --source test \\
        --out docs/results/constraints
    python benchmarks/robustness.py --sweep configs/mnist_convvae_geco.yaml --tolerances 0.01 0.015 0.02 0.03 0.04 \\
        --data-root ../shared/data --source test --out docs/results/sweep

Without ``--sweep``: trains every model's GECO config on the shapes and on MNIST (each config
as committed: same alpha and nu for every model of a dataset) and writes ``robustness.md`` /
``.csv``: tolerance asked vs reading reached, rate, marginal KL, lambda, steps, seconds.
With ``--constraints``: the same table for every kind of constraint (BCE, pNCC, classifier,
features), under the same GECO setting. ``--nu`` / ``--speedup`` run the configs with other
GECO settings (the copies they train are written to ``--out``); ``--clip`` sets
``max_relative_violation`` (``none``: no cap).
With ``--sweep CONFIG``: trains CONFIG once per tolerance and runs ``lightning_geco.compare``
over them (``comparison.md``, ``rate_distortion.png``: the rate-distortion curve GECO traces).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import yaml

from lightning_geco.compare import main as compare
from runs import KEEP, REPO, geco_settings, summary_of, train, with_geco_settings, with_tolerance

MODEL_CONFIGS = [
    "default.yaml",
    "shapes_flowvae_geco.yaml",
    "shapes_laddervae_geco.yaml",
    "shapes_convdraw_geco.yaml",
    "mnist_convvae_geco.yaml",
    "mnist_flowvae_geco.yaml",
    "mnist_laddervae_geco.yaml",
    "mnist_convdraw_geco.yaml",
]
# The same GECO setting on every kind of constraint (``--configs`` picks from either list).
CONSTRAINT_CONFIGS = [
    "mnist_convvae_geco_bce.yaml",
    "mnist_convvae_geco_pncc.yaml",
    "mnist_convvae_geco_classifier.yaml",
    "mnist_convvae_geco_features.yaml",
    "shapes_convvae_geco_bce.yaml",
    "shapes_convvae_geco_pncc.yaml",
]
COLUMNS = ["config", "model", "data", "alpha", "nu", "speedup", "clip", "reading", "tolerance", "reached", "gap %",
           "satisfied", "rate", "marginal_kl", "lambda", "steps", "seconds"]


def _per_constraint(value) -> list:
    return list(value.values()) if isinstance(value, dict) else [value]


def _joined(values, fmt: str = "{}") -> str:
    return "; ".join(fmt.format(v) for v in values)


def row(config_path: Path, run: Path) -> dict:
    """One table row; several constraints share a cell, joined by '; ' in the same order."""
    config = yaml.safe_load(config_path.read_text())
    summary = summary_of(run)
    (callback,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("GECOCallback")]
    settings = geco_settings(callback)
    readings = _per_constraint(summary["reading"])
    return {
        "config": config_path.name,
        "model": config["model"]["class_path"].rsplit(".", 1)[-1],
        "data": config["data"]["class_path"].rsplit(".", 1)[-1].replace("DataModule", ""),
        "alpha": settings["alpha"],
        "nu": settings["step_size"],
        "speedup": settings["release_speedup"],
        "clip": settings["max_relative_violation"],
        "reading": _joined(readings),
        "tolerance": _joined(_per_constraint(summary["tolerance"]), "{:g}"),
        "reached": _joined((summary[r] for r in readings), "{:.5g}"),
        "gap %": _joined((100.0 * v for v in _per_constraint(summary["relative_violation"])), "{:+.1f}"),
        "satisfied": summary["satisfied"],
        "rate": round(summary["rate"], 2),
        "marginal_kl": round(summary["marginal_kl"], 2),
        "lambda": _joined(_per_constraint(summary["lambda"]), "{:.3g}"),
        "steps": summary["global_step"],
        "seconds": round(summary["wall_clock_seconds"]),
    }


def train_frozen_networks_for(config_path: Path, data_root: str | None, source: str) -> None:
    """Train the classifier a config's constraint reads, when its checkpoint is not there yet."""
    for wanted in re.findall(r"checkpoint:\s*(\S+)", config_path.read_text()):
        if Path(wanted).exists():
            continue
        for candidate in sorted((REPO / "configs").glob("*classifier.yaml")):
            if "geco" not in candidate.stem and f"dirpath: {Path(wanted).parent}" in candidate.read_text():
                print(f"training {candidate.name} for {wanted}", file=sys.stderr)
                train(candidate, data_root, source)
                break


def write_table(rows: list[dict], out: Path) -> None:
    with open(out / "robustness.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    (out / "robustness.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="*", default=MODEL_CONFIGS, help="config files under configs/")
    parser.add_argument("--constraints", action="store_true", help="run CONSTRAINT_CONFIGS instead of the models")
    parser.add_argument("--sweep", help="a single-constraint GECO config to sweep the tolerance of")
    parser.add_argument("--tolerances", nargs="*", type=float, default=[0.01, 0.015, 0.02, 0.03, 0.04])
    parser.add_argument("--nu", type=float, help="override every config's GECO step_size")
    parser.add_argument("--speedup", type=float, help="override every config's GECO release_speedup")
    parser.add_argument("--clip", help="override every config's GECO max_relative_violation (a number or 'none')")
    parser.add_argument("--data-root", help="the data's root folder, for configs that read files")
    parser.add_argument("--source", default="train")
    parser.add_argument("--out", default="docs/results/robustness")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        base = yaml.safe_load(Path(args.sweep).read_text())
        runs = []
        for tolerance in args.tolerances:
            path = out / f"{Path(args.sweep).stem}_tol{tolerance:g}.yaml"
            path.write_text(yaml.safe_dump(with_tolerance(base, tolerance)))
            runs.append(train(path, args.data_root, args.source))
            print(f"tolerance {tolerance:g}: {runs[-1]}", file=sys.stderr)
        compare([str(r) for r in runs] + ["--out", str(out), "--names", *[f"tol {t:g}" for t in args.tolerances]])
        return
    rows = []
    for name in CONSTRAINT_CONFIGS if args.constraints else args.configs:
        path = REPO / "configs" / name
        train_frozen_networks_for(path, args.data_root, args.source)
        overrides = {
            "step_size": KEEP if args.nu is None else args.nu,
            "release_speedup": KEEP if args.speedup is None else args.speedup,
            "max_relative_violation": KEEP if args.clip is None else None if args.clip == "none" else float(args.clip),
        }
        if any(v is not KEEP for v in overrides.values()):
            changed = with_geco_settings(yaml.safe_load(path.read_text()), **overrides)
            path = out / name
            path.write_text(yaml.safe_dump(changed))
        rows.append(row(path, train(path, args.data_root, args.source)))
        print(rows[-1], file=sys.stderr)
    write_table(rows, out)


if __name__ == "__main__":
    main()

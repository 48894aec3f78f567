"""GECO against a beta sweep at matched distortion, and GECO's 5-point tolerance sweep (issue 13).

    python benchmarks/geco_vs_beta.py --data-root ../shared/data --out docs/results/geco_vs_beta \\
        [--datasets mnist fashion] [--seeds 0 1 2] [--betas 1 2 4 8 16] [--max-steps 1500]

For each dataset and seed: the config's ConvVAE is trained as a beta-VAE at each beta (the
config's Gaussian likelihood, sigma 0.1: a beta-VAE is GECO at a fixed lambda = 50 / beta),
and then with GECO (the library's default settings) at a tolerance equal to that beta-VAE's
TEST distortion: five tolerances per dataset that the architecture is known to reach at this
budget, stated as a user would ("as good as that beta-VAE"). Every run trains on the training
split (1,000 images held out for validation) and is read on the whole 10,000-image test split
in the validation mode, as in ``benchmarks/controllers.py``.

Printed and written to ``<out>/table.md``: per dataset, per beta, the beta-VAE's test
distortion, rate and marginal KL beside GECO's at the matched tolerance, with GECO's
``|test / tolerance - 1|`` (the sweep's cell) and the rate and marginal-KL differences (mean
and spread over seeds). GECO ends a little under the distortion asked, so those differences
compare it with a beta-VAE of slightly worse distortion; the last two columns compare it at its
own distortion, with the beta sweep's curve there (:func:`sweep_at`, per seed; only where GECO's
distortion lies within that seed's sweep: the beta-1 rows end below every beta-VAE's, and there
the plain differences are the comparison). Runs append to ``<out>/runs.jsonl`` and are skipped
when already there.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from controllers import REPO, add_run_arguments, read_log, run_config, run_subprocess, train_and_test

#: dataset -> the controllers.py cell whose config it trains
DATASETS = {"mnist": "mnist_mse", "fashion": "fashion_mse"}
BETAS = (1.0, 2.0, 4.0, 8.0, 16.0)


def config_of(spec: dict) -> dict:
    """A beta-VAE (``spec["beta"]``) or GECO at ``spec["tolerance"]`` on ``spec["dataset"]``."""
    # pi_train: what the default drive="auto" chooses for these MSE runs (1.7 epochs, no classifier),
    # named explicitly so the runs already in runs.jsonl stay what they were
    config = run_config(DATASETS[spec["dataset"]], "pi_train", spec["seed"], spec["max_steps"], spec["data_root"])
    model = config["model"]["init_args"]
    if spec["kind"] == "beta":
        model["objective"] = {"class_path": "lightning_geco.BetaVAE", "init_args": {"beta": spec["beta"]}}
        config["trainer"]["callbacks"] = []
    else:
        (constraint,) = model["objective"]["init_args"]["constraints"]
        constraint["init_args"]["tolerance"] = spec["tolerance"]
        (callback,) = config["trainer"]["callbacks"]
        callback["init_args"] = {}  # the library's defaults
    return config


def one(spec: dict) -> dict:
    """Train one run in this process and read it on the test split."""
    config = config_of(spec)
    path = Path(spec["out"]) / "configs" / f"{spec['dataset']}_{spec['kind']}_{spec['beta']}_{spec['seed']}.yaml"
    cli, _, metrics, seconds = train_and_test(config, path, REPO / "runs" / "benchmarks" / "geco_vs_beta")
    test = {k.removeprefix("val/"): v for k, v in metrics.items()}
    return {
        **{k: spec[k] for k in ("dataset", "kind", "beta", "tolerance", "seed", "max_steps")},
        "test": {k: test.get(k) for k in ("distortion", "rate", "marginal_kl", "mutual_info")},
        "lambda": float(cli.model.objective.lagrange_multiplier[0]) if spec["kind"] == "geco" else None,
        "seconds": round(seconds, 1),
    }


def sweep_at(sweep: list[tuple[float, float]], distortion: float) -> float | None:
    """The beta sweep's curve at ``distortion``: the quadratic in log distortion through the two
    sweep points around it and the nearer of their outer neighbours; None outside the sweep (no
    extrapolation) or with fewer than two distinct distortions.

    A beta-VAE's rate (nats) falls convexly as its distortion grows, also in log distortion; the
    chord between the two neighbouring betas lies above that curve and would flatter GECO, a
    quadratic through three follows the bend. Both neighbours are always among the three, so the
    curve is read between them; with two points it is the chord. Points of equal distortion are
    averaged.

    Args:
        sweep: ``(distortion, value)`` of each beta-VAE of one seed (distortion per-element MSE,
            value the rate or marginal KL in nats), any order.
        distortion: where to read the curve, per-element MSE.
    """
    values: dict[float, list[float]] = {}
    for d, v in sweep:
        values.setdefault(math.log(d), []).append(v)
    points = sorted((x, statistics.mean(vs)) for x, vs in values.items())
    x = math.log(distortion)
    if len(points) < 2 or not points[0][0] <= x <= points[-1][0]:
        return None
    left = max(k for k in range(len(points) - 1) if points[k][0] <= x)
    chosen = [left, left + 1]
    outer = [k for k in (left - 1, left + 2) if 0 <= k < len(points)]
    if outer:
        chosen.append(min(outer, key=lambda k: abs(points[k][0] - x)))
    nearest = [points[k] for k in chosen]
    value = 0.0
    for i, (xi, yi) in enumerate(nearest):  # Lagrange's form of the interpolating polynomial
        weight = 1.0
        for j, (xj, _) in enumerate(nearest):
            if j != i:
                weight *= (x - xj) / (xi - xj)
        value += weight * yi
    return value


def _against_sweep(results: list[dict], dataset: str, pairs: list[tuple[dict, dict]], key: str) -> str:
    """GECO's ``key`` less the beta sweep's curve at GECO's own distortion, mean ±sd over the seeds
    where it lies within the sweep (their number when not all); where it lies in none, whether
    GECO's distortion is below or above every beta-VAE's, or the seed has no sweep (yet)."""
    differences, outside = [], []
    for _, geco in pairs:
        sweep = [(r["test"]["distortion"], r["test"][key]) for r in results
                 if r["dataset"] == dataset and r["kind"] == "beta" and r["seed"] == geco["seed"]]
        distortion = geco["test"]["distortion"]
        curve = sweep_at(sweep, distortion)
        if curve is not None:
            differences.append(geco["test"][key] - curve)
        elif len({d for d, _ in sweep}) < 2:
            outside.append("no sweep")
        else:
            outside.append("below the sweep" if distortion < min(d for d, _ in sweep) else "above the sweep")
    if not differences:
        return " / ".join(sorted(set(outside)))
    seeds = f" (n={len(differences)})" if len(differences) < len(pairs) else ""
    return _mean_sd(differences, 1) + seeds


def _mean_sd(values: list[float], digits: int) -> str:
    if not values:
        return ""
    spread = f" ±{statistics.pstdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def table(results: list[dict], datasets: list[str], betas: list[float]) -> str:
    lines = []
    for dataset in datasets:
        lines += [
            f"**{dataset}** (test split; mean ±sd over seeds)",
            "",
            "| beta | beta-VAE distortion | GECO tolerance | GECO distortion | GECO \\|test/tol - 1\\| % | beta-VAE rate | GECO rate "
            "| rate GECO - beta | beta-VAE marginal KL | GECO marginal KL | marginal KL GECO - beta "
            "| rate GECO - sweep at GECO's distortion | marginal KL GECO - sweep at GECO's distortion | seeds |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for beta in betas:
            pairs = []
            for b in [r for r in results if r["dataset"] == dataset and r["kind"] == "beta" and r["beta"] == beta]:
                g = next((r for r in results if r["dataset"] == dataset and r["kind"] == "geco" and r["beta"] == beta
                          and r["seed"] == b["seed"]), None)
                if g is not None:
                    pairs.append((b, g))
            if not pairs:
                continue
            gap = [100 * abs(g["test"]["distortion"] / g["tolerance"] - 1) for _, g in pairs]
            signed = [100 * (g["test"]["distortion"] / g["tolerance"] - 1) for _, g in pairs]
            cells = [
                f"{beta:g}",
                _mean_sd([b["test"]["distortion"] for b, _ in pairs], 5),
                _mean_sd([g["tolerance"] for _, g in pairs], 5),
                _mean_sd([g["test"]["distortion"] for _, g in pairs], 5),
                f"{_mean_sd(gap, 1)} ({statistics.mean(signed):+.1f})",
                _mean_sd([b["test"]["rate"] for b, _ in pairs], 1),
                _mean_sd([g["test"]["rate"] for _, g in pairs], 1),
                _mean_sd([g["test"]["rate"] - b["test"]["rate"] for b, g in pairs], 1),
                _mean_sd([b["test"]["marginal_kl"] for b, _ in pairs], 1),
                _mean_sd([g["test"]["marginal_kl"] for _, g in pairs], 1),
                _mean_sd([g["test"]["marginal_kl"] - b["test"]["marginal_kl"] for b, g in pairs], 1),
                _against_sweep(results, dataset, pairs, "rate"),
                _against_sweep(results, dataset, pairs, "marginal_kl"),
                str(len(pairs)),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    parser.add_argument("--betas", nargs="*", type=float, default=list(BETAS))
    add_run_arguments(parser, "docs/results/geco_vs_beta")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(json.loads(args.one))), flush=True)
        return
    out = Path(args.out)
    log, done = read_log(out)

    def find(dataset: str, kind: str, beta: float, seed: int) -> dict | None:
        return next((r for r in done if (r["dataset"], r["kind"], r["beta"], r["seed"], r["max_steps"])
                     == (dataset, kind, beta, seed, args.max_steps)), None)

    common = {"max_steps": args.max_steps, "data_root": str(Path(args.data_root).resolve()), "out": str(out.resolve())}
    for seed in args.seeds:
        for dataset in args.datasets:
            for beta in args.betas:
                for kind in ("beta", "geco"):
                    if find(dataset, kind, beta, seed) is not None:
                        continue
                    tolerance = None
                    if kind == "geco":
                        matched = find(dataset, "beta", beta, seed)
                        if matched is None:
                            continue
                        tolerance = round(matched["test"]["distortion"], 6)
                    spec = {"dataset": dataset, "kind": kind, "beta": beta, "tolerance": tolerance, "seed": seed, **common}
                    result = run_subprocess(__file__, spec, log)
                    if result is None:
                        continue
                    done.append(result)
                    test = result["test"]
                    print(f"{dataset} {kind} beta {beta:g} seed {seed}: distortion {test['distortion']:.5f}"
                          + (f" (tolerance {tolerance:.5f})" if tolerance else "")
                          + f", rate {test['rate']:.1f}, marginal KL {test['marginal_kl']:.1f}, {result['seconds']} s",
                          file=sys.stderr, flush=True)
    text = table([r for r in done if r["max_steps"] == args.max_steps], args.datasets, args.betas)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

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
and spread over seeds). Runs append to ``<out>/runs.jsonl`` and are skipped when already there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from controllers import REPO, run_config

#: dataset -> the controllers.py cell whose config it trains
DATASETS = {"mnist": "mnist_mse", "fashion": "fashion_mse"}
BETAS = (1.0, 2.0, 4.0, 8.0, 16.0)


def config_of(spec: dict) -> dict:
    """A beta-VAE (``spec["beta"]``) or GECO at ``spec["tolerance"]`` on ``spec["dataset"]``."""
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
    import torch
    from torch.utils.data import DataLoader

    from lightning_geco.cli import main

    config = config_of(spec)
    path = Path(spec["out"]) / "configs" / f"{spec['dataset']}_{spec['kind']}_{spec['beta']}_{spec['seed']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = REPO / "runs" / "benchmarks" / "geco_vs_beta"
    cli = main(["--config", str(path), "--trainer.default_root_dir", str(root)], run=False)
    start = time.monotonic()
    cli.trainer.fit(cli.model, cli.datamodule)
    seconds = time.monotonic() - start
    test_module = type(cli.datamodule)(**{**config["data"]["init_args"], "source": "test", "num_calibration": 0})
    cli.trainer.validate(cli.model, dataloaders=DataLoader(test_module.load(), batch_size=500), verbose=False)
    test = {k.removeprefix("val/"): float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    return {
        **{k: spec[k] for k in ("dataset", "kind", "beta", "tolerance", "seed", "max_steps")},
        "test": {k: test.get(k) for k in ("distortion", "rate", "marginal_kl", "mutual_info")},
        "lambda": float(cli.model.objective.lagrange_multiplier[0]) if spec["kind"] == "geco" else None,
        "seconds": round(seconds, 1),
    }


def _run(spec: dict) -> dict | None:
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"FAILED {spec}:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT "):])


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
            "| rate GECO - beta | beta-VAE marginal KL | GECO marginal KL | marginal KL GECO - beta | seeds |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
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
                str(len(pairs)),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--betas", nargs="*", type=float, default=list(BETAS))
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default="docs/results/geco_vs_beta")
    parser.add_argument("--one", help="(internal) run one spec given as JSON and print its result")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(json.loads(args.one))), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

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
                    result = _run(spec)
                    if result is None:
                        continue
                    with open(log, "a") as handle:
                        handle.write(json.dumps(result) + "\n")
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

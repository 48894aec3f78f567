"""GECO vs the ELBO vs a beta-VAE sweep, same architecture: the figures of docs/RESULTS.md.

    python benchmarks/results.py --data-root ../shared/data --source test --out docs/results
    python benchmarks/results.py --config configs/default.yaml --out docs/results/shapes

Trains the ConvVAE of ``--config`` (default: ``configs/mnist_convvae_geco.yaml``; its data
read from ``--data-root`` when given) once with GECO and once per baseline
(the ELBO, i.e. beta = 1, and beta-VAEs with the config's Gaussian likelihood, sigma = 0.1),
each in its own process through ``train.py``, then runs ``lightning_geco.compare`` over all of
them: ``comparison.md`` / ``.csv``, ``rate_distortion.png``, ``metrics.png``, ``curves.png``.
A Gaussian likelihood with sigma = 0.1 weighs the squared error by 1 / (2 sigma^2) = 50, so a
beta-VAE at beta is GECO at a fixed lambda = 50 / beta: the sweep brackets GECO's lambda.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from lightning_geco.compare import main as compare
from runs import REPO, train

BETAS = (1.0, 2.0, 4.0, 8.0, 16.0)


def baseline_config(config: dict, beta: float) -> dict:
    config = yaml.safe_load(yaml.safe_dump(config))
    callbacks = config["trainer"]["callbacks"]
    config["trainer"]["callbacks"] = [c for c in callbacks if not c["class_path"].endswith("GECOCallback")]
    objective = {"class_path": "lightning_geco.ELBO"} if beta == 1.0 else {
        "class_path": "lightning_geco.BetaVAE", "init_args": {"beta": beta}}
    config["model"]["init_args"]["objective"] = objective
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "mnist_convvae_geco.yaml"))
    parser.add_argument("--data-root", help="the data's root folder, for configs that read files")
    parser.add_argument("--source", default="train")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args()
    config = Path(args.config)
    base = yaml.safe_load(config.read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [train(config, args.data_root, args.source)]
    print(f"geco: {runs[-1]}", file=sys.stderr)
    for beta in BETAS:
        path = out / f"{config.stem.split('_')[0]}_beta{beta:g}.yaml"
        path.write_text(yaml.safe_dump(baseline_config(base, beta)))
        runs.append(train(path, args.data_root, args.source))
        print(f"beta {beta:g}: {runs[-1]}", file=sys.stderr)
    names = ["GECO"] + ["ELBO (beta 1)" if b == 1.0 else f"beta {b:g}" for b in BETAS]
    compare([str(r) for r in runs] + ["--out", str(out), "--names", *names])


if __name__ == "__main__":
    main()

"""Running configs through train.py for the benchmark scripts: one process per run, as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def reads_files(config: dict) -> bool:
    """Whether a config's DataModule reads dataset files (and so takes ``--data.root``)."""
    return "root" in config.get("data", {}).get("init_args", {})


def train(config_path: Path, data_root: str | None = None, source: str = "train") -> Path:
    """Run ``train.py fit`` on a config; returns the W&B run folder (summary.json is in its files/)."""
    command = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(config_path),
               "--trainer.enable_progress_bar", "false"]
    if data_root and reads_files(yaml.safe_load(Path(config_path).read_text())):
        command += ["--data.init_args.root", data_root, "--data.init_args.source", source]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    summary = Path(out.strip().splitlines()[-1])
    return summary.parent.parent


def summary_of(run: Path) -> dict:
    return json.loads((run / "files" / "summary.json").read_text())


def with_tolerance(config: dict, tolerance: float) -> dict:
    """A copy of a single-constraint GECO config with another tolerance."""
    config = yaml.safe_load(yaml.safe_dump(config))
    (constraint,) = config["model"]["init_args"]["objective"]["init_args"]["constraints"]
    constraint["init_args"]["tolerance"] = tolerance
    return config


KEEP = object()  # "leave this setting as the config has it"


def geco_settings(callback: dict) -> dict:
    """A config's GECOCallback settings: what it states, over GECOCallback's defaults."""
    import inspect

    from lightning_geco import GECOCallback

    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(GECOCallback).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    return {**defaults, **callback.get("init_args", {})}


def with_geco_settings(config: dict, **settings) -> dict:
    """A copy of a GECO config with some of the callback's init_args replaced (KEEP: left as is)."""
    config = yaml.safe_load(yaml.safe_dump(config))
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("GECOCallback"):
            callback.setdefault("init_args", {}).update({k: v for k, v in settings.items() if v is not KEEP})
    return config

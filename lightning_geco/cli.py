"""The LightningCLI behind ``train.py``: W&B by default, the data's image shape linked to the model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import lazy_instance
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger

from datamodules.base import ImageDataModule
from lightning_geco.summary import RunSummary, run_directory

__all__ = ["GECOLightningCLI", "SaveConfigToRun", "main"]


class SaveConfigToRun(SaveConfigCallback):
    """Saves the run's full config as ``config.yaml`` in the run's own folder and logs it as hyperparameters."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            directory = run_directory(trainer)
            directory.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, directory / "config.yaml", skip_none=False, overwrite=True, multifile=False)
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


class GECOLightningCLI(LightningCLI):
    """LightningCLI for the collection; every run ends with ``summary.json`` and prints its path last."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(
            "data", "model.init_args.image_shape", compute_fn=lambda data: list(data.image_shape), apply_on="instantiate"
        )

    def after_fit(self) -> None:
        summary = next(c for c in self.trainer.callbacks if isinstance(c, RunSummary))
        if not self.trainer.is_global_zero:
            return
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                run_dir = Path(logger.experiment.dir).parent
                logger.experiment.finish()
                print(f"W&B run ({os.environ.get('WANDB_MODE', 'online')}): {run_dir}")
        print(summary.path, flush=True)


def main(args: list[str] | None = None, **kwargs: Any) -> GECOLightningCLI:
    """Run the CLI (``args=None`` reads ``sys.argv``); W&B logs offline unless WANDB_MODE says otherwise."""
    os.environ.setdefault("WANDB_MODE", "offline")
    return GECOLightningCLI(
        # Any LightningModule: the VAEs, and the classifier the classification constraint reads.
        LightningModule,
        ImageDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveConfigToRun,
        save_config_kwargs={"save_to_log_dir": False},
        trainer_defaults={
            # Absolute: W&B's service process keeps the working directory of the first run in
            # this process and would resolve a relative folder against that.
            "logger": lazy_instance(WandbLogger, project="lightning_geco", save_dir=os.path.abspath("runs")),
            "callbacks": [RunSummary()],
        },
        args=args,
        **kwargs,
    )

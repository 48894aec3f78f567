import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Every test writes its runs, checkpoints and W&B files under its own tmp folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    # pl.seed_everything records its seed in the environment, and Lightning's DDP processes
    # reseed from it at setup: one test's seed leaked into a later test's 2-rank run (its
    # trajectory then left the single process's). Each test starts without, and leaves none.
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.delenv(name, raising=False)

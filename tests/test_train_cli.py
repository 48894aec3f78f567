"""train.py end to end: every config runs a few steps, writes summary.json, logs to W&B offline."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import yaml
from PIL import Image

from datamodules.dsprites import FILE_NAME
from helpers import make_celeba, make_cifar, make_dsprites, make_mnist
from lightning_geco.cli import main
from lightning_geco.compare import main as compare_main
from lightning_geco.wandb_records import read_history

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
EXPECTED_KEYS = {
    "train/distortion",
    "train/rate",
    "train/elbo",
    "train/loss",
    "geco/lambda",
    "geco/constraint",
    "geco/constraint_ema",
    "val/distortion",
    "val/rate",
    "val/marginal_kl",
    "val/mutual_info",
    "val/total_correlation",
    "val/dimensionwise_kl",
    "val/active_units",
    "val/kl_dim/0",
    "val/iwae",
}
# configs named <dataset>_<model>_geco_<kind>.yaml: the readings their constraints add
CONSTRAINT_READINGS = {
    "bce": ["bce"],
    "pncc": ["pncc"],
    "classifier": ["class_cross_entropy", "class_accuracy"],
    "features": ["feature_distance"],
}
PANELS = ("val/reconstructions", "val/samples", "val/traversals", "val/rate_distortion")


def _small_data_overrides(config: Path) -> list[str]:
    """Shrink the data of a config so a few steps take seconds; write file fixtures it needs."""
    data_class = yaml.safe_load(config.read_text()).get("data", {}).get("class_path", "")
    if data_class.endswith("ShapesDataModule"):
        return ["--data.init_args.num_train", "128", "--data.init_args.num_val", "64"]
    root = Path.cwd() / "fixture_data"
    if data_class.endswith("MNISTDataModule"):
        folder = "FashionMNIST" if "Fashion" in data_class else "MNIST"
        make_mnist(root / folder / "raw", 96, "train", gzipped=True)
        return ["--data.init_args.root", str(root), "--data.init_args.num_val", "32"]
    if data_class.endswith("CIFAR10DataModule"):
        make_cifar(root / "cifar-10-batches-py", per_batch=20)
        return ["--data.init_args.root", str(root), "--data.init_args.num_val", "36"]
    if data_class.endswith("DSpritesDataModule"):
        make_dsprites(root / "dsprites" / FILE_NAME, n=96)
        return ["--data.init_args.root", str(root), "--data.init_args.num_val", "32"]
    if data_class.endswith("CelebADataModule"):
        make_celeba(root / "celeba", partitions=[0] * 64 + [1] * 32)
        return ["--data.init_args.root", str(root), "--data.init_args.num_workers", "0"]
    raise AssertionError(f"{config.name}: add a small-data fixture for {data_class} to this test")


def _fit(config: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(config),
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "2",
        "--data.init_args.batch_size",
        "16",
        *_small_data_overrides(config),
        *extra,
    ]


QUICK = ("--trainer.logger", "false", "--trainer.num_sanity_val_steps", "0", "--trainer.val_check_interval", "4")


def _train_the_classifiers_it_reads(config: Path) -> None:
    """Configs whose constraints read a frozen classifier need its checkpoint: train it (4 steps)."""
    for name in re.findall(r"checkpoint: runs/checkpoints/(\w+)/last.ckpt", config.read_text()):
        main(_fit(REPO / "configs" / f"{name}.yaml", *QUICK))
        assert (Path("runs") / "checkpoints" / name / "last.ckpt").is_file()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_runs_a_few_steps_and_writes_its_summary(config, capsys):
    # No W&B and one validation here (each costs seconds per config; the W&B and panel tests
    # below cover them on the default config).
    _train_the_classifiers_it_reads(config)
    cli = main(_fit(config, *QUICK))
    assert cli.trainer.global_step == 4
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(Path(last_line).read_text())
    assert summary["global_step"] == 4
    if "classifier" in config.stem and "geco" not in config.stem:
        assert 0 <= summary["accuracy"] <= 1 and summary["loss"] > 0
        return
    for key in ("distortion", "rate", "marginal_kl", "mutual_info", "wall_clock_seconds"):
        assert isinstance(summary[key], float)
    if "geco" in config.stem or config.stem == "default":
        assert isinstance(summary["satisfied"], bool)
        lam = summary["lambda"] if isinstance(summary["lambda"], dict) else {"": summary["lambda"]}
        assert all(value > 0 for value in lam.values())
        # Each constraint names its reading and how far past the tolerance it ended, relative to it.
        per_constraint = lambda key: summary[key] if isinstance(summary[key], dict) else {"": summary[key]}  # noqa: E731
        readings, tolerance, violation = (per_constraint(k) for k in ("reading", "tolerance", "relative_violation"))
        assert summary["satisfied"] == all(v <= 0 for v in violation.values())
        for name, reading in readings.items():
            if reading != "pncc":  # pNCC is "at least": its violation runs the other way
                assert violation[name] == pytest.approx((summary[reading] - tolerance[name]) / tolerance[name])
    # Every constraint's reading is in the summary beside the distortion.
    for reading in CONSTRAINT_READINGS.get(config.stem.split("_")[-1], []):
        assert isinstance(summary[reading], float), reading


@pytest.mark.timeout(180)
def test_default_run_logs_every_metric_and_image_to_an_offline_wandb_run(capsys):
    cli = main(_fit(REPO / "configs" / "default.yaml"))
    out = capsys.readouterr().out.strip().splitlines()
    summary_path = Path(out[-1])
    run_dir = summary_path.parent.parent
    assert run_dir.name.startswith("offline-run-")
    assert any(line.startswith("W&B run (offline): ") for line in out)
    history = read_history(run_dir)
    logged = set().union(*history)
    assert EXPECTED_KEYS <= logged
    for panel in PANELS:
        assert any(key.startswith(panel + "/") for key in logged), panel
    for panel in (p.split("/")[1] for p in PANELS):
        pngs = list((summary_path.parent / "media" / "images" / "val").glob(f"{panel}_*.png"))
        assert len(pngs) == 2  # one per validation (steps 2 and 4)
        for png in pngs:
            pixels = numpy.asarray(Image.open(png).convert("L"))
            assert pixels.max() == 255, f"{png.name} is blank"  # at least the white grid lines
    assert (summary_path.parent / "config.yaml").exists()
    summary = json.loads(summary_path.read_text())
    assert summary["tolerance"] == pytest.approx(0.01) or summary["tolerance"] > 0
    assert summary["lambda"] == pytest.approx(cli.trainer.callback_metrics["geco/lambda"].item())


def test_image_shape_comes_from_the_data_and_cannot_be_repeated_in_the_config():
    cli = main(_fit(REPO / "configs" / "default.yaml", "--data.init_args.image_size", "32"))
    assert cli.model.image_shape == (1, 32, 32)


def test_other_loggers_get_the_same_scalars(tmp_path):
    cli = main(_fit(REPO / "configs" / "default.yaml", "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path)))
    (metrics_csv,) = Path(cli.trainer.logger.log_dir).glob("metrics.csv")
    header = metrics_csv.read_text().splitlines()[0].split(",")
    assert EXPECTED_KEYS <= set(header)


def test_compare_command_turns_runs_into_a_table_and_plots(tmp_path, capsys):
    summaries = []
    for tolerance in ("0.05", "0.02"):
        main(_fit(REPO / "configs" / "default.yaml", "--model.init_args.objective.init_args.constraints.init_args.tolerance", tolerance))
        summaries.append(Path(capsys.readouterr().out.strip().splitlines()[-1]))
    run_dir = summaries[0].parent.parent
    written = compare_main([str(run_dir), str(summaries[1]), "--out", str(tmp_path / "cmp")])
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert run_dir.name in table and summaries[1].parent.parent.name in table
    assert "| 0.05 |" in table and "| 0.02 |" in table
    for png in (p for p in written if p.suffix == ".png"):
        image = Image.open(png)
        assert image.size[0] > 300 and numpy.asarray(image.convert("L")).std() > 5, png
    assert {p.name for p in written} >= {"rate_distortion.png", "metrics.png", "curves.png", "comparison.csv"}
    compare_main([str(run_dir), str(summaries[1]), "--out", str(tmp_path / "named"), "--names", "loose", "tight"])
    named = (tmp_path / "named" / "comparison.md").read_text()
    assert "| loose | " in named and "| tight | " in named
    with pytest.raises(SystemExit):
        compare_main([str(run_dir), "--out", str(tmp_path / "bad"), "--names", "a", "b"])


@pytest.mark.timeout(300)
def test_two_process_ddp_run_through_train_py_logs_to_wandb_and_writes_one_summary(tmp_path):
    command = [
        sys.executable, str(REPO / "train.py"), *_fit(REPO / "configs" / "default.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.enable_progress_bar", "false",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary_path = Path(proc.stdout.strip().splitlines()[-1])
    summary = json.loads(summary_path.read_text())
    assert summary["global_step"] == 4 and summary["lambda"] > 0
    assert len(list((tmp_path / "runs" / "wandb").glob("offline-run-*"))) == 1
    assert {"geco/lambda", "val/marginal_kl"} <= set().union(*read_history(summary_path.parent.parent))

"""Checkpoints: GECO state saved and restored; N + N steps equal 2N uninterrupted steps."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from geco_run import run
from helpers import assert_same_parameters
from lightning_geco import GECOCallback, NonFiniteConstraintError

REPO = Path(__file__).resolve().parents[1]


def _rows(out):
    return json.loads((Path(out) / "rank0.json").read_text())


@pytest.mark.timeout(120)
def test_checkpoint_holds_the_geco_state_with_its_tolerance(tmp_path):
    run(tmp_path / "a", batch_size=64, max_steps=4, ckpt_out=str(tmp_path / "a.ckpt"))
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=False)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("GECOCallback")]
    assert set(state["geco"]) >= {"log_lagrange_multiplier", "constraint_ema", "seeded", "num_updates"}
    assert state["geco"]["num_updates"] == 4 and state["geco"]["seeded"] is True
    assert state["constraints"] == [{"name": "reconstruction", "tolerance": 0.05, "unit": "mse"}]


@pytest.mark.timeout(180)
def test_n_plus_n_steps_from_a_checkpoint_equal_2n_uninterrupted_steps(tmp_path):
    n = 5
    run(tmp_path / "full", batch_size=64, max_steps=2 * n, step_indexed=True)
    run(tmp_path / "first", batch_size=64, max_steps=n, ckpt_out=str(tmp_path / "half.ckpt"), step_indexed=True)
    run(tmp_path / "second", batch_size=64, max_steps=2 * n, ckpt_in=str(tmp_path / "half.ckpt"), step_indexed=True)
    full, first, second = _rows(tmp_path / "full"), _rows(tmp_path / "first"), _rows(tmp_path / "second")
    assert len(first) == n and len(second) == n
    resumed = first + second
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for a, b in zip(resumed, full):
        assert a["log_lambda"] == pytest.approx(b["log_lambda"], rel=1e-6, abs=1e-7)
        assert a["ema"] == pytest.approx(b["ema"], rel=1e-6, abs=1e-7)
        assert a["updates"] == b["updates"]
    assert_same_parameters(tmp_path / "full" / "params.pt", tmp_path / "second" / "params.pt", rtol=1e-6, atol=1e-7)


@pytest.mark.timeout(120)
def test_resuming_with_a_changed_tolerance_warns_naming_both_values(tmp_path):
    run(tmp_path / "a", batch_size=64, max_steps=2, ckpt_out=str(tmp_path / "a.ckpt"))
    with pytest.warns(UserWarning, match=r"tolerance 0.03 mse \(the checkpoint was trained with 0.05 mse\)"):
        run(tmp_path / "b", batch_size=64, max_steps=3, ckpt_in=str(tmp_path / "a.ckpt"), tolerance=0.03)


@pytest.mark.timeout(120)
def test_checkpoint_from_an_incompatible_model_is_rejected(tmp_path):
    run(tmp_path / "a", batch_size=64, max_steps=2, ckpt_out=str(tmp_path / "a.ckpt"))
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=False)
    checkpoint["hyper_parameters"]["latent_dim"] = 7
    torch.save(checkpoint, tmp_path / "b.ckpt")
    with pytest.raises(ValueError, match=r"incompatible model: it was built with latent_dim=7, this model has latent_dim=4"):
        run(tmp_path / "b", batch_size=64, max_steps=3, ckpt_in=str(tmp_path / "b.ckpt"))


@pytest.mark.timeout(120)
def test_bf16_mixed_precision_trains_and_keeps_geco_in_fp32(tmp_path):
    trainer = run(tmp_path / "bf16", batch_size=32, max_steps=5, precision="bf16-mixed")
    geco = next(c for c in trainer.callbacks if isinstance(c, GECOCallback)).geco
    assert geco.num_updates == 5
    assert geco.log_lagrange_multiplier.dtype == torch.float32 == geco.constraint_ema.dtype
    assert geco.pending_statistics().dtype == torch.float32
    assert torch.isfinite(geco.lagrange_multiplier).all()


@pytest.mark.timeout(120)
def test_nan_loss_never_reaches_the_optimizer_state(tmp_path):
    trainer = run(tmp_path / "nan", batch_size=64, max_steps=3, nan_steps=[1])
    rows = _rows(tmp_path / "nan")
    assert [r["skipped"] for r in rows] == [0, 1, 1]
    optimizer = trainer.optimizers[0]
    for state in optimizer.state.values():
        assert state["step"].item() == 2  # the NaN step was not taken
        assert torch.isfinite(state["exp_avg"]).all() and torch.isfinite(state["exp_avg_sq"]).all()


@pytest.mark.timeout(120)
def test_consecutive_non_finite_steps_stop_training_with_a_clear_error(tmp_path):
    with pytest.raises(NonFiniteConstraintError, match=r"non-finite constraint or loss on 3 consecutive optimizer steps"):
        run(tmp_path / "nan", batch_size=32, max_steps=10, nan_steps=range(1, 10), max_nonfinite_steps=3)
    assert [r["skipped"] for r in _rows(tmp_path / "nan")] == [0, 1, 2]


@pytest.mark.timeout(300)
def test_a_run_killed_with_sigkill_continues_from_its_last_checkpoint(tmp_path):
    config = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    checkpoints = tmp_path / "checkpoints"
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"].update(dirpath=str(checkpoints), every_n_train_steps=5, save_last=True)
    config["trainer"].update(val_check_interval=1000, limit_val_batches=1, enable_progress_bar=False)
    config["data"]["init_args"].update(num_train=512, num_val=64, image_size=32, batch_size=16)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(tmp_path / "config.yaml")]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}

    victim = subprocess.Popen([*command, "--trainer.max_steps", "100000"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (checkpoints / "last.ckpt").exists():
        time.sleep(0.1)
    time.sleep(1.0)  # let it train on past the checkpoint, so the kill loses work
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert (checkpoints / "last.ckpt").exists(), "no checkpoint was written before the kill"
    saved_step = torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"]
    assert saved_step >= 5

    proc = subprocess.run([*command, "--trainer.max_steps", str(saved_step + 5), "--ckpt_path", "last"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / proc.stdout.strip().splitlines()[-1]).read_text())
    assert summary["global_step"] == saved_step + 5  # 5 more steps, not a fresh start
    resumed = torch.load(checkpoints / "last.ckpt", weights_only=False)
    (state,) = [v for k, v in resumed["callbacks"].items() if k.startswith("GECOCallback")]
    assert state["geco"]["num_updates"] == saved_step + 5  # lambda's history continued too

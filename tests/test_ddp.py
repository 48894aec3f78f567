"""GECO across 2 DDP ranks (gloo, CPU), against a single process with the same global batch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from geco_run import run
from helpers import assert_same_parameters
from lightning_geco.metrics import compiler_available

SCRIPT = Path(__file__).with_name("geco_run.py")


def _ddp(out: Path, *args: str) -> list[list[dict]]:
    command = [sys.executable, str(SCRIPT), "--devices", "2", "--out", str(out), *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _single(out: Path, **kwargs) -> list[dict]:
    run(out, devices=1, **kwargs)
    return json.loads((out / "rank0.json").read_text())


def _log_lambda(rows):
    return torch.tensor([row["log_lambda"] for row in rows])


@pytest.mark.timeout(300)
def test_two_ranks_hold_identical_lambda_and_follow_the_single_process_trajectory(tmp_path):
    # With RunSummary and no logger: rank 0 alone finds the run folder, which must not be a
    # collective (trainer.log_dir broadcasts: the fit hung there, or crashed once rank 1 left).
    rank0, rank1 = _ddp(tmp_path / "ddp", "--batch-size", "8", "--max-steps", "12", "--summary")
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["global_step"] == 12
    # Bit-identical state on both ranks at every step, without any broadcast.
    assert rank0 == rank1
    assert [row["updates"] for row in rank0] == list(range(1, 13))
    single = _single(tmp_path / "single", batch_size=16, max_steps=12)
    torch.testing.assert_close(_log_lambda(rank0), _log_lambda(single), rtol=1e-4, atol=1e-5)
    assert _log_lambda(rank0).abs().max() > 0.05  # lambda really moved
    assert_same_parameters(tmp_path / "single" / "params.pt", tmp_path / "ddp" / "params.pt", rtol=1e-3, atol=1e-5)


@pytest.mark.timeout(300)
def test_ddp_with_gradient_accumulation_matches_one_process_with_the_whole_batch(tmp_path):
    rank0, rank1 = _ddp(tmp_path / "ddp", "--batch-size", "4", "--accumulate", "2", "--max-steps", "6")
    assert rank0 == rank1
    assert [row["updates"] for row in rank0][1::2] == list(range(1, 7))  # once per optimizer step
    single = _single(tmp_path / "single", batch_size=16, max_steps=6)
    torch.testing.assert_close(_log_lambda(rank0)[1::2], _log_lambda(single), rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(300)
def test_nan_on_one_rank_skips_the_update_on_both_ranks_together(tmp_path):
    rank0, rank1 = _ddp(tmp_path / "ddp", "--batch-size", "8", "--max-steps", "6", "--nan-at-step", "3", "--nan-rank", "1")
    assert rank0 == rank1
    assert [row["skipped"] for row in rank0] == [0, 0, 0, 1, 1, 1]
    assert rank0[3]["log_lambda"] == rank0[2]["log_lambda"]
    assert rank0[4]["log_lambda"] != rank0[3]["log_lambda"]
    params = torch.load(tmp_path / "ddp" / "params.pt")
    assert all(torch.isfinite(v).all() for v in params.values() if v.is_floating_point())


@pytest.mark.timeout(300)
def test_a_rank_whose_batch_skips_the_objective_still_joins_the_update(tmp_path):
    # Rank 1 trains step 3 on a loss of its own: it skipped GECO's collective while rank 0 waited
    # in it, and the run hung. It now adds no examples: the update reads rank 0's alone.
    rank0, rank1 = _ddp(tmp_path / "ddp", "--batch-size", "8", "--max-steps", "6", "--own-loss-at-step", "3")
    assert rank0 == rank1
    assert [row["updates"] for row in rank0] == list(range(1, 7)) and rank0[-1]["skipped"] == 0
    assert rank0[3]["log_lambda"] != rank0[2]["log_lambda"]
    # On the first batch too: the objective's first call checked the data in a collective of its
    # own, which rank 1's DDP gradient all-reduce met instead (gloo aborted the run).
    rank0, rank1 = _ddp(tmp_path / "first", "--batch-size", "8", "--max-steps", "4", "--own-loss-at-step", "0")
    assert rank0 == rank1 and [row["updates"] for row in rank0] == list(range(1, 5))


@pytest.mark.timeout(300)
@pytest.mark.skipif(not compiler_available("cpu"), reason="torch.compile needs a C++ compiler on the CPU")
def test_a_compiled_geco_on_two_ranks_stays_identical_skips_together_and_follows_the_eager_run(tmp_path):
    # The calibration drive, so the compiled control() runs too; a NaN on rank 1 at step 4.
    args = ("--batch-size", "8", "--max-steps", "8", "--calibration", "--nan-at-step", "4", "--nan-rank", "1")
    compiled = _ddp(tmp_path / "compiled", *args, "--compile")
    eager = _ddp(tmp_path / "eager", *args)
    assert compiled[0] == compiled[1]
    assert [row["skipped"] for row in compiled[0]] == [row["skipped"] for row in eager[0]] == [0] * 4 + [1] * 4
    torch.testing.assert_close(_log_lambda(compiled[0]), _log_lambda(eager[0]), rtol=1e-4, atol=1e-6)
    assert _log_lambda(compiled[0]).abs().max() > 0.01  # lambda really moved


@pytest.mark.timeout(300)
def test_the_resumable_sampler_shares_each_global_batch_over_the_ranks_as_one_process_sees_it(tmp_path):
    # Lightning leaves a DistributedSampler subclass in place under DDP (it would wrap any other
    # sampler and hand each rank a different subset than one process with the global batch sees).
    rank0, rank1 = _ddp(tmp_path / "ddp", "--batch-size", "8", "--max-steps", "12", "--resumable-sampler")
    assert rank0 == rank1
    single = _single(tmp_path / "single", batch_size=16, max_steps=12, resumable_sampler=True)
    torch.testing.assert_close(_log_lambda(rank0), _log_lambda(single), rtol=1e-4, atol=1e-5)
    assert_same_parameters(tmp_path / "single" / "params.pt", tmp_path / "ddp" / "params.pt", rtol=1e-3, atol=1e-5)


@pytest.mark.timeout(300)
def test_a_two_rank_run_resumed_from_its_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path):
    # Each rank's generators (RandomState) and the global batches (ResumableSampler) come back, so
    # rank 1 draws its own noise again; it crashed restoring a state saved as a view of the gather.
    common = ("--batch-size", "8", "--resumable-sampler", "--random-state", "--max-steps", "8")
    whole = _ddp(tmp_path / "whole", *common, "--ckpt-every", "4")  # writes its step-4 checkpoint on the way
    (half,) = (tmp_path / "whole" / "checkpoints").glob("*step=4.ckpt")
    second = _ddp(tmp_path / "second", *common, "--ckpt-in", str(half))
    for rank in (0, 1):
        assert second[rank] == whole[rank][4:]
    assert_same_parameters(tmp_path / "whole" / "params.pt", tmp_path / "second" / "params.pt", rtol=0, atol=0)


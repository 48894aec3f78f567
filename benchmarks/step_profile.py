"""Where GECO's per-step cost goes: host time and tensor ops of its objective and its callback.

    python benchmarks/step_profile.py [--device cuda] [--steps 200] [--batch-size 256] [--image-size 64] [--rounds 5]
        [--variants elbo geco_relative geco_pi geco_pi_compiled]

Trains the benchmarked ConvVAE (as ``benchmarks/gpu.py``: shapes held on the device, no logger,
no validation) with the ELBO (row ``elbo``), with GECO's previous default ``relative`` (row
``geco_relative``), with its PI controller, the default (row ``geco_pi``), and with the PI controller's
per-step work compiled (``GECOCallback(compile=True)``, row ``geco_pi_compiled``), and prints
one table: wall-clock ms per optimizer step (the device synchronised at the ends of the timed
window only), the host ms per step spent inside the objective's forward and inside
``GECOCallback.on_before_optimizer_step``, and the operations each issues per step, counted in
a separate short run with the profiler (top-level events: one per tensor op dispatched, one per
call into a compiled function) on steps that do not log; then, in another short run, what the
whole step dispatches (forward, backward, optimizer and hooks: the ops GECO adds outside its
objective and callback show as the difference to the ELBO's row) and, on CUDA, the kernels and
copies the device runs per step and the ms it is busy with them (where the device's busy time
nears the step time, the step is no longer bound by the host). Last, each GECO row's own host work
(its objective beyond the ELBO's, and its callback) as a share of the ELBO's step time: a
figure that the step times' ratio, the difference of two noisy totals, cannot resolve here. The first calls of every run are left
out of both (a compiled function compiles at its first call). On a GPU a step bound by the host's Python work pays for
every small op it launches; the op counts say how many GECO adds. Runs from the repository
root without installing the package.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The profiler's own log lines (a start and a stop per counted call) would bury the table.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from lightning_geco import ELBO, ConvVAE, GECOCallback, GECOObjective, ReconstructionMSE  # noqa: E402
from lightning_geco.batches import batch_images  # noqa: E402
from lightning_geco.callbacks import is_logging_step  # noqa: E402


class Probe:
    """Host seconds and (optionally) operations of every call to one method, summed.

    Operations are counted with the profiler: the top-level events inside each call, one per
    tensor op the host dispatches (``aten::isfinite`` is one, whatever it runs underneath) and
    one per call into a ``torch.compile``-built function (what a GPU would see as launches).
    """

    def __init__(self, count_ops: bool, warmup: int = 0, counted: int | None = None) -> None:
        self.warmup = warmup  # calls not timed (a compiled function compiles at its first)
        self.counted = counted  # calls measured after the warm-up (None: all)
        self.seconds = 0.0
        self.logging_seconds = 0.0  # of it, in calls at steps that log (the callback's, args[0] the Trainer)
        self.ops = 0
        self.calls = 0
        self.count_ops = count_ops

    def wrap(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def probed(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls <= self.warmup or (self.counted is not None and self.calls > self.warmup + self.counted):
                return method(*args, **kwargs)
            if self.count_ops:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                    result = method(*args, **kwargs)
                # Dynamo's guard check before a compiled call is host work, not an op.
                top = [e.name for e in profile.events() if e.cpu_parent is None and e.name != "TorchDynamo Cache Lookup"]
                self.ops += len(top)
                return result
            logging = bool(args) and isinstance(args[0], pl.Trainer) and is_logging_step(args[0])
            start = time.perf_counter()
            result = method(*args, **kwargs)
            took = time.perf_counter() - start
            self.seconds += took
            self.logging_seconds += took if logging else 0.0
            return result

        return probed


# Steps of the op-counting run before counting starts (a compiled function compiles at its first call).
_OP_WARMUP = 2


class WholeStepProfile(pl.Callback):
    """What whole training steps dispatch, from this callback's ``on_train_batch_start`` to its
    ``on_train_batch_end`` (forward, backward, the optimizer and the hooks between; not the data
    loader's fetch, nor hooks that run before this callback's at the batch's start), over
    ``steps`` steps after ``first``: tensor ops the host dispatches (``aten::`` events not inside
    another, so a fused kernel's own calls count once), and, on CUDA, the device's kernels and
    copies and their summed duration (ms; what the device is busy with, whatever the host does).
    """

    def __init__(self, first: int, steps: int, device: str) -> None:
        self.first, self.steps, self.device = first, steps, device
        self.profile: torch.profiler.profile | None = None
        self.host_ops = 0
        self.device_events = 0
        self.device_us = 0.0
        self.profiled = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.first <= trainer.global_step < self.first + self.steps:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()  # the kernels of earlier steps stay out
            self.profile = torch.profiler.profile(activities=activities)
            self.profile.__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.profile is None:
            return
        if self.device == "cuda":
            torch.cuda.synchronize()  # this step's kernels all recorded
        self.profile.__exit__(None, None, None)
        for event in self.profile.events():
            # A user annotation (e.g. Optimizer.step, which holds Lightning's whole closure) also
            # has a device span; torch's own totals leave those out, and so does this one.
            on_device = event.device_type == torch.autograd.DeviceType.CUDA
            if on_device and not getattr(event, "is_user_annotation", False):
                self.device_events += 1
                self.device_us += event.time_range.elapsed_us()
            elif not on_device and event.name.startswith("aten::") and not _inside_an_op(event):
                self.host_ops += 1
        self.profile = None
        self.profiled += 1


def _inside_an_op(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


class StepClock(pl.Callback):
    """Wall-clock seconds of the optimizer steps after ``warmup``, device synchronised at both ends."""

    def __init__(self, warmup: int, device: str) -> None:
        self.warmup, self.device = warmup, device
        self.start: float | None = None
        self.seconds = 0.0
        self.steps = 0

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            self._sync()
            self.start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync()
        if self.start is not None:
            self.seconds = time.perf_counter() - self.start
            self.steps = trainer.global_step - self.warmup


def bare_trainer(device: str, max_steps: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    """A Trainer with nothing but the training loop: no logger, checkpoints, bars or validation."""
    return pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=max_steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=callbacks,
    )


def loader(args: argparse.Namespace) -> torch.utils.data.DataLoader:
    from datamodules.shapes import ShapesDataModule

    data = ShapesDataModule(
        image_size=args.image_size, num_train=args.batch_size * 16, num_val=args.batch_size,
        batch_size=args.batch_size, device=args.device,
    )
    data.setup("fit")
    return data.train_dataloader()


def build(args: argparse.Namespace, variant: str) -> tuple[ConvVAE, ELBO | GECOObjective, GECOCallback | None]:
    """The benchmarked ConvVAE of ``variant``, seeded, its objective, and its GECOCallback (None for the ELBO)."""
    torch.manual_seed(0)
    objective = ELBO() if variant == "elbo" else GECOObjective([ReconstructionMSE(0.005)])
    model = ConvVAE(image_shape=(1, args.image_size, args.image_size), objective=objective)
    if variant == "elbo":
        return model, objective, None
    callback = GECOCallback(
        controller="relative" if variant == "geco_relative" else "pi", compile=variant == "geco_pi_compiled"
    )
    return model, objective, callback


def whole_steps(args: argparse.Namespace, data: torch.utils.data.DataLoader, variant: str) -> dict[str, float]:
    """Per step of ``variant``: host ops of the whole step, and on CUDA device events and busy ms
    (:class:`WholeStepProfile`, its own short run: torch's profiler does not nest in the probes')."""
    model, _, geco = build(args, variant)
    profile = WholeStepProfile(_OP_WARMUP, args.op_steps, args.device)
    callbacks: list[pl.Callback] = [profile] if geco is None else [geco, profile]
    # The run's last step logs (is_logging_step), so it is left out, as in the op count.
    bare_trainer(args.device, _OP_WARMUP + args.op_steps + 1, callbacks).fit(model, train_dataloaders=data)
    steps = max(1, profile.profiled)
    return {
        "step_ops": profile.host_ops / steps,
        "device_events": profile.device_events / steps,
        "device_ms": 1e-3 * profile.device_us / steps,
    }


def run(args: argparse.Namespace, data: torch.utils.data.DataLoader, variant: str, count_ops: bool) -> dict[str, float]:
    model, objective, geco = build(args, variant)
    warmup = _OP_WARMUP if count_ops else args.warmup
    # The op count leaves out the run's last step, which logs (is_logging_step).
    counted = args.op_steps if count_ops else None
    objective_probe, callback_probe = Probe(count_ops, warmup, counted), Probe(count_ops, warmup, counted)
    objective.forward = objective_probe.wrap(objective.forward)  # type: ignore[method-assign]
    callbacks: list[pl.Callback] = []
    if geco is not None:
        geco.on_before_optimizer_step = callback_probe.wrap(geco.on_before_optimizer_step)  # type: ignore[method-assign]
        callbacks.append(geco)
    steps = warmup + (args.op_steps + 1 if count_ops else args.steps)
    clock = StepClock(args.warmup, args.device)
    bare_trainer(args.device, steps, [*callbacks, clock]).fit(model, train_dataloaders=data)
    calls = counted or max(1, objective_probe.calls - warmup)
    return {
        "ms_per_step": 1e3 * clock.seconds / max(1, clock.steps),
        "objective_ms": 1e3 * objective_probe.seconds / calls,
        "callback_ms": 1e3 * callback_probe.seconds / max(1, callback_probe.calls - warmup),
        "callback_logging_ms": 1e3 * callback_probe.logging_seconds / max(1, callback_probe.calls - warmup),
        "objective_ops": objective_probe.ops / calls,
        "callback_ops": callback_probe.ops / (counted or 1),
    }


def warm_host_ms(args: argparse.Namespace, data: torch.utils.data.DataLoader, repeats: int = 200) -> float:
    """Host ms of what the timed rows time for GECO (the objective's forward and the callback's
    ``on_before_optimizer_step``, on a step that does not log) repeated in a tight loop, with
    nothing between the calls to push their code and data out of the caches: the same ops as
    in a training step, without the convolutions around them."""
    model, objective, callback = build(args, "geco_pi")
    assert callback is not None
    trainer = bare_trainer(args.device, 2, [callback])
    trainer.fit(model, train_dataloaders=data)
    # Steps that do not log, as the timed rows' are: neither due nor the run's last.
    # (log_every_n_steps 0: the unlogged host check comes every 50th batch, and the batch count
    # stands still here, at 2.)
    trainer.log_every_n_steps = 0  # type: ignore[attr-defined]  # set by Lightning at init
    trainer.fit_loop.epoch_loop.max_steps = 10**9
    assert not is_logging_step(trainer)
    optimizer = trainer.optimizers[0]
    objective.train()
    output = model(batch_images(next(iter(data))).to(args.device))

    def step() -> None:
        callback.on_train_batch_start(trainer, model, None, 0)  # a new batch, as Lightning says
        objective(output)
        callback.on_before_optimizer_step(trainer, model, optimizer)

    for _ in range(20):
        step()
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        best = min(best, (time.perf_counter() - start) / repeats)
    return 1e3 * best


_VARIANTS = ("elbo", "geco_relative", "geco_pi", "geco_pi_compiled")


def _in_own_process(argv: list[str] | None, one: str) -> dict[str, float]:
    """This script's ``--one`` run in a fresh process: its figures."""
    command = [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv), "--one", one]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 16 on the CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 200 on CUDA, 20 on the CPU)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--op-steps", type=int, default=5, help="steps of the op-counting run")
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="timed runs of every variant, interleaved; each figure is the median over the rounds",
    )
    parser.add_argument(
        "--variants", nargs="+", choices=_VARIANTS, default=list(_VARIANTS),
        help="rows to run (the ELBO, the baseline, always runs first)",
    )
    parser.add_argument("--one", choices=[*_VARIANTS, "warm"], help=argparse.SUPPRESS)  # one timed run, as JSON
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.batch_size = args.batch_size or (256 if cuda else 16)
    args.steps = args.steps or (200 if cuda else 20)
    data = loader(args)
    if args.one is not None:
        timed = {"warm_ms": warm_host_ms(args, data)} if args.one == "warm" else run(args, data, args.one, False)
        print(json.dumps(timed))
        return json.dumps(timed)
    variants = ["elbo", *(v for v in _VARIANTS if v in args.variants and v != "elbo")]
    # Every timed run is its own process: in one process, a compiled run slowed the ELBO's
    # step after it by 23-36 % on this CPU (why is not established).
    # Interleaved rounds: a busy spell of a shared machine slows every variant of one round,
    # not all the rounds of one variant.
    timings: dict[str, list[dict[str, float]]] = {variant: [] for variant in variants}
    for _ in range(args.rounds):
        for variant in variants:
            timings[variant].append(_in_own_process(argv, variant))
    rows = []
    for variant in variants:
        timed = {key: statistics.median(t[key] for t in timings[variant]) for key in timings[variant][0]}
        rows.append((variant, timed, {**run(args, data, variant, count_ops=True), **whole_steps(args, data, variant)}))
    device = torch.cuda.get_device_name() if cuda else "CPU"
    lines = [
        f"ConvVAE {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.steps} timed steps, {device}, "
        f"torch {torch.__version__}, median of {args.rounds} interleaved round(s)",
        "| variant | ms / step | objective host ms | callback host ms | objective ops | callback ops | "
        "ops in the whole step | device kernels and copies | device busy ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, timed, counted in rows:
        device_columns = (f"{counted['device_events']:.0f} | {counted['device_ms']:.3f}" if cuda else "- | -")
        lines.append(
            f"| {variant} | {timed['ms_per_step']:.2f} | {timed['objective_ms']:.3f} | {timed['callback_ms']:.3f} | "
            f"{counted['objective_ops']:.0f} | {counted['callback_ops']:.0f} | {counted['step_ops']:.0f} | "
            f"{device_columns} |"
        )
    elbo, elbo_objective = rows[0][1]["ms_per_step"], rows[0][1]["objective_ms"]
    for variant, timed, _ in rows[1:]:
        lines.append(f"{variant} / elbo step time: {timed['ms_per_step'] / elbo:.3f}")
    # The step times' ratio is the difference of two noisy totals; GECO's own host work, timed
    # where it happens, resolves its share far more finely (the backward through its few extra
    # autograd nodes is not in it).
    for variant, timed, _ in rows[1:]:
        own = timed["objective_ms"] - elbo_objective + timed["callback_ms"]
        logging = timed["callback_logging_ms"]
        lines.append(
            f"{variant}: its own host work {own:.3f} ms per step = {100 * own / elbo:.1f} % of the ELBO's step "
            f"({logging:.3f} ms of it, {100 * logging / elbo:.1f} %, at the steps that log, averaged over all)"
        )
    if not cuda and "geco_pi" in variants:  # on a GPU the loop would time launches, not the work
        warm = _in_own_process(argv, "warm")["warm_ms"]
        pi = next(timed for variant, timed, _ in rows if variant == "geco_pi")
        in_step = pi["objective_ms"] + pi["callback_ms"] - pi["callback_logging_ms"]
        lines.append(
            f"geco_pi: its objective and callback on steps that do not log, {in_step:.3f} ms per training step; "
            f"the same calls in a tight loop {warm:.3f} ms ({in_step / warm:.1f}x less)"
        )
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()

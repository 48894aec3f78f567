"""One GPU benchmark, one markdown table: training throughput, marginal KL, DDP, torch.compile.

    PYTHONUNBUFFERED=1 python benchmarks/gpu.py --out gpu.md     # ~4-6 min on one H100 / H200
    python benchmarks/gpu.py --cpu-smoke --out smoke.md             # every section, tiny, on CPU

The CPU smoke (16x16, batch 8, a few steps, N = 500) takes ~40 s of CPU time on 2 cores and
exists to check that every row runs (``tests/test_gpu_benchmark.py``); its numbers mean nothing.

Runs from the repository root without installing the package (the root goes on ``sys.path``)
and needs neither wandb nor jsonargparse. Every row is guarded: a row that cannot run prints
``failed: <reason>`` or ``skipped: <reason>`` and the table goes on.

Sections (defaults in brackets; ``--cpu-smoke`` shrinks every size, see :data:`SMOKE`):

1. **Training throughput** of ConvVAE (64x64, batch 256) on shapes held on the GPU
   (``ShapesDataModule(device="cuda")``; one DataLoader over the same tensors for all
   variants): a plain PyTorch loop (rate + fixed lambda * squared error, no Lightning), Lightning
   + ELBO, Lightning + GECO (``GECOCallback()``), Lightning + GECO with its per-step update
   compiled (``GECOCallback(compile=True)``) and Lightning + GECO with the model's weights in
   ``torch.channels_last`` (on this project's CPU the decoder's transposed convolutions run
   ~1.2x faster so: does a GPU gain too?), each in fp32 and bf16-mixed. Each run: a fresh
   model, [30] warm-up steps (the compiled update compiles in the first), then [300] timed
   steps; the ten runs are interleaved over [5] rounds (the order rotates each round),
   reported as the median images/s with the min-max over rounds, the GECO/ELBO and GECO/plain
   ratios of each round for the GECO and compiled-update rows, and channels_last / GECO.
2. **Marginal KL**: ``AggregatePosteriorKL.compute`` at N = 50,000, d = 10 on the device: the
   median over repeats after one warm-up call; both ``compile=False`` and ``compile=True`` when
   the class takes a ``compile`` argument.
3. **DDP**: Lightning + GECO, ``strategy="ddp"``, 2 processes (NCCL), batch 256 per GPU, in a
   subprocess; only with 2+ GPUs (the CPU smoke runs it with gloo on 2 CPU processes).
4. **torch.compile** (fp32): the plain loop and Lightning + GECO with the model's forward
   compiled (see :func:`compile_forward`), each beside an eager run of the same shape ([5]
   windows of [300] steps in one run); reported: compiled images/s, compiled / eager, and the
   compile time (the compiled run's warm-up beyond [30] of its steady-state steps). Inductor's
   caches are off, so this is the cold compile a first run pays.

Units and conventions: images/s count every image of every process; the wall clock is read
after ``torch.cuda.synchronize()`` at the ends of the timed window only (not every step, which
would serialise CPU and GPU and hide the overlap a real run gets). Peak memory is
``torch.cuda.max_memory_allocated`` during a run minus what was allocated before it, so it
excludes the dataset (held once, its size is in the header) and includes the model, Adam's
state and the activations; on CPU it is not measured (``n/a``).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import itertools
import json
import logging
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

_START = time.perf_counter()  # the budgets count from here, torch's and Lightning's imports included

# Importable from the repository root without ``pip install`` (the GPU machine has a bare
# checkout); the benchmarks folder for the helpers shared with throughput.py.
REPO = Path(__file__).resolve().parents[1]
for _path in (str(Path(__file__).resolve().parent), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
# A cold compile each time, so the compile time does not depend on what ran before on the machine.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from throughput import build_model, make_objective, plain_loss, sync_device  # noqa: E402

RESULT_TAG = "GPU_BENCHMARK_RESULT "
FP32, BF16 = "fp32", "bf16-mixed"
LIGHTNING_PRECISION = {FP32: "32-true", BF16: "bf16-mixed"}
VARIANTS = ("plain", "elbo", "geco", "geco_compiled", "geco_channels_last")
VARIANT_LABEL = {
    "plain": "plain PyTorch loop",
    "elbo": "Lightning + ELBO",
    "geco": "Lightning + GECO",
    "geco_compiled": "Lightning + GECO, compiled update",
    "geco_channels_last": "Lightning + GECO, channels_last model",
}


@dataclass(frozen=True)
class Sizes:
    """Everything that scales the run; :data:`GPU` and :data:`SMOKE` are the two presets.

    Budgets are wall-clock seconds: a section stops starting new rounds / rows once its own
    budget or the global ``total_budget_s`` is spent (a row in flight always finishes).
    """

    device: str
    image_size: int  # pixels per side
    batch_size: int  # images per step and per process
    num_train: int  # images held on the device
    warmup: int  # untimed steps per run
    steps: int  # timed steps per window
    rounds: int  # interleaved rounds (training) / windows per run (compile, DDP)
    kl_size: int  # N of the marginal KL
    kl_dim: int  # d of the marginal KL
    kl_repeats: int  # timed compute() calls per variant, after one warm-up call
    compile_backend: str
    train_budget_s: float
    kl_budget_s: float  # per marginal-KL variant
    ddp_timeout_s: float
    compile_estimate_s: float  # one eager + compiled pair, before any was measured
    total_budget_s: float


GPU = Sizes(
    device="cuda", image_size=64, batch_size=256, num_train=256 * 64, warmup=30, steps=300, rounds=5,
    kl_size=50_000, kl_dim=10, kl_repeats=3, compile_backend="inductor",
    train_budget_s=150, kl_budget_s=30, ddp_timeout_s=120, compile_estimate_s=90, total_budget_s=390,
)
SMOKE = Sizes(
    device="cpu", image_size=16, batch_size=8, num_train=8 * 16, warmup=2, steps=3, rounds=2,
    kl_size=500, kl_dim=10, kl_repeats=2, compile_backend="eager",
    # The smoke exercises every row whatever the machine's load: no row is skipped for time.
    train_budget_s=600, kl_budget_s=600, ddp_timeout_s=120, compile_estimate_s=0, total_budget_s=600,
)


# ------------------------------------------------------------------ the table
@dataclass
class Row:
    """One line of the table. ``values``: one reading per round (or window); ``status`` replaces
    the numbers when the row did not run ("failed: ..." / "skipped: ...")."""

    benchmark: str
    precision: str
    unit: str
    values: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    note: str = ""
    status: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def cells(self) -> list[str]:
        if self.status is not None or not self.values:
            return [self.benchmark, self.precision, self.status or "failed: no values", self.unit, "-", "-", self.note]
        median = self.median
        if len(self.values) > 1:
            low, high = min(self.values), max(self.values)
            half_range = (high - low) / 2 / abs(median) if median else float("nan")
            spread = f"{_fmt(low)} - {_fmt(high)} (+-{half_range:.1%}, n={len(self.values)})"
        else:
            spread = "n=1"
        peak = "n/a" if self.peak_mib is None else f"{self.peak_mib:.0f}"
        return [self.benchmark, self.precision, _fmt(median), self.unit, spread, peak, self.note]


TABLE_HEADER = ["benchmark", "precision", "median", "unit", "spread (min - max over rounds)", "peak MiB", "note"]


def _fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return f"{value:.3g}"


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def failure(error: BaseException) -> str:
    """``failed: <type>: <first line of the message>``, short and safe inside a table cell."""
    lines = str(error).strip().splitlines()
    reason = lines[0].replace("|", "/")[:150] if lines else ""
    return f"failed: {type(error).__name__}" + (f": {reason}" if reason else "")


def guarded(rows: list[Row], row: Row, work: Callable[[Row], None]) -> None:
    """Run ``work(row)`` (which fills the row); any error becomes the row's ``failed: <reason>``."""
    try:
        work(row)
    except Exception as error:  # noqa: BLE001 - one failing row must not kill the table
        row.status = failure(error)
        _log(f"{row.benchmark} [{row.precision}] {row.status}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    rows.append(row)


# ------------------------------------------------------------------ helpers
def _log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:6.1f} s] {message}", file=sys.stderr, flush=True)


def _quiet() -> None:
    """Lightning's per-Trainer banners and data-loader hints would bury the table."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (
        ".*does not have many workers.*", ".*validation_step.*", ".*log_every_n_steps.*",
        ".*Tensor Cores.*", ".*smaller than the logging interval.*", ".*TF32.*", ".*sync_dist.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


class PeakMemory:
    """Peak device memory since this object was made, above what was allocated then, in MiB
    (CPU: None). Made at the start of a run, read at its end."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.base = 0
        if device == "cuda":
            gc.collect()  # the previous run's model and optimizer, freed before the baseline
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()

    @property
    def mib(self) -> float | None:
        if self.device != "cuda":
            return None
        return (torch.cuda.max_memory_allocated() - self.base) / 2**20


class WindowClock:
    """Wall-clock marks (CUDA-synchronised) at the end of the warm-up and of every timed window.

    ``step_done(n)`` after the n-th optimizer step; windows are ``steps`` steps long.
    """

    def __init__(self, device: str, warmup: int, steps: int) -> None:
        self.device, self.warmup, self.steps = device, warmup, steps
        self.started = 0.0
        self.marks: list[float] = []

    def start(self) -> None:
        sync_device(self.device)
        self.started = time.perf_counter()

    def step_done(self, done: int) -> None:
        if done >= self.warmup and (done - self.warmup) % self.steps == 0:
            sync_device(self.device)
            self.marks.append(time.perf_counter())

    @property
    def warmup_seconds(self) -> float:
        """From the start to the end of the warm-up (includes compiling, cuDNN's first calls...)."""
        return self.marks[0] - self.started

    @property
    def window_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


class WindowTimer(pl.Callback):
    """A :class:`WindowClock` driven by Lightning's loop (``global_step`` counts optimizer steps)."""

    def __init__(self, clock: WindowClock) -> None:
        self.clock = clock

    def on_train_start(self, trainer, pl_module) -> None:
        self.clock.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.step_done(trainer.global_step)


@dataclass
class Timing:
    """One run: images/s of each timed window, the warm-up's seconds, peak MiB (None on CPU)."""

    images_per_s: list[float]
    warmup_seconds: float
    seconds_per_step: float  # median over the windows
    peak_mib: float | None


def _timing(clock: WindowClock, images_per_step: int, peak_mib: float | None) -> Timing:
    windows = clock.window_seconds
    if not windows:
        raise RuntimeError("the run ended before its first timed window")
    return Timing(
        images_per_s=[clock.steps * images_per_step / s for s in windows],
        warmup_seconds=clock.warmup_seconds,
        seconds_per_step=statistics.median(windows) / clock.steps,
        peak_mib=peak_mib,
    )


def _autocast(device: str, precision: str):
    if precision == BF16:
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return nullcontext()


def shapes_loader(sizes: Sizes) -> torch.utils.data.DataLoader:
    """Shuffled training batches ``(images (B, 1, S, S), factors (B, 5))`` held on the device."""
    from datamodules.shapes import ShapesDataModule

    data = ShapesDataModule(
        image_size=sizes.image_size, num_train=sizes.num_train, num_val=sizes.batch_size,
        batch_size=sizes.batch_size, device=sizes.device,
    )
    data.setup("fit")
    return data.train_dataloader()


def _dataset_mib(loader) -> float:
    return sum(t.nbytes for t in loader.dataset.tensors) / 2**20


def _cycle(loader) -> Iterator:
    while True:
        yield from loader


# ------------------------------------------------------------------ the training runs
def run_plain(sizes: Sizes, loader, precision: str, windows: int = 1, compile_model: bool = False) -> Timing:
    """The floor: a hand-written loop, same model, Adam, data and loss form as the Lightning runs."""
    from lightning_geco import ELBO

    device = sizes.device
    memory = PeakMemory(device)
    model = build_model(sizes.image_size, ELBO()).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if compile_model:
        compile_forward(model, sizes.compile_backend)
    clock = WindowClock(device, sizes.warmup, sizes.steps)
    batches = _cycle(loader)
    clock.start()
    for done in range(1, sizes.warmup + windows * sizes.steps + 1):
        x = next(batches)[0]
        with _autocast(device, precision):
            loss = plain_loss(model(x), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clock.step_done(done)
    return _timing(clock, sizes.batch_size, memory.mib)


def compile_forward(model: torch.nn.Module, backend: str) -> None:
    """``torch.compile`` the model's forward pass (encoder, sampling, decoder, rate, distortion).

    Not Lightning's ``trainer.fit(torch.compile(model))``: that compiles ``training_step`` too,
    whose logging check reads the step counter, so dynamo recompiles at every step until it
    hits its recompile limit and falls back to eager (measured on the CPU smoke run).
    """
    model.forward = torch.compile(model.forward, backend=backend)


def lightning_trainer(sizes: Sizes, precision: str, callbacks: list, max_steps: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="gpu" if sizes.device == "cuda" else "cpu",
        devices=kwargs.pop("devices", 1),
        precision=LIGHTNING_PRECISION[precision],
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **kwargs,
    )


def run_lightning(
    sizes: Sizes, loader, precision: str, geco: bool, windows: int = 1, compile_model: bool = False,
    compile_geco: bool = False, channels_last: bool = False,
) -> Timing:
    """``Trainer.fit`` with the ELBO, or GECO and its callback; optionally the forward compiled,
    optionally GECO's per-step update (``GECOCallback(compile=True)``), optionally the model's
    weights in ``torch.channels_last`` (the convolutions then run in that layout)."""
    from lightning_geco import GECOCallback

    memory = PeakMemory(sizes.device)
    clock = WindowClock(sizes.device, sizes.warmup, sizes.steps)
    callbacks = [WindowTimer(clock)] + ([GECOCallback(compile=compile_geco)] if geco else [])
    model = build_model(sizes.image_size, make_objective(geco))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_model:
        compile_forward(model, sizes.compile_backend)
    trainer = lightning_trainer(sizes, precision, callbacks, sizes.warmup + windows * sizes.steps)
    trainer.fit(model, train_dataloaders=loader)
    return _timing(clock, sizes.batch_size, memory.mib)


def run_variant(sizes: Sizes, loader, variant: str, precision: str, **kwargs) -> Timing:
    if variant == "plain":
        return run_plain(sizes, loader, precision, **kwargs)
    geco = variant.startswith("geco")
    return run_lightning(
        sizes, loader, precision, geco=geco, compile_geco=variant == "geco_compiled",
        channels_last=variant == "geco_channels_last", **kwargs,
    )


# ------------------------------------------------------------------ sections
class Budget:
    """The whole script's wall-clock deadline, counted from :data:`_START` (imports included)."""

    def __init__(self, total_s: float) -> None:
        self.deadline = _START + total_s

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def training_rows(sizes: Sizes, loader, precisions: list[str], skipped: dict[str, str], budget: Budget) -> list[Row]:
    """Section 1: plain / ELBO / GECO / GECO compiled / GECO channels_last x precisions, interleaved
    rounds, plus the ratio rows."""
    configs = [(v, p) for p in precisions for v in VARIANTS]
    rows = {(v, p): Row(VARIANT_LABEL[v], p, "images/s") for v, p in configs}
    for precision, reason in skipped.items():
        for variant in VARIANTS:
            rows[(variant, precision)] = Row(VARIANT_LABEL[variant], precision, "images/s", status=reason)
    from lightning_geco.metrics import compiler_available

    if not compiler_available(sizes.device):
        for precision in precisions:
            rows[("geco_compiled", precision)].status = "skipped: torch.compile cannot build kernels here"
    section_end = time.perf_counter() + sizes.train_budget_s
    for round_ in range(sizes.rounds):
        began = time.perf_counter()
        shift = round_ % len(configs)
        for variant, precision in configs[shift:] + configs[:shift]:
            row = rows[(variant, precision)]
            if row.status is not None:
                continue
            try:
                timing = run_variant(sizes, loader, variant, precision)
                row.values += timing.images_per_s
                row.peak_mib = max(row.peak_mib or 0.0, timing.peak_mib) if timing.peak_mib is not None else None
            except Exception as error:  # noqa: BLE001
                row.status = failure(error)
                _log(f"{row.benchmark} [{precision}] {row.status}")
        took = time.perf_counter() - began
        _log(f"training round {round_ + 1}/{sizes.rounds}: {took:.1f} s")
        # Start another round only if it should end within both budgets.
        if round_ + 1 < sizes.rounds and (time.perf_counter() + took > section_end or budget.left() < took):
            _log(f"training: stopping after {round_ + 1} rounds (time budget)")
            break

    out = []
    all_precisions = list(dict.fromkeys(precisions + list(skipped)))
    for precision in all_precisions:
        out += [rows[(v, precision)] for v in VARIANTS]
    # (numerator, denominator, label, note) of every ratio row
    ratios = [
        (variant, other, f"{name} / {'ELBO' if other == 'elbo' else 'plain'} (images/s)",
         "per-round ratios; < 1: GECO slower")
        for (variant, name), other in itertools.product((("geco", "GECO"), ("geco_compiled", "GECO compiled")), ("elbo", "plain"))
    ] + [("geco_channels_last", "geco", "GECO channels_last / GECO (images/s)", "per-round ratios; > 1: channels_last faster")]
    for precision in all_precisions:
        for variant, other, label, note in ratios:
            row = Row(label, precision, "ratio", note=note)
            top, base = rows[(variant, precision)], rows[(other, precision)]
            if top.status or base.status or not top.values:
                row.status = "skipped: a run it needs did not complete"
            else:
                # Each round's runs share the machine's state at that moment: pair them.
                row.values = [t / b for t, b in zip(top.values, base.values)]
            out.append(row)
    return out


def marginal_kl_rows(sizes: Sizes, budget: Budget) -> list[Row]:
    """Section 2: ``AggregatePosteriorKL.compute`` at N x d on the device, eager and compiled.

    Per variant: one warm-up call (kernel loading; compiling, for ``compile=True``), then up to
    ``kl_repeats`` timed calls while within ``kl_budget_s`` (at least one). Peak memory: above
    the inputs and the metric's states, i.e. compute()'s working set.
    """
    from lightning_geco.metrics import AggregatePosteriorKL

    has_compile = "compile" in inspect.signature(AggregatePosteriorKL).parameters
    label = f"marginal KL compute (N={sizes.kl_size:,}, d={sizes.kl_dim})"
    g = torch.Generator().manual_seed(0)
    mean = (torch.randn(sizes.kl_size, sizes.kl_dim, generator=g) * 1.5).to(sizes.device)
    log_variance = (torch.randn(sizes.kl_size, sizes.kl_dim, generator=g) * 0.3 - 1.0).to(sizes.device)

    def time_compute(row: Row, kwargs: dict) -> None:
        variant_end = time.perf_counter() + sizes.kl_budget_s
        seconds, results, first = [], [], 0.0
        for call in range(1 + sizes.kl_repeats):
            # A fresh metric per call: torchmetrics caches compute()'s result until the next update.
            metric = AggregatePosteriorKL(**kwargs).to(sizes.device)
            metric.update(mean, log_variance)
            memory = PeakMemory(sizes.device)
            start = time.perf_counter()
            result = metric.compute()
            sync_device(sizes.device)
            took = time.perf_counter() - start
            results.append(float(result["marginal_kl"]))
            if call == 0:
                first = took
                continue
            seconds.append(took)
            row.peak_mib = memory.mib
            if time.perf_counter() + took > variant_end:
                break
        if not all(math.isfinite(r) for r in results):
            raise FloatingPointError(f"non-finite marginal KL: {results}")
        row.values = seconds
        row.note = f"first call {first:.3g} s; marginal KL {results[-1]:.4g} nats"

    rows: list[Row] = []
    variants = [{"compile": False}, {"compile": True}] if has_compile else [{}]
    for kwargs in variants:
        name = f"compile={kwargs['compile']}" if kwargs else "eager"
        row = Row(f"{label}, {name}", "-", "s")
        if budget.left() <= 0:
            row.status = "skipped: time budget"
            rows.append(row)
            continue
        guarded(rows, row, lambda r: time_compute(r, kwargs))
        _log(f"{row.benchmark}: {row.status or f'{row.median:.3g} s'}")
    if not has_compile:
        missing = "skipped: AggregatePosteriorKL takes no compile argument"
        rows.append(Row(f"{label}, compile=True", "-", "s", status=missing))
    return rows


def compile_rows(sizes: Sizes, loader, budget: Budget, reference: dict[str, float]) -> list[Row]:
    """Section 4: eager vs ``torch.compile`` for the plain loop and Lightning + GECO, fp32."""
    rows: list[Row] = []
    for variant in ("plain", "geco"):
        name = VARIANT_LABEL[variant]
        speed = Row(f"torch.compile: {name}", FP32, "images/s")
        ratio = Row(f"torch.compile speed-up: {name}", FP32, "ratio", note="compiled / eager images/s, per window")
        compile_time = Row(f"torch.compile time: {name}", FP32, "s",
                           note="the compiled run's warm-up beyond its steady-state steps")
        need = reference.get("compile_run_s", sizes.compile_estimate_s)
        if budget.left() < need:
            for row in (speed, ratio, compile_time):
                row.status = f"skipped: time budget ({budget.left():.0f} s left, ~{need:.0f} s needed)"
            rows += [speed, ratio, compile_time]
            continue

        def measure(row: Row) -> None:
            began = time.perf_counter()
            eager = run_variant(sizes, loader, variant, FP32, windows=sizes.rounds)
            torch._dynamo.reset()  # no traces kept from an earlier compiled run
            compiled = run_variant(sizes, loader, variant, FP32, windows=sizes.rounds, compile_model=True)
            reference["compile_run_s"] = time.perf_counter() - began
            row.values, row.peak_mib = compiled.images_per_s, compiled.peak_mib
            row.note = (f"backend {sizes.compile_backend}; eager in the same shape "
                        f"{statistics.median(eager.images_per_s):.0f} images/s")
            ratio.values = [c / e for c, e in zip(compiled.images_per_s, eager.images_per_s)]
            # The eager run just before has paid the process's first-use costs (kernels, cuDNN's
            # heuristics), so what the compiled warm-up takes beyond its steady state is compiling.
            compile_time.values = [compiled.warmup_seconds - sizes.warmup * compiled.seconds_per_step]

        guarded(rows, speed, measure)
        for row in (ratio, compile_time):
            if speed.status is not None:
                row.status = "skipped: the compiled run failed"
            rows.append(row)
        _log(f"{speed.benchmark}: {speed.status or f'{speed.median:.0f} images/s'}")
    return rows


def ddp_row(sizes: Sizes, args: argparse.Namespace, one_gpu_geco: float | None) -> Row:
    """Section 3: a 2-process Lightning + GECO run in a subprocess (Lightning relaunches the
    script for rank 1, so it must not be the process that holds the table)."""
    backend = "NCCL" if sizes.device == "cuda" else "gloo, CPU smoke"
    row = Row(f"DDP 2 processes ({backend}), Lightning + GECO", FP32, "images/s")
    if sizes.device == "cuda" and torch.cuda.device_count() < 2:
        row.status = f"skipped: {torch.cuda.device_count()} GPU"
        return row

    def run(row: Row) -> None:
        command = [sys.executable, str(Path(__file__).resolve()), "--ddp-worker", *_size_flags(args)]
        # Its own process group, so a hung collective can be ended with both ranks.
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True, cwd=REPO)
        try:
            out, err = process.communicate(timeout=sizes.ddp_timeout_s)
        except subprocess.TimeoutExpired:
            out = None
        finally:
            # Rank 1 (Lightning's child) can outlive a failed rank 0, waiting in a collective.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if out is None:
            process.communicate()
            raise TimeoutError(f"no result within {sizes.ddp_timeout_s:.0f} s")
        results = [line[len(RESULT_TAG):] for line in out.splitlines() if line.startswith(RESULT_TAG)]
        if process.returncode != 0 or not results:
            lines = err.strip().splitlines() or ["no output"]
            # The exception's own line, not a warning printed after it.
            errors = [line for line in lines if re.search(r"(Error|Exception)\b", line)]
            raise RuntimeError(f"exit {process.returncode}: {(errors or lines)[-1].strip()}")
        result = json.loads(results[-1])
        row.values, row.peak_mib = result["images_per_s"], result["peak_mib"]
        row.note = f"batch {sizes.batch_size} per process, global images/s; peak on rank 0"
        if one_gpu_geco:
            row.note += f"; x{statistics.median(row.values) / one_gpu_geco:.2f} over 1 process (ideal 2)"

    guarded([], row, run)
    _log(f"{row.benchmark}: {row.status or f'{row.median:.0f} images/s'}")
    return row


def ddp_worker(sizes: Sizes) -> None:
    """Both ranks run this (rank 1 relaunched by Lightning); rank 0 prints the result line."""
    from lightning_geco import GECOCallback

    rank = int(os.environ.get("LOCAL_RANK", 0))
    if sizes.device == "cuda":
        # The dataset goes onto this rank's own GPU before the Trainer exists.
        torch.cuda.set_device(rank)
    loader = shapes_loader(sizes)
    memory = PeakMemory(sizes.device)
    clock = WindowClock(sizes.device, sizes.warmup, sizes.steps)
    trainer = lightning_trainer(
        sizes, FP32, [WindowTimer(clock), GECOCallback()], sizes.warmup + sizes.rounds * sizes.steps,
        devices=2, strategy="ddp",
    )
    trainer.fit(build_model(sizes.image_size, make_objective(True)), train_dataloaders=loader)
    timing = _timing(clock, sizes.batch_size * trainer.world_size, memory.mib)
    if trainer.global_rank == 0:
        print(RESULT_TAG + json.dumps({"images_per_s": timing.images_per_s, "peak_mib": timing.peak_mib}), flush=True)


# ------------------------------------------------------------------ main
def header(sizes: Sizes, loader) -> str:
    import torchmetrics

    if sizes.device == "cuda":
        device = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
        cuda = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        cuda = "no CUDA"
    return "\n".join([
        f"## GPU benchmark{' (CPU smoke: tiny sizes, the numbers mean nothing)' if sizes.device == 'cpu' else ''}",
        "",
        f"- device: {device}",
        f"- torch {torch.__version__} ({cuda}), pytorch-lightning {pl.__version__}, "
        f"torchmetrics {torchmetrics.__version__}, Python {platform.python_version()}",
        f"- ConvVAE {sizes.image_size}x{sizes.image_size}, batch {sizes.batch_size}, {sizes.warmup} warm-up + "
        f"{sizes.steps} timed steps per run, up to {sizes.rounds} interleaved rounds; shapes held on the "
        f"{sizes.device} ({_dataset_mib(loader):.0f} MiB, not in the peaks); GECO: MSE <= 0.005, "
        "GECOCallback() defaults; plain loop: rate + 5 * squared error, Adam 1e-3 as the others",
        f"- fp32: float32_matmul_precision={torch.get_float32_matmul_precision()!r}, "
        f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32} (torch defaults)",
        "",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--cpu-smoke", action="store_true", help="every section at tiny sizes on the CPU")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: 5; smoke 2)")
    parser.add_argument("--steps", type=int, help="timed steps per run (default: 300; smoke 3)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile section")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _size_flags(args: argparse.Namespace) -> list[str]:
    """The flags that fix :class:`Sizes`, to hand the same sizes to a worker process."""
    flags = ["--cpu-smoke"] if args.cpu_smoke else []
    for name in ("rounds", "steps"):
        if getattr(args, name) is not None:
            flags += [f"--{name}", str(getattr(args, name))]
    return flags


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = SMOKE if args.cpu_smoke else GPU
    overrides = {k: getattr(args, k) for k in ("rounds", "steps") if getattr(args, k) is not None}
    return replace(sizes, **overrides)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sizes = sizes_from(args)
    _quiet()
    if sizes.device == "cpu":
        # The smoke checks that rows run, not speed. One thread: on a shared machine, OpenMP
        # threads waiting on each other made random 16x16 steps take 2 s instead of 20 ms.
        # Flushed denormals: values decaying towards zero otherwise cost ~100x per op on CPU,
        # depending on the run's data order (see benchmarks/throughput.py --flush-denormal).
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)
    if sizes.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA device here; run it on a GPU machine, or pass --cpu-smoke.")
    if args.ddp_worker:
        ddp_worker(sizes)
        return
    budget = Budget(sizes.total_budget_s)
    _log(f"rendering {sizes.num_train} shapes onto the {sizes.device}")
    loader = shapes_loader(sizes)

    precisions, skipped = [FP32], {}
    if sizes.device == "cuda" and not torch.cuda.is_bf16_supported():
        skipped[BF16] = "skipped: no bf16 on this GPU"
    else:
        precisions.append(BF16)

    rows: list[Row] = []

    def section(name: str, make_rows: Callable[[], list[Row]]) -> None:
        """Add a section's rows; an error outside its guarded rows becomes one failed row. The
        table so far goes to ``--out`` after every section, so a run cut short still reports."""
        try:
            rows.extend(make_rows())
        except Exception as error:  # noqa: BLE001
            rows.append(Row(name, "-", "-", status=failure(error)))
        write(final=False)

    def write(final: bool) -> None:
        text = header(sizes, loader) + markdown_table(rows) + "\n"
        text += f"\ntotal wall time {time.perf_counter() - _START:.0f} s{'' if final else ' (so far)'}\n"
        if final:
            print(text)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)

    section("training throughput", lambda: training_rows(sizes, loader, precisions, skipped, budget))
    geco_fp32 = [r for r in rows if r.benchmark == VARIANT_LABEL["geco"] and r.precision == FP32]
    one_gpu_geco = geco_fp32[0].median if geco_fp32 and geco_fp32[0].values and geco_fp32[0].status is None else None
    section("marginal KL", lambda: marginal_kl_rows(sizes, budget))
    _log("DDP")
    section("DDP", lambda: [ddp_row(sizes, args, one_gpu_geco)])
    if args.no_compile:
        rows.append(Row("torch.compile", FP32, "-", status="skipped: --no-compile"))
    else:
        section("torch.compile", lambda: compile_rows(sizes, loader, budget, {}))
    write(final=True)


if __name__ == "__main__":
    main()

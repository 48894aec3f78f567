"""Time and memory of the marginal-KL metric, today's float64 definition beside the fast paths.

    python benchmarks/marginal_kl.py [--sizes 1000 5000 10000 20000 50000] [--latent-dim 10]
        [--chunk-size 256] [--reference-max 20000]

``AggregatePosteriorKL.compute`` is O(N^2 d) time and O(chunk_size * N) working memory. For
each evaluated-set size N this runs, each in a fresh process, ``compute`` three ways on the
same posteriors (means ~ N(0, 1), log-variances uniform in [-6, 0], i.e. some posteriors with
std 0.05, where float32 cancellation would show):

- ``reference``: ``aggregate_log_densities_reference``, the float64 implementation the metric
  used before (skipped above ``--reference-max``: ~512 s at N = 50,000 on 2 cores);
- ``compiled``: ``compile=True``; the one-time compilation is timed separately (a warm-up call
  on a small set: N is a dynamic size, so it is compiled once per (chunk rows, d)). The first
  compiled process starts from an empty inductor cache (a cold compile), the later ones reuse it;
- ``fallback``: ``compile=False``, the eager path used where no compiler is available.

Reported per N: seconds of ``compute`` (after a warm-up call; best of up to 3 runs while they
take under 3 s in all, the CPU being shared; OpenMP threads wait as the runtime does by
default, see ``--omp-wait-policy``), the speedups over the reference, the peak growth of the
process's resident memory during ``compute`` (CPU) or peak allocated GPU memory, and the largest
difference of the four estimates (marginal KL, mutual information, total correlation,
dimension-wise KL) from the reference, in nats. Below the table: the log-log slope of time
against N for each way (2 for O(N^2)) and the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import torch

from lightning_geco import metrics
from lightning_geco.metrics import AggregatePosteriorKL, aggregate_log_densities_reference

MODES = ("reference", "compiled", "fallback")
ESTIMATES = ("marginal_kl", "mutual_info", "total_correlation", "dimensionwise_kl")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _posteriors(size: int, latent_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(size, latent_dim, generator=g), -6.0 * torch.rand(size, latent_dim, generator=g)


def worker(size: int, latent_dim: int, chunk_size: int, device: str, mode: str) -> dict:
    mean, log_variance = (t.to(device) for t in _posteriors(size, latent_dim))
    if mode == "reference":  # the metric exactly as it was: float64 log-densities
        def reference(z, m, lv, chunk, compile):  # noqa: ARG001 - the fast function's signature
            return aggregate_log_densities_reference(z, m, lv, chunk)

        metrics.aggregate_log_densities = reference
    metric = AggregatePosteriorKL(chunk_size=chunk_size, compile=mode == "compiled").to(device)
    for part_mean, part_log_variance in zip(mean.split(1000), log_variance.split(1000)):
        metric.update(part_mean, part_log_variance)
    # Warm-up on a small set with the same chunk rows and d: thread pools, BLAS and, for
    # "compiled", the one-time compilation (N is a dynamic size: this kernel serves every N).
    rows = max(min(chunk_size, size), 2)
    start = time.perf_counter()
    metrics.aggregate_log_densities(mean[:rows], mean[:rows], log_variance[:rows], chunk_size, mode == "compiled")
    compile_seconds = time.perf_counter() - start if mode == "compiled" else None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = _rss_mb()
    # Best of up to 3 runs while they take under 3 s in all: the CPU is shared, and the minimum
    # is the least disturbed by other processes.
    runs: list[float] = []
    cpu_runs: list[float] = []
    while not runs or (len(runs) < 3 and sum(runs) < 3.0):
        start, cpu_start = time.perf_counter(), time.process_time()
        # The class's compute, not the instance's: torchmetrics caches the instance's result.
        result = AggregatePosteriorKL.compute(metric)
        if device == "cuda":
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - start)
        cpu_runs.append(time.process_time() - cpu_start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mb() - baseline
    return {
        "seconds": min(runs),
        "cpu_seconds": cpu_runs[runs.index(min(runs))],
        "runs": len(runs),
        "compile_seconds": compile_seconds,
        "peak_mb": peak,
        **{key: float(result[key]) for key in ESTIMATES},
    }


def _slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(seconds) against log(N): the empirical exponent of N."""
    if len(points) < 2:
        return None
    xs, ys = [math.log(n) for n, _ in points], [math.log(s) for _, s in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10_000, 20_000, 50_000])
    parser.add_argument("--latent-dim", type=int, default=10)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--reference-max", type=int, default=20_000, help="skip the reference above this N")
    parser.add_argument(
        "--omp-wait-policy", default=os.environ.get("OMP_WAIT_POLICY", "unset"),
        help="OMP_WAIT_POLICY of the timed processes (default 'unset': the OpenMP runtime's own default, "
        "what a user gets, which spins a while before sleeping; PASSIVE sleeps at once, which on a heavily "
        "shared CPU keeps spinning threads from starving the working ones, but wakes threads for every op)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        size, mode = int(args.worker[0]), args.worker[1]
        print(json.dumps(worker(size, args.latent_dim, args.chunk_size, args.device, mode)))
        return

    load_before = os.getloadavg()
    print(f"AggregatePosteriorKL.compute, latent_dim {args.latent_dim}, chunk_size {args.chunk_size}, "
          f"device {args.device}; means ~ N(0,1), log-variances ~ U(-6, 0)", flush=True)
    header = (f"{'N':>6} | {'reference s':>11} {'compiled s':>10} {'compile s':>9} {'fallback s':>10} | "
              f"{'x compiled':>10} {'x fallback':>10} | {'peak MB ref/comp/fall':>21} | "
              f"{'max |diff| nats comp/fall':>25}")
    print(header)
    print("-" * len(header))
    times: dict[str, list[tuple[int, float]]] = {mode: [] for mode in MODES}
    cpu_times: dict[str, list[tuple[int, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as inductor_cache:  # the first compile is a cold one
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor_cache, "OMP_WAIT_POLICY": args.omp_wait_policy}
        if args.omp_wait_policy == "unset":
            del env["OMP_WAIT_POLICY"]
        for size in args.sizes:
            rows = {}
            for mode in MODES:
                if mode == "reference" and size > args.reference_max:
                    continue
                command = [sys.executable, __file__, "--worker", str(size), mode, "--latent-dim", str(args.latent_dim),
                           "--chunk-size", str(args.chunk_size), "--device", args.device]
                out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
                rows[mode] = json.loads(out.strip().splitlines()[-1])
                times[mode].append((size, rows[mode]["seconds"]))
                cpu_times[mode].append((size, rows[mode]["cpu_seconds"]))
            ref = rows.get("reference")

            def cell(mode: str, key: str, fmt: str) -> str:
                return format(rows[mode][key], fmt) if mode in rows else "skipped"

            def speedup(mode: str) -> str:
                return f"{ref['seconds'] / rows[mode]['seconds']:.1f}x" if ref else "-"

            def diff(mode: str) -> str:
                return f"{max(abs(rows[mode][k] - ref[k]) for k in ESTIMATES):.1e}" if ref else "-"

            peaks = "/".join(f"{rows[m]['peak_mb']:.0f}" if m in rows else "-" for m in MODES)
            print(f"{size:>6} | {cell('reference', 'seconds', '.2f'):>11} {cell('compiled', 'seconds', '.2f'):>10} "
                  f"{cell('compiled', 'compile_seconds', '.1f'):>9} {cell('fallback', 'seconds', '.2f'):>10} | "
                  f"{speedup('compiled'):>10} {speedup('fallback'):>10} | {peaks:>21} | "
                  f"{diff('compiled') + '/' + diff('fallback'):>25}", flush=True)
    for mode in MODES:
        cpu = ", ".join(f"{n}: {c:.2f}" for n, c in cpu_times[mode])
        print(f"process CPU seconds (all threads) of {mode}: {cpu}")
    for mode in MODES:
        slope = _slope(times[mode])
        measured = ", ".join(f"{n}" for n, _ in times[mode])
        print(f"time ~ N^{slope:.2f} for {mode} (fitted over N = {measured})" if slope is not None
              else f"{mode}: fewer than two sizes, no exponent")
    if any(size > args.reference_max for size in args.sizes):
        print(f"reference skipped above N = {args.reference_max} (--reference-max); speedups there are not measured")
    print("compile s: the one-time torch.compile of the fused kernel; the first row's is cold (empty inductor "
          "cache), later rows reuse the cache")
    print(f"machine: {_cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={args.omp_wait_policy}; load average {load_before[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after (the CPU is shared: wall times include other users' load)")


if __name__ == "__main__":
    main()

"""Time and memory of the marginal-KL metric as the evaluated set grows.

    python benchmarks/marginal_kl.py [--sizes 1000 10000 50000] [--latent-dim 10] [--chunk-size 256]

``AggregatePosteriorKL.compute`` is O(N^2 d) time and, by design, O(chunk_size * N) working
memory: this script checks both. Each size runs in a fresh process; reported are the compute
time, the peak growth of the process's resident memory during ``compute`` (CPU) or the peak
allocated GPU memory, and the size of one chunk x N float64 matrix: the working set is a few
of those, whatever N is, instead of the N x N (x d) a direct computation would hold.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from lightning_geco.metrics import AggregatePosteriorKL


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(size: int, latent_dim: int, chunk_size: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    mean = (torch.randn(size, latent_dim, generator=g) * 1.5).to(device)
    log_variance = (torch.randn(size, latent_dim, generator=g) * 0.3 - 1.0).to(device)
    metric = AggregatePosteriorKL(chunk_size=chunk_size).to(device)
    for part_mean, part_log_variance in zip(mean.split(1000), log_variance.split(1000)):
        metric.update(part_mean, part_log_variance)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = _rss_mb()
    start = time.perf_counter()
    result = metric.compute()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mb() - baseline
    return {
        "size": size,
        "seconds": seconds,
        "peak_mb": peak,
        "chunk_matrix_mb": min(chunk_size, size) * size * 8 / 2**20,
        "full_matrix_mb": size * size * 8 / 2**20,
        "marginal_kl": float(result["marginal_kl"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 50_000])
    parser.add_argument("--latent-dim", type=int, default=10)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.latent_dim, args.chunk_size, args.device)))
        return
    print(f"AggregatePosteriorKL.compute, latent_dim {args.latent_dim}, chunk_size {args.chunk_size}, device {args.device}")
    print(f"{'N':>7} {'seconds':>9} {'peak MB':>9} {'chunk x N MB':>13} {'N x N MB':>10} {'marginal KL':>12}")
    for size in args.sizes:
        command = [sys.executable, __file__, "--worker", str(size), "--latent-dim", str(args.latent_dim),
                   "--chunk-size", str(args.chunk_size), "--device", args.device]
        row = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip())
        print(f"{row['size']:>7} {row['seconds']:>9.2f} {row['peak_mb']:>9.1f} {row['chunk_matrix_mb']:>13.1f} "
              f"{row['full_matrix_mb']:>10.1f} {row['marginal_kl']:>12.3f}")


if __name__ == "__main__":
    main()

"""torchmetrics Metrics over an evaluated set (correct under DDP): the latent space, and how
precisely the set measures a constraint's reading.

The latent-space values are in nats per image (or per image and latent dimension), p(z) =
N(0, I), and the posteriors q(z|x_n) = N(mean_n, diag(exp(log_variance_n))) are diagonal
Gaussians; a reading's mean and standard error are in the reading's own units.

Aggregate posterior (``AggregatePosteriorKL``)
----------------------------------------------
Over an evaluated set of N images the aggregate posterior is the mixture
``q(z) = 1/N sum_n q(z|x_n)``. For each n we draw one ``z_n ~ q(z|x_n)`` (so the z_n are draws
from q(z)) and evaluate, exactly over all N mixture components, ``log q(z_n)`` and the
per-dimension marginals ``log q(z_nj)`` (in chunks of rows: memory O(chunk_size * N)). Then

- mutual information ``I(x; z) = mean_n [log q(z_n|x_n) - log q(z_n)]``;
- marginal KL ``KL(q(z) || p(z)) = E_n[KL(q(z|x_n) || p(z))] - I(x; z)`` (an exact identity,
  the first term, the mean rate, in closed form);
- dimension-wise KL ``sum_j KL(q(z_j) || p(z_j)) = mean_n sum_j [log q(z_nj) - log p(z_nj)]``;
- total correlation ``TC = KL(q(z) || prod_j q(z_j)) = marginal KL - dimension-wise KL``.

So ``rate = mutual_info + total_correlation + dimensionwise_kl`` holds exactly (the standard
decomposition of the average KL, Hoffman & Johnson 2016; Chen et al. 2018).

Bias, stated plainly: for the mixture of the evaluated set the estimates are unbiased up to
Monte Carlo noise from the N draws. For the *population* aggregate posterior they are biased:
the empirical mixture is a finite sample, and the mutual information estimate can never exceed
``log N`` (``log q(z_n) >= log q(z_n|x_n) - log N``), so the marginal KL is at least
``rate - log N``. Expect the information to be underestimated (and the marginal KL
overestimated) once it nears ``log N``; compare runs on evaluated sets of the same size. The
per-dimension densities are far smoother than the joint one, so the dimension-wise KL stays
close and the total correlation (``marginal_kl - dimensionwise_kl``) takes nearly all of the
excess: independent posteriors whose aggregate is exactly N(0, I) (true total correlation 0)
read 32 nats at N = 2,000, d = 10 with the information at log N (tested). Read it as an upper
estimate there.

The draws use a fixed seed, matched to the posteriors by position, so an estimate is a
deterministic function of the posteriors in the order they are gathered, and equal on every DDP
rank (states are gathered with ``dist_reduce_fx="cat"``). Another order gives other draws: a
2-rank run, whose sampler deals the validation images out in turn, reads the same images as one
process within the estimates' Monte Carlo noise, not to the bit: at N = 2,000, d = 10 (posterior
log variances around -2) the estimates' standard deviation over seeds is 0.006-0.009 nats, and the
2-rank order moved the marginal KL by 0.012. The total correlation and the dimension-wise KL are
Monte Carlo differences, so either can read a little below 0 where the truth is 0. With one image
or one latent dimension they are exact (0 and the marginal KL; one image: the rate).

Computation: the O(N^2 d) log-densities are float32 log-sum-exps, shifted by an upper bound or
the row maximum, either in one ``torch.compile``-fused kernel per chunk (compiled once, ~3 s
warm, ~15 s cold; 22-80x faster than the float64 definition at N = 10k-20k on 2 shared CPU
cores) or, without a compiler, as sorted, centred matmuls (eager fallback, in cache-sized
blocks on the CPU: 6-24x faster at N = 5k-20k, 20.6 s at N = 50k against the definition's
~512 s; in large blocks on a GPU: 0.42 s at N = 50k on an H200; ``benchmarks/marginal_kl.py``);
both agree with the float64 definition, ``aggregate_log_densities_reference``, to ~1e-4 nats
per value or better and to ~1e-6 nats on the estimates (see ``aggregate_log_densities``).
Non-finite posteriors (a diverged model) give NaN estimates at once, with a warning.

Reading precision (``MeanWithStandardError``)
---------------------------------------------
A constraint's validation reading is the mean of one value per image; its standard error
``s / sqrt(N)`` (``s`` the sample standard deviation of the N values) says how far another
draw of N images could put it. The verdict uses it to say when a miss, or a pass, is within
that noise (:mod:`lightning_geco.verdict`).
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_geco.checks import is_positive_int

__all__ = [
    "LOG_2PI",
    "AggregatePosteriorKL",
    "LatentActivity",
    "MeanWithStandardError",
    "aggregate_log_densities",
    "aggregate_log_densities_reference",
    "compiler_available",
    "gaussian_kl_per_dimension",
    "mean_and_standard_error",
]

#: ln(2 pi), the Gaussian log density's constant (defined here, the leaf; distributions re-exports it)
LOG_2PI = math.log(2 * math.pi)


def gaussian_kl_per_dimension(mean: Tensor, log_variance: Tensor) -> Tensor:
    """KL(N(mean, exp(log_variance)) || N(0, 1)) per example and dimension, nats, same shape."""
    return 0.5 * (mean.pow(2) + log_variance.exp() - 1.0 - log_variance)


def aggregate_log_densities_reference(
    z: Tensor, mean: Tensor, log_variance: Tensor, chunk_size: int = 256
) -> tuple[Tensor, Tensor]:
    """The definition of ``aggregate_log_densities``, kept as its oracle (slow: float64, a loop over dims).

    ``log q(z_i) = logsumexp_n sum_j log N(z_ij; mean_nj, var_nj) - log N`` and
    ``log q(z_ij) = logsumexp_n log N(z_ij; mean_nj, var_nj) - log N``, every term written from
    ``z - mean`` in float64 as in the formula. Tests and ``benchmarks/marginal_kl.py`` compare the
    fast estimator against it; nothing else should call it (O(M N d) float64 work, ~100x slower).

    Args:
        z: points, shape (M, d).
        mean, log_variance: the N components, shape (N, d) each.
        chunk_size: rows of z per chunk; memory is O(chunk_size * N).

    Returns:
        ``(log_q, log_q_per_dim)`` of shapes (M,) and (M, d), float64, nats.
    """
    z, mean, log_variance = z.double(), mean.double(), log_variance.double()
    n, d = mean.shape
    precision = torch.exp(-log_variance)
    log_norm = -0.5 * (log_variance + LOG_2PI)  # (N, d)
    joint, marginals = [], []
    for start in range(0, z.shape[0], chunk_size):
        zc = z[start : start + chunk_size]
        total = torch.zeros(zc.shape[0], n, dtype=torch.float64, device=z.device)
        per_dim = []
        for j in range(d):
            log_q_j = log_norm[:, j] - 0.5 * (zc[:, j : j + 1] - mean[:, j]).pow(2) * precision[:, j]  # (chunk, N)
            total += log_q_j
            per_dim.append(torch.logsumexp(log_q_j, dim=1))
        joint.append(torch.logsumexp(total, dim=1))
        marginals.append(torch.stack(per_dim, dim=1))
    return torch.cat(joint) - math.log(n), torch.cat(marginals) - math.log(n)


# Exponents are clamped here before exp (eager path): exp(-80) = 1.8e-35 is still a normal float32,
# and keeping exp's results out of the subnormal range avoids a slow path that made it ~3x slower.
# A clamped term adds at most 1.8e-35 to a sum that is either >= _UNDERFLOW or recomputed exactly.
_EAGER_MIN_EXPONENT = -80.0
# Components per block of the eager fallback on the CPU: a (256, 512) tile is 0.5 MB in float32,
# 1 MB in float64, so it stays in a core's cache between the passes over it.
_EAGER_BLOCK = 512
# The eager path expands (u - w)^2 = u^2 - 2uw + w^2 (a matmul) only where h * u^2 (h = 1 / (2 var),
# u = z - the chunk's centre) stays under this: float32 cancellation then costs < ~1e-5 nats per
# term. Posteriors of std ~1e-3 or narrower cross it (at log variance -10 the expansion was off by
# 0.02 nats, at -20 it overflowed to inf) and take the direct difference instead.
_EXPANDED_SQUARE_LIMIT = 64.0
# Elsewhere (a GPU) a tile holds up to this many elements: 64 MB in float32, 128 MB in float64.
_EAGER_TILE_ELEMENTS = 1 << 24
# The eager joint expands sum_j P (z - m)^2 into float64 terms of size ~ sum_j P_j max(z_j^2, m_j^2),
# which cancel to ~1e-16 of that: up to this size the error stays under ~1e-7 nats. Beyond it
# (posteriors of std ~1e-4 and narrower: at log variance -30 the expansion was 0.14 nats off, at
# -60 1.9e12) the joint takes the direct difference, in float64 tiles of at most
# _JOINT_DIRECT_ELEMENTS (32 MB).
_JOINT_EXPANSION_LIMIT = 1e9
_JOINT_DIRECT_ELEMENTS = 1 << 22
_LOWEST_FLOAT64 = torch.finfo(torch.float64).min
# The same floor for the compiled path's base-2 exponents: 2**-125 is a normal float32.
_MIN_EXPONENT2 = -125.0
# A per-dimension sum (relative to that dimension's upper bound shift_j, see aggregate_log_densities) below this
# means every component is > 57 nats below the bound, where float32 terms lose precision: such
# rows are recomputed with the float64 reference. On real posteriors it never happens (the point's
# own component is within a few nats of the bound); it guards arbitrary z far from every component.
_UNDERFLOW = 1e-25
# The compiled joint's float32 exponents carry an error of ~6e-8 of their size: rows whose best
# component is more than 1000 nats below the bound (error > ~6e-5 nats) get their joint
# recomputed in float64 (their per-dimension sums are not affected).
_JOINT_FLOOR = -1000.0
_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2
# 2**f = exp(f ln 2) for |f| <= 1/2 by its Taylor series to degree 6: truncation error
# (ln 2 / 2)**7 / 7! = 1.2e-7 relative, about one float32 ulp.
_EXP2_TAYLOR = tuple(_LN2**k / math.factorial(k) for k in range(7))


def aggregate_log_densities(
    z: Tensor, mean: Tensor, log_variance: Tensor, chunk_size: int = 256, compile: bool | None = None
) -> tuple[Tensor, Tensor]:
    """``log q(z_i)`` and ``log q(z_ij)`` for the mixture ``q = 1/N sum_n N(mean_n, diag(var_n))``, fast.

    Same definition as ``aggregate_log_densities_reference``, in float32 with every sum a max- or
    bound-shifted log-sum-exp: per value within ~1e-4 nats (compiled: measured up to 5.5e-5;
    fallback: in the sparse tails of its sorted chunks), on average over the points within ~1e-6 nats.
    Two ways (N = 1 is always eager):

    - compiled (``torch.compile``): per chunk of rows one fused kernel evaluates every
      ``log N(z_ij; mean_nj, var_nj)`` from ``z - mean`` (no expanded square, so no
      cancellation), exponentiates with a polynomial ``2**x`` that the compiler vectorises
      (~3x faster on CPU than the library exp) and sums over the N components, per dimension
      and, for the joint, after summing over dimensions. Compiled once per (chunk rows, d);
      N is a dynamic size, so a new evaluated-set size does not recompile.
    - eager (fallback, no compiler): per dimension, the rows sorted by ``z_j`` and each chunk
      centred on its middle point, so that the expanded square ``-(u - w)^2 / (2 v)`` with
      ``u = z - c``, ``w = mean - c`` is a (chunk, 3) @ (3, block) float32 matmul whose terms are
      small where it matters (components near z) (for posteriors so narrow that float32 would
      lose ~1e-5 nats to the expansion, std ~1e-3 and below, a chunk evaluates ``(z - mean)^2``
      elementwise instead), and the joint density is a
      ``[z^2, z] @ [-P/2, M P]^T`` float64 matmul (cancellation there is ~1e-11; posteriors of std
      ~1e-4 and narrower take the direct difference, see :data:`_JOINT_EXPANSION_LIMIT`), summed over
      blocks of components with a running maximum (:func:`_eager_block_size`: on the CPU each
      (chunk, block) tile small enough to stay in cache; on a GPU few, large blocks).

    Args:
        z: points, shape (M, d).
        mean, log_variance: the N components, shape (N, d) each.
        chunk_size: rows of z per chunk; memory is O(chunk_size * N), never N x N.
        compile: True: the compiled path (errors propagate); False: the eager path; None (auto):
            compiled where ``torch.compile`` is usable on z's device (not disabled, a C++
            compiler on CPU, triton on CUDA), falling back to eager with a warning if it fails.

    Returns:
        ``(log_q, log_q_per_dim)`` of shapes (M,) and (M, d), float64, nats.
    """
    _check_chunk_size(chunk_size)
    _check_compile(compile)
    if z.dim() != 2 or mean.dim() != 2 or mean.shape != log_variance.shape or z.shape[1] != mean.shape[1]:
        raise ValueError(
            f"z must be (M, d) and mean, log_variance (N, d) with the same d, got {tuple(z.shape)}, "
            f"{tuple(mean.shape)} and {tuple(log_variance.shape)}."
        )
    n, d = mean.shape
    if n < 1:
        raise ValueError(f"the mixture needs at least one component, got N = {n}.")
    z32, mean32, log_variance32 = (t.detach().float() for t in (z, mean, log_variance))
    log_norm = -0.5 * (log_variance32 + LOG_2PI)  # (N, d)
    # Every log N(z_ij; mean_nj, var_nj) <= log_norm_nj <= shift_j, so terms relative to shift_j
    # exponentiate to <= 1 (no overflow) without a first pass for the row maximum.
    shift = log_norm.amax(dim=0)  # (d,)
    shifted_log_norm = log_norm - shift
    half_precision = 0.5 * torch.exp(-log_variance32)  # 1 / (2 var), (N, d)
    if z.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=z.device)
        return empty, empty.reshape(0, d)

    sums: Tensor | None = None
    joint: Tensor | None = None
    suspicious = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
    if _use_compiler(compile, z, n, chunk_size) and n >= 2:  # dynamo specialises sizes < 2
        try:
            sums, joint, top = _compiled_sums(z32, mean32, half_precision, shifted_log_norm, chunk_size)
            joint = joint + shift.double().sum()
            # float32 exponents lose ~6e-8 of their size: far from every component, recompute.
            suspicious = top < _JOINT_FLOOR
        except Exception as error:  # noqa: BLE001 - auto mode must still produce the numbers
            if compile:
                raise
            _COMPILER_STATE["broken"] = True
            warnings.warn(f"torch.compile failed ({error!r}); using the eager path from now on.", stacklevel=2)
    block = _eager_block_size(z.device, n, chunk_size)
    if sums is None or joint is None:  # set together: both None unless the compiled path succeeded
        sums = _eager_per_dim_sums(z32, mean32, half_precision, shifted_log_norm, chunk_size, block)
        joint = _eager_joint(z, mean, log_variance, chunk_size, block)
    elif (far := suspicious.nonzero().squeeze(1)).numel():
        # The joint alone, in float64 matmuls: with many latent dimensions of widely spread
        # variances every row can lie that far below the bound (d = 256, log variances in
        # [-20, 0]), and recomputing whole rows in the per-dimension reference took 18-53 s there.
        joint[far] = _eager_joint(z[far], mean, log_variance, chunk_size, block)

    log_n = math.log(n)
    log_q = joint - log_n
    log_q_per_dim = sums.double().log() + shift.double() - log_n
    # Each term is <= 1 (shifted by its bound), so a sum outside [_UNDERFLOW, N] or not finite is
    # a float32 failure: those rows are recomputed in float64.
    bad_sums = ~((sums >= _UNDERFLOW) & (sums <= n * (1 + 1e-4)))
    redo = bad_sums.any(dim=1).nonzero().squeeze(1)
    if redo.numel():
        exact_joint, exact = aggregate_log_densities_reference(z[redo], mean, log_variance, chunk_size)
        log_q[redo], log_q_per_dim[redo] = exact_joint, exact
    return log_q, log_q_per_dim


def _exp2(x: Tensor) -> Tensor:
    """``2**x`` for float32 ``x <= 0`` (clamped at 2**-125), relative error ~2e-7.

    Written in elementwise ops (round, a degree-6 polynomial, the exponent bits set directly)
    so that torch.compile fuses and vectorises it; that is ~3x faster on CPU than the library's
    1-ulp exp, whose cost dominates the O(M N d) work.
    """
    x = x.clamp_min(_MIN_EXPONENT2)
    whole = torch.round(x)
    fraction = x - whole  # in [-1/2, 1/2]
    power: Tensor | float = _EXP2_TAYLOR[6]
    for coefficient in reversed(_EXP2_TAYLOR[:6]):
        power = power * fraction + coefficient
    # 2**whole as a float32 built from its exponent bits (whole in [-125, 0]: a normal number).
    scale = ((whole.to(torch.int32) + 127) << 23).view(torch.float32)
    return power * scale


def _fused_chunk(
    z: Tensor, mean_t: Tensor, half_precision2: Tensor, log_norm2: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk of rows, base 2, for torch.compile (eager, it would hold a (c, d, N) tensor).

    Args:
        z: (c, d) points; mean_t: (d, N) means; half_precision2: (d, N) ``log2(e) / (2 var)``;
        log_norm2: (d, N) ``log2(e) * (log_norm - shift)``, so every exponent below is <= 0.

    Returns:
        per-dimension sums ``sum_n 2**e_inj`` (c, d), the joint's row maximum ``max_n sum_j e_inj``
        (c,) and ``sum_n 2**(sum_j e_inj - max)`` (c,), float32.
    """
    diff = z[:, :, None] - mean_t[None]  # (c, d, N)
    exponent2 = log_norm2 - half_precision2 * diff * diff
    per_dim = _exp2(exponent2).sum(dim=-1)
    joint2 = exponent2.sum(dim=1)  # (c, N)
    top = joint2.amax(dim=1, keepdim=True)
    return per_dim, top.squeeze(1), _exp2(joint2 - top).sum(dim=1)


def _compiled_sums(
    z: Tensor, mean: Tensor, half_precision: Tensor, shifted_log_norm: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-dimension shifted sums (M, d) float32, the joint log-sum-exp minus sum(shift) (M,) float64
    and the joint's largest exponent minus sum(shift) (M,) float64, nats."""
    if _COMPILER_STATE["fn"] is None:
        _COMPILER_STATE["fn"] = torch.compile(_fused_chunk, dynamic=False)
    fused = _COMPILER_STATE["fn"]
    m, d = z.shape
    rows = min(chunk_size, m)  # every call gets exactly `rows` rows: one compiled shape
    operands = [t.T.contiguous() for t in (mean, half_precision * _LOG2E, shifted_log_norm * _LOG2E)]
    for operand in operands:
        torch._dynamo.mark_dynamic(operand, 1)  # N: new set sizes reuse the compiled kernel
    sums = torch.empty(m, d, device=z.device)
    joint = torch.empty(m, dtype=torch.float64, device=z.device)
    tops = torch.empty(m, dtype=torch.float64, device=z.device)
    for start in range(0, m, rows):
        chunk = z[start : start + rows]
        used = chunk.shape[0]
        if used < rows:  # pad the last chunk instead of compiling a second shape
            chunk = torch.cat([chunk, chunk.new_zeros(rows - used, d)])
        per_dim, top, total = fused(chunk, *operands)
        sums[start : start + used] = per_dim[:used]
        tops[start : start + used] = top[:used].double() * _LN2
        joint[start : start + used] = tops[start : start + used] + total[:used].double().log()
    _COMPILER_STATE["shapes"].add((rows, d, z.device.type))
    return sums, joint, tops


def _eager_block_size(device: torch.device, n: int, chunk_size: int) -> int:
    """Components per block of the eager fallback: cache-sized on the CPU, as large as memory
    allows elsewhere.

    On the CPU a (chunk, :data:`_EAGER_BLOCK`) tile stays in cache through its four passes. On a
    GPU each block costs a handful of kernel launches, and with blocks of 512 the launches set the
    pace (18.5 s at N = 50,000, d = 10 on an H200, ``benchmarks/gpu.py``); there a block is all N
    components up to :data:`_EAGER_TILE_ELEMENTS` per tile (at chunk 256: 65,536 components; at
    N = 50,000 the joint's float64 tile is 102 MB, and ``compute`` peaked at 323 MB on the H200,
    ``benchmarks/marginal_kl.py``), so memory stays O(chunk_size) for any N.
    """
    if device.type == "cpu":
        return _EAGER_BLOCK
    return min(n, max(_EAGER_BLOCK, _EAGER_TILE_ELEMENTS // chunk_size))


def _eager_per_dim_sums(
    z: Tensor, mean: Tensor, half_precision: Tensor, shifted_log_norm: Tensor, chunk_size: int, block_size: int
) -> Tensor:
    """``sum_n exp(log N(z_ij; mean_nj, var_nj) - shift_j)``, (M, d) float32, by sorted centred matmuls.

    The components go in blocks of ``block_size`` (see :func:`_eager_block_size`), so on the CPU
    each (chunk, block) tile stays in cache through its matmul, clamp, exp and sum instead of
    going four times to memory.
    """
    m, d = z.shape
    n = mean.shape[0]
    sums = torch.empty(m, d, device=z.device)
    starts = range(0, m, chunk_size)
    for j in range(d):
        z_j, order = torch.sort(z[:, j])
        mean_j, half_precision_j, log_norm_j = mean[:, j], half_precision[:, j], shifted_log_norm[:, j]
        # Centre each chunk on its middle point: sorted, a chunk spans a short interval, so u and
        # (for the components that matter, near z) w are small. The expanded square's terms are
        # then of size h * u^2, and float32 loses ~1e-7 of that to cancellation; a chunk where h *
        # u^2 reaches _EXPANDED_SQUARE_LIMIT (very narrow posteriors: h = 1 / (2 var) large)
        # evaluates (z - mean)^2 itself instead, elementwise, at about twice the cost.
        firsts = torch.tensor(starts, device=z.device)
        lasts = (firsts + chunk_size - 1).clamp_max_(m - 1)
        centres = z_j[firsts + (lasts - firsts) // 2]  # each chunk's middle row
        half_spans = torch.maximum(z_j[lasts] - centres, centres - z_j[firsts])  # z_j is sorted
        expanded = (half_precision_j.max() * half_spans.square() < _EXPANDED_SQUARE_LIMIT).tolist()  # one host read
        for start, centre, use_matmul in zip(starts, centres, expanded):
            # The direct difference is taken uncentred: z - mean of nearby values is exact in
            # float32, where rounding z - c and mean - c apart would cost eps * |u| / std.
            u, w = z_j[start : start + chunk_size], mean_j
            total = torch.zeros(u.shape[0], device=z.device)
            if use_matmul:
                u, w = u - centre, w - centre
                hw = half_precision_j * w
                coefficients = torch.stack([-half_precision_j, 2 * hw, log_norm_j - hw * w])  # (3, N)
                features = torch.stack([u * u, u, torch.ones_like(u)], dim=1)  # (c, 3)
            for first in range(0, n, block_size):
                # log_norm - (u - w)^2 / (2 var) - shift, (c, block)
                if use_matmul:
                    exponent = features @ coefficients[:, first : first + block_size]
                else:
                    block = slice(first, first + block_size)
                    exponent = (u[:, None] - w[None, block]).square_().mul_(-half_precision_j[block]).add_(log_norm_j[block])
                total += exponent.clamp_min_(_EAGER_MIN_EXPONENT).exp_().sum(dim=1)
            sums[order[start : start + chunk_size], j] = total
    return sums


def _eager_joint(z: Tensor, mean: Tensor, log_variance: Tensor, chunk_size: int, block_size: int) -> Tensor:
    """``logsumexp_n sum_j log N(z_ij; mean_nj, var_nj)``, (M,) float64, as float64 matmuls per chunk.

    The components go in blocks of ``block_size`` with a running maximum (an online log-sum-exp),
    so on the CPU each (chunk, block) float64 tile stays in cache instead of going to memory once
    per pass, which at N = 50,000 (a 100 MB (chunk, N) row block) set the CPU fallback's pace.
    Posteriors so narrow that the matmul's expanded square would cancel badly (see
    :data:`_JOINT_EXPANSION_LIMIT`) take the direct difference ``(z - mean)^2`` instead, at
    several times the cost.
    """
    z, mean, log_variance = z.double(), mean.double(), log_variance.double()
    precision = torch.exp(-log_variance)
    size = (precision.amax(dim=0) * torch.maximum(z.abs().amax(dim=0), mean.abs().amax(dim=0)).square()).sum()
    direct = bool(size > _JOINT_EXPANSION_LIMIT)  # one host read
    d = mean.shape[1]
    if direct:
        log_norm = (-0.5 * (log_variance + LOG_2PI)).sum(dim=1)  # (N,)
        block_size = max(1, min(block_size, _JOINT_DIRECT_ELEMENTS // (chunk_size * d)))
    else:
        # sum_j log N = Z^2 @ (-P/2)^T + Z @ (M P)^T + const_n; float64 keeps the cancellation of
        # these O(d |z|^2 / var) terms at ~1e-11 nats for the posteriors this path gets.
        weights = torch.cat([-0.5 * precision, mean * precision], dim=1).T.contiguous()  # (2d, N)
        const = (-0.5 * (log_variance + LOG_2PI) - 0.5 * mean.pow(2) * precision).sum(dim=1)  # (N,)
    n = mean.shape[0]
    joint = torch.empty(z.shape[0], dtype=torch.float64, device=z.device)
    for start in range(0, z.shape[0], chunk_size):
        chunk = z[start : start + chunk_size]
        if not direct:
            features = torch.cat([chunk * chunk, chunk], dim=1)  # (c, 2d)
        top = torch.full((chunk.shape[0], 1), -math.inf, dtype=torch.float64, device=z.device)
        total = torch.zeros(chunk.shape[0], dtype=torch.float64, device=z.device)
        for first in range(0, n, block_size):
            block = slice(first, first + block_size)
            if direct:
                squares = (chunk[:, None, :] - mean[None, block]).square_().mul_(precision[None, block])  # (c, block, d)
                exponent = log_norm[block] - 0.5 * squares.sum(dim=2)
            else:
                exponent = torch.addmm(const[block], features, weights[:, block])  # (c, block)
            # Finite even while every exponent so far is -inf (a component of infinite variance),
            # so the differences below stay -inf or finite, never NaN.
            new_top = torch.maximum(top, exponent.amax(dim=1, keepdim=True)).clamp_min(_LOWEST_FLOAT64)
            # The differences are exact in float64; float32 suffices for their exp and sum.
            terms = (exponent - new_top).float().clamp_min_(_EAGER_MIN_EXPONENT).exp_().sum(dim=1)
            total = total * (top - new_top).squeeze(1).exp() + terms.double()
            top = new_top
        joint[start : start + chunk_size] = top.squeeze(1) + total.log()
    return joint


# The compiled chunk function (built on first use), the (rows, d, device type) it was compiled
# for, and whether compiling failed in auto mode.
_COMPILER_STATE: dict = {"fn": None, "shapes": set(), "broken": False}
# Auto mode compiles only for at least this much work (M N d terms: ~0.5-1 s eager on 2 CPU
# cores, against seconds to compile once), or when the kernel for this shape already exists; so
# small evaluated sets (and test suites) never wait for the compiler.
_COMPILE_MIN_WORK = 1e9


def _use_compiler(compile: bool | None, z: Tensor, n: int, chunk_size: int) -> bool:
    if compile is not None:
        return compile
    if _COMPILER_STATE["broken"] or not compiler_available(z.device):
        return False
    m, d = z.shape
    compiled = (min(m, chunk_size), d, z.device.type) in _COMPILER_STATE["shapes"]
    if not compiled and len(_COMPILER_STATE["shapes"]) >= _recompile_limit():
        # Past dynamo's limit a new shape would run _fused_chunk uncompiled, holding a (chunk, d, N)
        # tensor (GBs at N = 50k): a notebook sweeping many latent sizes takes the eager path instead.
        return False
    return compiled or m * n * d >= _COMPILE_MIN_WORK


def _recompile_limit() -> int:
    """How many shapes dynamo compiles one function for before it runs it uncompiled."""
    config = torch._dynamo.config
    limit = getattr(config, "recompile_limit", None) or getattr(config, "cache_size_limit", None)
    return int(limit) if limit is not None else 8


def compiler_available(device: torch.device | str = "cpu") -> bool:
    """Whether ``torch.compile`` can build kernels for ``device``: not disabled
    (``TORCH_COMPILE_DISABLE``), a C++ compiler on CPU, triton on CUDA; other devices: no."""
    device = torch.device(device)
    if not hasattr(torch, "compile") or torch._dynamo.config.disable:
        return False
    if device.type == "cpu":
        return any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    return False


def _check_chunk_size(chunk_size: int) -> None:
    if not is_positive_int(chunk_size):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")


def _check_compile(compile: object) -> None:
    if compile is not None and not isinstance(compile, bool):
        raise ValueError(f"compile must be True, False or None (auto), got {compile!r}.")


class AggregatePosteriorKL(Metric):
    """Marginal KL, mutual information, total correlation and dimension-wise KL over an evaluated set.

    ``update(mean, log_variance)`` with the posteriors of a batch, shape (B, d) each;
    ``compute()`` returns ``{"marginal_kl", "mutual_info", "total_correlation",
    "dimensionwise_kl", "rate"}`` in nats per image (see the module docstring for the
    estimators and their bias).

    Args:
        chunk_size: rows per chunk of the N x N computation (bounds memory to O(chunk_size * N)).
        seed: seed of the draws z_n ~ q(z|x_n).
        compile: how ``aggregate_log_densities`` runs: True compiled (``torch.compile``), False
            the eager fallback, None (default) compiled where a compiler is usable (and dynamo
            would not run it uncompiled: see ``_use_compiler``). Both agree with the float64
            definition to ~1e-4 nats per value; compiling costs seconds once per process.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False
    # States (add_state in __init__), declared so they read as what they hold, not as Module attributes.
    means: list[Tensor]
    log_variances: list[Tensor]

    def __init__(self, chunk_size: int = 256, seed: int = 0, compile: bool | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        _check_chunk_size(chunk_size)
        _check_compile(compile)
        self.chunk_size = int(chunk_size)
        self.seed = seed
        self.use_compile = compile  # not `self.compile`: that would shadow nn.Module.compile
        self.add_state("means", default=[], dist_reduce_fx="cat")
        self.add_state("log_variances", default=[], dist_reduce_fx="cat")

    def update(self, mean: Tensor, log_variance: Tensor) -> None:
        _check_posteriors(mean, log_variance)
        self.means.append(mean.detach().float())
        self.log_variances.append(log_variance.detach().float())

    def compute(self) -> dict[str, Tensor]:
        if isinstance(self.means, list) and not self.means:  # synced over ranks, it is one tensor
            raise ValueError(
                "AggregatePosteriorKL.compute() needs the posteriors of at least one image: update(mean, "
                "log_variance) was not called since the last reset."
            )
        mean = dim_zero_cat(self.means).double()
        log_variance = dim_zero_cat(self.log_variances).double()
        n, d = mean.shape
        if n == 0:
            raise ValueError("AggregatePosteriorKL.compute() needs the posteriors of at least one image, got N = 0.")
        rate = gaussian_kl_per_dimension(mean, log_variance).sum(dim=1).mean()
        if not (mean.isfinite().all() and log_variance.isfinite().all()):
            # A diverged model: NaN at once, not a float64 recomputation of every row (minutes at N = 50k).
            bad = int((~(mean.isfinite() & log_variance.isfinite())).any(dim=1).sum())
            warnings.warn(
                f"AggregatePosteriorKL: {bad} of {n} posteriors have a non-finite mean or log variance; the "
                "latent-space estimates are NaN.",
                stacklevel=2,
            )
            nan = torch.full((), math.nan, dtype=torch.float32, device=mean.device)
            return {"marginal_kl": nan, "mutual_info": nan, "total_correlation": nan, "dimensionwise_kl": nan, "rate": rate.float()}
        if n == 1:
            # q(z) is the one posterior: no information, no correlation, every KL the rate, exactly
            # (a single draw's Monte Carlo estimate read a total correlation of -8 nats).
            zero = torch.zeros((), dtype=torch.float32, device=mean.device)
            return {"marginal_kl": rate.float(), "mutual_info": zero, "total_correlation": zero,
                    "dimensionwise_kl": rate.float(), "rate": rate.float()}
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float64).to(mean.device)
        # Rounded to float32 first, as aggregate_log_densities reads it: every term below is then
        # evaluated at the same z (posteriors whose std nears float32's spacing of their mean
        # otherwise read log q(z|x) at another point than log q(z): 0.6 nats off at std 4e-8).
        z = (mean + noise * torch.exp(0.5 * log_variance)).float().double()
        log_q_z, log_q_zj = aggregate_log_densities(z, mean, log_variance, self.chunk_size, self.use_compile)
        log_q_z_given_x = -0.5 * ((z - mean).pow(2) * torch.exp(-log_variance) + log_variance + LOG_2PI).sum(dim=1)
        log_p_zj = -0.5 * (z.pow(2) + LOG_2PI)
        mutual_info = (log_q_z_given_x - log_q_z).mean()
        marginal_kl = rate - mutual_info
        # With one dimension q(z) is its own product of marginals: no total correlation, exactly.
        dimensionwise_kl = marginal_kl if d == 1 else (log_q_zj - log_p_zj).sum(dim=1).mean()
        return {
            "marginal_kl": marginal_kl.float(),
            "mutual_info": mutual_info.float(),
            "total_correlation": (marginal_kl - dimensionwise_kl).float(),
            "dimensionwise_kl": dimensionwise_kl.float(),
            "rate": rate.float(),
        }


class _SumStates(Metric):
    """A metric of float64 sum states that a cast of the module moves but never casts.

    Lightning's ``bf16-true`` and ``16-true`` precisions call ``module.to(dtype)``, which
    torchmetrics applies to states too: a bf16 count is exact only up to 256 examples.
    """

    def _apply(self, fn: Callable[[Tensor], Tensor], exclude_state: Sequence[str] = "") -> _SumStates:
        super()._apply(fn, exclude_state=tuple(self._defaults))
        for name, default in self._defaults.items():
            assert isinstance(default, Tensor)  # sum states are tensors, never lists
            self._defaults[name] = default.to(self.device)
            setattr(self, name, getattr(self, name).to(self.device))
        return self


class LatentActivity(_SumStates):
    """Per-dimension KL and active units over an evaluated set (sum states: cheap under DDP).

    ``compute()`` returns ``kl_per_dim`` (d,) in nats per image (summing to the mean closed-form
    KL of the posterior it is given: the mean rate, except for the FlowVAE, whose metrics read
    the base posterior q(z0|x) while its ``val/rate`` is the flowed code's Monte Carlo rate),
    ``mean_variance`` (d,): the variance over the set of the posterior mean, and
    ``active_units``: how many dimensions have ``mean_variance > threshold`` (Burda et al.
    2016 use 0.01), a float count, NaN when some dimension's variance is NaN. With d = 1 the
    two vectors come back 0-d: torchmetrics squeezes every one-element result (``.reshape(-1)``
    gives (1,)).
    """

    full_state_update = False
    is_differentiable = False
    # States (add_state in __init__), declared so they read as what they hold, not as Module attributes.
    count: Tensor
    sum_mean: Tensor
    sum_mean_sq: Tensor
    sum_kl: Tensor

    def __init__(self, threshold: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {threshold!r}.")
        self.threshold = threshold
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_mean", default=torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_mean_sq", default=torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_kl", default=torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, mean: Tensor, log_variance: Tensor) -> None:
        _check_posteriors(mean, log_variance)
        mean, log_variance = mean.detach().double(), log_variance.detach().double()
        if self.sum_mean.numel() == 0:
            zeros = torch.zeros(mean.shape[1], dtype=torch.float64, device=mean.device)
            self.sum_mean, self.sum_mean_sq, self.sum_kl = zeros, zeros.clone(), zeros.clone()
        # Not in place, as MeanWithStandardError.update: states reset under inference mode stay usable.
        self.count = self.count + mean.shape[0]
        self.sum_mean = self.sum_mean + mean.sum(dim=0)
        self.sum_mean_sq = self.sum_mean_sq + mean.pow(2).sum(dim=0)
        self.sum_kl = self.sum_kl + gaussian_kl_per_dimension(mean, log_variance).sum(dim=0)

    def compute(self) -> dict[str, Tensor]:
        average = self.sum_mean / self.count
        mean_variance = (self.sum_mean_sq / self.count - average.pow(2)).clamp_min(0.0)
        return {
            "kl_per_dim": (self.sum_kl / self.count).float(),
            "mean_variance": mean_variance.float(),
            # NaN where a dimension's variance is (a NaN compares as inactive, and was counted so).
            "active_units": torch.where(mean_variance.isnan().any(), torch.nan, (mean_variance > self.threshold).sum().float()),
        }


def mean_and_standard_error(total: Tensor, total_squares: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """The mean of N values and its standard error ``sqrt(s^2 / N)`` from their sums.

    ``s^2 = (sum x^2 - N mean^2) / (N - 1)`` is the unbiased sample variance (clamped at 0
    against rounding). Units: the values'. The standard error is NaN for N < 2 (no spread to
    measure), the mean NaN for N = 0.
    """
    mean = total / count
    variance = ((total_squares - count * mean.pow(2)) / (count - 1)).clamp_min(0.0)
    standard_error = torch.where(count >= 2, (variance / count).sqrt(), torch.full_like(mean, math.nan))
    return mean, standard_error


class MeanWithStandardError(_SumStates):
    """Mean of per-example values (N,) over an evaluated set, and its standard error.

    Sum states in float64 (cheap and exact under DDP: ranks' sums add). ``compute()`` returns
    ``mean`` and ``standard_error`` (0-dim, the values' units; see :func:`mean_and_standard_error`).
    """

    full_state_update = False
    is_differentiable = False
    total: Tensor
    total_squares: Tensor
    count: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_squares", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        if values.dim() != 1:
            shape = tuple(values.shape)
            raise ValueError(f"MeanWithStandardError takes one value per example, shape (N,), got {shape}.")
        values = values.detach().double()
        # Not in place: states reset under trainer.validate's inference mode are inference
        # tensors, which a later fit's validation (no_grad, not inference mode) cannot add to.
        self.total = self.total + values.sum()
        self.total_squares = self.total_squares + values.pow(2).sum()
        self.count = self.count + values.numel()

    def compute(self) -> dict[str, Tensor]:
        mean, standard_error = mean_and_standard_error(self.total, self.total_squares, self.count)
        return {"mean": mean.float(), "standard_error": standard_error.float()}


def _check_posteriors(mean: Tensor, log_variance: Tensor) -> None:
    if mean.shape != log_variance.shape or mean.dim() != 2:
        raise ValueError(
            f"mean and log_variance must both be (batch, latent_dim), got {tuple(mean.shape)} "
            f"and {tuple(log_variance.shape)}."
        )

import math
import os
import socket

import pytest
import torch

from lightning_geco import metrics
from lightning_geco.metrics import (
    AggregatePosteriorKL,
    LatentActivity,
    MeanWithStandardError,
    aggregate_log_densities,
    aggregate_log_densities_reference,
    compiler_available,
    gaussian_kl_per_dimension,
)


def _gaussian_posteriors(n, d, mean_variance, posterior_variance, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, d, generator=g) * math.sqrt(mean_variance)
    log_variance = torch.full((n, d), math.log(posterior_variance))
    return mean, log_variance


def test_log_aggregate_posterior_matches_a_brute_force_mixture():
    g = torch.Generator().manual_seed(1)
    mean, log_variance = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g) * 0.3
    z = torch.randn(5, 3, generator=g)
    components = torch.distributions.Independent(
        torch.distributions.Normal(mean.double(), (0.5 * log_variance.double()).exp()), 1
    )
    brute = torch.logsumexp(components.log_prob(z.double().unsqueeze(1)), dim=1) - math.log(7)
    per_dim = torch.distributions.Normal(mean.double(), (0.5 * log_variance.double()).exp())
    brute_marginals = torch.logsumexp(per_dim.log_prob(z.double().unsqueeze(1)), dim=1) - math.log(7)
    log_q, log_q_marginals = aggregate_log_densities(z, mean, log_variance, chunk_size=2)
    torch.testing.assert_close(log_q, brute)
    torch.testing.assert_close(log_q_marginals, brute_marginals)


def test_posteriors_equal_to_the_prior_give_zero_marginal_kl_and_zero_information():
    metric = AggregatePosteriorKL()
    metric.update(torch.zeros(500, 4), torch.zeros(500, 4))
    result = metric.compute()
    assert abs(result["marginal_kl"].item()) < 1e-6
    assert abs(result["mutual_info"].item()) < 1e-6
    assert result["rate"].item() == 0.0


def test_gaussian_aggregate_matches_the_closed_form_kl_and_mutual_information():
    # mean ~ N(0, s2), q(z|x) = N(mean, v): the aggregate is N(0, s2 + v) per dimension.
    s2, v, d = 2.0, 0.5, 2
    c = s2 + v
    metric = AggregatePosteriorKL(chunk_size=512)
    mean, log_variance = _gaussian_posteriors(6000, d, s2, v)
    for part_mean, part_log_variance in zip(mean.split(1000), log_variance.split(1000)):
        metric.update(part_mean, part_log_variance)
    result = metric.compute()
    expected_kl = d * 0.5 * (c - 1.0 - math.log(c))
    expected_mi = d * 0.5 * math.log(c / v)
    assert result["marginal_kl"].item() == pytest.approx(expected_kl, rel=0.05)
    assert result["mutual_info"].item() == pytest.approx(expected_mi, rel=0.05)


def test_estimate_does_not_depend_on_the_chunk_size():
    mean, log_variance = _gaussian_posteriors(300, 3, 1.0, 0.1)
    results = []
    for chunk in (7, 64, 1000):
        metric = AggregatePosteriorKL(chunk_size=chunk)
        metric.update(mean, log_variance)
        results.append(metric.compute()["marginal_kl"])
    torch.testing.assert_close(results[0], results[1])
    torch.testing.assert_close(results[0], results[2])


def test_mutual_information_saturates_at_log_n_for_point_like_posteriors():
    n = 200
    mean, log_variance = _gaussian_posteriors(n, 3, 1.0, 1e-8)
    metric = AggregatePosteriorKL()
    metric.update(mean, log_variance)
    mi = metric.compute()["mutual_info"].item()
    assert mi <= math.log(n) + 1e-5
    assert mi == pytest.approx(math.log(n), rel=1e-3)


def test_one_image_or_one_dimension_gives_the_exact_values_not_monte_carlo_noise():
    # One image: q(z) is its posterior; one dimension: q(z) is its own marginal. A single draw's
    # estimate read a total correlation of -8.1 nats for one image and 0.28 for one dimension.
    mean, log_variance = _random_posteriors(1, 4)
    metric = AggregatePosteriorKL()
    metric.update(mean, log_variance)
    one = metric.compute()
    rate = gaussian_kl_per_dimension(mean.double(), log_variance.double()).sum().float()
    assert one["rate"] == one["marginal_kl"] == one["dimensionwise_kl"] == rate
    assert one["mutual_info"] == one["total_correlation"] == 0.0
    mean, log_variance = _random_posteriors(50, 1)
    metric = AggregatePosteriorKL()
    metric.update(mean, log_variance)
    line = metric.compute()
    assert line["total_correlation"] == 0.0 and line["dimensionwise_kl"] == line["marginal_kl"]
    assert line["mutual_info"] + line["marginal_kl"] == pytest.approx(line["rate"].item(), abs=1e-6)


def test_every_term_is_read_at_the_same_float32_point():
    # Posteriors whose std (4e-8) nears float32's spacing of their mean: log q(z|x) was read at
    # the float64 draw, log q(z) at its float32 rounding, 0.04 nats apart in mutual information.
    generator = torch.Generator().manual_seed(0)
    mean, log_variance = torch.randn(500, 16, generator=generator), torch.full((500, 16), -34.0)
    metric = AggregatePosteriorKL(compile=False)
    metric.update(mean, log_variance)
    result = metric.compute()
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = (mean.double() + noise * math.exp(-17.0)).float().double()
    log_q, log_q_per_dim = aggregate_log_densities_reference(z, mean, log_variance)
    log_q_given_x = -0.5 * ((z - mean.double()).pow(2) * math.exp(34.0) - 34.0 + math.log(2 * math.pi)).sum(dim=1)
    assert result["mutual_info"].item() == pytest.approx((log_q_given_x - log_q).mean().item(), abs=1e-5)
    dimensionwise = (log_q_per_dim + 0.5 * (z.pow(2) + math.log(2 * math.pi))).sum(dim=1).mean().item()
    assert result["dimensionwise_kl"].item() == pytest.approx(dimensionwise, abs=1e-4)


def test_an_empty_metric_or_a_non_finite_posterior_is_said_so(monkeypatch):
    with pytest.raises(ValueError, match=r"needs the posteriors of at least one image: update\(mean, log_variance\) was not"):
        AggregatePosteriorKL().compute()
    empty = AggregatePosteriorKL()
    empty.update(torch.zeros(0, 4), torch.zeros(0, 4))
    with pytest.raises(ValueError, match=r"needs the posteriors of at least one image, got N = 0"):
        empty.compute()
    # A diverged model: NaN at once, without recomputing every row in float64 (minutes at N = 50k).
    mean, log_variance = _random_posteriors(40, 3)
    mean[3, 1] = math.nan
    metric = AggregatePosteriorKL(compile=False)
    metric.update(mean, log_variance)
    monkeypatch.setattr(metrics, "aggregate_log_densities_reference", lambda *args: pytest.fail("recomputed"))
    with pytest.warns(UserWarning, match=r"1 of 40 posteriors have a non-finite mean or log variance"):
        result = metric.compute()
    assert all(math.isnan(result[k].item()) for k in ("marginal_kl", "mutual_info", "total_correlation", "dimensionwise_kl"))


def test_auto_mode_compiles_no_more_shapes_than_dynamo_keeps(monkeypatch):
    # Past dynamo's recompile limit a new shape runs the chunk function uncompiled, holding a
    # (chunk, d, N) tensor: auto mode takes the eager path instead.
    z = torch.zeros(50_000, 10)
    monkeypatch.setattr(metrics, "compiler_available", lambda device: True)
    monkeypatch.setitem(metrics._COMPILER_STATE, "shapes", {(256, d, "cpu") for d in range(20, 20 + metrics._recompile_limit())})
    assert not metrics._use_compiler(None, z, 50_000, 256)
    assert metrics._use_compiler(None, torch.zeros(50_000, 20), 50_000, 256)  # a shape it has
    monkeypatch.setitem(metrics._COMPILER_STATE, "shapes", set())
    assert metrics._use_compiler(None, z, 50_000, 256)


def test_at_the_log_n_ceiling_total_correlation_takes_the_marginal_kls_excess():
    # Independent posteriors whose aggregate is exactly N(0, I): true marginal KL and total
    # correlation are 0. With an encoder separating every image (std 0.018), mutual information
    # sits at log N and the estimate's excess lands in total correlation: the README's metric
    # table says so ("independent posteriors whose true value is 0 read 32 nats at N = 2,000").
    n, variance = 2000, math.exp(-8.0)
    mean, log_variance = _gaussian_posteriors(n, 10, 1.0 - variance, variance)
    metric = AggregatePosteriorKL()
    metric.update(mean, log_variance)
    result = {k: v.item() for k, v in metric.compute().items()}
    assert result["mutual_info"] == pytest.approx(math.log(n), abs=1e-3)
    assert 30.0 < result["total_correlation"] < 34.0 and result["dimensionwise_kl"] < 0.5


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"must both be \(batch, latent_dim\), got \(4, 2\) and \(4, 3\)"):
        AggregatePosteriorKL().update(torch.zeros(4, 2), torch.zeros(4, 3))


def test_decomposition_of_the_rate_is_exact_and_matches_a_correlated_gaussian():
    # means ~ N(0, S) with correlated S, q(z|x) = N(mean, v I): the aggregate is N(0, S + v I).
    g = torch.Generator().manual_seed(2)
    s = torch.tensor([[1.5, 0.9], [0.9, 1.0]])
    v = 0.3
    mean = torch.randn(6000, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s.double()).T
    log_variance = torch.full_like(mean, math.log(v))
    metric = AggregatePosteriorKL(chunk_size=700)
    metric.update(mean.float(), log_variance.float())
    result = {k: v.item() for k, v in metric.compute().items()}
    c = s + v * torch.eye(2)
    expected_tc = 0.5 * (torch.log(torch.diag(c)).sum() - torch.logdet(c)).item()
    expected_dwkl = sum(0.5 * (cjj - 1 - math.log(cjj)) for cjj in torch.diag(c).tolist())
    assert result["total_correlation"] == pytest.approx(expected_tc, rel=0.1)
    assert result["dimensionwise_kl"] == pytest.approx(expected_dwkl, rel=0.05)
    assert result["rate"] == pytest.approx(
        result["mutual_info"] + result["total_correlation"] + result["dimensionwise_kl"], rel=1e-5
    )


def test_independent_aggregate_has_no_total_correlation():
    mean, log_variance = _gaussian_posteriors(4000, 3, 1.0, 0.2)
    metric = AggregatePosteriorKL()
    metric.update(mean, log_variance)
    assert abs(metric.compute()["total_correlation"].item()) < 0.03


def _realistic_posteriors(n, d, seed=0):
    # Trained-encoder-like: means ~ N(0, 1), log-variances uniform in [-6, 0] (std down to 0.05).
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, d, generator=g)
    log_variance = -6.0 * torch.rand(n, d, generator=g)
    return mean, log_variance


def _random_posteriors(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn(n, d, generator=g), 0.8 * torch.randn(n, d, generator=g) - 1.0


def _draws(mean, log_variance, seed=1):
    g = torch.Generator().manual_seed(seed)
    return mean + torch.randn(mean.shape, generator=g) * (0.5 * log_variance).exp()


def _reference_metric(mean, log_variance, monkeypatch, **kwargs):
    # The metric's formulas on top of the float64 definition of the log-densities.
    with monkeypatch.context() as patch:
        reference = lambda z, m, lv, chunk, compile: aggregate_log_densities_reference(z, m, lv, chunk)  # noqa: E731
        patch.setattr(metrics, "aggregate_log_densities", reference)
        metric = AggregatePosteriorKL(**kwargs)
        metric.update(mean, log_variance)
        return {k: v.item() for k, v in metric.compute().items()}


POSTERIOR_CASES = [
    # (posteriors, N, d, chunk_size): d = 1 and d = 10, N not a multiple of the chunk, chunk > N
    (_realistic_posteriors, 777, 1, 256),
    (_realistic_posteriors, 1000, 10, 300),
    (_realistic_posteriors, 500, 4, 5000),
    (_random_posteriors, 900, 10, 256),
    (_random_posteriors, 301, 2, 64),
]


@pytest.mark.parametrize("make, n, d, chunk", POSTERIOR_CASES)
def test_fast_log_densities_match_the_float64_definition(make, n, d, chunk):
    mean, log_variance = make(n, d)
    z = _draws(mean, log_variance)
    log_q, log_q_per_dim = aggregate_log_densities(z, mean, log_variance, chunk, compile=False)
    expected_log_q, expected_per_dim = aggregate_log_densities_reference(z, mean, log_variance, chunk)
    assert log_q.dtype == log_q_per_dim.dtype == torch.float64
    assert log_q.shape == (n,) and log_q_per_dim.shape == (n, d)
    # per value within 1e-3 nats (measured: <= 2e-4, in the sorted chunks' sparse tails), and
    # on average within 1e-5, which is what the metrics see.
    torch.testing.assert_close(log_q, expected_log_q, rtol=0, atol=1e-3)
    torch.testing.assert_close(log_q_per_dim, expected_per_dim, rtol=0, atol=1e-3)
    assert abs((log_q - expected_log_q).mean().item()) < 1e-5
    assert abs((log_q_per_dim - expected_per_dim).sum(dim=1).mean().item()) < 1e-5


@pytest.mark.parametrize("make, n, d, chunk", POSTERIOR_CASES)
def test_metrics_match_the_float64_definition_within_a_thousandth_of_a_nat(make, n, d, chunk, monkeypatch):
    mean, log_variance = make(n, d, seed=3)
    expected = _reference_metric(mean, log_variance, monkeypatch, chunk_size=chunk)
    metric = AggregatePosteriorKL(chunk_size=chunk, compile=False)
    metric.update(mean, log_variance)
    result = {k: v.item() for k, v in metric.compute().items()}
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-3), key
    assert result["rate"] == expected["rate"]  # closed form, untouched


@pytest.mark.parametrize("log_variance_value", [-10.0, -14.0, -20.0, -30.0, -60.0])
def test_the_eager_path_is_exact_for_very_narrow_posteriors(log_variance_value, monkeypatch):
    # A std of 7e-3 to 1e-13: 1 / (2 var) up to 5e25, where the expanded square (u - w)^2 cancels
    # in float32 (at -10 it was 0.02 nats off, at -20 it overflowed: dimension-wise KL inf and
    # total correlation -inf), and the joint's float64 expansion too (at -30 0.14 nats off, at -60
    # 1.9e12: a mutual information of -1.5e10). Those take the direct difference.
    generator = torch.Generator().manual_seed(2)
    mean = torch.randn(600, 4, generator=generator)
    log_variance = torch.full_like(mean, log_variance_value)
    z = _draws(mean, log_variance)
    fast = aggregate_log_densities(z, mean, log_variance, compile=False)
    for got, expected in zip(fast, aggregate_log_densities_reference(z, mean, log_variance)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    expected_metrics = _reference_metric(mean, log_variance, monkeypatch)
    metric = AggregatePosteriorKL(compile=False)
    metric.update(mean, log_variance)
    for key, value in metric.compute().items():
        assert value.item() == pytest.approx(expected_metrics[key], abs=1e-3), key


def test_points_far_from_every_component_are_recomputed_exactly():
    # Exponents of -1e4 nats underflow float32: those rows go through the float64 definition.
    mean, log_variance = _realistic_posteriors(200, 3)
    z = torch.tensor([[60.0, 0.0, 0.0], [0.0, -40.0, 30.0], [0.1, 0.2, -0.3]])
    fast = aggregate_log_densities(z, mean, log_variance, compile=False)
    for got, expected in zip(fast, aggregate_log_densities_reference(z, mean, log_variance)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_compile_argument_is_validated_and_auto_mode_skips_the_compiler_for_small_sets():
    with pytest.raises(ValueError, match=r"compile must be True, False or None \(auto\), got 'yes'"):
        AggregatePosteriorKL(compile="yes")
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int, got 0"):
        aggregate_log_densities(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), chunk_size=0)
    with pytest.raises(ValueError, match=r"same d, got \(2, 1\), \(3, 2\) and \(3, 2\)"):
        aggregate_log_densities(torch.zeros(2, 1), torch.zeros(3, 2), torch.zeros(3, 2))
    z = torch.zeros(5000, 10)
    assert not metrics._use_compiler(None, z, 5000, 256)  # 2.5e8 terms: eager is quicker than compiling
    assert not metrics._use_compiler(False, z, 50_000, 256)
    assert metrics._use_compiler(True, z, 10, 256)


@pytest.mark.timeout(300)
@pytest.mark.skipif(not compiler_available("cpu"), reason="torch.compile needs a C++ compiler on CPU")
def test_compiled_path_equals_the_eager_fallback_and_the_definition():
    # One small compile (chunk 64, d = 3; seconds with a warm inductor cache): N = 301 pads
    # the last chunk, and the far points exercise the recomputation on this path too.
    mean, log_variance = _realistic_posteriors(301, 3, seed=4)
    z = torch.cat([_draws(mean, log_variance), torch.tensor([[60.0, 0.0, 0.0], [0.0, -40.0, 30.0]])])
    compiled = aggregate_log_densities(z, mean, log_variance, 64, compile=True)
    eager = aggregate_log_densities(z, mean, log_variance, 64, compile=False)
    reference = aggregate_log_densities_reference(z, mean, log_variance, 64)
    for got_compiled, got_eager, expected in zip(compiled, eager, reference):
        torch.testing.assert_close(got_compiled, expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(got_compiled, got_eager, rtol=0, atol=1e-3)
    metric = AggregatePosteriorKL(chunk_size=64, compile=True)
    metric.update(mean, log_variance)
    fallback = AggregatePosteriorKL(chunk_size=64, compile=False)
    fallback.update(mean, log_variance)
    for key, value in fallback.compute().items():
        assert metric.compute()[key].item() == pytest.approx(value.item(), abs=1e-4), key


@pytest.mark.timeout(300)
@pytest.mark.skipif(not compiler_available("cpu"), reason="torch.compile needs a C++ compiler on CPU")
def test_rows_far_below_the_compiled_bound_get_their_joint_in_float64_and_keep_their_per_dimension_sums(monkeypatch):
    # 128 latent dimensions of log variances spread over [-40, 0] put every row's joint more than
    # 1000 nats below the bound the compiled kernel shifts by: each whole row went through the
    # per-dimension float64 reference (18-53 s at N = 1000, d = 256), where the joint alone needs it.
    g = torch.Generator().manual_seed(0)
    mean, log_variance = torch.randn(64, 128, generator=g), -40 * torch.rand(64, 128, generator=g)
    z = mean + torch.randn(64, 128, generator=g) * (0.5 * log_variance).exp()
    reference = aggregate_log_densities_reference(z, mean, log_variance, 64)
    rows = []
    monkeypatch.setattr(metrics, "aggregate_log_densities_reference", lambda z, *args: rows.append(len(z)))
    joint, per_dim = aggregate_log_densities(z, mean, log_variance, 64, compile=True)
    assert rows == []  # no row needed the whole reference
    torch.testing.assert_close(joint, reference[0], rtol=0, atol=1e-9)  # float64: the compiled float32 is ~1e-5 off
    torch.testing.assert_close(per_dim, reference[1], rtol=0, atol=1e-4)


def test_latent_activity_counts_active_units_and_splits_the_rate_by_dimension():
    g = torch.Generator().manual_seed(0)
    mean = torch.zeros(1000, 4)
    mean[:, 0] = torch.randn(1000, generator=g)  # active
    mean[:, 1] = 0.05 * torch.randn(1000, generator=g)  # variance 0.0025: inactive
    mean[:, 2] = 0.5  # constant: inactive
    log_variance = torch.full((1000, 4), math.log(0.5))
    metric = LatentActivity(threshold=0.01)
    for part_mean, part_log_variance in zip(mean.split(300), log_variance.split(300)):
        metric.update(part_mean, part_log_variance)
    result = metric.compute()
    assert result["active_units"].item() == 1
    expected = 0.5 * (mean.pow(2) + 0.5 - 1 - math.log(0.5)).mean(dim=0)
    torch.testing.assert_close(result["kl_per_dim"], expected, rtol=1e-5, atol=1e-6)
    assert result["mean_variance"][0].item() == pytest.approx(mean[:, 0].var(unbiased=False).item(), rel=1e-5)
    # A NaN in some dimension makes the count NaN (NaN > threshold is False: it read 1, as if inactive).
    mean[7, 3] = math.nan
    metric.reset()
    metric.update(mean, log_variance)
    assert math.isnan(metric.compute()["active_units"].item())


def test_sum_states_are_moved_but_never_cast_by_a_cast_of_the_module():
    # bf16-true casts the whole module: a bf16 count is exact only to 256 (10,010 read 9,984).
    activity, reading = LatentActivity(), MeanWithStandardError()
    activity.to(torch.bfloat16), reading.to(torch.bfloat16)
    for _ in range(10):
        activity.update(torch.ones(1001, 2), torch.zeros(1001, 2))
        reading.update(torch.full((1001,), 0.25))
    assert activity.count.dtype == reading.count.dtype == torch.float64
    assert activity.count.item() == reading.count.item() == 10010
    assert reading.compute()["mean"].item() == 0.25
    torch.testing.assert_close(activity.compute()["kl_per_dim"], torch.full((2,), 0.5))
    activity.reset()
    assert activity.count.dtype == torch.float64  # the defaults too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics_on_rank(rank, world_size, port, mean, log_variance, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        aggregate, activity, reading = AggregatePosteriorKL(chunk_size=64), LatentActivity(), MeanWithStandardError()
        share = mean.shape[0] // world_size
        for batch in torch.arange(rank * share, (rank + 1) * share).split(50):
            aggregate.update(mean[batch], log_variance[batch])
            activity.update(mean[batch], log_variance[batch])
            reading.update(mean[batch, 0].exp())  # any per-example value
        readings = {f"reading_{k}": v for k, v in reading.compute().items()}
        torch.save({**aggregate.compute(), **activity.compute(), **readings}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_ddp_processes_give_the_same_estimates_as_one(tmp_path):
    mean, log_variance = _gaussian_posteriors(400, 3, 1.0, 0.3)
    log_variance = log_variance + 0.2 * torch.randn(400, 3, generator=torch.Generator().manual_seed(5))
    torch.multiprocessing.spawn(
        _metrics_on_rank, args=(2, _free_port(), mean, log_variance, str(tmp_path)), nprocs=2, join=True
    )
    single = {}
    aggregate, activity, reading = AggregatePosteriorKL(chunk_size=1000), LatentActivity(), MeanWithStandardError()
    aggregate.update(mean, log_variance)
    activity.update(mean, log_variance)
    reading.update(mean[:, 0].exp())
    single = {**aggregate.compute(), **activity.compute(), **{f"reading_{k}": v for k, v in reading.compute().items()}}
    for rank in (0, 1):
        ddp = torch.load(tmp_path / f"rank{rank}.pt")
        assert ddp.keys() == single.keys()
        for key, value in single.items():
            torch.testing.assert_close(ddp[key], value, rtol=1e-6, atol=1e-6, msg=key)


def test_mean_with_standard_error_is_the_sample_formula_over_uneven_batches():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(1000, generator=g).pow(4) * 0.01  # skewed, like per-image MSEs
    metric = MeanWithStandardError()
    for part in values.split([1, 600, 399]):
        metric.update(part)
    result = metric.compute()
    expected = values.double().std(unbiased=True) / math.sqrt(values.numel())
    assert result["mean"].item() == pytest.approx(values.double().mean().item(), rel=1e-6)
    assert result["standard_error"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_mean_with_standard_error_of_two_ranks_equals_one_over_all_their_values():
    # DDP sums the states over ranks: merging them must equal one metric over every value.
    g = torch.Generator().manual_seed(1)
    first, second = torch.randn(37, generator=g), torch.randn(64, generator=g) + 2.0
    rank0, rank1, whole = MeanWithStandardError(), MeanWithStandardError(), MeanWithStandardError()
    rank0.update(first)
    rank1.update(second)
    whole.update(torch.cat([first, second]))
    rank0.merge_state(rank1)
    for key, value in whole.compute().items():
        assert rank0.compute()[key].item() == pytest.approx(value.item(), rel=1e-6)


def test_mean_with_standard_error_needs_two_values_and_one_value_per_example():
    metric = MeanWithStandardError()
    metric.update(torch.tensor([0.5]))
    assert metric.compute()["mean"].item() == 0.5
    assert math.isnan(metric.compute()["standard_error"].item())  # no spread to measure
    with pytest.raises(ValueError, match=r"one value per example, shape \(N,\), got \(4, 1\)"):
        metric.update(torch.zeros(4, 1))


@pytest.mark.parametrize("block", [7, 1, 50])
def test_the_eager_path_in_any_block_size_matches_the_definition(block, monkeypatch):
    # Blocks of 7 (or 1) components: many blocks, a last partial one, maxima found in late blocks;
    # 50: one block of all N components, as on a GPU.
    monkeypatch.setattr(metrics, "_eager_block_size", lambda device, n, chunk_size: block)
    mean, log_variance = _realistic_posteriors(50, 3)
    z = _draws(mean, log_variance)
    log_q, log_q_per_dim = aggregate_log_densities(z, mean, log_variance, 16, compile=False)
    expected_log_q, expected_per_dim = aggregate_log_densities_reference(z, mean, log_variance, 16)
    torch.testing.assert_close(log_q, expected_log_q, rtol=0, atol=1e-4)
    torch.testing.assert_close(log_q_per_dim, expected_per_dim, rtol=0, atol=1e-4)


def test_the_eager_path_blocks_for_the_cpu_cache_and_takes_tiles_of_bounded_size_elsewhere():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert metrics._eager_block_size(cpu, 50_000, 256) == 512
    assert metrics._eager_block_size(cuda, 50_000, 256) == 50_000  # one block: 256 x 50,000 elements
    assert metrics._eager_block_size(cuda, 500_000, 256) == 65_536  # 2**24 elements per tile
    assert metrics._eager_block_size(cuda, 500_000, 2**20) == 512  # never below the CPU's block
    assert metrics._eager_block_size(cuda, 3, 256) == 3


def test_the_eager_path_asks_for_its_block_size_with_the_device_the_sizes_and_uses_it(monkeypatch):
    asked = []

    def block_size(device, n, chunk_size):
        asked.append((device, n, chunk_size))
        return 3

    monkeypatch.setattr(metrics, "_eager_block_size", block_size)
    blocks = {"_eager_per_dim_sums": [], "_eager_joint": []}  # the block size each pass was given

    def spy(name):
        original = getattr(metrics, name)

        def call(*args):
            blocks[name].append(args[-1])
            return original(*args)

        monkeypatch.setattr(metrics, name, call)

    spy("_eager_per_dim_sums")
    spy("_eager_joint")
    mean, log_variance = _realistic_posteriors(20, 2)
    aggregate_log_densities(_draws(mean, log_variance), mean, log_variance, 8, compile=False)
    assert asked == [(torch.device("cpu"), 20, 8)]
    assert blocks == {"_eager_per_dim_sums": [3], "_eager_joint": [3]}


def test_a_block_of_infinitely_wide_components_does_not_poison_the_joint():
    # The first block's exponents are all -inf (infinite variances): the running maximum must
    # still give the later, finite blocks' log-sum-exp, as one pass over all components does.
    mean = torch.zeros(10, 2)
    log_variance = torch.zeros(10, 2)
    log_variance[:4] = float("inf")
    z = torch.tensor([[0.1, -0.2], [1.0, 0.5], [-2.0, 0.0]])
    joint = metrics._eager_joint(z, mean, log_variance, 2, 4)
    finite = aggregate_log_densities_reference(z, mean[4:], log_variance[4:], 2)[0] + math.log(6)
    torch.testing.assert_close(joint, finite, rtol=0, atol=1e-6)


def test_states_reset_under_inference_mode_take_updates_outside_it():
    # trainer.validate resets the metrics under inference mode; a later fit validates under
    # no_grad, where an in-place update of an inference tensor raised (the README's own model).
    values, mean, log_variance = torch.rand(8), torch.randn(8, 3), torch.randn(8, 3)
    reading, activity = MeanWithStandardError(), LatentActivity()
    with torch.inference_mode():
        reading.update(values), activity.update(mean, log_variance)
        reading.compute(), activity.compute()
        reading.reset(), activity.reset()
    with torch.no_grad():
        reading.update(values), activity.update(mean, log_variance)
    assert reading.compute()["mean"] == values.double().mean().float()
    expected = gaussian_kl_per_dimension(mean.double(), log_variance.double()).mean(0).float()
    torch.testing.assert_close(activity.compute()["kl_per_dim"], expected)


def test_another_order_of_the_same_posteriors_reads_within_the_monte_carlo_noise():
    # A 2-rank run gathers the validation images dealt out in turn: other draws, so the estimates
    # move by about their own spread over seeds (the README's DDP section), not to the bit.
    mean, log_variance = _random_posteriors(300, 4, seed=7)
    order = torch.cat([torch.arange(0, 300, 2), torch.arange(1, 300, 2)])

    def estimates(m, lv, seed=0):
        metric = AggregatePosteriorKL(seed=seed, compile=False)
        metric.update(m, lv)
        return metric.compute()

    two = estimates(mean[order], log_variance[order])
    seeds = [estimates(mean, log_variance, seed) for seed in range(8)]
    assert two["rate"] == pytest.approx(seeds[0]["rate"].item(), rel=1e-6)  # closed form: any order
    for key in ("marginal_kl", "mutual_info", "total_correlation", "dimensionwise_kl"):
        values = torch.stack([estimate[key] for estimate in seeds])
        assert two[key] != seeds[0][key] and abs(two[key] - values.mean()) < 3 * values.std(), key

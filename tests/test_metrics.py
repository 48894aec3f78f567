import math
import os
import socket

import pytest
import torch

from lightning_geco.metrics import AggregatePosteriorKL, LatentActivity, aggregate_log_densities


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics_on_rank(rank, world_size, port, mean, log_variance, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        aggregate, activity = AggregatePosteriorKL(chunk_size=64), LatentActivity()
        share = mean.shape[0] // world_size
        for batch in torch.arange(rank * share, (rank + 1) * share).split(50):
            aggregate.update(mean[batch], log_variance[batch])
            activity.update(mean[batch], log_variance[batch])
        torch.save({**aggregate.compute(), **activity.compute()}, f"{out}/rank{rank}.pt")
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
    aggregate, activity = AggregatePosteriorKL(chunk_size=1000), LatentActivity()
    aggregate.update(mean, log_variance)
    activity.update(mean, log_variance)
    single = {**aggregate.compute(), **activity.compute()}
    for rank in (0, 1):
        ddp = torch.load(tmp_path / f"rank{rank}.pt")
        assert ddp.keys() == single.keys()
        for key, value in single.items():
            torch.testing.assert_close(ddp[key], value, rtol=1e-6, atol=1e-6, msg=key)

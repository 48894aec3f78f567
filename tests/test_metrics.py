import math

import pytest
import torch

from lightning_geco.metrics import AggregatePosteriorKL, log_aggregate_posterior


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
    torch.testing.assert_close(log_aggregate_posterior(z, mean, log_variance, chunk_size=2), brute)


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

"""GAN: sampling is the generator's push-forward of N(0, I); log p is refused; the MMD
two-sample test is checked against a brute-force MMD^2, is calibrated under the null and
rejects under an alternative; a trained GAN on an 8-mode ring is far closer (MMD) to
held-out data than an untrained generator."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy import stats

from genprog.models.gan import GAN, mlp, ring_of_gaussians, two_sample_test


def test_sample_is_the_generators_push_forward_of_a_standard_normal():
    torch.manual_seed(0)
    gen = mlp(3, (8,), 2)
    gan = GAN(generator=gen, discriminator=mlp(2, (8,), 1), latent_dim=3)
    draws = gan.sample(20000, seed=0)
    assert draws["z"].shape == (20000, 3) and draws["y"].shape == (20000, 2)
    with torch.no_grad():
        torch.testing.assert_close(draws["y"], gen(draws["z"]))
    z = draws["z"]
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=0.04, rtol=0)  # 4 sd of the mean
    torch.testing.assert_close(z.std(0), torch.ones(3), atol=0.03, rtol=0)
    assert gan.push(torch.zeros(4, 3)).shape == (4, 2)


def test_log_p_is_unavailable_and_says_why():
    gan = GAN(generator=torch.nn.Linear(2, 3), latent_dim=2)
    caps = GAN.capabilities()
    assert caps["log_prob"] == "unavailable" and caps["log_marginal"] == "unavailable"
    assert caps["mle"] == "adversarial" and caps["sample"] == "exact"
    y = torch.zeros(3)
    with pytest.raises(ValueError, match="implicit model"):
        gan.log_prob(y=y)
    with pytest.raises(ValueError, match="no density"):
        gan.condition(y=y.expand(4, 3)).log_marginal()


def test_input_validation():
    with pytest.raises(TypeError, match="generator"):
        GAN(generator=lambda z: z, latent_dim=2)
    with pytest.raises(ValueError, match="latent_dim"):
        GAN(generator=torch.nn.Linear(2, 3), latent_dim=0)
    with pytest.raises(ValueError, match="discriminator"):
        GAN(generator=torch.nn.Linear(2, 3), discriminator=torch.nn.Linear(3, 2), latent_dim=2)
    with pytest.raises(ValueError, match="dimensions"):
        two_sample_test(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="NaN"):
        two_sample_test(torch.full((5, 2), float("nan")), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="N >= 2"):
        GAN.mle(torch.zeros(1, 2), steps=1)


def test_mmd2_matches_a_brute_force_double_loop():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 2, generator=g), torch.randn(5, 2, generator=g) + 0.5
    h = 0.9

    def k(a, b):
        return float(torch.exp(-((a - b) ** 2).sum() / (2 * h * h)))

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    res = two_sample_test(x, y, bandwidth=h, num_permutations=50)
    assert abs(res.mmd2 - (xx + yy - 2 * xy)) < 1e-6  # float32 kernel values in the loop
    assert res.sizes == (6, 5) and 0 < res.p_value <= 1


def test_mmd_permutation_test_is_calibrated():
    """Same distribution: p-values roughly uniform and the rejection rate at 5% near 5%
    over 200 repetitions; different distributions: rejected every time."""
    g = torch.Generator().manual_seed(1)
    pvals = []
    for rep in range(200):
        a = torch.randn(30, 2, generator=g)
        b = torch.randn(30, 2, generator=g)
        pvals.append(two_sample_test(a, b, num_permutations=99, seed=rep).p_value)
    pvals = torch.tensor(pvals)
    rate = float((pvals <= 0.05).double().mean())
    assert 0.01 <= rate <= 0.11, rate  # binomial(200, 0.05): sd 0.015
    # p-values live on the grid {1/100, ..., 1}; KS against the uniform is conservative here
    assert stats.kstest(pvals.numpy(), "uniform").pvalue > 1e-3
    for rep in range(20):
        a = torch.randn(30, 2, generator=g)
        b = torch.randn(30, 2, generator=g) * torch.tensor([1.0, 2.5]) + torch.tensor([0.8, 0.0])
        assert two_sample_test(a, b, num_permutations=99, seed=rep).p_value <= 0.05


def test_trained_gan_is_far_closer_to_held_out_data_than_an_untrained_one():
    train, held_out = ring_of_gaussians(2000, seed=0), ring_of_gaussians(400, seed=1)
    gan = GAN.mle(train, latent_dim=2, hidden=(32, 32), steps=400, batch_size=64,
                  learning_rate=2e-3, seed=0, progress=False)
    assert len(gan.info["generator_loss"]) == len(gan.info["discriminator_loss"]) == 400
    torch.manual_seed(0)
    untrained = GAN(generator=mlp(2, (32, 32), 2), latent_dim=2)
    t_trained = gan.two_sample_test(held_out, seed=0, num_permutations=100)
    t_untrained = untrained.two_sample_test(held_out, seed=0, num_permutations=100)
    assert t_untrained.p_value <= 0.01
    assert t_trained.mmd2 < 0.05 * t_untrained.mmd2, (t_trained, t_untrained)
    # the samples lie near the ring (radius 2), not on a blob at the origin
    radius = gan.sample(1000, seed=1)["y"].norm(dim=1)
    assert abs(float(radius.median()) - 2.0) < 0.3


@pytest.mark.slow
def test_longer_training_covers_all_eight_modes():
    train, held_out = ring_of_gaussians(4000, seed=0), ring_of_gaussians(1000, seed=1)
    gan = GAN.mle(train, latent_dim=2, hidden=(64, 64), steps=3000, batch_size=128, seed=0,
                  progress=False)
    y = gan.sample(4000, seed=2)["y"]
    angle = torch.atan2(y[:, 1], y[:, 0])
    mode = torch.round(angle / (2 * torch.pi / 8)).long() % 8
    counts = torch.bincount(mode, minlength=8).double() / len(y)
    assert float(counts.min()) > 0.05, counts  # every mode gets a share (1/8 = 0.125 ideal)
    res = gan.two_sample_test(held_out, seed=0, num_permutations=200, bandwidth=0.3)
    untrained = GAN(generator=mlp(2, (64, 64), 2), latent_dim=2).two_sample_test(
        held_out, seed=0, num_permutations=200, bandwidth=0.3)
    assert res.mmd2 < 0.05 * untrained.mmd2

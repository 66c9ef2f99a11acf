"""Energy-based models: AIS log Z calibrated against the closed-form normaliser of a
quadratic energy and of an unnormalised Gaussian-mixture energy (SciPy / closed form);
MALA samples, conditional samples and marginal log p against exact Gaussian and mixture
references (MMD two-sample test, moments, SciPy log densities); training by score
matching and contrastive divergence beats uniform noise (slow: beats a Gaussian fit in
AIS held-out log-likelihood)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.stats as st
import torch

from genprog.errors import ConvergenceWarning
from genprog.models.ebm import (
    EnergyBasedModel,
    EnergyNet,
    GaussianEnergy,
    GaussianMixtureEnergy,
)
from genprog.models.two_sample import mmd_test

D64 = torch.float64
MEAN = np.array([1.0, -0.5, 0.3])
COV = np.array([[1.0, 0.5, -0.2], [0.5, 0.8, 0.1], [-0.2, 0.1, 0.6]])
OFFSET = 0.7
W = np.array([0.3, 0.7])
MU = np.array([[-1.5, 0.5], [1.0, -0.5]])
S = np.array([[[0.3, 0.1], [0.1, 0.2]], [[0.25, -0.05], [-0.05, 0.4]]])
LOG_SCALE = 1.3


def _gaussian_model():
    energy = GaussianEnergy(torch.tensor(MEAN), torch.tensor(np.linalg.inv(COV)), OFFSET)
    return EnergyBasedModel(energy=energy, dim=3)


def _mixture_model():
    energy = GaussianMixtureEnergy(torch.tensor(W), torch.tensor(MU), torch.tensor(S), LOG_SCALE)
    return EnergyBasedModel(energy=energy, dim=2)


def _mixture_draws(n, seed, weights=W):
    rng = np.random.default_rng(seed)
    k = rng.choice(2, size=n, p=weights)
    return torch.tensor(np.stack([rng.multivariate_normal(MU[j], S[j]) for j in k]))


def _mixture_logpdf(x):
    return np.logaddexp.reduce([np.log(W[k]) + st.multivariate_normal(MU[k], S[k]).logpdf(x)
                                for k in range(2)], axis=0)


# exact log Z: for exp(-(x-m)^T P (x-m)/2 - c) it is log((2 pi)^(d/2) det(COV)^(1/2)) - c
GAUSS_LOG_Z = 0.5 * 3 * math.log(2 * math.pi) + 0.5 * math.log(np.linalg.det(COV)) - OFFSET


@pytest.mark.parametrize("case", ["gaussian", "mixture"])
def test_ais_log_partition_is_calibrated(case):
    m, exact = (_gaussian_model(), GAUSS_LOG_Z) if case == "gaussian" else (_mixture_model(), LOG_SCALE)
    est = m.log_partition_estimate(num_particles=256, num_temps=200, seed=0)
    assert est.method == "ais" and 0 < est.stderr < 0.05
    assert abs(est.value - exact) < 4 * est.stderr, (est, exact)


def test_log_prob_estimate_and_log_marginal_are_calibrated():
    m = _mixture_model()
    y = _mixture_draws(5, seed=0)
    exact = float(_mixture_logpdf(y.numpy()).sum())
    est = m.log_prob_estimate(y, num_temps=200, seed=1)
    assert abs(est.value - exact) < 4 * est.stderr and est.stderr < 0.25
    lm = m.condition(y=y).log_marginal(num_temps=200)
    assert lm.method == "ais" and lm.details["chosen_by_auto"]
    assert abs(lm.value - exact) < 4 * lm.stderr
    with pytest.raises(ValueError, match="log_prob_estimate"):
        m.log_prob(y=y)


def test_mala_samples_match_exact_draws():
    m = _mixture_model()
    y = m.sample(800, seed=0, steps=400)["y"]
    assert y.shape == (800, 2) and 0.4 < m.info["last_sample"]["acceptance_rate"] < 0.8
    assert mmd_test(y, _mixture_draws(800, seed=1), num_permutations=200).p_value > 0.01
    # power at this size: the mixture with its weights swapped is rejected
    assert mmd_test(y, _mixture_draws(800, seed=2, weights=W[::-1]),
                    num_permutations=200).p_value < 0.01
    z = m.sample(800, seed=3, steps=150, init="ais", num_temps=100)["y"]
    assert mmd_test(z, _mixture_draws(800, seed=4), num_permutations=200).p_value > 0.01


def test_langevin_gaussian_moments():
    m = _gaussian_model()
    y = m.sample(2000, seed=0, steps=300)["y"].numpy()
    se = np.sqrt(np.diag(COV) / 2000)
    assert np.all(np.abs(y.mean(0) - MEAN) < 4 * se)
    np.testing.assert_allclose(np.cov(y.T), COV, atol=0.12)
    u = m.sample(2000, seed=1, steps=400, method="ula", step_size=0.02)["y"].numpy()
    assert np.all(np.abs(u.mean(0) - MEAN) < 4 * se + 0.02)


def _gaussian_conditional(given, values):
    rest = [i for i in range(3) if i not in given]
    s12 = COV[np.ix_(rest, given)]
    s22 = COV[np.ix_(given, given)]
    mean = MEAN[rest] + s12 @ np.linalg.solve(s22, np.asarray(values) - MEAN[given])
    cov = COV[np.ix_(rest, rest)] - s12 @ np.linalg.solve(s22, s12.T)
    return mean, cov


def test_conditional_samples_and_log_prob_match_the_gaussian_conditional():
    m = _gaussian_model()
    cond = m.condition(dims={1: 0.4})
    mean, cov = _gaussian_conditional([1], [0.4])
    y = cond.sample(1000, seed=0, steps=300)["y"]
    assert y.shape == (1000, 2)
    exact = torch.tensor(np.random.default_rng(0).multivariate_normal(mean, cov, size=1000))
    assert mmd_test(y, exact, num_permutations=200).p_value > 0.01
    se = np.sqrt(np.diag(cov) / 1000)
    assert np.all(np.abs(y.numpy().mean(0) - mean) < 4 * se)
    pts = np.array([[1.0, 0.0], [0.5, 0.8]])
    est = cond.log_prob(pts, num_temps=150)
    ref = st.multivariate_normal(mean, cov).logpdf(pts).sum()
    assert abs(est.value - ref) < 4 * est.stderr and est.stderr < 0.1


def test_marginal_log_prob_is_calibrated_against_the_gaussian_marginal():
    m = _gaussian_model()
    marg = m.marginalize(dims=[0])
    assert marg.sample(5, seed=0, steps=50)["y"].shape == (5, 2)
    y = np.array([-0.2, 0.5])
    est = marg.log_prob(y, num_temps=150)
    ref = st.multivariate_normal(MEAN[1:], COV[1:, 1:]).logpdf(y)
    assert abs(est.value - ref) < 4 * est.stderr and est.stderr < 0.1


def _train(method, steps, **kw):
    y = _mixture_draws(1000, seed=0).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return EnergyBasedModel.mle(y, method=method, max_iters=steps, window=100, **kw)


@pytest.mark.parametrize("method,kw", [
    ("score_matching", {}),
    ("score_matching", {"noise_scale": None}),
    ("contrastive_divergence", {"cd_steps": 10, "buffer_size": 1000}),
], ids=["dsm", "sliced", "cd"])
def test_training_prefers_held_out_data_to_noise(method, kw):
    m = _train(method, 200, hidden=(32, 32), batch_size=128, **kw)
    held = _mixture_draws(500, seed=1).float()
    noise = torch.rand(500, 2, generator=torch.Generator().manual_seed(0)) * 8 - 4
    # log p(held) - log p(noise) = E(noise) - E(held): the normaliser cancels
    gap = float(m.energy(noise).mean() - m.energy(held).mean())
    assert gap > 1.0, gap
    if method == "score_matching":
        trace = m.info["loss_trace"]
        assert np.mean(trace[-50:]) < np.mean(trace[:50])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["score_matching", "contrastive_divergence"])
def test_trained_ebm_beats_a_gaussian_in_held_out_log_likelihood(method):
    y = _mixture_draws(3000, seed=0)
    held = _mixture_draws(500, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        m = EnergyBasedModel.mle(y.float(), method=method, max_iters=3000)
    m = m.to(dtype=D64)
    est = m.log_prob_estimate(held, num_particles=512, num_temps=400)
    per_row = est.value / 500
    gauss = st.multivariate_normal(y.mean(0).numpy(), np.cov(y.numpy().T)).logpdf(held.numpy()).mean()
    truth = _mixture_logpdf(held.numpy()).mean()
    assert per_row > gauss + 0.1 and est.stderr / 500 < 0.05, (per_row, gauss, truth)


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="nn.Module"):
        EnergyBasedModel(energy=lambda x: x.sum(-1), dim=2)
    with pytest.raises(ValueError, match="dim"):
        EnergyBasedModel(energy=EnergyNet(2), dim=0)
    with pytest.raises(ValueError, match="must return"):
        EnergyBasedModel(energy=torch.nn.Linear(2, 2), dim=2)
    with pytest.raises(ValueError, match="base_scale"):
        EnergyBasedModel(energy=EnergyNet(2), dim=2, base_scale=-1.0)
    m = EnergyBasedModel(energy=EnergyNet(2), dim=2)
    with pytest.raises(ValueError, match="method"):
        m.sample(2, method="hmc")
    with pytest.raises(ValueError, match="step_size"):
        m.sample(2, method="ula")
    with pytest.raises(ValueError, match="dimension index"):
        m.condition(dims={5: 0.0})
    with pytest.raises(ValueError, match="method"):
        EnergyBasedModel.mle(torch.zeros(4, 2), method="nce")
    with pytest.raises(ValueError, match="finite"):
        EnergyBasedModel.mle(torch.tensor([[float("inf"), 0.0], [0.0, 0.0]]))
    with pytest.raises(TypeError, match="unknown option"):
        EnergyBasedModel.mle(torch.zeros(4, 2), max_iters=1, temperature=2.0)


@pytest.mark.gpu
def test_runs_on_cuda():
    m = _mixture_model().to("cuda")
    y = m.sample(64, seed=0, steps=50)["y"]
    assert y.device.type == "cuda"
    est = m.log_partition_estimate(num_particles=64, num_temps=50)
    assert math.isfinite(est.value)
    assert m.condition(dims={0: 0.5}).sample(8, seed=0, steps=20)["y"].device.type == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for method in ("score_matching", "contrastive_divergence"):
            t = EnergyBasedModel.mle(_mixture_draws(200, seed=0).float().cuda(), method=method,
                                     hidden=(16,), max_iters=20, window=10)
            assert next(t.energy_net.parameters()).device.type == "cuda"

"""AR(p): exact (stationary) log p against statsmodels ARIMA(p,0,0) and SciPy's
multivariate normal with the stationary autocovariance (statsmodels ``arma_acovf``);
conditional log p and least-squares MLE against statsmodels AutoReg; forecasts against
Gaussian conditioning. DiscreteAR: log p, multi-step prediction and count MLE against
brute-force enumeration.

Tolerances: 1e-8 (float64) against exact references."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from scipy.linalg import toeplitz
from scipy.stats import multivariate_normal
from statsmodels.tsa.ar_model import AutoReg
from statsmodels.tsa.arima.model import ARIMA
from statsmodels.tsa.arima_process import arma_acovf

from genprog.models.autoregressive import AR, DiscreteAR

D = torch.float64
PHI = np.array([0.5, -0.3, 0.2])
SIGMA, C = 0.8, 1.0
MU = C / (1 - PHI.sum())


def ar(T=40):
    return AR(coefs=torch.tensor(PHI, dtype=D), sigma=torch.tensor(SIGMA, dtype=D),
              intercept=torch.tensor(C, dtype=D), length=T)


def acov(n):
    return arma_acovf(np.r_[1, -PHI], np.array([1.0]), nobs=n, sigma2=SIGMA ** 2)


@pytest.mark.reference("AR", "log_prob", "statsmodels ARIMA(p,0,0).loglike; SciPy MVN with arma_acovf")
@pytest.mark.reference("AR", "log_marginal", "statsmodels ARIMA(p,0,0).loglike")
def test_exact_log_prob_matches_arima_and_stationary_gaussian():
    m = ar(40)
    y = m.sample(2, seed=0)["y"]
    lp = m.log_prob(y=y, pointwise=True)
    mod = ARIMA(y[0].numpy(), order=(3, 0, 0), trend="c")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = mod.loglike(np.r_[MU, PHI, SIGMA ** 2])
    assert abs(float(lp[0]) - ref) < 1e-6
    for T in (2, 3, 7):  # shorter than, equal to and longer than p
        yt = y[1, :T].numpy()
        ref = multivariate_normal(np.full(T, MU), toeplitz(acov(T))).logpdf(yt)
        assert abs(float(m.log_prob(y=y[1, :T])) - ref) < 1e-8
    est = m.condition(y=y).log_marginal()
    assert est.method == "exact" and abs(est.value - float(lp.sum())) < 1e-9


@pytest.mark.reference("AR", "mle", "statsmodels AutoReg(trend='c') params, sigma2 and llf")
def test_least_squares_mle_and_conditional_log_prob_match_autoreg():
    y = ar(300).sample(1, seed=1)["y"][0]
    res = AutoReg(y.numpy(), lags=3, trend="c").fit()
    fit = AR.mle(y, order=3)
    np.testing.assert_allclose(fit.kwargs["coefs"].numpy(), res.params[1:], atol=1e-8)
    assert abs(float(fit.kwargs["intercept"]) - res.params[0]) < 1e-8
    assert abs(float(fit.kwargs["sigma"]) ** 2 - res.sigma2) < 1e-8
    assert abs(float(fit.conditional_log_prob(y)) - res.llf) < 1e-6
    assert np.allclose(fit.kwargs["coefs"].numpy(), PHI, atol=0.15)  # recovers the truth
    many = ar(60).sample(40, seed=2)["y"]
    fit = AR.mle(many, order=3)
    assert np.allclose(fit.kwargs["coefs"].numpy(), PHI, atol=0.06)
    assert abs(float(fit.kwargs["sigma"]) - SIGMA) < 0.03


@pytest.mark.parametrize("L", [0, 2, 10])
def test_forecast_is_conditioning_of_the_stationary_gaussian(L):
    m = ar(20)
    y = m.sample(1, seed=3)["y"][0]
    steps = 4
    G = toeplitz(acov(L + steps))
    f = m.forecast(y[:L], steps)
    if L == 0:
        mean, cov = np.full(steps, MU), G
    else:
        gain = np.linalg.solve(G[:L, :L], G[L:, :L].T).T
        mean = MU + gain @ (y[:L].numpy() - MU)
        cov = G[L:, L:] - gain @ G[:L, L:]
    np.testing.assert_allclose(f.mean.numpy(), mean, atol=1e-8)
    np.testing.assert_allclose(f.cov.numpy(), cov, atol=1e-8)
    batch = m.forecast(torch.stack([y[:L], y[:L]]), steps)
    assert batch.mean.shape == (2, steps)


def test_sampling_matches_stationary_moments():
    draws = ar(6).sample(8000, seed=4)["y"].numpy()
    G = toeplitz(acov(6))
    assert (np.abs(draws.mean(0) - MU) < 4 * np.sqrt(np.diag(G) / 8000)).all()
    assert np.abs(np.cov(draws.T) - G).max() < 0.08


def test_generic_map_fit_lands_near_truth():
    truth = AR(coefs=torch.tensor([0.6], dtype=D), sigma=torch.tensor(0.5, dtype=D), length=100)
    y = truth.sample(5, seed=5)["y"]
    fit = AR(order=1, length=100).to(dtype=D).condition(y=y).fit("map", seed=0)
    assert abs(float(fit.draws["coefs"].reshape(-1)[0]) - 0.6) < 0.1
    assert abs(float(fit.draws["sigma"].reshape(-1)[0]) - 0.5) < 0.05


def test_ar_bad_inputs():
    with pytest.raises(ValueError, match="not stationary"):
        AR(coefs=[1.2], sigma=1.0)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        AR(coefs=[0.5], sigma=-1.0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        ar().log_prob(y=torch.tensor([1.0, float("nan"), 0.0], dtype=D))
    with pytest.raises(ValueError, match="more than p=3"):
        ar().conditional_log_prob(torch.zeros(3, dtype=D))
    with pytest.raises(ValueError, match="need more than order"):
        AR.mle(np.zeros(3), order=2)


# ---------------------------------------------------------------------- DiscreteAR
def chain():
    gen = torch.Generator().manual_seed(0)
    probs = torch.distributions.Dirichlet(torch.ones(3, 3, 3, dtype=D)).sample()
    g = -torch.log(torch.rand(3, 3, generator=gen, dtype=D))
    return DiscreteAR(order=2, probs=probs, initial=g / g.sum(), length=5)


def brute_log_prob(m, seq):
    P, I0 = m.kwargs["probs"].numpy(), m.kwargs["initial"].numpy()
    if len(seq) == 1:
        return np.log(I0.sum(1)[seq[0]])
    lp = np.log(I0[seq[0], seq[1]])
    for t in range(2, len(seq)):
        lp += np.log(P[seq[t - 2], seq[t - 1], seq[t]])
    return lp


@pytest.mark.reference("DiscreteAR", "log_prob", "brute-force products over the sequence; sums to 1 over all M^T sequences")
@pytest.mark.reference("DiscreteAR", "log_marginal", "brute-force products over the sequence")
def test_discrete_log_prob_matches_brute_force():
    m = chain()
    seqs = torch.tensor(list(itertools.product(range(3), repeat=5)), dtype=D)
    lp = m.log_prob(y=seqs, pointwise=True)
    assert abs(float(torch.logsumexp(lp, 0))) < 1e-10
    for i in (0, 17, 100, 242):
        assert abs(float(lp[i]) - brute_log_prob(m, seqs[i].long().tolist())) < 1e-10
    assert abs(float(m.log_prob(y=torch.tensor([2.0], dtype=D))) - brute_log_prob(m, [2])) < 1e-12
    est = m.condition(y=seqs[:4]).log_marginal()
    assert abs(est.value - float(lp[:4].sum())) < 1e-9


@pytest.mark.parametrize("prefix", [[], [1], [2, 0, 1]], ids=["empty", "short", "long"])
def test_discrete_predict_matches_enumeration(prefix):
    m = chain()
    steps = 3
    L = len(prefix)
    conts = list(itertools.product(range(3), repeat=steps))
    w = np.array([np.exp(brute_log_prob(m, prefix + list(c))) for c in conts])
    w /= w.sum()
    ref = np.zeros((steps, 3))
    for c, wi in zip(conts, w):
        ref[np.arange(steps), list(c)] += wi
    got = m.predict(torch.tensor(prefix, dtype=D).reshape(L), steps)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-10)
    if L:
        np.testing.assert_allclose(m.next_symbol_probs(torch.tensor(prefix)).numpy(), ref[0], atol=1e-10)


@pytest.mark.reference("DiscreteAR", "mle", "n-gram counts computed by a plain Python loop")
def test_discrete_mle_counts_and_recovery():
    m = chain()
    y = m.sample(400, seed=6)["y"]
    fit = DiscreteAR.mle(y, order=2, num_symbols=3, smoothing=0.5)
    counts = np.full((3, 3, 3), 0.5)
    first = np.full((3, 3), 0.5)
    for seq in y.long().tolist():
        first[seq[0], seq[1]] += 1
        for t in range(2, len(seq)):
            counts[seq[t - 2], seq[t - 1], seq[t]] += 1
    np.testing.assert_allclose(fit.kwargs["probs"].numpy(), counts / counts.sum(-1, keepdims=True),
                               atol=1e-12)
    np.testing.assert_allclose(fit.kwargs["initial"].numpy(), first / first.sum(), atol=1e-12)
    big = DiscreteAR.mle(m.sample(4000, seed=7)["y"], order=2)
    assert torch.allclose(big.kwargs["probs"], m.kwargs["probs"], atol=0.08)
    assert torch.allclose(big.kwargs["initial"], m.kwargs["initial"], atol=0.03)


def test_discrete_sampling_frequencies():
    m = chain()
    y = m.sample(5000, seed=8)["y"].long()
    joint = torch.zeros(3, 3, dtype=D)
    joint.index_put_((y[:, 0], y[:, 1]), torch.ones(5000, dtype=D), accumulate=True)
    assert torch.allclose(joint / 5000, m.kwargs["initial"], atol=0.025)
    third = torch.bincount(y[:, 2], minlength=3).to(D) / 5000
    ref = torch.einsum("ab,abc->c", m.kwargs["initial"], m.kwargs["probs"])
    assert torch.allclose(third, ref, atol=0.025)


def test_discrete_bad_inputs():
    with pytest.raises(ValueError, match="each row must sum to 1"):
        DiscreteAR(order=1, probs=torch.tensor([[0.5, 0.6], [0.5, 0.5]]), initial="uniform")
    with pytest.raises(ValueError, match="k \\+ 1 = 3 axes"):
        DiscreteAR(order=2, probs=torch.full((2, 2), 0.5), initial="uniform")
    with pytest.raises(ValueError, match="symbols in 0..2"):
        chain().log_prob(y=torch.tensor([0.0, 1.0, 3.0]))
    with pytest.raises(ValueError, match="'uniform'"):
        DiscreteAR(order=1, probs=torch.full((2, 2), 0.5), initial="flat")
    with pytest.raises(ValueError, match="smoothing must be"):
        DiscreteAR.mle(np.zeros((2, 4)), order=1, smoothing=-1)

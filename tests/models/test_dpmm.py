"""DirichletProcessMixture: the variational fit finds the number of clusters (vs the truth
and scikit-learn's BayesianGaussianMixture), the ELBO rises monotonically, and the fitted
finite mixture's exact operations (log p, responsibilities, marginals, conditionals)
match SciPy; sampling moments; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import BayesianGaussianMixture

from genprog.models.dpmm import DirichletProcessMixture, stick_breaking

F64 = torch.float64


def _clusters(k, n=600, seed=0):
    """``n`` points from ``k`` unit-variance clusters on a circle of radius 8."""
    rng = np.random.default_rng(seed)
    ang = 2 * np.pi * np.arange(k) / k
    centers = 8 * np.stack([np.cos(ang), np.sin(ang)], 1)
    labels = rng.integers(0, k, n)
    return centers[labels] + rng.normal(0, 1, (n, 2)), labels, centers


def _mixture():
    w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    m = torch.tensor([[0.0, 0.0, 1.0], [3.0, -1.0, 0.0], [-2.0, 2.0, 2.0]], dtype=F64)
    a = torch.tensor([[[1.0, 0.3, 0.0], [0.0, 0.8, 0.2], [0.1, 0.0, 0.6]]], dtype=F64)
    c = a @ a.transpose(-1, -2) + torch.eye(3, dtype=F64) * torch.tensor([0.2, 0.5, 1.0],
                                                                         dtype=F64)[:, None, None]
    return DirichletProcessMixture(weights=w, means=m, covariances=c, alpha=1.0), w, m, c


def _scipy_logpdf(x, w, m, c, dims=None):
    dims = list(range(m.shape[1])) if dims is None else dims
    comps = [np.log(w[t]) + multivariate_normal(m[t, dims], c[t][np.ix_(dims, dims)]).logpdf(x)
             for t in range(len(w))]
    return logsumexp(np.stack(comps, -1), axis=-1), np.stack(comps, -1)


@pytest.mark.reference("DirichletProcessMixture", "mle",
                       "true cluster count and labels (ARI); sklearn BayesianGaussianMixture "
                       "(dirichlet_process) counts, ARI, weights and means")
@pytest.mark.parametrize("k", [2, 3, 5])
def test_variational_fit_finds_the_number_of_clusters(k):
    Y, labels, centers = _clusters(k, seed=k)
    m = DirichletProcessMixture.fit_variational(Y, truncation=10, alpha=1.0)
    assert m.dtype == F64 and m.kwargs["weights"].shape == (10,)
    assert m.effective_components(0.01) == k
    ours = m.predict(torch.tensor(Y)).numpy()
    assert adjusted_rand_score(labels, ours) > 0.98
    sk = BayesianGaussianMixture(n_components=10, weight_concentration_prior_type="dirichlet_process",
                                 weight_concentration_prior=1.0, max_iter=500, random_state=0).fit(Y)
    assert int((sk.weights_ > 0.01).sum()) == k
    assert adjusted_rand_score(sk.predict(Y), ours) > 0.98
    # the used components agree with scikit-learn's: weights and means after matching
    w, mu = m.kwargs["weights"].numpy(), m.kwargs["means"].numpy()
    used, sk_used = np.flatnonzero(w > 0.01), np.flatnonzero(sk.weights_ > 0.01)
    cost = ((mu[used, None] - sk.means_[None, sk_used]) ** 2).sum(-1)
    i, j = linear_sum_assignment(cost)
    np.testing.assert_allclose(mu[used[i]], sk.means_[sk_used[j]], atol=0.05)
    np.testing.assert_allclose(w[used[i]], sk.weights_[sk_used[j]], atol=0.02)
    # and the truth
    cost = ((mu[used, None] - centers[None]) ** 2).sum(-1)
    i, j = linear_sum_assignment(cost)
    assert np.abs(mu[used[i]] - centers[j]).max() < 0.3


def test_elbo_rises_monotonically_and_restarts_keep_the_best():
    Y, _, _ = _clusters(3, n=300, seed=1)
    m = DirichletProcessMixture.fit_variational(Y, truncation=8, alpha=0.5, n_init=2, seed=3)
    tr = np.array(m.info.trace)
    assert m.info.converged and len(tr) >= 3
    assert np.all(np.diff(tr) > -1e-8 * np.abs(tr[:-1]))
    assert m.info.elbo == tr[-1]
    assert m.info.responsibilities.shape == (300, 8)
    assert m.info.stick_params.shape == (7, 2)
    assert float(m.kwargs["weights"].sum()) == pytest.approx(1.0, abs=1e-12)
    # the ELBO bounds the plug-in log-likelihood from below only up to the KL terms; it must
    # at least be below the log-likelihood of the data at the fitted point plus the priors'
    # best case (a loose sanity check: finite and of the right size)
    assert m.info.elbo < float(m.log_prob(y=torch.tensor(Y)))


@pytest.mark.reference("DirichletProcessMixture", "log_prob", "scipy multivariate_normal mixture")
@pytest.mark.reference("DirichletProcessMixture", "log_marginal", "scipy multivariate_normal mixture")
@pytest.mark.reference("DirichletProcessMixture", "posterior",
                       "scipy component densities, normalized")
def test_log_prob_and_responsibilities_match_scipy():
    model, w, m, c = _mixture()
    x = np.random.default_rng(0).normal(0, 2, (50, 3))
    ref, comps = _scipy_logpdf(x, w.numpy(), m.numpy(), c.numpy())
    lp = model.log_prob(y=torch.tensor(x), pointwise=True)
    np.testing.assert_allclose(lp.numpy(), ref, atol=1e-10)
    est = model.condition(y=torch.tensor(x)).log_marginal()
    assert est.method == "exact" and est.value == pytest.approx(ref.sum(), abs=1e-9)
    resp = model.posterior(torch.tensor(x)).numpy()
    np.testing.assert_allclose(resp, np.exp(comps - ref[:, None]), atol=1e-12)
    assert model.posterior(torch.tensor(x[0])).shape == (3,)


@pytest.mark.reference("DirichletProcessMixture", "marginalize", "scipy mixture over the kept dims")
@pytest.mark.reference("DirichletProcessMixture", "condition",
                       "scipy: log p(x) - log p(x_observed) (density ratio)")
def test_marginal_and_conditional_match_scipy():
    model, w, m, c = _mixture()
    w, m, c = w.numpy(), m.numpy(), c.numpy()
    x = np.random.default_rng(1).normal(0, 2, (20, 3))
    marg = model.marginalize(dims=[1])
    np.testing.assert_allclose(marg.log_prob(y=torch.tensor(x[:, [0, 2]]), pointwise=True).numpy(),
                               _scipy_logpdf(x[:, [0, 2]], w, m, c, [0, 2])[0], atol=1e-10)
    xo = 0.7
    cond = model.condition(dims={1: xo})
    pts = np.column_stack([x[:, 0], np.full(20, xo), x[:, 2]])
    ref = _scipy_logpdf(pts, w, m, c)[0] - _scipy_logpdf(np.array([[xo]]), w, m, c, [1])[0]
    np.testing.assert_allclose(cond.log_prob(y=torch.tensor(x[:, [0, 2]]), pointwise=True).numpy(),
                               ref, atol=1e-10)


def test_sample_moments_match_the_mixture():
    model, w, m, c = _mixture()
    n = 40000
    y = model.sample(n, seed=0)["y"]
    assert y.shape == (n, 3)
    mean = (w[:, None] * m).sum(0)
    cov = (w[:, None, None] * (c + m.unsqueeze(-1) * m.unsqueeze(-2))).sum(0) - torch.outer(mean, mean)
    se = (torch.diagonal(cov) / n).sqrt()
    assert torch.all((y.mean(0) - mean).abs() < 4 * se)
    assert torch.allclose(torch.cov(y.T), cov, atol=0.1)


def test_prior_story_samples_stick_breaking_weights():
    v = torch.tensor([0.5, 0.5, 0.5])
    assert torch.allclose(stick_breaking(v), torch.tensor([0.5, 0.25, 0.125, 0.125]))
    prior = DirichletProcessMixture(truncation=5, dim=2, alpha=2.0)
    s = prior.sample(4000, seed=0)
    w = s["weights"]
    assert w.shape == (4000, 5) and s["y"].shape == (4000, 2)
    assert torch.allclose(w.sum(-1), torch.ones(4000))
    # E[w_1] = E[v_1] = 1 / (1 + alpha)
    assert abs(float(w[:, 0].mean()) - 1 / 3) < 4 * float(w[:, 0].std()) / 4000 ** 0.5


def test_bad_input():
    _, w, m, c = _mixture()
    with pytest.raises(ValueError, match="sum to 1"):
        DirichletProcessMixture(weights=w * 2, means=m, covariances=c)
    with pytest.raises(ValueError, match="positive definite"):
        DirichletProcessMixture(weights=w, means=m, covariances=-c)
    with pytest.raises(ValueError, match="disagree"):
        DirichletProcessMixture(weights=w, means=m[:2], covariances=c)
    with pytest.raises(ValueError, match="alpha"):
        DirichletProcessMixture(weights=w, means=m, covariances=c, alpha=-1.0)
    with pytest.raises(ValueError, match="truncation and dim"):
        DirichletProcessMixture(alpha=1.0)
    with pytest.raises(ValueError, match="NaN"):
        DirichletProcessMixture.fit_variational(np.full((10, 2), np.nan))
    with pytest.raises(ValueError, match="truncation"):
        DirichletProcessMixture.fit_variational(np.zeros((5, 2)), truncation=10)
    with pytest.raises(ValueError, match="alpha"):
        DirichletProcessMixture.fit_variational(np.random.rand(20, 2), alpha=0.0)
    with pytest.raises(TypeError):
        DirichletProcessMixture.fit_variational(np.random.rand(20, 2), n_components=3)
    model = DirichletProcessMixture(weights=w, means=m, covariances=c)
    with pytest.raises(ValueError, match="shape"):
        model.log_prob(y=torch.zeros(4, 2))

"""Gaussian, PPCA and FactorAnalysis: every exact operation against SciPy / scikit-learn /
closed forms / numerical integration, with stated tolerances (float64 throughout)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.decomposition import PCA
from sklearn.decomposition import FactorAnalysis as SkFA

from genprog.errors import ConvergenceWarning
from genprog.models.gaussian import PPCA, FactorAnalysis, Gaussian

F64 = torch.float64
TOL = 1e-9


def _t(x):
    return torch.as_tensor(np.asarray(x), dtype=F64)


def _gaussian():
    rng = np.random.default_rng(1)
    A = rng.normal(size=(4, 4))
    cov = A @ A.T + 0.5 * np.eye(4)
    mean = rng.normal(size=4)
    return Gaussian(mean=_t(mean), cov=_t(cov)), mean, cov


def _ppca():
    rng = np.random.default_rng(2)
    W, mu, sigma = rng.normal(size=(5, 2)), rng.normal(size=5), 0.7
    return PPCA(W=_t(W), mu=_t(mu), sigma=sigma), mu, W @ W.T + sigma**2 * np.eye(5)


def _fa():
    rng = np.random.default_rng(3)
    W, mu, psi = rng.normal(size=(5, 2)), rng.normal(size=5), rng.uniform(0.2, 1.5, size=5)
    return FactorAnalysis(W=_t(W), mu=_t(mu), psi=_t(psi)), mu, W @ W.T + np.diag(psi)


CASES = {"Gaussian": _gaussian, "PPCA": _ppca, "FactorAnalysis": _fa}
ALL = [pytest.param(name, marks=[
    pytest.mark.reference(name, "log_prob", "scipy.stats.multivariate_normal.logpdf"),
    pytest.mark.reference(name, "log_marginal", "sum of scipy multivariate_normal.logpdf"),
]) for name in CASES]


def _data(mean, cov, n=50, seed=0):
    return np.random.default_rng(seed).multivariate_normal(mean, cov, size=n)


@pytest.mark.parametrize("name", ALL)
def test_log_prob_and_log_marginal_match_scipy(name):
    model, mean, cov = CASES[name]()
    Y = _data(mean, cov)
    ref = stats.multivariate_normal(mean, cov).logpdf(Y)
    got = model.log_prob(y=_t(Y), pointwise=True)
    assert got.dtype == F64 and got.shape == (50,)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=TOL)
    np.testing.assert_allclose(float(model.log_prob(y=_t(Y[0]))), ref[0], atol=TOL)
    est = model.condition(y=_t(Y)).log_marginal()
    assert est.method == "exact" and est.stderr == 0.0
    assert est.value == pytest.approx(ref.sum(), abs=1e-8)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.reference(
    n, "log_prob", "scipy logpdf of the observed sub-vector, row by row")) for n in CASES])
def test_missing_entries_are_integrated_out(name):
    model, mean, cov = CASES[name]()
    Y = _data(mean, cov, n=12)
    mask = np.random.default_rng(5).random(Y.shape) < 0.35
    mask[0] = True          # a row with nothing observed: log p = 0
    mask[1] = False         # a complete row
    Y[mask] = np.nan
    ref = []
    for row in Y:
        o = ~np.isnan(row)
        ref.append(stats.multivariate_normal(mean[o], cov[np.ix_(o, o)]).logpdf(row[o])
                   if o.any() else 0.0)
    got = model.log_prob(y=_t(Y), pointwise=True)
    np.testing.assert_allclose(got.numpy(), ref, atol=TOL)
    assert model.condition(y=_t(Y)).log_marginal().value == pytest.approx(sum(ref), abs=1e-8)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.reference(
    n, "marginalize", "scipy logpdf with the sub-vector mean and covariance block")) for n in CASES])
def test_marginal_of_a_subset(name):
    model, mean, cov = CASES[name]()
    drop = [0, 2]
    keep = [i for i in range(len(mean)) if i not in drop]
    marg = model.marginalize(dims=drop)
    assert type(marg) is type(model) and marg.event_shape == (len(keep),)
    Y = _data(mean, cov, n=20)[:, keep]
    ref = stats.multivariate_normal(mean[keep], cov[np.ix_(keep, keep)]).logpdf(Y)
    np.testing.assert_allclose(marg.log_prob(y=_t(Y), pointwise=True).numpy(), ref, atol=TOL)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.reference(
    n, "condition", "scipy: log p(y) - log p(y_b) (joint minus marginal logpdf)")) for n in CASES])
def test_conditional_is_joint_over_marginal(name):
    model, mean, cov = CASES[name]()
    b, yb = [1, 3], np.array([0.4, -1.2])
    a = [i for i in range(len(mean)) if i not in b]
    cond = model.condition(dims={1: yb[0], 3: float(yb[1])})
    assert type(cond) is type(model) and cond.event_shape == (len(a),)
    Ya = _data(mean, cov, n=15, seed=4)[:, a]
    full = np.zeros((15, len(mean)))
    full[:, a], full[:, b] = Ya, yb
    ref = (stats.multivariate_normal(mean, cov).logpdf(full)
           - stats.multivariate_normal(mean[b], cov[np.ix_(b, b)]).logpdf(yb))
    np.testing.assert_allclose(cond.log_prob(y=_t(Ya), pointwise=True).numpy(), ref, atol=1e-8)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.reference(
    n, "sample", "moments: mean and covariance of 20000 draws vs the model's (5 standard errors)"))
    for n in CASES])
def test_sample_moments(name):
    model, mean, cov = CASES[name]()
    y = model.sample(20000, seed=0)["y"].numpy()
    se_mean = np.sqrt(np.diag(cov) / 20000)
    assert np.all(np.abs(y.mean(0) - mean) < 5 * se_mean)
    se_cov = np.sqrt((cov**2 + np.outer(np.diag(cov), np.diag(cov))) / 20000)
    assert np.all(np.abs(np.cov(y.T) - cov) < 5 * se_cov)


@pytest.mark.parametrize("name", list(CASES))
def test_impute_is_the_conditional_mean(name):
    model, mean, cov = CASES[name]()
    Y = _data(mean, cov, n=6)
    Y[0, [0, 2]] = np.nan
    Y[1, 4 % len(mean)] = np.nan
    Y[2, :] = np.nan
    out = model.impute(_t(Y)).numpy()
    for row, got in zip(Y, out):
        m = np.isnan(row)
        o = ~m
        exp = row.copy()
        if m.any() and o.any():
            exp[m] = mean[m] + cov[np.ix_(m, o)] @ np.linalg.solve(cov[np.ix_(o, o)], row[o] - mean[o])
        elif m.any():
            exp[m] = mean[m]
        np.testing.assert_allclose(got, exp, atol=1e-10)


# ---------------------------------------------------------------------- mle
@pytest.mark.reference("Gaussian", "mle", "numpy mean and np.cov(bias=True / ddof=1)")
def test_gaussian_mle_is_sample_mean_and_covariance():
    _, mean, cov = _gaussian()
    Y = _data(mean, cov, n=200)
    fit = Gaussian.mle(Y)
    np.testing.assert_allclose(fit.kwargs["mean"].numpy(), Y.mean(0), atol=1e-12)
    np.testing.assert_allclose(fit.kwargs["cov"].numpy(), np.cov(Y.T, bias=True), atol=1e-12)
    np.testing.assert_allclose(Gaussian.mle(Y, ddof=1).kwargs["cov"].numpy(), np.cov(Y.T), atol=1e-12)


@pytest.mark.reference("PPCA", "log_prob", "sklearn PCA(n_components=k).fit(Y).score_samples(Y)")
@pytest.mark.reference("PPCA", "mle", "sklearn PCA covariance (get_covariance, noise_variance_)")
def test_ppca_mle_matches_sklearn_pca():
    _, mu, cov = _ppca()
    Y = _data(mu, cov, n=300)
    pca = PCA(n_components=2).fit(Y)
    fit = PPCA.mle(Y, k=2, ddof=1)                 # sklearn's N - 1 normalisation
    np.testing.assert_allclose(fit.log_prob(y=Y, pointwise=True).numpy(), pca.score_samples(Y),
                               rtol=0, atol=1e-8)
    np.testing.assert_allclose(float(fit.kwargs["sigma"]) ** 2, pca.noise_variance_, rtol=1e-10)
    np.testing.assert_allclose(fit.covariance_matrix.numpy(), pca.get_covariance(), atol=1e-10)
    # ddof=0 is the maximum likelihood: its covariance is sklearn's times (N-1)/N ...
    ml = PPCA.mle(Y, k=2)
    np.testing.assert_allclose(ml.covariance_matrix.numpy(), pca.get_covariance() * 299 / 300,
                               atol=1e-10)
    # ... and perturbing any parameter lowers the likelihood
    ll = float(ml.log_prob(y=Y))
    assert ll > float(fit.log_prob(y=Y))
    W, m, s = (ml.kwargs[k] for k in ("W", "mu", "sigma"))
    for dW, dm, ds in [(1e-3, 0, 0), (0, 1e-3, 0), (0, 0, 1e-3), (-1e-3, 0, 0), (0, 0, -1e-3)]:
        other = PPCA(W=W * (1 + dW), mu=m + dm, sigma=s + ds)
        assert float(other.log_prob(y=Y)) < ll


@pytest.mark.reference("FactorAnalysis", "log_prob",
                       "sklearn FactorAnalysis.score_samples with the same parameters")
def test_fa_log_prob_matches_sklearn_at_same_parameters():
    model, mu, cov = _fa()
    Y = _data(mu, cov, n=40)
    sk = SkFA(n_components=2).fit(Y)
    sk.components_ = model.kwargs["W"].numpy().T
    sk.noise_variance_ = model.kwargs["psi"].numpy()
    sk.mean_ = mu
    np.testing.assert_allclose(model.log_prob(y=_t(Y), pointwise=True).numpy(),
                               sk.score_samples(Y), atol=1e-9)


@pytest.mark.reference("FactorAnalysis", "mle",
                       "sklearn FactorAnalysis fit log-likelihood; recovery of W W^T and psi")
def test_fa_em_reaches_sklearn_likelihood_and_recovers_parameters():
    rng = np.random.default_rng(7)
    W = rng.normal(size=(6, 2))
    psi = rng.uniform(0.2, 0.8, size=6)
    Y = rng.multivariate_normal(np.zeros(6), W @ W.T + np.diag(psi), size=3000)
    fit = FactorAnalysis.mle(Y, k=2)
    assert fit.info.converged
    ours = float(fit.log_prob(y=Y)) / len(Y)
    assert fit.info.log_likelihood / len(Y) == pytest.approx(ours, abs=1e-9)
    sk = SkFA(n_components=2).fit(Y)
    assert ours >= sk.score(Y) - 1e-6
    np.testing.assert_allclose(fit.kwargs["psi"].numpy(), psi, atol=0.1)
    Wf = fit.kwargs["W"].numpy()
    np.testing.assert_allclose(Wf @ Wf.T, W @ W.T, atol=0.25)
    trace = np.array(fit.info.trace)
    assert np.all(np.diff(trace) > -1e-10)        # EM never decreases the likelihood


def test_fa_em_reports_non_convergence():
    rng = np.random.default_rng(0)
    with pytest.warns(ConvergenceWarning, match="unconverged"):
        FactorAnalysis.mle(rng.normal(size=(50, 4)), k=1, max_iters=2)


# ---------------------------------------------------------------------- posterior
def _posterior_closed_form(W, mu, psi, y):
    o = ~np.isnan(y)
    Wo = W[o]
    prec = np.eye(W.shape[1]) + Wo.T @ (Wo / psi[o, None])
    cov = np.linalg.inv(prec)
    return cov @ Wo.T @ ((y[o] - mu[o]) / psi[o]), cov


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.reference(
    n, "posterior", "numpy closed form (I + W^T Psi^-1 W)^-1 and Bayes' rule on the joint"))
    for n in ["PPCA", "FactorAnalysis"]])
def test_posterior_closed_form(name):
    model, mean, cov = CASES[name]()
    W, mu, psi = model.kwargs["W"].numpy(), model.kwargs["mu"].numpy(), model.psi.numpy()
    Y = _data(mean, cov, n=5)
    Y[1, [0, 3]] = np.nan
    post = model.posterior(_t(Y))
    assert post.batch_shape == (5,) and post.event_shape == (2,)
    for i, row in enumerate(Y):
        m, c = _posterior_closed_form(W, mu, psi, row)
        np.testing.assert_allclose(post.mean[i].numpy(), m, atol=1e-10)
        np.testing.assert_allclose(post.covariance_matrix[i].numpy(), c, atol=1e-10)
    # Bayes' rule on the joint Gaussian of (z, y) for the complete row
    joint_zy = W.T
    m_ref = joint_zy @ np.linalg.solve(cov, Y[0] - mu)
    c_ref = np.eye(2) - joint_zy @ np.linalg.solve(cov, joint_zy.T)
    np.testing.assert_allclose(post.mean[0].numpy(), m_ref, atol=1e-10)
    np.testing.assert_allclose(post.covariance_matrix[0].numpy(), c_ref, atol=1e-10)


@pytest.mark.reference("PPCA", "posterior", "numerical integration over a 1-D latent grid")
@pytest.mark.reference("FactorAnalysis", "posterior", "numerical integration over a 1-D latent grid")
def test_posterior_one_latent_by_quadrature():
    rng = np.random.default_rng(9)
    W, mu, psi = rng.normal(size=(3, 1)), rng.normal(size=3), np.array([0.3, 0.5, 0.9])
    y = np.array([0.5, np.nan, -0.7])
    z = np.linspace(-10, 10, 200001)
    o = ~np.isnan(y)
    for model, noise in [(FactorAnalysis(W=_t(W), mu=_t(mu), psi=_t(psi)), psi),
                         (PPCA(W=_t(W), mu=_t(mu), sigma=0.6), np.full(3, 0.36))]:
        logp = stats.norm.logpdf(z) + sum(
            stats.norm.logpdf(y[j], W[j, 0] * z + mu[j], np.sqrt(noise[j])) for j in np.flatnonzero(o))
        p = np.exp(logp - logp.max())
        p /= np.trapezoid(p, z)
        m = np.trapezoid(z * p, z)
        v = np.trapezoid((z - m) ** 2 * p, z)
        post = model.posterior(_t(y))
        assert float(post.mean[0]) == pytest.approx(m, abs=1e-7)
        assert float(post.covariance_matrix[0, 0]) == pytest.approx(v, abs=1e-7)
        # and the exact log p(y_obs) is the normaliser of the same integral
        log_norm = np.log(np.trapezoid(np.exp(logp - logp.max()), z)) + logp.max()
        assert float(model.log_prob(y=_t(y))) == pytest.approx(log_norm, abs=1e-7)


# ---------------------------------------------------------------------- devices, dtypes
def test_parameters_follow_to_and_float32_default():
    g = Gaussian(mean=torch.zeros(2), cov=torch.eye(2))
    assert g.kwargs["mean"].dtype == torch.float32 and g.event_shape == (2,)
    g64 = g.to(dtype=F64)
    assert g64.kwargs["cov"].dtype == F64 and g64.event_shape == (2,)
    assert g64.log_prob(y=torch.zeros(2, dtype=F64)).dtype == F64


def test_bayesian_ppca_story_samples_with_priors():
    m = PPCA(dim=4, k=2)
    s = m.sample(3, seed=0)
    assert s["W"].shape == (3, 4, 2) and s["z"].shape == (3, 2) and s["y"].shape == (3, 4)
    with pytest.raises(ValueError, match="every parameter given"):
        m.log_prob(y=torch.zeros(4))


@pytest.mark.gpu
def test_cuda_log_prob_and_posterior():
    model, mean, cov = _fa()
    m = model.to("cuda")
    Y = _t(_data(mean, cov, n=8)).cuda()
    Y[0, 1] = float("nan")
    assert m.log_prob(y=Y, pointwise=True).device.type == "cuda"
    assert m.posterior(Y).mean.device.type == "cuda"
    np.testing.assert_allclose(m.log_prob(y=Y, pointwise=True).cpu().numpy(),
                               model.log_prob(y=Y.cpu(), pointwise=True).numpy(), atol=1e-9)


# ---------------------------------------------------------------------- bad input
def test_bad_input_errors():
    with pytest.raises(ValueError, match="not positive definite"):
        Gaussian(mean=torch.zeros(2), cov=torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="not symmetric"):
        Gaussian(mean=torch.zeros(2), cov=torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="disagree"):
        Gaussian(mean=torch.zeros(3), cov=torch.eye(2))
    with pytest.raises(ValueError, match="give mean, cov or dim"):
        Gaussian()
    with pytest.raises(ValueError, match="sigma must be one positive"):
        PPCA(W=torch.ones(3, 1), mu=torch.zeros(3), sigma=-1.0)
    with pytest.raises(ValueError, match="psi"):
        FactorAnalysis(W=torch.ones(3, 1), mu=torch.zeros(3), psi=torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="mu must be a vector"):
        PPCA(W=torch.ones(3, 1), mu=torch.zeros(4), sigma=1.0)
    with pytest.raises(ValueError, match="give W, or dim and k"):
        FactorAnalysis(dim=3)
    with pytest.raises(ValueError, match="k must be < d"):
        PPCA.mle(np.zeros((10, 3)), k=3)
    with pytest.raises(ValueError, match="NaN"):
        Gaussian.mle(np.array([[1.0, np.nan], [0.0, 1.0], [1.0, 2.0]]))
    g, *_ = _gaussian()
    with pytest.raises(ValueError, match="must have shape"):
        g.log_prob(y=torch.zeros(3, 5, dtype=F64))
    with pytest.raises(ValueError, match="not a dimension index"):
        g.condition(dims={7: 1.0})
    with pytest.raises(ValueError, match="must be a scalar"):
        g.condition(dims={0: [1.0, 2.0]})

"""GaussianProcess: exact log marginal likelihood, predictive, marginals and conditionals
against scikit-learn's GaussianProcessRegressor and SciPy; ML against sklearn's optimum."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st
import torch
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF as SkRBF
from sklearn.gaussian_process.kernels import ConstantKernel as C
from sklearn.gaussian_process.kernels import ExpSineSquared, Matern, WhiteKernel

from genprog.models.gaussian_process import RBF, GaussianProcess, Matern32, Matern52, Periodic

F64 = torch.float64
RNG = np.random.default_rng(0)
X = RNG.uniform(0, 5, (12, 1))
Y = np.sin(X[:, 0]) + 0.2 * RNG.normal(size=12)
NOISE = 0.05

# (kernel, the same kernel in scikit-learn)
KERNELS = {
    "rbf": (RBF(0.7, 1.3), C(1.3) * SkRBF(0.7)),
    "matern32": (Matern32(0.7, 1.3), C(1.3) * Matern(0.7, nu=1.5)),
    "matern52": (Matern52(0.7, 1.3), C(1.3) * Matern(0.7, nu=2.5)),
    "periodic": (Periodic(0.9, 2.0, 1.1), C(1.1) * ExpSineSquared(0.9, 2.0)),
    "rbf+periodic": (RBF(0.7, 1.3) + Periodic(0.9, 2.0, 1.1),
                     C(1.3) * SkRBF(0.7) + C(1.1) * ExpSineSquared(0.9, 2.0)),
    "rbf*periodic": (RBF(2.0, 1.3) * Periodic(0.9, 2.0, 1.1),
                     C(1.3) * SkRBF(2.0) * (C(1.1) * ExpSineSquared(0.9, 2.0))),
}


def gp(kernel, x=X, noise=NOISE, **kw):
    return GaussianProcess(x=x, kernel=kernel, noise=noise, mean=0.0, **kw).to(dtype=F64)


def sk_fit(sk_kernel, x=X, y=Y, noise=NOISE, white=True):
    """sklearn regressor with fixed hyperparameters: noise as a WhiteKernel (alpha = 0) or
    as alpha (then predictions are of the noise-free f)."""
    if white:
        return GaussianProcessRegressor(sk_kernel + WhiteKernel(noise), optimizer=None,
                                        alpha=0.0).fit(x, y)
    return GaussianProcessRegressor(sk_kernel, optimizer=None, alpha=noise).fit(x, y)


@pytest.mark.reference("GaussianProcess", "log_prob", "sklearn GaussianProcessRegressor.log_marginal_likelihood_value_")
@pytest.mark.reference("GaussianProcess", "log_marginal", "sklearn GaussianProcessRegressor.log_marginal_likelihood_value_")
@pytest.mark.parametrize("name", list(KERNELS))
def test_log_marginal_likelihood_matches_sklearn(name):
    kernel, sk_kernel = KERNELS[name]
    m = gp(kernel)
    ref = sk_fit(sk_kernel).log_marginal_likelihood_value_
    assert float(m.log_prob(y=Y)) == pytest.approx(ref, abs=1e-9)
    est = m.condition(y=Y).log_marginal()
    assert est.method == "exact" and est.stderr == 0
    assert est.value == pytest.approx(ref, abs=1e-9)


@pytest.mark.reference("GaussianProcess", "log_prob", "sklearn log marginal likelihood, multi-output y (replicates), ARD RBF")
def test_replicates_and_ard_match_sklearn():
    x = RNG.uniform(0, 3, (9, 2))
    ys = RNG.normal(size=(9, 3))
    m = gp(RBF([0.5, 2.0], 0.8), x=x)
    sk = sk_fit(C(0.8) * SkRBF([0.5, 2.0]), x=x, y=ys)
    rows = m.log_prob(y=ys.T, pointwise=True)
    assert rows.shape == (3,)
    assert float(rows.sum()) == pytest.approx(sk.log_marginal_likelihood_value_, abs=1e-9)
    assert m.condition(y=ys.T).log_marginal().value == pytest.approx(float(rows.sum()), abs=1e-9)


@pytest.mark.reference("GaussianProcess", "posterior", "sklearn predict(return_cov=True) at the training inputs (alpha = noise)")
@pytest.mark.parametrize("name", ["rbf", "matern52", "rbf+periodic"])
def test_predict_and_posterior_match_sklearn(name):
    kernel, sk_kernel = KERNELS[name]
    m = gp(kernel)
    x_new = np.linspace(-1, 6, 7)[:, None]
    # noisy predictive (WhiteKernel in sklearn's prediction) and latent f (alpha = noise)
    mean, cov = m.predict(x_new, Y, include_noise=True)
    ref_mean, ref_cov = sk_fit(sk_kernel).predict(x_new, return_cov=True)
    np.testing.assert_allclose(mean.numpy(), ref_mean, atol=1e-9)
    np.testing.assert_allclose(cov.numpy(), ref_cov, atol=1e-9)
    mean, var = m.predict(x_new, Y, full_cov=False)
    ref_mean, ref_sd = sk_fit(sk_kernel, white=False).predict(x_new, return_std=True)
    np.testing.assert_allclose(mean.numpy(), ref_mean, atol=1e-9)
    np.testing.assert_allclose(var.numpy(), ref_sd ** 2, atol=1e-9)
    post = m.posterior(Y)
    ref_mean, ref_cov = sk_fit(sk_kernel, white=False).predict(X, return_cov=True)
    np.testing.assert_allclose(post["mean"].numpy(), ref_mean, atol=1e-9)
    np.testing.assert_allclose(post["cov"].numpy(), ref_cov, atol=1e-9)


def joint_cov(sk_kernel, x):
    """Covariance of noisy y at x from sklearn's kernel (WhiteKernel on the diagonal)."""
    return (sk_kernel + WhiteKernel(NOISE))(x)


@pytest.mark.reference("GaussianProcess", "marginalize", "scipy multivariate_normal on the sklearn kernel's sub-covariance")
def test_marginalize_is_the_sub_covariance():
    kernel, sk_kernel = KERNELS["matern32"]
    m = gp(kernel)
    keep = [0, 3, 4, 8]
    sub = m.marginalize(dims=[i for i in range(12) if i not in keep])
    assert isinstance(sub, GaussianProcess) and sub.event_shape == (4,)
    ref = st.multivariate_normal(np.zeros(4), joint_cov(sk_kernel, X)[np.ix_(keep, keep)])
    ys = RNG.normal(size=(5, 4))
    np.testing.assert_allclose(sub.log_prob(y=ys, pointwise=True).numpy(), ref.logpdf(ys), atol=1e-9)


@pytest.mark.reference("GaussianProcess", "condition", "Gaussian conditioning formula (numpy) on the sklearn kernel's joint covariance, scipy logpdf")
def test_condition_on_points_is_the_gaussian_conditional():
    kernel, sk_kernel = KERNELS["rbf+periodic"]
    m = gp(kernel)
    obs = {1: 0.3, 5: -0.2, 7: 0.9}
    rest = [i for i in range(12) if i not in obs]
    c = m.condition(dims=obs)
    assert c.event_shape == (9,)
    S = joint_cov(sk_kernel, X)
    o = list(obs)
    v = np.array(list(obs.values()))
    gain = S[np.ix_(rest, o)] @ np.linalg.inv(S[np.ix_(o, o)])
    ref = st.multivariate_normal(gain @ v, S[np.ix_(rest, rest)] - gain @ S[np.ix_(o, rest)])
    ys = RNG.normal(size=(4, 9))
    np.testing.assert_allclose(c.log_prob(y=ys, pointwise=True).numpy(), ref.logpdf(ys), atol=1e-8)
    # conditioning twice = conditioning once on both sets; then marginalizing composes too
    c2 = m.condition(dims={1: 0.3}).condition(dims={4: -0.2, 6: 0.9})
    np.testing.assert_allclose(c2.log_prob(y=ys, pointwise=True).numpy(), ref.logpdf(ys), atol=1e-8)
    cm = c.marginalize(dims=[0])
    ref_m = st.multivariate_normal(ref.mean[1:], ref.cov[1:, 1:])
    np.testing.assert_allclose(cm.log_prob(y=ys[:, 1:], pointwise=True).numpy(),
                               ref_m.logpdf(ys[:, 1:]), atol=1e-8)


@pytest.mark.reference("GaussianProcess", "sample", "whitened draws ~ N(0, I) by KS (scipy) with the sklearn kernel covariance")
def test_sampling_moments():
    kernel, sk_kernel = KERNELS["matern52"]
    m = gp(kernel)
    draws = m.sample(2000, seed=1)["y"].numpy()
    L = np.linalg.cholesky(joint_cov(sk_kernel, X))
    w = np.linalg.solve(L, draws.T).ravel()
    assert st.kstest(w, "norm").pvalue > 1e-3
    assert abs(w.mean()) < 4 / np.sqrt(w.size)
    # functions drawn at new inputs from the posterior: whitened by sklearn's predictive
    x_new = np.linspace(0, 5, 6)[:, None]
    f = m.sample_functions(x_new, 2000, Y, seed=2).numpy()
    mean, cov = sk_fit(sk_kernel, white=False).predict(x_new, return_cov=True)
    Lp = np.linalg.cholesky(cov + 1e-10 * np.eye(6) * np.diag(cov).mean())
    w = np.linalg.solve(Lp, (f - mean).T).ravel()
    assert st.kstest(w, "norm").pvalue > 1e-3


@pytest.mark.reference("GaussianProcess", "mle", "sklearn GaussianProcessRegressor optimum (L-BFGS-B) log marginal likelihood")
@pytest.mark.parametrize("name,kernel,sk_kernel", [
    ("rbf", RBF(), C(1.0) * SkRBF(1.0)),
    ("matern52", Matern52(), C(1.0) * Matern(1.0, nu=2.5)),
])
def test_mle_reaches_sklearn_optimum(name, kernel, sk_kernel):
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 5, (25, 1))
    y = np.sin(2 * x[:, 0]) + 0.2 * rng.normal(size=25)
    m = GaussianProcess.mle(x, y, kernel=kernel)
    sk = GaussianProcessRegressor(sk_kernel + WhiteKernel(0.1), alpha=0.0).fit(x, y)
    ours = float(m.log_prob(y=y))
    ref = sk.log_marginal_likelihood_value_
    assert ours >= ref - 1e-5
    assert ours == pytest.approx(ref, abs=1e-3)
    p = sk.kernel_.get_params()
    assert float(m.kwargs["lengthscale"]) == pytest.approx(p["k1__k2__length_scale"], rel=1e-2)
    assert float(m.kwargs["variance"]) == pytest.approx(p["k1__k1__constant_value"], rel=1e-2)
    assert float(m.kwargs["noise"]) == pytest.approx(p["k2__noise_level"], rel=1e-2)


def test_mle_recovers_hyperparameters_from_replicates():
    x = np.linspace(0, 10, 30)
    truth = gp(RBF(1.5, 2.0), x=x, noise=0.1)
    y = truth.sample(20, seed=4)["y"]
    m = GaussianProcess.mle(x, y, kernel=RBF(), mean=None)
    assert float(m.kwargs["lengthscale"]) == pytest.approx(1.5, rel=0.15)
    assert float(m.kwargs["variance"]) == pytest.approx(2.0, rel=0.4)
    assert float(m.kwargs["noise"]) == pytest.approx(0.1, rel=0.2)
    assert abs(float(m.kwargs["mean"])) < 0.8


def test_map_fit_lands_near_truth():
    """The generic Bayesian route: lengthscale and variance left None (LogNormal priors)."""
    x = np.linspace(0, 6, 15)
    y = gp(RBF(1.0, 1.0), x=x, noise=0.05).sample(10, seed=5)["y"]
    model = GaussianProcess(x=x, kernel=RBF(), noise=0.05, mean=0.0).to(dtype=F64)
    assert model.missing_parameters() == ["lengthscale", "variance"]
    fit = model.condition(y=y).fit("map")
    assert float(fit.draws["lengthscale"].reshape(-1)[0]) == pytest.approx(1.0, rel=0.25)
    assert float(fit.draws["variance"].reshape(-1)[0]) == pytest.approx(1.0, rel=0.6)


def test_composite_names_and_priors():
    k = RBF(1.0, 1.0) + RBF(None, 2.0) * Periodic(1.0, None, 1.0)
    m = GaussianProcess(x=X, kernel=k, noise=0.1, mean=0.0)
    assert m.hyperparameter_names() == ["rbf_lengthscale", "rbf_variance", "rbf2_lengthscale",
                                        "rbf2_variance", "periodic_lengthscale", "periodic_period",
                                        "periodic_variance"]
    assert m.missing_parameters() == ["rbf2_lengthscale", "periodic_period"]
    draws = m.sample(4, seed=0)
    assert draws["y"].shape == (4, 12) and draws["periodic_period"].shape == (4,)
    with pytest.raises(ValueError, match="exact only with every parameter given"):
        m.log_prob(y=Y)


def test_bad_input():
    with pytest.raises(ValueError, match="x .*required"):
        GaussianProcess(kernel=RBF(1.0, 1.0), noise=0.1, mean=0.0)
    with pytest.raises(ValueError, match="x must be"):
        GaussianProcess(x=np.zeros((2, 2, 2)), noise=0.1, mean=0.0)
    with pytest.raises(ValueError, match="lengthscale must be positive"):
        GaussianProcess(x=X, kernel=RBF(-1.0, 1.0), noise=0.1, mean=0.0)
    with pytest.raises(ValueError, match="lengthscale must be a scalar or \\[p\\]"):
        GaussianProcess(x=X, kernel=RBF([1.0, 2.0], 1.0), noise=0.1, mean=0.0)
    with pytest.raises(ValueError, match="noise must be positive"):
        GaussianProcess(x=X, kernel=RBF(1.0, 1.0), noise=0.0, mean=0.0)
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        GaussianProcess(x=X, kernel=RBF(1.0, 1.0), noise=0.1, mean=0.0, period=1.0)
    with pytest.raises(TypeError, match="kernel must be a Kernel"):
        GaussianProcess(x=X, kernel="rbf", noise=0.1)
    with pytest.raises(ValueError, match="both x_obs and y_obs"):
        GaussianProcess(x=X, kernel=RBF(1.0, 1.0), noise=0.1, mean=0.0, x_obs=X)
    m = gp(RBF(1.0, 1.0))
    with pytest.raises(ValueError, match="y must have shape"):
        m.log_prob(y=np.zeros(5))
    with pytest.raises(ValueError, match="x_new must be"):
        m.predict(np.zeros((3, 2)), Y)
    with pytest.raises(ValueError, match="one vector"):
        m.predict(X, np.stack([Y, Y]))
    with pytest.raises(ValueError, match="not a dimension index"):
        m.condition(dims={12: 0.0})
    with pytest.raises(ValueError, match="mle: y must be"):
        GaussianProcess.mle(X, Y[:5])

"""GaussianCopula: exact density, marginals and conditionals against an independent
SciPy implementation (scipy.stats marginals + multivariate_normal); sampling and the
two-step MLE checked against the known distribution."""

from __future__ import annotations

import numpy as np
import pyro.distributions as dist
import pytest
import scipy.special as sp
import scipy.stats as st
import torch

from genprog.models.copula import GaussianCopula, marginal_cdf, marginal_icdf

F64 = torch.float64
R = np.array([[1.0, 0.5, 0.2, 0.1],
              [0.5, 1.0, -0.3, 0.0],
              [0.2, -0.3, 1.0, 0.4],
              [0.1, 0.0, 0.4, 1.0]])


def t(v):
    return torch.tensor(v, dtype=F64)


def marginals():
    return [dist.Gamma(t(2.0), t(1.5)), dist.LogNormal(t(0.3), t(0.7)), dist.Beta(t(2.0), t(3.0)),
            dist.Normal(t(-1.0), t(2.0))]


SCIPY = [st.gamma(2.0, scale=1 / 1.5), st.lognorm(0.7, scale=np.exp(0.3)), st.beta(2.0, 3.0),
         st.norm(-1.0, 2.0)]


def copula(dims=None):
    dims = list(range(4)) if dims is None else dims
    return GaussianCopula(corr=R[np.ix_(dims, dims)],
                          marginals=[marginals()[i] for i in dims]).to(dtype=F64)


def ref_logpdf(y, dims=None):
    """Independent Gaussian-copula density from scipy.stats (``y [N, len(dims)]``)."""
    dims = list(range(4)) if dims is None else dims
    y = np.atleast_2d(y)
    z = np.stack([st.norm.ppf(SCIPY[i].cdf(y[:, j])) for j, i in enumerate(dims)], 1)
    mvn = st.multivariate_normal(np.zeros(len(dims)), R[np.ix_(dims, dims)])
    return (mvn.logpdf(z) - st.norm.logpdf(z).sum(1)
            + sum(SCIPY[i].logpdf(y[:, j]) for j, i in enumerate(dims)))


def ref_sample(n, seed):
    rng = np.random.default_rng(seed)
    z = rng.multivariate_normal(np.zeros(4), R, size=n)
    return np.stack([SCIPY[i].ppf(st.norm.cdf(z[:, i])) for i in range(4)], 1)


Y = ref_sample(30, 0)


@pytest.mark.reference("GaussianCopula", "log_prob", "scipy.stats marginals + multivariate_normal (independent implementation)")
@pytest.mark.reference("GaussianCopula", "log_marginal", "scipy.stats marginals + multivariate_normal (independent implementation)")
def test_log_prob_matches_scipy():
    c = copula()
    np.testing.assert_allclose(c.log_prob(y=Y, pointwise=True).numpy(), ref_logpdf(Y), atol=1e-9)
    assert float(c.log_prob(y=Y[0])) == pytest.approx(ref_logpdf(Y[0])[0], abs=1e-9)
    est = c.condition(y=Y).log_marginal()
    assert est.method == "exact" and est.value == pytest.approx(ref_logpdf(Y).sum(), abs=1e-8)


@pytest.mark.reference("GaussianCopula", "log_prob", "scipy.special.betainc / scipy.stats ppf for the Beta and Gamma cdf and inverse cdf")
def test_cdf_and_inverse_cdf_match_scipy():
    u = torch.linspace(1e-6, 1 - 1e-6, 101, dtype=F64)
    for d, ref in zip(marginals(), SCIPY):
        y = marginal_icdf(d, u)
        np.testing.assert_allclose(y.numpy(), ref.ppf(u.numpy()), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(marginal_cdf(d, y).numpy(), u.numpy(), atol=1e-12)
    x = torch.linspace(0.001, 0.999, 50, dtype=F64)
    for a, b in [(0.5, 0.7), (2.0, 3.0), (30.0, 2.0), (80.0, 120.0)]:
        ours = marginal_cdf(dist.Beta(t(a), t(b)), x).numpy()
        np.testing.assert_allclose(ours, sp.betainc(a, b, x.numpy()), atol=1e-12)


@pytest.mark.reference("GaussianCopula", "sample", "KS against scipy.stats marginals; Kendall's tau = 2/pi arcsin(rho)")
def test_sampling_marginals_and_dependence():
    y = copula().sample(2000, seed=1)["y"].numpy()
    for i in range(4):
        assert st.kstest(y[:, i], SCIPY[i].cdf).pvalue > 1e-3
    for i, j in [(0, 1), (1, 2), (2, 3)]:
        tau = st.kendalltau(y[:, i], y[:, j]).statistic
        assert tau == pytest.approx(2 / np.pi * np.arcsin(R[i, j]), abs=0.05)


@pytest.mark.reference("GaussianCopula", "marginalize", "scipy copula density over the kept dims with the sub-correlation")
def test_marginalize():
    c = copula()
    sub = c.marginalize(dims=[1, 3])
    np.testing.assert_allclose(sub.log_prob(y=Y[:, [0, 2]], pointwise=True).numpy(),
                               ref_logpdf(Y[:, [0, 2]], dims=[0, 2]), atol=1e-9)
    one = c.marginalize(dims=[0, 1, 3])  # a 1-d copula is its marginal
    np.testing.assert_allclose(one.log_prob(y=Y[:, [2]], pointwise=True).numpy(),
                               SCIPY[2].logpdf(Y[:, 2]), atol=1e-9)


@pytest.mark.reference("GaussianCopula", "condition", "scipy: joint density minus the marginal density of the conditioning dims; conditional cdf by KS")
def test_condition():
    c = copula()
    y_obs = {1: 1.2, 3: -0.5}
    cond = c.condition(dims=y_obs)
    rest = [0, 2]
    ys = Y[:, rest]
    full = np.empty((len(ys), 4))
    full[:, rest] = ys
    full[:, 1], full[:, 3] = 1.2, -0.5
    ref = ref_logpdf(full) - ref_logpdf(np.array([[1.2, -0.5]]), dims=[1, 3])
    np.testing.assert_allclose(cond.log_prob(y=ys, pointwise=True).numpy(), ref, atol=1e-8)
    # sampling from the conditional: y_0 | y_obs has cdf Phi((z_0 - m) / s) (latent Gaussian)
    draws = cond.sample(1000, seed=2)["y"].numpy()
    z_obs = np.array([st.norm.ppf(SCIPY[1].cdf(1.2)), st.norm.ppf(SCIPY[3].cdf(-0.5))])
    g = R[0, [1, 3]] @ np.linalg.inv(R[np.ix_([1, 3], [1, 3])])
    m, s = g @ z_obs, np.sqrt(R[0, 0] - g @ R[[1, 3], 0])
    cdf = lambda v: st.norm.cdf((st.norm.ppf(SCIPY[0].cdf(v)) - m) / s)
    assert st.kstest(draws[:, 0], cdf).pvalue > 1e-3
    # conditioning composes: condition on 1, then on 3 == condition on both
    two = c.condition(dims={1: 1.2}).condition(dims={2: -0.5})
    np.testing.assert_allclose(two.log_prob(y=ys, pointwise=True).numpy(), ref, atol=1e-8)


@pytest.mark.reference("GaussianCopula", "mle", "scipy.stats gamma/beta .fit (floc=0) for the marginals; recovery of the correlation")
def test_mle_recovers_parameters():
    y = ref_sample(3000, 3)
    fit = GaussianCopula.mle(y, [dist.Gamma, dist.LogNormal, dist.Beta, dist.Normal])
    ms = fit.marginals
    a, _, scale = st.gamma.fit(y[:, 0], floc=0)
    assert float(ms[0].concentration) == pytest.approx(a, rel=1e-4)
    assert float(ms[0].rate) == pytest.approx(1 / scale, rel=1e-4)
    a, b, _, _ = st.beta.fit(y[:, 2], floc=0, fscale=1)
    assert float(ms[2].concentration1) == pytest.approx(a, rel=1e-4)
    assert float(ms[2].concentration0) == pytest.approx(b, rel=1e-4)
    s, _, scale = st.lognorm.fit(y[:, 1], floc=0)
    assert float(ms[1].scale) == pytest.approx(s, rel=1e-4)
    assert float(ms[1].loc) == pytest.approx(np.log(scale), abs=1e-4)
    np.testing.assert_allclose(fit.kwargs["corr"].numpy(), R, atol=0.06)
    assert float(ms[0].concentration) == pytest.approx(2.0, rel=0.1)
    assert float(ms[3].scale) == pytest.approx(2.0, rel=0.05)


def test_map_fit_of_correlation_and_marginal():
    """Generic Bayesian route: LKJ prior on the correlation, priors on a LogNormal's loc
    and scale (marginal given as a class)."""
    truth = GaussianCopula(corr=[[1.0, 0.6], [0.6, 1.0]],
                           marginals=[dist.Normal(t(0.0), t(1.0)), dist.LogNormal(t(0.5), t(0.5))])
    y = truth.to(dtype=F64).sample(400, seed=4)["y"]
    model = GaussianCopula(marginals=[dist.Normal(t(0.0), t(1.0)), dist.LogNormal]).to(dtype=F64)
    assert model.missing_parameters() == ["corr", "m1_loc", "m1_scale"]
    fit = model.condition(y=y).fit("map")
    chol = fit.draws["corr_cholesky"].reshape(-1, 2, 2)[0]
    assert float((chol @ chol.T)[0, 1]) == pytest.approx(0.6, abs=0.08)
    assert float(fit.draws["m1_loc"].reshape(-1)[0]) == pytest.approx(0.5, abs=0.1)
    assert float(fit.draws["m1_scale"].reshape(-1)[0]) == pytest.approx(0.5, abs=0.08)


def test_bad_input():
    ms = marginals()[:2]
    with pytest.raises(ValueError, match="unit diagonal"):
        GaussianCopula(corr=[[2.0, 0.5], [0.5, 1.0]], marginals=ms)
    with pytest.raises(ValueError, match="not positive definite"):
        GaussianCopula(corr=[[1.0, 1.5], [1.5, 1.0]], marginals=ms)
    with pytest.raises(ValueError, match="corr must be \\[2, 2\\]"):
        GaussianCopula(corr=np.eye(3), marginals=ms)
    with pytest.raises(ValueError, match="symmetric"):
        GaussianCopula(corr=[[1.0, 0.5], [0.2, 1.0]], marginals=ms)
    with pytest.raises(ValueError, match="discrete"):
        GaussianCopula(corr=np.eye(2), marginals=[dist.Poisson(3.0), ms[0]])
    with pytest.raises(ValueError, match="univariate"):
        GaussianCopula(corr=np.eye(2), marginals=[dist.Normal(torch.zeros(2), 1.0), ms[0]])
    with pytest.raises(TypeError, match="must be a torch/Pyro distribution"):
        GaussianCopula(corr=np.eye(2), marginals=["gamma", ms[0]])
    with pytest.raises(ValueError, match="marginals .* are required"):
        GaussianCopula(corr=np.eye(2))
    with pytest.raises(ValueError, match="invalid parameters"):
        GaussianCopula(corr=np.eye(1), marginals=[ms[0]], m0_rate=-1.0)
    c = copula()
    with pytest.raises(ValueError, match="y must have shape"):
        c.log_prob(y=np.ones((3, 2)))
    with pytest.raises(ValueError, match="outside the support"):
        c.condition(dims={0: -1.0})
    with pytest.raises(ValueError, match="3 columns but 2 marginals"):
        GaussianCopula.mle(np.ones((5, 3)), [dist.Normal, dist.Normal])
    with pytest.raises(ValueError, match="outside the support of Gamma"):
        GaussianCopula.mle(-np.ones((5, 1)), [dist.Gamma])

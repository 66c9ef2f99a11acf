"""Normalizing flows: exact log p of analytic flows against SciPy's densities, estimated
marginals/conditionals calibrated against the exact Gaussian ones, training beats a
Gaussian baseline on two moons."""

from __future__ import annotations

import warnings

import numpy as np
import pyro.distributions.transforms as T
import pytest
import scipy.stats as st
import torch

from genprog.errors import ConvergenceWarning
from genprog.models.flow import Flow, SinhTransform, build_transforms

D64 = torch.float64


def _t(x):
    return torch.tensor(x, dtype=D64)


def _affine(loc, scale):
    return T.AffineTransform(_t(loc), _t(scale))


GAMMA, DELTA, XI, LAM = 0.4, 1.3, -1.0, 2.0
# name -> (transforms applied to u ~ N(0, 1), frozen SciPy distribution, evaluation points)
ANALYTIC = {
    "lognormal": ([_affine(0.3, 0.7), T.ExpTransform()], st.lognorm(s=0.7, scale=np.exp(0.3)),
                  [0.2, 1.0, 2.5, 7.0]),
    "johnson_su": ([_affine(-GAMMA / DELTA, 1 / DELTA), SinhTransform(), _affine(XI, LAM)],
                   st.johnsonsu(GAMMA, DELTA, loc=XI, scale=LAM), [-6.0, -1.5, 0.0, 3.0]),
    "johnson_sb": ([_affine(-GAMMA / DELTA, 1 / DELTA), T.SigmoidTransform(), _affine(XI, LAM)],
                   st.johnsonsb(GAMMA, DELTA, loc=XI, scale=LAM), [-0.9, -0.2, 0.5, 0.95]),
}


@pytest.mark.reference("Flow", "log_prob", "scipy.stats lognorm / johnsonsu / johnsonsb / multivariate_normal")
@pytest.mark.reference("Flow", "log_marginal", "scipy.stats densities (sum over rows)")
@pytest.mark.parametrize("name", sorted(ANALYTIC))
def test_analytic_flow_log_prob_matches_scipy(name):
    transforms, ref, points = ANALYTIC[name]
    flow = Flow(transforms=transforms, dim=1).to(dtype=D64)
    y = _t(points).reshape(-1, 1)
    rows = flow.log_prob(y=y, pointwise=True)
    np.testing.assert_allclose(rows.numpy(), ref.logpdf(points), rtol=1e-10, atol=1e-10)
    est = flow.condition(y=y).log_marginal()
    assert est.method == "exact" and est.stderr == 0
    np.testing.assert_allclose(est.value, ref.logpdf(points).sum(), rtol=1e-10)


LOC = [1.0, -2.0, 0.5]
CHOL = [[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.4, 0.5]]


def _gaussian_flow():
    t = T.LowerCholeskyAffine(_t(LOC), _t(CHOL))
    return Flow(transforms=[t], dim=3).to(dtype=D64), st.multivariate_normal(
        LOC, np.array(CHOL) @ np.array(CHOL).T)


@pytest.mark.reference("Flow", "log_prob", "scipy.stats.multivariate_normal (affine flow)")
def test_affine_flow_is_the_gaussian():
    flow, ref = _gaussian_flow()
    y = torch.randn(20, 3, dtype=D64) * 2
    np.testing.assert_allclose(flow.log_prob(y=y, pointwise=True).numpy(), ref.logpdf(y.numpy()),
                               rtol=1e-10)
    draws = flow.sample(20000, seed=1)["y"]
    cov = np.array(CHOL) @ np.array(CHOL).T
    np.testing.assert_array_less(np.abs(draws.mean(0).numpy() - LOC), 4 * np.sqrt(np.diag(cov) / 20000))
    np.testing.assert_allclose(np.cov(draws.numpy().T), cov, atol=0.05)


def test_estimated_marginal_log_prob_is_calibrated():
    flow, _ = _gaussian_flow()
    cov = np.array(CHOL) @ np.array(CHOL).T
    keep = [0, 2]
    marginal = flow.marginalize(dims=[1])
    y = torch.tensor([1.5, 0.0], dtype=D64)
    est = marginal.log_prob(y, method="ais", num_particles=128, num_temps=60)
    exact = st.multivariate_normal(np.array(LOC)[keep], cov[np.ix_(keep, keep)]).logpdf(y.numpy())
    assert est.stderr > 0
    assert abs(est.value - exact) < 4 * est.stderr + 0.02, (est, exact)
    assert marginal.sample(10, seed=0)["y"].shape == (10, 2)


def test_estimated_conditional_samples_the_gaussian_conditional():
    flow, _ = _gaussian_flow()
    cov = np.array(CHOL) @ np.array(CHOL).T
    cond = flow.condition(dims={0: 2.0})
    fit = cond.fit("nuts", chains=2, warmup=200, draws=300, seed=0)
    rest = fit.draws["y_rest"].reshape(-1, 2).numpy()
    s_ab = cov[1:, :1]
    mean = np.array(LOC[1:]) + (s_ab[:, 0] / cov[0, 0]) * (2.0 - LOC[0])
    ccov = cov[1:, 1:] - s_ab @ s_ab.T / cov[0, 0]
    se = np.sqrt(np.diag(ccov) / 150)  # conservative ESS
    np.testing.assert_array_less(np.abs(rest.mean(0) - mean), 4 * se)
    np.testing.assert_allclose(rest.std(0), np.sqrt(np.diag(ccov)), rtol=0.2)
    lm = cond.log_marginal("ais", num_particles=128, num_temps=60)
    exact = st.norm(LOC[0], np.sqrt(cov[0, 0])).logpdf(2.0)
    assert abs(lm.value - exact) < 4 * lm.stderr + 0.02


def _moons(n, seed):
    from sklearn.datasets import make_moons

    x, _ = make_moons(n, noise=0.08, random_state=seed)
    return torch.tensor(x, dtype=torch.float32)


def test_trained_flow_beats_a_gaussian_on_two_moons():
    train, test = _moons(1000, 0), _moons(1000, 1)
    with warnings.catch_warnings():  # a short run may stop before the plateau
        warnings.simplefilter("ignore", ConvergenceWarning)
        flow = Flow.mle(train, kind="spline_coupling", layers=2, hidden=16, max_iters=300,
                        batch_size=256, learning_rate=1e-2, window=100)
    held_out = flow.log_prob(y=test) / len(test)
    gauss = st.multivariate_normal(train.mean(0).numpy(), np.cov(train.numpy().T))
    baseline = gauss.logpdf(test.numpy()).mean()
    assert held_out > baseline + 0.3, (float(held_out), baseline)
    assert flow.info["num_steps"] <= 300


@pytest.mark.parametrize("kind", ["affine_coupling", "affine_autoregressive", "spline_autoregressive"])
def test_built_flows_are_valid_densities_in_one_dim_slice(kind):
    # a randomly initialised flow integrates to one: check by quadrature in 2-D
    torch.manual_seed(0)
    flow = Flow(transforms=build_transforms(2, kind, layers=2, hidden=8), dim=2)
    grid = torch.linspace(-8, 8, 241)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)
    with torch.no_grad():
        p = flow.log_prob(y=pts, pointwise=True).exp()
    h = float(grid[1] - grid[0])
    assert abs(float(p.sum()) * h * h - 1.0) < 0.02


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="transforms\\[0\\]"):
        Flow(transforms=["exp"], dim=1)
    with pytest.raises(ValueError, match="unknown kind"):
        build_transforms(2, "glow")
    with pytest.raises(ValueError, match="dim >= 2"):
        build_transforms(1, "affine_coupling")
    flow = Flow(transforms=[_affine(0.0, 1.0)], dim=1)
    with pytest.raises(ValueError, match="shape"):
        flow.log_prob(y=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="NaN"):
        Flow.mle(torch.tensor([[0.0], [float("nan")]]))

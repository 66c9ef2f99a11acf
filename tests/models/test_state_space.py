"""LinearGaussianSSM: Kalman log p, filter, RTS smoother and forecast against the joint
Gaussian of y_1..T (SciPy multivariate_normal and Gaussian conditioning) and against
statsmodels' Kalman filter; maximum likelihood against statsmodels' local-level model.

Tolerances: 1e-8 (float64) against the joint Gaussian, 1e-6 against statsmodels."""

from __future__ import annotations

import numpy as np
import pytest
import statsmodels.api as sm
import torch
from scipy.stats import multivariate_normal

import genprog as gp
from genprog.models.state_space import LinearGaussianSSM

D = torch.float64
A = torch.tensor([[0.9, 0.2], [-0.1, 0.7]], dtype=D)
C = torch.tensor([[1.0, 0.5], [0.0, 1.0], [1.0, 1.0]], dtype=D)
Q = torch.tensor([[0.3, 0.1], [0.1, 0.2]], dtype=D)
R = torch.tensor([[0.5, 0.1, 0.0], [0.1, 0.4, 0.0], [0.0, 0.0, 0.3]], dtype=D)
M0 = torch.tensor([1.0, -1.0], dtype=D)
P0 = torch.tensor([[1.0, 0.2], [0.2, 0.8]], dtype=D)


def model(T=4):
    return LinearGaussianSSM(A=A, C=C, Q=Q, R=R, m0=M0, P0=P0, length=T)


def joint(T):
    """Mean and covariance of the stacked states x_1..T [T*h] and observations y_1..T [T*p]."""
    a, c, q, r = A.numpy(), C.numpy(), Q.numpy(), R.numpy()
    h = 2
    mx = [M0.numpy()]
    for _ in range(1, T):
        mx.append(a @ mx[-1])
    V = [P0.numpy()]
    for _ in range(1, T):
        V.append(a @ V[-1] @ a.T + q)
    Sx = np.zeros((T * h, T * h))
    for s in range(T):
        for t in range(s, T):
            block = np.linalg.matrix_power(a, t - s) @ V[s]  # Cov(x_t, x_s)
            Sx[t * h:(t + 1) * h, s * h:(s + 1) * h] = block
            Sx[s * h:(s + 1) * h, t * h:(t + 1) * h] = block.T
    Cb = np.kron(np.eye(T), c)
    my = Cb @ np.concatenate(mx)
    Sy = Cb @ Sx @ Cb.T + np.kron(np.eye(T), r)
    Sxy = Sx @ Cb.T
    return np.concatenate(mx), Sx, my, Sy, Sxy


def condition(mx, Sx, my, Sy, Sxy, y, keep):
    """Mean/cov of the stacked states given the y entries where ``keep``."""
    o = keep
    gain = np.linalg.solve(Sy[np.ix_(o, o)], Sxy[:, o].T).T
    return mx + gain @ (y[o] - my[o]), Sx - gain @ Sxy[:, o].T


@pytest.mark.reference("LinearGaussianSSM", "log_prob", "joint Gaussian of y_1..T (SciPy)")
@pytest.mark.reference("LinearGaussianSSM", "log_marginal", "joint Gaussian of y_1..T (SciPy)")
@pytest.mark.reference("LinearGaussianSSM", "posterior", "Gaussian conditioning of the joint")
def test_log_prob_filter_smoother_match_joint_gaussian_with_missing():
    T = 4
    m = model(T)
    y = m.sample(2, seed=0)["y"].clone()
    y[1, 1] = float("nan")          # a missing time step
    y[1, 2, 0] = float("nan")       # a partially observed step
    mx, Sx, my, Sy, Sxy = joint(T)
    lp = m.log_prob(y=y, pointwise=True)
    post, filt = m.posterior(y), m.filter(y)
    for i in range(2):
        flat = y[i].reshape(-1).numpy()
        o = ~np.isnan(flat)
        ref = multivariate_normal(my[o], Sy[np.ix_(o, o)]).logpdf(flat[o])
        assert abs(float(lp[i]) - ref) < 1e-8
        mean, cov = condition(mx, Sx, my, Sy, Sxy, flat, o)
        for t in range(T):
            np.testing.assert_allclose(post.mean[i, t].numpy(), mean[2 * t:2 * t + 2], atol=1e-8)
            np.testing.assert_allclose(post.cov[i, t].numpy(), cov[2 * t:2 * t + 2, 2 * t:2 * t + 2],
                                       atol=1e-8)
            upto = o & (np.arange(T * 3) < 3 * (t + 1))
            fm, fc = condition(mx, Sx, my, Sy, Sxy, flat, upto)
            np.testing.assert_allclose(filt.mean[i, t].numpy(), fm[2 * t:2 * t + 2], atol=1e-8)
            np.testing.assert_allclose(filt.cov[i, t].numpy(), fc[2 * t:2 * t + 2, 2 * t:2 * t + 2],
                                       atol=1e-8)
    est = m.condition(y=y).log_marginal()
    assert est.method == "exact" and abs(est.value - float(lp.sum())) < 1e-9


def _statsmodels(y):
    mod = sm.tsa.statespace.MLEModel(y, k_states=2)
    mod["design"], mod["obs_cov"], mod["transition"] = C.numpy(), R.numpy(), A.numpy()
    mod["selection"], mod["state_cov"] = np.eye(2), Q.numpy()
    mod.initialize_known(M0.numpy(), P0.numpy())
    return mod


@pytest.mark.reference("LinearGaussianSSM", "log_prob", "statsmodels MLEModel Kalman loglike (NaN = missing)")
@pytest.mark.reference("LinearGaussianSSM", "posterior", "statsmodels smoothed_state / smoothed_state_cov")
def test_matches_statsmodels_kalman_filter_and_forecast():
    T = 30
    m = model(T)
    y = m.sample(1, seed=1)["y"][0].clone()
    y[10:14] = float("nan")
    y[20, 1] = float("nan")
    mod = _statsmodels(y.numpy())
    res = mod.smooth([])
    assert abs(float(m.log_prob(y=y)) - res.llf) < 1e-6
    post, filt = m.posterior(y), m.filter(y)
    np.testing.assert_allclose(post.mean.numpy(), res.smoothed_state.T, atol=1e-6)
    np.testing.assert_allclose(post.cov.numpy(), res.smoothed_state_cov.transpose(2, 0, 1), atol=1e-6)
    np.testing.assert_allclose(filt.mean.numpy(), res.filtered_state.T, atol=1e-6)
    fc = m.forecast(y, steps=3)
    ref = res.get_forecast(3)
    np.testing.assert_allclose(fc.mean.numpy(), ref.predicted_mean, atol=1e-6)
    np.testing.assert_allclose(fc.cov.numpy(), ref.var_pred_mean, atol=1e-6)  # [steps, p, p]


def test_forecast_is_conditioning_of_the_joint():
    T, steps = 3, 2
    m = model(T)
    y = m.sample(1, seed=2)["y"][0]
    _, _, my, Sy, _ = joint(T + steps)
    flat = np.concatenate([y.reshape(-1).numpy(), np.zeros(3 * steps)])
    o = np.arange((T + steps) * 3) < 3 * T
    gain = np.linalg.solve(Sy[np.ix_(o, o)], Sy[np.ix_(~o, o)].T).T
    mean = my[~o] + gain @ (flat[o] - my[o])
    cov = Sy[np.ix_(~o, ~o)] - gain @ Sy[np.ix_(o, ~o)]
    fc = m.forecast(y, steps)
    np.testing.assert_allclose(fc.mean.reshape(-1).numpy(), mean, atol=1e-8)
    for s in range(steps):
        np.testing.assert_allclose(fc.cov[s].numpy(), cov[3 * s:3 * s + 3, 3 * s:3 * s + 3], atol=1e-8)


def test_sampling_moments_and_story_density():
    T = 3
    m = model(T)
    draws = m.sample(6000, seed=3)["y"].reshape(6000, -1)
    _, _, my, Sy, _ = joint(T)
    se = np.sqrt(np.diag(Sy) / 6000)
    assert (np.abs(draws.mean(0).numpy() - my) < 4 * se).all()
    emp = np.cov(draws.numpy().T)
    assert np.abs(emp - Sy).max() < 0.15
    y = m.sample(1, seed=4)["y"][0]
    generic = gp.Model(LinearGaussianSSM.story, n=None, **m.params).to(dtype=D).condition(y=y)
    assert abs(generic.log_marginal().value - float(m.log_prob(y=y))) < 1e-8


@pytest.mark.reference("LinearGaussianSSM", "mle", "statsmodels UnobservedComponents local level fit")
def test_local_level_mle_matches_statsmodels():
    rng = np.random.default_rng(0)
    T = 150
    level = np.cumsum(rng.normal(0, 0.5, T))
    y = level + rng.normal(0, 1.0, T)
    y[40:60] = np.nan
    one = torch.ones(1, 1, dtype=D)
    fit = LinearGaussianSSM.mle(y[:, None], state_dim=1,
                                fixed={"A": one, "C": one, "m0": torch.zeros(1, dtype=D), "P0": 10 * one})
    uc = sm.tsa.UnobservedComponents(y, "llevel")
    uc.initialize_known(np.zeros(1), 10 * np.eye(1))
    uc.loglikelihood_burn = 0
    res = uc.fit(disp=False)
    assert abs(fit.info.log_likelihood - res.llf) < 1e-4
    assert abs(float(fit.kwargs["R"]) - res.params[0]) < 5e-3
    assert abs(float(fit.kwargs["Q"]) - res.params[1]) < 5e-3
    assert abs(float(fit.log_prob(y=y[:, None])) - res.llf) < 1e-4


def test_bad_inputs():
    with pytest.raises(ValueError, match="Q is not positive definite"):
        LinearGaussianSSM(A=A, C=C, Q=-Q, R=R, m0=M0, P0=P0)
    with pytest.raises(ValueError, match="disagrees with state_dim"):
        LinearGaussianSSM(A=A, C=torch.ones(3, 3, dtype=D), Q=Q, R=R, m0=M0, P0=P0)
    with pytest.raises(ValueError, match=r"y must be \[T, 3\]"):
        model().log_prob(y=torch.zeros(4, 2, dtype=D))
    with pytest.raises(ValueError, match="infinite"):
        model().log_prob(y=torch.full((4, 3), float("inf"), dtype=D))
    with pytest.raises(ValueError, match="unknown parameter 'B'"):
        LinearGaussianSSM.mle(np.zeros((5, 1)), state_dim=1, fixed={"B": 1.0})
    with pytest.raises(ValueError, match="steps must be a positive int"):
        model().forecast(torch.zeros(4, 3, dtype=D), steps=0)

"""Score-based diffusion: with the analytic score of a diffused Gaussian mixture the
probability-flow log p equals the mixture's closed-form density (SciPy, with the SDE's
kernel integrated by quadrature); ODE and reverse-SDE samples pass an MMD two-sample test
against exact mixture draws (and a wrong mixture fails it); a 1-D flow integrates to one;
denoising score matching lowers its loss (slow: held-out log p near the truth)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.integrate
import scipy.stats as st
import torch

from genprog.errors import ConvergenceWarning
from genprog.models.diffusion import (
    Diffusion,
    DiffusionSDE,
    GaussianMixtureScore,
    ScoreNet,
    probability_flow_log_prob,
)
from genprog.models.two_sample import mmd_test

D64 = torch.float64
# an asymmetric two-component mixture with mean zero, so the N(0, I) prior of the VP
# model matches the diffused mixture at T = 1 to second order in alpha(1)
W = np.array([0.3, 0.7])
MU = np.array([[-1.4, 0.7], [0.6, -0.3]])
S = np.array([[[0.3, 0.1], [0.1, 0.2]], [[0.25, -0.05], [-0.05, 0.4]]])
SDE_KW = {"vp": {}, "ve": {"sigma_max": 200.0}}


def _kernel(kind, t, kw):
    """(alpha(t), v(t)) of the perturbation kernel, from beta / g^2 by quadrature."""
    if kind == "vp":
        bmin, bmax = 0.1, 20.0
        integral = scipy.integrate.quad(lambda s: bmin + s * (bmax - bmin), 0, t)[0]
        a = math.exp(-0.5 * integral)
        return a, 1 - a * a
    smin, smax = 0.01, kw["sigma_max"]
    g2 = lambda s: 2 * math.log(smax / smin) * smin ** 2 * (smax / smin) ** (2 * s)
    return 1.0, scipy.integrate.quad(g2, 0, t)[0]


def _mixture_logpdf(x, a, v):
    comps = [st.multivariate_normal(a * MU[k], a * a * S[k] + v * np.eye(2)) for k in range(2)]
    return np.logaddexp.reduce([np.log(W[k]) + comps[k].logpdf(x) for k in range(2)], axis=0)


def _model(kind, **kw):
    sde = DiffusionSDE(kind, **SDE_KW[kind])
    score = GaussianMixtureScore(torch.tensor(W), torch.tensor(MU), torch.tensor(S), sde)
    return Diffusion(score=score, dim=2, sde=kind, **SDE_KW[kind], **kw)


def _mixture_draws(n, seed, weights=W):
    rng = np.random.default_rng(seed)
    k = rng.choice(2, size=n, p=weights)
    return torch.tensor(np.stack([rng.multivariate_normal(MU[j], S[j]) for j in k]))


@pytest.mark.reference("Diffusion", "log_prob", "closed-form density of the diffused Gaussian "
                       "mixture at t_min (SciPy, kernel by quadrature) with its analytic score")
@pytest.mark.reference("Diffusion", "log_marginal", "the same closed form, summed over rows")
@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_probability_flow_log_prob_is_the_mixture_density(kind):
    m = _model(kind)
    t_min = m.kwargs["t_min"]
    # the model starts the ODE at N(0, s^2 I), the mixture at T is slightly different:
    # bound that mismatch over where x(T) lives (|x| < 4 prior sds) from closed forms
    a_T, v_T = _kernel(kind, 1.0, SDE_KW[kind])
    s = m.sde.prior_std
    grid = np.stack(np.meshgrid(*[np.linspace(-4 * s, 4 * s, 81)] * 2), -1).reshape(-1, 2)
    grid = grid[np.linalg.norm(grid, axis=1) <= 4 * s]
    prior = st.multivariate_normal(np.zeros(2), s * s * np.eye(2)).logpdf(grid)
    assert np.abs(_mixture_logpdf(grid, a_T, v_T) - prior).max() < 3e-4
    y = np.array([[0.0, 0.0], [-1.4, 0.6], [0.7, -0.4], [2.0, 1.0], [-0.5, -1.5]])
    a, v = _kernel(kind, t_min, SDE_KW[kind])
    ref = _mixture_logpdf(y, a, v)
    lp = m.to(dtype=D64).log_prob(y=torch.tensor(y), pointwise=True).detach().numpy()
    np.testing.assert_allclose(lp, ref, atol=1e-3)
    # t_min = 1e-3 is close to the data: within 0.05 nats of the undiffused mixture
    np.testing.assert_allclose(lp, _mixture_logpdf(y, 1.0, 0.0), atol=0.05)
    est = m.condition(y=torch.tensor(y[:3])).log_marginal()
    assert est.method == "exact" and abs(est.value - ref[:3].sum()) < 3e-3


class _WobblyScore(torch.nn.Module):
    """``-x`` (the VP score of N(0, 1) at every t) plus a random smooth field of (x, t)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def forward(self, x, t):
        tt = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[:-1]).unsqueeze(-1)
        return -x + self.net(torch.cat([x, tt], -1))


def test_one_dimensional_probability_flow_integrates_to_one():
    torch.manual_seed(3)
    net = _WobblyScore().to(D64)  # any score field gives a normalised model
    grid = torch.linspace(-10, 10, 801, dtype=D64).reshape(-1, 1)
    p = probability_flow_log_prob(net, DiffusionSDE("vp"), grid).exp().detach()
    assert float(p[0] + p[-1]) < 1e-6
    assert abs(float(torch.trapezoid(p, grid[:, 0])) - 1.0) < 1e-3
    gauss = torch.distributions.Normal(0.0, 1.0).log_prob(grid[:, 0]).exp()
    assert float((p - gauss).abs().max()) > 0.01  # not just the N(0, 1) of the -x part


@pytest.mark.parametrize("method,kind", [("ode", "vp"), ("sde", "vp"), ("ode", "ve")])
def test_samples_from_the_true_score_match_the_mixture(method, kind):
    m = _model(kind)
    n = 600
    y = m.sample(n, seed=1, method=method, steps=500)["y"]
    assert y.shape == (n, 2)
    exact = _mixture_draws(n, seed=2)
    assert mmd_test(y, exact, num_permutations=200).p_value > 0.01
    # the test has power at this size: a mixture with the weights swapped is rejected
    wrong = _mixture_draws(n, seed=3, weights=W[::-1])
    assert mmd_test(y, wrong, num_permutations=200).p_value < 0.01


def test_sample_shapes_and_conditioned_rows():
    m = _model("vp")
    assert m.sample(3, seed=0, method="sde", steps=20)["y"].shape == (3, 2)
    mc = m.condition(y=torch.zeros(4, 2))
    assert mc.sample(2, seed=0, method="sde", steps=20)["y"].shape == (2, 4, 2)
    a = m.sample(5, seed=7, method="sde", steps=20)["y"]
    assert torch.equal(a, m.sample(5, seed=7, method="sde", steps=20)["y"])


def test_score_matching_training_lowers_the_loss():
    y = _mixture_draws(600, seed=0).float()
    held = _mixture_draws(400, seed=1).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        m = Diffusion.mle(y, hidden=(32, 32), max_iters=300, batch_size=128, window=100)
    trace = m.info["loss_trace"]
    assert np.mean(trace[-100:]) < np.mean(trace[:100]) - 0.1
    untrained = Diffusion(score=ScoreNet(2, DiffusionSDE("vp"), hidden=(32, 32)), dim=2)
    assert (float(m.score_matching_loss(held, seed=0))
            < float(untrained.score_matching_loss(held, seed=0)) - 0.1)


@pytest.mark.slow
def test_trained_diffusion_log_prob_is_close_to_the_truth():
    y = _mixture_draws(4000, seed=0)
    held = _mixture_draws(300, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        m = Diffusion.mle(y, hidden=(64, 64))  # about 6000 steps, 20 s
    m = m.to(dtype=D64)
    truth = _mixture_logpdf(held.numpy(), 1.0, 0.0).mean()
    lp = float(m.log_prob(y=held, pointwise=True).mean())
    gauss = st.multivariate_normal(y.mean(0).numpy(), np.cov(y.numpy().T)).logpdf(held.numpy()).mean()
    assert abs(lp - truth) < 0.1 and lp > gauss + 0.2, (lp, truth, gauss)
    s = m.sample(600, seed=0)["y"]
    assert mmd_test(s, _mixture_draws(600, seed=5), num_permutations=200).p_value > 0.01


@pytest.mark.slow
def test_estimated_marginal_is_calibrated_against_the_mixture_marginal():
    # AIS with HMC through the ODE (conditional_by_inference on the exact density): ~2 min
    m = _model("vp").to(dtype=D64)
    est = m.marginalize(dims=[1]).log_prob(torch.tensor([0.3], dtype=D64), method="ais",
                                           num_particles=16, num_temps=20)
    a, v = _kernel("vp", m.kwargs["t_min"], {})
    ref = np.logaddexp.reduce([np.log(W[k]) + st.norm(a * MU[k, 0], np.sqrt(a * a * S[k, 0, 0] + v))
                               .logpdf(0.3) for k in range(2)])
    assert abs(est.value - ref) < 4 * est.stderr and est.stderr < 0.2, (est, ref)


def test_bad_input_is_named():
    sde = DiffusionSDE("vp")
    with pytest.raises(TypeError, match="nn.Module"):
        Diffusion(score=lambda x, t: x, dim=2)
    with pytest.raises(ValueError, match="dim"):
        Diffusion(score=ScoreNet(2, sde), dim=0)
    with pytest.raises(ValueError, match="sde"):
        Diffusion(score=ScoreNet(2, sde), dim=2, sde="subvp")
    with pytest.raises(ValueError, match="sigma_min"):
        Diffusion(score=ScoreNet(2, sde), dim=2, sde="ve", sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="method"):
        Diffusion(score=ScoreNet(2, sde), dim=2).sample(2, method="euler")
    with pytest.raises(ValueError, match="shape"):
        Diffusion(score=ScoreNet(2, sde), dim=2).log_prob(y=torch.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        Diffusion.mle(torch.tensor([[float("nan"), 0.0], [0.0, 0.0]]))
    with pytest.raises(TypeError, match="unknown option"):
        Diffusion.mle(torch.zeros(4, 2), max_iters=1, beta=3.0)


@pytest.mark.gpu
def test_runs_on_cuda():
    m = _model("vp").to("cuda")
    y = m.sample(64, seed=0)["y"]
    assert y.device.type == "cuda"
    assert m.sample(8, seed=0, method="sde", steps=50)["y"].device.type == "cuda"
    lp = m.log_prob(y=y[:4], pointwise=True)
    assert lp.device.type == "cuda" and torch.isfinite(lp).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        t = Diffusion.mle(_mixture_draws(200, seed=0).float().cuda(), hidden=(16,), max_iters=20,
                          window=10)
    assert next(t.score.parameters()).device.type == "cuda"

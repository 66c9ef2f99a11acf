"""``Model.fit("mle", random=[...])``: population maximum likelihood with the random effects
integrated out per group by Laplace (:mod:`genprog.infer.nlme`), on any Pyro model.

References and tolerances:

* A linear Gaussian mixed model (random intercepts, unbalanced groups through a mask),
  where Laplace is exact: the maximum of the exact marginal likelihood (each group's
  ``y_g ~ MVN(mu 1, sigma^2 I + tau^2 11^T)``, maximised by SciPy in float64) — estimates
  to 1e-5 relative, ``-2LL`` to 1e-6.
* theo_sd written by hand as a plain Pyro model (closed-form one-compartment oral
  absorption, log-normal etas, additive error): the same estimates (1e-6 relative) and
  OFV (1e-6) as ``PopulationModel(...).fit(data, "mle")`` under both approximations
  (Laplace: OFV 118.5036; FOCE-I: 116.8034, NONMEM's and nlmixr2's value).
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import optimize, stats
from torchdiffeq import odeint

import genprog as gp
from genprog import pk
from genprog.infer.nlme import conditional_modes, focei_log_likelihood
from genprog.infer.saem import MixedEffectsDensity

# ---------------------------------------------------------------- linear mixed model

RNG = np.random.default_rng(7)
G, T = 15, 6
SIZES = RNG.integers(1, T + 1, size=G)           # 1..6 observations per group (one group may have 1)
SIZES[0] = 1                                      # a group whose data cannot pin its effect down
MASK = np.arange(T)[None, :] < SIZES[:, None]
TRUE_B = RNG.normal(0.0, 1.3, size=G)
Y = np.where(MASK, 2.0 + TRUE_B[:, None] + RNG.normal(0.0, 0.6, size=(G, T)), 0.0)


def lmm(mask, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    tau = pyro.sample("tau", dist.HalfNormal(5.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
    with pyro.plate("group", mask.shape[0]):
        b = pyro.sample("b", dist.Normal(0.0, tau))
        pyro.sample("y", dist.Normal((mu + b)[..., None] + torch.zeros(mask.shape[-1]), sigma)
                    .mask(mask).to_event(1), obs=y)


def exact_lmm_ml():
    """ML of the exact marginal likelihood (SciPy), returning (mu, tau, sigma, -2LL)."""
    def neg_ll(p):
        mu, tau, sigma = p[0], math.exp(p[1]), math.exp(p[2])
        total = 0.0
        for g in range(G):
            y = Y[g, :SIZES[g]]
            cov = sigma**2 * np.eye(SIZES[g]) + tau**2 * np.ones((SIZES[g], SIZES[g]))
            total += stats.multivariate_normal(np.full(SIZES[g], mu), cov).logpdf(y)
        return -total

    best = optimize.minimize(neg_ll, np.array([1.0, 0.0, 0.0]), method="Nelder-Mead",
                             options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000})
    best = optimize.minimize(neg_ll, best.x, method="BFGS", options={"gtol": 1e-9})
    return best.x[0], math.exp(best.x[1]), math.exp(best.x[2]), 2 * best.fun


@pytest.fixture(scope="module")
def lmm_fit():
    m = gp.Model(lmm, torch.tensor(MASK)).to(dtype=torch.float64).condition(y=torch.tensor(Y))
    return m.fit("mle", random=["b"])


def test_linear_mixed_model_matches_the_exact_maximum_likelihood(lmm_fit):
    mu, tau, sigma, m2ll = exact_lmm_ml()
    est = lmm_fit.info["estimates"]
    for name, ref in (("mu", mu), ("tau", tau), ("sigma", sigma)):
        assert abs(float(est[name]) / ref - 1) < 1e-5, (name, float(est[name]), ref)
    assert abs(lmm_fit.info["minus2ll"] - m2ll) < 1e-6
    assert lmm_fit.info["num_observations"] == int(MASK.sum())
    assert lmm_fit.info["ofv"] == pytest.approx(m2ll - MASK.sum() * math.log(2 * math.pi), abs=1e-6)


def test_ebes_are_the_conditional_means_and_the_fit_is_a_point_fit(lmm_fit):
    """For a Gaussian model the EBE is the conditional mean: shrunk group deviations."""
    est = {k: float(v) for k, v in lmm_fit.info["estimates"].items()}
    ybar = np.array([Y[g, :SIZES[g]].mean() for g in range(G)])
    shrink = est["tau"] ** 2 / (est["tau"] ** 2 + est["sigma"] ** 2 / SIZES)
    expected = shrink * (ybar - est["mu"])
    assert np.allclose(lmm_fit.draws["b"][0, 0].numpy(), expected, atol=1e-6)
    assert lmm_fit.method == "mle" and lmm_fit.num_draws == 1
    se = {k: float(v) for k, v in lmm_fit.info["stderr"].items()}
    assert all(math.isfinite(v) and v > 0 for v in se.values())


def test_standard_errors_match_the_exact_information():
    """SEs from the finite-difference Hessian against SciPy's numerical Hessian of the
    exact marginal likelihood (mu's SE), within 2%."""
    m = gp.Model(lmm, torch.tensor(MASK)).to(dtype=torch.float64).condition(y=torch.tensor(Y))
    fit = m.fit("mle", random=["b"])
    tau, sigma = (float(fit.info["estimates"][k]) for k in ("tau", "sigma"))
    w = 1.0 / (sigma**2 / SIZES + tau**2)   # GLS weights of the group means
    se_mu = 1.0 / math.sqrt(w.sum())
    assert abs(float(fit.info["stderr"]["mu"]) / se_mu - 1) < 0.02


@pytest.mark.parametrize("random, match", [
    (["nope"], "nope"),
    (["mu"], "does not span|share no plate"),
    ([], "at least one"),
])
def test_bad_random_sites(random, match):
    m = gp.Model(lmm, torch.tensor(MASK)).condition(y=torch.tensor(Y, dtype=torch.float32))
    with pytest.raises(ValueError, match=match):
        m.fit("mle", random=random)


# ---------------------------------------------------------------- theo_sd by hand


def theo_by_hand(dose_time, dose_amt, obs_time, obs_mask, dv=None):
    """One-compartment oral absorption, log-normal etas on ka, cl, v, additive error —
    the model PopulationModel builds, written as a user would."""
    ka = pyro.sample("ka", dist.LogNormal(0.0, 10.0))
    cl = pyro.sample("cl", dist.LogNormal(0.0, 10.0))
    v = pyro.sample("v", dist.LogNormal(0.0, 10.0))
    omega = pyro.sample("omega", dist.HalfNormal(torch.ones(3)).to_event(1))
    sigma = pyro.sample("sigma_add", dist.HalfNormal(10.0))
    with pyro.plate("subject", obs_time.shape[0]):
        eta = pyro.sample("eta", dist.Normal(torch.zeros(3), omega).to_event(1))
        ka_i = (ka * torch.exp(eta[..., 0:1]))[..., None]
        v_i = (v * torch.exp(eta[..., 2:3]))[..., None]
        k = (cl * torch.exp(eta[..., 1:2]))[..., None] / v_i
        dt = obs_time[..., :, None] - dose_time[..., None, :]          # [S, T, doses]
        after = dt > 0
        dt = torch.where(after, dt, torch.zeros_like(dt))
        c = dose_amt[..., None, :] * ka_i / (v_i * (ka_i - k)) * (torch.exp(-k * dt) - torch.exp(-ka_i * dt))
        conc = torch.where(after, c, torch.zeros_like(c)).sum(-1)
        pyro.sample("dv", dist.Normal(conc, sigma).mask(obs_mask).to_event(1), obs=dv)


@pytest.mark.parametrize("approximation", ["laplace", "focei"])
def test_hand_written_theo_sd_reproduces_population_model(approximation):
    data = pk.read_nonmem(pk.dataset_path("theo_sd")).to(dtype=torch.float64)
    pop = pk.PopulationModel(structure=pk.OneCompartment(absorption="first_order"),
                             random_effects=["ka", "cl", "v"], error="additive")
    ref = pop.fit(data, method="mle", approximation=approximation, standard_errors=False)
    m = gp.Model(theo_by_hand, data.dose_time, data.dose_amt * data.dose_mask, data.obs_time,
                 data.obs_mask).to(dtype=torch.float64).condition(dv=torch.nan_to_num(data.obs_dv))
    fit = m.fit("mle", random=["eta"], approximation=approximation, standard_errors=False,
                init={"ka": 1.5, "cl": 3.0, "v": 30.0, "omega": torch.tensor([0.5, 0.3, 0.2]),
                      "sigma_add": 0.7})
    assert abs(fit.info["ofv"] - ref.ofv) < 1e-6, (fit.info["ofv"], ref.ofv)
    assert abs(fit.info["ofv"] - {"laplace": 118.5036, "focei": 116.8034}[approximation]) < 1e-3
    for name in ("ka", "cl", "v", "omega", "sigma_add"):
        ours = fit.info["estimates"][name].double()
        theirs = torch.as_tensor(ref.estimates[name]).double()
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=0), (name, ours, theirs)


def theo_ode_by_hand(dose_amt, obs_time, obs_mask, dv=None):
    """theo_sd with the one-compartment oral model as a custom torchdiffeq right-hand side
    (depot and central amounts; one dose at t = 0 per subject, as in theo_sd)."""
    # priors (ignored by maximum likelihood) kept moderate: the structure is read off one
    # prior draw, and an extreme one makes the ODE stiff for an adaptive solver
    ka = pyro.sample("ka", dist.LogNormal(math.log(1.5), 0.5))
    cl = pyro.sample("cl", dist.LogNormal(math.log(3.0), 0.5))
    v = pyro.sample("v", dist.LogNormal(math.log(30.0), 0.5))
    omega = pyro.sample("omega", dist.HalfNormal(0.5 * torch.ones(3)).to_event(1))
    sigma = pyro.sample("sigma_add", dist.HalfNormal(10.0))
    with pyro.plate("subject", obs_time.shape[0]):
        eta = pyro.sample("eta", dist.Normal(torch.zeros(3), omega).to_event(1))
        ka_i = ka * torch.exp(eta[..., 0])
        v_i = v * torch.exp(eta[..., 2])
        k = cl * torch.exp(eta[..., 1]) / v_i

        def rhs(t, state):
            depot, central = state[..., 0], state[..., 1]
            return torch.stack([-ka_i * depot, ka_i * depot - k * central], -1)

        grid, index = torch.unique(obs_time, sorted=True, return_inverse=True)
        start = torch.stack([dose_amt + 0 * ka_i, torch.zeros_like(dose_amt + 0 * ka_i)], -1)
        path = odeint(rhs, start, grid, rtol=1e-8, atol=1e-8)            # [grid, ..., S, 2]
        central = path[..., 1].movedim(0, -1)                             # [..., S, grid]
        conc = torch.gather(central, -1, index.expand(*central.shape[:-1], index.shape[-1])) / v_i[..., None]
        pyro.sample("dv", dist.Normal(conc, sigma).mask(obs_mask).to_event(1), obs=dv)


def test_hand_written_ode_theo_sd_has_population_models_objective():
    """The structural model integrated by torchdiffeq (tolerance 1e-8): at PopulationModel's
    FOCE-I estimate (closed form), the ODE model's FOCE-I objective has the same value
    (the OFV, to 1e-4) and a vanishing gradient (so the same optimum)."""
    data = pk.read_nonmem(pk.dataset_path("theo_sd")).to(dtype=torch.float64)
    assert bool((data.dose_time == 0).all())
    pop = pk.PopulationModel(structure=pk.OneCompartment(absorption="first_order"),
                             random_effects=["ka", "cl", "v"], error="additive")
    ref = pop.fit(data, method="mle", standard_errors=False)
    m = gp.Model(theo_ode_by_hand, (data.dose_amt * data.dose_mask).sum(-1), data.obs_time,
                 data.obs_mask).to(dtype=torch.float64).condition(dv=torch.nan_to_num(data.obs_dv))
    md = MixedEffectsDensity(m.density(), ["eta"])
    theta = md.pack({k: torch.as_tensor(v, dtype=torch.float64) for k, v in ref.estimates.items()})
    b_hat, _ = conditional_modes(md, theta, torch.as_tensor(ref.eta, dtype=torch.float64))
    theta = theta.clone().requires_grad_(True)
    ll = focei_log_likelihood(md, theta, b_hat)
    grad, = torch.autograd.grad(ll, theta)
    ofv = -2 * float(ll.detach()) - int(data.obs_mask.sum()) * math.log(2 * math.pi)
    assert abs(ofv - ref.ofv) < 1e-4, (ofv, ref.ofv)
    assert float(grad.abs().max()) < 1e-3, grad

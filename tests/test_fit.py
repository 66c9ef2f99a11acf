"""Tests for ``Model.fit`` and ``Fit``: every method against a closed-form posterior.

Each case carries an independent reference (conjugate formulas, SciPy, published long-run
posteriors) and a stated tolerance:

* MCMC (NUTS, HMC): posterior mean within 4 Monte Carlo standard errors (ArviZ
  ``mcse``), posterior sd within 10%.
* Draws from an approximation that is exact here (Laplace on a Gaussian posterior, VI with
  a Gaussian family on a Gaussian posterior): mean within 4 standard errors of an iid
  mean (``sd / sqrt(draws)``) plus, for VI, 0.1 posterior sd of optimisation noise (Adam
  stops at a noisy point of the exact optimum); sd within 10%.
* Point estimates that are exact (MAP, Laplace mode and covariance): 1e-4.
* Evidence estimators: ``|estimate - truth| < 3 * stderr`` in at least 4 of 5 seeds.

Settings are small (4 chains x 300 warmup x 400 draws or less) so the default run stays
short on two CPU cores; longer runs are marked ``slow``.
"""

from __future__ import annotations

import math
import warnings

import arviz as az
import h5py
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.ops.indexing import Vindex
from scipy import special, stats

import genprog as gp

# ============================================================================ models


# --- Normal-Normal: mu ~ N(M0, S0), y_i ~ N(mu, S), i = 1..N_OBS -------------------
M0, S0, S = 1.0, 2.0, 1.5
N_OBS = 20
Y_NN = torch.tensor(np.random.default_rng(1).normal(2.0, S, size=N_OBS), dtype=torch.float32)


def normal_normal(n):
    mu = pyro.sample("mu", dist.Normal(M0, S0))
    with pyro.plate("obs", n):
        pyro.sample("y", dist.Normal(mu, S))


def nn_posterior(y=Y_NN, m0=M0, s0=S0, s=S):
    """Closed-form posterior (mean, sd) of mu in the Normal-Normal model."""
    y = np.asarray(y, dtype=np.float64)
    precision = 1.0 / s0**2 + y.size / s**2
    mean = (m0 / s0**2 + y.sum() / s**2) / precision
    return mean, precision**-0.5


def nn_log_evidence(y=Y_NN):
    """log p(y) = log N(y; M0 * 1, S^2 I + S0^2 11^T) (SciPy)."""
    y = np.asarray(y, dtype=np.float64)
    cov = S**2 * np.eye(y.size) + S0**2 * np.ones((y.size, y.size))
    return stats.multivariate_normal(np.full(y.size, M0), cov).logpdf(y)


# --- Beta-Binomial: p ~ Beta(A, B), k ~ Binomial(N_TRIALS, p) ------------------------
A, B, N_TRIALS, K = 2.0, 3.0, 30, 11


def beta_binomial():
    p = pyro.sample("p", dist.Beta(A, B))
    pyro.sample("k", dist.Binomial(N_TRIALS, p))


BB_POST = stats.beta(A + K, B + N_TRIALS - K)


# --- Eight schools ---------------------------------------------------------------------
ES_Y = torch.tensor([28.0, 8, -3, 7, -1, 1, 18, 12])
ES_SIGMA = torch.tensor([15.0, 10, 16, 11, 9, 11, 10, 18])


@gp.model
def eight_schools_noncentered(sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * eta)
        pyro.sample("y", dist.Normal(theta, sigma))


@gp.model
def eight_schools_centered(sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma))


# --- Normal with unknown scale (for fixed= / point=) ------------------------------------
Y_SIGMA = torch.tensor(np.random.default_rng(2).normal(2.0, 1.0, size=N_OBS), dtype=torch.float32)


def normal_unknown_scale(n):
    mu = pyro.sample("mu", dist.Normal(M0, S0))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    with pyro.plate("obs", n):
        pyro.sample("y", dist.Normal(mu, sigma))


# --- Linear regression with an input x (for predict with new inputs) --------------------
X_REG = torch.linspace(-1.0, 1.0, 12)
Y_REG = 0.5 + 2.0 * X_REG + torch.tensor(np.random.default_rng(3).normal(0, 0.3, 12), dtype=torch.float32)


def regression(x):
    a = pyro.sample("a", dist.Normal(0.0, 5.0))
    b = pyro.sample("b", dist.Normal(0.0, 5.0))
    with pyro.plate("obs", len(x)):
        pyro.sample("y", dist.Normal(a + b * x, 0.3))


# --- Two-component mixture with an enumerated discrete assignment -----------------------
MIX_WEIGHTS = torch.tensor([0.4, 0.6])


@gp.model
def mixture(n):
    locs = pyro.sample("locs", dist.Normal(0.0, 10.0).expand([2]).to_event(1))
    with pyro.plate("data", n):
        z = pyro.sample("z", dist.Categorical(MIX_WEIGHTS))
        pyro.sample("y", dist.Normal(Vindex(locs)[..., z], 1.0))


def _mixture_data(n=40):
    rng = np.random.default_rng(4)
    z = rng.random(n) < 0.6
    y = np.where(z, 5.0, -5.0) + rng.normal(0.0, 1.0, n)
    return torch.tensor(y, dtype=torch.float32)


Y_MIX = _mixture_data()


# ============================================================================ helpers

MCMC = {"chains": 4, "warmup": 300, "draws": 400, "seed": 0}


def nn_model():
    return gp.Model(normal_normal, N_OBS).condition(y=Y_NN)


def bb_model():
    return gp.Model(beta_binomial).condition(k=K)


def mcmc_moments(fit, site):
    """(mean, sd, mcse of the mean) of a scalar site, from ArviZ."""
    idata = fit.to_arviz(log_likelihood=False)
    x = idata.posterior[site]
    mcse = float(az.mcse(idata, var_names=[site], method="mean")[site])
    return float(x.mean()), float(x.std()), mcse


def iid_moments(fit, site):
    """(mean, sd, iid standard error of the mean) of a scalar site's draws."""
    x = fit.draws[site].reshape(-1).double()
    sd = float(x.std())
    return float(x.mean()), sd, sd / math.sqrt(x.numel())


def assert_posterior(fit, site, mean, sd, kind):
    """Check a fit's posterior of ``site`` against a reference (mean, sd); see the module
    docstring for the tolerances of each ``kind``."""
    if kind == "mcmc":
        got_mean, got_sd, se = mcmc_moments(fit, site)
        mean_tol = 4 * se
    else:
        got_mean, got_sd, se = iid_moments(fit, site)
        mean_tol = 4 * se + (0.1 * sd if kind == "vi" else 0.0)
    assert abs(got_mean - mean) < mean_tol, (site, got_mean, mean, mean_tol)
    assert abs(got_sd / sd - 1) < 0.10, (site, got_sd, sd)


def within(est, truth, z=3.0):
    return abs(est.value - truth) < z * est.stderr


# ============================================================================ shared fits
# Module-scoped: each is computed once (explicit seeds make them independent of the
# autouse seeding) and read by several tests.


@pytest.fixture(scope="module")
def nn_nuts():
    return nn_model().fit("nuts", **MCMC)


@pytest.fixture(scope="module")
def nn_hmc():
    return nn_model().fit("hmc", **MCMC)


@pytest.fixture(scope="module")
def nn_vi_full_rank():
    return nn_model().fit("vi", guide="full_rank", draws=4000, seed=0)


@pytest.fixture(scope="module")
def nn_vi_normal():
    return nn_model().fit("vi", guide="normal", draws=4000, seed=0)


@pytest.fixture(scope="module")
def nn_laplace():
    return nn_model().fit("laplace", draws=4000, seed=0)


@pytest.fixture(scope="module")
def es_fit():
    # target_accept 0.9 (not 0.8): the non-centred funnel's neck still gives a stray
    # divergence at 0.8 with this short warmup, and a clean run must not warn
    model = eight_schools_noncentered(ES_SIGMA).with_coords(school=list("ABCDEFGH"))
    return model.condition(y=ES_Y).fit("nuts", chains=4, warmup=300, draws=400, seed=0,
                                       target_accept=0.9)


# ============================================================================ 1. Normal-Normal

NN_CASES = [
    pytest.param("nn_nuts", "mcmc", id="nuts"),
    pytest.param("nn_hmc", "mcmc", id="hmc"),
    pytest.param("nn_vi_full_rank", "vi", id="vi-full_rank"),
    pytest.param("nn_vi_normal", "vi", id="vi-normal"),
    pytest.param("nn_laplace", "exact-approximation", id="laplace"),
]


@pytest.mark.parametrize("fixture, kind", NN_CASES)
def test_normal_normal_posterior(request, fixture, kind):
    fit = request.getfixturevalue(fixture)
    mean, sd = nn_posterior()
    assert fit.draws["mu"].dim() == 2
    assert_posterior(fit, "mu", mean, sd, kind)


def test_normal_normal_map_is_posterior_mode():
    fit = nn_model().fit("map")
    mode, _ = nn_posterior()  # Gaussian posterior: mode = mean
    assert fit.draws["mu"].shape == (1, 1)
    assert abs(float(fit.draws["mu"]) - mode) < 1e-4
    assert fit.info["converged"]


def test_normal_normal_laplace_is_exact(nn_laplace):
    """The posterior is Gaussian in mu (an unconstrained site): the Laplace Gaussian is
    the posterior itself."""
    mean, sd = nn_posterior()
    assert abs(float(nn_laplace.info["mode"][0]) - mean) < 1e-4
    assert abs(float(nn_laplace.info["covariance"][0, 0]) / sd**2 - 1) < 1e-4
    assert nn_laplace.draws["mu"].shape == (1, 4000)


# ============================================================================ 2. Beta-Binomial


def test_beta_binomial_nuts():
    fit = bb_model().fit("nuts", **MCMC)
    assert_posterior(fit, "p", BB_POST.mean(), BB_POST.std(), "mcmc")
    assert ((fit.draws["p"] > 0) & (fit.draws["p"] < 1)).all()


def test_beta_binomial_map_is_beta_mode():
    fit = bb_model().fit("map")
    mode = (A + K - 1) / (A + B + N_TRIALS - 2)
    assert abs(float(fit.draws["p"]) - mode) < 1e-4


def test_beta_binomial_laplace():
    """Laplace is a Gaussian in logit(p). There the density is proportional to
    p^(A+K) (1-p)^(B+N-K) (the Jacobian adds one power each), so the mode is
    logit((A+K)/(A+B+N)) and the precision (A+B+N) p*(1-p*) exactly. The pushed-forward
    draws only approximate Beta(A+K, B+N-K): mean within 0.02 (a quarter posterior sd),
    sd within 15%."""
    fit = bb_model().fit("laplace", draws=4000)
    p_star = (A + K) / (A + B + N_TRIALS)
    assert abs(float(fit.info["mode"][0]) - special.logit(p_star)) < 1e-4
    precision = (A + B + N_TRIALS) * p_star * (1 - p_star)
    assert abs(float(fit.info["covariance"][0, 0]) * precision - 1) < 1e-3
    p = fit.draws["p"].reshape(-1).double()
    assert abs(float(p.mean()) - BB_POST.mean()) < 0.02
    assert abs(float(p.std()) / BB_POST.std() - 1) < 0.15


# ============================================================================ 3. evidence

SEEDS = range(5)
#: small AIS settings; the stderr reflects the resulting weight variance
AIS = {"num_particles": 128, "num_temps": 30, "num_leapfrog": 2}

EVIDENCE_CASES = [
    pytest.param(nn_model, nn_log_evidence(), "is", {}, id="normal_normal-is"),
    pytest.param(nn_model, nn_log_evidence(), "ais", AIS, id="normal_normal-ais"),
    pytest.param(bb_model, stats.betabinom(N_TRIALS, A, B).logpmf(K), "is", {},
                 id="beta_binomial-is"),
    pytest.param(bb_model, stats.betabinom(N_TRIALS, A, B).logpmf(K), "ais", AIS,
                 id="beta_binomial-ais"),
]


@pytest.mark.parametrize("make, truth, method, options", EVIDENCE_CASES)
def test_log_marginal_calibrated(make, truth, method, options):
    model = make()
    ests = [model.log_marginal(method, seed=s, **options) for s in SEEDS]
    assert all(e.method == method and e.stderr > 0 for e in ests)
    assert all(e.stderr < 0.5 for e in ests)
    hits = sum(within(e, truth) for e in ests)
    assert hits >= 4, [(e.value, e.stderr, truth) for e in ests]


def test_log_marginal_laplace_exact_on_normal_normal():
    est = nn_model().log_marginal("laplace")
    assert est.method == "laplace"
    assert abs(est.value - nn_log_evidence()) < 1e-3


def test_laplace_fit_log_marginal_exact(nn_laplace):
    est = nn_laplace.log_marginal()
    assert abs(est.value - nn_log_evidence()) < 1e-3


def test_vi_fit_log_marginal_uses_guide(nn_vi_full_rank):
    est = nn_vi_full_rank.log_marginal()
    assert est.method == "is" and est.details["proposal"] == "guide"
    assert 0 < est.stderr < 0.05
    assert within(est, nn_log_evidence())


# ============================================================================ 4. eight schools


def test_eight_schools_posterior(es_fit):
    """Reference: PosteriorDB eight_schools_noncentered (long NUTS runs):
    E[mu] = 4.39 (sd 3.3), E[tau] = 3.6 (sd 3.2). Tolerance: 4 MCSE plus 0.15 for the
    rounding and Monte Carlo error of the reference itself."""
    assert es_fit.info["diagnostics"]["divergences"] == 0
    for site, ref_mean, ref_sd in (("mu", 4.39, 3.3), ("tau", 3.6, 3.2)):
        mean, sd, mcse = mcmc_moments(es_fit, site)
        assert abs(mean - ref_mean) < 4 * mcse + 0.15, (site, mean, mcse)
        assert abs(sd / ref_sd - 1) < 0.15, (site, sd)
    rhat = az.rhat(es_fit.to_arviz(log_likelihood=False))
    assert max(float(rhat[v].max()) for v in rhat.data_vars) < 1.05


# A high Pareto k for one school is a known property of eight schools' LOO (a
# deliberate exception to filterwarnings=error); it depends on the exact draws.
@pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto distribution:UserWarning")
def test_eight_schools_arviz(es_fit):
    idata = es_fit.to_arviz()
    post = idata.posterior
    for site in ("eta", "theta"):
        assert post[site].dims == ("chain", "draw", "school")
    assert list(post["school"].values) == list("ABCDEFGH")
    assert post["mu"].shape == (4, 400)
    # theta is deterministic: mu + tau * eta, draw by draw
    np.testing.assert_allclose(post["theta"], post["mu"] + post["tau"] * post["eta"],
                               rtol=1e-5, atol=1e-5)
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "school")
    loo = az.loo(idata, pointwise=True)
    assert loo.loo_i.shape == (8,) and loo.pareto_k.shape == (8,)
    assert np.isfinite(loo.elpd_loo)


# ============================================================================ 5. missing data

Y_MISSING = torch.tensor([0.5, float("nan"), 1.2, 2.0, float("nan"), 1.1, 0.3, 1.7])


def missing_model(n):
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    with pyro.plate("obs", n):
        pyro.sample("y", dist.Normal(mu, 1.0))


@pytest.fixture(scope="module")
def missing_fit():
    m = gp.Model(missing_model, len(Y_MISSING)).condition(y=Y_MISSING)
    return m.fit("nuts", chains=4, warmup=200, draws=300, seed=0)


def test_missing_data_imputed_from_posterior_predictive(missing_fit):
    y_obs = Y_MISSING[~torch.isnan(Y_MISSING)].double().numpy()
    precision = 1 / 3.0**2 + y_obs.size
    mu_mean, mu_sd = y_obs.sum() / precision, precision**-0.5
    assert missing_fit.draws["y_missing"].shape == (4, 300, 2)
    assert_posterior(missing_fit, "mu", mu_mean, mu_sd, "mcmc")
    # each missing entry ~ N(E[mu | y_obs], 1 + Var[mu | y_obs])
    idata = missing_fit.to_arviz(log_likelihood=False)
    mcse = az.mcse(idata, var_names=["y_missing"], method="mean")["y_missing"].values
    draws = idata.posterior["y_missing"].values.reshape(-1, 2)
    pred_sd = math.sqrt(1 + mu_sd**2)
    assert (np.abs(draws.mean(0) - mu_mean) < 4 * mcse).all(), (draws.mean(0), mcse)
    assert (np.abs(draws.std(0) / pred_sd - 1) < 0.10).all(), draws.std(0)
    # ... and equal to the posterior predictive of the fit's own mu draws
    mu = missing_fit.draws["mu"].reshape(-1).double()
    assert (np.abs(draws.mean(0) - float(mu.mean())) < 4 * mcse).all()
    assert (np.abs(draws.std(0) / math.sqrt(1 + float(mu.var())) - 1) < 0.10).all()


def test_missing_data_log_likelihood_excludes_missing(missing_fit):
    idata = missing_fit.to_arviz()
    ll = idata.log_likelihood["y"]
    assert ll.shape == (4, 300, 6)
    observed = Y_MISSING[~torch.isnan(Y_MISSING)]
    mu = missing_fit.draws["mu"]
    expected = dist.Normal(mu[..., None], 1.0).log_prob(observed).numpy()
    np.testing.assert_allclose(ll.values, expected, rtol=1e-5, atol=1e-5)
    assert np.isfinite(az.loo(idata).elpd_loo)


# ============================================================================ 6. fixed= / point=


def test_fixed_site_gives_known_scale_posterior():
    m = gp.Model(normal_unknown_scale, N_OBS).condition(y=Y_SIGMA)
    fit = m.fit("nuts", fixed={"sigma": 1.0}, **MCMC)
    mean, sd = nn_posterior(Y_SIGMA, s=1.0)
    assert_posterior(fit, "mu", mean, sd, "mcmc")
    if "sigma" in fit.draws:  # reported or not, it is held at 1
        assert torch.all(fit.draws["sigma"] == 1.0)


def test_point_site_reported_as_constant_draw():
    m = gp.Model(normal_unknown_scale, N_OBS).condition(y=Y_SIGMA)
    sigma_map = float(m.fit("map").draws["sigma"])
    fit = m.fit("vi", point=["sigma"], guide="normal", draws=500)
    assert fit.draws["sigma"].shape == (1, 500)
    assert torch.all(fit.draws["sigma"] == fit.draws["sigma"][0, 0])
    assert abs(float(fit.draws["sigma"][0, 0]) / sigma_map - 1) < 0.1


def test_point_site_is_held_near_map():
    """What does work: the point-estimated scale is held at one value (in the fitted
    model) near its MAP, and mu gets a posterior. The VI point estimate maximises the
    ELBO with mu integrated (type-II MAP), so it sits slightly above the joint MAP: 10%."""
    m = gp.Model(normal_unknown_scale, N_OBS).condition(y=Y_SIGMA)
    sigma_map = float(m.fit("map").draws["sigma"])
    fit = m.fit("vi", point=["sigma"], guide="normal", draws=500)
    held = fit.model.fixed["sigma"]
    assert held.shape == ()
    assert abs(float(held) / sigma_map - 1) < 0.1
    assert fit.draws["mu"].shape == (1, 500)
    mean, sd = nn_posterior(Y_SIGMA, s=float(held))
    assert_posterior(fit, "mu", mean, sd, "vi")


# ============================================================================ 7. predict


def test_predict_matches_closed_form_predictive(nn_nuts):
    """Posterior predictive of a new y_i: N(E[mu|y], S^2 + Var[mu|y]). All 4 x 400 x 20
    draws are pooled: mean within 4 standard errors (MCSE of mu plus the iid noise),
    variance within 5%."""
    ppc = nn_nuts.predict()
    assert set(ppc) == {"y"}
    assert ppc["y"].shape == (4, 400, N_OBS)
    mean, sd = nn_posterior()
    y = ppc["y"].double()
    _, _, mcse_mu = mcmc_moments(nn_nuts, "mu")
    se = math.sqrt(mcse_mu**2 + S**2 / y.numel())
    assert abs(float(y.mean()) - mean) < 4 * se
    assert abs(float(y.reshape(-1).var()) / (S**2 + sd**2) - 1) < 0.05


def test_predict_n_draws_and_seed(nn_nuts):
    ppc = nn_nuts.predict(n=100)
    assert ppc["y"].shape == (100, N_OBS)
    assert torch.equal(nn_nuts.predict(n=10, seed=3)["y"], nn_nuts.predict(n=10, seed=3)["y"])
    assert not torch.equal(nn_nuts.predict(n=10, seed=3)["y"], nn_nuts.predict(n=10, seed=4)["y"])


def test_predict_with_new_inputs():
    fit = gp.Model(regression, X_REG).condition(y=Y_REG).fit("laplace", draws=2000)
    assert fit.predict()["y"].shape == (1, 2000, 12)
    x_new = torch.tensor([-2.0, 0.0, 0.5, 3.0, 4.0])
    ppc = fit.predict(x=x_new)
    assert ppc["y"].shape == (1, 2000, 5)
    assert fit.predict(n=50, x=x_new)["y"].shape == (50, 5)
    a, b = fit.draws["a"].reshape(-1), fit.draws["b"].reshape(-1)
    expected = (a[:, None] + b[:, None] * x_new).mean(0)
    se = (0.3**2 + (a[:, None] + b[:, None] * x_new).var(0)).sqrt() / math.sqrt(2000)
    assert (ppc["y"][0].mean(0) - expected).abs().lt(4 * se).all()


def test_predict_unknown_input_is_type_error(nn_nuts):
    with pytest.raises(TypeError, match="unknown input"):
        nn_nuts.predict(z=3)


def test_to_arviz_prior_and_posterior_predictive(nn_nuts):
    idata = nn_nuts.to_arviz(prior=True, posterior_predictive=True)
    for group in ("posterior", "sample_stats", "log_likelihood", "observed_data", "prior",
                  "prior_predictive", "posterior_predictive"):
        assert group in idata.groups(), group
    assert idata.posterior_predictive["y"].dims == ("chain", "draw", "obs")
    assert idata.posterior_predictive["y"].shape == (4, 400, N_OBS)
    np.testing.assert_array_equal(idata.observed_data["y"].values, Y_NN.numpy())


# ============================================================================ 8. save / load


def test_save_load_roundtrip(nn_nuts, tmp_path):
    path = tmp_path / "fit.nc"
    nn_nuts.save(path)
    with open(path, "rb") as f:
        head = f.read(8)
    assert not head.startswith(b"\x80")  # not a pickle
    assert head == b"\x89HDF\r\n\x1a\n"  # netCDF4 / HDF5
    with h5py.File(path, "r") as f:
        assert "posterior" in f and "sample_stats" in f
    loaded = gp.load(path)
    assert loaded.method == "nuts" and loaded.seed == 0
    assert set(loaded.draws) == set(nn_nuts.draws)
    for k, v in nn_nuts.draws.items():
        assert torch.equal(loaded.draws[k], v), k
    for k, v in nn_nuts.sample_stats.items():
        np.testing.assert_array_equal(loaded.sample_stats[k], v)
    pd.testing.assert_frame_equal(loaded.summary(), nn_nuts.summary())
    with pytest.raises(ValueError, match="model"):
        loaded.predict()


def test_load_with_model_can_predict(nn_nuts, tmp_path):
    path = tmp_path / "fit.nc"
    nn_nuts.save(path)
    loaded = gp.load(path, model=nn_model())
    assert torch.equal(loaded.predict(n=50, seed=1)["y"], nn_nuts.predict(n=50, seed=1)["y"])


# ============================================================================ 9. diagnostics

STATS = ("diverging", "acceptance_rate", "energy", "lp", "tree_depth", "n_steps", "step_size")


def test_sample_stats_names_and_shapes(nn_nuts, nn_hmc):
    for fit, names in ((nn_nuts, STATS), (nn_hmc, tuple(s for s in STATS if s != "tree_depth"))):
        for name in names:
            assert np.asarray(fit.sample_stats[name]).shape == (4, 400), (fit.method, name)
    assert nn_nuts.sample_stats["diverging"].dtype == bool
    acc = nn_nuts.sample_stats["acceptance_rate"]
    assert ((acc >= 0) & (acc <= 1)).all()
    assert (nn_nuts.sample_stats["tree_depth"] >= 1).all()
    assert (nn_nuts.sample_stats["n_steps"] >= 1).all()
    # lp is the log density at the draw (mu unconstrained: no Jacobian)
    mu = nn_nuts.draws["mu"]
    lp = dist.Normal(M0, S0).log_prob(mu) + dist.Normal(mu[..., None], S).log_prob(Y_NN).sum(-1)
    np.testing.assert_allclose(nn_nuts.sample_stats["lp"], lp.numpy(), rtol=1e-4, atol=1e-3)


def test_divergences_reported_centered_eight_schools():
    m = eight_schools_centered(ES_SIGMA).condition(y=ES_Y)
    # (R-hat and ESS warnings come too: pytest.warns must match them all, or it re-emits)
    with pytest.warns(gp.ConvergenceWarning) as record:
        fit = m.fit("nuts", chains=2, warmup=50, draws=100, seed=0, target_accept=0.6,
                    max_tree_depth=4)
    assert any("diverged" in str(w.message) for w in record)
    n_div = fit.info["diagnostics"]["divergences"]
    assert n_div > 0
    assert n_div == int(fit.sample_stats["diverging"].sum())
    for name in STATS:
        assert np.asarray(fit.sample_stats[name]).shape == (2, 100), name


def test_vi_unconverged_warns():
    with pytest.warns(gp.ConvergenceWarning, match="did not converge"):
        fit = nn_model().fit("vi", max_iters=50)
    assert fit.info["converged"] is False
    assert fit.info["num_iters"] == 50


@pytest.mark.parametrize("make", [
    pytest.param(lambda: eight_schools_centered(ES_SIGMA).condition(y=ES_Y),
                 id="centered_eight_schools"),
    pytest.param(lambda: gp.Model(normal_unknown_scale, 1).condition(y=torch.tensor([1.3])),
                 id="one_observation_unknown_scale"),
])
def test_map_unbounded_density_warns(make):
    # recorded rather than pytest.warns, so the ValueError of the bug surfaces as itself
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit = make().fit("map")
    assert any(issubclass(w.category, gp.ConvergenceWarning) and "unconverged" in str(w.message)
               for w in record)
    assert fit.info["converged"] is False


# ============================================================================ 10. bad options

VALID_OPTIONS = {
    "map": ["seed", "max_iters", "init"],
    "laplace": ["draws", "seed", "max_iters", "init", "point"],
    "vi": ["guide", "draws", "seed", "max_iters", "learning_rate", "num_particles", "window",
           "tol", "rank", "point", "progress"],
    "nuts": ["chains", "warmup", "draws", "seed", "target_accept", "max_tree_depth", "init",
             "point", "backend", "progress"],
    "hmc": ["chains", "warmup", "draws", "seed", "num_steps", "trajectory_length",
            "target_accept", "init", "point", "backend", "progress"],
}


@pytest.mark.parametrize("method", sorted(VALID_OPTIONS))
def test_unknown_option_lists_valid_ones(method):
    with pytest.raises(TypeError) as err:
        nn_model().fit(method, bogus_option=1)
    msg = str(err.value)
    assert "bogus_option" in msg
    for name in VALID_OPTIONS[method]:
        assert repr(name) in msg, (method, name)


BAD_CALLS = [
    pytest.param(lambda m: m.fit("gibbs"), ValueError, "unknown method", id="unknown-method"),
    pytest.param(lambda m: m.fit("nuts", fixed={"nope": 1.0}), ValueError, "nope",
                 id="fixed-unknown-site"),
    pytest.param(lambda m: m.fit("nuts", fixed={"y": torch.zeros(N_OBS)}), ValueError,
                 "observed", id="fixed-observed-site"),
    pytest.param(lambda m: m.fit("nuts", fixed={"mu": torch.zeros(3)}), ValueError, "shape",
                 id="fixed-wrong-shape"),
    pytest.param(lambda m: m.fit("nuts", chains=0), ValueError, "chains", id="chains-0"),
    pytest.param(lambda m: m.fit("hmc", draws=0), ValueError, "draws", id="draws-0"),
    pytest.param(lambda m: m.fit("nuts", warmup=-1), ValueError, "warmup", id="warmup-negative"),
    pytest.param(lambda m: m.fit("nuts", backend="stan"), ValueError, "backend",
                 id="unknown-backend"),
    pytest.param(lambda m: m.fit("vi", guide="spline"), ValueError, "guide", id="unknown-guide"),
    pytest.param(lambda m: m.fit("laplace", point=["nope"]), ValueError, "nope",
                 id="point-unknown-site"),
    pytest.param(lambda m: gp.Model(normal_normal, N_OBS).fit("map"), ValueError, "condition",
                 id="unconditioned"),
]


@pytest.mark.parametrize("call, error, match", BAD_CALLS)
def test_bad_fit_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(nn_model())


# ============================================================================ 11. pyro backend


@pytest.fixture(scope="module")
def nn_pyro_nuts():
    return nn_model().fit("nuts", backend="pyro", **MCMC)


def test_pyro_backend_nuts_agrees_with_closed_form(nn_pyro_nuts):
    assert nn_pyro_nuts.draws["mu"].shape == (4, 400)
    assert nn_pyro_nuts.info["backend"] == "pyro"
    mean, sd = nn_posterior()
    assert_posterior(nn_pyro_nuts, "mu", mean, sd, "mcmc")
    assert nn_pyro_nuts.sample_stats["diverging"].shape == (4, 400)


def test_pyro_backend_reports_sample_stats(nn_pyro_nuts):
    """Pyro's kernels expose divergences and step size (and genprog evaluates lp at each
    draw); per-transition acceptance, energy and tree depth exist only in the genprog backend."""
    for name in ("diverging", "lp", "step_size"):
        assert np.asarray(nn_pyro_nuts.sample_stats[name]).shape == (4, 400), name
    density = nn_pyro_nuts.model.density()
    z = density.unconstrain({s.name: nn_pyro_nuts.draws[s.name][0, :5] for s in density.sites})
    np.testing.assert_allclose(nn_pyro_nuts.sample_stats["lp"][0, :5],
                               density.log_joint(z).detach().numpy(), rtol=1e-5)


# ============================================================================ 12. enumeration


def _mixture_reference():
    """Posterior means of the sorted locations, well-separated data: each component's
    points are known, so loc_j | y ~ N(sum_j / (n_j + 1/100), 1 / (n_j + 1/100))."""
    y = Y_MIX.double().numpy()
    groups = [y[y < 0], y[y > 0]]
    return [(g.sum() / (g.size + 0.01), (g.size + 0.01) ** -0.5) for g in groups]


def test_mixture_map_recovers_means():
    """MAP over the continuous locations with the assignment summed out exactly. With
    well-separated components the marginal mode sits at the group means to O(e^-25)."""
    m = mixture(len(Y_MIX)).condition(y=Y_MIX)
    fit = m.fit("map", init={"locs": torch.tensor([-1.0, 1.0])})
    locs = fit.draws["locs"].reshape(2).sort().values
    for got, (mean, _) in zip(locs.tolist(), _mixture_reference()):
        assert abs(got - mean) < 1e-3


@pytest.mark.slow
def test_mixture_nuts_recovers_means():
    m = mixture(len(Y_MIX)).condition(y=Y_MIX)
    fit = m.fit("nuts", chains=4, warmup=200, draws=300, seed=0,
                init={"locs": torch.tensor([-1.0, 1.0])})
    locs = fit.draws["locs"].sort(-1).values
    for j, (mean, sd) in enumerate(_mixture_reference()):
        x = locs[..., j].double().numpy()
        mcse = float(az.mcse(x, method="mean"))
        assert abs(x.mean() - mean) < 4 * mcse, (j, x.mean(), mean)
        assert abs(x.std() / sd - 1) < 0.15, (j, x.std(), sd)


# ============================================================================ 13. GPU


@pytest.mark.gpu
@pytest.mark.parametrize("method, options, kind", [
    pytest.param("nuts", MCMC, "mcmc", id="nuts"),
    pytest.param("vi", {"guide": "full_rank", "draws": 4000}, "vi", id="vi"),
])
def test_fit_on_cuda(method, options, kind):
    model = nn_model().to("cuda")
    fit = model.fit(method, **options)
    assert fit.draws["mu"].device.type == "cuda"
    mean, sd = nn_posterior()
    assert_posterior(fit, "mu", mean, sd, kind)

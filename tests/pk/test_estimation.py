"""Tests for issue 3's model-side items: threshold covariate effects, estimated lag time and
bioavailability, inter-occasion variability (IOV), the FOCE-I approximation of
``fit_mle``, and NUTS with default priors.

References are independent of the code under test:

* published estimates: theo_sd with nlmixr2 FOCEi (1-cmt oral, IIV ka/CL/V, additive:
  ka 1.594, CL 2.751, V 31.81, SD 0.695, BSV 70/27/14 %CV, OFV 116.80) and pheno_sd with
  NONMEM FOCE-I (CL 0.00470 L/h/kg, V 0.984 L/kg, APGR < 5 effect 0.159, omega^2 CL 0.0293,
  V 0.0279, proportional SD 0.115, OFV 586.28); literature warfarin 1-cmt oral for a 70 kg
  subject (CL ~0.13-0.14 L/h, V ~8 L, ka ~1-1.5 /h, tlag ~0.8-1 h);
* NumPy: the covariate factors, the one-compartment oral closed form for simulated data;
* simulation recovery with the estimator's own error bar (``|est - truth| < 3 SE``).

Fits of the shipped data sets take a few seconds each; the 40-subject IOV recovery and
NUTS are marked ``slow``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from genprog import pk
from genprog.errors import ConvergenceWarning
from genprog.pk.estimation import LaplaceObjective
from genprog.pk.population import RelativeChange

F64 = torch.float64
ORAL = pk.OneCompartment(absorption="first_order")


def pheno_model(**kw):
    """NONMEM's pheno model: CL = TVCL * WT, V = TVV * WT * (1 + theta if APGR < 5)."""
    return pk.PopulationModel(
        pk.OneCompartment("iv"), ["cl", "v"], "proportional",
        covariates={"cl": pk.CovariateEffect("cl", "WT", exponent=1.0, reference=1.0),
                    "v": [pk.CovariateEffect("v", "WT", exponent=1.0, reference=1.0),
                          pk.CovariateEffect("v", "APGR", kind="threshold", below=5)]}, **kw)


def warfarin_model(lag: bool):
    return pk.PopulationModel(
        ORAL, ["ka", "cl", "v"], "combined", dvid="cp",
        extra_parameters=["tlag"] if lag else [],
        covariates={"cl": pk.CovariateEffect("cl", "WT", "allometric", reference=70.0),
                    "v": pk.CovariateEffect("v", "WT", "allometric", reference=70.0)})


def fit_quietly(model, data, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        return model.fit(data, "mle", **options)


@pytest.fixture(scope="module")
def pheno():
    return pk.read_nonmem(pk.dataset_path("pheno_sd"))


@pytest.fixture(scope="module")
def pheno_fit(pheno):
    return fit_quietly(pheno_model(), pheno, approximation="focei")


# =========================================================================== threshold


def test_threshold_factor_matches_numpy(pheno):
    pop = pheno_model()
    wt = pheno.covariates["WT"].double().numpy()
    apgr = pheno.covariates["APGR"].double().numpy()
    theta = 0.3
    factor = pop.covariate_factor("v", {"beta_v_apgr": torch.tensor(theta, dtype=F64)}, pheno.to(dtype=F64))
    np.testing.assert_allclose(factor.numpy(), wt * np.where(apgr < 5, 1 + theta, 1.0), rtol=1e-12)
    above = pk.PopulationModel(pk.OneCompartment("iv"), ["cl"], "proportional",
                               covariates={"v": pk.CovariateEffect("v", "APGR", "threshold", above=7)})
    f2 = above.covariate_factor("v", {"beta_v_apgr": torch.tensor(-0.2, dtype=F64)}, pheno.to(dtype=F64))
    np.testing.assert_allclose(f2.numpy(), np.where(apgr > 7, 0.8, 1.0), rtol=1e-12)
    # CL per kg: the typical-value prior is centred per kg (data guess / median weight)
    prior = pop.default_priors(pheno)
    assert 0.001 < float(prior["cl"].loc.exp()) < 0.02 and 0.3 < float(prior["v"].loc.exp()) < 3
    assert "beta_cl_wt" not in prior and isinstance(prior["beta_v_apgr"], RelativeChange)


def test_threshold_prior_support_and_sampling(pheno):
    prior = RelativeChange(0.5)
    x = prior.sample((2000,))
    assert bool((x > -1).all()) and abs(float(x.median())) < 0.05
    assert prior.support.check(torch.tensor(-0.99)) and not prior.support.check(torch.tensor(-1.01))
    draws = pheno_model()(pheno).sample(3, seed=0)
    assert draws["beta_v_apgr"].shape == (3,) and bool((draws["beta_v_apgr"] > -1).all())


def test_covariate_effect_errors():
    with pytest.raises(ValueError, match="exactly one of"):
        pk.PopulationModel(ORAL, ["cl"], covariates={"v": pk.CovariateEffect("v", "APGR", "threshold")})
    with pytest.raises(ValueError, match="threshold"):
        pk.PopulationModel(ORAL, ["cl"], covariates={"v": pk.CovariateEffect("v", "WT", "power", below=3)})
    with pytest.raises(ValueError, match="exponent"):
        pk.PopulationModel(ORAL, ["cl"], covariates={"v": pk.CovariateEffect("v", "WT", "linear", exponent=1.0)})
    with pytest.raises(ValueError, match="not optional parameters"):
        pk.PopulationModel(ORAL, ["cl"], extra_parameters=["d1"])
    with pytest.raises(ValueError, match="occasion"):
        pk.PopulationModel(ORAL, ["cl"], iov=["cl"])
    with pytest.raises(ValueError, match="inter-occasion"):
        pk.PopulationModel(ORAL, ["cl"], iov=["q"], occasion="OCC")


def test_pheno_focei_matches_nonmem(pheno_fit):
    """NONMEM FOCE-I on pheno_sd: typical values within 5%, the APGR effect within its
    reference uncertainty (SE ~0.08), omega^2 within 30%, SD within 10%, OFV within 2."""
    fit = pheno_fit
    assert fit.converged
    est = fit.estimates
    assert float(est["cl"]) == pytest.approx(0.00470, rel=0.05)
    assert float(est["v"]) == pytest.approx(0.984, rel=0.05)
    assert float(est["beta_v_apgr"]) == pytest.approx(0.159, abs=0.04)
    omega2 = est["omega"].numpy() ** 2
    np.testing.assert_allclose(omega2, [0.0293, 0.0279], rtol=0.3)
    assert float(est["sigma_prop"]) == pytest.approx(0.115, rel=0.1)
    assert fit.ofv == pytest.approx(586.28, abs=2.0)
    table = fit.summary()
    assert list(table.index) == ["cl", "v", "omega_cl", "omega_v", "beta_v_apgr", "sigma_prop"]
    assert math.isfinite(table.loc["beta_v_apgr", "se"]) and table.loc["beta_v_apgr", "se"] > 0


def test_pheno_laplace_close_to_focei(pheno, pheno_fit):
    fit = fit_quietly(pheno_model(), pheno, standard_errors=False)
    assert fit.ofv == pytest.approx(pheno_fit.ofv, abs=1.0)
    assert float(fit.estimates["beta_v_apgr"]) == pytest.approx(0.159, abs=0.04)


def test_fixed_bioavailability_reproduces_the_fit(pheno, pheno_fit):
    """``f`` estimated-or-fixed: with F held at 1 the fit is the model without F; F, CL
    and V are confounded exactly (F/CL, F/V) for IV-only doses, checked on the objective."""
    pop = pheno_model(extra_parameters=["f"])
    assert pop.parameters == ("cl", "v", "f")
    fit = fit_quietly(pop, pheno, approximation="focei", fixed={"f": 1.0})
    assert fit.ofv == pytest.approx(pheno_fit.ofv, abs=1e-4)
    table = fit.summary()
    assert table.loc["f", "estimate"] == 1.0 and math.isnan(table.loc["f", "se"])
    data = pheno.to(dtype=F64)
    obj = LaplaceObjective(pop, data, pop.priors_for(data))
    values = {k: v.double() for k, v in fit.estimates.items()}
    eta = torch.zeros(data.n_subjects, 2, dtype=F64)
    ll1, _ = obj.conditional(values, eta)
    ll2, _ = obj.conditional({**values, "f": torch.tensor(0.5, dtype=F64), "cl": values["cl"] * 0.5,
                              "v": values["v"] * 0.5}, eta)
    torch.testing.assert_close(ll1, ll2, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="fixed has unknown"):
        pop.fit(pheno, "mle", fixed={"ff": 1.0})


# =========================================================================== FOCE-I


def test_theo_focei_matches_nlmixr2():
    data = pk.read_nonmem(pk.dataset_path("theo_sd"))
    pop = pk.PopulationModel(ORAL, ["ka", "cl", "v"], "additive")
    fit = fit_quietly(pop, data, approximation="focei", standard_errors=False)
    est = fit.estimates
    assert float(est["ka"]) == pytest.approx(1.594, rel=0.02)
    assert float(est["cl"]) == pytest.approx(2.751, rel=0.01)
    assert float(est["v"]) == pytest.approx(31.81, rel=0.01)
    assert float(est["sigma_add"]) == pytest.approx(0.695, rel=0.02)
    cv = 100 * np.sqrt(np.expm1(est["omega"].numpy() ** 2))
    np.testing.assert_allclose(cv, [70, 27, 14], atol=3)
    assert fit.ofv == pytest.approx(116.80, abs=0.5)
    assert fit.minus2ll == pytest.approx(359.40, abs=0.5)


def test_focei_information_is_the_expected_information():
    """At fixed values, the FOCE-I curvature equals Omega^-1 + J^T J / sd^2 (additive
    error: no SD term), with J from central finite differences of the predictions."""
    data = pk.read_nonmem(pk.dataset_path("theo_sd")).subset([0, 1]).to(dtype=F64)
    pop = pk.PopulationModel(ORAL, ["ka", "cl", "v"], "additive")
    obj = LaplaceObjective(pop, data, pop.priors_for(data), approximation="focei")
    values = {"cl": torch.tensor(2.8, dtype=F64), "v": torch.tensor(32.0, dtype=F64),
              "ka": torch.tensor(1.5, dtype=F64), "omega": torch.tensor([0.6, 0.3, 0.15], dtype=F64),
              "sigma_add": torch.tensor(0.7, dtype=F64)}
    eta = torch.tensor([[0.1, -0.2, 0.05], [-0.3, 0.1, 0.0]], dtype=F64)
    _, _, A = obj.information(values, eta)
    eps = 1e-6
    J = []
    for j in range(3):
        e = torch.zeros(3, dtype=F64)
        e[j] = eps
        J.append((obj.conditional(values, eta + e)[1] - obj.conditional(values, eta - e)[1]) / (2 * eps))
    J = torch.stack(J, -1) * obj.observed[..., None]
    expected = J.transpose(-1, -2) @ J / 0.49 + torch.diag(1 / values["omega"] ** 2)
    torch.testing.assert_close(A, expected, rtol=1e-6, atol=1e-6)


# =========================================================================== lag time


def test_lag_initial_estimate_and_prior():
    data = pk.read_nonmem(pk.dataset_path("warfarin"))
    pop = warfarin_model(lag=True)
    assert pop.parameters == ("cl", "v", "ka", "tlag")
    guess = pk.initial_estimates(data, pop.parameters, pop.observation_mask(data))
    # most subjects: DV 0 at 0.5 h, measurable at 1 h (or later)
    assert 0.5 <= guess["tlag"] <= 1.5
    prior = pop.priors_for(data)
    assert float(prior["tlag"].loc.exp()) == pytest.approx(guess["tlag"], rel=1e-6)
    # a random effect on tlag implies estimating it
    assert "tlag" in pk.PopulationModel(ORAL, ["cl", "tlag"]).parameters


def test_warfarin_lag_time_converges_and_improves_the_fit():
    data = pk.read_nonmem(pk.dataset_path("warfarin"))
    lag = fit_quietly(warfarin_model(True), data, approximation="focei", standard_errors=False)
    nolag = fit_quietly(warfarin_model(False), data, approximation="focei", standard_errors=False)
    assert lag.converged and math.isfinite(lag.ofv) and math.isfinite(nolag.ofv)
    est = {k: float(v) for k, v in lag.estimates.items() if v.dim() == 0}
    assert 0.11 < est["cl"] < 0.16          # L/h at 70 kg
    assert 6.5 < est["v"] < 9.5             # L at 70 kg
    assert 0.7 < est["ka"] < 2.0            # /h
    assert 0.6 < est["tlag"] < 1.2          # h
    assert nolag.ofv - lag.ofv > 10
    table = lag.summary()
    assert "tlag" in table.index


# =========================================================================== IOV


def oral_1cmt(t, dose, ka, cl, v):
    k = cl / v
    return np.where(t >= 0, dose * ka / (v * (ka - k)) * (np.exp(-k * t) - np.exp(-ka * t)), 0.0)


IOV_TRUE = {"ka": 1.2, "cl": 3.0, "v": 30.0, "omega": [0.3, 0.3, 0.2], "omega_iov": 0.25, "prop": 0.1}


def simulate_iov(n, occasions=3, seed=7):
    """``n`` subjects x ``occasions`` single 300 mg oral doses 200 h apart (washout), 7
    samples each; kappa on CL per occasion; proportional error."""
    rng = np.random.default_rng(seed)
    times = np.array([0.5, 1, 2, 4, 8, 12, 24])
    rows = []
    for i in range(1, n + 1):
        e = rng.standard_normal(3) * IOV_TRUE["omega"]
        for k in range(occasions):
            kappa = rng.standard_normal() * IOV_TRUE["omega_iov"]
            ka = IOV_TRUE["ka"] * math.exp(e[0])
            cl = IOV_TRUE["cl"] * math.exp(e[1] + kappa)
            v = IOV_TRUE["v"] * math.exp(e[2])
            t0 = 200.0 * k
            rows.append({"ID": i, "TIME": t0, "AMT": 300.0, "DV": 0.0, "EVID": 1, "MDV": 1, "CMT": 1, "OCC": k + 1})
            y = oral_1cmt(times, 300.0, ka, cl, v) * (1 + IOV_TRUE["prop"] * rng.standard_normal(len(times)))
            rows += [{"ID": i, "TIME": t0 + t, "AMT": 0.0, "DV": float(yy), "EVID": 0, "MDV": 0, "CMT": 2, "OCC": k + 1}
                     for t, yy in zip(times, y)]
    return pd.DataFrame(rows)


IOV_MODEL = pk.PopulationModel(ORAL, ["ka", "cl", "v"], "proportional", iov=["cl"], occasion="OCC")


def test_iov_predictions_take_each_occasions_parameters():
    data = pk.read_nonmem(simulate_iov(3), time_varying=["OCC"]).to(dtype=F64)
    codes, K = IOV_MODEL.occasions(data)
    assert K == 3 and codes.shape == data.obs_time.shape
    obj = LaplaceObjective(IOV_MODEL, data, IOV_MODEL.priors_for(data))
    assert obj.P == 3 + 3
    values = {"cl": torch.tensor(3.0, dtype=F64), "v": torch.tensor(30.0, dtype=F64),
              "ka": torch.tensor(1.2, dtype=F64), "omega": torch.tensor([0.3, 0.3, 0.2], dtype=F64),
              "omega_iov": torch.tensor([0.25], dtype=F64), "sigma_prop": torch.tensor(0.1, dtype=F64)}
    L = obj.scale_tril(values)
    torch.testing.assert_close(torch.diagonal(L), torch.tensor([0.3, 0.3, 0.2, 0.25, 0.25, 0.25], dtype=F64))
    eta = torch.tensor([[0.1, 0.2, -0.1, 0.3, -0.2, 0.0]] * 3, dtype=F64)
    _, pred = obj.conditional(values, eta)
    t = data.obs_time.numpy() % 200.0
    cl = 3.0 * np.exp(0.2 + np.array([0.3, -0.2, 0.0]))[codes.numpy()]
    ref = oral_1cmt(t, 300.0, 1.2 * math.exp(0.1), cl, 30.0 * math.exp(-0.1))
    np.testing.assert_allclose(pred.numpy(), ref, rtol=1e-6)
    # the Bayesian program: one kappa per subject and occasion, finite log density
    m = IOV_MODEL(pk.read_nonmem(simulate_iov(3), time_varying=["OCC"]))
    draws = m.sample(2, seed=0)
    assert draws["kappa_raw"].shape == (2, 3, 1, 3) and draws["omega_iov"].shape == (2, 1)


def _check_iov_recovery(n, z=3.0):
    data = pk.read_nonmem(simulate_iov(n), time_varying=["OCC"])
    fit = fit_quietly(IOV_MODEL, data, approximation="focei")
    table = fit.summary()
    assert fit.converged and fit.eta.shape == (n, 6)
    assert "omega_iov_cl" in table.index
    assert table.loc["omega_iov_cl", "cv_pct"] == pytest.approx(
        100 * math.sqrt(math.expm1(table.loc["omega_iov_cl", "estimate"] ** 2)))
    for name, truth in (("omega_iov_cl", IOV_TRUE["omega_iov"]), ("cl", IOV_TRUE["cl"]),
                        ("v", IOV_TRUE["v"]), ("sigma_prop", IOV_TRUE["prop"])):
        est, se = table.loc[name, "estimate"], table.loc[name, "se"]
        assert abs(est - truth) < z * se, (name, est, se, truth)
    return fit


def test_iov_recovery_small():
    """12 subjects x 3 occasions: omega_IOV within 3 SE of the truth; simulation-based
    diagnostics say plainly that they do not cover IOV yet."""
    fit = _check_iov_recovery(12)
    with pytest.raises(NotImplementedError, match="inter-occasion"):
        pk.simulate(fit, n_sim=2)


@pytest.mark.slow
def test_iov_recovery_40_subjects():
    fit = _check_iov_recovery(40)
    assert float(fit.estimates["omega_iov"][0]) == pytest.approx(IOV_TRUE["omega_iov"], rel=0.25)


# =========================================================================== NUTS


@pytest.mark.slow
def test_nuts_default_priors_theo_matches_nlmixr2():
    """NUTS, 4 chains x 500 warmup + 500 draws, default (weakly informative, data-scaled)
    priors: posterior medians of ka, CL, V and the additive SD within 10% of nlmixr2's FOCEi
    estimates; R-hat < 1.05."""
    data = pk.read_nonmem(pk.dataset_path("theo_sd"))
    pop = pk.PopulationModel(ORAL, ["ka", "cl", "v"], "additive")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = pop.fit(data, "nuts", chains=4, warmup=500, draws=500, seed=1)
    table = fit.summary()
    for name, ref in (("ka", 1.594), ("cl", 2.751), ("v", 31.81), ("sigma_add", 0.695)):
        assert table.loc[name, "median"] == pytest.approx(ref, rel=0.10), name
    rhat = fit.summary(kind="arviz", var_names=["cl", "v", "ka", "omega", "sigma_add"])["r_hat"]
    assert (rhat < 1.05).all()


def test_summary_survives_an_unidentified_parameter():
    """An SE thousands of times the estimate (a poorly identified parameter) gives a huge
    upper limit, not an OverflowError."""
    import math

    data = pk.read_nonmem(pk.dataset_path("theo_sd"))
    pop = pk.PopulationModel(structure=pk.OneCompartment(absorption="first_order"),
                             random_effects=["cl"], error="additive")
    fit = pop.fit(data, method="mle", standard_errors=False)
    k = fit.covariance.shape[0] if fit.covariance is not None else len(fit.phi)
    fit.covariance = torch.eye(k, dtype=fit.phi.dtype) * 1e6
    table = fit.summary()
    assert (table["ci_high"] >= table["estimate"]).all()
    assert math.isinf(table["ci_high"].max()) or table["ci_high"].max() > 1e100


# =========================================================================== robust inner problem
#
# References: the modes of h_i are checked against their own definition (h is larger there
# than at every point the test tries, the gradient vanishes), the flip-flop mirror image
# against the one-compartment closed form (the same concentrations), and the warnings
# against values put at a boundary on purpose.

THEO_VALUES = {"cl": 2.75, "v": 31.8, "ka": 1.59, "omega": [0.84, 0.27, 0.13], "sigma_add": 0.7}


def theo_objective(data=None):
    data = (data or pk.read_nonmem(pk.dataset_path("theo_sd"))).to(dtype=F64)
    pop = pk.PopulationModel(ORAL, ["ka", "cl", "v"], "additive")
    obj = LaplaceObjective(pop, data, pop.priors_for(data))
    values = {k: torch.as_tensor(v, dtype=F64) for k, v in THEO_VALUES.items()}
    return obj, values


def test_inner_newton_reaches_the_mode_from_far_starts():
    """From eta = 0 and from starts 3 omega out (where the curvature of h is indefinite)
    the safeguarded iterations reach the same modes: gradient ~0, h at least as large as
    at 200 random nearby points."""
    obj, values = theo_objective()
    S = obj.data.n_subjects
    far = torch.tensor([3.0, -3.0, 3.0], dtype=F64) * values["omega"]
    eta0, h0, _ = obj.newton_modes(values, torch.zeros(S, 3, dtype=F64))
    eta1, _, _ = obj.newton_modes(values, far.expand(S, 3))
    torch.testing.assert_close(eta1, eta0, atol=1e-4, rtol=0)
    _, g, _ = obj.grad_hess(values, eta0)
    assert float(g.detach().abs().max()) < 1e-4
    gen = torch.Generator().manual_seed(0)
    nearby = eta0 + 0.05 * torch.randn(200, S, 3, generator=gen, dtype=F64)
    assert bool((obj.joint(values, nearby) <= h0 + 1e-9).all())


def test_flip_flop_mirror_predicts_the_same_and_the_ebe_leaves_it():
    """A warm start in the reflected mode (ka_i <-> k_i, V_i k_i / ka_i) predicts the same
    concentrations; the EBE from that warm start is the population-side mode, the one a
    start at eta = 0 reaches, which the eta prior favours."""
    obj, values = theo_objective()
    S = obj.data.n_subjects
    eta0, _, _ = obj.newton_modes(values, torch.zeros(S, 3, dtype=F64))
    assert not bool(obj.flip_flop(values, eta0).any())
    typical, betas, _ = obj.split(values)
    ind = obj.pop.individual_parameters(typical, betas, eta0, obj.data)
    shift = torch.log(ind["cl"] / ind["v"] / ind["ka"])  # log(k_i / ka_i)
    mirror = eta0.clone()
    mirror[:, 0] += shift
    mirror[:, 2] += shift
    assert bool(obj.flip_flop(values, mirror).all())
    _, pred0 = obj.conditional(values, eta0)
    _, pred1 = obj.conditional(values, mirror)
    torch.testing.assert_close(pred1, pred0, rtol=1e-9, atol=1e-9)
    # reflected() maps the mirror back
    torch.testing.assert_close(obj.reflected(values, mirror), eta0, atol=1e-12, rtol=0)
    eta = obj.ebe(values, mirror)
    torch.testing.assert_close(eta, eta0, atol=1e-4, rtol=0)
    assert not bool(obj.flip_flop(values, eta).any())


def test_one_sample_subject_keeps_its_ebe_near_the_population():
    """A subject with a single late sample cannot determine ka or V: the fit still
    converges, with finite estimates near the 12-subject fit, and that subject's EBEs stay
    within 2 omega of 0 (ka's within 1 omega)."""
    full = pd.read_csv(pk.dataset_path("theo_sd"))
    one = full[full["ID"] == full["ID"].iloc[0]].copy()
    one["ID"] = 99
    obs = one.index[(one["AMT"] == 0) & (one["TIME"] > 8)]
    one = one.drop(obs[1:]).loc[lambda d: (d["AMT"] > 0) | (d["TIME"] > 8)]
    data = pk.read_nonmem(pd.concat([full, one], ignore_index=True))
    pop = pk.PopulationModel(ORAL, ["ka", "cl", "v"], "additive")
    fit = fit_quietly(pop, data, standard_errors=False)
    assert fit.converged
    omega = fit.estimates["omega"]
    eta = fit.eta[-1]
    assert bool(torch.isfinite(fit.eta).all())
    assert bool((eta.abs() < 2 * omega).all()) and float(eta[0].abs()) < float(omega[0])
    assert float(fit.estimates["cl"]) == pytest.approx(2.75, rel=0.1)
    assert fit.info["flip_flop_subjects"] == [] and fit.info["boundary"] == []


def test_boundary_messages_name_the_parameters():
    pop = pk.PopulationModel(ORAL, ["ka", "cl", "v"], "additive")
    from genprog.pk.estimation import boundary_messages

    notes = boundary_messages(pop, {"omega": torch.tensor([1e-5, 0.3, 7.0], dtype=F64),
                                    "sigma_add": torch.tensor(0.5, dtype=F64)})
    assert len(notes) == 2
    assert "omega of ka is near its zero boundary" in notes[0]
    assert "omega of v is huge" in notes[1]
    assert boundary_messages(pop, {"omega": torch.tensor([0.3, 0.3, 0.3], dtype=F64),
                                   "sigma_add": torch.tensor(1e-9, dtype=F64)})[0].startswith("residual error")


def test_unconverged_fit_is_reported_with_timing_and_threads():
    """Two outer iterations cannot converge: ConvergenceWarning, converged False, the
    message in info; info also holds per-phase times and the thread count, and the
    process's torch thread count is what it was."""
    data = pk.read_nonmem(pk.dataset_path("theo_sd"))
    pop = pk.PopulationModel(ORAL, ["ka", "cl", "v"], "additive")
    before = torch.get_num_threads()
    with pytest.warns(ConvergenceWarning, match="unconverged"):
        fit = pop.fit(data, "mle", max_iters=2, max_rounds=1, standard_errors=False, threads=1)
    assert not fit.converged and any("unconverged" in m for m in fit.info["messages"])
    assert fit.info["threads"] == 1 and torch.get_num_threads() == before
    timing = fit.info["timing"]
    assert timing["inner_solves"] >= 2 and 0 < timing["inner_s"] <= timing["outer_s"]

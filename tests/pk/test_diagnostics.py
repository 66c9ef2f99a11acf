"""Diagnostics of population fits (residuals, GOF, VPC, shrinkage) and the command line.

Oracles: the one-compartment oral closed form written out in NumPy on the raw CSV (read
with pandas, not the reader), finite-difference Jacobians and SciPy's ``sqrtm`` for
CWRES, an independent NumPy re-simulation for the VPC, and the summary table's own
shrinkage column. One module-scoped ML fit of theo_sd is shared (~6-30 s).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import scipy.stats
import torch

import genprog as gp
from genprog import pk
from genprog.pk import diagnostics as dg
from genprog.pk.cli import main
from genprog.pk.population import PopulationBayesFit

THEO = Path(pk.dataset_path("theo_sd"))


@pytest.fixture(scope="module")
def data():
    return pk.read_nonmem(THEO)


@pytest.fixture(scope="module")
def fit(data):
    model = pk.PopulationModel(structure=pk.OneCompartment(), random_effects=["ka", "cl", "v"],
                               error="combined")
    return model.fit(data, "mle")


@pytest.fixture(scope="module")
def raw():
    """theo_sd from pandas: per subject (dose, times [11], DV [11]) in file order."""
    df = pd.read_csv(THEO)
    out = []
    for _, g in df.groupby("ID", sort=False):
        obs = g[g.EVID == 0]
        out.append((float(g.loc[g.EVID == 1, "AMT"].iloc[0]), obs.TIME.to_numpy(float),
                    obs.DV.to_numpy(float)))
    return out


def oral_1cmt(dose, t, cl, v, ka):
    """C(t) after an oral dose at t = 0, one compartment, first-order absorption."""
    k = cl / v
    return dose * ka / (v * (ka - k)) * (np.exp(-k * t) - np.exp(-ka * t))


def estimates(fit):
    e = {k: v.detach().double().numpy() for k, v in fit.estimates.items()}
    return e["ka"], e["cl"], e["v"], e["omega"], e["sigma_add"], e["sigma_prop"]


# ---- residuals ------------------------------------------------------------------------


def test_residual_table(fit, data, raw):
    table = dg.residuals(fit)
    assert list(table.columns) == ["ID", "TIME", "DV", "PRED", "IPRED", "RES", "IRES", "IWRES", "CWRES"]
    assert len(table) == 132 == data.n_observations
    np.testing.assert_array_equal(table.IRES.to_numpy(), table.DV.to_numpy() - table.IPRED.to_numpy())
    np.testing.assert_array_equal(table.RES.to_numpy(), table.DV.to_numpy() - table.PRED.to_numpy())
    # rows in data order; times and DV as in the file (float32 storage)
    np.testing.assert_allclose(table.TIME, np.concatenate([t for _, t, _ in raw]), rtol=1e-6)
    np.testing.assert_allclose(table.DV, np.concatenate([y for _, _, y in raw]), rtol=1e-6)
    assert table.ID.tolist() == [i for i in data.ids for _ in range(11)]
    pred, ipred = fit.predictions()
    np.testing.assert_allclose(table.PRED, pred[data.obs_mask].numpy(), rtol=1e-12)
    np.testing.assert_allclose(table.IPRED, ipred[data.obs_mask].numpy(), rtol=1e-12)


def test_predictions_match_closed_form(fit, raw):
    """PRED / IPRED against the closed form in NumPy at eta = 0 / the EBEs."""
    ka, cl, v, *_ = estimates(fit)
    eta = fit.eta.numpy()  # columns ka, cl, v
    table = dg.residuals(fit)
    pred = np.concatenate([oral_1cmt(d, t, cl, v, ka) for d, t, _ in raw])
    ipred = np.concatenate([oral_1cmt(d, t, cl * np.exp(eta[i, 1]), v * np.exp(eta[i, 2]),
                                      ka * np.exp(eta[i, 0])) for i, (d, t, _) in enumerate(raw)])
    np.testing.assert_allclose(table.PRED, pred, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(table.IPRED, ipred, rtol=1e-5, atol=1e-9)


def test_iwres(fit):
    table = dg.residuals(fit)
    _, _, _, _, sa, sp = estimates(fit)
    ref = (table.DV - table.IPRED) / np.sqrt(sa ** 2 + (sp * table.IPRED) ** 2)
    np.testing.assert_allclose(table.IWRES, ref, rtol=1e-10)
    # roughly standard for a model that fits
    assert abs(table.IWRES.mean()) < 0.5 and 0.5 < table.IWRES.std() < 1.5
    assert abs(table.CWRES.mean()) < 0.5 and 0.5 < table.CWRES.std() < 1.5


def test_cwres_against_finite_differences(fit, raw):
    """CWRES (interaction form) from a NumPy linearisation: central-difference Jacobian
    of the closed form in eta at the EBEs and SciPy's matrix square root."""
    ka, cl, v, omega, sa, sp = estimates(fit)
    eta_hat = fit.eta.numpy()
    table = dg.residuals(fit)
    Omega = np.diag(omega ** 2)
    got = table.CWRES.to_numpy().reshape(12, 11)

    def f(i, eta):
        d, t, _ = raw[i]
        return oral_1cmt(d, t, cl * np.exp(eta[1]), v * np.exp(eta[2]), ka * np.exp(eta[0]))

    for i in (0, 5, 11):
        e, h = eta_hat[i], 1e-6
        J = np.stack([(f(i, e + h * np.eye(3)[p]) - f(i, e - h * np.eye(3)[p])) / (2 * h)
                      for p in range(3)], -1)
        fi = f(i, e)
        cov = J @ Omega @ J.T + np.diag(sa ** 2 + (sp * fi) ** 2)
        y = raw[i][2]
        ref = np.real(scipy.linalg.sqrtm(np.linalg.inv(cov))) @ (y - fi + J @ e)
        np.testing.assert_allclose(got[i], ref, rtol=1e-5, atol=1e-6)


def test_proportional_error_without_iiv(data):
    """Without random effects CWRES is IWRES; under proportional error the weighted
    residuals of the pre-dose samples (PRED = 0, residual SD 0) are undefined (NaN)."""
    model = pk.PopulationModel(structure=pk.OneCompartment(), random_effects=[], error="proportional")
    fit0 = model.fit(data, "mle", standard_errors=False)
    table = dg.residuals(fit0)
    pre = (table.TIME == 0).to_numpy()
    assert pre.sum() == 12 and (table.IPRED[pre] == 0).all()
    assert table.IWRES[pre].isna().all() and table.CWRES[pre].isna().all()
    assert np.isfinite(table.IWRES[~pre]).all()
    np.testing.assert_allclose(table.CWRES[~pre], table.IWRES[~pre], rtol=1e-12)
    sp = float(fit0.estimates["sigma_prop"])
    np.testing.assert_allclose(table.IWRES[~pre], (table.DV - table.IPRED)[~pre] / (sp * table.IPRED[~pre]))
    assert dg.shrinkage(fit0).empty
    assert dg.simulate(fit0, 5).shape == (5, 12, 11)


def test_shrinkage(fit):
    s = dg.shrinkage(fit)
    assert list(s.index) == ["omega_ka", "omega_cl", "omega_v"]
    np.testing.assert_allclose(s.to_numpy(), fit.summary().loc[s.index, "shrinkage_pct"].to_numpy())
    _, _, _, omega, _, _ = estimates(fit)
    ref = 100 * (1 - fit.eta.numpy().std(0, ddof=1) / omega)
    np.testing.assert_allclose(s.to_numpy(), ref, rtol=1e-10)


def _constant_bayes_fit(fit, data, n=4):
    """A PopulationBayesFit whose every draw is the ML estimate (etas at the EBEs)."""
    model = fit.population(data)
    draws = {k: v.detach().double().expand(1, n, *v.shape).clone() for k, v in fit.estimates.items()}
    L = torch.diag_embed(fit.estimates["omega"].double())
    eta_raw = torch.linalg.solve_triangular(L, fit.eta.double().T, upper=False).T  # [S, P]
    draws["eta_raw"] = eta_raw[:, None, :].expand(1, n, *eta_raw[:, None, :].shape).clone()
    return PopulationBayesFit.wrap(gp.Fit("nuts", model, draws), fit.population, data)


def test_bayesian_fit_is_summarised_at_its_point(fit, data):
    """Residuals and shrinkage of a Bayesian fit whose draws all equal the ML point are
    the ML fit's."""
    bayes = _constant_bayes_fit(fit, data)
    a, b = dg.residuals(fit), dg.residuals(bayes)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9, atol=1e-9)
    pd.testing.assert_series_equal(dg.shrinkage(bayes), dg.shrinkage(fit), check_exact=False, rtol=1e-9)
    np.testing.assert_allclose(dg.shrinkage(bayes).to_numpy(),
                               bayes.summary().loc[["omega_ka", "omega_cl", "omega_v"], "shrinkage_pct"])
    assert len(dg.plot_gof(bayes).axes) == 4


@pytest.mark.parametrize("kind", ["point", "bayes"])
def test_both_fit_types_implement_the_population_fit_protocol(kind, fit, data):
    """PopulationFit and PopulationBayesFit answer the same four questions; a Bayesian fit
    whose draws all equal the ML point gives the ML point's answers (to 1e-9)."""
    result = fit if kind == "point" else _constant_bayes_fit(fit, data)
    assert isinstance(result, pk.PopulationResult)
    assert result.fitted_data().ids == data.ids
    torch.testing.assert_close(result.fitted_data().obs_dv.double(), data.obs_dv.double(), equal_nan=True)
    pop, d, values, eta = result.population_point()
    assert pop is fit.population and d.obs_dv.dtype == torch.float64 and eta.shape == (12, 3)
    for k in ("ka", "cl", "v", "omega"):
        torch.testing.assert_close(values[k], fit.estimates[k].double(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(eta, fit.eta.double(), rtol=1e-9, atol=1e-9)
    _, _, rep, rep_eta, batched = result.replicate_parameters(5, torch.Generator().manual_seed(0))
    assert batched == (kind == "bayes")
    assert rep_eta.shape == ((5, 12, 3) if batched else (12, 3))
    torch.testing.assert_close(rep["cl"], fit.estimates["cl"].double().expand_as(rep["cl"]))
    _, eta_s, omega = result.eta_and_omega()
    torch.testing.assert_close(omega.double(), fit.estimates["omega"].double())
    torch.testing.assert_close(eta_s.double(), fit.eta.double(), rtol=1e-9, atol=1e-9)


def test_diagnostics_refuse_what_is_not_a_population_fit(fit):
    plain = gp.Fit("nuts", fit.population(fit.data), {"cl": torch.ones(1, 4)})
    for call in (lambda: dg.residuals(plain), lambda: dg.shrinkage(object()),
                 lambda: dg.simulate(fit.estimates, 10)):
        with pytest.raises(TypeError, match="expected a population fit"):
            call()


def test_bayesian_simulation_uses_the_draws(fit, data):
    """A Bayesian fit simulates at its posterior draws: with every draw at the ML point the
    replicates follow the point fit's distribution (percentiles within Monte Carlo error),
    and VPC and NPDE run on it."""
    bayes = _constant_bayes_fit(fit, data)
    a, b = dg.simulate(bayes, 3000, seed=1).numpy(), dg.simulate(fit, 3000, seed=2).numpy()
    assert a.shape == b.shape == (3000, 12, 11)
    late = fit.predictions()[0].numpy() > 1.0
    for q in (0.1, 0.5, 0.9):
        qa, qb = np.quantile(a, q, 0)[late], np.quantile(b, q, 0)[late]
        assert np.abs(np.log(qa / qb)).max() < 0.12, q
    assert dg.vpc_table(bayes, n_sim=30).n_obs.sum() == 132
    assert np.isfinite(dg.npde(bayes, n_sim=50)["NPDE"]).all()


# ---- simulation and VPC -------------------------------------------------------------


def _numpy_simulation(fit, raw, n_sim, seed):
    """Independent replicates: NumPy's generator and the closed form."""
    ka, cl, v, omega, sa, sp = estimates(fit)
    rng = np.random.default_rng(seed)
    eta = rng.standard_normal((n_sim, 12, 3)) * omega
    out = np.empty((n_sim, 12, 11))
    for i, (d, t, _) in enumerate(raw):
        c = oral_1cmt(d, t[None, :], cl * np.exp(eta[:, i, 1:2]), v * np.exp(eta[:, i, 2:3]),
                      ka * np.exp(eta[:, i, 0:1]))
        out[:, i] = c + np.sqrt(sa ** 2 + (sp * c) ** 2) * rng.standard_normal(c.shape)
    return out


def test_simulate_shape_seed(fit):
    a, b, c = dg.simulate(fit, 30, seed=1), dg.simulate(fit, 30, seed=1), dg.simulate(fit, 30, seed=2)
    assert a.shape == (30, 12, 11) and a.dtype == torch.float64 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="n_sim"):
        dg.simulate(fit, 0)


def test_simulation_matches_independent_numpy(fit, raw):
    """Per-slot 5th/50th/95th percentiles of 4000 replicates agree with an independent
    NumPy simulation within Monte Carlo error (|z| < 4.5 over the 396 comparisons, mean
    |z| near E|N(0,1)| = 0.8), and the simulated median is near the typical-subject
    prediction in log space once the drug is absorbed."""
    n = 4000
    ours = dg.simulate(fit, n, seed=3).numpy()
    ref = _numpy_simulation(fit, raw, n, seed=4)
    pooled = np.concatenate([ours, ref])
    for q in (0.05, 0.5, 0.95):
        a, b = np.quantile(ours, q, axis=0), np.quantile(ref, q, axis=0)
        # standard error of a sample quantile, sqrt(q(1-q)/n) / density, with the
        # sparsity 1/density estimated from the pooled sample's quantiles
        d = 0.025
        sparsity = (np.quantile(pooled, q + d, axis=0) - np.quantile(pooled, q - d, axis=0)) / (2 * d)
        z = np.abs(a - b) / (np.sqrt(2 * q * (1 - q) / n) * sparsity + 1e-12)
        assert z.max() < 4.5 and 0.5 < z.mean() < 1.1, (q, z.max(), z.mean())
    pred, _ = fit.predictions()
    med = np.median(ours, 0)
    late = pred.numpy() > 1.0
    assert np.abs(np.log(med[late]) - np.log(pred.numpy()[late])).max() < 0.2


def test_vpc_table(fit, data):
    table = dg.vpc_table(fit, n_sim=300, seed=0)
    assert table.n_obs.sum() == 132
    # default bins keep the 11 nominal sampling times of each subject together
    assert (table.n_obs % 12 == 0).all() and len(table) >= 8
    obs_t = data.obs_time[data.obs_mask].double().numpy()
    for e in table.attrs["edges"][1:-1]:
        assert not np.isclose(obs_t, e).any()
    for kind in ("obs", "sim"):
        p5, p50, p95 = (table[f"{kind}_{lab}"] for lab in ("p5", "p50", "p95"))
        assert (p5 <= p50).all() and (p50 <= p95).all()
    for lab in ("p5", "p50", "p95"):
        assert (table[f"sim_{lab}_low"] <= table[f"sim_{lab}"]).all()
        assert (table[f"sim_{lab}"] <= table[f"sim_{lab}_high"]).all()
    # coverage of the 90% prediction interval, recomputed from the data and the table
    dv = data.obs_dv[data.obs_mask].double().numpy()
    edges = np.asarray(table.attrs["edges"])
    b = np.clip(np.searchsorted(edges, obs_t, side="right") - 1, 0, len(edges) - 2)
    lo = table.set_index("bin").loc[b, "sim_p5"].to_numpy()
    hi = table.set_index("bin").loc[b, "sim_p95"].to_numpy()
    inside = (dv >= lo) & (dv <= hi)
    assert 0.7 <= inside.mean() <= 1.0
    assert table.n_below.sum() == (dv < lo).sum() and table.n_above.sum() == (dv > hi).sum()


def test_vpc_bins_and_validation(fit):
    t = dg.vpc_table(fit, n_sim=20, bins=[0, 1, 5, 25])
    assert t.time_low.tolist() == [0, 1, 5] and t.n_obs.sum() == 132
    assert len(dg.vpc_table(fit, n_sim=20, bins=4)) <= 4
    pc = dg.vpc_table(fit, n_sim=20, prediction_corrected=True)
    assert pc.n_obs.sum() == 120  # the 12 pre-dose observations have PRED = 0
    with pytest.raises(ValueError, match="bins"):
        dg.vpc_table(fit, n_sim=5, bins=[3, 1])
    with pytest.raises(ValueError, match="pi"):
        dg.vpc_table(fit, n_sim=5, pi=(0.5, 0.05))
    with pytest.raises(ValueError, match="ci"):
        dg.vpc_table(fit, n_sim=5, ci=1.5)


# ---- NPDE -------------------------------------------------------------------------------


def _numpy_npde(y, sims):
    """NPDE of one subject from its observations ``[T]`` and simulations ``[K, T]``
    (Comets et al. 2008), in NumPy/SciPy."""
    K = sims.shape[0]
    mean = sims.mean(0)
    L = np.linalg.cholesky(np.cov(sims, rowvar=False, ddof=1))
    y_star = scipy.linalg.solve_triangular(L, y - mean, lower=True)
    sim_star = scipy.linalg.solve_triangular(L, (sims - mean).T, lower=True)  # [T, K]
    pde = np.clip((sim_star < y_star[:, None]).mean(1), 1 / (2 * K), 1 - 1 / (2 * K))
    return scipy.stats.norm.ppf(pde)


def test_npde_matches_numpy(fit, raw):
    table = dg.npde(fit, n_sim=300, seed=5)
    assert list(table.columns) == ["ID", "TIME", "DV", "EPRED", "PDE", "NPDE"] and len(table) == 132
    sims = dg.simulate(fit, 300, seed=5).numpy()
    got = table.NPDE.to_numpy().reshape(12, 11)
    for i in range(12):
        np.testing.assert_allclose(got[i], _numpy_npde(raw[i][2], sims[:, i]), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(table.EPRED.to_numpy().reshape(12, 11), sims.mean(0), rtol=1e-12)
    assert table.PDE.between(1 / 600, 1 - 1 / 600).all()
    with_npde = dg.residuals(fit, npde=True, n_sim=300, seed=5)
    assert list(with_npde.columns)[-1] == "NPDE"
    np.testing.assert_array_equal(with_npde.NPDE.to_numpy(), table.NPDE.to_numpy())
    assert "NPDE" not in dg.residuals(fit).columns
    with pytest.raises(ValueError, match="n_sim"):
        dg.npde(fit, n_sim=1)


def _design(n_subjects=40, seed=0):
    """An oral design: 320 mg at 0, 8 samples per subject between 0.25 and 24 h, weights
    around 70 kg."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, n_subjects + 1):
        wt = float(rng.uniform(50, 90))
        rows.append({"ID": i, "TIME": 0.0, "AMT": 320.0, "EVID": 1, "DV": 0.0, "WT": wt})
        for t in (0.25, 0.5, 1, 2, 4, 8, 12, 24):
            rows.append({"ID": i, "TIME": float(t), "AMT": 0.0, "EVID": 0, "DV": 0.0, "WT": wt})
    return pk.read_nonmem(pd.DataFrame(rows))


def _at(fit, data, **changes):
    """The fit's model with its parameters changed, as a point fit on ``data``."""
    est = {k: v.clone() for k, v in fit.estimates.items()}
    est.update({k: torch.as_tensor(v, dtype=torch.float64) for k, v in changes.items()})
    P = fit.eta.shape[1]
    return dataclasses.replace(fit, data=data.to(dtype=torch.float64), estimates=est,
                               eta=torch.zeros(data.n_subjects, P, dtype=torch.float64))


def test_npde_calibration(fit):
    """On data simulated from the model itself NPDE are N(0, 1) (mean, variance,
    Kolmogorov-Smirnov at a lenient level); under wrong typical values or a too-small
    omega they are not."""
    design = _design()
    sim = pk.simulate_data(fit.population, design, dict(fit.estimates), seed=11)
    truth = _at(fit, sim)
    x = dg.npde(truth, n_sim=1000, seed=1)["NPDE"].to_numpy()
    assert x.size == 320 and np.isfinite(x).all()
    assert abs(x.mean()) < 0.25 and 0.75 < x.var() < 1.3
    assert scipy.stats.kstest(x, "norm").pvalue > 0.01
    shifted = _at(fit, sim, cl=2 * float(fit.estimates["cl"]))
    table = dg.npde(shifted, n_sim=1000, seed=1)
    assert table.NPDE.mean() > 0.5 and scipy.stats.kstest(table.NPDE, "norm").pvalue < 1e-6
    assert table.attrs["p_global"] < 1e-6
    narrow = _at(fit, sim, omega=0.2 * fit.estimates["omega"])
    y = dg.npde(narrow, n_sim=1000, seed=1)["NPDE"].to_numpy()
    assert y.var() > 1.5 and scipy.stats.kstest(y, "norm").pvalue < 1e-3


def test_plot_npde(fit, tmp_path):
    fig = dg.plot_npde(fit, n_sim=100)
    assert [a.get_title() for a in fig.axes] == ["NPDE histogram vs N(0, 1)", "NPDE QQ plot",
                                                 "NPDE vs TIME", "NPDE vs PRED"]
    assert len(fig.npde_table) == 132 and "p_global" in fig.npde_table.attrs
    fig.savefig(tmp_path / "npde.png")
    assert _is_png(tmp_path / "npde.png")


# ---- individual fits ----------------------------------------------------------------------


def test_individual_curves(fit, raw):
    """IPRED / PRED on the dense grid against the closed form; the grid holds the
    observation times, where the curves equal the residual table's predictions."""
    ka, cl, v, *_ = estimates(fit)
    eta = fit.eta.numpy()
    curves = dg.individual_curves(fit, n_grid=50)
    table = dg.residuals(fit)
    for i, sid in enumerate(fit.data.ids):
        c = curves[curves.ID == sid]
        d, t_obs, _ = raw[i]
        assert c.TIME.is_monotonic_increasing and len(c) >= 50
        assert np.isin(t_obs.astype(np.float32), c.TIME.to_numpy().astype(np.float32)).all()
        t = c.TIME.to_numpy()
        np.testing.assert_allclose(c.PRED, oral_1cmt(d, t, cl, v, ka), rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(c.IPRED, oral_1cmt(d, t, cl * np.exp(eta[i, 1]), v * np.exp(eta[i, 2]),
                                                      ka * np.exp(eta[i, 0])), rtol=1e-5, atol=1e-9)
        at_obs = c.set_index("TIME").loc[table[table.ID == sid].TIME]
        np.testing.assert_allclose(at_obs.IPRED, table[table.ID == sid].IPRED, rtol=1e-10)


def test_plot_individual(fit, tmp_path):
    fig = dg.plot_individual(fit, n_grid=60)
    assert len(fig.axes) == 12
    assert [a.get_title() for a in fig.axes] == [f"ID {i}" for i in fit.data.ids]
    for ax in fig.axes:
        ipred, pred = ax.lines
        assert len(ipred.get_xdata()) >= 60 and ipred.get_label() == "IPRED" and pred.get_label() == "PRED"
        assert len(ax.collections) == 2  # observations, dose ticks
        assert len(ax.collections[0].get_offsets()) == 11
    fig.savefig(tmp_path / "ind.png")
    assert _is_png(tmp_path / "ind.png")
    some = fit.data.ids[3:8]
    fig = dg.plot_individual(fit, subjects=some, ncols=2, log=True)
    assert len(fig.axes) == 5 and fig.axes[0].get_yscale() == "log"
    assert [a.get_title() for a in fig.axes] == [f"ID {i}" for i in some]
    with pytest.raises(ValueError, match="unknown subject"):
        dg.plot_individual(fit, subjects=["nobody"])


# ---- regimen simulation -------------------------------------------------------------------


def _superposition(t, dose_times, dose, ka, cl, v):
    """Closed-form oral 1-cmt concentration after several doses (superposition)."""
    dt = t[:, None] - np.asarray(dose_times)[None, :]
    return np.where(dt > 0, oral_1cmt(dose, np.clip(dt, 0, None), cl, v, ka), 0.0).sum(1)


def _quiet(fit, **changes):
    """Tiny omegas, no residual error."""
    return _at(fit, fit.data, omega=1e-8 * torch.ones(3), sigma_add=0.0, sigma_prop=0.0, **changes)


def test_regimen_matches_superposition(fit):
    """Omegas ~0, no residual error: every percentile is the structural model's multiple-
    dose prediction, and the steady-state trough is the analytic one."""
    quiet = _quiet(fit)
    ka, cl, v, *_ = estimates(fit)
    tau, dose = 12.0, 320.0
    times = np.concatenate([np.linspace(0, 240, 121), [239.999]])
    table = pk.simulate_regimen(quiet, pk.Regimen(dose, interval=tau, n_doses=20), times, n=50)
    ref = _superposition(times, tau * np.arange(20), dose, ka, cl, v)
    for col in ("typical", "p5", "p50", "p95"):
        np.testing.assert_allclose(table[col], ref, rtol=1e-6, atol=1e-9)
    k = cl / v
    trough = dose * ka / (v * (ka - k)) * (np.exp(-k * tau) / (1 - np.exp(-k * tau))
                                           - np.exp(-ka * tau) / (1 - np.exp(-ka * tau)))
    np.testing.assert_allclose(table.p50.iloc[-1], trough, rtol=1e-4)  # after 20 doses: at SS
    ss = pk.simulate_regimen(quiet, pk.Regimen(dose, interval=tau, steady_state=True), [0.0, tau], n=10)
    np.testing.assert_allclose(ss.p50, [trough, trough], rtol=1e-6)


def test_regimen_population_percentiles(fit):
    """IIV on CL only, no residual error: C(t) decreases in CL, so the 95th percentile of
    C is C at CL's 5th percentile, ``cl exp(-1.645 omega)``."""
    omega = 0.3
    omegas = torch.full((3,), 1e-8)
    omegas[fit.population.random_effects.index("cl")] = omega
    wide = _at(fit, fit.data, omega=omegas, sigma_add=0.0, sigma_prop=0.0)
    ka, cl, v, *_ = estimates(fit)
    times = np.array([1.0, 4.0, 12.0, 24.0])
    table = pk.simulate_regimen(wide, pk.Regimen(320.0), times, n=4000, seed=3, residual=False)
    for q, z in ((0.05, 1.645), (0.5, 0.0), (0.95, -1.645)):
        ref = oral_1cmt(320.0, times, cl * np.exp(z * omega), v, ka)
        # 4 standard errors of the sample quantile of eta, through d log C / d eta
        se_eta = np.sqrt(q * (1 - q) / 4000) / scipy.stats.norm.pdf(z) * omega
        h = 1e-4
        sens = np.abs(np.log(oral_1cmt(320.0, times, cl * np.exp(z * omega + h), v, ka) / ref)) / h
        assert (np.abs(np.log(table[dg._label(q)].to_numpy() / ref)) < 4 * se_eta * sens).all(), q
    noisy = _at(fit, fit.data, omega=omegas, sigma_add=0.5, sigma_prop=0.0)
    with_error = pk.simulate_regimen(noisy, pk.Regimen(320.0), times, n=4000, seed=3)
    assert (with_error.p95 - with_error.p5 > table.p95 - table.p5).all()
    long = pk.simulate_regimen(wide, pk.Regimen(320.0), times, n=7, draws=True)
    assert list(long.columns) == ["replicate", "time", "value"] and len(long) == 28


def test_regimen_subject_and_covariates(fit, raw):
    """One subject at its EBEs: its IPRED (no residual error) for its own dose; covariate
    effects are evaluated against the data's median."""
    table = dg.residuals(fit)
    sid = fit.data.ids[4]
    dose, t_obs, _ = raw[4]
    one = pk.simulate_regimen(fit, pk.Regimen(dose), t_obs, subject=sid, n=20, residual=False)
    for col in ("typical", "p5", "p50", "p95"):
        np.testing.assert_allclose(one[col], table[table.ID == sid].IPRED, rtol=1e-6, atol=1e-9)
    # allometric CL on WT: a subject of twice the median weight clears 2^0.75 times faster
    allo = dataclasses.replace(
        _quiet(fit), population=dataclasses.replace(fit.population, covariates={"cl": ("WT", "allometric")}))
    ka, cl, v, *_ = estimates(fit)
    wt = float(np.median(fit.data.covariates["WT"].numpy()))
    t = np.array([2.0, 8.0, 20.0])
    for w, factor in ((wt, 1.0), (2 * wt, 2 ** 0.75), (0.5 * wt, 0.5 ** 0.75)):
        got = pk.simulate_regimen(allo, pk.Regimen(320.0), t, covariates={"wt": w}, n=5)
        np.testing.assert_allclose(got.p50, oral_1cmt(320.0, t, cl * factor, v, ka), rtol=1e-6)
        np.testing.assert_allclose(got.typical, got.p50, rtol=1e-6)
    # default: covariates of random subjects of the data
    spread = pk.simulate_regimen(allo, pk.Regimen(320.0), t, n=400, residual=False)
    assert (spread.p95 > spread.p5 * 1.1).to_numpy()[1:].all()
    with pytest.raises(ValueError, match="subject"):
        pk.simulate_regimen(fit, pk.Regimen(1.0), t, subject="nobody")
    with pytest.raises(ValueError, match="covariates"):
        pk.simulate_regimen(fit, pk.Regimen(1.0), t, subject=sid, covariates={"WT": 70})
    with pytest.raises(ValueError, match="AGE"):
        pk.simulate_regimen(fit, pk.Regimen(1.0), t, covariates={"AGE": 40})
    with pytest.raises(TypeError, match="Regimen"):
        pk.simulate_regimen(fit, 100.0, t)
    with pytest.raises(ValueError, match="interval"):
        pk.Regimen(100.0, n_doses=3)


def test_simulate_data(fit, data):
    """Simulated observations: the design is kept, seeds reproduce, residuals around the
    concentrations have the residual SD, BLQ below the given limit."""
    params = {**{k: v for k, v in fit.estimates.items()}, "omega": torch.full((3,), 1e-8),
              "sigma_add": torch.tensor(0.5), "sigma_prop": torch.tensor(0.0)}
    a = pk.simulate_data(fit.population, data, params, seed=2)
    b = pk.simulate_data(fit.population, data, params, seed=2)
    assert torch.equal(a.obs_dv, b.obs_dv) and torch.equal(a.obs_time, data.obs_time)
    pred = _at(fit, data, **{k: v for k, v in params.items()}).predictions()[0]
    r = (a.obs_dv.double() - pred)[data.obs_mask].numpy()
    assert abs(r.mean()) < 0.15 and 0.4 < r.std() < 0.6
    c = pk.simulate_data(fit.population, data, params, seed=2, lloq=1.0)
    assert int(c.obs_blq.sum()) == int((a.obs_dv < 1.0)[data.obs_mask].sum()) > 0
    assert (c.obs_dv[c.obs_blq] == 1.0).all()
    with pytest.raises(ValueError, match="missing"):
        pk.simulate_data(fit.population, data, {"cl": 1.0})


# ---- figures ----------------------------------------------------------------------------


def _is_png(path):
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("log", [False, True], ids=["linear", "log"])
def test_figures(fit, tmp_path, log):
    gof = dg.plot_gof(fit, log=log)
    axes = gof.axes
    assert len(axes) == 4
    assert [a.get_title() for a in axes] == ["DV vs PRED", "DV vs IPRED", "IWRES vs TIME", "IWRES vs IPRED"]
    assert all(a.get_xlabel() and a.get_ylabel() for a in axes)
    assert axes[0].get_xscale() == ("log" if log else "linear")
    gof.savefig(tmp_path / "gof.png")
    fig = dg.vpc(fit, n_sim=50, log=log, prediction_corrected=log)
    assert len(fig.axes) == 1 and fig.axes[0].get_title()
    assert len(fig.vpc_table) >= 8
    fig.savefig(tmp_path / "vpc.png")
    assert _is_png(tmp_path / "gof.png") and _is_png(tmp_path / "vpc.png")


# ---- command line -----------------------------------------------------------------------


def test_cli_fit_mle(fit, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["fit", str(THEO), "--structure", "one", "--absorption", "first_order",
               "--iiv", "ka,cl,v", "--error", "combined", "--method", "mle",
               "--n-sim", "50", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for name in ("summary.csv", "individual.csv", "residuals.csv", "gof.png", "vpc.png"):
        assert (out / name).exists(), name
    assert _is_png(out / "gof.png") and _is_png(out / "vpc.png")
    assert "12 subjects" in captured.out and "OFV" in captured.out and "AIC" in captured.out
    summary = pd.read_csv(out / "summary.csv", index_col="parameter")
    np.testing.assert_allclose(summary.loc[["ka", "cl", "v"], "estimate"],
                               [float(fit.estimates[p]) for p in ("ka", "cl", "v")], rtol=1e-6)
    individual = pd.read_csv(out / "individual.csv", index_col="ID")
    assert individual.shape == (12, 6) and list(individual.columns[3:]) == ["eta_ka", "eta_cl", "eta_v"]
    assert len(pd.read_csv(out / "residuals.csv")) == 132


def test_cli_covariate_and_errors(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    text = THEO.read_text().splitlines()
    text[1] = text[1].replace("319.992", "-319.992")
    bad.write_text("\n".join(text) + "\n")
    assert main(["fit", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "row" in err and "AMT" in err and "Traceback" not in err

    cases = [
        (["fit", str(tmp_path / "missing.csv"), "--out", str(tmp_path)], "missing.csv"),
        (["fit", str(THEO), "--iiv", "cl,q", "--out", str(tmp_path)], "'q'"),
        (["fit", str(THEO), "--covariate", "cl=AGE", "--out", str(tmp_path)], "AGE"),
        (["fit", str(THEO), "--covariate", "clWT", "--out", str(tmp_path)], "PARAM=COV"),
        (["fit", str(THEO), "--dvid", "cp", "--out", str(tmp_path)], "cp"),
    ]
    for argv, word in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and word in err and "Traceback" not in err
    assert main(["fit", str(THEO), "--method", "bogus", "--out", str(tmp_path)]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["describe", str(THEO)]) == 0
    assert capsys.readouterr().out.startswith("12 subjects")


def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "genprog.pk", "describe", str(THEO)],
                       check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("12 subjects")


@pytest.mark.slow
def test_cli_fit_vi(tmp_path, capsys):
    out = tmp_path / "vi"
    rc = main(["fit", str(THEO), "--iiv", "ka,cl,v", "--method", "vi", "--draws", "100",
               "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for name in ("summary.csv", "residuals.csv", "gof.png", "vpc.png", "posterior.nc"):
        assert (out / name).exists(), name  # a VPC from posterior draws
    assert pd.read_csv(out / "individual.csv", index_col="ID").shape == (12, 3)
    loaded = gp.load(out / "posterior.nc")
    assert loaded.draws["cl"].shape == (1, 100)

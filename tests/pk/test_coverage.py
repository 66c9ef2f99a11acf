"""Simulation-estimation study of population maximum likelihood (``fit_mle``).

Populations are simulated from known parameters (:func:`genprog.pk.simulate_data`) for a
table of designs (oral and iv, multiple dosing, steady state, infusion, two compartments,
Michaelis-Menten elimination by ODE, BLQ censoring) and fitted with ``fit_mle``; the 90%
Wald intervals of the typical values (log scale, from the finite-difference Hessian)
must cover the truth in a share of the replicates within a binomial tolerance of 90%
(3 binomial SDs). The full study is ``slow`` (replicates: ``GENPROG_COVERAGE_REPS``,
default 40); the fast test fits one small oral case and checks the estimates against
the truth with their own standard errors.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pandas as pd
import pytest

from genprog import pk
from genprog.errors import ConvergenceWarning

Z90 = 1.6448536269514722


def _design(n_subjects, doses, times, seed=0, **dose_cols):
    """NONMEM rows: each subject gets ``doses`` [(time, amt)] and samples at ``times``
    (jittered by up to 5%); extra dose columns (RATE, SS, II, ADDL, CMT) as given."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, n_subjects + 1):
        for t, amt in doses:
            rows.append({"ID": i, "TIME": float(t), "AMT": float(amt), "EVID": 1, "DV": 0.0,
                         **dose_cols})
        for t in times:
            rows.append({"ID": i, "TIME": float(t) * float(rng.uniform(0.95, 1.05)), "AMT": 0.0,
                         "EVID": 0, "DV": 0.0, **{k: 0 for k in dose_cols}})
    df = pd.DataFrame(rows).sort_values(["ID", "TIME", "EVID"], ascending=[True, True, False])
    return pk.read_nonmem(df.reset_index(drop=True))


ORAL_TIMES = (0.5, 1, 2, 4, 6, 8, 12, 24)

#: id -> (model, design, true parameters, lloq)
CASES = {
    "oral-1cmt": (
        pk.PopulationModel(pk.OneCompartment(), ["cl", "v"], "proportional"),
        lambda seed: _design(30, [(0, 100)], ORAL_TIMES, seed),
        {"cl": 2.0, "v": 20.0, "ka": 1.0, "omega": [0.3, 0.2], "sigma_prop": 0.1}, None),
    "iv-multiple": (
        pk.PopulationModel(pk.OneCompartment("iv"), ["cl", "v"], "combined"),
        lambda seed: _design(24, [(0, 100)], (0.25, 2, 11.9, 36.25, 40, 47.9), seed, ADDL=3, II=12),
        {"cl": 2.0, "v": 20.0, "omega": [0.3, 0.2], "sigma_add": 0.1, "sigma_prop": 0.1}, None),
    "oral-steady-state": (
        pk.PopulationModel(pk.OneCompartment(), ["cl", "v"], "proportional"),
        lambda seed: _design(30, [(0, 100)], (0.5, 1, 2, 4, 8, 11.9), seed, SS=1, II=12),
        {"cl": 2.0, "v": 20.0, "ka": 1.0, "omega": [0.3, 0.2], "sigma_prop": 0.1}, None),
    "iv-infusion": (
        pk.PopulationModel(pk.OneCompartment("iv"), ["cl", "v"], "proportional"),
        lambda seed: _design(24, [(0, 100)], (0.5, 1, 1.5, 3, 6, 12, 24), seed, RATE=50),
        {"cl": 2.0, "v": 20.0, "omega": [0.3, 0.2], "sigma_prop": 0.1}, None),
    "iv-2cmt": (
        pk.PopulationModel(pk.TwoCompartment("iv"), ["cl", "v1"], "proportional"),
        lambda seed: _design(30, [(0, 100)], (0.1, 0.25, 0.5, 1, 2, 4, 8, 12, 24, 48), seed),
        {"cl": 2.0, "v1": 10.0, "q": 4.0, "v2": 30.0, "omega": [0.3, 0.2], "sigma_prop": 0.1}, None),
    "iv-michaelis-menten-ode": (
        pk.PopulationModel(pk.michaelis_menten("iv"), ["vmax"], "proportional"),
        lambda seed: _design(24, [(0, 400)], (0.5, 1, 2, 4, 8, 12, 24), seed),
        {"vmax": 20.0, "km": 5.0, "v": 20.0, "omega": [0.3], "sigma_prop": 0.1}, None),
    "oral-blq": (
        pk.PopulationModel(pk.OneCompartment(), ["cl", "v"], "combined"),
        lambda seed: _design(30, [(0, 100)], ORAL_TIMES + (36, 48), seed),
        {"cl": 2.0, "v": 20.0, "ka": 1.0, "omega": [0.3, 0.2], "sigma_add": 0.05,
         "sigma_prop": 0.1}, 0.2),
}


def _one(case: str, seed: int):
    """Simulate and fit one replicate: ``(fit, typical value names, truth)``."""
    model, design, truth, lloq = CASES[case]
    data = pk.simulate_data(model, design(seed), truth, seed=seed, lloq=lloq)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = model.fit(data, "mle", init={k: v for k, v in truth.items()})
    return fit, [p for p in model.parameters], truth


def _intervals(fit, names):
    """90% Wald intervals on the log scale, ``{name: (est, se, low, high)}``."""
    table = fit.summary()
    out = {}
    for n in names:
        est, se = float(table.loc[n, "estimate"]), float(table.loc[n, "se"])
        half = Z90 * se / est
        out[n] = (est, se, est * math.exp(-half), est * math.exp(half))
    return out


def test_oral_estimates_near_truth():
    """One small oral replicate: every typical value within 4 of its own standard errors of
    the truth, with finite standard errors."""
    fit, names, truth = _one("oral-1cmt", seed=101)
    assert fit.converged and fit.covariance is not None
    for n, (est, se, _, _) in _intervals(fit, names).items():
        assert math.isfinite(se) and se > 0, n
        assert abs(est - truth[n]) < 4 * se, (n, est, se, truth[n])


def _coverage(case: str, reps: int) -> dict:
    hits, n_ok = {}, 0
    for r in range(reps):
        fit, names, truth = _one(case, seed=1000 + r)
        if fit.covariance is None:
            continue
        n_ok += 1
        for n, (_, _, lo, hi) in _intervals(fit, names).items():
            hits[n] = hits.get(n, 0) + int(lo <= truth[n] <= hi)
    return {"n": n_ok, **{k: v / max(n_ok, 1) for k, v in hits.items()}}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_wald_coverage(case):
    reps = int(os.environ.get("GENPROG_COVERAGE_REPS", "40"))
    result = _coverage(case, reps)
    n = result.pop("n")
    assert n >= 0.8 * reps, f"{case}: standard errors available in only {n}/{reps} replicates"
    sd = math.sqrt(0.9 * 0.1 / n)
    for name, cov in result.items():
        assert 0.9 - 3 * sd <= cov <= min(1.0, 0.9 + 3 * sd), (case, name, cov, n)

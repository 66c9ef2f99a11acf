"""Parameter tables in pharmacometric terms, for point (ML) and Bayesian population fits.

One row per parameter: typical values on the natural scale (lag time ``tlag`` and
bioavailability ``f`` when estimated; with ``ka_above_k`` both ``ka_minus_k`` and the
typical ``ka = ka_minus_k + CL/V``), covariate coefficients (a threshold effect's
``theta``: the relative change ``1 + theta``), IIV as omega (SD of eta on the log scale,
rows ``omega_{p}``) with %CV = 100 sqrt(exp(omega^2) - 1) and eta shrinkage = 100 (1 -
SD(EBE or posterior mean eta) / omega), correlations of a block, inter-occasion
variability (rows ``omega_iov_{p}``, %CV likewise), residual error.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from .random_effects import posterior_etas

COLUMNS = ["estimate", "se", "rse_pct", "ci_low", "ci_high", "cv_pct", "shrinkage_pct"]


def cv_percent(omega):
    """%CV of a log-normal with log-scale SD ``omega``: ``100 sqrt(exp(omega^2) - 1)``."""
    return 100.0 * np.sqrt(np.expm1(np.asarray(omega, dtype=float) ** 2))


def _scalars(pop, values: dict, batched: bool = False) -> dict:
    """Natural-scale scalars by row name (``omega_cl``, ``corr_ka_cl``, ``beta_cl_sex[1]``);
    with ``batched`` every value carries a leading draw dim."""
    rows = {}
    lead = 1 if batched else 0
    for name, v in values.items():
        v = torch.as_tensor(v)
        if name == "omega":
            for j, p in enumerate(pop.random_effects):
                rows[f"omega_{p}"] = v[..., j]
        elif name == "omega_iov":
            for j, p in enumerate(pop.iov):
                rows[f"omega_iov_{p}"] = v[..., j]
        elif name == "omega_corr":
            corr = v @ v.transpose(-1, -2)
            effects = pop.random_effects
            for a in range(len(effects)):
                for b in range(a):
                    rows[f"corr_{effects[b]}_{effects[a]}"] = corr[..., a, b]
        elif v.dim() - lead == 1:
            for j in range(v.shape[-1]):
                rows[f"{name}[{j + 1}]"] = v[..., j]
        else:
            rows[name] = v
        if name == "ka_minus_k" and "ka" not in values:
            # the typical ka of a ka_above_k model: ka_minus_k + CL/V (deterministic)
            vol = values["v"] if "v" in values else values["v1"]
            rows["ka"] = v + torch.as_tensor(values["cl"]) / torch.as_tensor(vol)
    return rows


def eta_shrinkage(pop, eta: torch.Tensor, omega: torch.Tensor) -> dict:
    """Eta shrinkage per random effect, ``1 - SD(eta_i) / omega`` (NONMEM's SD form), from the
    EBEs or posterior-mean etas ``eta [S, P]`` and ``omega [P]``; ``{"omega_<name>": percent}``."""
    if eta is None or eta.shape[-1] == 0:
        return {}
    sd = eta.double().std(0, unbiased=True)
    return {f"omega_{p}": float(100.0 * (1 - sd[j] / omega[j])) for j, p in enumerate(pop.random_effects)}


def population_summary(fit) -> pd.DataFrame:
    """Table for a :class:`~genprog.pk.estimation.PopulationFit` (ML): estimates with
    asymptotic SEs (delta method), 95% Wald intervals (log-scale for positive
    parameters), %CV and shrinkage. ``attrs`` hold -2LL, OFV, AIC, BIC."""
    pop = fit.population
    layout_obj = _objective(fit)
    phi = fit.phi.detach()
    fixed = set(_scalars(pop, getattr(fit, "fixed", None) or {}))

    def natural(x):
        vals = layout_obj.unpack(x)
        return torch.stack([v.reshape(()) for v in _scalars(pop, vals).values()])

    names = list(_scalars(pop, layout_obj.unpack(phi)).keys())
    est = natural(phi)
    se = torch.full_like(est, float("nan"))
    if fit.covariance is not None:
        J = torch.autograd.functional.jacobian(natural, phi)
        se = torch.sqrt(torch.clamp(torch.einsum("ik,kl,il->i", J, fit.covariance, J), min=0))
    df = pd.DataFrame(index=pd.Index(names, name="parameter"), columns=COLUMNS, dtype=float)
    omega = fit.estimates.get("omega")
    shrink = eta_shrinkage(pop, fit.eta, omega) if omega is not None else {}
    for i, n in enumerate(names):
        e, s = float(est[i]), float(se[i])
        if n in fixed:
            s = float("nan")  # held fixed, not estimated
        positive = not n.startswith(("beta_", "corr_"))
        if positive and e > 0 and math.isfinite(s):
            # log-normal interval; an SE far above the estimate (poorly identified) gives inf
            z = min(1.96 * s / e, 700.0)
            lo, hi = e * math.exp(-z), e * math.exp(z)
        else:
            lo, hi = e - 1.96 * s, e + 1.96 * s
        df.loc[n] = [e, s, 100 * s / abs(e) if e else float("nan"), lo, hi,
                     float(cv_percent(e)) if n.startswith("omega_") else float("nan"),
                     shrink.get(n, float("nan"))]
    df.attrs.update({"-2LL": fit.minus2ll, "OFV": fit.ofv, "AIC": fit.aic, "BIC": fit.bic,
                     "n_obs": fit.n_obs, "n_params": fit.n_params, "method": fit.method})
    return df


def _objective(fit):
    return fit.objective().layout


def bayesian_summary(fit, pop, prob: float = 0.95) -> pd.DataFrame:
    """Table for a Bayesian population fit (a :class:`genprog.Fit`): posterior mean, SD,
    median and central ``prob`` interval per parameter; %CV of omegas (posterior mean of
    the %CV); shrinkage from the posterior-mean etas. ``attrs`` hold LOO (elpd, se)."""
    draws = {k: v.detach().double().reshape(-1, *v.shape[2:]) for k, v in fit.draws.items()}
    sites = [n for n in pop.default_priors(fit.dataset)]
    values = {k: draws[k] for k in sites if k in draws}
    if pop.ka_above_k and "ka" in draws:
        # the deterministic typical ka, next to ka_minus_k
        values = {k2: v2 for k, v in values.items()
                  for k2, v2 in ([(k, v), ("ka", draws["ka"])] if k == "ka_minus_k" else [(k, v)])}
    rows = _scalars(pop, values, batched=True)
    q = (1 - prob) / 2
    df = pd.DataFrame(index=pd.Index(list(rows), name="parameter"),
                      columns=["mean", "sd", "median", "ci_low", "ci_high", "cv_pct", "shrinkage_pct"],
                      dtype=float)
    shrink = {}
    eta = posterior_etas(pop, draws)  # [n, S, P]
    if eta is not None and "omega" in values:
        shrink = eta_shrinkage(pop, eta.mean(0), values["omega"].mean(0))
    for n, v in rows.items():
        v = v.reshape(-1)
        cv = cv_percent(v.numpy()).mean() if n.startswith("omega_") else float("nan")
        df.loc[n] = [float(v.mean()), float(v.std()), float(v.median()), float(v.quantile(q)),
                     float(v.quantile(1 - q)), cv, shrink.get(n, float("nan"))]
    df.attrs["method"] = fit.method
    if fit.num_draws > 1:
        import warnings

        import arviz as az

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loo = az.loo(fit.to_arviz())
        df.attrs.update({"elpd_loo": float(loo.elpd_loo), "elpd_loo_se": float(loo.se),
                         "p_loo": float(loo.p_loo)})
    return df

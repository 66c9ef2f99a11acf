"""Model diagnostics for population PK fits: residuals, goodness-of-fit plots, visual
predictive checks (VPC) and eta shrinkage.

Every function takes a fitted population model: a point fit
(:class:`~genprog.pk.estimation.PopulationFit`, ``method="mle"``) or, for
:func:`residuals`, :func:`plot_gof` and :func:`shrinkage`, a Bayesian fit
(:class:`~genprog.pk.population.PopulationBayesFit`), which is summarised by a point:
posterior medians of the population parameters (the posterior mean correlation matrix of
an omega block) and posterior-mean etas. Simulation (:func:`simulate`, :func:`vpc`) needs
a point fit.

Residuals (one row per observation the model describes; BLQ observations are left out):

* ``RES = DV - PRED`` and ``IRES = DV - IPRED``, with ``PRED`` the typical-subject
  prediction (eta = 0) and ``IPRED`` the prediction at the subject's etas (EBEs);
* ``IWRES = (DV - IPRED) / sd(IPRED)``, ``sd`` the residual-error SD of the model's error
  model at ``IPRED`` (for the exponential error model on the log scale,
  ``(log DV - log IPRED) / sigma_exp``);
* ``CWRES``: conditional weighted residuals (Hooker, Staatz & Karlsson 2007, *Pharm Res*
  24:2187), from the model linearised in eta around the EBEs, with the residual variance
  at ``IPRED`` (the "interaction" form NONMEM calls CWRESI, matching the FOCE-I-like
  estimation of :func:`~genprog.pk.estimation.fit_mle`): per subject
  ``E[y] = f(eta_hat) - J eta_hat``, ``Cov[y] = J Omega J^T + diag(sd(IPRED)^2)``,
  ``J = df/deta`` at ``eta_hat``, and ``CWRES = Cov^{-1/2} (y - E[y])`` with the
  symmetric inverse square root (so the values do not depend on the order of a subject's
  observations). Exponential error: the same on the log scale.

Where the model's residual SD is zero (proportional error at a zero prediction, e.g. a
pre-dose sample of an oral model) the weighted residuals ``IWRES`` and ``CWRES`` are
undefined and reported as NaN; so are they for ``DV <= 0`` under the exponential error
model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .estimation import LaplaceObjective, PopulationFit
from .summary import _shrinkage

__all__ = ["plot_gof", "residuals", "shrinkage", "simulate", "vpc", "vpc_table"]


# ----------------------------------------------------------------------------- point values


_SD_FLOOR = 1e-9  # the likelihood's floor on the residual SD (estimation.LaplaceObjective)


def _is_bayes(fit) -> bool:
    return hasattr(fit, "draws") and getattr(fit, "population", None) is not None


def _flat_draws(fit) -> dict:
    """Bayesian draws ``[chain, draw, ...] -> [n, ...]`` in float64, plus sites the fit
    held fixed."""
    draws = {k: v.detach().double().reshape(-1, *v.shape[2:]) for k, v in fit.draws.items()}
    n = next(iter(draws.values())).shape[0]
    fixed = getattr(getattr(fit, "model", None), "fixed", None) or {}
    for k, v in fixed.items():
        draws.setdefault(k, torch.as_tensor(v).double().expand(n, *torch.as_tensor(v).shape))
    return draws


def _bayes_eta(pop, draws) -> torch.Tensor | None:
    """Etas per draw ``[n, S, P]`` from ``eta_raw`` (non-centred), as the model builds them."""
    from .population import posterior_etas

    return posterior_etas(pop, draws)


def _point(fit):
    """``(population, data, values, eta)`` of a point or Bayesian population fit, all in
    float64: ``values`` are population parameters by site (natural scale), ``eta`` the
    subjects' random effects ``[S, P]`` (EBEs, or posterior means)."""
    if isinstance(fit, PopulationFit):
        data = fit.data.to(dtype=torch.float64)
        values = {k: torch.as_tensor(v).detach().double() for k, v in fit.estimates.items()}
        return fit.population, data, values, fit.eta.detach().double()
    if _is_bayes(fit):
        pop = fit.population
        data = (fit.dataset if fit.dataset is not None else fit.model.dataset).to(dtype=torch.float64)
        draws = _flat_draws(fit)
        sites = list(pop.priors_for(data))
        missing = [s for s in sites if s not in draws]
        if missing:
            raise ValueError(f"diagnostics: the fit has no draws of site(s) {missing}")
        values = {}
        for s in sites:
            if s == "omega_corr":
                corr = draws[s] @ draws[s].transpose(-1, -2)
                values[s] = torch.linalg.cholesky(corr.mean(0))
            else:
                values[s] = draws[s].median(0).values
        eta = _bayes_eta(pop, draws)
        eta = eta.mean(0) if eta is not None else torch.zeros(
            data.n_subjects, 0, dtype=torch.float64, device=data.obs_dv.device)
        return pop, data, values, eta
    raise TypeError(f"expected a population fit (pk.PopulationModel(...).fit(data, method)), "
                    f"got {type(fit).__name__}")


def _objective(pop, data) -> LaplaceObjective:
    return LaplaceObjective(pop, data, pop.priors_for(data))


# ----------------------------------------------------------------------------- residuals


def _inverse_sqrt(cov: torch.Tensor) -> torch.Tensor:
    """Symmetric inverse square root of SPD matrices ``[..., n, n]``."""
    lam, q = torch.linalg.eigh(cov)
    return (q * lam.clamp_min(1e-300).rsqrt()[..., None, :]) @ q.transpose(-1, -2)


def _cwres(obj: LaplaceObjective, values, eta, observed, dv, log_scale: bool) -> torch.Tensor:
    """Conditional weighted residuals ``[S, T]`` (0 where not observed); see the module
    docstring."""
    _, _, sigma = obj.split(values)
    S, T = dv.shape
    with torch.enable_grad():
        e = eta.detach().clone().requires_grad_(obj.P > 0)
        _, f = obj.conditional(values, e if obj.P else None)
        h = torch.log(f.clamp_min(1e-300)) if log_scale else f
        if obj.P:
            # pred[s, t] depends on eta[s] only: one backward pass per time slot gives
            # J[:, t, :] for every subject at once.
            J = torch.stack([torch.autograd.grad(h[:, t].sum(), e, retain_graph=True)[0]
                             for t in range(T)], 1)  # [S, T, P]
        else:
            J = torch.zeros(S, T, 0, dtype=dv.dtype, device=dv.device)
    h, f = h.detach(), f.detach()
    var = obj.pop.residual_sd(f, sigma).clamp_min(_SD_FLOOR) ** 2
    y = torch.log(dv.clamp_min(1e-300)) if log_scale else dv
    m = observed.to(dv.dtype)
    mean = h - (J @ eta[..., None]).squeeze(-1) if obj.P else h
    L = obj.scale_tril(values) if obj.P else torch.zeros(0, 0, dtype=dv.dtype, device=dv.device)
    JL = J @ L  # [S, T, P]
    cov = JL @ JL.transpose(-1, -2) + torch.diag_embed(var)
    # unobserved slots: decoupled unit-variance entries with zero residual
    cov = cov * (m[:, :, None] * m[:, None, :]) + torch.diag_embed(1 - m)
    r = torch.where(observed, y - mean, torch.zeros_like(y))
    return (_inverse_sqrt(cov) @ r[..., None]).squeeze(-1)


def residuals(fit) -> pd.DataFrame:
    """Predictions and residuals, one row per observation.

    Parameters
    ----------
    fit : PopulationFit or PopulationBayesFit
        A fitted population model (a Bayesian fit is summarised by posterior medians and
        posterior-mean etas; see the module docstring).

    Returns
    -------
    pandas.DataFrame
        Columns ``ID, TIME, DV, PRED, IPRED, RES, IRES, IWRES, CWRES`` (definitions in the
        module docstring), rows in data order (subject, then time). Observations below the
        limit of quantification and those of other observation types (DVID) are left out.

    Examples
    --------
    >>> from genprog import pk
    >>> data = pk.read_nonmem(pk.dataset_path("theo_sd"))
    >>> fit = pk.PopulationModel(pk.OneCompartment(), ["cl", "v"], "proportional").fit(
    ...     data, "mle", standard_errors=False)
    >>> table = residuals(fit)
    >>> len(table), list(table.columns[:5])
    (132, ['ID', 'TIME', 'DV', 'PRED', 'IPRED'])
    """
    pop, data, values, eta = _point(fit)
    obj = _objective(pop, data)
    observed = pop.observation_mask(data) & ~data.obs_blq
    _, _, sigma = obj.split(values)
    with torch.no_grad():
        _, pred = obj.conditional(values, torch.zeros_like(eta) if obj.P else None)
        _, ipred = obj.conditional(values, eta if obj.P else None)
        sd_i = pop.residual_sd(ipred, sigma)
    # where the model's residual SD vanishes (proportional error at a zero prediction,
    # e.g. a pre-dose sample) a weighted residual is undefined: NaN, and the observation
    # is left out of its subject's CWRES decorrelation
    defined = sd_i >= _SD_FLOOR
    sd_i = sd_i.clamp_min(_SD_FLOOR)
    dv = data.obs_dv
    log_scale = pop.error == "exponential"
    if log_scale:
        defined = defined & (dv > 0) & (ipred > 0)  # log DV undefined
        iwres = (torch.log(dv.clamp_min(1e-300)) - torch.log(ipred.clamp_min(1e-300))) / sd_i
    else:
        iwres = (dv - ipred) / sd_i
    iwres = torch.where(defined, iwres, torch.full_like(iwres, float("nan")))
    cwres = _cwres(obj, values, eta, observed & defined, dv, log_scale)
    cwres = torch.where(defined, cwres, torch.full_like(cwres, float("nan")))
    S, T = dv.shape
    ids = np.repeat(np.asarray(data.ids, dtype=object), T).reshape(S, T)
    keep = observed.cpu().numpy()

    def col(x):
        return x.detach().cpu().numpy()[keep]

    dv_n, pred_n, ipred_n = col(dv), col(pred), col(ipred)
    return pd.DataFrame({
        "ID": ids[keep], "TIME": col(data.obs_time), "DV": dv_n, "PRED": pred_n,
        "IPRED": ipred_n, "RES": dv_n - pred_n, "IRES": dv_n - ipred_n, "IWRES": col(iwres),
        "CWRES": col(cwres),
    })


def shrinkage(fit) -> pd.Series:
    """Eta shrinkage per random effect, in percent: ``100 (1 - SD(eta_i) / omega)`` with
    the EBEs (point fit) or posterior-mean etas and posterior-mean omega (Bayesian fit),
    the same numbers as the ``shrinkage_pct`` column of ``fit.summary()``.

    Returns
    -------
    pandas.Series
        Indexed by the summary's row names (``omega_ka``, ``omega_cl``, ...); empty for a
        model without random effects.
    """
    if isinstance(fit, PopulationFit):
        omega = fit.estimates.get("omega")
        values = _shrinkage(fit.population, fit.eta, omega) if omega is not None else {}
    elif _is_bayes(fit):
        draws = _flat_draws(fit)
        eta = _bayes_eta(fit.population, draws)
        values = _shrinkage(fit.population, eta.mean(0), draws["omega"].mean(0)) if eta is not None else {}
    else:
        raise TypeError(f"shrinkage: expected a population fit, got {type(fit).__name__}")
    return pd.Series(values, dtype=float, name="shrinkage_pct").rename_axis("parameter")


# ----------------------------------------------------------------------------- GOF


def _figure(**kwargs):
    # A bare Figure (no pyplot): no global figure registry, nothing to close.
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def plot_gof(fit, log: bool = False, figsize=(9.0, 8.0)):
    """Standard 2 x 2 goodness-of-fit panel.

    DV vs PRED and DV vs IPRED (with the identity line), IWRES vs TIME and IWRES vs
    IPRED (with zero and +-2 lines), from :func:`residuals`.

    Parameters
    ----------
    fit : PopulationFit or PopulationBayesFit
    log : bool
        Logarithmic concentration axes (non-positive values are left out).
    figsize : tuple

    Returns
    -------
    matplotlib.figure.Figure
        Four axes; ``fig.savefig("gof.png")`` writes it.
    """
    table = residuals(fit)
    fig = _figure(figsize=figsize)
    axes = fig.subplots(2, 2)
    dv, pred, ipred = table["DV"].to_numpy(), table["PRED"].to_numpy(), table["IPRED"].to_numpy()
    t, iwres = table["TIME"].to_numpy(), table["IWRES"].to_numpy()
    point = {"s": 14, "alpha": 0.6, "color": "tab:blue", "edgecolors": "none"}
    for ax, x, name in ((axes[0, 0], pred, "PRED"), (axes[0, 1], ipred, "IPRED")):
        keep = (x > 0) & (dv > 0) if log else np.isfinite(x) & np.isfinite(dv)
        ax.scatter(x[keep], dv[keep], **point)
        both = np.concatenate([x[keep], dv[keep]])
        lo, hi = (both.min(), both.max()) if both.size else (0.0, 1.0)
        ax.plot([lo, hi], [lo, hi], color="black", lw=1)
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(f"{name} (population)" if name == "PRED" else f"{name} (individual)")
        ax.set_ylabel("DV (observed)")
        ax.set_title(f"DV vs {name}")
    keep = np.isfinite(iwres)
    axes[1, 0].scatter(t[keep], iwres[keep], **point)
    axes[1, 0].set_xlabel("TIME")
    axes[1, 0].set_title("IWRES vs TIME")
    keep = np.isfinite(iwres) & ((ipred > 0) if log else np.isfinite(ipred))
    axes[1, 1].scatter(ipred[keep], iwres[keep], **point)
    if log:
        axes[1, 1].set_xscale("log")
    axes[1, 1].set_xlabel("IPRED (individual)")
    axes[1, 1].set_title("IWRES vs IPRED")
    for ax in axes[1]:
        ax.axhline(0.0, color="black", lw=1)
        for y in (-2.0, 2.0):
            ax.axhline(y, color="gray", lw=0.8, ls="--")
        ax.set_ylabel("IWRES")
    pop = fit.population
    fig.suptitle(f"Goodness of fit: {_describe_model(pop)}, {getattr(fit, 'method', '')}")
    return fig


def _describe_model(pop) -> str:
    s = pop.structure
    n = getattr(s, "n", None)
    name = {1: "1-cmt", 2: "2-cmt", 3: "3-cmt"}.get(n, type(s).__name__)
    absorption = getattr(s, "absorption", None)
    return f"{name}{' ' + absorption if absorption else ''}, {pop.error} error"


# ----------------------------------------------------------------------------- simulation


def simulate(fit, n_sim: int = 200, seed: int = 0) -> torch.Tensor:
    """Replicate data sets from a fitted model at the data's design.

    For each replicate, new etas ``~ MVN(0, Omega)`` per subject and new residual errors
    from the model's error model, at the estimated population parameters; all replicates
    and subjects at once (vectorised).

    Parameters
    ----------
    fit : PopulationFit
        A point fit (``method="mle"``).
    n_sim : int
        Number of replicates.
    seed : int
        Seed of the simulation's own generator (torch's global RNG is left untouched).

    Returns
    -------
    Tensor [n_sim, S, T]
        Simulated DV at every observation slot of the data (padding slots hold values too;
        mask them with ``fit.population.observation_mask(fit.data)``), float64 on the
        data's device. No censoring is applied.
    """
    if not isinstance(fit, PopulationFit):
        raise TypeError(f"simulate/vpc: need a point fit (method='mle'), got {type(fit).__name__}; "
                        "for a Bayesian fit use fit.predict()")
    if not isinstance(n_sim, int) or isinstance(n_sim, bool) or n_sim < 1:
        raise ValueError(f"n_sim must be a positive integer, got {n_sim!r}")
    pop, data, values, _ = _point(fit)
    obj = _objective(pop, data)
    typical, betas, sigma = obj.split(values)
    S, T = data.obs_dv.shape
    device, dtype = data.obs_dv.device, data.obs_dv.dtype
    gen = torch.Generator(device=device).manual_seed(int(seed))
    z = torch.randn(n_sim, S, obj.P, generator=gen, device=device, dtype=dtype)
    eps = torch.randn(n_sim, S, T, generator=gen, device=device, dtype=dtype)
    D = max(int(data.dose_time.shape[-1]), 1)
    chunk = max(1, int(2e7 // (S * T * D)))
    out = []
    with torch.no_grad():
        L = obj.scale_tril(values) if obj.P else None
        for start in range(0, n_sim, chunk):
            zc = z[start:start + chunk]
            eta = zc @ L.transpose(-1, -2) if obj.P else None
            ind = pop.individual_parameters(typical, betas, eta, data)
            ind = {k: v.expand(zc.shape[0], S) for k, v in ind.items()}
            conc = pop.structure.concentration(ind, data)  # [n, S, T]
            sd = pop.residual_sd(conc, sigma)
            e = eps[start:start + chunk]
            out.append(conc * torch.exp(sd * e) if pop.error == "exponential" else conc + sd * e)
    return torch.cat(out, 0)


def _bin_edges(t: np.ndarray, bins) -> np.ndarray:
    """Bin edges over observation times ``t``: an int (that many quantile bins), a
    sequence (the edges), or None (quantile bins, at most 10). Quantile edges are moved
    to the largest relative gap between consecutive distinct times within half a bin of
    the quantile, so clusters of similar (nominal) times stay in one bin."""
    if bins is not None and not isinstance(bins, (int, np.integer)):
        edges = np.asarray(bins, dtype=float)
        if edges.ndim != 1 or edges.size < 2 or not np.all(np.diff(edges) > 0):
            raise ValueError(f"bins: expected increasing edges (at least 2), got {bins!r}")
        return edges
    times = np.unique(t)
    n_bins = min(10, times.size) if bins is None else int(bins)
    if n_bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins!r}")
    n_bins = min(n_bins, times.size)
    if times.size == 1 or n_bins == 1:
        return np.array([times[0], times[-1]])
    ts = np.sort(t)
    # candidate cuts between consecutive distinct times, with the share of obs below them
    below = np.searchsorted(ts, times[1:], side="left") / ts.size
    rel_gap = (times[1:] - times[:-1]) / (np.abs(times[1:]) + np.abs(times[:-1]) + 1e-12)
    mids = 0.5 * (times[1:] + times[:-1])
    cuts = []
    for k in range(1, n_bins):
        target = k / n_bins
        near = np.abs(below - target) <= 0.5 / n_bins
        if not near.any():
            near = np.abs(below - target) == np.abs(below - target).min()
        j = np.flatnonzero(near)[np.argmax(rel_gap[near])]
        cuts.append(mids[j])
    return np.unique(np.concatenate([[times[0]], cuts, [times[-1]]]))


def _assign(t: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index per time (right-open bins, the last one closed); -1 outside the edges."""
    idx = np.searchsorted(edges, t, side="right") - 1
    idx[t == edges[-1]] = edges.size - 2
    idx[(t < edges[0]) | (t > edges[-1])] = -1
    return idx


def _label(q: float) -> str:
    return f"p{100 * q:g}".replace(".", "_")


def vpc_table(fit, n_sim: int = 200, bins=None, pi=(0.05, 0.5, 0.95), ci: float = 0.95,
              seed: int = 0, prediction_corrected: bool = False) -> pd.DataFrame:
    """The numbers of a visual predictive check, one row per time bin.

    Parameters
    ----------
    fit : PopulationFit
    n_sim : int
        Replicate data sets simulated at the data's design (:func:`simulate`).
    bins : None, int or sequence
        None: quantile bins (at most 10) with edges moved into gaps between clusters of
        observation times; an int: that many such bins; a sequence: the bin edges.
    pi : sequence of float
        Percentiles (as fractions) compared, e.g. ``(0.05, 0.5, 0.95)``.
    ci : float
        Coverage of the band around each simulated percentile.
    seed : int
    prediction_corrected : bool
        Prediction-corrected VPC (Bergstrand et al. 2011): observed and simulated values
        are multiplied by ``median(PRED in bin) / PRED``; observations whose PRED is not
        positive are left out.

    Returns
    -------
    pandas.DataFrame
        Columns ``bin, time`` (median observation time in the bin), ``time_low,
        time_high`` (edges), ``n_obs``; per percentile ``q`` labelled ``pX`` (``p5``,
        ``p50``, ``p95``): ``obs_pX`` (observed), ``sim_pX`` (median over replicates of the
        simulated percentile), ``sim_pX_low, sim_pX_high`` (its central ``ci`` interval);
        ``n_below, n_above``: observations below the lowest / above the highest
        ``sim_pX``. BLQ observations are left out of observed and simulated data alike.
        ``attrs`` hold ``n_sim, pi, ci, seed, edges, prediction_corrected``.
    """
    return _vpc(fit, n_sim, bins, pi, ci, seed, prediction_corrected)[0]


def _vpc(fit, n_sim, bins, pi, ci, seed, prediction_corrected):
    """The VPC table and the observations as plotted (TIME, DV, bin)."""
    pi = tuple(float(q) for q in pi)
    if not pi or any(not 0 < q < 1 for q in pi) or list(pi) != sorted(pi):
        raise ValueError(f"pi: expected increasing fractions in (0, 1), got {pi!r}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci!r}")
    sims = simulate(fit, n_sim, seed)
    pop = fit.population
    data = fit.data.to(dtype=torch.float64)
    observed = (pop.observation_mask(data) & ~data.obs_blq).to(sims.device)
    t = data.obs_time[observed].cpu().numpy()
    dv = data.obs_dv[observed].cpu().numpy()
    sim = sims[:, observed].cpu().numpy()  # [n_sim, N]
    edges = _bin_edges(t, bins)
    idx = _assign(t, edges)
    if prediction_corrected:
        pred, _ = fit.predictions()
        pred = pred.double()[observed.to(pred.device)].cpu().numpy()
        ok = pred > 0
        factor = np.full_like(pred, np.nan)
        for b in range(edges.size - 1):
            sel = (idx == b) & ok
            if sel.any():
                factor[sel] = np.median(pred[sel]) / pred[sel]
        dv, sim = dv * factor, sim * factor
        idx = np.where(ok, idx, -1)
    labels = [_label(q) for q in pi]
    lo_q, hi_q = (1 - ci) / 2, 1 - (1 - ci) / 2
    rows = []
    for b in range(edges.size - 1):
        sel = idx == b
        row = {"bin": b, "time": float(np.median(t[sel])) if sel.any() else float("nan"),
               "time_low": float(edges[b]), "time_high": float(edges[b + 1]),
               "n_obs": int(sel.sum())}
        if sel.any():
            obs_q = np.quantile(dv[sel], pi)
            sim_q = np.quantile(sim[:, sel], pi, axis=1)  # [Q, n_sim]
            mid = np.median(sim_q, axis=1)
            band = np.quantile(sim_q, [lo_q, hi_q], axis=1)
            for j, lab in enumerate(labels):
                row[f"obs_{lab}"] = float(obs_q[j])
                row[f"sim_{lab}"] = float(mid[j])
                row[f"sim_{lab}_low"] = float(band[0, j])
                row[f"sim_{lab}_high"] = float(band[1, j])
            row["n_below"] = int((dv[sel] < mid[0]).sum())
            row["n_above"] = int((dv[sel] > mid[-1]).sum())
        else:
            row["n_below"] = row["n_above"] = 0
        rows.append(row)
    columns = ["bin", "time", "time_low", "time_high", "n_obs"]
    for lab in labels:
        columns += [f"obs_{lab}", f"sim_{lab}", f"sim_{lab}_low", f"sim_{lab}_high"]
    columns += ["n_below", "n_above"]
    table = pd.DataFrame(rows).reindex(columns=columns)
    table = table[table["n_obs"] > 0].reset_index(drop=True)
    table.attrs.update({"n_sim": n_sim, "pi": pi, "ci": ci, "seed": seed,
                        "edges": edges.tolist(), "prediction_corrected": prediction_corrected})
    return table, pd.DataFrame({"TIME": t, "DV": dv, "bin": idx})


def vpc(fit, n_sim: int = 200, bins=None, pi=(0.05, 0.5, 0.95), ci: float = 0.95,
        seed: int = 0, *, prediction_corrected: bool = False, log: bool = False,
        figsize=(8.0, 5.5)):
    """Visual predictive check: observed data and percentiles against the model's
    simulated percentiles.

    Parameters are those of :func:`vpc_table`, plus ``log`` (logarithmic concentration
    axis) and ``figsize``.

    Returns
    -------
    matplotlib.figure.Figure
        Observed points; observed percentile lines (median solid, outer dashed); shaded
        ``ci`` bands of the simulated percentiles (median red, outer blue), drawn over
        the bins' median times; bin edges as ticks along the time axis. The table is in
        ``fig.vpc_table``.
    """
    table, pts = _vpc(fit, n_sim, bins, pi, ci, seed, prediction_corrected)
    fig = _figure(figsize=figsize)
    ax = fig.subplots()
    keep = (pts["bin"] >= 0) & ((pts["DV"] > 0) if log else np.isfinite(pts["DV"]))
    ax.scatter(pts["TIME"][keep], pts["DV"][keep], s=10, color="0.55", alpha=0.6,
               edgecolors="none", label="observed")
    x = table["time"].to_numpy()
    labels = [_label(q) for q in table.attrs["pi"]]
    middle = len(labels) // 2 if len(labels) % 2 else None
    outer = " / ".join(f"{100 * q:g}" for j, q in enumerate(table.attrs["pi"]) if j != middle)
    labelled = set()
    for j, (q, lab) in enumerate(zip(table.attrs["pi"], labels)):
        is_mid = j == middle
        color = "tab:red" if is_mid else "tab:blue"
        low, high = table[f"sim_{lab}_low"].to_numpy(), table[f"sim_{lab}_high"].to_numpy()
        if log:
            low = np.where(low > 0, low, np.nan)
        what = f"{100 * q:g}th" if is_mid else f"{outer}th"
        first = is_mid or "outer" not in labelled
        labelled.add("mid" if is_mid else "outer")
        ax.fill_between(x, low, high, color=color, alpha=0.25, lw=0,
                        label=f"simulated {what} pct, {100 * ci:g}% CI" if first else None)
        obs = table[f"obs_{lab}"].to_numpy()
        ax.plot(x, np.where(obs > 0, obs, np.nan) if log else obs, color="black" if is_mid else "tab:blue",
                lw=1.6 if is_mid else 1.2, ls="-" if is_mid else "--",
                label=f"observed {what} pct" if first else None)
    for e in table.attrs["edges"]:
        ax.axvline(e, ymax=0.02, color="black", lw=0.8)
    if log:
        ax.set_yscale("log")
    pc = "prediction-corrected " if prediction_corrected else ""
    ax.set_xlabel("TIME")
    ax.set_ylabel(f"{pc}DV" if pc else "DV")
    ax.set_title(f"{pc}VPC ({_describe_model(fit.population)}), {n_sim} replicates")
    ax.legend(fontsize=7, loc="best")
    fig.vpc_table = table
    return fig

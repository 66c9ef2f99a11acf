"""Model diagnostics for population PK fits: residuals, goodness-of-fit plots, visual
predictive checks (VPC), normalised prediction distribution errors (NPDE), individual fit
plots and eta shrinkage.

Every function takes a fitted population model: a point fit
(:class:`~genprog.pk.estimation.PopulationFit`, ``method="mle"``) or a Bayesian fit
(:class:`~genprog.pk.population.PopulationBayesFit`). For residuals, predictions and
shrinkage a Bayesian fit is summarised by a point: posterior medians of the population
parameters (the posterior mean correlation matrix of an omega block) and posterior-mean
etas. Simulation (:func:`simulate`, hence :func:`vpc` and :func:`npde`) uses the point
estimate of a point fit and a random posterior draw per replicate of a Bayesian fit.

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

from ..validation import check_int
from .estimation import LaplaceObjective
from .population_fit import eta_and_omega, fit_data, fit_point, laplace_objective
from .simulation import percentile_label, simulate
from .summary import eta_shrinkage

_label = percentile_label  # the VPC table's column name of a percentile (tests read it)

__all__ = ["individual_curves", "npde", "npde_tests", "plot_gof", "plot_individual", "plot_npde",
           "residuals", "shrinkage", "simulate", "vpc", "vpc_table"]


# ----------------------------------------------------------------------------- point values


_SD_FLOOR = 1e-9  # the likelihood's floor on the residual SD (estimation.LaplaceObjective)


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


def _predictions(fit):
    """``PRED`` and ``IPRED`` ``[S, T]`` (float64) at the fit's point."""
    pop, data, values, eta = fit_point(fit)
    obj = laplace_objective(pop, data)
    with torch.no_grad():
        _, pred = obj.conditional(values, torch.zeros_like(eta) if obj.P else None)
        _, ipred = obj.conditional(values, eta if obj.P else None)
    return pred, ipred


def residuals(fit, *, npde: bool = False, n_sim: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Predictions and residuals, one row per observation.

    Parameters
    ----------
    fit : PopulationFit or PopulationBayesFit
        A fitted population model (a Bayesian fit is summarised by posterior medians and
        posterior-mean etas; see the module docstring).
    npde : bool
        Add the column ``NPDE`` (:func:`npde`, from ``n_sim`` replicates simulated with
        ``seed``); off by default, as it simulates.
    n_sim, seed : int
        For ``npde``.

    Returns
    -------
    pandas.DataFrame
        Columns ``ID, TIME, DV, PRED, IPRED, RES, IRES, IWRES, CWRES`` (definitions in the
        module docstring; ``NPDE`` last when asked for), rows in data order (subject, then
        time). Observations below the limit of quantification and those of other
        observation types (DVID) are left out.

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
    pop, data, values, eta = fit_point(fit)
    obj = laplace_objective(pop, data)
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
    table = pd.DataFrame({
        "ID": ids[keep], "TIME": col(data.obs_time), "DV": dv_n, "PRED": pred_n,
        "IPRED": ipred_n, "RES": dv_n - pred_n, "IRES": dv_n - ipred_n, "IWRES": col(iwres),
        "CWRES": col(cwres),
    })
    if npde:
        table["NPDE"] = _npde_table(fit, n_sim, seed)["NPDE"].to_numpy()
    return table


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
    pop, eta, omega = eta_and_omega(fit)
    values = eta_shrinkage(pop, eta, omega) if omega is not None and eta is not None else {}
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


# ----------------------------------------------------------------------------- NPDE


def npde(fit, n_sim: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Normalised prediction distribution errors (Brendel et al. 2006, *Pharm Res*
    23:2036; Comets, Brendel & Mentre 2008, *Comput Methods Programs Biomed* 90:154).

    ``n_sim`` replicate data sets are simulated at the data's design (:func:`simulate`:
    the point estimate, or posterior draws for a Bayesian fit). Per subject ``i`` with
    observations ``y_i``, the simulations give the mean ``E_i`` and covariance ``V_i``;
    with ``V_i = L_i L_i^T`` (Cholesky, observations in time order) observed and simulated
    vectors are decorrelated, ``y*_i = L_i^{-1} (y_i - E_i)`` and likewise each simulated
    ``y*_ik``; ``pde_ij`` is the share of simulated ``y*_ikj`` below ``y*_ij``, moved to
    ``1/(2K)`` and ``1 - 1/(2K)`` when it is 0 or 1 (``K = n_sim``), and
    ``npde_ij = Phi^{-1}(pde_ij)``. Under the model, NPDE are N(0, 1) and independent.
    Exponential error: on the log scale. BLQ observations and other observation types
    are left out; an observation whose simulated values have no spread (proportional
    error at a zero prediction) gets NaN.

    Parameters
    ----------
    fit : PopulationFit or PopulationBayesFit
    n_sim : int
        Replicates ``K`` (Comets et al. recommend at least 1000).
    seed : int

    Returns
    -------
    pandas.DataFrame
        Columns ``ID, TIME, DV, EPRED`` (mean of the simulations), ``PDE, NPDE``, rows as
        in :func:`residuals`. ``attrs``: ``n_sim``, ``seed``, and :func:`npde_tests` of the
        column (``mean``, ``variance``, ``p_mean`` (t test), ``p_variance`` (Fisher's
        chi-square), ``p_normal`` (Shapiro-Wilk), ``p_global`` (Bonferroni)).

    Examples
    --------
    >>> from genprog import pk
    >>> data = pk.read_nonmem(pk.dataset_path("theo_sd"))
    >>> fit = pk.PopulationModel(pk.OneCompartment(), ["cl", "v"], "proportional").fit(
    ...     data, "mle", standard_errors=False)
    >>> table = npde(fit, n_sim=200)
    >>> list(table.columns)
    ['ID', 'TIME', 'DV', 'EPRED', 'PDE', 'NPDE']
    """
    check_int("n_sim", n_sim)
    if n_sim < 2:
        raise ValueError("npde: n_sim must be at least 2")
    sims = simulate(fit, n_sim, seed)
    pop, data, _, _ = fit_point(fit)
    observed = (pop.observation_mask(data) & ~data.obs_blq).to(sims.device)
    dv = data.obs_dv.to(sims.device)
    if pop.error == "exponential":
        sims, dv = torch.log(sims.clamp_min(1e-300)), torch.log(dv.clamp_min(1e-300))
    epred, pde = _pde(dv, sims, observed)
    npde_ = torch.special.ndtri(pde)
    S, T = dv.shape
    ids = np.repeat(np.asarray(data.ids, dtype=object), T).reshape(S, T)
    keep = observed.cpu().numpy()
    if pop.error == "exponential":
        epred = torch.exp(epred)

    def col(x):
        return x.detach().cpu().numpy()[keep]

    table = pd.DataFrame({"ID": ids[keep], "TIME": col(data.obs_time), "DV": col(data.obs_dv),
                          "EPRED": col(epred), "PDE": col(pde), "NPDE": col(npde_)})
    table.attrs.update({"n_sim": n_sim, "seed": seed, **npde_tests(table["NPDE"])})
    return table


_npde_table = npde  # residuals(npde=...) shadows the name


def _pde(y: torch.Tensor, sims: torch.Tensor, observed: torch.Tensor):
    """Mean of the simulations ``[S, T]`` and decorrelated prediction discrepancies
    ``[S, T]`` (NaN where not observed or the simulations have no spread)."""
    K = sims.shape[0]
    m = observed.to(sims.dtype)
    mean = sims.mean(0)
    dev = (sims - mean) * m  # [K, S, T]
    var = dev.pow(2).sum(0) / (K - 1)
    spread = var > 1e-12 * (mean.abs() + var.sqrt() + 1e-300) ** 2
    spread = spread & observed
    m = spread.to(sims.dtype)
    dev = dev * m
    cov = torch.einsum("kst,ksu->stu", dev, dev) / (K - 1)
    cov = cov * (m[:, :, None] * m[:, None, :]) + torch.diag_embed(1 - m)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    L, info = torch.linalg.cholesky_ex(cov)
    jitter = 1e-10
    while bool((info != 0).any()) and jitter < 1:
        scale = torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1)[:, None, None]
        L, info = torch.linalg.cholesky_ex(cov + jitter * scale * eye)
        jitter *= 100
    r = torch.where(spread, y - mean, torch.zeros_like(y))
    y_star = torch.linalg.solve_triangular(L, r[..., None], upper=False).squeeze(-1)  # [S, T]
    sim_star = torch.linalg.solve_triangular(L, dev.permute(1, 2, 0), upper=False)  # [S, T, K]
    pde = (sim_star < y_star[..., None]).to(sims.dtype).mean(-1)
    pde = pde.clamp(1 / (2 * K), 1 - 1 / (2 * K))
    return mean, torch.where(spread, pde, torch.full_like(pde, float("nan")))


def npde_tests(values) -> dict:
    """Tests of NPDE against N(0, 1) (Comets et al. 2008): ``mean``, ``variance``,
    ``p_mean`` (one-sample t test of mean 0), ``p_variance`` (Fisher's two-sided
    chi-square test of variance 1), ``p_normal`` (Shapiro-Wilk), ``p_global``
    (Bonferroni: 3 x the smallest, at most 1). NaNs are left out."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = x.size
    if n < 3:
        nan = float("nan")
        return {"mean": nan, "variance": nan, "p_mean": nan, "p_variance": nan,
                "p_normal": nan, "p_global": nan}
    var = float(x.var(ddof=1))
    p_mean = float(stats.ttest_1samp(x, 0.0).pvalue)
    chi = (n - 1) * var
    p_var = float(min(1.0, 2 * min(stats.chi2.cdf(chi, n - 1), stats.chi2.sf(chi, n - 1))))
    p_norm = float(stats.shapiro(x).pvalue) if n <= 5000 else float(stats.normaltest(x).pvalue)
    return {"mean": float(x.mean()), "variance": var, "p_mean": p_mean, "p_variance": p_var,
            "p_normal": p_norm, "p_global": float(min(1.0, 3 * min(p_mean, p_var, p_norm)))}


def plot_npde(fit, n_sim: int = 1000, seed: int = 0, figsize=(9.0, 8.0)):
    """NPDE diagnostics, 2 x 2: histogram with the N(0, 1) density, normal QQ plot, NPDE
    vs TIME and NPDE vs PRED (with zero and +-1.96 lines).

    Parameters are those of :func:`npde`, plus ``figsize``.

    Returns
    -------
    matplotlib.figure.Figure
        Four axes; the table is in ``fig.npde_table`` (its ``attrs`` hold the tests).
    """
    from scipy import stats

    table = npde(fit, n_sim, seed)
    pred = residuals(fit)["PRED"].to_numpy()
    x = table["NPDE"].to_numpy()
    ok = np.isfinite(x)
    fig = _figure(figsize=figsize)
    axes = fig.subplots(2, 2)
    grid = np.linspace(-4, 4, 201)
    axes[0, 0].hist(x[ok], bins=max(10, min(40, int(np.sqrt(ok.sum())))), density=True,
                    color="tab:blue", alpha=0.6)
    axes[0, 0].plot(grid, stats.norm.pdf(grid), color="black", lw=1.2)
    axes[0, 0].set_xlabel("NPDE")
    axes[0, 0].set_ylabel("density")
    axes[0, 0].set_title("NPDE histogram vs N(0, 1)")
    theo = stats.norm.ppf((np.arange(1, ok.sum() + 1) - 0.5) / max(ok.sum(), 1))
    axes[0, 1].scatter(theo, np.sort(x[ok]), s=10, color="tab:blue", edgecolors="none")
    axes[0, 1].plot([-4, 4], [-4, 4], color="black", lw=1)
    axes[0, 1].set_xlabel("N(0, 1) quantile")
    axes[0, 1].set_ylabel("NPDE quantile")
    axes[0, 1].set_title("NPDE QQ plot")
    point = {"s": 14, "alpha": 0.6, "color": "tab:blue", "edgecolors": "none"}
    for ax, xs, name in ((axes[1, 0], table["TIME"].to_numpy(), "TIME"), (axes[1, 1], pred, "PRED")):
        ax.scatter(xs[ok], x[ok], **point)
        ax.axhline(0.0, color="black", lw=1)
        for y in (-1.96, 1.96):
            ax.axhline(y, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(name)
        ax.set_ylabel("NPDE")
        ax.set_title(f"NPDE vs {name}")
    a = table.attrs
    fig.suptitle(f"NPDE ({n_sim} replicates): mean {a['mean']:.3f}, variance {a['variance']:.3f}, "
                 f"global p {a['p_global']:.3g}")
    fig.npde_table = table
    return fig


# ----------------------------------------------------------------------------- individual fits


def _grid_data(data, pop, n_grid: int):
    """The data set with each subject's observation slots replaced by a dense time grid
    (``n_grid`` points from the first event to the last, plus the subject's observation
    times): ``(grid Dataset, grid [S, G], mask [S, G])``."""
    import dataclasses

    S = data.n_subjects
    dev, dt = data.obs_time.device, data.obs_time.dtype
    grids = []
    for i in range(S):
        obs_t = data.obs_time[i][data.obs_mask[i]]
        dose_t = data.dose_time[i][data.dose_mask[i]]
        both = torch.cat([obs_t, dose_t])
        lo = float(torch.clamp(both.min(), max=0.0)) if both.numel() else 0.0
        hi = float(both.max()) if both.numel() else 1.0
        hi = hi if hi > lo else lo + 1.0
        g = torch.cat([torch.linspace(lo, hi, n_grid, dtype=dt, device=dev), obs_t, dose_t])
        grids.append(torch.unique(g))
    G = max(g.numel() for g in grids)
    grid = torch.stack([torch.cat([g, g[-1:].expand(G - g.numel())]) for g in grids])
    mask = torch.stack([torch.arange(G, device=dev) < g.numel() for g in grids])
    # reset epoch at each grid time: that of the latest event (dose or observation) at or
    # before it
    ev_t = torch.cat([torch.where(data.dose_mask, data.dose_time, torch.full_like(data.dose_time, float("inf"))),
                      torch.where(data.obs_mask, data.obs_time, torch.full_like(data.obs_time, float("inf")))], 1)
    ev_e = torch.cat([data.dose_epoch, data.obs_epoch], 1)
    before = ev_t[:, None, :] <= grid[:, :, None]  # [S, G, E]
    epoch = torch.where(before, ev_e[:, None, :], torch.full_like(ev_e[:, None, :], -1)).amax(-1)
    first = torch.where(data.obs_mask, data.obs_epoch, torch.full_like(data.obs_epoch, 10 ** 9)).amin(-1)
    epoch = torch.where(epoch >= 0, epoch, first[:, None].clamp_max(10 ** 8))
    code = 0
    if pop.dvid is not None:
        code = pop.dvid if isinstance(pop.dvid, int) else data.dvid_names.index(pop.dvid)
    nan = torch.full_like(grid, float("nan"))
    grid_data = dataclasses.replace(
        data, obs_time=grid, obs_dv=torch.zeros_like(grid),
        obs_cmt=torch.zeros(S, G, dtype=data.obs_cmt.dtype, device=dev),
        obs_dvid=torch.full((S, G), code, dtype=data.obs_dvid.dtype, device=dev),
        obs_blq=torch.zeros(S, G, dtype=torch.bool, device=dev), obs_lloq=nan,
        obs_epoch=epoch.to(data.obs_epoch.dtype), obs_mask=mask, time_varying={})
    return grid_data, grid, mask


def individual_curves(fit, n_grid: int = 200) -> pd.DataFrame:
    """Typical (``PRED``) and individual (``IPRED``) predictions on a dense time grid per
    subject: ``n_grid`` points from the subject's first event to its last, plus its
    observation and dose times.

    Returns
    -------
    pandas.DataFrame
        Columns ``ID, TIME, PRED, IPRED``, one row per subject and grid time.
    """
    check_int("n_grid", n_grid)
    pop, data, values, eta = fit_point(fit)
    obj = laplace_objective(pop, data)
    grid_data, grid, mask = _grid_data(data, pop, n_grid)
    typical, betas, _ = obj.split(values)
    with torch.no_grad():
        curves = {}
        for name, e in (("PRED", torch.zeros_like(eta) if obj.P else None),
                        ("IPRED", eta if obj.P else None)):
            # individual parameters on the original data (covariate references as fitted)
            ind = pop.individual_parameters(typical, betas, e, data)
            ind = {k: v.expand(data.n_subjects) for k, v in ind.items()}
            curves[name] = pop.structure.concentration(ind, grid_data)
    keep = mask.cpu().numpy()
    S, G = grid.shape
    ids = np.repeat(np.asarray(data.ids, dtype=object), G).reshape(S, G)
    return pd.DataFrame({"ID": ids[keep], "TIME": grid.cpu().numpy()[keep],
                         "PRED": curves["PRED"].cpu().numpy()[keep],
                         "IPRED": curves["IPRED"].cpu().numpy()[keep]})


def plot_individual(fit, subjects=None, ncols: int = 4, n_grid: int = 200, log: bool = False,
                    figsize=None):
    """Individual fit plots: one panel per subject with the observations (points), the
    individual (IPRED, solid) and typical (PRED, dashed) predictions on a dense time grid
    (:func:`individual_curves`), and the doses (ticks along the time axis; BLQ
    observations as open markers at their limit).

    Parameters
    ----------
    fit : PopulationFit or PopulationBayesFit
    subjects : sequence, optional
        Subject IDs to show (as in the data), in that order; default all.
    ncols : int
        Panels per row.
    n_grid : int
        Grid points per subject.
    log : bool
        Logarithmic concentration axes (non-positive values left out).
    figsize : tuple, optional
        Default ``(3 ncols, 2.6 nrows)`` inches.

    Returns
    -------
    matplotlib.figure.Figure
        One axes per subject, titled ``ID <id>``; each holds two lines, IPRED then PRED.
    """
    check_int("ncols", ncols)
    pop, data, _, _ = fit_point(fit)
    ids = list(data.ids)
    if subjects is None:
        chosen = ids
    else:
        chosen = list(subjects) if not isinstance(subjects, (str, int, float)) else [subjects]
        lookup = {str(i): i for i in ids}
        missing = [s for s in chosen if s not in ids and str(s) not in lookup]
        if missing or not chosen:
            raise ValueError(f"plot_individual: unknown subject(s) {missing or chosen}; "
                             f"the data has IDs {ids[:20]}{' ...' if len(ids) > 20 else ''}")
        chosen = [s if s in ids else lookup[str(s)] for s in chosen]
    curves = individual_curves(fit, n_grid)
    observed = pop.observation_mask(data)
    n = len(chosen)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig = _figure(figsize=figsize or (3.0 * ncols, 2.6 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        fig.delaxes(ax)
    for ax, sid in zip(axes, chosen):
        i = ids.index(sid)
        c = curves[curves["ID"] == sid]
        t, ipred, pred = c["TIME"].to_numpy(), c["IPRED"].to_numpy(), c["PRED"].to_numpy()
        if log:
            ipred, pred = np.where(ipred > 0, ipred, np.nan), np.where(pred > 0, pred, np.nan)
        ax.plot(t, ipred, color="tab:blue", lw=1.4, label="IPRED")
        ax.plot(t, pred, color="tab:red", lw=1.0, ls="--", label="PRED")
        sel = observed[i]
        ot = data.obs_time[i][sel].cpu().numpy()
        dv = data.obs_dv[i][sel].cpu().numpy()
        blq = data.obs_blq[i][sel].cpu().numpy()
        ok = ~blq & ((dv > 0) if log else np.isfinite(dv))
        ax.scatter(ot[ok], dv[ok], s=14, color="black", zorder=3, label="DV")
        if blq.any():
            lloq = data.obs_lloq[i][sel].cpu().numpy()[blq]
            ax.scatter(ot[blq], lloq, s=14, facecolors="none", edgecolors="gray", zorder=3,
                       label="BLQ (at LLOQ)")
        dt = data.dose_time[i][data.dose_mask[i]].cpu().numpy()
        ax.vlines(dt, 0, 0.05, transform=ax.get_xaxis_transform(), color="tab:green", lw=1.5,
                  label="dose")
        if log:
            ax.set_yscale("log")
        ax.set_title(f"ID {sid}", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6, loc="best")
    fig.supxlabel("TIME")
    fig.supylabel("concentration")
    return fig


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
    data = fit_data(fit).to(dtype=torch.float64)
    observed = (pop.observation_mask(data) & ~data.obs_blq).to(sims.device)
    t = data.obs_time[observed].cpu().numpy()
    dv = data.obs_dv[observed].cpu().numpy()
    sim = sims[:, observed].cpu().numpy()  # [n_sim, N]
    edges = _bin_edges(t, bins)
    idx = _assign(t, edges)
    if prediction_corrected:
        pred = _predictions(fit)[0][observed.to(sims.device)].cpu().numpy()
        ok = pred > 0
        factor = np.full_like(pred, np.nan)
        for b in range(edges.size - 1):
            sel = (idx == b) & ok
            if sel.any():
                factor[sel] = np.median(pred[sel]) / pred[sel]
        dv, sim = dv * factor, sim * factor
        idx = np.where(ok, idx, -1)
    labels = [percentile_label(q) for q in pi]
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
    labels = [percentile_label(q) for q in table.attrs["pi"]]
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

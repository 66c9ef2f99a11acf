"""Simulation of new designs from a population model: dosing regimens and data sets.

* :class:`Regimen` describes a dosing regimen (amount, interval, number of doses,
  compartment, infusion duration, steady state);
* :func:`simulate_regimen` simulates concentration profiles of a regimen for the fitted
  population (typical values + inter-individual variability + residual error, and
  posterior uncertainty for a Bayesian fit) or for one fitted subject (its EBEs, or its
  posterior etas), and returns percentiles by time;
* :func:`simulate_data` simulates observations at a data set's design from given
  population parameters (simulation-estimation studies).

Covariate effects are evaluated against the fitted data set's covariate references (its
medians), so a simulated subject with the median weight has the typical clearance.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyro
import torch

from ..validation import check_int
from .dataset import Dataset
from .estimation import LaplaceObjective
from .likelihood import with_residual_error
from .population_fit import fit_point, laplace_objective, replicate_parameters
from .simulation import percentile_label, sigma_like

__all__ = ["Regimen", "simulate_data", "simulate_regimen"]


@dataclass(frozen=True)
class Regimen:
    """A dosing regimen: ``n_doses`` doses of ``amount`` every ``interval`` from ``start``.

    Attributes
    ----------
    amount : float
        Dose amount (the data's amount unit).
    interval : float, optional
        Dosing interval (time unit of the data); needed for ``n_doses > 1`` and for
        ``steady_state``.
    n_doses : int
        Number of doses.
    start : float
        Time of the first dose.
    cmt : int
        Dosing compartment, NONMEM numbering (1: the depot of a first-order absorption
        model, the central compartment of an iv model).
    duration : float
        Zero-order infusion duration (0: bolus or oral dose).
    steady_state : bool
        The first dose is at steady state (NONMEM ``SS=1, II=interval``): the profile is
        that of a regimen given for ever before ``start``.

    Examples
    --------
    >>> Regimen(100.0, interval=12.0, n_doses=3).dose_times().tolist()
    [0.0, 12.0, 24.0]
    """

    amount: float
    interval: float | None = None
    n_doses: int = 1
    start: float = 0.0
    cmt: int = 1
    duration: float = 0.0
    steady_state: bool = False

    def __post_init__(self):
        if not np.isfinite(self.amount) or self.amount < 0:
            raise ValueError(f"Regimen: amount must be a non-negative number, got {self.amount!r}")
        if not isinstance(self.n_doses, (int, np.integer)) or isinstance(self.n_doses, bool) or self.n_doses < 1:
            raise ValueError(f"Regimen: n_doses must be a positive integer, got {self.n_doses!r}")
        if (self.n_doses > 1 or self.steady_state) and (self.interval is None or not self.interval > 0):
            raise ValueError(f"Regimen: n_doses > 1 or steady_state needs a positive interval, "
                             f"got {self.interval!r}")
        if not self.duration >= 0:
            raise ValueError(f"Regimen: duration must be >= 0, got {self.duration!r}")
        if not isinstance(self.cmt, (int, np.integer)) or self.cmt < 1:
            raise ValueError(f"Regimen: cmt must be a compartment number >= 1, got {self.cmt!r}")

    def dose_times(self) -> np.ndarray:
        """Times of the doses ``[n_doses]``."""
        step = self.interval if self.interval is not None else 0.0
        return self.start + step * np.arange(self.n_doses, dtype=float)


def _regimens(doses) -> list:
    if isinstance(doses, Regimen):
        return [doses]
    if isinstance(doses, (list, tuple)) and doses and all(isinstance(d, Regimen) for d in doses):
        return list(doses)
    raise TypeError(f"doses: expected a pk.Regimen or a list of them, got {doses!r}")


def _design(regimens, times: torch.Tensor, S: int, like: Dataset) -> Dataset:
    """A data set of ``S`` subjects with the same doses and observation times."""
    rows = []
    for r in regimens:
        rate = r.amount / r.duration if r.duration > 0 else 0.0
        for j, t in enumerate(r.dose_times()):
            ss = 1 if r.steady_state and j == 0 else 0
            rows.append((t, r.amount, r.cmt, rate, ss, r.interval if ss else 0.0))
    rows.sort(key=lambda x: x[0])
    dev, dt = times.device, times.dtype
    col = torch.tensor(rows, dtype=torch.float64).T
    D, T = len(rows), times.numel()

    def rep(x, dtype=dt):
        return x.to(device=dev, dtype=dtype)[None].expand(S, -1).contiguous()

    long = like.dose_cmt.dtype
    return Dataset(
        ids=list(range(S)), dose_time=rep(col[0]), dose_amt=rep(col[1]),
        dose_cmt=rep(col[2], long), dose_rate=rep(col[3]), dose_ss=rep(col[4], long),
        dose_ii=rep(col[5]), dose_epoch=torch.zeros(S, D, dtype=long, device=dev),
        dose_mask=torch.ones(S, D, dtype=torch.bool, device=dev),
        obs_time=rep(times), obs_dv=torch.zeros(S, T, dtype=dt, device=dev),
        obs_cmt=torch.zeros(S, T, dtype=long, device=dev),
        obs_dvid=torch.zeros(S, T, dtype=long, device=dev),
        obs_blq=torch.zeros(S, T, dtype=torch.bool, device=dev),
        obs_lloq=torch.full((S, T), float("nan"), dtype=dt, device=dev),
        obs_epoch=torch.zeros(S, T, dtype=long, device=dev),
        obs_mask=torch.ones(S, T, dtype=torch.bool, device=dev))


def _is_categorical(pop, data, name: str) -> bool:
    return name in data.categories or any(
        e.kind == "categorical" and e.covariate.lower() == name.lower() for e in pop.covariate_effects)


def _individual(pop, obj, values, data: Dataset, cov: dict, eta) -> dict:
    """Individual parameters ``{p: [n]}`` of ``n`` new subjects with covariates ``cov``
    ``{name: [n]}`` and etas ``eta [n, P]`` (None: typical), against ``data``'s covariate
    references.

    The model evaluates covariate effects relative to the data set's medians, so the new
    subjects are appended to the data's covariates together with their mirror images
    about the median (categorical covariates: copies), which leaves every median as
    fitted; the new subjects' entries are read back."""
    n = next(iter(cov.values())).shape[0] if cov else (eta.shape[0] if eta is not None else 1)
    N = data.n_subjects
    aug = {}
    for name, x in data.covariates.items():
        z = cov[name].to(device=x.device, dtype=x.dtype)
        if _is_categorical(pop, data, name):
            aug[name] = torch.cat([x, z, z])
        else:
            ref = torch.quantile(x.to(torch.float64), 0.5).to(x.dtype)
            aug[name] = torch.cat([x, z, 2 * ref - z])
    aug_data = dataclasses.replace(data, covariates=aug)
    typical, betas, _ = obj.split(values)
    big = None
    if eta is not None and obj.P:
        big = torch.zeros(n, N + 2 * n, obj.P, dtype=eta.dtype, device=eta.device)
        big[torch.arange(n), N + torch.arange(n)] = eta
    ind = pop.individual_parameters(typical, betas, big, aug_data)
    out = {}
    for k, v in ind.items():
        v = v.expand(*v.shape[:-1], N + 2 * n)
        # [n, N + 2n] (per-replicate parameters or etas): replicate r is subject N + r
        out[k] = v[:, N:N + n].diagonal() if v.dim() == 2 else v[N:N + n]
    return out


def _covariate_values(pop, data: Dataset, covariates, n: int, gen, subject_index):
    """Covariates ``{name: [n]}`` of the simulated subjects (see :func:`simulate_regimen`)."""
    names = {k.lower(): k for k in data.covariates}
    if subject_index is not None:
        return {k: x[subject_index].expand(n) for k, x in data.covariates.items()}
    if covariates is None:
        idx = torch.randint(data.n_subjects, (n,), generator=gen, device=gen.device)
        return {k: x[idx.to(x.device)] for k, x in data.covariates.items()}
    if not isinstance(covariates, dict):
        raise TypeError(f"covariates: expected a dict name -> value(s), got {type(covariates).__name__}")
    unknown = [k for k in covariates if k.lower() not in names]
    if unknown:
        raise ValueError(f"covariates: {unknown} not in the data set (it has {sorted(data.covariates)})")
    given = {names[k.lower()]: v for k, v in covariates.items()}
    out = {}
    for k, x in data.covariates.items():
        if k in given:
            v = torch.as_tensor(np.asarray(given[k], dtype=float), dtype=x.dtype, device=x.device)
            if v.dim() == 0:
                v = v.expand(n)
            elif v.shape != (n,):
                raise ValueError(f"covariates[{k!r}]: expected a scalar or {n} values, got shape {tuple(v.shape)}")
        elif _is_categorical(pop, data, k):
            v = torch.zeros(n, dtype=x.dtype, device=x.device)
        else:
            v = torch.quantile(x.to(torch.float64), 0.5).to(x.dtype).expand(n)
        out[k] = v
    return out


def simulate_regimen(fit, doses, times, *, subject=None, n: int = 1000, covariates=None,
                     percentiles=(0.05, 0.5, 0.95), residual: bool = True, seed: int = 0,
                     draws: bool = False) -> pd.DataFrame:
    """Simulate concentration profiles of a new dosing regimen from a fitted model.

    Population (``subject=None``): each of ``n`` replicates is a new subject, with etas
    ``~ MVN(0, Omega)`` and covariates drawn from the fitted data's subjects (or given);
    for a Bayesian fit each replicate also takes a random posterior draw of the population
    parameters. One subject (``subject=ID``): its individual parameters at its EBEs (point
    fit; replicates then differ by residual error only) or at posterior draws of its etas
    and the population parameters (Bayesian fit), with its own covariates.

    Parameters
    ----------
    fit : PopulationFit or PopulationBayesFit
    doses : Regimen or list of Regimen
    times : array-like
        Times at which to simulate (the data's time unit).
    subject : optional
        A subject ID of the fitted data.
    n : int
        Replicates.
    covariates : dict, optional
        Population simulations only: covariate values ``{name: value or [n] values}``;
        covariates not named take the data's median (categorical: the reference
        category). Default: each replicate takes the covariates of a random subject of the
        data.
    percentiles : sequence of float
        Fractions in (0, 1).
    residual : bool
        Add residual error (simulated observations) or not (concentrations).
    seed : int
        Seed of the simulation's own generator.
    draws : bool
        Return every replicate (long format) instead of percentiles.

    Returns
    -------
    pandas.DataFrame
        ``draws=False``: one row per time with columns ``time``, ``typical`` (the
        prediction at the point estimate with eta = 0 and median covariates, or the
        subject's individual prediction) and one column per percentile (``p5``, ``p50``,
        ``p95``). ``draws=True``: columns ``replicate, time, value``.

    Examples
    --------
    >>> from genprog import pk
    >>> data = pk.read_nonmem(pk.dataset_path("theo_sd"))
    >>> fit = pk.PopulationModel(pk.OneCompartment(), ["cl", "v"], "proportional").fit(
    ...     data, "mle", standard_errors=False)
    >>> table = simulate_regimen(fit, Regimen(320.0, interval=24.0, n_doses=3), [0, 24, 48, 72], n=200)
    >>> list(table.columns)
    ['time', 'typical', 'p5', 'p50', 'p95']
    """
    regimens = _regimens(doses)
    check_int("n", n)
    pcts = tuple(float(q) for q in percentiles)
    if not pcts or any(not 0 < q < 1 for q in pcts):
        raise ValueError(f"percentiles: expected fractions in (0, 1), got {percentiles!r}")
    pop, data, point_values, point_eta = fit_point(fit)
    t = torch.tensor(np.array(times, dtype=float), dtype=torch.float64, device=data.obs_dv.device)
    if t.dim() != 1 or t.numel() == 0 or not bool(torch.isfinite(t).all()):
        raise ValueError(f"times: expected a non-empty 1-d array of finite times, got {times!r}")
    index = None
    if subject is not None:
        ids = list(data.ids)
        matches = [i for i, s in enumerate(ids) if s == subject or str(s) == str(subject)]
        if not matches:
            raise ValueError(f"subject: no subject {subject!r} in the data (IDs {ids[:20]}"
                             f"{' ...' if len(ids) > 20 else ''})")
        if covariates is not None:
            raise ValueError("covariates: a fitted subject keeps its own covariates; "
                             "give covariates only for population simulations")
        index = matches[0]
    gen = torch.Generator(device=data.obs_dv.device).manual_seed(int(seed))
    _, _, values, subj_eta, batched = replicate_parameters(fit, n, gen)
    obj = laplace_objective(pop, data)
    cov = _covariate_values(pop, data, covariates, n, gen, index)
    P = obj.P
    z = torch.randn(n, P, generator=gen, device=gen.device, dtype=torch.float64)
    eps = torch.randn(n, t.numel(), generator=gen, device=gen.device, dtype=torch.float64)
    chunk = max(1, min(n, int(4e6 // max(1, (data.n_subjects + 2 * n) * max(P, 1)))), 256)
    out = []
    with torch.no_grad():
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            v = {k: x[sl] for k, x in values.items()} if batched else values
            m = z[sl].shape[0]
            if not P:
                eta = None
            elif index is not None:
                eta = subj_eta[sl, index] if batched else subj_eta[index].expand(m, P)
            else:  # ([m,] P, P) @ [m, P, 1]
                eta = (obj.scale_tril(v) @ z[sl][..., None]).squeeze(-1)
            ind = _individual(pop, obj, v, data, {k: x[sl] for k, x in cov.items()}, eta)
            design = _design(regimens, t, m, data)
            conc = pop.structure.concentration({k: x.expand(m) for k, x in ind.items()}, design)
            if residual:
                _, _, sigma = obj.split(v)
                conc = with_residual_error(pop.error, conc, sigma_like(sigma, batched, conc), eps[sl])
            out.append(conc)
        sims = torch.cat(out, 0).cpu().numpy()  # [n, T]
        if index is None:
            typ_cov = _covariate_values(pop, data, covariates if covariates is not None else {}, 1, gen, None)
            typ_cov = {k: x[:1] for k, x in typ_cov.items()}
            typ_eta = None
        else:
            typ_cov = {k: x[index].reshape(1) for k, x in data.covariates.items()}
            typ_eta = point_eta[index].reshape(1, P) if P else None
        ind = _individual(pop, obj, point_values, data, typ_cov, typ_eta)
        typical = pop.structure.concentration({k: x.reshape(1) for k, x in ind.items()},
                                              _design(regimens, t, 1, data))[0].cpu().numpy()
    tt = t.cpu().numpy()
    if draws:
        return pd.DataFrame({"replicate": np.repeat(np.arange(n), tt.size),
                             "time": np.tile(tt, n), "value": sims.reshape(-1)})
    q = np.quantile(sims, pcts, axis=0)
    table = pd.DataFrame({"time": tt, "typical": typical})
    for j, p in enumerate(pcts):
        table[percentile_label(p)] = q[j]
    table.attrs.update({"n": n, "seed": seed, "subject": subject, "residual": residual})
    return table


def simulate_data(model, data: Dataset, params: dict, *, seed: int = 0, lloq: float | None = None) -> Dataset:
    """A copy of ``data`` with observations simulated from ``model`` at ``params``.

    Each subject gets etas ``~ MVN(0, Omega)`` and every observation of the model's type a
    residual error from its error model.

    Parameters
    ----------
    model : PopulationModel
    data : Dataset
        The design (doses, observation times, covariates).
    params : dict
        Population parameters on the natural scale, by site, as in ``fit.estimates``:
        typical values (``"cl"``, ...), ``"omega"`` ``[P]`` (and ``"omega_corr"``, a
        Cholesky factor), covariate coefficients, residual-error SDs.
    seed : int
    lloq : float, optional
        Observations below it are marked BLQ (censored, DV set to the limit).

    Returns
    -------
    Dataset
        ``obs_dv`` replaced where the model observes; ``obs_blq``/``obs_lloq`` set by
        ``lloq`` (none censored without it).

    Examples
    --------
    >>> from genprog import pk
    >>> data = pk.read_nonmem(pk.dataset_path("theo_sd"))
    >>> m = pk.PopulationModel(pk.OneCompartment(), ["cl"], "additive")
    >>> sim = simulate_data(m, data, {"cl": 3.0, "v": 30.0, "ka": 1.5, "omega": [0.3],
    ...                               "sigma_add": 0.5}, seed=1)
    >>> sim.obs_dv.shape == data.obs_dv.shape
    True
    """
    if not isinstance(data, Dataset):
        raise TypeError(f"simulate_data: expected a pk.Dataset, got {type(data).__name__}")
    d64 = data.to(dtype=torch.float64)
    with pyro.validation_enabled(False):  # the design's DV may be all zero (a prior scale of 0)
        priors = model.priors_for(d64)
    missing = [k for k in priors if k not in params and k != "omega_corr"]
    unknown = [k for k in params if k not in priors]
    if missing or unknown:
        raise ValueError(f"simulate_data: params missing {missing}, unknown {unknown}; "
                         f"the model's sites are {sorted(priors)}")
    values = {k: torch.as_tensor(np.asarray(v, dtype=float), dtype=torch.float64,
                                 device=d64.obs_dv.device) for k, v in params.items()}
    obj = LaplaceObjective(model, d64, priors)
    S, T = d64.obs_dv.shape
    gen = torch.Generator(device=d64.obs_dv.device).manual_seed(int(seed))
    z = torch.randn(S, obj.P, generator=gen, device=gen.device, dtype=torch.float64)
    eps = torch.randn(S, T, generator=gen, device=gen.device, dtype=torch.float64)
    typical, betas, sigma = obj.split(values)
    with torch.no_grad():
        eta = z @ obj.scale_tril(values).transpose(-1, -2) if obj.P else None
        ind = model.individual_parameters(typical, betas, eta, d64)
        conc = model.structure.concentration({k: v.expand(S) for k, v in ind.items()}, d64)
        dv = with_residual_error(model.error, conc, sigma, eps)
    observed = model.observation_mask(d64)
    dv = torch.where(observed, dv, d64.obs_dv)
    blq = torch.zeros_like(data.obs_blq)
    lloq_t = torch.full_like(d64.obs_dv, float("nan"))
    if lloq is not None:
        blq = observed & (dv < lloq)
        lloq_t = torch.where(blq, torch.full_like(dv, float(lloq)), lloq_t)
        dv = torch.where(blq, lloq_t, dv)
    dtype = data.obs_dv.dtype
    return dataclasses.replace(data, obs_dv=dv.to(dtype), obs_blq=blq, obs_lloq=lloq_t.to(dtype))

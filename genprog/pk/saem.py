"""SAEM for :class:`~genprog.pk.population.PopulationModel`: the generic algorithm of
:mod:`genprog.infer.saem` on the model's Pyro program, plus what the model's structure
allows (as Monolix and nlmixr2 do):

* **mu-referencing.** The sampler moves each subject's individual log parameters
  ``phi_i = mu_i(theta) + eta_i`` (``mu_i = log(tv * covariate factor_i)``; with
  ``ka_above_k`` the log of ``ka - k``), and inter-occasion effects ``kappa_ik``, not the
  program's non-centred ``eta_raw``: ``eta_raw = L^{-1} (phi_i - mu_i)``, ``kappa_raw =
  kappa / omega_iov``, with the Jacobian ``-log |det L|`` per subject. Typical values then
  enter the complete-data likelihood only through ``N(phi_i; mu_i, Omega)``, so EM-type
  updates of them are fast.
* **Closed-form M-steps.** Typical values of parameters with IIV and no estimated covariate
  effect: ``log tv = mean_i E[phi_i - log factor_i]``; ``Omega`` from the averaged
  second moments ``mean_i E[(phi_i - mu_i)(phi_i - mu_i)^T]`` (diagonal or block), with
  Monolix's simulated annealing during the first half of the exploration (each SD shrinks
  by at most 5% per iteration); ``omega_iov`` likewise from the kappas; a one-parameter
  residual error (additive, proportional or exponential, no BLQ) from the averaged sum of
  squared (relative / log) residuals. Everything else (covariate coefficients, parameters
  without IIV, combined error, BLQ) takes the generic Newton step.
* **An independence proposal** from the subjects' population distribution ``N(mu_i,
  Omega)`` each iteration (Monolix's first kernel), which lets a subject leave a wrong
  mode (e.g. a flip-flop ka/k swap).

:func:`fit_saem` returns a :class:`~genprog.pk.estimation.PopulationFit` (``method="saem"``)
so summaries and diagnostics treat it as any point fit: ``minus2ll`` / ``ofv`` come from
importance sampling (``info["minus2ll_stderr"]``), ``info["ofv_focei"]`` is the FOCE-I
objective at the same estimates, ``eta`` the EBEs (conditional modes) at the estimates and
``info["eta_conditional_mean"]`` the conditional means from the SAEM draws.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings

import pyro
import torch

from ..dtypes import default_dtype
from ..errors import ConvergenceWarning
from ..infer.saem import MixedEffectsDensity, SaemHooks, saem
from ..threads import threads_for, using_threads
from .estimation import LaplaceObjective, PopulationFit, parameter_layout, start_values


class PopulationHooks(SaemHooks):
    """mu-referenced coordinates, closed-form M-steps and a population proposal for a
    :class:`~genprog.pk.population.PopulationModel` on a data set (see the module
    docstring).

    Parameters
    ----------
    pop : PopulationModel
    data : Dataset
        float64.
    sites : sequence of str
        The population sites being estimated (not fixed).
    anneal : int
        Iterations of simulated annealing of the omegas (0: none).
    priors : dict, optional
        The priors fixing the parameter layout (default ``pop.priors_for(data)``; a shard
        takes the whole data set's).
    shard : genprog.infer.saem.GroupShard, optional
        ``data`` is this process's block of subjects: the closed-form M-steps' means over
        subjects and the observation count are summed over the processes by
        ``shard.reduce``.
    fixed : dict, optional
        Sites held at given values (float64 tensors): the hooks read them beside the
        estimated ones.
    """

    def __init__(self, pop, data, sites, anneal: int = 0, priors: dict | None = None, shard=None,
                 fixed: dict | None = None):
        self.pop = pop
        self.fixed = dict(fixed or {})
        self.data = data
        self.shard = shard
        self.objective = LaplaceObjective(pop, data, priors if priors is not None else pop.priors_for(data))
        self.P = len(pop.random_effects)
        self.K = pop.occasions(data)[1] if pop.iov else 0
        self.Q = len(pop.iov)
        self.dim = self.P + self.K * self.Q
        self.anneal = anneal
        self.observed = pop.observation_mask(data) & ~data.obs_blq
        self.n_obs = int(self._sum(self.observed.sum().reshape(1).to(torch.float64))[0])
        estimated = {e.param for e in pop.covariate_effects if e.estimated}
        self.referenced = [p for p in pop.random_effects if p not in estimated]
        n_blq = self._sum((pop.observation_mask(data) & data.obs_blq).sum().reshape(1).to(torch.float64))
        self.one_sigma = (len(pop.sigma_sites()) == 1 and pop.error != "combined" and float(n_blq[0]) == 0)
        closed = [self.typical_site(p) for p in self.referenced]
        closed += ["omega"] + (["omega_corr"] if "omega_corr" in sites else [])
        closed += ["omega_iov"] if self.Q else []
        closed += list(pop.sigma_sites()) if self.one_sigma else []
        self.closed_form_sites = tuple(s for s in closed if s in sites)

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the processes (``x`` itself without a shard)."""
        return x if self.shard is None else self.shard.reduce(x).to(x.dtype)

    def _subject_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean over all subjects of ``x [S, ...]`` (this process's rows)."""
        if self.shard is None:
            return x.mean(0)
        return self._sum(x.sum(0)) / self.shard.total

    def typical_site(self, p: str) -> str:
        return "ka_minus_k" if p == "ka" and self.pop.ka_above_k else p

    # ------------------------------------------------------------------ coordinates
    def with_fixed(self, values: dict) -> dict:
        """``values`` (the estimated sites) with the fixed sites beside them."""
        return {**self.fixed, **values} if self.fixed else values

    def log_factor(self, p: str, values: dict) -> torch.Tensor:
        """``log`` covariate factor of ``p`` per subject ``[S]`` (0 with ka_above_k's ka)."""
        values = self.with_fixed(values)
        S = self.data.n_subjects
        if p == "ka" and self.pop.ka_above_k:
            return self.data.obs_dv.new_zeros(S)
        betas = {e.site: values[e.site] for e in self.pop.covariate_effects if e.estimated}
        f = self.pop.covariate_factor(p, betas, self.data)
        return torch.log(torch.as_tensor(f)).expand(S)

    def mean(self, values: dict) -> torch.Tensor:
        """``mu_i(theta)`` ``[S, P]``: the subjects' typical log parameters."""
        values = self.with_fixed(values)
        cols = [torch.log(values[self.typical_site(p)]) + self.log_factor(p, values)
                for p in self.pop.random_effects]
        return torch.stack(cols, -1)

    def scale_tril(self, values: dict) -> torch.Tensor:
        """Cholesky factor ``[P + K Q, P + K Q]`` of a subject's random effects: the IIV
        block, then ``omega_iov`` per occasion (as FOCE-I's objective builds it)."""
        return self.objective.scale_tril(self.with_fixed(values))

    def reparam(self, values: dict, b: torch.Tensor):
        """``b [C, S, P + K Q]`` -> ``eta_raw [C, S, 1, P]`` (and ``kappa_raw``) and the log
        Jacobian ``[C, S]``."""
        values = self.with_fixed(values)
        C, S, _ = b.shape
        out, logdet = {}, b.new_zeros(C, S)
        if self.P:
            L = self.scale_tril(values)[:self.P, :self.P]
            eta = b[..., :self.P] - self.mean(values)
            raw = torch.linalg.solve_triangular(L, eta.reshape(-1, self.P).T, upper=False).T
            out["eta_raw"] = raw.reshape(C, S, 1, self.P)
            logdet = logdet - torch.log(L.diagonal()).sum()
        if self.Q:
            sd = values["omega_iov"].repeat(self.K)
            out["kappa_raw"] = (b[..., self.P:] / sd).reshape(C, S, 1, self.K * self.Q)
            logdet = logdet - torch.log(sd).sum()
        return out, logdet

    def initial_b(self, values: dict):
        S = self.data.n_subjects
        return torch.cat([self.mean(values), self.data.obs_dv.new_zeros(S, self.K * self.Q)], -1)

    def population_proposal(self, values: dict):
        return self.initial_b(values), self.scale_tril(values)

    # ------------------------------------------------------------------ M-step
    def statistics(self, values: dict, b: torch.Tensor, trace) -> dict:
        """``{"rss": [C]}``: the sum of squared residuals on the error model's scale
        (absolute, relative to the prediction, or of logs) when the residual SD has a
        closed form."""
        if not self.one_sigma:
            return {}
        loc = trace.nodes["dv"]["fn"].base_dist.loc  # pred, or log pred (exponential)
        loc = loc.reshape(-1, *self.observed.shape)
        dv = torch.where(self.observed, self.data.obs_dv, torch.ones_like(self.data.obs_dv))
        if self.pop.error == "exponential":
            r = torch.log(dv) - loc
        elif self.pop.error == "proportional":
            r = (dv - loc) / loc.clamp_min(1e-12)
        else:
            r = dv - loc
        r = torch.where(self.observed, r, torch.zeros_like(r))
        return {"rss": (r ** 2).sum((-2, -1))}

    def closed_form(self, stats: dict, moments: tuple, values: dict, iteration: int) -> dict:
        m1, m2 = moments
        values = self.with_fixed(values)
        out = {}
        for p in self.referenced:
            j = self.pop.random_effects.index(p)
            site = self.typical_site(p)
            if site in self.closed_form_sites:
                out[site] = torch.exp(self._subject_mean(m1[:, j] - self.log_factor(p, values)))
        values = {**values, **out}
        if self.P and "omega" in self.closed_form_sites:
            mu = self.mean(values)
            e1, e2 = m1[:, :self.P], m2[:, :self.P, :self.P]
            S2 = self._subject_mean(e2 - e1[:, :, None] * mu[:, None, :] - mu[:, :, None] * e1[:, None, :]
                  + mu[:, :, None] * mu[:, None, :])
            S2 = 0.5 * (S2 + S2.T)
            omega = S2.diagonal().clamp_min(1e-12).sqrt()
            if iteration < self.anneal:
                omega = torch.maximum(omega, 0.95 * values["omega"])
            out["omega"] = omega
            if "omega_corr" in self.closed_form_sites:
                sd = S2.diagonal().clamp_min(1e-12).sqrt()
                corr = S2 / (sd[:, None] * sd[None, :]) + 1e-9 * torch.eye(self.P, dtype=S2.dtype, device=S2.device)
                L = torch.linalg.cholesky(corr)
                out["omega_corr"] = L / L.norm(dim=-1, keepdim=True)  # unit rows: a correlation
        if self.Q and "omega_iov" in self.closed_form_sites:
            second = m2[:, self.P:, self.P:].diagonal(dim1=-2, dim2=-1)  # [S, K Q]
            sd = second.reshape(-1, self.K, self.Q).mean((0, 1)).clamp_min(1e-12).sqrt()  # iov: not sharded
            if iteration < self.anneal:
                sd = torch.maximum(sd, 0.95 * values["omega_iov"])
            out["omega_iov"] = sd
        if self.one_sigma and "rss" in stats:
            s = self.pop.sigma_sites()[0]
            if s in self.closed_form_sites:
                sigma = (stats["rss"] / self.n_obs).clamp_min(1e-12).sqrt()
                if iteration < self.anneal:
                    sigma = torch.maximum(sigma, 0.95 * values[s])
                out[s] = sigma
        return out


@contextlib.contextmanager
def _float64():
    with default_dtype(torch.float64), pyro.validation_enabled(False):
        yield


def fit_saem(pop, data, *, exploration: int = 300, averaging: int = 200, chains: int | None = None,
             mh_steps: int = 2, importance_draws: int = 1000, seed: int = 0,
             init: dict | None = None, fixed: dict | None = None,
             standard_errors: bool = True, threads: int | None = None) -> PopulationFit:
    """Population maximum likelihood by SAEM (``PopulationModel.fit(data, method="saem")``).

    Parameters
    ----------
    pop : PopulationModel
    data : Dataset
    exploration, averaging : int
        Iterations with step 1 and with step ``1/k`` (Monolix's K1, K2).
    chains : int, optional
        Markov chains per subject (default ``ceil(50 / S)``).
    mh_steps : int
        Random-walk Metropolis steps per iteration (besides one independence step from the
        population distribution and one from a Gaussian fitted to the subject's draws).
    importance_draws : int
        Draws per subject for the importance-sampling -2LL.
    seed : int
        Seed of a private generator.
    init : dict, optional
        Starting values (natural scale) by site; default: the data-based guesses of
        ``fit_mle``, omegas 1 (annealed down).
    fixed : dict, optional
        Sites held at given values (natural scale).
    standard_errors : bool
        Keep the covariance (Louis' formula, stochastically approximated).
    threads : int, optional
        torch's intra-op threads during the fit (default: by the size of the work,
        :func:`genprog.threads.threads_for`; restored afterwards).

    Returns
    -------
    PopulationFit
        ``method="saem"``; ``info`` holds ``ofv_focei``, ``minus2ll_stderr``, ``ofv_stderr``,
        ``eta_conditional_mean`` ``[S, P]``, ``trace`` (site -> ``[iterations, ...]``),
        ``timings`` and the :class:`~genprog.infer.saem.SaemResult` (``"saem"``).
    """
    start_time = time.perf_counter()
    pop.check_data(data)
    data = data.to(dtype=torch.float64)
    S, T = data.obs_dv.shape
    C = chains or max(1, math.ceil(50 / S))
    work = S * T * max(int(data.dose_time.shape[-1]), 1) * C
    with _float64(), using_threads(threads_for(work, threads)):
        priors = pop.priors_for(data)
        fixed = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in (fixed or {}).items()}
        unknown = (set(fixed) | set(init or {})) - set(priors)
        if unknown:
            raise ValueError(f"fit(method='saem'): unknown site(s) {sorted(unknown)} in fixed/init; "
                             f"sites: {sorted(priors)}")
        start = saem_start_values(pop, data, priors, init)
        md, hooks, res = run_saem(pop, data, priors, fixed, start, exploration=exploration,
                                  averaging=averaging, chains=chains, mh_steps=mh_steps,
                                  importance_draws=importance_draws, seed=seed,
                                  standard_errors=standard_errors)
        return saem_population_fit(pop, data, priors, fixed, md, hooks, res, standard_errors, start_time)


def saem_start_values(pop, data, priors: dict, init: dict | None) -> dict:
    """SAEM's starting values by site (natural scale): ``fit_mle``'s data-based guesses,
    omegas 1 (annealed down), ``omega_iov`` 0.5, overridden by ``init``."""
    P, Q = len(pop.random_effects), len(pop.iov)
    start = start_values(pop, data, priors)
    start.update({"omega": torch.ones(P)} if P else {})
    start.update({"omega_iov": torch.full((Q,), 0.5)} if Q else {})
    start.update({k: torch.as_tensor(v, dtype=torch.float64) for k, v in (init or {}).items()})
    return start


def run_saem(pop, data, priors: dict, fixed: dict, start: dict, *, exploration: int, averaging: int,
             chains, mh_steps: int, importance_draws: int, seed: int, standard_errors: bool,
             shard=None):
    """The SAEM run of :func:`fit_saem` (float64, validation off) on ``data`` with the
    given ``priors`` (the parameter layout), ``fixed`` values and ``start`` values.

    ``shard`` (:class:`genprog.infer.saem.GroupShard`): ``data`` is this process's block
    of subjects of the whole data set whose ``priors`` and ``start`` are given
    (:func:`genprog.pk.distributed.fit_saem_distributed`). Returns ``(density, hooks,
    SaemResult)``."""
    model = pop(data)
    if fixed:
        model = model.with_fixed(fixed)
    sites = [k for k in priors if k not in fixed]
    hooks = PopulationHooks(pop, data, sites, anneal=exploration // 2, priors=priors, shard=shard,
                            fixed=fixed)
    random = (["eta_raw"] if hooks.P else []) + (["kappa_raw"] if hooks.Q else [])
    if not random:
        raise ValueError("fit(method='saem'): the model has no random effects; use method='mle'")
    md = MixedEffectsDensity(model.density(), random, "subject", reparam=hooks.reparam, dim=hooks.dim)
    theta0 = md.pack({k: start[k] for k in md.names}).to(data.obs_dv.device)
    res = saem(md, theta0, hooks=hooks, exploration=exploration, averaging=averaging,
               chains=chains, mh_steps=mh_steps, importance_draws=importance_draws, seed=seed,
               standard_errors=standard_errors, shard=shard)
    return md, hooks, res


def saem_population_fit(pop, data, priors, fixed, md, hooks, res, standard_errors, start_time,
                        summed=None, gather=None) -> PopulationFit:
    """A :class:`PopulationFit` from a SAEM result: EBEs and the FOCE-I OFV at the
    estimates, the covariance in ``fit_mle``'s parameter layout.

    Subject-sharded (:func:`genprog.pk.distributed.fit_saem_distributed`): ``summed(obj)``
    wraps this process's FOCE-I objective into the whole data set's (its
    ``log_likelihood`` summed over the processes), and ``gather(pop, data, eta [S_r, P],
    conditional mean [S_r, D], acceptance [S_r], n_obs)`` returns the same six for the
    fit (the whole data set's on rank 0)."""
    layout = parameter_layout(pop, data, priors, fixed)
    values = {**fixed, **res.estimates}  # as fit_mle's: the fixed sites among the estimates
    phi = layout.pack(values).detach()
    covariance = None
    if standard_errors and res.covariance is not None:
        slices = md.slices()
        idx = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in layout.names])
        covariance = res.covariance[idx][:, idx]
    elif standard_errors:
        warnings.warn("fit(method='saem'): the stochastic approximation of the observed information "
                      "is not positive definite: standard errors are unavailable",
                      ConvergenceWarning, stacklevel=4)
    obj = LaplaceObjective(pop, data, priors, fixed, "focei")
    cond_mean = res.conditional_mean.clone()
    if hooks.P:
        cond_mean[:, :hooks.P] = cond_mean[:, :hooks.P] - hooks.mean({**values, **fixed})
    eta_hat = obj.ebe({**values, **fixed}, cond_mean)
    ll_focei, eta_hat = (summed(obj) if summed else obj).log_likelihood(phi, eta_hat)
    acceptance, n_obs = res.acceptance_rate, obj.n_obs
    if gather:
        pop, data, eta_hat, cond_mean, acceptance, n_obs = gather(pop, data, eta_hat.detach(), cond_mean,
                                                                  acceptance, n_obs)
    typical, betas, _ = obj.split({**values, **fixed})
    individual = pop.individual_parameters(typical, betas, eta_hat[:, :obj.P_iiv] if obj.P_iiv else None, data)
    individual = {k: v.detach().expand(data.n_subjects) for k, v in individual.items()}
    if pop.ka_above_k:
        v = values["v"] if "v" in values else values["v1"]
        values["ka"] = (values["ka_minus_k"] + values["cl"] / v).detach()
    log2pi = n_obs * math.log(2 * math.pi)
    minus2ll = res.minus2ll
    focei = -2 * float(ll_focei.detach())
    info = {"ofv_focei": focei - log2pi, "minus2ll_focei": focei,
            "minus2ll_stderr": res.minus2ll_stderr, "ofv_stderr": res.minus2ll_stderr,
            "ofv_method": "importance sampling (Student-t proposal per subject)",
            "eta_conditional_mean": cond_mean, "trace": res.trace, "timings": res.timings,
            "iterations": res.iterations, "chains": res.chains, "acceptance_rate": acceptance,
            "closed_form_sites": hooks.closed_form_sites, "seed": res.seed, "saem": res,
            "standard_errors": "ok" if covariance is not None else "unavailable",
            "wall_time_s": time.perf_counter() - start_time, "layout": layout.names}
    return PopulationFit(
        population=pop, data=data, estimates=values, phi=phi, covariance=covariance,
        eta=eta_hat.detach(), individual=individual, minus2ll=minus2ll, ofv=minus2ll - log2pi,
        n_obs=n_obs, n_params=int(phi.numel()),
        converged=bool(math.isfinite(minus2ll)) and all(bool(torch.isfinite(v).all()) for v in values.values()),
        method="saem", info=info, fixed=fixed, approximation="focei")

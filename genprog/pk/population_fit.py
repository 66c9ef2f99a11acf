"""What diagnostics and simulation need from any population fit, in one place.

A population fit is a point fit (:class:`~genprog.pk.estimation.PopulationFit`, from
``method="mle"`` or ``"saem"``) or a Bayesian one
(:class:`~genprog.pk.population.PopulationBayesFit`). Both offer the same four things
through these functions, so diagnostics never branch on the fit's type:

* :func:`fit_data` — the data set it was fitted to;
* :func:`fit_point` — ``(population, data, values, eta)``: population parameters by site
  and the subjects' random effects (EBEs, or posterior medians / means), float64;
* :func:`replicate_parameters` — parameters for ``n`` simulation replicates (the point
  estimate, or random posterior draws with their etas);
* :func:`laplace_objective` — the per-subject likelihood machinery (predictions,
  residual SDs, Omega) evaluated at such values.
"""

from __future__ import annotations

import torch

from .estimation import LaplaceObjective, PopulationFit
from .population import posterior_etas

__all__ = ["eta_and_omega", "fit_data", "fit_point", "flat_draws", "is_bayesian", "laplace_objective",
           "posterior_eta_draws", "replicate_parameters"]


def is_bayesian(fit) -> bool:
    return hasattr(fit, "draws") and getattr(fit, "population", None) is not None


def flat_draws(fit) -> dict:
    """Bayesian draws ``[chain, draw, ...] -> [n, ...]`` in float64, plus sites the fit
    held fixed."""
    draws = {k: v.detach().double().reshape(-1, *v.shape[2:]) for k, v in fit.draws.items()}
    n = next(iter(draws.values())).shape[0]
    fixed = getattr(getattr(fit, "model", None), "fixed", None) or {}
    for k, v in fixed.items():
        draws.setdefault(k, torch.as_tensor(v).double().expand(n, *torch.as_tensor(v).shape))
    return draws


def posterior_eta_draws(pop, draws) -> torch.Tensor | None:
    """Etas per draw ``[n, S, P]`` from ``eta_raw`` (non-centred), as the model builds them."""
    return posterior_etas(pop, draws)


def fit_point(fit):
    """``(population, data, values, eta)`` of a point or Bayesian population fit, all in
    float64: ``values`` are population parameters by site (natural scale), ``eta`` the
    subjects' random effects ``[S, P]`` (EBEs, or posterior means)."""
    if isinstance(fit, PopulationFit):
        data = fit.data.to(dtype=torch.float64)
        values = {k: torch.as_tensor(v).detach().double() for k, v in fit.estimates.items()}
        return fit.population, data, values, fit.eta.detach().double()
    if is_bayesian(fit):
        pop = fit.population
        data = (fit.dataset if fit.dataset is not None else fit.model.dataset).to(dtype=torch.float64)
        draws = flat_draws(fit)
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
        eta = posterior_eta_draws(pop, draws)
        eta = eta.mean(0) if eta is not None else torch.zeros(
            data.n_subjects, 0, dtype=torch.float64, device=data.obs_dv.device)
        return pop, data, values, eta
    raise TypeError(f"expected a population fit (pk.PopulationModel(...).fit(data, method)), "
                    f"got {type(fit).__name__}")


def fit_data(fit):
    """The data set a population fit was fitted to."""
    if isinstance(fit, PopulationFit):
        return fit.data
    if is_bayesian(fit):
        return fit.dataset if fit.dataset is not None else fit.model.dataset
    raise TypeError(f"expected a population fit (pk.PopulationModel(...).fit(data, method)), "
                    f"got {type(fit).__name__}")


def laplace_objective(pop, data) -> LaplaceObjective:
    return LaplaceObjective(pop, data, pop.priors_for(data))


def replicate_parameters(fit, n: int, gen: torch.Generator):
    """``(pop, data, values, subject_eta, batched)`` for ``n`` simulation replicates.

    A point fit gives its estimates (unbatched) and EBEs ``[S, P]``; a Bayesian fit gives
    ``n`` posterior draws picked at random (``values[site]`` with a leading dim ``n``) and
    the same draws' etas ``[n, S, P]``."""
    if isinstance(fit, PopulationFit):
        pop, data, values, eta = fit_point(fit)
        return pop, data, values, eta, False
    if not is_bayesian(fit):
        raise TypeError(f"expected a population fit (pk.PopulationModel(...).fit(data, method)), "
                        f"got {type(fit).__name__}")
    pop, data, _, _ = fit_point(fit)
    draws = flat_draws(fit)
    n_draws = next(iter(draws.values())).shape[0]
    idx = torch.randint(n_draws, (n,), generator=gen, device=gen.device)
    values = {s: draws[s][idx.to(draws[s].device)] for s in pop.priors_for(data)}
    eta = posterior_eta_draws(pop, {k: v[idx.to(v.device)] for k, v in draws.items()})
    if eta is None:
        eta = torch.zeros(n, data.n_subjects, 0, dtype=torch.float64, device=data.obs_dv.device)
    return pop, data, values, eta, True


def eta_and_omega(fit):
    """``(population, eta [S, P], omega [P])`` behind eta shrinkage: the EBEs and the
    omega estimate of a point fit, or the posterior-mean etas and posterior-mean omega of a
    Bayesian fit (``eta``/``omega`` None for a model without random effects)."""
    if isinstance(fit, PopulationFit):
        return fit.population, fit.eta, fit.estimates.get("omega")
    if is_bayesian(fit):
        draws = flat_draws(fit)
        eta = posterior_eta_draws(fit.population, draws)
        omega = draws["omega"].mean(0) if "omega" in draws else None
        return fit.population, None if eta is None else eta.mean(0), omega
    raise TypeError(f"expected a population fit (pk.PopulationModel(...).fit(data, method)), "
                    f"got {type(fit).__name__}")

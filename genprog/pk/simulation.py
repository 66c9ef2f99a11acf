"""Simulation from a fitted population model: new subjects' etas, residual errors and
replicate data sets at the design of the data (for VPC, NPDE and regimen simulation).
"""

from __future__ import annotations

import torch

from ..validation import check_int
from .likelihood import with_residual_error
from .population_fit import fit_data, laplace_objective, replicate_parameters

__all__ = ["new_etas", "percentile_label", "sigma_like", "simulate", "take_replicates"]


def take_replicates(values: dict, batched: bool, sl: slice) -> dict:
    return {k: v[sl] for k, v in values.items()} if batched else values


def sigma_like(sigma: dict, batched: bool, conc: torch.Tensor) -> dict:
    """Residual-error parameters shaped to broadcast against ``conc [n, ...]``."""
    if not batched:
        return sigma
    return {k: v.reshape(v.shape[0], *([1] * (conc.dim() - 1))) for k, v in sigma.items()}


def new_etas(obj, values, z: torch.Tensor) -> torch.Tensor | None:
    """Etas ``~ MVN(0, Omega)`` from standard normals ``z [n, S, P]`` (Omega per replicate
    when ``values`` are batched)."""
    if not obj.P:
        return None
    return z @ obj.scale_tril(values).transpose(-1, -2)  # [n, S, P] @ ([n,] P, P)


def simulate(fit, n_sim: int = 200, seed: int = 0) -> torch.Tensor:
    """Replicate data sets from a fitted model at the data's design.

    For each replicate, new etas ``~ MVN(0, Omega)`` per subject and new residual errors
    from the model's error model: at the estimated population parameters (point fit), or
    at a posterior draw picked at random per replicate (Bayesian fit, so parameter
    uncertainty is propagated); all replicates and subjects at once (vectorised).

    Parameters
    ----------
    fit : PopulationFit or PopulationBayesFit
    n_sim : int
        Number of replicates.
    seed : int
        Seed of the simulation's own generator (torch's global RNG is left untouched).

    Returns
    -------
    Tensor [n_sim, S, T]
        Simulated DV at every observation slot of the data (padding slots hold values too;
        mask them with ``fit.population.observation_mask(data)``), float64 on the
        data's device. No censoring is applied.
    """
    check_int("n_sim", n_sim)
    gen = torch.Generator(device=fit_data(fit).obs_dv.device).manual_seed(int(seed))
    pop, data, values, _, batched = replicate_parameters(fit, n_sim, gen)
    if pop.iov:
        raise NotImplementedError(
            "simulate (and vpc, npde): models with inter-occasion variability (iov=...) are "
            "not simulated yet; residuals() and CWRES do handle them"
        )
    obj = laplace_objective(pop, data)
    S, T = data.obs_dv.shape
    dtype = data.obs_dv.dtype
    z = torch.randn(n_sim, S, obj.P, generator=gen, device=gen.device, dtype=dtype)
    eps = torch.randn(n_sim, S, T, generator=gen, device=gen.device, dtype=dtype)
    D = max(int(data.dose_time.shape[-1]), 1)
    chunk = max(1, int(2e7 // (S * T * D)))
    out = []
    with torch.no_grad():
        for start in range(0, n_sim, chunk):
            sl = slice(start, start + chunk)
            v = take_replicates(values, batched, sl)
            typical, betas, sigma = obj.split(v)
            zc = z[sl]
            ind = pop.individual_parameters(typical, betas, new_etas(obj, v, zc), data)
            ind = {k: t.expand(zc.shape[0], S) for k, t in ind.items()}
            conc = pop.structure.concentration(ind, data)  # [n, S, T]
            out.append(with_residual_error(pop.error, conc, sigma_like(sigma, batched, conc), eps[sl]))
    return torch.cat(out, 0)


def percentile_label(q: float) -> str:
    return f"p{100 * q:g}".replace(".", "_")

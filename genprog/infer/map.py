"""Point estimates and their Gaussian approximations: MAP and Laplace.

Both optimise the model's :class:`~genprog.density.JointDensity` over the flat
unconstrained vector with L-BFGS (:func:`genprog.optim.maximize`). MAP maximises the
density of the constrained values (no Jacobian: the mode users expect); Laplace maximises
the density in unconstrained space and takes a Gaussian there with the inverse Hessian as
covariance, the approximation Pyro's ``AutoLaplaceApproximation`` makes.
"""

from __future__ import annotations

import math
import time
import warnings

import torch

from ..errors import ConvergenceWarning
from ..optim import OptimizationResult, maximize, symmetric_hessian
from ..rng import make_generator
from ..validation import check_int, check_seed
from .init import initial_points, nonfinite_sites
from .record import InferenceRecord


def check_finite_start(what: str, density, z0: torch.Tensor, jacobian: bool = True) -> None:
    """The log density must be finite at every starting point ``z0 [C, D]``; otherwise a
    ValueError naming the chains and the sites whose density is not finite."""
    with torch.no_grad():
        try:
            lp = density.log_joint(z0, jacobian=jacobian)
        except ValueError as e:
            raise ValueError(f"{what}: the model cannot be evaluated at the starting point: {e}") from None
    bad = (~torch.isfinite(lp)).nonzero().flatten().tolist()
    if not bad:
        return
    sites = nonfinite_sites(density, z0[bad[0]])
    where = f"; non-finite log density at site(s) {sites}" if sites else ""
    raise ValueError(
        f"{what}: the log density is {float(lp[bad[0]])} at the starting point of chain(s) "
        f"{bad[:10]}{where}. The model's density is zero or undefined there — check the "
        "observed data against each site's support and the priors, or give init={site: value}"
    )


def _check_result(what: str, res: OptimizationResult) -> None:
    """A non-finite optimum is an error, an unconverged one a warning."""
    if math.isnan(res.value) or res.value == -math.inf or not torch.isfinite(res.z).all():
        raise RuntimeError(
            f"{what} ended at a non-finite log density ({res.value}); the density is zero, "
            "NaN or unbounded along the optimiser's path — check the model and data"
        )
    if not res.converged:
        warnings.warn(
            f"{what} stopped unconverged after {res.num_iters} L-BFGS iterations "
            f"(objective {res.value:.6g}, max |gradient| {res.grad_norm:.3g}); the mode may not "
            "exist (an unbounded density, e.g. a hierarchical scale going to 0) or need more "
            "iterations (max_iters)",
            ConvergenceWarning,
            stacklevel=4,
        )


def _info(res: OptimizationResult, start: float) -> dict:
    return {"log_density": res.value, "converged": res.converged, "num_iters": res.num_iters,
            "grad_norm": res.grad_norm, "wall_time_s": time.perf_counter() - start,
            "objective_trace": list(res.trace)}


def map_estimate(model, *, seed: int = 0, max_iters: int = 1000, init="median"):
    """``(OptimizationResult, constrained values {site: [*shape]})`` of the MAP estimate."""
    density = model.density()
    g = make_generator(seed, model.device)
    z0 = initial_points(density, 1, init, g, jitter=0.0)[0]
    check_finite_start("MAP", density, z0[None], jacobian=False)
    res = maximize(lambda z: density.log_joint(z, jacobian=False), z0, max_iters)
    _check_result("MAP", res)
    with torch.no_grad():
        values, _ = density.constrain(res.z[None])
    return res, {k: v[0] for k, v in values.items()}


def fit_map(model, *, seed: int = 0, max_iters: int = 1000, init="median") -> InferenceRecord:
    """Maximum a posteriori estimate of every latent site.

    Parameters
    ----------
    model : genprog.Model
        A conditioned model.
    seed : int
        Seed for the prior draws that pick the starting point.
    max_iters : int
        Maximum L-BFGS iterations.
    init : "median" or dict
        Starting point (prior median, or constrained site values).

    Returns
    -------
    InferenceRecord
        ``unconstrained`` is ``[1, 1, D]``; ``info``: ``log_density``, ``converged``,
        ``num_iters``, ``grad_norm``, ``wall_time_s``, ``objective_trace``.

    Raises
    ------
    ValueError
        The density is not finite at the starting point.
    RuntimeError
        The optimiser ended at a non-finite density.
    """
    seed, max_iters = check_seed("fit('map'): seed", seed), check_int("fit('map'): max_iters", max_iters)
    start = time.perf_counter()
    res, _ = map_estimate(model, seed=seed, max_iters=max_iters, init=init)
    return InferenceRecord("map", res.z[None, None], info=_info(res, start), seed=seed)


def laplace_approximation(density, z0, max_iters=1000):
    """Mode, Hessian and covariance of the unconstrained posterior (with Jacobian).

    Returns
    -------
    (OptimizationResult, hessian [D, D], covariance [D, D])

    Raises
    ------
    ValueError
        When the Hessian at the mode is not positive definite.
    """
    check_finite_start("Laplace", density, z0[None])
    res = maximize(lambda z: density.log_joint(z, jacobian=True), z0, max_iters)
    _check_result("Laplace mode search", res)
    hess, chol = symmetric_hessian(lambda z: -density.log_joint(z[None])[0], res.z)
    if chol is None:
        raise ValueError(
            "Laplace: the Hessian of -log p at the mode is not positive definite; the posterior "
            "is not locally Gaussian there (try 'vi' or 'nuts')"
        )
    cov = torch.cholesky_inverse(chol)
    return res, hess, cov


def fit_laplace(model, *, draws: int = 1000, seed: int = 0, max_iters: int = 1000,
                init="median", point: list | None = None) -> InferenceRecord:
    """Laplace approximation: a Gaussian at the mode of the unconstrained posterior.

    Parameters
    ----------
    model : genprog.Model
    draws : int
        Number of draws taken from the Gaussian (one chain).
    seed : int
    max_iters : int
    init : "median" or dict
    point : list of str, optional
        Sites held at their MAP estimate while the Gaussian covers the rest.

    Returns
    -------
    InferenceRecord
        ``info``: ``mode`` [D], ``hessian`` [D, D], ``covariance`` [D, D], ``log_density``,
        ``converged``, ``num_iters``, ``wall_time_s``.
    """
    draws = check_int("fit('laplace'): draws", draws)
    seed, max_iters = check_seed("fit('laplace'): seed", seed), check_int("fit('laplace'): max_iters", max_iters)
    start = time.perf_counter()
    model, held = hold_at_map(model, point, seed, max_iters)
    density = model.density()
    g = make_generator(seed, model.device)
    z0 = initial_points(density, 1, init, g, jitter=0.0)[0]
    res, hess, cov = laplace_approximation(density, z0, max_iters)
    eps = torch.randn(draws, density.dim, generator=g, device=z0.device, dtype=z0.dtype)
    z = res.z + eps @ torch.linalg.cholesky(cov).T
    info = {"mode": res.z, "hessian": hess, "covariance": cov, "log_density": res.value,
            "converged": res.converged, "num_iters": res.num_iters,
            "wall_time_s": time.perf_counter() - start}
    return InferenceRecord("laplace", z[None], held=held, info=info, seed=seed)


def hold_at_map(model, point, seed: int, max_iters: int = 1000):
    """The model with the ``point`` sites fixed at the joint MAP estimate, and those values
    (``(model, {})`` when ``point`` is empty)."""
    if not point:
        return model, {}
    _, values = map_estimate(model, seed=seed, max_iters=max_iters)
    held = {k: values[k] for k in point}
    return model.with_fixed(held), held

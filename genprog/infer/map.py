"""Point estimates and their Gaussian approximations: MAP and Laplace.

Both optimise the model's :class:`~genprog.density.JointDensity` over the flat
unconstrained vector with L-BFGS (strong Wolfe line search). MAP maximises the density
of the constrained values (no Jacobian: the mode users expect); Laplace maximises the
density in unconstrained space and takes a Gaussian there with the inverse Hessian as
covariance, the approximation Pyro's ``AutoLaplaceApproximation`` makes.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from ..errors import ConvergenceWarning
from .init import initial_points, make_generator


@dataclass(frozen=True)
class OptimizationResult:
    """Result of :func:`maximize`.

    Attributes
    ----------
    z : Tensor [D]
        The maximiser (unconstrained).
    value : float
        The objective at ``z``.
    grad_norm : float
        Max-abs gradient at ``z``.
    num_iters : int
        L-BFGS iterations.
    converged : bool
        Gradient below tolerance and objective finite.
    trace : tuple[float, ...]
        The objective after each outer round.
    """

    z: torch.Tensor
    value: float
    grad_norm: float
    num_iters: int
    converged: bool
    trace: tuple


def maximize(objective, z0: torch.Tensor, max_iters: int = 1000, grad_tol: float = 1e-5) -> OptimizationResult:
    """Maximise ``objective(z [1, D]) -> [1]`` from ``z0 [D]`` with L-BFGS.

    Runs rounds of 50 iterations until the max-abs gradient drops below ``grad_tol``
    (scaled by ``1 + |objective|``), the objective stops changing, or ``max_iters``.
    """
    z = z0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], lr=1.0, max_iter=50, history_size=20,
                            tolerance_grad=0.0, tolerance_change=0.0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        try:
            loss = -objective(z[None])[0]
        except ValueError as e:  # a distribution rejected a parameter (e.g. a scale of 0)
            if "Expected parameter" not in str(e) and "constraint" not in str(e):
                raise
            loss = None
        if loss is None or not torch.isfinite(loss):
            # a large finite loss with no gradient sends the line search back
            loss = z.new_tensor(1e30) + 0 * z.sum()
        loss.backward()
        return loss

    trace, iters, converged = [], 0, False
    grad_norm, value = float("inf"), float("nan")
    while iters < max_iters:
        before = z.detach().clone()
        try:
            opt.step(closure)
        except ValueError as e:
            if "Expected parameter" not in str(e) and "constraint" not in str(e):
                raise
            with torch.no_grad():
                z.copy_(before)
            break
        if not torch.isfinite(z).all():
            with torch.no_grad():
                z.copy_(before)
            break
        state = opt.state[opt._params[0]]
        iters = int(state.get("n_iter", iters + 50))
        val, g = _value_and_grad(objective, z)
        value = float(val.detach())
        grad_norm = float(g.abs().max()) if g.numel() else 0.0
        trace.append(value)
        if not torch.isfinite(val):
            break
        if grad_norm <= grad_tol * (1 + abs(value)):
            converged = True
            break
        if torch.equal(before, z.detach()):
            converged = grad_norm <= 1e-3 * (1 + abs(value))
            break
    if not converged:
        val, g = _value_and_grad(objective, z)
        value = float(val.detach())
        grad_norm = float(g.abs().max()) if g.numel() else 0.0
    return OptimizationResult(z.detach(), value, grad_norm, iters, converged, tuple(trace))


def _value_and_grad(objective, z):
    with torch.enable_grad():
        zz = z.detach().clone().requires_grad_(True)
        try:
            val = objective(zz[None])[0]
        except ValueError:
            return zz.new_tensor(float("-inf")), torch.full_like(zz, float("nan"))
        if not val.requires_grad:
            return val, torch.zeros_like(zz)
        g, = torch.autograd.grad(val, zz)
    return val, g


def _warn_unconverged(what: str, res: OptimizationResult):
    if not res.converged:
        warnings.warn(
            f"{what} stopped unconverged after {res.num_iters} L-BFGS iterations "
            f"(objective {res.value:.6g}, max |gradient| {res.grad_norm:.3g}); the mode may not "
            "exist (an unbounded density, e.g. a hierarchical scale going to 0) or need more "
            "iterations (max_iters)",
            ConvergenceWarning,
            stacklevel=4,
        )


def fit_map(model, *, seed: int = 0, max_iters: int = 1000, init="median"):
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
    genprog.Fit
        ``draws`` have shape ``[1, 1, ...]``; ``info`` holds the optimisation record.
    """
    from ..fit import Fit

    start = time.perf_counter()
    density = model.density()
    g = make_generator(seed, model.device)
    z0 = initial_points(density, 1, init, g, jitter=0.0)[0]
    res = maximize(lambda z: density.log_joint(z, jacobian=False), z0, max_iters)
    _warn_unconverged("MAP", res)
    info = {"log_density": res.value, "converged": res.converged, "num_iters": res.num_iters,
            "grad_norm": res.grad_norm, "wall_time_s": time.perf_counter() - start,
            "objective_trace": list(res.trace)}
    return Fit.from_unconstrained(model, "map", res.z[None, None], seed=seed, info=info)


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
    res = maximize(lambda z: density.log_joint(z, jacobian=True), z0, max_iters)
    with torch.enable_grad():
        hess = torch.autograd.functional.hessian(lambda z: -density.log_joint(z[None])[0], res.z)
    hess = 0.5 * (hess + hess.T)
    chol, bad = torch.linalg.cholesky_ex(hess)
    if bad or not torch.isfinite(hess).all():
        raise ValueError(
            "Laplace: the Hessian of -log p at the mode is not positive definite; the posterior "
            "is not locally Gaussian there (try 'vi' or 'nuts')"
        )
    cov = torch.cholesky_inverse(chol)
    return res, hess, cov


def fit_laplace(model, *, draws: int = 1000, seed: int = 0, max_iters: int = 1000,
                init="median", point: list | None = None):
    """Laplace approximation: a Gaussian at the mode of the unconstrained posterior.

    Parameters
    ----------
    model : genprog.Model
    draws : int
        Number of draws taken from the Gaussian into ``Fit.draws`` (one chain).
    seed : int
    max_iters : int
    init : "median" or dict
    point : list of str, optional
        Sites held at their MAP estimate while the Gaussian covers the rest.

    Returns
    -------
    genprog.Fit
        ``info`` holds ``mode`` [D], ``hessian`` [D, D] and ``covariance`` [D, D].
    """
    from ..fit import Fit

    start = time.perf_counter()
    held = {}
    if point:
        model, held = _hold_at_map(model, point, seed, max_iters)
    density = model.density()
    g = make_generator(seed, model.device)
    z0 = initial_points(density, 1, init, g, jitter=0.0)[0]
    res, hess, cov = laplace_approximation(density, z0, max_iters)
    _warn_unconverged("Laplace mode search", res)
    eps = torch.randn(draws, density.dim, generator=g, device=z0.device, dtype=z0.dtype)
    z = res.z + eps @ torch.linalg.cholesky(cov).T
    info = {"mode": res.z, "hessian": hess, "covariance": cov, "log_density": res.value,
            "converged": res.converged, "num_iters": res.num_iters,
            "wall_time_s": time.perf_counter() - start}
    return Fit.from_unconstrained(model, "laplace", z[None], seed=seed, info=info, point=held)


def _hold_at_map(model, point, seed, max_iters):
    """The model with ``point`` sites fixed at the joint MAP estimate, and those values."""
    fit = fit_map(model, seed=seed, max_iters=max_iters)
    values = {k: fit.draws[k][0, 0] for k in point}
    return model._replace(fixed={**model.fixed, **values}), values

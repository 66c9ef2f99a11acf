"""Marginal likelihood (evidence) estimators on a batched target.

Every estimator returns an :class:`~genprog.estimate.Estimate` whose ``value`` is an
estimate of ``log p(observed)`` in nats, with its standard error and diagnostics.

* :func:`importance_sampling` -- simple importance sampling from the prior or a guide.
* :func:`annealed_importance_sampling` -- Neal's AIS, prior to posterior, HMC transitions.
* :func:`laplace_evidence` -- Laplace approximation at a mode (deterministic).
* :func:`find_mode` -- L-BFGS maximisation of the log joint, for Laplace.

They work on any object satisfying :class:`EvidenceTarget`: a prior density, a likelihood
and exact prior draws, all in the unconstrained space and batched over a leading dimension.
Computation happens in the dtype and on the device of the prior draws; random numbers come
from a ``torch.Generator`` seeded with the explicit ``seed`` argument, created on
``target.device`` (``"cpu"`` when the target has no ``device`` attribute).

Examples
--------
One observation ``y = 1`` of ``N(mu, 1)`` with ``mu ~ N(0, 1)``, so that ``y ~ N(0, 2)``:

>>> import torch
>>> from torch.distributions import Normal
>>> class Target:
...     dim = 1
...     def log_prior(self, z):
...         return Normal(0.0, 1.0).log_prob(z[:, 0])
...     def log_likelihood(self, z):
...         return Normal(z[:, 0], 1.0).log_prob(torch.tensor(1.0))
...     def sample_prior(self, n, generator):
...         return torch.randn(n, 1, generator=generator)
>>> exact = Normal(0.0, 2.0**0.5).log_prob(torch.tensor(1.0)).item()
>>> est = importance_sampling(Target(), num_samples=20_000, seed=1)
>>> abs(est.value - exact) < 4 * est.stderr
True
>>> ais = annealed_importance_sampling(Target(), num_particles=128, num_temps=50, seed=1)
>>> abs(ais.value - exact) < 4 * ais.stderr
True
>>> lap = laplace_evidence(Target(), find_mode(Target()))
>>> abs(lap.value - exact) < 1e-4  # exact: the posterior is Gaussian
True
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from genprog.errors import EstimatorWarning
from genprog.estimate import Estimate
from genprog.infer.hmc import hmc_step
from genprog.monte_carlo import log_mean_exp
from genprog.optim import maximize, symmetric_hessian
from genprog.rng import make_generator
from genprog.validation import check_int

__all__ = [
    "EstimatorWarning",
    "EvidenceTarget",
    "Proposal",
    "annealed_importance_sampling",
    "find_mode",
    "importance_sampling",
    "laplace_evidence",
]

#: Kish ESS below this fraction of the sample size triggers an :class:`EstimatorWarning`.
ESS_WARN_FRACTION = 0.01
#: AIS step-size adaptation: target mean acceptance probability, and the gain of the
#: update ``log(step) += gain * (acceptance - target)`` applied after every temperature.
_TARGET_ACCEPT = 0.65
_ADAPT_GAIN = 1.0
_MIN_STEP, _MAX_STEP = 1e-6, 1e3
#: Laplace / find_mode: a Newton decrement ``0.5 g^T H^-1 g`` above this (nats) at the
#: supplied mode means it is not a maximum to the precision Laplace needs.
_NEWTON_DECREMENT_WARN = 1e-2
#: Prior draws whose coordinate-wise median initialises :func:`find_mode`.
_NUM_INIT_DRAWS = 16
_SCHEDULES = ("sigmoid", "linear", "geometric")


@runtime_checkable
class EvidenceTarget(Protocol):
    """A Bayesian model seen in ``D`` unconstrained coordinates, batched over ``B`` points.

    Attributes
    ----------
    dim : int
        Number ``D`` of unconstrained coordinates.

    Optionally the target has a ``device`` attribute (``torch.device`` or str): random
    generators are created there. Without it they are created on the CPU.
    """

    dim: int

    def log_prior(self, z: Tensor) -> Tensor:
        """``[B, D] -> [B]``: log prior density of unconstrained ``z``, including the
        log |Jacobian| of the constraining transform."""
        ...

    def log_likelihood(self, z: Tensor) -> Tensor:
        """``[B, D] -> [B]``: ``log p(observed | z)``."""
        ...

    def sample_prior(self, n: int, generator: torch.Generator) -> Tensor:
        """``[n, D]`` exact prior draws in unconstrained space."""
        ...


@runtime_checkable
class Proposal(Protocol):
    """An importance sampling proposal (a guide) in the target's unconstrained space."""

    def sample_and_log_prob(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Draw ``z [n, D]`` and return it with its log density ``log_q [n]``."""
        ...


# --------------------------------------------------------------------------- helpers


def _check_target(target: object) -> None:
    if not isinstance(target, EvidenceTarget):
        raise TypeError(
            "target must satisfy EvidenceTarget (attribute `dim`, methods `log_prior`, "
            f"`log_likelihood`, `sample_prior`); got {type(target).__name__}"
        )
    if not isinstance(target.dim, int) or target.dim < 1:
        raise ValueError(f"target.dim must be a positive int, got {target.dim!r}")


def _make_generator(target: object, seed: int) -> torch.Generator:
    return make_generator(seed, torch.device(getattr(target, "device", None) or "cpu"))


def _check_batch(name: str, value: Tensor, shape: tuple[int, ...]) -> None:
    if not torch.is_tensor(value) or tuple(value.shape) != shape:
        got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise ValueError(f"{name} must return shape {list(shape)}, got {got}")


def _sample_prior(target: EvidenceTarget, n: int, generator: torch.Generator) -> Tensor:
    z = target.sample_prior(n, generator)
    _check_batch("target.sample_prior", z, (n, target.dim))
    if not z.is_floating_point():
        raise ValueError(f"target.sample_prior must return floating point draws, got {z.dtype}")
    return z.detach()


def _log_mean_exp_stats(log_w: Tensor) -> tuple[float, float, float]:
    """``(log mean w, its delta-method stderr, Kish ESS)`` of log-weights ``[N]`` as floats
    (see :func:`genprog.monte_carlo.log_mean_exp`)."""
    r = log_mean_exp(log_w)
    return float(r.value), float(r.stderr), float(r.ess)


def _pareto_k(log_w: Tensor) -> float | None:
    """PSIS shape ``k`` of the weights' upper tail (ArviZ), or None if it can't be fitted."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import arviz

            _, k = arviz.psislw(log_w.detach().to(torch.float64).cpu().numpy())
    except Exception:  # noqa: BLE001 -- a diagnostic only; never fail the estimate for it
        return None
    k = float(k)
    return k if math.isfinite(k) else None


def _finite_or_neg_inf(x: Tensor) -> Tensor:
    """NaN and +-inf -> -inf (zero weight)."""
    return torch.where(torch.isfinite(x), x, torch.full_like(x, -math.inf))


def _raise_all_zero(method: str, num: int, num_nan: int, what: str) -> None:
    raise RuntimeError(
        f"{method}: all {num} {what} have zero weight (log-weight -inf or NaN, i.e. a "
        f"NaN/infinite log-likelihood or log-weight; {num_nan} NaN evaluations seen), so "
        "log p(observed) cannot be estimated. Check that target.log_likelihood is finite "
        "on the prior's support (and the proposal's log density, if any)."
    )


def _warn_low_ess(method: str, ess: float, n: int, pareto_k: float | None = None) -> None:
    if ess < ESS_WARN_FRACTION * n:
        k = "" if pareto_k is None else f", Pareto k = {pareto_k:.2f}"
        warnings.warn(
            f"{method}: effective sample size {ess:.1f} is below {ESS_WARN_FRACTION:.0%} of "
            f"the {n} samples{k}; the estimate and its stderr are unreliable (the stderr is "
            "likely far too small). Use a better proposal or more samples/temperatures.",
            EstimatorWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- IS


def importance_sampling(
    target: EvidenceTarget,
    num_samples: int = 10_000,
    proposal: Proposal | None = None,
    seed: int = 0,
    batch_size: int = 4096,
) -> Estimate:
    """Importance sampling estimate of ``log p(observed)``.

    With ``proposal=None`` draws come from the prior and the weights are the likelihoods;
    otherwise ``w = p(z) p(observed | z) / q(z)``. The estimate is ``log mean(w)``.

    Parameters
    ----------
    target : EvidenceTarget
        The model.
    num_samples : int
        Number ``N`` of importance samples.
    proposal : Proposal, optional
        Object with ``sample_and_log_prob(n, generator) -> (z [n, D], log_q [n])``, ``log_q``
        the proposal's log density in the target's unconstrained space.
    seed : int
        Seed of the ``torch.Generator`` (on ``target.device``) used for every draw.
    batch_size : int
        Samples evaluated at once (memory bound); the draws depend on it.

    Returns
    -------
    Estimate
        ``method="is"``; ``stderr`` is the delta-method standard error of ``log mean(w)``,
        ``sd(w) / (sqrt(N) mean(w))``. ``details``: ``ess`` (Kish, ``(sum w)^2 / sum w^2``),
        ``proposal`` (``"prior"`` or ``"guide"``), ``pareto_k`` (PSIS tail shape from
        ArviZ; above 0.7 the stderr is not trustworthy; None when it cannot be fitted),
        ``num_zero_weight`` (samples with NaN/infinite log-weight, counted as weight 0).

    Warns
    -----
    EstimatorWarning
        When the ESS is below 1% of ``num_samples``.

    Raises
    ------
    RuntimeError
        When every sample has zero (or NaN) weight.
    """
    start = time.perf_counter()
    _check_target(target)
    check_int("num_samples", num_samples)
    check_int("batch_size", batch_size)
    if proposal is not None and not isinstance(proposal, Proposal):
        raise TypeError(
            "proposal must have a method sample_and_log_prob(n, generator) -> (z, log_q); "
            f"got {type(proposal).__name__}"
        )
    generator = _make_generator(target, seed)
    chunks, nan_counts = [], []
    with torch.no_grad():
        remaining = num_samples
        while remaining > 0:
            n = min(batch_size, remaining)
            remaining -= n
            if proposal is None:
                z = _sample_prior(target, n, generator)
                log_w = target.log_likelihood(z)
                _check_batch("target.log_likelihood", log_w, (n,))
            else:
                z, log_q = proposal.sample_and_log_prob(n, generator)
                _check_batch("proposal.sample_and_log_prob (z)", z, (n, target.dim))
                _check_batch("proposal.sample_and_log_prob (log_q)", log_q, (n,))
                log_prior, log_lik = target.log_prior(z), target.log_likelihood(z)
                _check_batch("target.log_prior", log_prior, (n,))
                _check_batch("target.log_likelihood", log_lik, (n,))
                log_w = log_prior + log_lik - log_q
            nan_counts.append(torch.isnan(log_w).sum())
            chunks.append(_finite_or_neg_inf(log_w.detach()))
    log_w = torch.cat(chunks)
    alive = torch.isfinite(log_w)
    num_alive = int(alive.sum())
    if num_alive == 0:
        _raise_all_zero("importance_sampling", num_samples, int(sum(nan_counts)), "samples")
    value, stderr, ess = _log_mean_exp_stats(log_w)
    pareto_k = _pareto_k(log_w)
    _warn_low_ess("importance_sampling", ess, num_samples, pareto_k)
    return Estimate(
        value=value,
        stderr=stderr,
        method="is",
        num_samples=num_samples,
        num_evaluations=num_samples,
        wall_time_s=time.perf_counter() - start,
        details={
            "ess": ess,
            "proposal": "prior" if proposal is None else "guide",
            "pareto_k": pareto_k,
            "num_zero_weight": num_samples - num_alive,
            "batching": getattr(target, "batching", None),
        },
    )


# --------------------------------------------------------------------------- AIS


def _make_schedule(schedule: str | Sequence[float] | Tensor, num_temps: int) -> tuple[Tensor, str]:
    """Inverse temperatures ``0 = beta_0 < ... < beta_T = 1`` as a float64 CPU tensor."""
    if isinstance(schedule, str):
        if schedule not in _SCHEDULES:
            raise ValueError(
                f"schedule must be one of {_SCHEDULES} or a sequence, got {schedule!r}"
            )
        check_int("num_temps", num_temps)
        t = torch.linspace(0.0, 1.0, num_temps + 1, dtype=torch.float64)
        if schedule == "linear":
            betas = t
        elif schedule == "sigmoid":  # Grosse et al. (2015): dense at both ends
            delta = 4.0
            s = torch.sigmoid(delta * (2.0 * t - 1.0))
            betas = (s - s[0]) / (s[-1] - s[0])
        else:  # geometric from 1e-4 to 1, preceded by beta_0 = 0
            betas = torch.cat([t.new_zeros(1), torch.logspace(-4, 0, num_temps, dtype=t.dtype)])
        betas[0], betas[-1] = 0.0, 1.0
        return betas, schedule
    betas = torch.as_tensor(schedule, dtype=torch.float64).detach().cpu().reshape(-1)
    if (
        betas.numel() < 2
        or float(betas[0]) != 0.0
        or float(betas[-1]) != 1.0
        or not bool((betas[1:] > betas[:-1]).all())
    ):
        raise ValueError(
            "a custom schedule must be strictly increasing from 0.0 to 1.0 (at least 2 values)"
        )
    return betas, "custom"


def annealed_importance_sampling(
    target: EvidenceTarget,
    num_particles: int = 256,
    num_temps: int = 200,
    num_leapfrog: int = 5,
    seed: int = 0,
    schedule: str | Sequence[float] | Tensor = "sigmoid",
    num_runs: int | None = None,
) -> Estimate:
    """Annealed importance sampling (Neal, 2001) estimate of ``log p(observed)``.

    Particles start as exact prior draws and move through the tempered densities
    ``log pi_beta(z) = log p(z) + beta * log p(observed | z)`` for
    ``0 = beta_0 < beta_1 < ... < beta_T = 1``. Each accumulates the log-weight
    ``sum_t (beta_t - beta_{t-1}) log p(observed | z_{t-1})``, where ``z_t`` is obtained from
    ``z_{t-1}`` by one Metropolis-corrected HMC transition leaving ``pi_{beta_t}`` invariant
    (full momentum refresh, unit mass, ``num_leapfrog`` leapfrog steps).

    The step size is adapted after every temperature, ``log(step) += (a - 0.65)`` with
    ``a`` the mean acceptance probability of the run's live particles; it depends only on
    the past, so every transition still leaves its own ``pi_beta`` invariant. The initial
    step is half the smallest per-coordinate standard deviation of the prior draws.

    Parameters
    ----------
    target : EvidenceTarget
        The model; ``log_prior`` and ``log_likelihood`` must be differentiable by autograd.
    num_particles : int
        Particles per run.
    num_temps : int
        Number ``T`` of annealing steps (``T + 1`` inverse temperatures, ``T - 1`` HMC
        transitions: none is needed after the last weight increment). Ignored when
        ``schedule`` is a sequence.
    num_leapfrog : int
        Leapfrog steps per HMC transition.
    seed : int
        Seed of the ``torch.Generator`` (on ``target.device``).
    schedule : {"sigmoid", "linear", "geometric"} or sequence of float
        Spacing of the inverse temperatures: ``"sigmoid"`` (Grosse et al. 2015, dense near 0
        and 1), ``"linear"``, ``"geometric"`` (``beta_1 = 1e-4`` to 1, log-spaced), or the
        explicit increasing sequence ``[0.0, ..., 1.0]``.
    num_runs : int, optional
        Number ``R`` of independent runs of ``num_particles`` particles each, simulated as
        one batch, each with its own step-size adaptation. With ``R >= 2`` the stderr is
        the delta-method error computed from the ``R`` per-run evidence estimates (it then
        accounts for the coupling of particles through the shared step size); with ``None``
        (one run) it is computed from the particle weights.

    Returns
    -------
    Estimate
        ``method="ais"``, ``value = log mean(w)`` over all ``R * num_particles`` particles,
        ``num_samples`` that total. ``details``: ``ess`` (Kish ESS of all particle weights),
        ``schedule`` (name or ``"custom"``), ``num_temps``, ``num_leapfrog``, ``num_runs``,
        ``stderr_method`` (``"particles"`` or ``"runs"``), ``step_size`` (final, one float
        per run), ``acceptance_rate`` (mean acceptance probability over transitions and
        particles), ``num_zero_weight`` (particles whose likelihood was NaN or infinite, or
        that reached zero likelihood, counted as weight 0). ``num_evaluations`` counts
        evaluations of the log joint (with gradient) over all particles.

    Warns
    -----
    EstimatorWarning
        When the particles' Kish ESS is below 1% of their number.

    Raises
    ------
    RuntimeError
        When every particle has zero (or NaN) weight.
    """
    start = time.perf_counter()
    _check_target(target)
    check_int("num_particles", num_particles)
    check_int("num_leapfrog", num_leapfrog)
    if num_runs is not None:
        check_int("num_runs", num_runs)
    num_runs_ = 1 if num_runs is None else num_runs
    betas64, schedule_name = _make_schedule(schedule, num_temps)
    num_steps = betas64.numel() - 1
    generator = _make_generator(target, seed)
    batch = num_runs_ * num_particles

    z = _sample_prior(target, batch, generator)
    dtype, device = z.dtype, z.device
    betas = betas64.to(dtype=dtype, device=device)
    inv_mass = torch.ones(target.dim, dtype=dtype, device=device)
    with torch.no_grad():
        log_lik = target.log_likelihood(z).detach()
    _check_batch("target.log_likelihood", log_lik, (batch,))
    num_nan = torch.isnan(log_lik).sum()

    # Initial step size: half the smallest prior scale, per run.
    scale = z.reshape(num_runs_, num_particles, -1).std(dim=1) if num_particles > 1 else None
    if scale is None or not bool(torch.isfinite(scale).all()):
        scale = torch.ones(num_runs_, target.dim, dtype=dtype, device=device)
    log_step = torch.log((0.5 * scale.min(dim=1).values).clamp(_MIN_STEP, _MAX_STEP))

    cache: dict[str, Tensor] = {}
    beta_holder: dict[str, Tensor] = {}

    def potential_and_grad(x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            lp = target.log_prior(x)
            ll = target.log_likelihood(x)
            u = -(lp + beta_holder["beta"] * ll)
            (grad,) = torch.autograd.grad(u.sum(), x)
        cache["log_lik"] = ll.detach()
        return u.detach(), grad.detach()

    log_w = torch.zeros(batch, dtype=dtype, device=device)
    accept_sum = torch.zeros((), dtype=torch.float64, device=device)
    for t in range(1, num_steps + 1):
        new = log_w + (betas[t] - betas[t - 1]) * log_lik
        log_w = torch.where(torch.isfinite(log_lik), new, torch.full_like(new, -math.inf))
        if t == num_steps:
            break
        # One HMC transition leaving pi_{beta_t} invariant.
        beta_holder["beta"] = betas[t]
        step = torch.exp(log_step).repeat_interleave(num_particles)
        u0, grad = potential_and_grad(z)
        if t == 1:
            _check_batch("target.log_prior", u0, (batch,))
        # A particle whose trajectory diverges (non-finite energy) stops there and is
        # rejected; an accepted one ends where the potential was last evaluated.
        move = hmc_step(potential_and_grad, z, u0, grad, step, num_leapfrog, inv_mass, generator)
        z = move.z
        log_lik = torch.where(move.accepted, cache["log_lik"], log_lik)
        num_nan = num_nan + torch.isnan(cache["log_lik"]).sum()
        # Adapt the step size from this temperature's mean acceptance of live particles.
        prob = move.accept_prob.reshape(num_runs_, num_particles)
        alive = torch.isfinite(log_w).reshape(num_runs_, num_particles).to(dtype)
        mean_accept = (prob * alive).sum(1) / alive.sum(1).clamp(min=1.0)
        log_step = (log_step + _ADAPT_GAIN * (mean_accept - _TARGET_ACCEPT)).clamp(
            math.log(_MIN_STEP), math.log(_MAX_STEP)
        )
        accept_sum = accept_sum + mean_accept.to(torch.float64).mean()

    num_alive = int(torch.isfinite(log_w).sum())
    if num_alive == 0:
        _raise_all_zero("annealed_importance_sampling", batch, int(num_nan), "particles (all runs)")
    value, stderr, ess = _log_mean_exp_stats(log_w)
    if num_runs_ >= 2:
        per_run = log_mean_exp(log_w.reshape(num_runs_, num_particles)).value
        if bool(torch.isfinite(per_run).all()):
            _, stderr, _ = _log_mean_exp_stats(per_run)
        else:  # a run lost every particle: its estimate is 0, the delta method breaks down
            stderr = math.inf
    _warn_low_ess("annealed_importance_sampling", ess, batch)
    num_transitions = num_steps - 1
    return Estimate(
        value=value,
        stderr=stderr,
        method="ais",
        num_samples=batch,
        num_evaluations=batch * (1 + num_transitions * (num_leapfrog + 1)),
        wall_time_s=time.perf_counter() - start,
        details={
            "ess": ess,
            "schedule": schedule_name,
            "num_temps": num_steps,
            "num_leapfrog": num_leapfrog,
            "num_runs": num_runs_,
            "stderr_method": "runs" if num_runs_ >= 2 else "particles",
            "step_size": torch.exp(log_step).tolist(),
            "acceptance_rate": float(accept_sum) / num_transitions if num_transitions else None,
            "num_zero_weight": batch - num_alive,
            "batching": getattr(target, "batching", None),
        },
    )


# --------------------------------------------------------------------------- Laplace


def _neg_log_joint(target: EvidenceTarget, z: Tensor) -> Tensor:
    """``-(log p(z) + log p(observed | z))`` at one point ``z [D]`` (a 0-d tensor)."""
    x = z.unsqueeze(0)
    return -(target.log_prior(x) + target.log_likelihood(x)).squeeze(0)


def find_mode(
    target: EvidenceTarget,
    init: Tensor | None = None,
    max_iters: int = 500,
    seed: int = 0,
) -> Tensor:
    """Maximise ``log p(z) + log p(observed | z)`` over unconstrained ``z`` by L-BFGS.

    Parameters
    ----------
    target : EvidenceTarget
        The model (differentiable by autograd).
    init : Tensor [D], optional
        Starting point; default the coordinate-wise median of 16 prior draws.
    max_iters : int
        Maximum L-BFGS iterations (:func:`genprog.optim.maximize`).
    seed : int
        Seed for the prior draws of the default ``init``.

    Returns
    -------
    Tensor [D]
        The mode found, detached, in the dtype and on the device of ``init`` (or of the
        prior draws).

    Warns
    -----
    EstimatorWarning
        When the result is not a stationary point to the precision Laplace needs (Newton
        decrement ``0.5 g^T H^-1 g`` above 0.01 nats, or a gradient with no Hessian to judge).

    Raises
    ------
    ValueError
        When the log joint is not finite at ``init``.
    RuntimeError
        When the optimiser ends at a non-finite log joint.
    """
    _check_target(target)
    check_int("max_iters", max_iters)
    if init is None:
        draws = _sample_prior(target, _NUM_INIT_DRAWS, _make_generator(target, seed))
        init = draws.median(dim=0).values
    init = torch.as_tensor(init)
    if not init.is_floating_point():
        init = init.to(torch.get_default_dtype())
    _check_batch("find_mode init", init, (target.dim,))
    with torch.no_grad():
        f0 = _neg_log_joint(target, init)
    if not bool(torch.isfinite(f0)):
        raise ValueError(f"find_mode: the log joint is not finite at init (got {-float(f0)})")
    result = maximize(lambda z: target.log_prior(z) + target.log_likelihood(z), init.detach(),
                      max_iters, grad_tol=1e-9)
    mode = result.z
    with torch.no_grad():
        f = _neg_log_joint(target, mode)
    if not bool(torch.isfinite(f)):
        raise RuntimeError("find_mode: L-BFGS ended at a point where the log joint is not finite")
    _newton_decrement(target, mode, None, warn_as="find_mode")
    return mode


def _newton_decrement(
    target: EvidenceTarget, mode: Tensor, hessian: Tensor | None, warn_as: str
) -> float:
    """``0.5 g^T H^-1 g`` at ``mode`` (nats the log joint can still gain); warns if large."""
    with torch.enable_grad():
        x = mode.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_neg_log_joint(target, x), x)
    if hessian is None:
        hessian = torch.autograd.functional.hessian(lambda v: _neg_log_joint(target, v), mode)
    hessian = 0.5 * (hessian + hessian.T)
    chol, info = torch.linalg.cholesky_ex(hessian)
    if int(info) == 0 and bool(torch.isfinite(grad).all()):
        sol = torch.cholesky_solve(grad.unsqueeze(-1), chol).squeeze(-1)
        dec = 0.5 * float((grad * sol).sum())
    else:
        dec = math.inf
    if not dec <= _NEWTON_DECREMENT_WARN:
        warnings.warn(
            f"{warn_as}: the point is not a maximum of the log joint to Laplace precision "
            f"(Newton decrement {dec:.3g} nats, |grad| = {float(grad.norm()):.3g}); the "
            "Laplace evidence there is off by about that much or more.",
            EstimatorWarning,
            stacklevel=3,
        )
    return dec


def laplace_evidence(
    target: EvidenceTarget, mode: Tensor, hessian: Tensor | None = None
) -> Estimate:
    """Laplace approximation of ``log p(observed)`` at a mode of the log joint.

    ``log p(observed) ~= log p(observed, z*) + D/2 log(2 pi) - 1/2 log det H``, with ``H``
    the Hessian of ``-(log p(z) + log p(observed | z))`` at the mode ``z*``, in the
    unconstrained space (the prior includes the log |Jacobian|, so the result depends on
    the parametrisation unless the posterior is Gaussian there, where it is exact).

    Parameters
    ----------
    target : EvidenceTarget
        The model.
    mode : Tensor [D]
        A maximiser of the log joint, e.g. from :func:`find_mode`.
    hessian : Tensor [D, D], optional
        Hessian of the negative log joint at ``mode``; computed with
        ``torch.autograd.functional.hessian`` when omitted (it is symmetrised).

    Returns
    -------
    Estimate
        ``method="laplace"``, ``stderr=0.0`` (deterministic, bias unquantified).
        ``details``: ``note``, ``log_joint_at_mode``, ``logdet_hessian``,
        ``newton_decrement`` (``0.5 g^T H^-1 g`` at ``mode``: ~0 at a true mode).

    Warns
    -----
    EstimatorWarning
        When ``mode`` is not a stationary point (Newton decrement above 0.01 nats).

    Raises
    ------
    ValueError
        When ``H`` is not symmetric positive definite, not finite, or of the wrong shape,
        or when the log joint is not finite at ``mode``.
    """
    start = time.perf_counter()
    _check_target(target)
    mode = torch.as_tensor(mode).detach()
    _check_batch("laplace_evidence mode", mode, (target.dim,))
    dim = target.dim
    with torch.no_grad():
        log_joint = -_neg_log_joint(target, mode)
    if not bool(torch.isfinite(log_joint)):
        raise ValueError(f"laplace_evidence: the log joint at mode is {float(log_joint)}")
    num_evaluations = 1 + dim if hessian is None else 1
    if hessian is not None:
        hessian = torch.as_tensor(hessian, dtype=mode.dtype, device=mode.device)
        if tuple(hessian.shape) != (dim, dim):
            raise ValueError(
                f"laplace_evidence: hessian must have shape [{dim}, {dim}], "
                f"got {list(hessian.shape)}"
            )
    hessian, chol = symmetric_hessian(lambda v: _neg_log_joint(target, v), mode, hessian)
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("laplace_evidence: the Hessian at the mode has non-finite entries")
    if chol is None:
        min_eig = float(torch.linalg.eigvalsh(hessian).min())
        raise ValueError(
            "laplace_evidence: the Hessian of the negative log joint at the mode is not "
            f"positive definite (smallest eigenvalue {min_eig:.4g}); the point is not a strict "
            "local maximum, or the posterior is improper/flat in some direction."
        )
    logdet = 2.0 * torch.log(torch.diagonal(chol)).sum()
    value = log_joint + 0.5 * dim * math.log(2.0 * math.pi) - 0.5 * logdet
    decrement = _newton_decrement(target, mode, hessian, warn_as="laplace_evidence")
    return Estimate(
        value=float(value),
        stderr=0.0,
        method="laplace",
        num_samples=0,
        num_evaluations=num_evaluations,
        wall_time_s=time.perf_counter() - start,
        details={
            "note": (
                "deterministic Laplace approximation in the unconstrained space: exact for a "
                "Gaussian posterior, otherwise biased by an unquantified amount (stderr 0)"
            ),
            "log_joint_at_mode": float(log_joint),
            "logdet_hessian": float(logdet),
            "newton_decrement": decrement,
            "batching": getattr(target, "batching", None),
        },
    )

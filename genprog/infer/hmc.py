"""Static (fixed-length) HMC with chains as a batch dimension.

One transition draws a momentum, integrates a fixed number of leapfrog steps
(:func:`genprog.infer.hamiltonian.integrate`) and accepts the end point with the
Metropolis probability ``min(1, exp(H0 - H1))``. :func:`hmc_step` is that move for a
batch of chains; :func:`sample_hmc` runs it with Stan's warmup
(:func:`genprog.infer.sampler.run_chains`), and ChEES (:mod:`genprog.infer.chees`) and
AIS (:mod:`genprog.infer.evidence`) run it with their own adaptation.

References: Neal (2011), *MCMC using Hamiltonian dynamics*, Handbook of MCMC, ch. 5.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .hamiltonian import BatchedPotential, Trajectory, integrate, kinetic_energy, sample_momentum
from .sampler import (
    SamplerResult,
    Transition,
    check_count,
    check_sampler_args,
    per_chain,
    run_chains,
)

__all__ = ["HMCStep", "hmc_step", "sample_hmc"]

#: leapfrog steps per transition when neither ``num_steps`` nor ``trajectory_length`` is given
DEFAULT_NUM_STEPS = 10
#: cap on ``trajectory_length / step_size``
MAX_NUM_STEPS = 1024


class HMCStep(NamedTuple):
    """One Metropolis-corrected HMC move of every chain.

    Attributes
    ----------
    z, U, grad : Tensor [B, D], [B], [B, D]
        The new state (the proposal where accepted, else the old state).
    accept_prob : Tensor [B]
        Metropolis acceptance probability (0 for a diverging chain).
    accepted : Tensor [B], bool
        Whether the proposal was accepted.
    diverging : Tensor [B], bool
    energy : Tensor [B]
        Hamiltonian at the start, after the momentum refresh.
    proposal : Trajectory
        End of the integration, before the Metropolis test (with its momentum and
        ``n_steps``, the steps each chain integrated).
    """

    z: Tensor
    U: Tensor
    grad: Tensor
    accept_prob: Tensor
    accepted: Tensor
    diverging: Tensor
    energy: Tensor
    proposal: Trajectory


def hmc_step(
    potential_and_grad: BatchedPotential,
    z: Tensor,
    U: Tensor,
    grad: Tensor,
    step_size: Tensor | float,
    num_steps: int | Tensor,
    inv_mass: Tensor,
    generator: torch.Generator | None,
    max_energy_error: float = 1000.0,
) -> HMCStep:
    """One Metropolis-corrected HMC move for every chain (or particle) at once.

    Draws ``r ~ N(0, M)``, integrates ``num_steps`` leapfrog steps and accepts the end
    point with probability ``min(1, exp(H0 - H1))``. A chain whose energy error exceeds
    ``max_energy_error`` or becomes non-finite (NaN/inf potential, gradient or
    position) is *diverging*: its trajectory stops there, the move is rejected and its
    state never sees the non-finite values. Leaves ``exp(-U)`` invariant.

    Parameters
    ----------
    potential_and_grad : callable ``z [B, D] -> (U [B], grad [B, D])``
    z, U, grad : Tensor [B, D], [B], [B, D]
        Current state (finite).
    step_size : float or Tensor [B]
    num_steps : int or Tensor [B] (long)
        Leapfrog steps; per chain when a tensor.
    inv_mass : Tensor [B, D] or [D]
    generator : torch.Generator or None
    max_energy_error : float
        Divergence threshold on ``H - H0``.

    Returns
    -------
    HMCStep
        The new state, the acceptance probabilities (0 for diverging chains), and the
        end of the integration.

    Examples
    --------
    >>> import torch
    >>> pg = lambda z: (0.5 * (z**2).sum(-1), z)
    >>> g = torch.Generator().manual_seed(0)
    >>> z = torch.randn(100, 3, generator=g)
    >>> U, grad = pg(z)
    >>> s = hmc_step(pg, z, U, grad, 0.3, 5, torch.ones(3), g)
    >>> s.z.shape, bool(s.diverging.any())
    (torch.Size([100, 3]), False)
    """
    B = z.shape[0]
    step_size = per_chain(step_size, z, "step_size")
    r0 = sample_momentum(z, inv_mass, generator)
    H0 = U + kinetic_energy(r0, inv_mass)
    end = integrate(potential_and_grad, z, r0, U, grad, step_size, num_steps, inv_mass, H0,
                    max_energy_error)
    # a diverged chain is frozen at its last finite state and rejected
    accept_prob = torch.where(end.diverging, 0.0, torch.exp(-end.energy_error).clamp(max=1.0))
    accept = torch.rand(B, generator=generator, dtype=z.dtype, device=z.device) < accept_prob
    a = accept.unsqueeze(-1)
    return HMCStep(torch.where(a, end.z, z), torch.where(accept, end.U, U),
                   torch.where(a, end.grad, grad), accept_prob, accept, end.diverging, H0, end)


def sample_hmc(
    potential_and_grad: BatchedPotential, init: Tensor, *,
    warmup: int = 1000, draws: int = 1000, generator: torch.Generator | None = None,
    num_steps: int | None = None, trajectory_length: float | None = None,
    step_size_jitter: float = 0.2, target_accept: float = 0.8,
    adapt_mass: bool = True, dense_mass: bool = False,
    init_step_size: Tensor | float | None = None, max_energy_error: float = 1000.0,
    progress: bool = False, threads: int | None = None,
) -> SamplerResult:
    """Run static HMC on many chains at once, with the same warmup as
    :func:`genprog.infer.nuts.sample_nuts`.

    Parameters
    ----------
    potential_and_grad, init, warmup, draws, generator, target_accept, adapt_mass,
    dense_mass, init_step_size, max_energy_error, progress, threads
        As in :func:`genprog.infer.nuts.sample_nuts`.
    num_steps : int, optional
        Leapfrog steps per transition (default 10 when ``trajectory_length`` is not
        given either).
    trajectory_length : float, optional
        Integration time instead: each chain takes ``round(trajectory_length /
        step_size)`` steps (at least 1, at most 1024) with its current step size.
        Mutually exclusive with ``num_steps``.
    step_size_jitter : float
        Each transition multiplies every chain's step size by an independent
        ``Uniform(1 - jitter, 1 + jitter)`` factor (Stan's ``stepsize_jitter``; the
        number of steps is not changed), which randomises the integration time and
        breaks the resonances that make fixed-length HMC mix badly on near-Gaussian
        targets (Mackenzie 1989; Neal 2011, section 5.4.2.1). ``0`` disables it.

    Returns
    -------
    SamplerResult
        ``tree_depth`` is all zeros; ``n_steps`` counts the leapfrog steps each chain
        integrated (fewer than requested when the trajectory diverged).

    Examples
    --------
    >>> import torch
    >>> pg = lambda z: (0.5 * (z**2).sum(-1), z)
    >>> res = sample_hmc(pg, torch.zeros(4, 2), warmup=50, draws=20, num_steps=5)
    >>> res.samples.shape
    torch.Size([4, 20, 2])
    """
    check_sampler_args(init, target_accept, max_energy_error)
    warmup, draws = check_count("warmup", warmup), check_count("draws", draws)
    if num_steps is not None and trajectory_length is not None:
        raise ValueError("give num_steps or trajectory_length, not both")
    if trajectory_length is None:
        num_steps = check_count("num_steps", DEFAULT_NUM_STEPS if num_steps is None else num_steps,
                                minimum=1)
    elif not float(trajectory_length) > 0:
        raise ValueError(f"trajectory_length must be positive, got {trajectory_length!r}")
    if not 0.0 <= float(step_size_jitter) < 1.0:
        raise ValueError(f"step_size_jitter must be in [0, 1), got {step_size_jitter!r}")

    def step(pg, z, U, grad, eps, inv_mass, gen):
        if trajectory_length is None:
            steps = num_steps
        else:
            steps = torch.round(trajectory_length / eps).clamp(1, MAX_NUM_STEPS).long()
        if step_size_jitter > 0:
            u = torch.rand(eps.shape, generator=gen, dtype=eps.dtype, device=eps.device)
            eps = eps * (1.0 + step_size_jitter * (2.0 * u - 1.0))
        s = hmc_step(pg, z, U, grad, eps, steps, inv_mass, gen, max_energy_error)
        n_max = steps if isinstance(steps, int) else int(steps.max())
        return Transition(s.z, s.U, s.grad, s.accept_prob, s.diverging, s.energy,
                          torch.zeros_like(s.proposal.n_steps), s.proposal.n_steps, n_max)

    return run_chains(step, potential_and_grad, init, warmup=warmup, draws=draws,
                      generator=generator, target_accept=target_accept, adapt_mass=adapt_mass,
                      dense_mass=bool(dense_mass), init_step_size=init_step_size,
                      progress=progress, name="hmc", threads=threads)

"""Hamiltonian primitives on a batched potential, shared by NUTS, HMC, ChEES and AIS.

A *batched potential* is a callable ``potential_and_grad(z) -> (U, grad)`` with
``z`` of shape ``[B, D]`` (B independent chains or particles, D unconstrained
coordinates), ``U`` of shape ``[B]`` (potential energy, i.e. minus the log density
up to a constant) and ``grad`` of shape ``[B, D]`` (dU/dz). A non-finite ``U`` means
zero density; such a point is never accepted.

The mass matrix is diagonal, stored as its inverse ``inv_mass`` of shape ``[B, D]``
(one per chain) or ``[D]`` (shared); momenta ``r`` have the same shape as ``z``. A dense
mass matrix is handled by a change of coordinates instead (:func:`whiten`): HMC with
inverse mass ``Sigma = L L^T`` on ``z`` is HMC with the identity mass on ``x = L^-1 z``
(Neal 2011, section 4.1), step for step and draw for draw.

The integrator is :func:`leapfrog` (one step); :func:`integrate` runs a fixed number of
steps with divergence handling and is the trajectory of static HMC, ChEES and AIS, while
NUTS extends its trees one :func:`leapfrog` step at a time. Both judge a state by
:func:`energy_error`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "BatchedPotential",
    "Trajectory",
    "energy_error",
    "integrate",
    "kinetic_energy",
    "leapfrog",
    "sample_momentum",
    "whiten",
]

BatchedPotential = Callable[[Tensor], tuple[Tensor, Tensor]]


def kinetic_energy(r: Tensor, inv_mass: Tensor) -> Tensor:
    """Kinetic energy ``0.5 * r^T M^{-1} r`` per chain: ``[B, D] -> [B]``."""
    return 0.5 * (r * r * inv_mass).sum(-1)


def sample_momentum(z: Tensor, inv_mass: Tensor, generator: torch.Generator | None) -> Tensor:
    """Draw ``r ~ Normal(0, M)`` with ``M = 1 / inv_mass`` (diagonal); shape of ``z``."""
    eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return eps / inv_mass.sqrt()


def leapfrog(
    potential_and_grad: BatchedPotential,
    z: Tensor,
    r: Tensor,
    grad: Tensor,
    step_size: Tensor,
    inv_mass: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One velocity-Verlet step for every chain at once.

    Parameters
    ----------
    z, r, grad : Tensor [B, D]
        Position, momentum and dU/dz at ``z``.
    step_size : Tensor [B] or scalar
        Per-chain step size (negative steps integrate backwards in time).
    inv_mass : Tensor [B, D] or [D]
        Diagonal inverse mass matrix.

    Returns
    -------
    z, r, U, grad : new position [B, D], momentum [B, D], potential [B], gradient [B, D].
    """
    eps = step_size.unsqueeze(-1) if torch.is_tensor(step_size) and step_size.dim() else step_size
    r = r - 0.5 * eps * grad
    z = z + eps * inv_mass * r
    U, grad = potential_and_grad(z)
    r = r - 0.5 * eps * grad
    return z, r, U, grad


def energy_error(H0: Tensor, U: Tensor, r: Tensor, inv_mass: Tensor, state: Tensor) -> Tensor:
    """``H - H0`` per chain, ``+inf`` wherever the new state is not usable.

    Parameters
    ----------
    H0 : Tensor [B]
        Hamiltonian at the start of the trajectory.
    U, r : Tensor [B], [B, D]
        Potential and momentum of the new state.
    inv_mass : Tensor [B, D] or [D]
    state : Tensor [B, ...]
        Everything else that must be finite (position and gradient, e.g. stacked): a NaN
        or inf anywhere in it makes the error ``+inf`` (the sum ``0 * state`` is non-finite
        then, or overflows to ``~1e38``, both above any divergence threshold).

    Returns
    -------
    Tensor [B]
        Energy error; a chain whose error exceeds the divergence threshold diverged.
    """
    H = U + kinetic_energy(r, inv_mass)
    dims = tuple(range(1, state.dim()))
    inf = math.inf
    return torch.nan_to_num(H - H0 + 0.0 * state.sum(dims), nan=inf, posinf=inf, neginf=inf)


class Trajectory(NamedTuple):
    """End of :func:`integrate` for every chain.

    Attributes
    ----------
    z, r, U, grad : Tensor [B, D], [B, D], [B], [B, D]
        Last state with an energy error within the threshold (the start for a chain
        that diverged at its first step).
    energy_error : Tensor [B]
        ``H - H0`` of that state.
    diverging : Tensor [B], bool
        Whether the chain's trajectory diverged (and stopped there).
    n_steps : Tensor [B], long
        Leapfrog steps the chain integrated, the divergent one included.
    """

    z: Tensor
    r: Tensor
    U: Tensor
    grad: Tensor
    energy_error: Tensor
    diverging: Tensor
    n_steps: Tensor


def integrate(
    potential_and_grad: BatchedPotential,
    z: Tensor,
    r: Tensor,
    U: Tensor,
    grad: Tensor,
    step_size: Tensor | float,
    num_steps: int | Tensor,
    inv_mass: Tensor,
    H0: Tensor,
    max_energy_error: float = 1000.0,
) -> Trajectory:
    """``num_steps`` leapfrog steps for every chain; a chain stops at a divergence.

    A chain *diverges* when the energy error of a new state exceeds ``max_energy_error``
    or is not finite (NaN/inf potential, gradient or position); it then keeps its last
    good state, which never sees the non-finite values. All chains advance in lockstep:
    each step is one call of ``potential_and_grad`` for the whole batch, and a finished
    chain's results are discarded.

    Parameters
    ----------
    potential_and_grad : callable ``z [B, D] -> (U [B], grad [B, D])``
    z, r, U, grad : Tensor [B, D], [B, D], [B], [B, D]
        Start of the trajectory (finite).
    step_size : float or Tensor [B]
    num_steps : int or Tensor [B] (long)
        Steps per chain; a tensor costs one host sync (its maximum).
    inv_mass : Tensor [B, D] or [D]
    H0 : Tensor [B]
        Hamiltonian at the start.
    max_energy_error : float
        Divergence threshold on ``H - H0``.

    Returns
    -------
    Trajectory

    Examples
    --------
    >>> import torch
    >>> pg = lambda z: (0.5 * (z**2).sum(-1), z)
    >>> z = torch.ones(2, 3); r = torch.zeros(2, 3); U, g = pg(z)
    >>> t = integrate(pg, z, r, U, g, 0.1, 5, torch.ones(3), U)
    >>> t.n_steps.tolist(), bool(t.diverging.any())
    ([5, 5], False)
    """
    B = z.shape[0]
    dev = z.device
    per_chain = torch.is_tensor(num_steps)
    if per_chain:
        steps = num_steps.to(device=dev, dtype=torch.long).expand(B)
        n_max = int(steps.max())  # one host sync per trajectory
    else:
        n_max = int(num_steps)
    eps = torch.as_tensor(step_size, dtype=z.dtype, device=dev).expand(B)
    cur = torch.stack([z, r, grad], 1)  # [B, 3, D] = (z, r, grad)
    cur_U, cur_delta = U, torch.zeros_like(H0)
    diverging = torch.zeros(B, dtype=torch.bool, device=dev)
    n_taken = torch.zeros(B, dtype=torch.long, device=dev)
    for k in range(n_max):
        stepping = ~diverging & (steps > k) if per_chain else ~diverging
        zf, rf, gf = cur.unbind(1)
        zn, rn, Un, gn = leapfrog(potential_and_grad, zf, rf, gf, eps, inv_mass)
        new = torch.stack([zn, rn, gn], 1).detach()
        Un = Un.detach()
        delta = energy_error(H0, Un, rn, inv_mass, new)
        fine = delta <= max_energy_error
        advance = stepping & fine
        cur = torch.where(advance.view(-1, 1, 1), new, cur)
        cur_U = torch.where(advance, Un, cur_U)
        cur_delta = torch.where(advance, delta, cur_delta)
        diverging = diverging | (stepping & ~fine)
        n_taken = n_taken + stepping
    zc, rc, gc = cur.unbind(1)
    return Trajectory(zc, rc, cur_U, gc, cur_delta, diverging, n_taken)


def whiten(potential_and_grad: BatchedPotential, chol: Tensor) -> BatchedPotential:
    """The potential in whitened coordinates ``x``, where ``z = chol @ x`` per chain.

    HMC with the dense inverse mass matrix ``Sigma = chol @ chol^T`` on ``z`` is HMC with
    the identity mass on ``x`` (same trajectories mapped through ``chol``, same
    energies), so every sampler gets a dense metric by sampling this potential with a
    unit ``inv_mass``.

    Parameters
    ----------
    potential_and_grad : callable ``z [B, D] -> (U [B], grad [B, D])``
    chol : Tensor [B, D, D]
        Lower Cholesky factor of each chain's inverse mass matrix.

    Returns
    -------
    callable ``x [B, D] -> (U [B], chol^T grad [B, D])``

    Examples
    --------
    >>> import torch
    >>> pg = lambda z: (0.5 * (z**2).sum(-1), z)
    >>> chol = torch.diag(torch.tensor([2.0, 0.5])).expand(3, 2, 2)
    >>> U, g = whiten(pg, chol)(torch.ones(3, 2))
    >>> U.tolist(), g[0].tolist()
    ([2.125, 2.125, 2.125], [4.0, 0.25])
    """
    chol_t = chol.transpose(-1, -2)

    def whitened(x: Tensor) -> tuple[Tensor, Tensor]:
        U, grad = potential_and_grad(torch.matmul(chol, x.unsqueeze(-1)).squeeze(-1))
        return U, torch.matmul(chol_t, grad.unsqueeze(-1)).squeeze(-1)

    return whitened

"""Hamiltonian primitives on a batched potential, shared by the samplers and AIS.

A *batched potential* is a callable ``potential_and_grad(z) -> (U, grad)`` with
``z`` of shape ``[B, D]`` (B independent chains or particles, D unconstrained
coordinates), ``U`` of shape ``[B]`` (potential energy, i.e. minus the log density
up to a constant) and ``grad`` of shape ``[B, D]`` (dU/dz). A non-finite ``U`` means
zero density; such a point is never accepted.

The mass matrix is diagonal, stored as its inverse ``inv_mass`` of shape ``[B, D]``
(one per chain) or ``[D]`` (shared); momenta ``r`` have the same shape as ``z``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

BatchedPotential = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def kinetic_energy(r: torch.Tensor, inv_mass: torch.Tensor) -> torch.Tensor:
    """Kinetic energy ``0.5 * r^T M^{-1} r`` per chain: ``[B, D] -> [B]``."""
    return 0.5 * (r * r * inv_mass).sum(-1)


def sample_momentum(
    z: torch.Tensor, inv_mass: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Draw ``r ~ Normal(0, M)`` with ``M = 1 / inv_mass`` (diagonal); shape of ``z``."""
    eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return eps / inv_mass.sqrt()


def leapfrog(
    potential_and_grad: BatchedPotential,
    z: torch.Tensor,
    r: torch.Tensor,
    grad: torch.Tensor,
    step_size: torch.Tensor,
    inv_mass: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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

"""Warmup adaptation of HMC samplers as small frozen states and pure update functions.

* **step size**: Nesterov dual averaging of ``log(step_size)`` towards a target
  acceptance (Hoffman & Gelman 2014, section 3.2; Stan's constants), and the
  doubling/halving search for a first step size (:func:`step_size_search`);
* **mass matrix**: Welford's running mean and (co)variance, per chain or pooled over
  chains (:func:`welford_init`, :func:`welford_update`, :func:`welford_update_pooled`),
  turned into an inverse mass matrix shrunk towards ``1e-3`` as Stan does
  (:func:`regularized_inverse_mass`);
* **windows**: Stan's schedule of slow adaptation windows (:func:`mass_matrix_windows`,
  :class:`WarmupSchedule`).

Every sampler (NUTS, static HMC, ChEES) uses these and no copy of them.

References: Hoffman & Gelman (2014), *The No-U-Turn Sampler*, JMLR 15; Stan's
``stepsize_adaptation.hpp``, ``welford_var_estimator.hpp``, ``welford_covar_estimator.hpp``
and ``windowed_adaptation.hpp``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .hamiltonian import BatchedPotential, energy_error, kinetic_energy, leapfrog, sample_momentum

__all__ = [
    "DualAveraging",
    "WarmupSchedule",
    "Welford",
    "dual_averaging_init",
    "dual_averaging_update",
    "mass_matrix_windows",
    "regularized_inverse_mass",
    "shrunk_covariance",
    "step_size_search",
    "welford_init",
    "welford_update",
    "welford_update_pooled",
]

# Stan's defaults for dual averaging of the log step size.
DA_GAMMA = 0.05
DA_T0 = 10.0
DA_KAPPA = 0.75
# Stan's windowed adaptation defaults.
INIT_BUFFER = 75
TERM_BUFFER = 50
BASE_WINDOW = 25
# Stan's shrinkage of the estimated (co)variance: weight 5 / (n + 5) on 1e-3 * I.
_SHRINK_N = 5.0
_SHRINK_TARGET = 1e-3
# step_size_search: aim for acceptance 0.8 of a single leapfrog step.
_SEARCH_TARGET = 0.8
_MAX_STEP_SIZE = 1e7
_MIN_STEP_SIZE = 1e-12


# ----------------------------------------------------------------- dual averaging


@dataclass(frozen=True)
class DualAveraging:
    """State of dual averaging of ``log(step_size)``, one entry per chain.

    Attributes
    ----------
    mu : Tensor [B]
        Shrinkage point, ``log(10 * initial step size)``.
    h_bar : Tensor [B]
        Running average of ``target - acceptance``.
    log_step_size : Tensor [B]
        The iterate: the step size to use next is ``exp(log_step_size)``.
    log_step_size_avg : Tensor [B]
        Its weighted average: the step size to keep after warmup.
    t : int
        Updates so far.
    """

    mu: Tensor
    h_bar: Tensor
    log_step_size: Tensor
    log_step_size_avg: Tensor
    t: int


def dual_averaging_init(step_size: Tensor) -> DualAveraging:
    """Start (or restart, after a mass-matrix update) at ``step_size [B]``."""
    zero = torch.zeros_like(step_size)
    return DualAveraging(torch.log(10.0 * step_size), zero, step_size.log(), zero, 0)


def dual_averaging_update(state: DualAveraging, accept_prob: Tensor,
                          target: float) -> DualAveraging:
    """One update from the acceptance statistic ``accept_prob [B]`` of the last transition.

    >>> s = dual_averaging_init(torch.ones(2))
    >>> s = dual_averaging_update(s, torch.tensor([1.0, 0.0]), 0.8)
    >>> bool(s.log_step_size[0] > s.log_step_size[1])   # accepted more: larger steps
    True
    """
    t = state.t + 1
    eta = 1.0 / (t + DA_T0)
    h_bar = (1.0 - eta) * state.h_bar + eta * (target - accept_prob.clamp(max=1.0))
    log_eps = state.mu - math.sqrt(t) / DA_GAMMA * h_bar
    w = t**-DA_KAPPA
    log_eps_avg = w * log_eps + (1.0 - w) * state.log_step_size_avg
    return DualAveraging(state.mu, h_bar, log_eps, log_eps_avg, t)


# ------------------------------------------------------------------ step-size search


def step_size_search(
    potential_and_grad: BatchedPotential,
    z: Tensor,
    U: Tensor,
    grad: Tensor,
    inv_mass: Tensor,
    generator: torch.Generator | None,
    step_size: Tensor | float | None = None,
    max_iters: int = 100,
) -> tuple[Tensor, int]:
    """Per-chain initial step size by the doubling/halving heuristic of Hoffman & Gelman.

    Starting from ``step_size`` (default 1), each chain doubles (or halves) its step
    size while a single leapfrog step from ``z`` with a fresh momentum has acceptance
    probability above (below) 0.8, and stops at the first step size on the other side,
    as Stan and NumPyro do. Chains search independently.

    Parameters
    ----------
    potential_and_grad : callable ``z [B, D] -> (U [B], grad [B, D])``
        Batched potential.
    z, U, grad : Tensor [B, D], [B], [B, D]
        Current positions, their potential and its gradient (must be finite).
    inv_mass : Tensor [B, D] or [D]
        Diagonal inverse mass matrix.
    generator : torch.Generator or None
        Source of the momenta.
    step_size : float or Tensor [B], optional
        Starting step size (default 1.0).
    max_iters : int
        Most doublings/halvings.

    Returns
    -------
    step_size : Tensor [B]
        Step size per chain, in ``z``'s dtype.
    num_grad_evals : int
        Calls of ``potential_and_grad`` the search made.

    Examples
    --------
    >>> import torch
    >>> pg = lambda z: (0.5 * (z**2).sum(-1), z)
    >>> z = torch.zeros(3, 2)
    >>> U, g = pg(z)
    >>> eps, k = step_size_search(pg, z, U, g, torch.ones(2), torch.Generator().manual_seed(0))
    >>> eps.shape
    torch.Size([3])
    """
    B = z.shape[0]
    inv_mass = torch.as_tensor(inv_mass, dtype=z.dtype, device=z.device).expand(z.shape)
    eps = torch.as_tensor(1.0 if step_size is None else step_size, dtype=z.dtype,
                          device=z.device).expand(B).clone()
    log_target = math.log(_SEARCH_TARGET)
    direction = torch.zeros_like(eps)
    active = torch.ones(B, dtype=torch.bool, device=z.device)
    evals = 0
    for it in range(max_iters):
        r = sample_momentum(z, inv_mass, generator)
        H0 = U + kinetic_energy(r, inv_mass)
        zn, rn, Un, gn = leapfrog(potential_and_grad, z, r, grad, eps, inv_mass)
        evals += 1
        delta = energy_error(H0, Un.detach(), rn, inv_mass, torch.stack([zn, gn.detach()], 1))
        new_direction = torch.where(-delta > log_target, 1.0, -1.0).to(eps.dtype)
        if it == 0:
            direction = new_direction
        else:
            # stop at the first step size on the other side of the target
            active = active & (new_direction == direction)
        too_far = ((direction > 0) & (eps >= _MAX_STEP_SIZE)) | (
            (direction < 0) & (eps <= _MIN_STEP_SIZE)
        )
        active = active & ~too_far
        if not bool(active.any()):
            break
        eps = torch.where(active, eps * torch.pow(2.0, direction), eps)
    return eps, evals


# ------------------------------------------------------------------- mass matrix


@dataclass(frozen=True)
class Welford:
    """Running mean and sum of squared deviations (Welford's algorithm).

    Attributes
    ----------
    n : int
        Samples seen (per chain, or in total when pooled).
    mean : Tensor [B, D] or [D]
        Running mean.
    m2 : Tensor [B, D], [D] (diagonal) or [B, D, D], [D, D] (dense)
        Sum of squared deviations from the mean (of outer products when dense).
    """

    n: int
    mean: Tensor
    m2: Tensor

    @property
    def dense(self) -> bool:
        return self.m2.dim() == self.mean.dim() + 1


def welford_init(like: Tensor, dense: bool = False) -> Welford:
    """An empty estimator for samples shaped ``like`` (``[B, D]``: one per chain; ``[D]``:
    pooled), diagonal or dense.

    >>> w = welford_init(torch.zeros(4, 3), dense=True)
    >>> w.mean.shape, w.m2.shape
    (torch.Size([4, 3]), torch.Size([4, 3, 3]))
    """
    m2 = like.new_zeros(like.shape + like.shape[-1:]) if dense else torch.zeros_like(like)
    return Welford(0, torch.zeros_like(like), m2)


def welford_update(state: Welford, z: Tensor) -> Welford:
    """Add one sample per chain, ``z [B, D]``, to a per-chain estimator."""
    n = state.n + 1
    d = z - state.mean
    mean = state.mean + d / n
    if state.dense:
        m2 = state.m2 + d.unsqueeze(-1) * (z - mean).unsqueeze(-2)
    else:
        m2 = state.m2 + d * (z - mean)
    return Welford(n, mean, m2)


def welford_update_pooled(state: Welford, z: Tensor) -> Welford:
    """Add the ``B`` samples ``z [B, D]`` to one pooled estimator (Chan et al.'s merge of
    a batch's mean and squared deviations)."""
    B = z.shape[0]
    n_new, zm = state.n + B, z.mean(0)
    d = zm - state.mean
    c = z - zm
    if state.dense:
        m2 = state.m2 + c.T @ c + torch.outer(d, d) * (state.n * B / n_new)
    else:
        m2 = state.m2 + (c * c).sum(0) + d * d * (state.n * B / n_new)
    return Welford(n_new, state.mean + d * (B / n_new), m2)


def regularized_inverse_mass(state: Welford) -> Tensor:
    """Stan's inverse mass matrix from a window's samples.

    ``(n / (n + 5)) * S + 1e-3 * (5 / (n + 5)) * I`` with ``S`` the sample
    (co)variance: the estimate shrunk towards a small multiple of the identity, which
    keeps it positive definite with few samples.

    Returns
    -------
    Tensor
        ``[B, D]`` / ``[D]`` (diagonal) or ``[B, D, D]`` / ``[D, D]`` (dense).
    """
    return shrunk_covariance(state.m2 / max(state.n - 1, 1), float(state.n), state.dense)


def shrunk_covariance(cov: Tensor, n: float, dense: bool = False) -> Tensor:
    """``(n / (n + 5)) * cov + 1e-3 * (5 / (n + 5)) * I``: Stan's regularisation of a
    (co)variance ``cov`` (``[..., D]`` diagonal, or ``[..., D, D]`` when ``dense``)
    estimated from ``n`` samples."""
    shrink = _SHRINK_TARGET * (_SHRINK_N / (n + _SHRINK_N))
    if dense:
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        return (n / (n + _SHRINK_N)) * cov + shrink * eye
    return (n / (n + _SHRINK_N)) * cov + shrink


# ------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class WarmupSchedule:
    """When, during warmup, to collect samples for the mass matrix and when to update it.

    Attributes
    ----------
    warmup : int
        Warmup iterations.
    windows : tuple of (int, int)
        Stan's slow windows (:func:`mass_matrix_windows`); empty without mass adaptation.
    """

    warmup: int
    windows: tuple[tuple[int, int], ...]

    @classmethod
    def create(cls, warmup: int, adapt_mass: bool = True) -> WarmupSchedule:
        return cls(warmup, tuple(mass_matrix_windows(warmup)) if adapt_mass else ())

    def collects(self, i: int) -> bool:
        """Whether iteration ``i``'s state enters the mass-matrix estimate."""
        return bool(self.windows) and self.windows[0][0] <= i <= self.windows[-1][1]

    def ends_window(self, i: int) -> bool:
        """Whether the mass matrix is updated (and the step size restarted) after ``i``."""
        return any(last == i for _, last in self.windows)

    def is_last(self, i: int) -> bool:
        """Whether ``i`` is the last warmup iteration (the averaged step size takes over)."""
        return i == self.warmup - 1


def mass_matrix_windows(warmup: int) -> list[tuple[int, int]]:
    """Stan's slow adaptation windows as inclusive ``(first, last)`` iteration indices.

    Initial buffer 75, windows of 25 doubling, terminal buffer 50; the last window is
    stretched to the terminal buffer. When ``warmup < 150`` the buffers become 15% and
    10% of ``warmup`` with one window in between; below 20 iterations there is none.

    >>> mass_matrix_windows(1000)
    [(75, 99), (100, 149), (150, 249), (250, 449), (450, 949)]
    """
    if warmup < 20:
        return []
    init_buffer, term_buffer, base_window = INIT_BUFFER, TERM_BUFFER, BASE_WINDOW
    if init_buffer + term_buffer + base_window > warmup:
        init_buffer = int(0.15 * warmup)
        term_buffer = int(0.1 * warmup)
        base_window = warmup - (init_buffer + term_buffer)
    last = warmup - term_buffer - 1
    windows = []
    first, size = init_buffer, base_window
    end = init_buffer + base_window - 1
    while True:
        windows.append((first, end))
        if end >= last:
            break
        size *= 2
        first, end = end + 1, end + size
        if end + 2 * size >= warmup - term_buffer:
            end = last
    return windows

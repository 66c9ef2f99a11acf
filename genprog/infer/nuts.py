"""No-U-Turn and static HMC samplers with chains as a batch dimension.

All chains live in one ``[chains, D]`` tensor and advance in lockstep: every leapfrog
step is one call of the *batched potential* (see :mod:`genprog.infer.hamiltonian`)
that evaluates all chains at once. Each chain still has its own trajectory, tree
depth, step size and mass matrix; a chain whose trajectory has finished is masked
(its state frozen, the results of the extra evaluations discarded) until every chain
of the batch has finished its transition. Warmup adaptation is per chain as well, so
the chains are independent and R-hat keeps its meaning.

NUTS follows Stan / NumPyro: multinomial sampling inside each doubling, biased
progressive sampling between the old tree and the new subtree, the generalised
(momentum-sum) U-turn criterion checked iteratively with checkpoints of the momentum
sums (one per level, indexed by bit counts of the leaf index), and a divergence when
the energy error exceeds ``max_energy_error`` or is not finite. Warmup is Stan's:
dual averaging of the log step size, diagonal mass matrix from windowed Welford
variances (buffers 75 / 25 doubling / 50, regularised towards ``1e-3``).

References: Hoffman & Gelman (2014), *The No-U-Turn Sampler*, JMLR 15; Betancourt
(2017), *A Conceptual Introduction to Hamiltonian Monte Carlo*, arXiv:1701.02434,
appendix A; Stan's ``base_nuts.hpp`` and ``windowed_adaptation.hpp``; NumPyro's
``infer/hmc_util.py``.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from genprog.infer.hamiltonian import (
    BatchedPotential,
    kinetic_energy,
    leapfrog,
    sample_momentum,
)

__all__ = [
    "SamplerResult",
    "find_reasonable_step_size",
    "hmc_transition",
    "sample_hmc",
    "sample_nuts",
]

# Stan's defaults for dual averaging of the log step size (Hoffman & Gelman, section 3.2).
_DA_GAMMA = 0.05
_DA_T0 = 10.0
_DA_KAPPA = 0.75
# Stan's windowed adaptation defaults.
_INIT_BUFFER = 75
_TERM_BUFFER = 50
_BASE_WINDOW = 25
# find_reasonable_step_size: aim for acceptance 0.8 of a single leapfrog step.
_STEP_SIZE_SEARCH_TARGET = 0.8
_MAX_STEP_SIZE = 1e7
_MIN_STEP_SIZE = 1e-12
# Static HMC: default number of leapfrog steps, and a cap on trajectory_length / step_size.
_DEFAULT_HMC_STEPS = 10
_MAX_HMC_STEPS = 1024


@dataclass(frozen=True)
class SamplerResult:
    """Draws and per-draw statistics of a NUTS or HMC run (post-warmup only).

    Field names follow ArviZ's ``sample_stats`` vocabulary where one exists.

    Attributes
    ----------
    samples : Tensor [chains, draws, D]
        Unconstrained positions, in the dtype and on the device of ``init``.
    potential_energy : Tensor [chains, draws]
        Potential ``U`` at each draw; ArviZ's ``lp`` is ``-potential_energy``.
    diverging : Tensor [chains, draws], bool
        Whether the transition that produced the draw diverged (energy error above
        ``max_energy_error`` or non-finite).
    acceptance_rate : Tensor [chains, draws]
        Mean Metropolis acceptance probability of the transition (over all leapfrog
        states of the NUTS trajectory; the MH acceptance probability for HMC).
    energy : Tensor [chains, draws]
        Hamiltonian ``U + K`` at the start of the transition, after the momentum
        refresh (ArviZ's ``energy``, used for E-BFMI).
    tree_depth : Tensor [chains, draws], long
        NUTS tree depth (number of doublings); 0 for HMC.
    n_steps : Tensor [chains, draws], long
        Leapfrog steps of the chain's own trajectory in the transition.
    step_size : Tensor [chains]
        Step size used for the draws (the dual-averaged one after warmup).
    inverse_mass_matrix : Tensor [chains, D]
        Diagonal inverse mass matrix used for the draws.
    warmup_divergences : Tensor [chains], long
        Number of divergent transitions during warmup.
    num_grad_evals : int
        Total calls of the batched potential (each evaluates every chain), warmup and
        step-size searches included.
    wall_time_s : float
        Wall-clock seconds of the whole run.
    """

    samples: Tensor
    potential_energy: Tensor
    diverging: Tensor
    acceptance_rate: Tensor
    energy: Tensor
    tree_depth: Tensor
    n_steps: Tensor
    step_size: Tensor
    inverse_mass_matrix: Tensor
    warmup_divergences: Tensor
    num_grad_evals: int
    wall_time_s: float


class _Transition(NamedTuple):
    """One batched transition: new state and per-chain statistics."""

    z: Tensor  # [B, D]
    U: Tensor  # [B]
    grad: Tensor  # [B, D]
    accept_prob: Tensor  # [B]
    diverging: Tensor  # [B] bool
    energy: Tensor  # [B]  H at the start
    tree_depth: Tensor  # [B] long
    n_steps: Tensor  # [B] long
    num_grad_evals: int


# --------------------------------------------------------------------------- helpers


def _per_chain(x: Tensor | float, like: Tensor, name: str) -> Tensor:
    """Broadcast a scalar or ``[B]`` value to a fresh ``[B]`` tensor in ``like``'s dtype."""
    B = like.shape[0]
    t = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, B)):
        raise ValueError(f"{name} must be a scalar or have shape [{B}], got {tuple(t.shape)}")
    return t.expand(B).clone()


def _full_inv_mass(inv_mass: Tensor, z: Tensor) -> Tensor:
    """``[D]`` or ``[B, D]`` inverse mass -> ``[B, D]`` in ``z``'s dtype and device."""
    inv_mass = torch.as_tensor(inv_mass, dtype=z.dtype, device=z.device)
    return inv_mass.expand(z.shape)


def _evaluate(potential_and_grad: BatchedPotential, z: Tensor) -> tuple[Tensor, Tensor]:
    U, grad = potential_and_grad(z)
    return U.detach(), grad.detach()


def _energy_error(
    z: Tensor, r: Tensor, U: Tensor, grad: Tensor, inv_mass: Tensor, H0: Tensor
) -> tuple[Tensor, Tensor]:
    """Return ``(H, H - H0)`` with the error set to ``+inf`` where anything is non-finite."""
    H = U + kinetic_energy(r, inv_mass)
    ok = torch.isfinite(H) & torch.isfinite(z).all(-1) & torch.isfinite(grad).all(-1)
    delta = torch.where(ok, H - H0, torch.full_like(H, math.inf))
    return H, delta


def _is_turning(inv_mass: Tensor, r_left: Tensor, r_right: Tensor, r_sum: Tensor) -> Tensor:
    """Generalised U-turn criterion (Betancourt 2017, A.4.2), batched over leading dims.

    ``r_sum`` is the sum of the momenta of every state of the (sub)trajectory, ends
    included; the ends count half, as in NumPyro. Returns True where either end's
    velocity points against the summed momentum.
    """
    v_rho = inv_mass * (r_sum - 0.5 * (r_left + r_right))
    return torch.minimum((v_rho * r_left).sum(-1), (v_rho * r_right).sum(-1)) <= 0


# ------------------------------------------------------------------ step size search


def _find_reasonable_step_size(
    potential_and_grad: BatchedPotential,
    z: Tensor,
    U: Tensor,
    grad: Tensor,
    inv_mass: Tensor,
    generator: torch.Generator | None,
    step_size: Tensor | float | None = None,
    max_iter: int = 100,
) -> tuple[Tensor, int]:
    """Batched Hoffman & Gelman heuristic; returns ``(step_size [B], potential calls)``."""
    inv_mass = _full_inv_mass(inv_mass, z)
    eps = _per_chain(1.0 if step_size is None else step_size, z, "step_size")
    log_target = math.log(_STEP_SIZE_SEARCH_TARGET)
    direction = torch.zeros_like(eps)
    active = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    evals = 0
    for it in range(max_iter):
        r = sample_momentum(z, inv_mass, generator)
        H0 = U + kinetic_energy(r, inv_mass)
        zn, rn, Un, gn = leapfrog(potential_and_grad, z, r, grad, eps, inv_mass)
        evals += 1
        _, delta = _energy_error(zn, rn, Un.detach(), gn.detach(), inv_mass, H0)
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


def find_reasonable_step_size(
    potential_and_grad: BatchedPotential,
    z: Tensor,
    U: Tensor,
    grad: Tensor,
    inv_mass: Tensor,
    generator: torch.Generator | None,
    *,
    step_size: Tensor | float | None = None,
) -> Tensor:
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

    Returns
    -------
    Tensor [B]
        Step size per chain, in ``z``'s dtype.

    Examples
    --------
    >>> import torch
    >>> pg = lambda z: (0.5 * (z**2).sum(-1), z)
    >>> z = torch.zeros(3, 2)
    >>> U, g = pg(z)
    >>> eps = find_reasonable_step_size(pg, z, U, g, torch.ones(2), torch.Generator().manual_seed(0))
    >>> eps.shape
    torch.Size([3])
    """
    eps, _ = _find_reasonable_step_size(
        potential_and_grad, z, U, grad, inv_mass, generator, step_size=step_size
    )
    return eps


# ------------------------------------------------------------------------------ NUTS


def _popcount(n: int) -> int:
    return n.bit_count()


def _trailing_ones(n: int) -> int:
    return (n ^ (n + 1)).bit_length() - 1


def _nuts_transition(
    potential_and_grad: BatchedPotential,
    z: Tensor,
    U: Tensor,
    grad: Tensor,
    step_size: Tensor,
    inv_mass: Tensor,
    generator: torch.Generator | None,
    max_tree_depth: int,
    max_energy_error: float,
) -> _Transition:
    """One NUTS transition for every chain, all chains in lockstep.

    NumPyro's iterative tree building, batched. The key observation: a chain only
    leaves the common schedule by terminating, so at any leapfrog step all unfinished
    chains are at the same tree depth and the same leaf index inside their current
    subtree (they differ in direction, weights and turning/divergence). Tree depth and
    leaf index are therefore Python ints, and the checkpoint slots of the iterative
    U-turn check (``idx_max = popcount(n >> 1)``, ``idx_min = idx_max - trailing_ones(n)
    + 1`` for leaf index ``n``) are the same for every chain.

    A chain stops at a turning or diverging subtree (which is never sampled from), at a
    turning tree, or at ``max_tree_depth``; its state is then frozen and the results of
    further batched evaluations are discarded for it. The per-step work is kept to a
    few dozen small tensor operations, since on small problems their dispatch overhead,
    not arithmetic, is the cost.
    """
    B = z.shape[0]
    dev, dt = z.device, z.dtype
    r0 = sample_momentum(z, inv_mass, generator)
    H0 = U + kinetic_energy(r0, inv_mass)
    inf = math.inf

    # Phase-space states are stacked as [B, 3, D] = (z, r, grad).
    left = right = proposal = torch.stack([z, r0, grad], 1)
    proposal_U = U
    tree_weight = torch.zeros_like(H0)  # log sum over states of exp(-(H - H0)); start: 0
    tree_r_sum = r0
    depth = torch.zeros(B, dtype=torch.long, device=dev)
    diverging = torch.zeros(B, dtype=torch.bool, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    active_log: list[Tensor] = []  # per step: which chains took it
    delta_log: list[Tensor] = []  # per step: energy error of the new state (+inf if bad)
    # Checkpoints at even leaf indices, one slot per level: the leaf momentum and
    # 0.5 * r - (running momentum sum), so that the momentum sum of the span from the
    # checkpoint to leaf n, minus half its end momenta, is sub_r_sum - 0.5 * r_n + c.
    ck_r: list[Tensor | None] = [None] * max(max_tree_depth, 1)
    ck_c: list[Tensor | None] = [None] * max(max_tree_depth, 1)

    for tree_depth in range(max_tree_depth):
        # ---- double the trajectory: a subtree of 2**tree_depth leaves in a random direction
        active = ~done
        depth = depth + active
        # uniforms for the subtree: direction, one per added leaf, the final jump
        u = torch.rand(2**tree_depth + 1, B, generator=generator, dtype=dt, device=dev).unbind(0)
        going_right = u[0] < 0.5
        front = torch.where(going_right.view(-1, 1, 1), right, left)
        eps = torch.where(going_right, step_size, -step_size)
        sub_weight = sub_proposal = sub_U = sub_r_sum = None
        for n in range(2**tree_depth):
            zf, rf, gf = front.unbind(1)
            zn, rn, Un, gn = leapfrog(potential_and_grad, zf, rf, gf, eps, inv_mass)
            new = torch.stack([zn, rn, gn], 1).detach()
            Un = Un.detach()
            H = Un + kinetic_energy(rn, inv_mass)
            # energy error, +inf where anything (H, z, r, grad) is not finite: the sum
            # turns any inf/NaN entry into a non-finite value (or overflows, ~1e38)
            delta = torch.nan_to_num(H - H0 + 0.0 * new.sum((1, 2)), nan=inf, posinf=inf,
                                     neginf=inf)
            fine = delta <= max_energy_error
            leaf_div = active & ~fine
            active_log.append(active)
            delta_log.append(delta)

            # multinomial (uniform progressive) sampling inside the subtree
            leaf_weight = -delta
            if n == 0:
                sub_weight, sub_proposal, sub_U, sub_r_sum = leaf_weight, new, Un, rn
            else:
                new_weight = torch.logaddexp(sub_weight, leaf_weight)
                take = u[n] < torch.exp(leaf_weight - new_weight)
                sub_proposal = torch.where(take.view(-1, 1, 1), new, sub_proposal)
                sub_U = torch.where(take, Un, sub_U)
                sub_weight = new_weight
                sub_r_sum = sub_r_sum + rn

            # iterative U-turn check against the checkpoints
            idx_max = _popcount(n >> 1)
            if n % 2 == 0:
                ck_r[idx_max] = rn
                ck_c[idx_max] = 0.5 * rn - sub_r_sum
                stop = leaf_div
            else:
                idx_min = idx_max - _trailing_ones(n) + 1
                base = sub_r_sum - 0.5 * rn
                if idx_min == idx_max:
                    r_ck = ck_r[idx_max]
                    rho = inv_mass * (base + ck_c[idx_max])
                else:
                    r_ck = torch.stack(ck_r[idx_min:idx_max + 1], 1)
                    rho = inv_mass.unsqueeze(1) * (
                        base.unsqueeze(1) + torch.stack(ck_c[idx_min:idx_max + 1], 1))
                    rn_k = rn.unsqueeze(1)
                turning = torch.minimum((rho * r_ck).sum(-1),
                                        (rho * (rn if idx_min == idx_max else rn_k)).sum(-1)) <= 0
                if idx_min != idx_max:
                    turning = turning.any(1)
                stop = leaf_div | (active & turning)

            # the new leaf is the moving end; a bad leaf is never stepped from (a finished
            # chain keeps integrating harmlessly from finite states, its results unused)
            front = torch.where(fine.view(-1, 1, 1), new, front)
            diverging = diverging | leaf_div
            done = done | stop
            active = ~done
            if n + 1 < 2**tree_depth and not bool(active.any()):  # one host sync per step
                break

        # ---- merge the completed subtree (chains still active): biased progressive sampling
        left = torch.where((active & ~going_right).view(-1, 1, 1), front, left)
        right = torch.where((active & going_right).view(-1, 1, 1), front, right)
        jump = active & (u[-1] < torch.exp(sub_weight - tree_weight))
        proposal = torch.where(jump.view(-1, 1, 1), sub_proposal, proposal)
        proposal_U = torch.where(jump, sub_U, proposal_U)
        tree_weight = torch.where(active, torch.logaddexp(tree_weight, sub_weight), tree_weight)
        tree_r_sum = torch.where(active.view(-1, 1), tree_r_sum + sub_r_sum, tree_r_sum)
        turning = _is_turning(inv_mass, left[:, 1], right[:, 1], tree_r_sum)
        done = done | (active & turning)
        if bool(done.all()):
            break

    took = torch.stack(active_log)  # [steps, B]
    n_steps = took.sum(0)
    # mean over the chain's own leapfrog states of min(1, exp(-delta))
    sum_accept = (torch.exp(-torch.stack(delta_log).clamp(min=0.0)) * took).sum(0)
    accept_prob = sum_accept / n_steps.clamp(min=1)
    return _Transition(proposal[:, 0], proposal_U, proposal[:, 2], accept_prob, diverging, H0,
                       depth, n_steps, len(delta_log))


# ------------------------------------------------------------------------------- HMC


def _hmc_transition(
    potential_and_grad: BatchedPotential,
    z: Tensor,
    U: Tensor,
    grad: Tensor,
    step_size: Tensor | float,
    num_steps: int | Tensor,
    inv_mass: Tensor,
    generator: torch.Generator | None,
    max_energy_error: float,
) -> _Transition:
    B = z.shape[0]
    dev, dt = z.device, z.dtype
    inv_mass = _full_inv_mass(inv_mass, z)
    eps = _per_chain(step_size, z, "step_size")
    per_chain_steps = torch.is_tensor(num_steps)
    if per_chain_steps:
        steps = num_steps.to(device=dev, dtype=torch.long).expand(B)
        max_steps = int(steps.max())  # one host sync per transition
    else:
        max_steps = int(num_steps)
    r0 = sample_momentum(z, inv_mass, generator)
    H0 = U + kinetic_energy(r0, inv_mass)
    cur = torch.stack([z, r0, grad], 1)  # [B, 3, D] = (z, r, grad)
    cur_U, cur_delta = U, torch.zeros_like(H0)
    diverging = torch.zeros(B, dtype=torch.bool, device=dev)
    n_taken = torch.zeros(B, dtype=torch.long, device=dev)
    inf = math.inf
    for k in range(max_steps):
        stepping = ~diverging & (steps > k) if per_chain_steps else ~diverging
        zf, rf, gf = cur.unbind(1)
        zn, rn, Un, gn = leapfrog(potential_and_grad, zf, rf, gf, eps, inv_mass)
        new = torch.stack([zn, rn, gn], 1).detach()
        Un = Un.detach()
        # energy error, +inf where anything is not finite (see _nuts_transition)
        delta = torch.nan_to_num(Un + kinetic_energy(rn, inv_mass) - H0 + 0.0 * new.sum((1, 2)),
                                 nan=inf, posinf=inf, neginf=inf)
        fine = delta <= max_energy_error
        advance = stepping & fine
        cur = torch.where(advance.view(-1, 1, 1), new, cur)
        cur_U = torch.where(advance, Un, cur_U)
        cur_delta = torch.where(advance, delta, cur_delta)
        diverging = diverging | (stepping & ~fine)
        n_taken = n_taken + stepping
    # a diverged chain is frozen at its last finite state and rejected
    accept_prob = torch.where(diverging, 0.0, torch.exp(-cur_delta).clamp(max=1.0))
    accept = torch.rand(B, generator=generator, dtype=dt, device=dev) < accept_prob
    z = torch.where(accept[:, None], cur[:, 0], z)
    grad = torch.where(accept[:, None], cur[:, 2], grad)
    U = torch.where(accept, cur_U, U)
    return _Transition(z, U, grad, accept_prob, diverging, H0,
                       torch.zeros(B, dtype=torch.long, device=dev), n_taken, max_steps)


def hmc_transition(
    potential_and_grad: BatchedPotential,
    z: Tensor,
    U: Tensor,
    grad: Tensor,
    step_size: Tensor | float,
    num_steps: int | Tensor,
    inv_mass: Tensor,
    generator: torch.Generator | None,
    max_energy_error: float = 1000.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
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
    z, U, grad : the new state, [B, D], [B], [B, D]
    accept_prob : Tensor [B]
        Metropolis acceptance probability (0 for diverging chains).
    diverging : Tensor [B], bool

    Examples
    --------
    >>> import torch
    >>> pg = lambda z: (0.5 * (z**2).sum(-1), z)
    >>> g = torch.Generator().manual_seed(0)
    >>> z = torch.randn(100, 3, generator=g)
    >>> U, grad = pg(z)
    >>> z, U, grad, acc, div = hmc_transition(pg, z, U, grad, 0.3, 5, torch.ones(3), g)
    >>> z.shape, bool(div.any())
    (torch.Size([100, 3]), False)
    """
    tr = _hmc_transition(potential_and_grad, z, U, grad, step_size, num_steps, inv_mass,
                         generator, max_energy_error)
    return tr.z, tr.U, tr.grad, tr.accept_prob, tr.diverging


# -------------------------------------------------------------------------- warmup


def _mass_matrix_windows(warmup: int) -> list[tuple[int, int]]:
    """Stan's slow adaptation windows as inclusive ``(first, last)`` iteration indices.

    Initial buffer 75, windows of 25 doubling, terminal buffer 50; the last window is
    stretched to the terminal buffer. When ``warmup < 150`` the buffers become 15% and
    10% of ``warmup`` with one window in between; below 20 iterations there is none.
    """
    if warmup < 20:
        return []
    init_buffer, term_buffer, base_window = _INIT_BUFFER, _TERM_BUFFER, _BASE_WINDOW
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


class _DualAveraging(NamedTuple):
    """Per-chain state of Nesterov dual averaging of ``log(step_size)``."""

    mu: Tensor
    h_bar: Tensor
    log_eps: Tensor
    log_eps_bar: Tensor
    t: int


def _da_init(step_size: Tensor) -> _DualAveraging:
    zero = torch.zeros_like(step_size)
    return _DualAveraging(torch.log(10.0 * step_size), zero, step_size.log(), zero, 0)


def _da_update(state: _DualAveraging, accept_prob: Tensor, target: float) -> _DualAveraging:
    t = state.t + 1
    eta = 1.0 / (t + _DA_T0)
    h_bar = (1.0 - eta) * state.h_bar + eta * (target - accept_prob.clamp(max=1.0))
    log_eps = state.mu - math.sqrt(t) / _DA_GAMMA * h_bar
    w = t**-_DA_KAPPA
    log_eps_bar = w * log_eps + (1.0 - w) * state.log_eps_bar
    return _DualAveraging(state.mu, h_bar, log_eps, log_eps_bar, t)


# -------------------------------------------------------------------------- driver

_StepFn = Callable[
    [BatchedPotential, Tensor, Tensor, Tensor, Tensor, Tensor, torch.Generator], _Transition
]


def _count(name: str, v, minimum: int = 0) -> int:
    """An integer argument (Python or NumPy int, not bool) ``>= minimum``, as ``int``."""
    try:
        if isinstance(v, bool):
            raise TypeError
        v = operator.index(v)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {v!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _validate_common(init, target_accept, max_energy_error) -> None:
    if not torch.is_tensor(init) or init.dim() != 2 or not init.is_floating_point():
        raise ValueError("init must be a floating-point tensor of shape [chains, D]")
    if init.shape[0] < 1 or init.shape[1] < 1:
        raise ValueError(f"init must have at least one chain and one dimension, got "
                         f"{tuple(init.shape)}")
    if not 0.0 < float(target_accept) < 1.0:
        raise ValueError(f"target_accept must be in (0, 1), got {target_accept!r}")
    if not float(max_energy_error) > 0:
        raise ValueError(f"max_energy_error must be positive, got {max_energy_error!r}")


def initial_state(potential_and_grad: BatchedPotential, init: Tensor,
                  generator: torch.Generator | None):
    """``(z, U, grad, generator)`` at the chains' starting points ``init [B, D]``; a default
    generator (seed 0) on their device when none is given.

    Raises
    ------
    ValueError
        Wrong output shapes, or a non-finite potential/gradient at a start (naming the chains).
    """
    z = init.detach().clone()
    B, D = z.shape
    if generator is None:
        generator = torch.Generator(device=z.device).manual_seed(0)
    U, grad = _evaluate(potential_and_grad, z)
    if U.shape != (B,) or grad.shape != (B, D):
        raise ValueError(f"potential_and_grad must return U [{B}] and grad [{B}, {D}], got "
                         f"{tuple(U.shape)} and {tuple(grad.shape)}")
    bad = ~(torch.isfinite(U) & torch.isfinite(grad).all(-1))
    if bool(bad.any()):
        raise ValueError(f"potential or gradient is not finite at init for chains "
                         f"{torch.nonzero(bad).flatten().tolist()}")
    return z, U, grad, generator


def _run(
    step: _StepFn,
    potential_and_grad: BatchedPotential,
    init: Tensor,
    *,
    warmup: int,
    draws: int,
    generator: torch.Generator | None,
    target_accept: float,
    adapt_mass: bool,
    init_step_size: Tensor | float | None,
    progress: bool,
    name: str,
) -> SamplerResult:
    t_start = time.perf_counter()
    z, U, grad, generator = initial_state(potential_and_grad, init, generator)
    B, D = z.shape
    dev, dt = z.device, z.dtype
    n_grad = 1
    inv_mass = torch.ones_like(z)
    if init_step_size is not None:
        init_step_size = _per_chain(init_step_size, z, "init_step_size")
        if not bool((torch.isfinite(init_step_size) & (init_step_size > 0)).all()):
            raise ValueError("init_step_size must be positive and finite")
    if init_step_size is not None and warmup == 0:
        eps = init_step_size
    else:
        eps, k = _find_reasonable_step_size(potential_and_grad, z, U, grad, inv_mass, generator,
                                            step_size=init_step_size)
        n_grad += k

    windows = _mass_matrix_windows(warmup) if adapt_mass else []
    window_ends = {last for _, last in windows}
    collect_from = windows[0][0] if windows else warmup
    collect_to = windows[-1][1] if windows else -1
    da = _da_init(eps)
    w_n, w_mean, w_m2 = 0, torch.zeros_like(z), torch.zeros_like(z)

    samples = torch.empty(B, draws, D, dtype=dt, device=dev)
    potential = torch.empty(B, draws, dtype=dt, device=dev)
    diverging = torch.empty(B, draws, dtype=torch.bool, device=dev)
    acceptance = torch.empty(B, draws, dtype=dt, device=dev)
    energy = torch.empty(B, draws, dtype=dt, device=dev)
    tree_depth = torch.empty(B, draws, dtype=torch.long, device=dev)
    n_steps = torch.empty(B, draws, dtype=torch.long, device=dev)
    warmup_div = torch.zeros(B, dtype=torch.long, device=dev)
    total_div = torch.zeros(B, dtype=torch.long, device=dev)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=warmup + draws, desc=f"{name} warmup" if warmup else name)
    try:
        for i in range(warmup + draws):
            tr = step(potential_and_grad, z, U, grad, eps, inv_mass, generator)
            z, U, grad = tr.z, tr.U, tr.grad
            n_grad += tr.num_grad_evals
            total_div += tr.diverging
            if i < warmup:
                warmup_div += tr.diverging
                da = _da_update(da, tr.accept_prob, target_accept)
                eps = da.log_eps.exp()
                if collect_from <= i <= collect_to:  # Welford, per chain
                    w_n += 1
                    d = z - w_mean
                    w_mean = w_mean + d / w_n
                    w_m2 = w_m2 + d * (z - w_mean)
                if i in window_ends:
                    n = float(w_n)
                    var = w_m2 / max(w_n - 1, 1)
                    inv_mass = (n / (n + 5.0)) * var + 1e-3 * (5.0 / (n + 5.0))
                    w_n, w_mean, w_m2 = 0, torch.zeros_like(z), torch.zeros_like(z)
                    eps, k = _find_reasonable_step_size(potential_and_grad, z, U, grad, inv_mass,
                                                        generator, step_size=eps)
                    n_grad += k
                    da = _da_init(eps)
                if i == warmup - 1:
                    eps = da.log_eps_bar.exp()
                    if bar is not None:
                        bar.set_description(name)
            else:
                j = i - warmup
                samples[:, j] = z
                potential[:, j] = U
                diverging[:, j] = tr.diverging
                acceptance[:, j] = tr.accept_prob
                energy[:, j] = tr.energy
                tree_depth[:, j] = tr.tree_depth
                n_steps[:, j] = tr.n_steps
            if bar is not None:
                bar.set_postfix(divergences=int(total_div.sum()),
                                step_size=f"{float(eps.mean()):.3g}", refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return SamplerResult(
        samples=samples,
        potential_energy=potential,
        diverging=diverging,
        acceptance_rate=acceptance,
        energy=energy,
        tree_depth=tree_depth,
        n_steps=n_steps,
        step_size=eps,
        inverse_mass_matrix=inv_mass.clone(),
        warmup_divergences=warmup_div,
        num_grad_evals=n_grad,
        wall_time_s=time.perf_counter() - t_start,
    )


def sample_nuts(
    potential_and_grad: BatchedPotential,
    init: Tensor,
    *,
    warmup: int = 1000,
    draws: int = 1000,
    generator: torch.Generator | None = None,
    target_accept: float = 0.8,
    max_tree_depth: int = 10,
    adapt_mass: bool = True,
    init_step_size: Tensor | float | None = None,
    max_energy_error: float = 1000.0,
    progress: bool = False,
) -> SamplerResult:
    """Run the No-U-Turn sampler on many chains at once (chains are the batch dimension).

    Parameters
    ----------
    potential_and_grad : callable ``z [B, D] -> (U [B], grad [B, D])``
        Batched potential ``U = -log density`` (up to a constant) on unconstrained
        space; a non-finite ``U`` means zero density.
    init : Tensor [chains, D]
        Initial positions (finite potential); fixes the dtype and device of the run.
    warmup, draws : int
        Adaptation iterations (discarded) and kept iterations per chain.
    generator : torch.Generator, optional
        The only source of randomness, on ``init``'s device; ``None`` uses a fresh
        generator seeded 0.
    target_accept : float
        Target mean acceptance probability of the step-size dual averaging.
    max_tree_depth : int
        Maximum number of trajectory doublings (at most ``2**max_tree_depth - 1``
        leapfrog steps per transition).
    adapt_mass : bool
        Adapt a diagonal inverse mass matrix per chain in Stan's windows during warmup
        (otherwise the identity).
    init_step_size : float or Tensor [chains], optional
        With ``warmup > 0``: the starting point of the step-size search (default 1).
        With ``warmup == 0``: the step size used as is (if None, the search's result).
    max_energy_error : float
        A transition diverges when ``H - H0`` exceeds this or is not finite.
    progress : bool
        Show a tqdm bar with the divergence count and mean step size.

    Returns
    -------
    SamplerResult

    Examples
    --------
    >>> import torch
    >>> pg = lambda z: (0.5 * (z**2).sum(-1), z)
    >>> res = sample_nuts(pg, torch.zeros(4, 2), warmup=50, draws=20)
    >>> res.samples.shape, res.tree_depth.shape
    (torch.Size([4, 20, 2]), torch.Size([4, 20]))
    """
    _validate_common(init, target_accept, max_energy_error)
    warmup, draws = _count("warmup", warmup), _count("draws", draws)
    max_tree_depth = _count("max_tree_depth", max_tree_depth, minimum=1)
    if max_tree_depth > 30:
        raise ValueError(f"max_tree_depth must be <= 30, got {max_tree_depth}")

    def step(pg, z, U, grad, eps, inv_mass, gen):
        return _nuts_transition(pg, z, U, grad, eps, inv_mass, gen, max_tree_depth,
                                max_energy_error)

    return _run(step, potential_and_grad, init, warmup=warmup, draws=draws,
                generator=generator, target_accept=target_accept, adapt_mass=adapt_mass,
                init_step_size=init_step_size, progress=progress, name="nuts")


def sample_hmc(
    potential_and_grad: BatchedPotential,
    init: Tensor,
    *,
    warmup: int = 1000,
    draws: int = 1000,
    generator: torch.Generator | None = None,
    num_steps: int | None = None,
    trajectory_length: float | None = None,
    target_accept: float = 0.8,
    adapt_mass: bool = True,
    init_step_size: Tensor | float | None = None,
    max_energy_error: float = 1000.0,
    progress: bool = False,
    step_size_jitter: float = 0.2,
) -> SamplerResult:
    """Run static HMC on many chains at once, with the same warmup as :func:`sample_nuts`.

    Parameters
    ----------
    potential_and_grad, init, warmup, draws, generator, target_accept, adapt_mass,
    init_step_size, max_energy_error, progress
        As in :func:`sample_nuts`.
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
    _validate_common(init, target_accept, max_energy_error)
    warmup, draws = _count("warmup", warmup), _count("draws", draws)
    if num_steps is not None and trajectory_length is not None:
        raise ValueError("give num_steps or trajectory_length, not both")
    if trajectory_length is None:
        num_steps = _count("num_steps", _DEFAULT_HMC_STEPS if num_steps is None else num_steps,
                           minimum=1)
    elif not float(trajectory_length) > 0:
        raise ValueError(f"trajectory_length must be positive, got {trajectory_length!r}")
    if not 0.0 <= float(step_size_jitter) < 1.0:
        raise ValueError(f"step_size_jitter must be in [0, 1), got {step_size_jitter!r}")

    def step(pg, z, U, grad, eps, inv_mass, gen):
        if trajectory_length is None:
            steps = num_steps
        else:
            steps = torch.round(trajectory_length / eps).clamp(1, _MAX_HMC_STEPS).long()
        if step_size_jitter > 0:
            u = torch.rand(eps.shape, generator=gen, dtype=eps.dtype, device=eps.device)
            eps = eps * (1.0 + step_size_jitter * (2.0 * u - 1.0))
        return _hmc_transition(pg, z, U, grad, eps, steps, inv_mass, gen, max_energy_error)

    return _run(step, potential_and_grad, init, warmup=warmup, draws=draws,
                generator=generator, target_accept=target_accept, adapt_mass=adapt_mass,
                init_step_size=init_step_size, progress=progress, name="hmc")

"""The No-U-Turn sampler with chains as a batch dimension.

All chains live in one ``[chains, D]`` tensor and advance in lockstep: every leapfrog
step is one call of the *batched potential* (see :mod:`genprog.infer.hamiltonian`)
that evaluates all chains at once. Each chain still has its own trajectory, tree
depth, step size and mass matrix; a chain whose trajectory has finished is masked
(its state frozen, the results of the extra evaluations discarded) until every chain
of the batch has finished its transition. Warmup adaptation is per chain as well
(:func:`genprog.infer.sampler.run_chains`), so the chains are independent and R-hat
keeps its meaning.

NUTS follows Stan / NumPyro: multinomial sampling inside each doubling, biased
progressive sampling between the old tree and the new subtree, the generalised
(momentum-sum) U-turn criterion checked iteratively with checkpoints of the momentum
sums (one per level, indexed by bit counts of the leaf index), and a divergence when
the energy error exceeds ``max_energy_error`` or is not finite. Warmup is Stan's
(:mod:`genprog.infer.adaptation`): dual averaging of the log step size, a diagonal (or,
with ``dense_mass=True``, dense) mass matrix from windowed Welford estimates.

References: Hoffman & Gelman (2014), *The No-U-Turn Sampler*, JMLR 15; Betancourt
(2017), *A Conceptual Introduction to Hamiltonian Monte Carlo*, arXiv:1701.02434,
appendix A; Stan's ``base_nuts.hpp``; NumPyro's ``infer/hmc_util.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .hamiltonian import (
    BatchedPotential,
    energy_error,
    kinetic_energy,
    leapfrog,
    sample_momentum,
)
from .sampler import (
    SamplerResult,
    Transition,
    check_count,
    check_sampler_args,
    run_chains,
)

__all__ = ["SamplerResult", "is_turning", "nuts_transition", "sample_nuts"]


def is_turning(inv_mass: Tensor, r_left: Tensor, r_right: Tensor, r_sum: Tensor) -> Tensor:
    """Generalised U-turn criterion (Betancourt 2017, A.4.2), batched over leading dims.

    ``r_sum`` is the sum of the momenta of every state of the (sub)trajectory, ends
    included; the ends count half, as in NumPyro. Returns True where either end's
    velocity points against the summed momentum.
    """
    v_rho = inv_mass * (r_sum - 0.5 * (r_left + r_right))
    return torch.minimum((v_rho * r_left).sum(-1), (v_rho * r_right).sum(-1)) <= 0


def _popcount(n: int) -> int:
    return n.bit_count()


def _trailing_ones(n: int) -> int:
    return (n ^ (n + 1)).bit_length() - 1


def nuts_transition(
    potential_and_grad: BatchedPotential,
    z: Tensor,
    U: Tensor,
    grad: Tensor,
    step_size: Tensor,
    inv_mass: Tensor,
    generator: torch.Generator | None,
    max_tree_depth: int,
    max_energy_error: float,
) -> Transition:
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
    # Whether every chain has finished is a host sync. On the CPU it costs ~0.3 us (measured,
    # against ~1 ms for theo_sd's potential), so it is checked after every leaf and no
    # evaluation is wasted; on an accelerator it stalls the queue, so it is checked once
    # per tree level, and a subtree in which every chain stopped early runs to its end
    # (the extra evaluations are discarded, as for any finished chain).
    check_every_leaf = dev.type == "cpu"
    r0 = sample_momentum(z, inv_mass, generator)
    H0 = U + kinetic_energy(r0, inv_mass)

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
            delta = energy_error(H0, Un, rn, inv_mass, new)  # +inf where not finite
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
            if check_every_leaf and n + 1 < 2**tree_depth and not bool(active.any()):
                break

        # ---- merge the completed subtree (chains still active): biased progressive sampling
        left = torch.where((active & ~going_right).view(-1, 1, 1), front, left)
        right = torch.where((active & going_right).view(-1, 1, 1), front, right)
        jump = active & (u[-1] < torch.exp(sub_weight - tree_weight))
        proposal = torch.where(jump.view(-1, 1, 1), sub_proposal, proposal)
        proposal_U = torch.where(jump, sub_U, proposal_U)
        tree_weight = torch.where(active, torch.logaddexp(tree_weight, sub_weight), tree_weight)
        tree_r_sum = torch.where(active.view(-1, 1), tree_r_sum + sub_r_sum, tree_r_sum)
        turning = is_turning(inv_mass, left[:, 1], right[:, 1], tree_r_sum)
        done = done | (active & turning)
        if bool(done.all()):
            break

    took = torch.stack(active_log)  # [steps, B]
    n_steps = took.sum(0)
    # mean over the chain's own leapfrog states of min(1, exp(-delta))
    sum_accept = (torch.exp(-torch.stack(delta_log).clamp(min=0.0)) * took).sum(0)
    accept_prob = sum_accept / n_steps.clamp(min=1)
    return Transition(proposal[:, 0], proposal_U, proposal[:, 2], accept_prob, diverging, H0,
                       depth, n_steps, len(delta_log))


def sample_nuts(
    potential_and_grad: BatchedPotential, init: Tensor, *,
    warmup: int = 1000, draws: int = 1000, generator: torch.Generator | None = None,
    target_accept: float = 0.8, max_tree_depth: int = 10,
    adapt_mass: bool = True, dense_mass: bool = False,
    init_step_size: Tensor | float | None = None, max_energy_error: float = 1000.0,
    progress: bool = False, threads: int | None = None,
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
    dense_mass : bool
        Adapt a dense inverse mass matrix instead (the windows' covariance, shrunk as in
        Stan), for targets with strong linear correlations; costs ``O(D^2)`` memory per
        chain and two ``D x D`` matrix-vector products per leapfrog step.
    init_step_size : float or Tensor [chains], optional
        With ``warmup > 0``: the starting point of the step-size search (default 1).
        With ``warmup == 0``: the step size used as is (if None, the search's result).
    max_energy_error : float
        A transition diverges when ``H - H0`` exceeds this or is not finite.
    progress : bool
        Show a tqdm bar with the divergence count and mean step size.
    threads : int, optional
        Torch's intra-op threads while sampling (the previous count is restored after);
        default :func:`genprog.threads.threads_for` of ``chains * D`` elements, which is
        one thread for usual sizes (more threads only spin on small batched tensors, and
        on a shared machine they oversubscribe the cores).

    Returns
    -------
    SamplerResult
        ``inverse_mass_matrix`` is ``[chains, D, D]`` with ``dense_mass=True``.

    Examples
    --------
    >>> import torch
    >>> pg = lambda z: (0.5 * (z**2).sum(-1), z)
    >>> res = sample_nuts(pg, torch.zeros(4, 2), warmup=50, draws=20)
    >>> res.samples.shape, res.tree_depth.shape
    (torch.Size([4, 20, 2]), torch.Size([4, 20]))
    """
    check_sampler_args(init, target_accept, max_energy_error)
    warmup, draws = check_count("warmup", warmup), check_count("draws", draws)
    max_tree_depth = check_count("max_tree_depth", max_tree_depth, minimum=1)
    if max_tree_depth > 30:
        raise ValueError(f"max_tree_depth must be <= 30, got {max_tree_depth}")

    def step(pg, z, U, grad, eps, inv_mass, gen):
        return nuts_transition(pg, z, U, grad, eps, inv_mass, gen, max_tree_depth,
                               max_energy_error)

    return run_chains(step, potential_and_grad, init, warmup=warmup, draws=draws,
                      generator=generator, target_accept=target_accept, adapt_mass=adapt_mass,
                      dense_mass=bool(dense_mass), init_step_size=init_step_size,
                      progress=progress, name="nuts", threads=threads)

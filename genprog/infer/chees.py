"""ChEES-HMC: many chains, one shared step size and one jittered trajectory length.

Hoffman, Radul & Sountsov (2021), *An Adaptive MCMC Scheme for Setting Trajectory
Lengths in Hamiltonian Monte Carlo*, AISTATS. Every chain of the batch runs jittered
static HMC with the *same* step size and the *same* number of leapfrog steps per
iteration, so a batched transition wastes no evaluations (unlike lockstep NUTS, where
every step waits for the longest trajectory). The tuning comes from cross-chain
statistics during warmup:

* **trajectory length** ``T``: Adam (``beta1 = 0``, ``beta2 = 0.95``) ascends the ChEES
  criterion ``E[(||x' - E x'||^2 - ||x - E x||^2)^2] / 4`` in ``log T``, with the paper's
  per-chain gradient estimate ``t (||x'_c||^2 - ||x_c||^2) (x'_c . v')`` (centred
  positions ``x_c``, end velocity ``v'``, jittered time ``t``) weighted by the
  acceptance probabilities; updates are clipped to ``+-0.35`` and ``log T`` is
  averaged with weights ``k^-0.5`` (TFP's and BlackJAX's choices). All of it is done in
  the coordinates whitened by the diagonal mass matrix;
* **step size**: dual averaging (Stan's constants) driving the *harmonic mean* of the
  chains' acceptance probabilities to ``target_accept`` (default 0.651, the optimum for
  HMC of Beskos et al. 2013);
* **diagonal mass matrix**: the variance pooled over chains and iterations in Stan's
  warmup windows (see :func:`genprog.infer.adaptation.mass_matrix_windows`), regularised
  as in Stan; after each window the step size is searched again and dual averaging
  restarts.

Each iteration integrates for ``t = u_k T`` with ``u_k`` the base-2 Halton sequence
(quasi-random jitter, as in the paper), i.e. ``ceil(u_k T / eps)`` leapfrog steps
(at least 1, at most ``max_leapfrog_steps``). After warmup ``eps``, ``T`` and the mass
matrix are frozen, so every chain is a valid (time-homogeneous) Markov chain.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..threads import threads_for, using_threads
from .adaptation import (
    WarmupSchedule,
    dual_averaging_init,
    dual_averaging_update,
    regularized_inverse_mass,
    step_size_search,
    welford_init,
    welford_update_pooled,
)
from .hamiltonian import BatchedPotential
from .hmc import hmc_step
from .sampler import SamplerResult, check_count, check_sampler_args, initial_state

__all__ = ["ChEESResult", "halton", "sample_chees"]

_ADAM_BETA2 = 0.95
_ADAM_EPS = 1e-8
_LOG_UPDATE_CLIP = 0.35
_AVERAGING_DECAY = 0.5


@dataclass(frozen=True)
class ChEESResult(SamplerResult):
    """:class:`~genprog.infer.sampler.SamplerResult` plus the adapted trajectory length.

    Attributes
    ----------
    trajectory_length : float
        Adapted integration time ``T`` (in the metric of ``inverse_mass_matrix``); each
        transition integrates for ``u T`` with ``u`` in (0, 1) from the Halton sequence.
    """

    trajectory_length: float = math.nan


def halton(k: int, base: int = 2) -> float:
    """``k``-th element (``k >= 1``) of the van der Corput / Halton sequence in (0, 1).

    >>> [halton(k) for k in range(1, 5)]
    [0.5, 0.25, 0.75, 0.125]
    """
    result, f = 0.0, 1.0 / base
    while k > 0:
        result += f * (k % base)
        k //= base
        f /= base
    return result


def _chees_gradient(z0, z1, r1, accept_prob, diverging, inv_mass, t):
    """Acceptance-weighted ChEES gradient in ``log T`` (whitened coordinates)."""
    w = torch.where(diverging, torch.zeros_like(accept_prob), accept_prob)
    ok = torch.isfinite(z1).all(-1) & torch.isfinite(r1).all(-1)
    w = torch.where(ok, w, torch.zeros_like(w))
    z1 = torch.where(ok.unsqueeze(-1), z1, torch.zeros_like(z1))
    r1 = torch.where(ok.unsqueeze(-1), r1, torch.zeros_like(r1))
    m1 = (w.unsqueeze(-1) * z1).sum(0) / (w.sum() + 1e-20)
    c1, c0 = z1 - m1, z0 - z0.mean(0)
    change = (c1 * c1 / inv_mass).sum(-1) - (c0 * c0 / inv_mass).sum(-1)
    g = t * change * (c1 * r1).sum(-1)  # (c/sd) . (sd r): whitened position . velocity
    return (w * g).sum() / (w.sum() + 1e-20)


def sample_chees(
    potential_and_grad: BatchedPotential, init: Tensor, *,
    warmup: int = 500, draws: int = 500, generator: torch.Generator | None = None,
    target_accept: float = 0.651, learning_rate: float = 0.025,
    max_leapfrog_steps: int = 1000, adapt_mass: bool = True,
    init_step_size: float | None = None, init_trajectory_length: float | None = None,
    max_energy_error: float = 1000.0, progress: bool = False, threads: int | None = None,
) -> ChEESResult:
    """Run ChEES-HMC on many chains at once (chains are the batch dimension).

    Parameters
    ----------
    potential_and_grad : callable ``z [B, D] -> (U [B], grad [B, D])``
        Batched potential (see :mod:`genprog.infer.hamiltonian`).
    init : Tensor [chains, D]
        Initial positions; fixes dtype and device.
    warmup, draws : int
        Adaptation iterations (discarded) and kept iterations per chain.
    generator : torch.Generator, optional
        The only source of randomness (``None``: a fresh generator seeded 0).
    target_accept : float
        Target harmonic-mean acceptance probability.
    learning_rate : float
        Adam's learning rate for ``log T``.
    max_leapfrog_steps : int
        Cap on the steps of one transition (``T <= max_leapfrog_steps * eps``).
    adapt_mass : bool
        Adapt a shared diagonal inverse mass matrix during warmup (else the identity).
    init_step_size : float, optional
        Starting point of the step-size search (default 1). With ``warmup == 0`` the
        step size used as is (default: the search's result).
    init_trajectory_length : float, optional
        Initial ``T`` (default: one step). With ``warmup == 0`` the ``T`` used.
    max_energy_error : float
        A transition diverges when ``H - H0`` exceeds this or is not finite; it stops
        there and is rejected.
    progress : bool
        Show a tqdm bar.
    threads : int, optional
        As in :func:`genprog.infer.nuts.sample_nuts`.

    Returns
    -------
    ChEESResult
        ``tree_depth`` is zero; ``n_steps`` the leapfrog steps each chain integrated;
        ``step_size`` and ``inverse_mass_matrix`` are the shared values, repeated per chain.

    Examples
    --------
    >>> import torch
    >>> pg = lambda z: (0.5 * (z**2).sum(-1), z)
    >>> res = sample_chees(pg, torch.zeros(16, 2), warmup=100, draws=20)
    >>> res.samples.shape
    torch.Size([16, 20, 2])
    """
    check_sampler_args(init, target_accept, max_energy_error)
    warmup, draws = check_count("warmup", warmup), check_count("draws", draws)
    max_leapfrog_steps = check_count("max_leapfrog_steps", max_leapfrog_steps, minimum=1)
    if not float(learning_rate) > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")
    for name, v in (("init_step_size", init_step_size),
                    ("init_trajectory_length", init_trajectory_length)):
        if v is not None and not (math.isfinite(float(v)) and float(v) > 0):
            raise ValueError(f"{name} must be positive and finite, got {v!r}")
    if init.shape[0] < 2 and warmup > 0:
        raise ValueError("ChEES adapts from cross-chain statistics: use at least 2 chains "
                         f"(dozens or more work best), got {init.shape[0]}")

    t_start = time.perf_counter()
    z, U, grad, generator = initial_state(potential_and_grad, init, generator)
    B, D = z.shape
    dev, dt = z.device, z.dtype
    n_grad = 1
    inv_mass = torch.ones(D, dtype=dt, device=dev)

    def search(eps0):
        eps, k = step_size_search(potential_and_grad, z, U, grad, inv_mass, generator,
                                  step_size=eps0)
        return float(eps.median()), k

    if warmup == 0 and init_step_size is not None:
        eps = float(init_step_size)
    else:
        eps, k = search(init_step_size)
        n_grad += k
    T = float(init_trajectory_length) if init_trajectory_length is not None else eps
    log_T, log_T_avg, avg_k = math.log(T), math.log(T), 0
    adam_v, adam_k = 0.0, 0

    schedule = WarmupSchedule.create(warmup, adapt_mass)
    da = dual_averaging_init(torch.tensor([eps], dtype=torch.float64))
    welford = welford_init(inv_mass)

    samples = torch.empty(B, draws, D, dtype=dt, device=dev)
    potential = torch.empty(B, draws, dtype=dt, device=dev)
    diverging = torch.empty(B, draws, dtype=torch.bool, device=dev)
    acceptance = torch.empty(B, draws, dtype=dt, device=dev)
    energy = torch.empty(B, draws, dtype=dt, device=dev)
    n_steps = torch.empty(B, draws, dtype=torch.long, device=dev)
    warmup_div = torch.zeros(B, dtype=torch.long, device=dev)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=warmup + draws, desc="chees warmup" if warmup else "chees")
    with using_threads(threads_for(B * D, threads)):
        try:
            for i in range(warmup + draws):
                T_now = math.exp(log_T) if i < warmup else T
                steps = min(max(math.ceil(halton(i + 1) * T_now / eps), 1), max_leapfrog_steps)
                z_before = z
                move = hmc_step(potential_and_grad, z, U, grad, eps, steps, inv_mass, generator,
                                max_energy_error)
                z, U, grad = move.z, move.U, move.grad
                acc, div, H0, taken = move.accept_prob, move.diverging, move.energy, move.proposal.n_steps
                z1, r1 = move.proposal.z, move.proposal.r
                n_grad += steps
                if i < warmup:
                    warmup_div += div
                    # step size: dual averaging on the harmonic mean of the acceptance probs
                    ok = ~div
                    n_ok = int(ok.sum())
                    hm = (n_ok / float((1.0 / acc[ok].clamp(min=1e-10)).sum())) if n_ok else 0.0
                    da = dual_averaging_update(da, torch.tensor([hm], dtype=torch.float64),
                                               target_accept)
                    # trajectory length: Adam ascent on ChEES in log T, clipped, then averaged
                    g = float(_chees_gradient(z_before, z1, r1, acc, div, inv_mass, steps * eps))
                    if math.isfinite(g):
                        adam_k += 1
                        adam_v = _ADAM_BETA2 * adam_v + (1 - _ADAM_BETA2) * g * g
                        v_hat = adam_v / (1 - _ADAM_BETA2 ** adam_k)
                        update = learning_rate * g / (math.sqrt(v_hat) + _ADAM_EPS)
                        log_T += max(-_LOG_UPDATE_CLIP, min(_LOG_UPDATE_CLIP, update))
                    eps = float(da.log_step_size.exp())
                    log_T = min(max(log_T, math.log(eps)), math.log(max_leapfrog_steps * eps))
                    avg_k += 1
                    w = avg_k ** -_AVERAGING_DECAY
                    log_T_avg = (1 - w) * log_T_avg + w * log_T
                    if schedule.collects(i):  # Welford, pooled over chains
                        welford = welford_update_pooled(welford, z)
                    if schedule.ends_window(i):
                        inv_mass = regularized_inverse_mass(welford)
                        welford = welford_init(inv_mass)
                        eps, k = search(eps)
                        n_grad += k
                        da = dual_averaging_init(torch.tensor([eps], dtype=torch.float64))
                        log_T_avg, avg_k = log_T, 0
                    if schedule.is_last(i):
                        eps = float(da.log_step_size_avg.exp())
                        T = min(max(math.exp(log_T_avg), eps), max_leapfrog_steps * eps)
                        if bar is not None:
                            bar.set_description("chees")
                else:
                    j = i - warmup
                    samples[:, j] = z
                    potential[:, j] = U
                    diverging[:, j] = div
                    acceptance[:, j] = acc
                    energy[:, j] = H0
                    n_steps[:, j] = taken
                if bar is not None:
                    bar.set_postfix(step_size=f"{eps:.3g}", steps=steps, refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
    if warmup == 0:
        T = float(init_trajectory_length) if init_trajectory_length is not None else eps
    return ChEESResult(
        samples=samples,
        potential_energy=potential,
        diverging=diverging,
        acceptance_rate=acceptance,
        energy=energy,
        tree_depth=torch.zeros(B, draws, dtype=torch.long, device=dev),
        n_steps=n_steps,
        step_size=torch.full((B,), eps, dtype=dt, device=dev),
        inverse_mass_matrix=inv_mass.expand(B, D).clone(),
        warmup_divergences=warmup_div,
        num_grad_evals=n_grad,
        wall_time_s=time.perf_counter() - t_start,
        trajectory_length=T,
    )

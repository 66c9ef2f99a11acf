"""ChEES-HMC: many chains, one shared step size and one jittered trajectory length.

Hoffman, Radul & Sountsov (2021), *An Adaptive MCMC Scheme for Setting Trajectory
Lengths in Hamiltonian Monte Carlo*, AISTATS. Every chain of the batch runs jittered
static HMC with the *same* step size and the *same* number of leapfrog steps per
iteration, so a batched transition wastes no evaluations (unlike lockstep NUTS, where
every step waits for the longest trajectory). All tuning comes from cross-chain
statistics during warmup, each iteration:

* **step size** ``eps``: Adam (``beta1 = 0``, ``beta2 = 0.95``, learning rate 0.05) on
  ``log eps``, ascending ``h - target_accept`` with ``h`` the *harmonic mean* of the
  chains' acceptance probabilities (a diverging chain counts as 0), target 0.651 (the
  optimum for HMC, Beskos et al. 2013). The harmonic mean is dominated by the worst
  chains, so a chain stuck in a narrow region pulls the step size down; Adam's
  normalised update moves ``log eps`` by at most about the learning rate per iteration,
  so the step size can neither collapse nor explode in a few iterations (dual averaging,
  used here before, sent it to ~1e-3 of its useful value on a 3,007-dimensional
  population PK posterior). A step-size search (:func:`~genprog.infer.adaptation.step_size_search`)
  starts it, and restarts it (and both Adam states) after each mass-matrix update;
* **trajectory length** ``T``: Adam (``beta1 = 0``, ``beta2 = 0.95``, ``learning_rate``)
  ascends the ChEES criterion ``E[(||x' - E x'||^2 - ||x - E x||^2)^2] / 4`` in
  ``log T`` with the paper's per-chain gradient ``t (||x'_c||^2 - ||x_c||^2)
  (x'_c . v')`` (centred positions ``x_c``, the end velocity ``v'``, the jittered time
  ``t = u T``; TFP's is the same divided by ``T``, which adapts ``T`` more slowly),
  averaged with the acceptance probabilities as weights (chains below 1e-4 and
  diverging ones left out, as in TFP); updates are clipped to ``+-0.35`` and ``T`` to
  ``[eps, max_leapfrog_steps * eps]`` after each update, so the number of leapfrog
  steps is capped in relation to the current step size. All of it in the coordinates
  whitened by the mass matrix;
* **diagonal mass matrix**: the variance pooled over chains and iterations in Stan's
  warmup windows (see :func:`genprog.infer.adaptation.mass_matrix_windows`), regularised
  as in Stan. (A per-iteration cross-chain variance, tried first, let a few far-out chains
  inflate the metric by orders of magnitude early on and then collapsed the step size on
  a 1,000-dimensional Gaussian; the windows start after the transient.)
* **stuck chains**: a chain that accepts nothing (acceptance below 1e-3, or diverging)
  for 10 iterations in a row during the first half of warmup is moved to the state of a
  chain drawn at random among those that are moving. A shared step size cannot serve a
  chain started where the gradient is 1e4 times larger than in the typical set (on the
  1,000-subject population PK model, 7 of 16 chains started from the jittered prior
  median never moved, and the harmonic mean then drives the shared step size to zero);
  a moving chain's state is a better start, and the second half of warmup decorrelates
  the copies. The count is reported (``stuck_chain_restarts``).

After warmup ``eps`` and ``T`` are the iterate averages (weights ``k^-0.5``, TFP's and
BlackJAX's choice) of their last runs, and they and the mass matrix are frozen, so every
chain is a valid (time-homogeneous) Markov chain. Each iteration integrates for
``t = u_k T`` with ``u_k`` the base-2 Halton sequence (quasi-random jitter, as in the
paper), i.e. ``ceil(u_k T / eps)`` leapfrog steps (at least 1, at most
``max_leapfrog_steps``).
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
    regularized_inverse_mass,
    step_size_search,
    welford_init,
    welford_update_pooled,
)
from .hamiltonian import BatchedPotential
from .hmc import hmc_step
from .sampler import DrawBuffer, SamplerResult, check_count, check_sampler_args, initial_state

__all__ = ["ChEESResult", "halton", "sample_chees"]

_ADAM_BETA2 = 0.95
_ADAM_EPS = 1e-8
_LOG_UPDATE_CLIP = 0.35
_AVERAGING_DECAY = 0.5
_STEP_SIZE_LEARNING_RATE = 0.05
_MIN_ACCEPT = 1e-4  # chains accepting less carry no ChEES gradient (TFP)
_STUCK_ACCEPT = 1e-3  # a chain accepting less (or diverging) ...
_STUCK_ITERATIONS = 10  # ... this many iterations in a row is stuck ...
_RESTART_FRACTION = 0.5  # ... and restarted during this fraction of warmup


@dataclass(frozen=True)
class ChEESResult(SamplerResult):
    """:class:`~genprog.infer.sampler.SamplerResult` plus the adapted trajectory length.

    Attributes
    ----------
    trajectory_length : float
        Adapted integration time ``T`` (in the metric of ``inverse_mass_matrix``); each
        transition integrates for ``u T`` with ``u`` in (0, 1) from the Halton sequence.
    stuck_chain_restarts : int
        Times during the first half of warmup that a chain which had accepted nothing
        (acceptance below 1e-3 or diverging) for 10 iterations in a row was moved to the
        state of a randomly chosen chain that was moving (see the module docstring).
    """

    trajectory_length: float = math.nan
    stuck_chain_restarts: int = 0


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


class _Adam:
    """Adam with ``beta1 = 0`` (RMSProp with bias correction) on one scalar, ascending:
    :meth:`step` returns the clipped update ``lr * g / sqrt(v_hat)``."""

    def __init__(self, learning_rate: float):
        self.learning_rate, self.v, self.k = learning_rate, 0.0, 0

    def step(self, g: float) -> float:
        if not math.isfinite(g):
            return 0.0
        self.k += 1
        self.v = _ADAM_BETA2 * self.v + (1 - _ADAM_BETA2) * g * g
        v_hat = self.v / (1 - _ADAM_BETA2**self.k)
        update = self.learning_rate * g / (math.sqrt(v_hat) + _ADAM_EPS)
        return max(-_LOG_UPDATE_CLIP, min(_LOG_UPDATE_CLIP, update))


class _IterateAverage:
    """Running average of a log parameter with weight ``k^-0.5`` on the ``k``-th value."""

    def __init__(self, x: float):
        self.value, self.k = x, 0

    def add(self, x: float) -> None:
        self.k += 1
        w = self.k**-_AVERAGING_DECAY
        self.value = (1 - w) * self.value + w * x


def _harmonic_mean_acceptance(accept_prob: Tensor, diverging: Tensor) -> float:
    """Harmonic mean over chains of the acceptance probabilities ``[B]``, a diverging chain
    counting as 0 (clamped to 1e-10)."""
    a = torch.where(diverging, torch.zeros_like(accept_prob), accept_prob).clamp(min=1e-10)
    return float(a.shape[0] / (1.0 / a.double()).sum())


def _restart_stuck(z, U, grad, stuck, generator):
    """Move each chain stuck for ``_STUCK_ITERATIONS`` iterations (``stuck [B]`` counts
    them) to the state of a chain drawn uniformly from those that are not stuck now.

    Returns the new ``z, U, grad`` and the number of chains moved (a host sync).
    """
    bad = stuck >= _STUCK_ITERATIONS
    good = torch.nonzero(stuck == 0).flatten()
    if not bool(bad.any()) or good.numel() == 0:
        return z, U, grad, 0
    donor = good[torch.randint(good.numel(), stuck.shape, generator=generator,
                               device=stuck.device)]
    src = torch.where(bad, donor, torch.arange(stuck.shape[0], device=stuck.device))
    n = int(bad.sum())
    stuck.masked_fill_(bad, 0)
    return z[src], U[src], grad[src], n


def _chees_gradient(z0, z1, r1, accept_prob, diverging, inv_mass, t):
    """Acceptance-weighted ChEES gradient in ``log T`` (whitened coordinates).

    ``z0, z1, r1 [B, D]``: start, proposal and its momentum; ``accept_prob, diverging
    [B]``; ``inv_mass [D]``; ``t = u T``: the jittered integration time. Returns a float.
    """
    w = torch.where(diverging | (accept_prob < _MIN_ACCEPT), torch.zeros_like(accept_prob),
                    accept_prob)
    ok = torch.isfinite(z1).all(-1) & torch.isfinite(r1).all(-1)
    w = torch.where(ok, w, torch.zeros_like(w))
    z1 = torch.where(ok.unsqueeze(-1), z1, torch.zeros_like(z1))
    r1 = torch.where(ok.unsqueeze(-1), r1, torch.zeros_like(r1))
    m1 = (w.unsqueeze(-1) * z1).sum(0) / (w.sum() + 1e-20)
    c1, c0 = z1 - m1, z0 - z0.mean(0)
    change = (c1 * c1 / inv_mass).sum(-1) - (c0 * c0 / inv_mass).sum(-1)
    g = t * change * (c1 * r1).sum(-1)  # (c/sd) . (sd r): whitened position . velocity
    return float((w * g).sum() / (w.sum() + 1e-20))


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
    log_eps, log_T = math.log(eps), math.log(T)
    adam_eps, adam_T = _Adam(_STEP_SIZE_LEARNING_RATE), _Adam(float(learning_rate))
    avg_eps, avg_T = _IterateAverage(log_eps), _IterateAverage(log_T)
    schedule = WarmupSchedule.create(warmup, adapt_mass)
    welford = welford_init(inv_mass)
    stuck = torch.zeros(B, dtype=torch.long, device=dev)
    restart_end, restarts = int(_RESTART_FRACTION * warmup), 0

    out = DrawBuffer(z, draws)
    warmup_div = torch.zeros(B, dtype=torch.long, device=dev)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=warmup + draws, desc="chees warmup" if warmup else "chees")
    with using_threads(threads_for(B * D, threads)):
        try:
            for i in range(warmup + draws):
                u = halton(i + 1)
                steps = min(max(math.ceil(u * T / eps), 1), max_leapfrog_steps)
                z_before = z
                move = hmc_step(potential_and_grad, z, U, grad, eps, steps, inv_mass, generator,
                                max_energy_error)
                z, U, grad = move.z, move.U, move.grad
                acc, div = move.accept_prob, move.diverging
                n_grad += steps
                if i < warmup:
                    warmup_div += div
                    # a chain that has accepted nothing for a while is restarted at another's state
                    stuck = torch.where((acc < _STUCK_ACCEPT) | div, stuck + 1, 0)
                    if i < restart_end:
                        z, U, grad, n = _restart_stuck(z, U, grad, stuck, generator)
                        restarts += n
                    # step size: Adam on log eps towards the harmonic-mean acceptance
                    log_eps += adam_eps.step(_harmonic_mean_acceptance(acc, div) - target_accept)
                    # trajectory length: Adam ascent on ChEES, capped by the step size
                    g = _chees_gradient(z_before, move.proposal.z, move.proposal.r, acc, div,
                                        inv_mass, u * T)
                    log_T += adam_T.step(g)
                    log_T = min(max(log_T, log_eps),
                                log_eps + math.log(max_leapfrog_steps))
                    if schedule.collects(i):  # Welford, pooled over chains
                        welford = welford_update_pooled(welford, z)
                    if schedule.ends_window(i):
                        inv_mass = regularized_inverse_mass(welford)
                        welford = welford_init(inv_mass)
                        eps, k = search(math.exp(log_eps))
                        n_grad += k
                        log_eps = math.log(eps)
                        log_T = max(log_T, log_eps)
                        adam_eps = _Adam(_STEP_SIZE_LEARNING_RATE)
                        adam_T = _Adam(float(learning_rate))
                        avg_eps, avg_T = _IterateAverage(log_eps), _IterateAverage(log_T)
                    avg_eps.add(log_eps)
                    avg_T.add(log_T)
                    eps, T = math.exp(log_eps), math.exp(log_T)
                    if i == warmup - 1:
                        eps = math.exp(avg_eps.value)
                        T = min(max(math.exp(avg_T.value), eps), max_leapfrog_steps * eps)
                        if bar is not None:
                            bar.set_description("chees")
                else:
                    out.put(i - warmup, z, U, acc, div, move.energy, move.proposal.n_steps)
                if bar is not None:
                    bar.set_postfix(step_size=f"{eps:.3g}", steps=steps, refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
    return ChEESResult(
        **out.fields,
        step_size=torch.full((B,), eps, dtype=dt, device=dev),
        inverse_mass_matrix=inv_mass.expand(B, D).clone(),
        warmup_divergences=warmup_div,
        num_grad_evals=n_grad,
        wall_time_s=time.perf_counter() - t_start,
        trajectory_length=T,
        stuck_chain_restarts=restarts,
    )

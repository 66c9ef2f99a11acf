"""What the per-chain-adapted HMC samplers share: the result record, the chain start,
argument checks, and the warmup-then-draws loop.

:func:`run_chains` drives any batched transition (a NUTS or a static HMC step) through
Stan's warmup: dual averaging of each chain's step size, and each chain's mass matrix,
diagonal or dense, estimated in Stan's windows (:mod:`genprog.infer.adaptation`). A dense
mass matrix ``Sigma = L L^T`` is applied by sampling the whitened potential
(:func:`genprog.infer.hamiltonian.whiten`) with a unit mass, so a transition only ever
sees a diagonal metric. Torch's intra-op threads are set for the batch while the loop
runs (:mod:`genprog.threads`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..threads import threads_for, using_threads
from ..validation import check_int
from .adaptation import (
    WarmupSchedule,
    dual_averaging_init,
    dual_averaging_update,
    regularized_inverse_mass,
    step_size_search,
    welford_init,
    welford_update,
)
from .hamiltonian import BatchedPotential, whiten

__all__ = [
    "DrawBuffer",
    "SamplerResult",
    "Transition",
    "TransitionFn",
    "check_count",
    "check_sampler_args",
    "initial_state",
    "per_chain",
    "run_chains",
]


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
    inverse_mass_matrix : Tensor [chains, D] or [chains, D, D]
        Inverse mass matrix used for the draws: diagonal, or dense (``dense_mass=True``).
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


class Transition(NamedTuple):
    """One batched transition: the new state and per-chain statistics.

    Attributes
    ----------
    z, U, grad : Tensor [B, D], [B], [B, D]
        New state (position, potential, gradient).
    accept_prob : Tensor [B]
        Acceptance statistic driving the step-size adaptation.
    diverging : Tensor [B], bool
    energy : Tensor [B]
        Hamiltonian at the start of the transition.
    tree_depth : Tensor [B], long
        Trajectory doublings (0 for static HMC).
    n_steps : Tensor [B], long
        Leapfrog steps of the chain's own trajectory.
    num_grad_evals : int
        Batched potential calls the transition made.
    """

    z: Tensor
    U: Tensor
    grad: Tensor
    accept_prob: Tensor
    diverging: Tensor
    energy: Tensor
    tree_depth: Tensor
    n_steps: Tensor
    num_grad_evals: int


#: ``step(potential_and_grad, z, U, grad, step_size [B], inv_mass [B, D], generator)``
TransitionFn = Callable[
    [BatchedPotential, Tensor, Tensor, Tensor, Tensor, Tensor, torch.Generator], Transition
]


# ----------------------------------------------------------------------- checks


def check_count(name: str, v, minimum: int = 0) -> int:
    """An integer argument (Python or NumPy int, not bool) ``>= minimum``, as ``int``
    (:func:`genprog.validation.check_int`; its ``ArgumentTypeError`` for a non-integer is
    a ``ValueError`` too)."""
    return check_int(name, v, minimum=minimum)


def check_sampler_args(init, target_accept, max_energy_error) -> None:
    """Check the arguments every sampler takes (raises ``ValueError``)."""
    if not torch.is_tensor(init) or init.dim() != 2 or not init.is_floating_point():
        raise ValueError("init must be a floating-point tensor of shape [chains, D]")
    if init.shape[0] < 1 or init.shape[1] < 1:
        raise ValueError(f"init must have at least one chain and one dimension, got "
                         f"{tuple(init.shape)}")
    if not 0.0 < float(target_accept) < 1.0:
        raise ValueError(f"target_accept must be in (0, 1), got {target_accept!r}")
    if not float(max_energy_error) > 0:
        raise ValueError(f"max_energy_error must be positive, got {max_energy_error!r}")


def per_chain(x: Tensor | float, like: Tensor, name: str) -> Tensor:
    """Broadcast a scalar or ``[B]`` value to a fresh ``[B]`` tensor in ``like``'s dtype."""
    B = like.shape[0]
    t = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, B)):
        raise ValueError(f"{name} must be a scalar or have shape [{B}], got {tuple(t.shape)}")
    return t.expand(B).clone()


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
    U, grad = potential_and_grad(z)
    U, grad = U.detach(), grad.detach()
    if U.shape != (B,) or grad.shape != (B, D):
        raise ValueError(f"potential_and_grad must return U [{B}] and grad [{B}, {D}], got "
                         f"{tuple(U.shape)} and {tuple(grad.shape)}")
    bad = ~(torch.isfinite(U) & torch.isfinite(grad).all(-1))
    if bool(bad.any()):
        raise ValueError(f"potential or gradient is not finite at init for chains "
                         f"{torch.nonzero(bad).flatten().tolist()}")
    return z, U, grad, generator


class DrawBuffer:
    """The post-warmup outputs of a run, preallocated: positions ``[B, draws, D]`` and the
    per-draw statistics ``[B, draws]`` of :class:`SamplerResult`, filled by :meth:`put`."""

    def __init__(self, like: Tensor, draws: int):
        B, D = like.shape
        dt, dev = like.dtype, like.device
        self.fields = {
            "samples": torch.empty(B, draws, D, dtype=dt, device=dev),
            "potential_energy": torch.empty(B, draws, dtype=dt, device=dev),
            "diverging": torch.empty(B, draws, dtype=torch.bool, device=dev),
            "acceptance_rate": torch.empty(B, draws, dtype=dt, device=dev),
            "energy": torch.empty(B, draws, dtype=dt, device=dev),
            "tree_depth": torch.zeros(B, draws, dtype=torch.long, device=dev),
            "n_steps": torch.empty(B, draws, dtype=torch.long, device=dev),
        }

    def put(self, j: int, z: Tensor, U: Tensor, accept_prob: Tensor, diverging: Tensor,
            energy: Tensor, n_steps: Tensor, tree_depth: Tensor | None = None) -> None:
        """Store draw ``j``: position ``z [B, D]``, potential ``U [B]`` and the transition's
        statistics, each ``[B]`` (``tree_depth`` stays 0 when not given)."""
        f = self.fields
        f["samples"][:, j] = z
        f["potential_energy"][:, j] = U
        f["acceptance_rate"][:, j] = accept_prob
        f["diverging"][:, j] = diverging
        f["energy"][:, j] = energy
        f["n_steps"][:, j] = n_steps
        if tree_depth is not None:
            f["tree_depth"][:, j] = tree_depth


# ------------------------------------------------------------------------- driver


def _dense_factor(cov: Tensor) -> Tensor:
    """Lower Cholesky factor of ``cov [B, D, D]``, computed in float64 (with growing jitter
    for a chain whose estimate is numerically singular)."""
    c64 = cov.double()
    eye = torch.eye(cov.shape[-1], dtype=torch.float64, device=cov.device)
    jitter = 0.0
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(c64 + jitter * eye)
        if not bool((info != 0).any()):
            return chol.to(cov.dtype)
        jitter = 1e-10 if jitter == 0.0 else jitter * 100.0
    raise ValueError("the dense mass matrix estimate is not positive definite")


def _to_model(chol: Tensor | None, x: Tensor) -> Tensor:
    return x if chol is None else torch.matmul(chol, x.unsqueeze(-1)).squeeze(-1)


def run_chains(
    step: TransitionFn,
    potential_and_grad: BatchedPotential,
    init: Tensor,
    *,
    warmup: int,
    draws: int,
    generator: torch.Generator | None,
    target_accept: float,
    adapt_mass: bool,
    dense_mass: bool,
    init_step_size: Tensor | float | None,
    progress: bool,
    name: str,
    threads: int | None = None,
) -> SamplerResult:
    """Warmup (Stan's adaptation, per chain), then ``draws`` kept transitions of ``step``.

    Parameters
    ----------
    step : callable
        The batched transition (:data:`TransitionFn`).
    potential_and_grad, init, warmup, draws, generator, target_accept, adapt_mass,
    dense_mass, init_step_size, progress, threads
        As in :func:`genprog.infer.nuts.sample_nuts` (arguments already checked).
    name : str
        Label of the progress bar.

    Returns
    -------
    SamplerResult
    """
    t_start = time.perf_counter()
    z, U, grad, generator = initial_state(potential_and_grad, init, generator)
    B, D = z.shape
    dev, dt = z.device, z.dtype
    n_grad = 1
    # x are the coordinates the transitions see: z itself, or L^-1 z with a dense metric,
    # whose transitions then run with a unit (diagonal) inverse mass.
    x, pg, chol = z, potential_and_grad, None
    inv_mass = torch.ones_like(z)
    dense_inv_mass = torch.eye(D, dtype=dt, device=dev).expand(B, D, D) if dense_mass else None
    if init_step_size is not None:
        init_step_size = per_chain(init_step_size, z, "init_step_size")
        if not bool((torch.isfinite(init_step_size) & (init_step_size > 0)).all()):
            raise ValueError("init_step_size must be positive and finite")

    schedule = WarmupSchedule.create(warmup, adapt_mass)
    welford = welford_init(z, dense=dense_mass)
    out = DrawBuffer(z, draws)
    warmup_div = torch.zeros(B, dtype=torch.long, device=dev)
    total_div = torch.zeros(B, dtype=torch.long, device=dev)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=warmup + draws, desc=f"{name} warmup" if warmup else name)
    with using_threads(threads_for(B * D, threads)):
        try:
            if init_step_size is not None and warmup == 0:
                eps = init_step_size
            else:
                eps, k = step_size_search(pg, x, U, grad, inv_mass, generator,
                                          step_size=init_step_size)
                n_grad += k
            da = dual_averaging_init(eps)
            for i in range(warmup + draws):
                tr = step(pg, x, U, grad, eps, inv_mass, generator)
                x, U, grad = tr.z, tr.U, tr.grad
                n_grad += tr.num_grad_evals
                total_div += tr.diverging
                z = _to_model(chol, x)
                if i < warmup:
                    warmup_div += tr.diverging
                    da = dual_averaging_update(da, tr.accept_prob, target_accept)
                    eps = da.log_step_size.exp()
                    if schedule.collects(i):
                        welford = welford_update(welford, z)
                    if schedule.ends_window(i):
                        estimate = regularized_inverse_mass(welford)
                        welford = welford_init(z, dense=dense_mass)
                        if dense_mass:
                            dense_inv_mass, chol = estimate, _dense_factor(estimate)
                            pg = whiten(potential_and_grad, chol)
                            x = torch.linalg.solve_triangular(chol, z.unsqueeze(-1),
                                                              upper=False).squeeze(-1)
                            U, grad = pg(x)
                            U, grad = U.detach(), grad.detach()
                            n_grad += 1
                        else:
                            inv_mass = estimate
                        eps, k = step_size_search(pg, x, U, grad, inv_mass, generator,
                                                  step_size=eps)
                        n_grad += k
                        da = dual_averaging_init(eps)
                    if schedule.is_last(i):
                        eps = da.log_step_size_avg.exp()
                        if bar is not None:
                            bar.set_description(name)
                else:
                    out.put(i - warmup, z, U, tr.accept_prob, tr.diverging, tr.energy,
                            tr.n_steps, tr.tree_depth)
                if bar is not None:
                    bar.set_postfix(divergences=int(total_div.sum()),
                                    step_size=f"{float(eps.mean()):.3g}", refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
    return SamplerResult(
        **out.fields,
        step_size=eps,
        inverse_mass_matrix=(dense_inv_mass if dense_mass else inv_mass).clone(),
        warmup_divergences=warmup_div,
        num_grad_evals=n_grad,
        wall_time_s=time.perf_counter() - t_start,
    )

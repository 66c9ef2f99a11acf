"""The optimiser loops of genprog: one for stochastic objectives, one for smooth ones.

* :func:`minimize` runs a ``torch.optim`` optimizer (Adam, ...) on a noisy loss — the
  ELBO of VI, a minibatch loss of a zoo network — with one stopping rule: every
  ``window`` steps the mean loss of the window is compared with the previous window's;
  when the improvement is within noise (less than two standard errors of the difference,
  or below ``tol`` relative to the loss) the learning rate is cut by 5x, and after two
  cuts the run stops as converged. Reaching ``max_iters`` first is reported
  (``converged=False``) and warned about with a :class:`~genprog.errors.ConvergenceWarning`.
* :func:`maximize` runs L-BFGS (strong Wolfe line search) on a smooth deterministic
  objective — a MAP or Laplace mode, a population likelihood — in rounds of 50 iterations
  until the gradient vanishes, the point stops moving, or ``max_iters``.

Both return a frozen :class:`OptimizationResult`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .errors import ConvergenceWarning
from .validation import check_float, check_int


@dataclass(frozen=True)
class OptimizationResult:
    """What an optimiser loop did.

    Attributes
    ----------
    z : Tensor [D] or None
        The optimum found (:func:`maximize`); None for :func:`minimize`, whose parameters
        are updated in place.
    value : float
        The objective at the end (for :func:`minimize`: the mean loss of the last window).
    grad_norm : float
        Max-abs gradient at ``z`` (:func:`maximize`); NaN for :func:`minimize`.
    num_iters : int
        Optimiser iterations (L-BFGS iterations, or optimizer steps).
    converged : bool
        Whether the stopping rule fired before ``max_iters``.
    trace : tuple[float, ...]
        :func:`minimize`: the loss at every step; :func:`maximize`: the objective after
        each round.
    grad : Tensor [D] or None
        The gradient of the objective at ``z`` (:func:`maximize`).
    num_rounds : int
        L-BFGS rounds (:func:`maximize`); 0 for :func:`minimize`.
    """

    z: torch.Tensor | None
    value: float
    grad_norm: float
    num_iters: int
    converged: bool
    trace: tuple
    grad: torch.Tensor | None = None
    num_rounds: int = 0


def minimize(loss_fn, optimizer: torch.optim.Optimizer, *, max_iters: int, window: int = 100,
             tol: float = 0.0, what: str = "optimisation", progress: bool | None = None,
             clip_grad: tuple | None = None, reduce=None, warn: bool = True,
             hint: str = "raise max_iters") -> OptimizationResult:
    """Run ``optimizer`` on ``loss_fn`` until the plateau rule (module docstring) fires.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(step) -> Tensor []``: the loss at step ``step`` (1-based); a minibatch
        closure draws its batch here.
    optimizer : torch.optim.Optimizer
    max_iters : int
        Maximum optimizer steps.
    window : int
        Steps per window of the plateau rule (>= 2).
    tol : float
        Also count a window as a plateau when its mean changed by less than
        ``tol * (1 + |mean|)``.
    what : str
        Names the run in the progress bar, errors and warnings (e.g. ``"VI"``, ``"Flow.mle"``).
    progress : bool, optional
        Progress bar (default: when attached to a terminal).
    clip_grad : (params, max_norm), optional
        Clip the gradient norm of ``params`` before each step.
    reduce : callable, optional
        ``reduce(params, loss) -> loss`` after ``backward`` (data-parallel averaging of
        gradients and loss across ranks).
    warn : bool
        Warn when ``max_iters`` is reached before the rule fires.
    hint : str
        What the warning suggests.

    Raises
    ------
    RuntimeError
        When the loss becomes non-finite (naming ``what`` and the step).
    """
    max_iters = check_int(f"{what}: max_iters", max_iters)
    window = check_int(f"{what}: window", window, minimum=2)
    tol = check_float(f"{what}: tol", tol, minimum=0.0)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    losses, means, cuts, converged, step = [], [], 0, False, 0
    bar = tqdm(total=max_iters, desc=what, leave=False,
               disable=None if progress is None else not progress)
    try:
        for step in range(1, max_iters + 1):
            optimizer.zero_grad()
            loss = loss_fn(step)
            if reduce is None:
                _check_finite_loss(loss, what, step)
            loss.backward()
            if reduce is not None:
                # every rank checks the reduced loss: a rank-local NaN stops all ranks
                # together instead of leaving the others waiting in the next collective
                loss = reduce(params, loss)
                _check_finite_loss(loss, what, step)
            if clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(*clip_grad)
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            if step % window:
                continue
            w = torch.tensor(losses[-window:], dtype=torch.float64)
            means.append((float(w.mean()), float(w.var()) / window))
            bar.set_postfix(loss=f"{means[-1][0]:.4g}")
            if len(means) < 2:
                continue
            (m1, v1), (m0, v0) = means[-1], means[-2]
            if m0 - m1 < 2 * math.sqrt(v0 + v1) or abs(m0 - m1) < tol * (1 + abs(m1)):
                if cuts == 2:
                    converged = True
                    break
                cuts += 1
                for group in optimizer.param_groups:
                    group["lr"] *= 0.2
    finally:
        bar.close()
    last = sum(losses[-window:]) / min(window, len(losses))
    if warn and not converged:
        warnings.warn(f"{what} did not converge in {max_iters} steps (the windowed loss, "
                      f"last {last:.6g}, was still falling); {hint}", ConvergenceWarning,
                      stacklevel=3)
    return OptimizationResult(None, last, float("nan"), step, converged, tuple(losses))


def _check_finite_loss(loss: torch.Tensor, what: str, step: int) -> None:
    if not torch.isfinite(loss):
        raise RuntimeError(
            f"{what}: the loss became non-finite at step {step}; check the model's "
            "support/priors or lower the learning rate"
        )


def _rejected_parameter(e: ValueError) -> bool:
    """A distribution refused a parameter value (Pyro's argument validation)."""
    return "Expected parameter" in str(e) or "constraint" in str(e)


def value_and_grad(objective, z: torch.Tensor):
    """``objective(z[None])[0]`` and its gradient at ``z [D]`` (``-inf`` and NaN gradient
    where the objective rejects the point)."""
    with torch.enable_grad():
        zz = z.detach().clone().requires_grad_(True)
        try:
            val = objective(zz[None])[0]
        except ValueError:
            return zz.new_tensor(float("-inf")), torch.full_like(zz, float("nan"))
        if not val.requires_grad:
            return val, torch.zeros_like(zz)
        g, = torch.autograd.grad(val, zz)
    return val, g


def maximize(objective, z0: torch.Tensor, max_iters: int = 1000, grad_tol: float = 1e-5, *,
             round_iters: int = 50, max_rounds: int | None = None, fresh_rounds: bool = False,
             round_tolerances: tuple = (0.0, 0.0)) -> OptimizationResult:
    """Maximise ``objective(z [1, D]) -> [1]`` from ``z0 [D]`` with L-BFGS.

    Runs rounds of ``round_iters`` L-BFGS iterations until the max-abs gradient drops below
    ``grad_tol`` (scaled by ``1 + |objective|``), the point stops moving, ``max_iters``
    iterations or ``max_rounds`` rounds. Points where the objective is not finite (or a
    distribution rejects its parameters) send the line search back.

    Parameters
    ----------
    objective : callable
        ``objective(z [1, D]) -> Tensor [1]``, differentiable in ``z``. It may keep state
        between calls (a warm start of inner problems); it is always called last at the
        returned point.
    z0 : Tensor [D]
    max_iters : int
        L-BFGS iterations in all.
    grad_tol : float
        Converged when ``max |grad| <= grad_tol * (1 + |objective|)``.
    round_iters : int
        L-BFGS iterations per round (``max_iter`` of ``torch.optim.LBFGS``).
    max_rounds : int, optional
        Rounds at most (default: as many as ``max_iters`` allows).
    fresh_rounds : bool
        For objectives with rejected regions (a population likelihood whose inner problems
        fail at extreme trial points): each round starts from the best point seen so far
        with a fresh curvature history, and a line search that fails (torch's
        ``IndexError``/``RuntimeError`` on a degenerate bracket) ends the round instead
        of the run.
    round_tolerances : (float, float)
        ``tolerance_grad`` and ``tolerance_change`` of ``torch.optim.LBFGS``, which end a
        round early (default: never).

    Returns
    -------
    OptimizationResult
        ``z`` the optimum, ``value`` and ``grad`` there, ``num_rounds`` the rounds run.
    """
    max_iters = check_int("max_iters", max_iters)
    round_iters = check_int("round_iters", round_iters)
    if max_rounds is not None:
        max_rounds = check_int("max_rounds", max_rounds)
    z = z0.detach().clone().requires_grad_(True)
    best = {"loss": math.inf, "z": z.detach().clone()}

    def new_optimizer():
        return torch.optim.LBFGS([z], lr=1.0, max_iter=round_iters, history_size=20,
                                 tolerance_grad=round_tolerances[0],
                                 tolerance_change=round_tolerances[1],
                                 line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        try:
            loss = -objective(z[None])[0]
        except ValueError as e:
            if not _rejected_parameter(e):
                raise
            loss = None
        if loss is None or not torch.isfinite(loss):
            # a large finite loss with no gradient sends the line search back
            loss = z.new_tensor(1e30) + 0 * z.sum()
        elif fresh_rounds and float(loss.detach()) < best["loss"]:
            best["loss"], best["z"] = float(loss.detach()), z.detach().clone()
        loss.backward()
        return loss

    opt = new_optimizer()
    trace, iters, rounds, converged = [], 0, 0, False
    grad, value = None, float("nan")
    while iters < max_iters and (max_rounds is None or rounds < max_rounds):
        rounds += 1
        before = z.detach().clone()
        done_before = iters
        try:
            opt.step(closure)
        except ValueError as e:
            if not _rejected_parameter(e):
                raise
            with torch.no_grad():
                z.copy_(before)
            break
        except (IndexError, RuntimeError):
            if not fresh_rounds:
                raise
        if fresh_rounds and math.isfinite(best["loss"]):
            with torch.no_grad():  # continue from the best point seen
                z.copy_(best["z"])
        if not torch.isfinite(z).all():
            with torch.no_grad():
                z.copy_(before)
            break
        state = opt.state[opt._params[0]]
        n_iter = int(state.get("n_iter", round_iters))
        iters = done_before + n_iter if fresh_rounds else n_iter
        val, grad = value_and_grad(objective, z)
        value = float(val.detach())
        trace.append(value)
        if not math.isfinite(value):
            break
        if _max_abs(grad) <= grad_tol * (1 + abs(value)):
            converged = True
            break
        if torch.equal(before, z.detach()):
            converged = _max_abs(grad) <= 1e-3 * (1 + abs(value))
            break
        if fresh_rounds:
            opt = new_optimizer()
    if not converged:
        val, grad = value_and_grad(objective, z)
        value = float(val.detach())
    return OptimizationResult(z.detach(), value, _max_abs(grad), iters, converged, tuple(trace),
                              grad=grad.detach(), num_rounds=rounds)


def _max_abs(g: torch.Tensor) -> float:
    return float(g.abs().max()) if g.numel() else 0.0


def symmetric_hessian(loss, z: torch.Tensor, hessian: torch.Tensor | None = None):
    """The Hessian of the scalar ``loss(z [D])`` at ``z`` (or the given ``hessian [D, D]``),
    symmetrised, and its Cholesky factor: ``(H [D, D], L [D, D] or None)``; ``L`` is None
    where ``H`` is not finite or not positive definite (the caller says what that means)."""
    if hessian is None:
        with torch.enable_grad():
            hessian = torch.autograd.functional.hessian(loss, z.detach())
    hessian = 0.5 * (hessian.detach() + hessian.detach().T)
    if not bool(torch.isfinite(hessian).all()):
        return hessian, None
    chol, info = torch.linalg.cholesky_ex(hessian)
    return hessian, (chol if int(info) == 0 else None)

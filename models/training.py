"""The training loop shared by the zoo's neural models (flows, MADE, VAE, diffusion, EBM,
latent ODE): minibatch steps of a torch optimizer, a progress bar, and a stopping rule.

Stopping rule: every ``window`` steps the mean loss of the window is compared with the
previous window's; when the improvement is within noise (less than two standard errors of
the difference) the learning rate is cut by 5x, and after two cuts training stops as
converged. Reaching ``max_steps`` first raises a
:class:`~genprog.errors.ConvergenceWarning`; a non-finite loss raises ``RuntimeError``.
"""

from __future__ import annotations

import math
import warnings

import torch
from tqdm.auto import tqdm

from genprog.errors import ConvergenceWarning


def minimize(loss_fn, optimizer: torch.optim.Optimizer, *, max_steps: int, window: int = 100,
             what: str = "training", progress: bool | None = None,
             clip_grad: tuple | None = None) -> dict:
    """Run ``optimizer`` on ``loss_fn`` until the stopping rule (module docstring) fires.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(step) -> Tensor []``, the loss of one minibatch (the closure draws it).
    optimizer : torch.optim.Optimizer
    max_steps, window : int
    what : str
        Names the model in the progress bar, errors and warnings (e.g. ``"Flow.mle"``).
    progress : bool, optional
        Show a progress bar (default: when attached to a terminal).
    clip_grad : (params, max_norm), optional
        Clip the gradient norm of ``params`` before each step.

    Returns
    -------
    dict
        ``loss_trace`` (list of float), ``num_steps``, ``converged``.
    """
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"{what}: max_steps must be a positive int, got {max_steps!r}")
    if not isinstance(window, int) or window < 2:
        raise ValueError(f"{what}: window must be an int >= 2, got {window!r}")
    losses, means, cuts, converged, step = [], [], 0, False, 0
    bar = tqdm(total=max_steps, desc=what, leave=False,
               disable=None if progress is None else not progress)
    try:
        for step in range(1, max_steps + 1):
            optimizer.zero_grad()
            loss = loss_fn(step)
            if not torch.isfinite(loss):
                raise RuntimeError(f"{what}: the loss became non-finite at step {step}; "
                                   "lower the learning rate")
            loss.backward()
            if clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(*clip_grad)
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            if step % window == 0:
                w = torch.tensor(losses[-window:], dtype=torch.float64)
                means.append((float(w.mean()), float(w.var()) / window))
                if len(means) >= 2:
                    (m1, v1), (m0, v0) = means[-1], means[-2]
                    if m0 - m1 < 2 * math.sqrt(v0 + v1):
                        if cuts == 2:
                            converged = True
                            break
                        cuts += 1
                        for group in optimizer.param_groups:
                            group["lr"] *= 0.2
    finally:
        bar.close()
    if not converged:
        warnings.warn(f"{what} did not converge in {max_steps} steps (the windowed loss was "
                      "still falling); raise max_steps", ConvergenceWarning, stacklevel=3)
    return {"loss_trace": losses, "num_steps": step, "converged": converged}

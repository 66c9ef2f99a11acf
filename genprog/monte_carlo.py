"""Monte Carlo averages on the log scale, with their standard errors.

``log mean exp`` of log-weights is the estimator behind importance sampling, AIS,
IWAE bounds and every ``log p`` estimated from draws; :func:`log_mean_exp` computes it
once, batched over leading dims, with its delta-method standard error and Kish ESS.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class LogMeanExp(NamedTuple):
    """``log mean exp(log_w)`` over the last dim, with its error bar.

    Attributes
    ----------
    value : Tensor [*batch]
        ``log (1/N sum_i w_i)``.
    stderr : Tensor [*batch]
        First-order (delta-method) standard error of ``value``:
        ``sqrt(var(w) / (N mean(w)^2))`` with the ``N - 1`` variance, which equals
        ``sqrt((N / ESS - 1) / (N - 1))``; ``inf`` when ``N < 2``.
    ess : Tensor [*batch]
        Kish effective sample size ``(sum w)^2 / sum w^2``.
    """

    value: torch.Tensor
    stderr: torch.Tensor
    ess: torch.Tensor


def log_mean_exp(log_w: torch.Tensor) -> LogMeanExp:
    """``log mean exp`` of ``log_w [*batch, N]`` over its last dim, in float64.

    ``-inf`` log-weights count as zero weights; each row needs at least one finite one.

    >>> r = log_mean_exp(torch.zeros(4))
    >>> float(r.value), float(r.stderr), float(r.ess)
    (0.0, 0.0, 4.0)
    """
    lw = log_w.detach().to(torch.float64)
    n = lw.shape[-1]
    top = lw.max(-1, keepdim=True).values
    w = torch.exp(lw - top)
    s1, s2 = w.sum(-1), (w * w).sum(-1)
    value = top.squeeze(-1) + torch.log(s1) - math.log(n)
    ess = s1 * s1 / s2
    if n < 2:
        return LogMeanExp(value, torch.full_like(value, math.inf), ess)
    rel_var = ((n / ess - 1.0) / (n - 1)).clamp_min(0.0)
    return LogMeanExp(value, rel_var.sqrt(), ess)

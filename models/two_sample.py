"""Kernel two-sample test (maximum mean discrepancy, Gretton et al. 2012) with a
permutation p-value: do two samples ``x [n, d]`` and ``y [m, d]`` come from one
distribution? Used to check samplers (Langevin, reverse SDE, ODE) against exact draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from genprog.validation import check_int


@dataclass(frozen=True)
class MMDTest:
    """Result of :func:`mmd_test`.

    Attributes
    ----------
    mmd2 : float
        Unbiased estimate of ``MMD^2`` with the Gaussian kernel
        ``k(a, b) = exp(-|a - b|^2 / (2 h^2))`` (may be slightly negative under ``H0``).
    p_value : float
        ``(1 + #{permuted MMD^2 >= observed}) / (1 + num_permutations)``: valid
        (super-uniform) under ``H0: same distribution``.
    bandwidth : float
        ``h``: the median pairwise distance of the pooled sample unless given.
    num_permutations : int
    sizes : tuple[int, int]
    """

    mmd2: float
    p_value: float
    bandwidth: float
    num_permutations: int
    sizes: tuple


def _matrix(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if t.dim() == 1:
        t = t.unsqueeze(-1)
    if t.dim() != 2 or t.shape[0] < 2:
        raise ValueError(f"mmd_test: {name} must be [n, d] with n >= 2, got {list(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"mmd_test: {name} has NaN or infinite entries")
    return t


def mmd_test(x, y, *, num_permutations: int = 500, bandwidth: float | None = None,
             seed: int = 0, chunk: int = 100) -> MMDTest:
    """Unbiased ``MMD^2`` between ``x [n, d]`` and ``y [m, d]`` (Gaussian kernel) and its
    permutation p-value (``num_permutations`` random relabellings of the pooled sample,
    evaluated as quadratic forms on one kernel matrix, ``chunk`` at a time; float64, on
    ``x``'s device).

    Examples
    --------
    >>> import torch

from genprog.validation import check_int
    >>> g = torch.Generator().manual_seed(0)
    >>> a, b = torch.randn(100, 2, generator=g), torch.randn(100, 2, generator=g)
    >>> mmd_test(a, b + 1.0, num_permutations=200).p_value < 0.01
    True
    """
    x, y = _matrix(x, "x"), _matrix(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd_test: x and y have different dimensions {x.shape[1]} and {y.shape[1]}")
    chunk = check_int("mmd_test: chunk", chunk)
    num_permutations = check_int("mmd_test: num_permutations", num_permutations)
    n, m = x.shape[0], y.shape[0]
    pooled = torch.cat([x.to(torch.float64), y.to(device=x.device, dtype=torch.float64)], 0)
    sq = torch.cdist(pooled, pooled).pow(2)
    if bandwidth is None:
        iu = torch.triu_indices(n + m, n + m, 1, device=sq.device)
        h = float(sq[iu[0], iu[1]].sqrt().median())
        h = h if h > 0 else 1.0
    else:
        h = float(bandwidth)
        if not (h > 0 and math.isfinite(h)):
            raise ValueError(f"mmd_test: bandwidth must be positive, got {bandwidth!r}")
    K = torch.exp(-sq / (2 * h * h))
    K0 = K - torch.diag(torch.diagonal(K))

    def stat(s):  # s [P, n + m]: 1 for the first sample
        r = 1.0 - s
        return (((s @ K0) * s).sum(1) / (n * (n - 1)) + ((r @ K0) * r).sum(1) / (m * (m - 1))
                - 2 * ((s @ K) * r).sum(1) / (n * m))

    labels = torch.cat([torch.ones(n), torch.zeros(m)]).to(K)
    observed = float(stat(labels.unsqueeze(0))[0])
    g = torch.Generator(device=K.device).manual_seed(int(seed))
    exceed, done = 0, 0
    while done < num_permutations:
        P = min(chunk, num_permutations - done)
        perm = torch.argsort(torch.rand(P, n + m, generator=g, device=K.device), dim=1)
        exceed += int((stat(labels[perm]) >= observed - 1e-12).sum())
        done += P
    return MMDTest(observed, (1 + exceed) / (1 + num_permutations), h, num_permutations, (n, m))

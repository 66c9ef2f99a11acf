"""The frozen record every inference algorithm returns.

Algorithms in :mod:`genprog.infer` never build a :class:`genprog.Fit`: they return an
:class:`InferenceRecord` of raw results in the unconstrained coordinates of the model's
:class:`~genprog.density.JointDensity`, and :meth:`genprog.Model.fit` alone turns it into
a complete ``Fit`` (constrained draws, deterministic sites, convergence diagnostics).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class InferenceRecord:
    """Raw output of one inference run.

    Attributes
    ----------
    method : str
        ``"map"``, ``"laplace"``, ``"vi"``, ``"nuts"``, ``"hmc"``, ``"chees"``, ...
    unconstrained : Tensor [chain, draw, D]
        Draws (or the optimum, as ``[1, 1, D]``) in the unconstrained packing of the
        density of the model with the ``held`` sites fixed.
    held : Mapping[str, Tensor]
        Sites point-estimated inside the fit (``point=[...]``), held at these constrained
        values while the rest was inferred; empty when none.
    sample_stats : Mapping[str, ndarray]
        Per-draw sampler statistics ``[chain, draw]`` with ArviZ names (MCMC only).
    info : Mapping[str, Any]
        The method's own record (optimisation trace, adapted step size, wall time, ...);
        documented by each algorithm and copied into ``Fit.info``.
    seed : int or None
        The seed the run used.
    """

    method: str
    unconstrained: torch.Tensor
    held: Mapping[str, torch.Tensor] = field(default_factory=dict)
    sample_stats: Mapping[str, Any] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None

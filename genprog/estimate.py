"""The ``Estimate`` record: a number with its error bar and how it was obtained."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Estimate:
    """A scalar estimate (for example log p(observed), in nats) with its standard error.

    Attributes
    ----------
    value : float
        The estimate.
    stderr : float
        Its Monte Carlo standard error; ``0.0`` for exact results and for deterministic
        approximations (Laplace), whose bias is not quantified (see ``details``).
    method : str
        How it was obtained: ``"exact"``, ``"is"``, ``"ais"``, ``"laplace"``, ``"closed_form"``...
    num_samples : int
        Particles / draws / enumerated configurations used (0 for closed forms).
    num_evaluations : int
        Log-density evaluations (per particle) spent, a machine-independent cost.
    wall_time_s : float
        Wall-clock seconds spent.
    details : dict
        Method-specific diagnostics (e.g. ``ess`` of importance weights, the AIS schedule).
    """

    value: float
    stderr: float
    method: str
    num_samples: int = 0
    num_evaluations: int = 0
    wall_time_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict, compare=False)

    def __float__(self) -> float:
        return float(self.value)

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """``value -/+ z * stderr``."""
        return (self.value - z * self.stderr, self.value + z * self.stderr)

    def __repr__(self) -> str:
        err = "exact" if self.stderr == 0 and self.method == "exact" else f"+/- {self.stderr:.4g}"
        return f"Estimate({self.value:.6g} {err}, method={self.method!r}, n={self.num_samples})"

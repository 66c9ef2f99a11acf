"""The population-fit protocol: what diagnostics and simulation need from any population fit.

A population fit is a point fit (:class:`~genprog.pk.estimation.PopulationFit`, from
``method="mle"`` or ``"saem"``) or a Bayesian one
(:class:`~genprog.pk.population.PopulationBayesFit`). Both implement
:class:`PopulationResult`, so diagnostics never branch on the fit's type; the functions
here check that they were given a population fit (a clear ``TypeError`` otherwise) and
call the protocol.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .estimation import LaplaceObjective

__all__ = ["PopulationResult", "eta_and_omega", "fit_data", "fit_point", "laplace_objective",
           "population_result", "replicate_parameters"]


@runtime_checkable
class PopulationResult(Protocol):
    """What every population fit offers.

    * ``fitted_data()`` — the :class:`~genprog.pk.dataset.Dataset` it was fitted to;
    * ``population_point()`` — ``(population, data, values, eta)`` in float64: population
      parameters by site (natural scale) and the subjects' random effects ``[S, P]`` (EBEs,
      or posterior means with posterior-median parameters);
    * ``replicate_parameters(n, gen)`` — ``(population, data, values, eta, batched)`` for
      ``n`` simulation replicates: the point estimate (``batched=False``, ``eta [S, P]``), or
      ``n`` random posterior draws (``batched=True``, a leading dim ``n``, ``eta [n, S, P]``);
    * ``eta_and_omega()`` — ``(population, eta [S, P], omega [P])`` behind eta shrinkage
      (``None`` for a model without random effects).
    """

    def fitted_data(self): ...

    def population_point(self): ...

    def replicate_parameters(self, n: int, gen: torch.Generator): ...

    def eta_and_omega(self): ...


def population_result(fit) -> PopulationResult:
    """``fit`` itself, checked to be a population fit."""
    if isinstance(fit, PopulationResult) and getattr(fit, "population", None) is not None:
        return fit
    raise TypeError(f"expected a population fit (pk.PopulationModel(...).fit(data, method)), "
                    f"got {type(fit).__name__}")


def fit_point(fit):
    """``population_result(fit).population_point()``."""
    return population_result(fit).population_point()


def fit_data(fit):
    """The data set a population fit was fitted to."""
    return population_result(fit).fitted_data()


def replicate_parameters(fit, n: int, gen: torch.Generator):
    """``population_result(fit).replicate_parameters(n, gen)``."""
    return population_result(fit).replicate_parameters(n, gen)


def eta_and_omega(fit):
    """``population_result(fit).eta_and_omega()``."""
    return population_result(fit).eta_and_omega()


def laplace_objective(pop, data) -> LaplaceObjective:
    """The per-subject likelihood machinery (predictions, residual SDs, Omega) of ``pop`` on
    ``data`` at its default priors' layout."""
    return LaplaceObjective(pop, data, pop.priors_for(data))

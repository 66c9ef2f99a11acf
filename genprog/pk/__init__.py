"""genprog.pk: population pharmacokinetics on NONMEM-style data.

>>> from genprog import pk
>>> data = pk.read_nonmem(pk.dataset_path("theo_sd"))
>>> data.n_subjects
12
"""

from importlib import resources

from .data import describe, read_nonmem
from .dataset import Dataset
from .diagnostics import (
    individual_curves,
    npde,
    npde_tests,
    plot_gof,
    plot_individual,
    plot_npde,
    residuals,
    shrinkage,
    simulate,
    vpc,
    vpc_table,
)
from .estimation import PopulationFit, fit_mle
from .ode import ODEModel, linear_compartments, michaelis_menten
from .population import CovariateEffect, PopulationBayesFit, PopulationModel, initial_estimates
from .regimen import Regimen, simulate_data, simulate_regimen
from .structural import (
    Compartments,
    OneCompartment,
    ThreeCompartment,
    TwoCompartment,
    one_compartment_bolus,
    one_compartment_infusion,
    one_compartment_oral,
    two_compartment_bolus,
    two_compartment_infusion,
    two_compartment_oral,
)


def dataset_path(name: str) -> str:
    """Path of a bundled public data set: ``"theo_sd"``, ``"warfarin"`` or ``"pheno_sd"``."""
    names = ("theo_sd", "warfarin", "pheno_sd")
    if name not in names:
        raise ValueError(f"dataset_path: unknown data set {name!r}; bundled: {names}")
    return str(resources.files("genprog.pk") / "datasets" / f"{name}.csv")


__all__ = [
    "Compartments",
    "CovariateEffect",
    "Dataset",
    "ODEModel",
    "OneCompartment",
    "PopulationBayesFit",
    "PopulationFit",
    "PopulationModel",
    "Regimen",
    "ThreeCompartment",
    "TwoCompartment",
    "dataset_path",
    "describe",
    "fit_mle",
    "individual_curves",
    "initial_estimates",
    "linear_compartments",
    "michaelis_menten",
    "npde",
    "npde_tests",
    "one_compartment_bolus",
    "one_compartment_infusion",
    "one_compartment_oral",
    "plot_gof",
    "plot_individual",
    "plot_npde",
    "read_nonmem",
    "residuals",
    "shrinkage",
    "simulate",
    "simulate_data",
    "simulate_regimen",
    "two_compartment_bolus",
    "two_compartment_infusion",
    "two_compartment_oral",
    "vpc",
    "vpc_table",
]

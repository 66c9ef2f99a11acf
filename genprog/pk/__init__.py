"""genprog.pk: population pharmacokinetics on NONMEM-style data.

>>> from genprog import pk
>>> data = pk.read_nonmem(pk.dataset_path("theo_sd"))
>>> data.n_subjects
12
"""

from ..errors import DataWarning
from .data import check_compartments, describe, read_nonmem
from .dataset import Dataset, dataset_path
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
from .distributed import fit_distributed, read_nonmem_shard
from .estimation import PopulationFit, fit_mle
from .ode import ODEModel, linear_compartments, michaelis_menten
from .population import CovariateEffect, PopulationBayesFit, PopulationModel, initial_estimates
from .population_fit import PopulationResult
from .regimen import Regimen, simulate_data, simulate_regimen
from .saem import fit_saem
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

__all__ = [
    "Compartments",
    "CovariateEffect",
    "DataWarning",
    "Dataset",
    "ODEModel",
    "OneCompartment",
    "PopulationBayesFit",
    "PopulationFit",
    "PopulationModel",
    "PopulationResult",
    "Regimen",
    "ThreeCompartment",
    "TwoCompartment",
    "check_compartments",
    "dataset_path",
    "describe",
    "fit_distributed",
    "fit_mle",
    "fit_saem",
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
    "read_nonmem_shard",
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

"""Inference algorithms: one module per family, each a plain function with an explicit seed
that returns a frozen :class:`~genprog.infer.record.InferenceRecord` (never a Fit).

``Model.fit(method, ...)`` validates its options, dispatches through ``FIT_METHODS`` and
turns the record into a :class:`genprog.Fit`; ``Model.log_marginal`` dispatches to
:mod:`genprog.infer.evidence`. This package imports nothing above it (no ``genprog.model``,
``genprog.fit`` or ``genprog.pk``).
"""

from .chees import sample_chees
from .evidence import annealed_importance_sampling, find_mode, importance_sampling, laplace_evidence
from .hmc import sample_hmc
from .map import fit_laplace, fit_map
from .mcmc import fit_chees, fit_hmc, fit_nuts
from .nlme import fit_nlme
from .nuts import sample_nuts
from .record import InferenceRecord
from .saem import MixedEffectsDensity, fit_saem, saem
from .vi import fit_vi

#: method name -> fitting function ``fn(model, **options) -> InferenceRecord``
FIT_METHODS = {
    "map": fit_map,
    "laplace": fit_laplace,
    "vi": fit_vi,
    "nuts": fit_nuts,
    "hmc": fit_hmc,
    "chees": fit_chees,
    "saem": fit_saem,
    "mle": fit_nlme,
}

#: methods whose records hold MCMC draws (checked for convergence)
MCMC_METHODS = ("nuts", "hmc", "chees")

__all__ = [
    # dispatch tables
    "FIT_METHODS",
    "MCMC_METHODS",
    "InferenceRecord",
    # the pure kernels, on a batched potential or an evidence target
    "MixedEffectsDensity",
    "annealed_importance_sampling",
    "find_mode",
    # Model.fit methods
    "fit_chees",
    "fit_hmc",
    "fit_laplace",
    "fit_map",
    "fit_nlme",
    "fit_nuts",
    "fit_saem",
    "fit_vi",
    "importance_sampling",
    "laplace_evidence",
    "saem",
    "sample_chees",
    "sample_hmc",
    "sample_nuts",
]

"""Inference algorithms: one module per family, each a plain function with an explicit seed.

``Model.fit(method, ...)`` validates its options and dispatches through ``FIT_METHODS``;
``Model.log_marginal`` dispatches to :mod:`genprog.infer.evidence`.
"""

from .map import fit_laplace, fit_map
from .mcmc import fit_chees, fit_hmc, fit_nuts
from .vi import fit_vi

#: method name -> fitting function ``fn(model, **options) -> Fit``
FIT_METHODS = {
    "map": fit_map,
    "laplace": fit_laplace,
    "vi": fit_vi,
    "nuts": fit_nuts,
    "hmc": fit_hmc,
    "chees": fit_chees,
}

__all__ = ["FIT_METHODS", "fit_chees", "fit_hmc", "fit_laplace", "fit_map", "fit_nuts", "fit_vi"]

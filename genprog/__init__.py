"""genprog: generative models as distributions.

Write a generative story as a Pyro model function; genprog gives it sample, log_prob,
condition, marginalize, log_marginal and fit (MAP, Laplace, VI, NUTS/HMC), with ArviZ
output. See DESIGN.md for the architecture.
"""

from .errors import (
    CompileWarning,
    ConvergenceWarning,
    DataWarning,
    EstimatorWarning,
    VectorizationWarning,
)
from .estimate import Estimate
from .fit import Fit, load
from .model import Model, model


def capabilities():
    """Per zoo class and operation: exact, estimated, generic or unavailable (a DataFrame);
    see :func:`genprog.models.capabilities`."""
    from genprog.models import capabilities as table

    return table()


__version__ = "0.1.0"

__all__ = [
    "CompileWarning",
    "ConvergenceWarning",
    "DataWarning",
    "Estimate",
    "EstimatorWarning",
    "Fit",
    "Model",
    "VectorizationWarning",
    "__version__",
    "capabilities",
    "load",
    "model",
]

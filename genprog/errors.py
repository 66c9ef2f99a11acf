"""Every warning class genprog raises, in one place (all exported from ``genprog``).

Errors in user input are plain ``ValueError`` / ``TypeError`` whose message names the
culprit; these warnings mark results that were produced but should not be trusted blindly.
"""


class ConvergenceWarning(UserWarning):
    """An optimiser stopped unconverged, or MCMC shows divergences, high R-hat or low ESS."""


class EstimatorWarning(UserWarning):
    """An estimate was returned, but its error bar (or its premise) is unreliable."""


class CompileWarning(UserWarning):
    """Compiling a model's potential failed; genprog fell back to a slower path."""


class DataWarning(UserWarning):
    """A data set was read, but some of its rows are odd (duplicates, ignored columns,
    skipped comment rows); ``describe()`` lists them."""


class VectorizationWarning(UserWarning):
    """A model could be run for many draws neither in a particle plate nor under
    ``torch.func.vmap``; genprog loops over draws instead (exact, but N times the cost)."""

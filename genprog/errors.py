"""Warnings genprog raises when a result should not be trusted blindly."""


class ConvergenceWarning(UserWarning):
    """An optimiser stopped unconverged, or MCMC shows divergences, high R-hat or low ESS."""

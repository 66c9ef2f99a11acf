"""The observation likelihood of a population PK model, written once: the residual error
models and the M3 likelihood of BLQ observations.

Used by the Bayesian program (``PopulationModel.program``: a Pyro ``sample`` site and a
``factor``), by FOCE-I/Laplace (``estimation.LaplaceObjective``: the same terms as
tensors) and by the simulators (``with_residual_error``).

Error models, with ``c`` the prediction:

=============  ===============================================  ======================
error          observation model                                 parameters
=============  ===============================================  ======================
additive       ``DV ~ Normal(c, sigma_add)``                     ``sigma_add``
proportional   ``DV ~ Normal(c, sigma_prop c)``                  ``sigma_prop``
combined       ``DV ~ Normal(c, sqrt(sigma_add^2 + (sigma_prop c)^2))``  both
exponential    ``log DV ~ Normal(log c, sigma_exp)``             ``sigma_exp``
=============  ===============================================  ======================

A BLQ observation contributes ``log Phi((LLOQ - mean) / sd)`` on the error scale (M3).

>>> import torch
>>> residual_sd("proportional", torch.tensor([2.0]), {"sigma_prop": torch.tensor(0.1)})
tensor([0.2000])
"""

from __future__ import annotations

import pyro.distributions as dist
import torch

__all__ = ["ERROR_MODELS", "SD_FLOOR", "censored_z", "error_scale", "observation_distribution",
           "observation_log_likelihood", "residual_sd", "sigma_sites", "with_residual_error"]

ERROR_MODELS = ("additive", "proportional", "combined", "exponential")
SD_FLOOR = 1e-9
"""The residual SD is clamped below at this value (units of DV)."""

_SIGMA_SITES = {"additive": ("sigma_add",), "proportional": ("sigma_prop",),
                "combined": ("sigma_add", "sigma_prop"), "exponential": ("sigma_exp",)}


def sigma_sites(error: str) -> tuple:
    """The residual-error parameter sites of an error model."""
    return _SIGMA_SITES[error]


def residual_sd(error: str, pred: torch.Tensor, sigma: dict) -> torch.Tensor:
    """Residual SD ``[..., S, T]`` on the error scale for predictions ``pred [..., S, T]``
    (exponential error: the SD of ``log DV``), before the floor."""
    if error == "additive":
        return sigma["sigma_add"] + 0 * pred
    if error == "proportional":
        return sigma["sigma_prop"] * pred.clamp_min(1e-12)
    if error == "combined":
        return torch.sqrt(sigma["sigma_add"] ** 2 + (sigma["sigma_prop"] * pred) ** 2)
    return sigma["sigma_exp"] + 0 * pred


def error_scale(error: str, x: torch.Tensor) -> torch.Tensor:
    """A concentration on the error model's scale: ``log x`` (floored at ``1e-30``) for
    exponential error, else ``x``."""
    return torch.log(x.clamp_min(1e-30)) if error == "exponential" else x


def observation_distribution(error: str, pred: torch.Tensor, sd: torch.Tensor):
    """The distribution of DV: ``LogNormal(log pred, sd)`` (exponential) or ``Normal(pred, sd)``."""
    if error == "exponential":
        return dist.LogNormal(error_scale(error, pred), sd)
    return dist.Normal(pred, sd)


def censored_z(error: str, pred: torch.Tensor, sd: torch.Tensor, lloq: torch.Tensor) -> torch.Tensor:
    """``(LLOQ - mean) / sd`` on the error scale; a missing LLOQ (NaN) reads as 1 (exponential)
    or 0, harmless where masked out."""
    fill = 1.0 if error == "exponential" else 0.0
    return (error_scale(error, torch.nan_to_num(lloq, nan=fill)) - error_scale(error, pred)) / sd


def observation_log_likelihood(error: str, pred, sigma: dict, dv, observed, blq=None, lloq=None):
    """``log p(y | c)`` summed over each subject's observations, ``[..., S]``, with the pieces
    FOCE-I needs.

    Parameters
    ----------
    error : str
        One of ``ERROR_MODELS``.
    pred : Tensor [..., S, T]
        Predicted concentrations.
    sigma : dict
        Residual-error parameters by site.
    dv : Tensor [S, T]
        Observations (any value where not ``observed``).
    observed, blq : BoolTensor [S, T]
        Measured observations, and BLQ ones (M3); ``blq`` None: none.
    lloq : Tensor [S, T], optional
        Limits of the BLQ observations.

    Returns
    -------
    ll : Tensor [..., S]
    mean, sd, z : Tensor [..., S, T]
        The mean and SD on the error scale, and the BLQ z-score ``(LLOQ - mean) / sd``.
    """
    sd = residual_sd(error, pred, sigma).clamp_min(SD_FLOOR)
    y = torch.where(observed, dv, torch.ones_like(pred))
    mean = error_scale(error, pred)
    if error == "exponential":
        lp = dist.LogNormal(mean, sd).log_prob(y.clamp_min(1e-30))
    else:
        lp = dist.Normal(mean, sd).log_prob(y)
    ll = torch.where(observed, lp, torch.zeros_like(lp)).sum(-1)
    z = censored_z(error, pred, sd, lloq) if lloq is not None else torch.zeros_like(pred)
    if blq is not None and bool(blq.any()):
        ll = ll + torch.where(blq, torch.special.log_ndtr(z), torch.zeros_like(z)).sum(-1)
    return ll, mean, sd, z


def with_residual_error(error: str, conc: torch.Tensor, sigma: dict, eps: torch.Tensor) -> torch.Tensor:
    """Simulated observations: ``conc`` plus residual error from standard normals ``eps``
    (exponential: ``conc exp(sd eps)``)."""
    sd = residual_sd(error, conc, sigma)
    return conc * torch.exp(sd * eps) if error == "exponential" else conc + sd * eps

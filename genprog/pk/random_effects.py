"""Random effects of a population PK model: the omega matrix and the etas (and IOV kappas).

The bottom of the population-PK stack: tensors in, tensors out, no model objects beyond
duck-typed ``random_effects`` / ``iov`` names. Conventions (all log-scale):

* ``Omega = diag(omega) R diag(omega)`` with ``R = L L^T`` (``L`` the Cholesky factor of
  the correlation of a block omega), so ``chol(Omega) = diag(omega) L``;
* non-centred etas ``eta = chol(Omega) eta_raw``, ``eta_raw ~ N(0, I)``;
* inter-occasion kappas ``kappa_ikq = omega_iov_q kappa_raw_ikq``, flattened occasion-major
  (``K * Q`` columns) after the ``P`` IIV etas.

>>> import torch
>>> omega_scale_tril(torch.tensor([0.3, 0.2]))
tensor([[0.3000, 0.0000],
        [0.0000, 0.2000]])
"""

from __future__ import annotations

import torch

__all__ = ["cat_effects", "etas_from_raw", "kappas_from_raw", "omega_scale_tril", "posterior_etas",
           "random_effects_scale_tril"]


def omega_scale_tril(omega, corr_cholesky=None):
    """Cholesky factor of ``Omega = diag(omega) R diag(omega)``, i.e. ``diag(omega) L`` with
    ``R = L L^T``: ``omega [..., P]`` (and ``L [..., P, P]``) -> ``[..., P, P]``."""
    if corr_cholesky is None:
        return torch.diag_embed(omega)
    return omega[..., :, None] * corr_cholesky


def random_effects_scale_tril(omega, corr_cholesky=None, omega_iov=None, n_occasions: int = 0):
    """Cholesky factor ``[P + K Q, P + K Q]`` of all of a subject's random effects: the IIV
    omega block (``omega [P]``, may be None when there is no IIV), then ``omega_iov [Q]``
    repeated for each of ``n_occasions`` occasions (block diagonal)."""
    blocks = []
    if omega is not None and omega.shape[-1]:
        blocks.append(omega_scale_tril(omega, corr_cholesky))
    if omega_iov is not None and n_occasions:
        blocks.append(torch.diag_embed(omega_iov.repeat(n_occasions)))
    return blocks[0] if len(blocks) == 1 else torch.block_diag(*blocks)


def etas_from_raw(scale_tril, eta_raw):
    """Non-centred etas: ``scale_tril [..., P, P]`` times ``eta_raw [..., S, 1, P]`` (the
    site's value) -> ``eta [..., S, P]``."""
    return (scale_tril[..., None, :, :] @ eta_raw.squeeze(-2)[..., None]).squeeze(-1)


def kappas_from_raw(omega_iov, kappa_raw):
    """Non-centred kappas: ``omega_iov [..., Q]`` and ``kappa_raw [..., S, 1, K*Q]`` (the
    site's value, occasion-major) -> ``kappa [..., S, K*Q]``."""
    raw = kappa_raw.squeeze(-2)
    Q = omega_iov.shape[-1]
    return (raw.unflatten(-1, (-1, Q)) * omega_iov[..., None, None, :]).flatten(-2)


def cat_effects(eta, kappa):
    """``[..., S, P]`` and ``[..., S, KQ]`` (leading dims broadcast) -> ``[..., S, P + KQ]``."""
    lead = torch.broadcast_shapes(eta.shape[:-1], kappa.shape[:-1])
    return torch.cat([eta.expand(*lead, eta.shape[-1]), kappa.expand(*lead, kappa.shape[-1])], -1)


def posterior_etas(pop, draws: dict):
    """Etas per draw ``[n, S, P]`` from flattened draws ``{site: [n, ...]}`` (None without
    random effects). With inter-occasion variability the kappas follow the etas in the last
    dim (``P + K Q`` columns, occasion-major), as ``PopulationModel.individual_parameters``
    takes them. ``pop`` needs ``random_effects`` and ``iov`` (sequences of names)."""
    eta = None
    if pop.random_effects and "eta_raw" in draws:
        eta = etas_from_raw(omega_scale_tril(draws["omega"], draws.get("omega_corr")), draws["eta_raw"])
    if getattr(pop, "iov", ()) and "kappa_raw" in draws:
        kappa = kappas_from_raw(draws["omega_iov"], draws["kappa_raw"])
        eta = kappa if eta is None else cat_effects(eta, kappa)
    return eta

"""Starting points for optimisers and samplers, in unconstrained space."""

from __future__ import annotations

import pyro
import torch
from pyro import poutine

from ..density import JointDensity
from ..sites import is_model_site

#: errors a model may raise at an extreme prior draw (a distribution rejecting a NaN
#: parameter, an ODE solver giving up); such draws are dropped, not fatal
_DRAW_FAILURES = (ValueError, RuntimeError, AssertionError, ArithmeticError)


def _stack_rows(rows: list) -> torch.Tensor:
    """Concatenate ``[1, ...]`` rows, NaN where a row is None (it raised)."""
    like = next(r for r in rows if r is not None)
    return torch.cat([torch.full_like(like, float("nan")) if r is None else r for r in rows])


def _rows_or_nan(fn, z: torch.Tensor) -> torch.Tensor:
    """``fn(z)`` for all rows at once; when that raises (one bad row sinks a batched run),
    row by row, with NaN where a row raises."""
    try:
        return fn(z)
    except _DRAW_FAILURES:
        rows = []
        for i in range(z.shape[0]):
            try:
                rows.append(fn(z[i:i + 1]))
            except _DRAW_FAILURES:
                rows.append(None)
        if all(r is None for r in rows):
            raise
        return _stack_rows(rows)


def finite_prior_draws(density: JointDensity, generator: torch.Generator,
                       num_draws: int = 101) -> tuple[torch.Tensor, int]:
    """Prior draws at which the model is finite, unconstrained ``[m, D]``, and the number
    ``num_draws - m`` of draws dropped (non-finite values or log density, or a model that
    raised at them, e.g. "Expected parameter ... invalid values" after an ODE blew up).

    Raises
    ------
    ValueError
        When every draw is dropped.
    """
    with pyro.validation_enabled(False), torch.no_grad():
        z = _prior_rows(density, generator, num_draws)
        ok = torch.isfinite(z).all(-1)
        if bool(ok.any()):
            lp = _rows_or_nan(lambda x: density.log_joint(torch.nan_to_num(x)), z)
            ok &= torch.isfinite(lp)
    if not bool(ok.any()):
        sites = nonfinite_sites(density, torch.nan_to_num(z[0])) if z.numel() else []
        where = f" (the first draw's log density is not finite at site(s) {sites})" if sites else ""
        raise ValueError(
            f"init: the model's log density is not finite at any of {num_draws} prior draws"
            f"{where}; check the observed data against each site's support and the priors, "
            "or give a starting point, init={site: value}")
    return z[ok], int((~ok).sum())


def _prior_rows(density: JointDensity, generator: torch.Generator, num_draws: int) -> torch.Tensor:
    try:
        return density.sample_prior(num_draws, generator)
    except _DRAW_FAILURES:
        rows = []
        for _ in range(num_draws):
            try:
                rows.append(density.sample_prior(1, generator))
            except _DRAW_FAILURES:
                rows.append(None)
        if all(r is None for r in rows):
            raise
        return _stack_rows(rows)


def prior_median(density: JointDensity, generator: torch.Generator, num_draws: int = 101) -> torch.Tensor:
    """Coordinate-wise median of ``num_draws`` prior draws, unconstrained ``[D]``.

    The prior median lies in the bulk of every site's prior, which keeps chains of
    hierarchical models away from the tails (where Pyro's default random init strands
    them in separate modes). Draws where the model is not finite are dropped
    (:func:`finite_prior_draws`).
    """
    z, _ = finite_prior_draws(density, generator, num_draws)
    return z.median(0).values


def initial_points(density: JointDensity, chains: int, strategy, generator: torch.Generator,
                   jitter: float = 0.5) -> torch.Tensor:
    """``[chains, D]`` starting points.

    Parameters
    ----------
    strategy : {"median", "prior"} or dict
        ``"median"``: prior median plus ``Uniform(-jitter, jitter)`` in unconstrained
        space; ``"prior"``: independent prior draws; a dict of site -> constrained value
        (sites not given start at the prior median), jittered the same way.
    """
    d = density.dim
    if strategy == "prior":
        return density.sample_prior(chains, generator)
    z0 = prior_median(density, generator)
    if isinstance(strategy, dict):
        unknown = set(strategy) - {s.name for s in density.sites}
        if unknown:
            raise ValueError(f"init: unknown latent site(s) {sorted(unknown)}")
        values, _ = density.constrain(z0[None])
        for k, v in strategy.items():
            values[k] = torch.as_tensor(v, dtype=z0.dtype, device=z0.device).expand_as(values[k][0])[None]
        z0 = density.unconstrain(values)[0]
    elif strategy != "median":
        raise ValueError(f"init: unknown strategy {strategy!r}; use 'median', 'prior' or a dict")
    u = torch.rand(chains, d, generator=generator, device=z0.device, dtype=z0.dtype)
    return z0 + jitter * (2 * u - 1)


def nonfinite_sites(density, z: torch.Tensor) -> list:
    """Sites whose log density is not finite at the unconstrained point ``z [D]`` (one
    unbatched run of the program; [] when that run fails)."""
    values, _ = density.constrain(z[None])
    data = {k: v[0] for k, v in values.items()}
    try:
        with torch.no_grad(), pyro.validation_enabled(False):
            tr = poutine.trace(poutine.condition(density.program, data=data)).get_trace(
                *density.args, **density.kwargs)
            return [name for name, site in tr.nodes.items() if is_model_site(site)
                    and not bool(torch.isfinite(site["fn"].log_prob(site["value"])).all())]
    except Exception:  # noqa: BLE001 -- a diagnostic for an error message only
        return []

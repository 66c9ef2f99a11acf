"""Convergence checks of MCMC draws: divergences, R-hat and bulk ESS (from ArviZ).

:meth:`genprog.Model.fit` runs :func:`check_convergence` on every MCMC result before the
:class:`~genprog.Fit` is built, so ``fit.info["diagnostics"]`` is part of the fit from
the start, and poor results are reported with a
:class:`~genprog.errors.ConvergenceWarning`, never hidden.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .errors import ConvergenceWarning


def _divergences(method: str, sample_stats) -> int:
    div = sample_stats.get("diverging")
    if div is None:
        return 0
    count = int(np.asarray(div).sum())
    if count:
        warnings.warn(
            f"{method}: {count} of {np.asarray(div).size} post-warmup transitions diverged; "
            "the posterior may be biased (raise target_accept or reparameterize, e.g. "
            "non-centred hierarchical scales)",
            ConvergenceWarning,
            stacklevel=5,
        )
    return count


def check_convergence(method: str, draws: dict, sample_stats: dict, rhat_max: float = 1.01,
                      ess_min: float = 100.0) -> dict:
    """Warn about divergences, R-hat above ``rhat_max`` and bulk ESS below ``ess_min``.

    Parameters
    ----------
    method : str
        Names the sampler in warnings.
    draws : dict[str, Tensor]
        Site -> ``[chain, draw, *shape]`` (constrained).
    sample_stats : dict[str, ndarray]
        ``diverging`` ``[chain, draw]`` is read when present.

    Returns
    -------
    dict
        ``divergences`` (count after warmup), ``max_rhat``, ``min_ess_bulk``,
        ``bad_rhat_sites``, ``low_ess_sites`` and ``nonfinite_sites`` (sites whose draws
        hold NaN or inf: reported, and left out of R-hat and ESS).
    """
    import arviz as az

    out = {"divergences": _divergences(method, sample_stats), "max_rhat": float("nan"),
           "min_ess_bulk": float("nan"), "bad_rhat_sites": [], "low_ess_sites": [],
           "nonfinite_sites": [k for k, v in draws.items()
                               if v.is_floating_point() and not torch.isfinite(v).all()]}
    if out["nonfinite_sites"]:
        warnings.warn(f"{method}: non-finite values in the draws of site(s) {out['nonfinite_sites']}",
                      ConvergenceWarning, stacklevel=4)
    num_chains, num_draws = next(iter(draws.values())).shape[:2] if draws else (0, 0)
    if num_draws < 4:
        return out
    names = [k for k, v in draws.items() if v.is_floating_point() and k not in out["nonfinite_sites"]]
    if not names:
        return out
    posterior = {k: draws[k].detach().cpu().double().numpy() for k in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = az.convert_to_dataset(posterior)
        ess = az.ess(ds, method="bulk")
        rhat = az.rhat(ds) if num_chains > 1 else None
    for k in names:
        values = np.asarray(ess[k].values)
        e = float(np.nanmin(values)) if values.size else np.nan
        if np.isfinite(e) and e < ess_min:
            out["low_ess_sites"].append(k)
        out["min_ess_bulk"] = float(np.nanmin([out["min_ess_bulk"], e])) if np.isfinite(e) else out["min_ess_bulk"]
        if rhat is not None:
            r = np.asarray(rhat[k].values)
            r = float(np.nanmax(r)) if r.size and np.isfinite(r).any() else np.nan
            if np.isfinite(r):
                out["max_rhat"] = float(np.nanmax([out["max_rhat"], r]))
                if r > rhat_max:
                    out["bad_rhat_sites"].append(k)
    if out["bad_rhat_sites"]:
        warnings.warn(
            f"{method}: R-hat above {rhat_max} for site(s) {out['bad_rhat_sites']} "
            f"(max {out['max_rhat']:.3f}); chains disagree — they may sit in separate modes or "
            "need more warmup/draws",
            ConvergenceWarning,
            stacklevel=4,
        )
    if out["low_ess_sites"]:
        warnings.warn(
            f"{method}: bulk ESS below {ess_min:g} for site(s) {out['low_ess_sites']} "
            f"(min {out['min_ess_bulk']:.0f}); run more draws",
            ConvergenceWarning,
            stacklevel=4,
        )
    return out

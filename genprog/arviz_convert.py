"""The one place that builds ArviZ objects (``az.from_dict``, present in ArviZ 0.x and 1.x).

One converter per group; plate names become dims, with the model's coords where given.
"""

from __future__ import annotations

import numpy as np
import torch

from .handlers import missing_site_name


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def _dims_for(model, name: str) -> list[str]:
    sites = model.base_structure.sites
    if name in sites:
        return sites[name].dim_names()
    return [f"{name}_dim_0"]


def posterior_group(fit) -> tuple[dict, dict]:
    draws = {k: _np(v) for k, v in fit.draws.items()}
    dims = {k: _dims_for(fit.model, k) for k in draws}
    for name in fit.model._missing_init:
        key = missing_site_name(name)
        if key in draws:
            dims[key] = [f"{key}_dim_0"]
    return draws, dims


def log_likelihood_group(fit) -> tuple[dict, dict]:
    model = fit.model
    density = model.density()
    c, n = fit.num_chains, fit.num_draws
    latent = {s.name: fit.draws[s.name].reshape(c * n, *fit.draws[s.name].shape[2:])
              for s in density.sites}
    with torch.no_grad():
        pointwise = density.pointwise_log_likelihood(latent, c * n)
    out, dims = {}, {}
    for name, lp in pointwise.items():
        out[name] = _np(lp.reshape(c, n, *lp.shape[1:]))
        info = model.structure.sites[name]
        if tuple(lp.shape[1:]) != tuple(info.batch_shape):  # missing or masked entries dropped
            dims[name] = [f"{name}_observed_dim_0"]
        else:
            dims[name] = info.dim_names()[: len(info.batch_shape)]
    return out, dims


def observed_group(model) -> tuple[dict, dict]:
    data = {k: _np(v) for k, v in model.observed.items()}
    dims = {k: model.base_structure.sites[k].dim_names() for k in data}
    return data, dims


def to_inference_data(fit, prior=False, posterior_predictive=False, log_likelihood=True,
                      num_prior=500):
    """``arviz.InferenceData`` for ``fit`` (see :meth:`genprog.Fit.to_arviz`)."""
    import arviz as az

    model = fit.model
    posterior, dims = posterior_group(fit)
    groups = {"posterior": posterior}
    if fit.sample_stats:
        groups["sample_stats"] = {k: np.asarray(v) for k, v in fit.sample_stats.items()}
    observed, obs_dims = observed_group(model)
    if observed:
        groups["observed_data"] = observed
    if prior:
        draws = model.sample(num_prior, seed=fit.seed)
        obs_names = set(model.observed)
        groups["prior"] = {k: _np(v)[None] for k, v in draws.items() if k not in obs_names}
        groups["prior_predictive"] = {k: _np(v)[None] for k, v in draws.items() if k in obs_names}
    if posterior_predictive:
        ppc = fit.predict(seed=fit.seed or 0)
        groups["posterior_predictive"] = {k: _np(v) for k, v in ppc.items() if k in model.observed}
    coords = {k: list(v) for k, v in model.coords.items()}
    attrs = {"inference_library": "genprog", "genprog_method": fit.method}
    idata = az.from_dict(**groups, dims={**obs_dims, **dims}, coords=coords, attrs=attrs)
    if log_likelihood and fit.num_draws > 1:
        # its own call: with missing entries, a site's log-likelihood dims differ from its
        # observed_data dims, and from_dict takes one dims mapping
        ll, ll_dims = log_likelihood_group(fit)
        idata.add_groups(
            log_likelihood=az.from_dict(log_likelihood=ll, dims=ll_dims, coords=coords).log_likelihood
        )
    return idata

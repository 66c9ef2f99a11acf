"""NumPyro twins of genprog.pk population models, for side-by-side benchmarks.

:func:`one_compartment_oral` writes by hand, in NumPyro, the model that
``pk.PopulationModel(pk.OneCompartment(), random_effects, error)`` builds in Pyro: same
site names, shapes, plates and priors (read from ``PopulationModel.priors_for``), so
log densities agree at the same point (``bench/pk_population.py`` checks it first).

Only the plain case is covered, and anything else is refused with a ``ValueError``:
first-order absorption, one compartment, one dose per subject, diagonal omega, additive /
proportional / combined residual error, no covariates, no lag/bioavailability, no BLQ, one
observation type. NumPyro and JAX are imported inside the function, so importing this
module costs nothing.
"""

from __future__ import annotations

import numpy as np
import torch

_ERRORS = ("additive", "proportional", "combined")


def one_compartment_oral(pop, data):
    """A NumPyro model function (no arguments) equal in density to ``pop(data)``.

    Parameters
    ----------
    pop : genprog.pk.PopulationModel
        One compartment, first-order absorption, diagonal omega, random effects on a
        subset of ``ka, cl, v``, error ``"additive"``, ``"proportional"`` or ``"combined"``.
    data : genprog.pk.Dataset
        One oral dose per subject (depot), no BLQ observations.

    Returns
    -------
    callable
        ``model()`` with sites ``cl, v, ka`` (typical values, ``[]``), the residual SDs
        (``sigma_add`` / ``sigma_prop``, ``[]``), ``omega`` ``[P]``, ``eta_raw``
        ``[S, 1, P]`` (plate ``subject`` at dim -2) and the observed ``dv`` ``[S, T]``.
        Arrays take JAX's current default float type (enable x64 before calling for a
        float64 model).
    """
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    structure = pop.structure
    if (getattr(structure, "n", None) != 1 or getattr(structure, "absorption", None) != "first_order"
            or pop.covariate_effects or pop.extra_parameters or pop.iov or pop.ka_above_k
            or pop.omega != "diagonal" or pop.error not in _ERRORS
            or any(p not in ("ka", "cl", "v") for p in pop.random_effects)):
        raise ValueError("one_compartment_oral: needs a plain one-compartment oral PopulationModel "
                         f"(diagonal omega, error in {_ERRORS}, no covariates/extras/IOV); got {pop}")
    n_doses = data.dose_mask.sum(-1)
    if not bool((n_doses == 1).all()):
        raise ValueError("one_compartment_oral: needs exactly one dose per subject")
    if bool(data.obs_blq.any()):
        raise ValueError("one_compartment_oral: BLQ observations are not supported")
    depot = torch.where(data.dose_mask, data.dose_cmt, torch.zeros_like(data.dose_cmt))
    if bool(((depot != 0) & (depot != 1)).any()) or bool((data.dose_rate[data.dose_mask] != 0).any()):
        raise ValueError("one_compartment_oral: the dose must be an oral bolus into the depot")

    priors = pop.priors_for(data)
    typical = ("cl", "v", "ka")
    tv_loc = {k: float(priors[k].loc) for k in typical}
    tv_scale = {k: float(priors[k].scale) for k in typical}
    sigmas = pop.sigma_sites()
    sigma_scale = {s: float(priors[s].scale) for s in sigmas}
    re = pop.random_effects
    P = len(re)
    if P:
        omega_scale = np.asarray(priors["omega"].base_dist.scale.detach().cpu(), dtype=np.float64)

    def arr(x):
        return jnp.asarray(np.asarray(x.detach().cpu(), dtype=np.float64))

    observed = pop.observation_mask(data) & ~data.obs_blq
    dose = arr((data.dose_amt * data.dose_mask).sum(-1))                         # [S]
    t_dose = arr(torch.where(data.dose_mask, data.dose_time, torch.zeros_like(data.dose_time)).sum(-1))
    t_obs = arr(data.obs_time)                                                   # [S, T]
    mask = jnp.asarray(observed.cpu().numpy())
    y = arr(torch.where(observed, data.obs_dv, torch.zeros_like(data.obs_dv)))
    S, T = y.shape

    def model():
        tv = {k: numpyro.sample(k, nd.LogNormal(tv_loc[k], tv_scale[k])) for k in typical}
        sigma = {s: numpyro.sample(s, nd.HalfNormal(sigma_scale[s])) for s in sigmas}
        ind = {k: jnp.broadcast_to(tv[k], (S,)) for k in typical}
        if P:
            omega = numpyro.sample("omega", nd.HalfNormal(jnp.asarray(omega_scale, dtype=y.dtype))
                                   .to_event(1))
            with numpyro.plate("subject", S, dim=-2):
                eta_raw = numpyro.sample("eta_raw", nd.Normal(0.0, 1.0).expand([P]).to_event(1))
            eta = eta_raw[:, 0, :] * omega                                       # [S, P]
            for j, k in enumerate(re):
                ind[k] = ind[k] * jnp.exp(eta[:, j])
        ka, cl, v = ind["ka"], ind["cl"], ind["v"]
        k_el = cl / v
        s = jnp.clip(t_obs - t_dose[:, None], 0.0)                               # [S, T]
        # (e^{-k s} - e^{-ka s}) / (ka - k), as genprog's closed form (no ka ~ k guard needed
        # away from the tie; the benchmark data are far from it)
        c = (dose * ka / v)[:, None] * (jnp.exp(-k_el[:, None] * s) - jnp.exp(-ka[:, None] * s)) / (
            ka - k_el)[:, None]
        c = jnp.where(t_obs >= t_dose[:, None], c, 0.0)
        if pop.error == "additive":
            sd = sigma["sigma_add"] + 0.0 * c
        elif pop.error == "proportional":
            sd = sigma["sigma_prop"] * jnp.maximum(c, 1e-12)
        else:
            sd = jnp.sqrt(sigma["sigma_add"] ** 2 + (sigma["sigma_prop"] * c) ** 2)
        sd = jnp.maximum(sd, 1e-9)
        safe = jnp.where(mask, y, jax.lax.stop_gradient(c))
        with numpyro.plate("subject", S, dim=-2), numpyro.plate("time", T, dim=-1):
            numpyro.sample("dv", nd.Normal(c, sd).mask(mask), obs=safe)

    return model

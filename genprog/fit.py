"""``Fit``: the result of ``Model.fit`` — draws, diagnostics, predictions, ArviZ, files.

Saved fits are ArviZ netCDF files (no pickle): :meth:`Fit.save` / :func:`load`.
"""

from __future__ import annotations

import inspect
import json
import warnings

import numpy as np
import pyro
import torch
from pyro import poutine

from . import arviz_convert
from .errors import ConvergenceWarning
from .handlers import SubstituteBatched
from .sites import PARTICLE_PLATE


class Fit:
    """Draws from (an approximation of) the posterior of a conditioned model.

    Attributes
    ----------
    method : str
        ``"map"``, ``"laplace"``, ``"vi"``, ``"nuts"`` or ``"hmc"`` (``"loaded"`` parts kept).
    model : genprog.Model or None
        The conditioned model (None for a fit loaded from a file without a model).
    draws : dict[str, Tensor]
        Site -> ``[chain, draw, *site_shape]``: latent sites (imputed missing entries as
        ``"{site}_missing"``) and deterministic sites.
    sample_stats : dict[str, ndarray]
        Per-draw sampler statistics ``[chain, draw]`` with ArviZ names (``diverging``,
        ``acceptance_rate``, ``energy``, ``lp``, ``tree_depth``, ``n_steps``, ``step_size``).
    seed : int or None
    info : dict
        Method-specific record (optimiser trace, adapted step size, guide, wall time, ...).
    """

    def __init__(self, method, model, draws, sample_stats=None, seed=None, info=None, idata=None):
        self.method = method
        self.model = model
        self.draws = draws
        self.sample_stats = sample_stats or {}
        self.seed = seed
        self.info = info or {}
        self._idata = idata

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_unconstrained(cls, model, method, z, sample_stats=None, seed=None, info=None,
                           point=None):
        """Build a Fit from unconstrained draws ``z [chain, draw, D]`` of ``model``.
        ``point`` holds sites point-estimated inside the fit (held fixed in ``model``); they
        appear in ``draws`` as constants and in ``info["point"]``."""
        density = model.density()
        c, n, d = z.shape
        with torch.no_grad():
            values, _ = density.constrain(z.reshape(c * n, d))
            draws = {k: v.reshape(c, n, *v.shape[1:]) for k, v in values.items()}
            draws.update(deterministic_sites(model, values, c * n, (c, n)))
            for k, v in (point or {}).items():
                draws[k] = v.detach().expand(c, n, *v.shape).clone()
        if point:
            info = {**(info or {}), "point": {k: v.detach() for k, v in point.items()}}
        bad = [k for k, v in draws.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            warnings.warn(f"{method}: non-finite values in the draws of site(s) {bad}",
                          ConvergenceWarning, stacklevel=3)
        return cls(method, model, draws, sample_stats, seed, info)

    @property
    def num_chains(self) -> int:
        return next(iter(self.draws.values())).shape[0] if self.draws else 0

    @property
    def num_draws(self) -> int:
        return next(iter(self.draws.values())).shape[1] if self.draws else 0

    def _require_model(self, what):
        if self.model is None:
            raise ValueError(f"{what} needs the model: load the fit with gp.load(path, model=m)")

    # ------------------------------------------------------------------ outputs
    def to_arviz(self, prior: bool = False, posterior_predictive: bool = False,
                 log_likelihood: bool = True, num_prior: int = 500):
        """An ``arviz.InferenceData`` with groups posterior, sample_stats, log_likelihood
        (one term per observation, so ``az.loo`` works), observed_data and, on request,
        prior / prior_predictive (``num_prior`` draws) and posterior_predictive."""
        if self.model is None:
            if prior or posterior_predictive:
                self._require_model("to_arviz(prior/posterior_predictive)")
            return self._idata
        return arviz_convert.to_inference_data(
            self, prior=prior, posterior_predictive=posterior_predictive,
            log_likelihood=log_likelihood, num_prior=num_prior,
        )

    def summary(self, hdi_prob: float = 0.94, var_names=None):
        """A pandas DataFrame, one row per scalar parameter: mean, sd, HDI bounds, MCSE,
        bulk/tail ESS and R-hat (from ArviZ). A single-draw fit (MAP) gives ``mean`` only."""
        import arviz as az
        import pandas as pd

        if self.num_draws == 1 and self.num_chains == 1:
            rows = {}
            for k, v in self.draws.items():
                if var_names and k not in var_names:
                    continue
                flat = v[0, 0].reshape(-1).double().cpu().numpy()
                if v[0, 0].dim() == 0:
                    rows[k] = flat[0]
                else:
                    for idx in np.ndindex(*v.shape[2:]):
                        rows[f"{k}[{', '.join(map(str, idx))}]"] = float(v[0, 0][idx])
            return pd.DataFrame({"mean": pd.Series(rows, dtype=float)})
        idata = self.to_arviz(log_likelihood=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return az.summary(idata, var_names=var_names, hdi_prob=hdi_prob)

    def predict(self, n: int | None = None, seed: int = 0, **new_inputs) -> dict:
        """Posterior predictive draws of the observed (and deterministic) sites.

        Parameters
        ----------
        n : int, optional
            Number of draws (taken evenly from the posterior draws); default all, returned
            as ``[chain, draw, ...]``; with ``n``, ``[n, ...]``.
        seed : int
        **new_inputs
            Replace model inputs by name (e.g. new covariates) to predict under them.

        Returns
        -------
        dict[str, Tensor]
        """
        self._require_model("predict")
        model = self.model
        if new_inputs:
            sig = inspect.signature(model.fn)
            bound = sig.bind_partial(*model.args, **model.kwargs)
            unknown = set(new_inputs) - set(sig.parameters)
            if unknown:
                raise TypeError(
                    f"predict: unknown input(s) {sorted(unknown)}; the model takes {list(sig.parameters)}"
                )
            bound.arguments.update(new_inputs)
            from .model import Model

            fresh = Model(model.fn, *bound.args, **bound.kwargs)
            model = model._replace(args=fresh.args, kwargs=fresh.kwargs, _base_structure=None)
        c, m = self.num_chains, self.num_draws
        latent = {k: v.reshape(c * m, *v.shape[2:])
                  for k, v in self.draws.items() if k in model.base_structure.sites
                  and model.base_structure.sites[k].kind == "latent"}
        total = c * m
        if n is not None:
            idx = torch.linspace(0, total - 1, n).round().long()
            latent = {k: v[idx] for k, v in latent.items()}
            total = n
        k = model.base_structure.max_plate_nesting
        program = SubstituteBatched(latent, k)(model.base_program)

        def vectorized(*args, **kwargs):
            with pyro.plate(PARTICLE_PLATE, total, dim=-(k + 1)):
                return program(*args, **kwargs)

        from .density import particle_dims_to_front
        from .model import _seeded

        with model.context(), _seeded(seed), torch.no_grad():
            tr = poutine.trace(vectorized).get_trace(*model.args, **model.kwargs)
        out = {}
        for name, info in model.base_structure.sites.items():
            if info.kind in ("observed", "deterministic") or (
                    info.kind == "latent" and name not in latent and name not in model.marginalized):
                v = particle_dims_to_front(tr.nodes[name]["value"], total, len(info.shape))
                out[name] = v if n is not None else v.reshape(c, m, *v.shape[1:])
        return out

    def discrete_posterior(self, seed: int = 0) -> dict:
        """Draws of the discrete latent sites that inference summed out, one per posterior
        draw, from their exact conditional ``p(discrete | continuous draw, observed)``
        (Pyro's ``infer_discrete`` at temperature 1).

        Returns
        -------
        dict[str, Tensor]
            site -> ``[chain, draw, *site_shape]``.
        """
        from pyro.infer import config_enumerate, infer_discrete

        from .density import particle_dims_to_front
        from .model import _seeded

        self._require_model("discrete_posterior")
        model = self.model
        density = model.density()
        discrete = model.structure.latent_discrete
        if not discrete:
            raise ValueError("discrete_posterior: the model has no discrete latent sites")
        c, m = self.num_chains, self.num_draws
        values = {s.name: self.draws[s.name].reshape(c * m, *self.draws[s.name].shape[2:])
                  for s in density.sites}
        k = density.max_plate_nesting
        program = SubstituteBatched(values, k)(model.program)

        def vectorized(*args, **kwargs):
            with pyro.plate(PARTICLE_PLATE, c * m, dim=-(k + 1)):
                return program(*args, **kwargs)

        sampler = infer_discrete(config_enumerate(vectorized, default="parallel"),
                                 first_available_dim=-(k + 2), temperature=1)
        with model.context(), _seeded(seed), torch.no_grad():
            tr = poutine.trace(sampler).get_trace(*model.args, **model.kwargs)
        return {s.name: particle_dims_to_front(tr.nodes[s.name]["value"], c * m, len(s.shape))
                .reshape(c, m, *s.shape) for s in discrete}

    def log_marginal(self, method: str = "auto", seed: int = 0, **options):
        """log p(observed) using what this fit learned: importance sampling with the VI
        guide as proposal, the Laplace Gaussian, or else ``model.log_marginal(method)``."""
        from .infer import evidence

        self._require_model("log_marginal")
        if method == "auto" and self.method == "vi" and "proposal" in self.info:
            with self.model.context():
                return evidence.importance_sampling(self.model.density(), proposal=self.info["proposal"],
                                                    seed=seed, **options)
        if method == "auto" and self.method == "laplace":
            with self.model.context():
                return evidence.laplace_evidence(self.model.density(), self.info["mode"],
                                                 self.info["hessian"])
        return self.model.log_marginal(method, seed=seed, **options)

    # ------------------------------------------------------------------ files
    def save(self, path) -> None:
        """Write the fit to a netCDF file (ArviZ layout; no pickle)."""
        idata = self.to_arviz()
        scalars = {k: v for k, v in self.info.items() if isinstance(v, (bool, int, float, str))}
        idata.posterior.attrs["genprog_method"] = self.method
        idata.posterior.attrs["genprog_seed"] = -1 if self.seed is None else int(self.seed)
        idata.posterior.attrs["genprog_info"] = json.dumps(scalars)
        idata.to_netcdf(str(path), engine="h5netcdf")

    def __repr__(self) -> str:
        return (f"Fit(method={self.method!r}, chains={self.num_chains}, draws={self.num_draws}, "
                f"sites={list(self.draws)})")


def deterministic_sites(model, values: dict, n: int, lead: tuple) -> dict:
    """Values of the model's deterministic sites at ``n`` latent draws, ``[*lead, ...]``."""
    structure = model.structure
    det = [s for s in structure.sites.values() if s.kind == "deterministic"]
    if not det:
        return {}
    density = model.density()
    tr = density.trace(values, n, enumerate_discrete=False) if not density.has_enumeration else None
    if tr is None:
        return {}
    from .density import particle_dims_to_front

    return {s.name: particle_dims_to_front(tr.nodes[s.name]["value"], n, len(s.shape)).reshape(*lead, *s.shape)
            for s in det}


def load(path, model=None) -> Fit:
    """Read a fit written by :meth:`Fit.save`. Loading reads arrays only (no code runs).

    Parameters
    ----------
    path : str or Path
    model : genprog.Model, optional
        The conditioned model, to enable ``predict``/``log_marginal`` on the loaded fit.
    """
    import arviz as az

    idata = az.from_netcdf(str(path), engine="h5netcdf")
    idata.load()
    post = idata.posterior
    draws = {k: torch.from_numpy(np.asarray(post[k].values).copy()) for k in post.data_vars}
    stats = {}
    if "sample_stats" in idata.groups():
        stats = {k: np.asarray(idata.sample_stats[k].values) for k in idata.sample_stats.data_vars}
    info = json.loads(post.attrs.get("genprog_info", "{}"))
    seed = int(post.attrs.get("genprog_seed", -1))
    return Fit(str(post.attrs.get("genprog_method", "unknown")), model, draws, stats,
               None if seed < 0 else seed, info, idata=idata)

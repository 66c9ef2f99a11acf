"""``Fit``: the result of ``Model.fit`` — draws, diagnostics, predictions, ArviZ, files.

Saved fits are ArviZ netCDF files (no pickle): :meth:`Fit.save` / :func:`load`.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from . import arviz_convert
from .infer import evidence
from .rng import seeded
from .vectorize import sample_sites

#: version of the metadata Fit.save writes (``posterior.attrs["genprog_format"]``)
SAVE_FORMAT = 1


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
            try:
                model = model.with_inputs(**new_inputs)
            except TypeError as e:
                raise TypeError(f"predict: {e}") from None
        c, m = self.num_chains, self.num_draws
        latent = {k: v.reshape(c * m, *v.shape[2:])
                  for k, v in self.draws.items() if k in model.base_structure.sites
                  and model.base_structure.sites[k].kind == "latent"}
        total = c * m
        if n is not None:
            idx = torch.linspace(0, total - 1, n).round().long()
            latent = {k: v[idx] for k, v in latent.items()}
            total = n
        structure = model.base_structure
        wanted = {name: info.shape for name, info in structure.sites.items()
                  if info.kind in ("observed", "deterministic") or (
                      info.kind == "latent" and name not in latent and name not in model.marginalized)}
        with model.context(), seeded(seed), torch.no_grad():
            out, _ = sample_sites(model.base_program, model.args, model.kwargs, wanted, total,
                                  structure.max_plate_nesting, structure.batching, values=latent)
        return out if n is not None else {k: v.reshape(c, m, *v.shape[1:]) for k, v in out.items()}

    def discrete_posterior(self, seed: int = 0) -> dict:
        """Draws of the discrete latent sites that inference summed out, one per posterior
        draw, from their exact conditional ``p(discrete | continuous draw, observed)``
        (Pyro's ``infer_discrete`` at temperature 1).

        Returns
        -------
        dict[str, Tensor]
            site -> ``[chain, draw, *site_shape]``.
        """
        self._require_model("discrete_posterior")
        model = self.model
        density = model.density()
        discrete = model.structure.latent_discrete
        if not discrete:
            raise ValueError("discrete_posterior: the model has no discrete latent sites")
        c, m = self.num_chains, self.num_draws
        values = {s.name: self.draws[s.name].reshape(c * m, *self.draws[s.name].shape[2:])
                  for s in density.sites}
        with model.context(), seeded(seed), torch.no_grad():
            out, _ = sample_sites(model.program, model.args, model.kwargs,
                                  {s.name: s.shape for s in discrete}, c * m,
                                  density.max_plate_nesting, model.structure.batching,
                                  values=values, discrete_posterior=True)
        return {k: v.reshape(c, m, *v.shape[1:]) for k, v in out.items()}

    def log_marginal(self, method: str = "auto", seed: int = 0, **options):
        """log p(observed) using what this fit learned: importance sampling with the VI
        guide as proposal, the Laplace Gaussian, or else ``model.log_marginal(method)``."""
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
    def save(self, path, overwrite: bool = False) -> None:
        """Write the fit to a netCDF file (ArviZ layout; no pickle).

        The file is written next to ``path`` under a temporary name and renamed at the end,
        so an interrupted save leaves the old file (or none), never half a file.

        Parameters
        ----------
        path : str or Path
        overwrite : bool
            Replace an existing file (otherwise an existing ``path`` is an error).

        Raises
        ------
        FileExistsError
            ``path`` exists and ``overwrite`` is False.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"Fit.save: {path} exists; pass overwrite=True to replace it")
        if path.is_dir():
            raise IsADirectoryError(f"Fit.save: {path} is a folder; give a file name such as run.nc")
        idata = self.to_arviz()
        scalars = {k: v for k, v in self.info.items() if isinstance(v, (bool, int, float, str))}
        attrs = idata.posterior.attrs
        attrs["genprog_method"] = self.method
        attrs["genprog_seed"] = -1 if self.seed is None else int(self.seed)
        attrs["genprog_info"] = json.dumps(scalars)
        attrs["genprog_format"] = SAVE_FORMAT
        attrs["genprog_sites"] = json.dumps({k: list(v.shape[2:]) for k, v in self.draws.items()})
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
        os.close(fd)
        try:
            idata.to_netcdf(tmp, engine="h5netcdf")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def __repr__(self) -> str:
        return (f"Fit(method={self.method!r}, chains={self.num_chains}, draws={self.num_draws}, "
                f"sites={list(self.draws)})")


def deterministic_sites(model, values: dict, n: int, lead: tuple) -> dict:
    """Values of the model's deterministic sites at ``n`` latent draws, ``[*lead, ...]``."""
    structure = model.structure
    det = [s for s in structure.sites.values() if s.kind == "deterministic"]
    if not det:
        return {}
    return {k: v.reshape(*lead, *v.shape[1:])
            for k, v in model.density().deterministic_values(values, n).items()}


def _read_idata(path: Path):
    import arviz as az

    if not path.exists():
        raise FileNotFoundError(f"gp.load: no file {path}")
    if path.is_dir():
        raise IsADirectoryError(f"gp.load: {path} is a folder, not a saved fit (.nc file)")
    try:
        idata = az.from_netcdf(str(path), engine="h5netcdf")
        idata.load()
    except Exception as e:  # noqa: BLE001 -- h5py/xarray raise many types for a bad file
        raise ValueError(f"gp.load: {path} is not a readable ArviZ netCDF file "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    if "posterior" not in idata.groups():
        raise ValueError(f"gp.load: {path} has no 'posterior' group (groups: {list(idata.groups())})")
    return idata


def _json_attr(path: Path, attrs, key: str, default):
    raw = attrs.get(key)
    if raw is None:
        return default
    try:
        value = json.loads(str(raw))
    except (ValueError, RecursionError):
        raise ValueError(f"gp.load: {path}: attribute {key!r} is not valid JSON") from None
    if not isinstance(value, type(default)):  # a damaged file, not a caller's wrong type
        raise ValueError(  # noqa: TRY004
            f"gp.load: {path}: attribute {key!r} should hold a {type(default).__name__}, "
            f"got {type(value).__name__}")
    return value


def _draws_of(path: Path, post) -> dict:
    draws = {}
    for k in post.data_vars:
        values = np.asarray(post[k].values)
        if values.dtype.kind not in "biuf" or values.ndim < 2:
            raise ValueError(f"gp.load: {path}: posterior variable {k!r} is not numeric "
                             f"[chain, draw, ...] (dtype {values.dtype}, shape {values.shape})")
        draws[k] = torch.from_numpy(values.copy())
    if not draws:
        raise ValueError(f"gp.load: {path}: the posterior group holds no variables")
    return draws


def check_draws_match(draws: dict, model, where: str) -> None:
    """Every latent site of ``model`` has draws ``[chain, draw, *site_shape]`` and every
    variable is a site of the model; otherwise a ValueError naming the difference."""
    sites = model.structure.sites
    latent = {n for n, s in sites.items() if s.kind == "latent"}
    known = set(sites) | {f"{n}_missing" for n in sites}
    missing = sorted(latent - set(draws))
    extra = sorted(set(draws) - known)
    if missing or extra:
        raise ValueError(f"{where}: the draws do not match the model's sites (model latents "
                         f"without draws: {missing}; variables the model lacks: {extra})")
    for name, v in draws.items():
        if name in sites and sites[name].kind in ("latent", "deterministic") \
                and tuple(v.shape[2:]) != tuple(sites[name].shape):
            raise ValueError(f"{where}: site {name!r} has shape {tuple(sites[name].shape)} in "
                             f"the model but {tuple(v.shape[2:])} in the draws")


def load(path, model=None) -> Fit:
    """Read a fit written by :meth:`Fit.save`. Loading reads arrays only (no code runs).

    A netCDF file that genprog did not write (another tool's ArviZ output) loads as
    draws only (``method="external"``); ``predict`` on it needs a model whose sites match.

    Parameters
    ----------
    path : str or Path
    model : genprog.Model, optional
        The conditioned model, to enable ``predict``/``log_marginal`` on the loaded fit;
        its latent sites and shapes must match the saved draws.

    Raises
    ------
    FileNotFoundError, IsADirectoryError
        No such file.
    ValueError
        The file is damaged, not an ArviZ netCDF file, lacks a posterior group, has
        malformed genprog metadata, or does not match ``model``.
    """
    path = Path(path)
    idata = _read_idata(path)
    post = idata.posterior
    draws = _draws_of(path, post)
    stats = {}
    if "sample_stats" in idata.groups():
        stats = {k: np.asarray(idata.sample_stats[k].values) for k in idata.sample_stats.data_vars}
    ours = "genprog_method" in post.attrs
    info = _json_attr(path, post.attrs, "genprog_info", {})
    try:
        seed = int(post.attrs.get("genprog_seed", -1))
    except (TypeError, ValueError):
        raise ValueError(f"gp.load: {path}: attribute 'genprog_seed' is not an int") from None
    if model is not None:
        check_draws_match(draws, model, f"gp.load({path})")
    method = str(post.attrs["genprog_method"]) if ours else "external"
    if not ours:
        info = {"source": str(path), "note": "not written by genprog: draws only"}
    return Fit(method, model, draws, stats, None if seed < 0 else seed, info, idata=idata)

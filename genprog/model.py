"""``Model``: a Pyro model function with its inputs, seen as a probability distribution.

Operations: :meth:`Model.sample`, :meth:`Model.log_prob`, :meth:`Model.condition`,
:meth:`Model.marginalize`, :meth:`Model.log_marginal` and :meth:`Model.fit`. Each
validates its input, runs on the model's device and dtype, and dispatches to generic
(inference-backed) machinery unless a subclass supplies an exact hook:

* ``_exact_log_prob(values, pointwise)`` -> Tensor or None
* ``_exact_log_marginal()`` -> float or None
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import time

import pyro
import torch

from .convergence import check_convergence
from .density import JointDensity
from .dtypes import default_dtype
from .estimate import Estimate
from .fit import Fit, deterministic_sites
from .handlers import (
    FixSites,
    MissingValues,
    ObserveWithMissing,
    ParamsAsLatents,
    missing_site_name,
)
from .infer import FIT_METHODS, MCMC_METHODS, evidence
from .infer.record import InferenceRecord
from .inputs import as_tensor, tensor_device
from .rng import seeded
from .sites import ModelStructure, elementwise_support, inspect_model
from .validation import check_int, check_seed
from .vectorize import sample_sites

LOG_MARGINAL_METHODS = ("auto", "exact", "is", "ais", "laplace")


_seeded = seeded  # the zoo's old name for :func:`genprog.rng.seeded`


class Model:
    """A generative model: a Pyro model function bound to its inputs.

    Parameters
    ----------
    fn : callable
        A Pyro model function. Sites whose values are passed in later with
        :meth:`condition` are observed; the rest are latent.
    *args, **kwargs
        The model's inputs. Tensors, NumPy arrays and pandas columns are converted to
        tensors on the model's device and dtype.

    Examples
    --------
    >>> import torch, pyro, pyro.distributions as dist, genprog as gp
    >>> def coin(n):
    ...     p = pyro.sample("p", dist.Beta(2.0, 2.0))
    ...     with pyro.plate("flip", n):
    ...         pyro.sample("y", dist.Bernoulli(p))
    >>> m = gp.Model(coin, 5)
    >>> m.sample(3, seed=0)["y"].shape
    torch.Size([3, 5])
    """

    def __init__(self, fn, *args, **kwargs):
        if not callable(fn):
            raise TypeError(f"Model needs a callable model function, got {type(fn).__name__}")
        self.fn = fn
        self._raw_inputs = (args, kwargs)  # re-converted by to(), so a dtype change is exact
        self.device = tensor_device(list(args) + list(kwargs.values()))
        self.dtype = None
        self.args = tuple(as_tensor(a, self.device, name=f"input {i}") for i, a in enumerate(args))
        self.kwargs = {k: as_tensor(v, self.device, name=f"input {k!r}") for k, v in kwargs.items()}
        self.observed: dict[str, torch.Tensor] = {}
        self.fixed: dict[str, torch.Tensor] = {}
        self.marginalized: frozenset[str] = frozenset()
        self.coords: dict[str, list] = {}
        self._missing_init: dict[str, torch.Tensor] = {}
        self._structure: ModelStructure | None = None
        self._base_structure: ModelStructure | None = None

    # ------------------------------------------------------------------ plumbing
    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", type(self).__name__)

    def _replace(self, **changes) -> Model:
        new = copy.copy(self)
        for k, v in changes.items():
            setattr(new, k, v)
        new._structure = None
        if any(k in changes for k in ("args", "kwargs", "fixed", "device", "dtype")):
            new._base_structure = None
        return new

    @contextlib.contextmanager
    def context(self):
        """Run the model's program with its device as torch's default device and, when the
        model has a dtype other than torch's default, that dtype as the default floating
        dtype, so literals inside the model land where the data are. Both are restored on
        exit; outside this block torch's defaults are never changed."""
        dev = contextlib.nullcontext() if self.device is None else torch.device(self.device)
        with default_dtype(self.dtype), dev:
            yield

    def with_fixed(self, values: dict) -> Model:
        """A copy of the model with the sites in ``values`` held at those (already
        validated, tensor) values, with no density (what ``fit(fixed=...)`` and
        ``point=[...]`` do)."""
        return self._replace(fixed={**self.fixed, **values})

    def with_inputs(self, *args, **kwargs) -> Model:
        """A copy of the model bound to new inputs (positional and/or by parameter name;
        inputs not given keep their values); observations, fixed sites and coords stay.

        Raises
        ------
        TypeError
            An input name the model function does not take.
        """
        sig = inspect.signature(self.fn)
        raw_args, raw_kwargs = self._raw_inputs
        bound = sig.bind_partial(*raw_args, **raw_kwargs)
        unknown = set(kwargs) - set(sig.parameters)
        if unknown:
            raise TypeError(f"unknown input(s) {sorted(unknown)}; the model takes {list(sig.parameters)}")
        fresh = sig.bind_partial(*args, **kwargs)
        bound.arguments.update(fresh.arguments)
        new = Model(self.fn, *bound.args, **bound.kwargs).to(self.device, self.dtype)
        return self._replace(args=new.args, kwargs=new.kwargs,
                             _raw_inputs=(bound.args, bound.kwargs))

    def to(self, device=None, dtype=None) -> Model:
        """A copy of the model whose inputs, observations and computations live on
        ``device`` (e.g. ``"cuda"``) with floating dtype ``dtype`` (e.g. ``torch.float64``)."""
        device = torch.device(device) if device is not None else self.device
        dtype = dtype or self.dtype

        def move(x):
            return as_tensor(x, device, dtype) if torch.is_tensor(x) else x

        raw_args, raw_kwargs = self._raw_inputs
        return self._replace(
            device=device,
            dtype=dtype,
            args=tuple(as_tensor(a, device, dtype) for a in raw_args),
            kwargs={k: as_tensor(v, device, dtype) for k, v in raw_kwargs.items()},
            observed={k: move(v) for k, v in self.observed.items()},
            fixed={k: move(v) for k, v in self.fixed.items()},
            _missing_init={k: move(v) for k, v in self._missing_init.items()},
        )

    def with_coords(self, **coords) -> Model:
        """Name the positions along plates, e.g. ``with_coords(school=["A", "B", ...])``;
        they become ArviZ coordinates."""
        unknown = set(coords) - set(self.base_structure.plates)
        if unknown:
            raise ValueError(
                f"with_coords: unknown plate(s) {sorted(unknown)}; plates: "
                f"{sorted(self.base_structure.plates)}"
            )
        for plate, values in coords.items():
            size = self.base_structure.plates[plate][1]
            if len(values) != size:
                raise ValueError(f"with_coords: plate {plate!r} has size {size}, got {len(values)} coords")
        return self._replace(coords={**self.coords, **{k: list(v) for k, v in coords.items()}})

    def base_program(self, *args, **kwargs):
        """The model with fixed sites applied but no observations (``pyro.param`` statements
        are latent sites with a flat density: :class:`~genprog.handlers.ParamsAsLatents`)."""
        with FixSites(self.fixed), ParamsAsLatents():
            return self.fn(*args, **kwargs)

    def program(self, *args, **kwargs):
        """The model with fixed sites and observations applied (NaN = missing)."""
        fills, batch_ndims = {}, {}
        for name, init in self._missing_init.items():
            info = self.base_structure.sites[name]
            fills[name] = pyro.sample(missing_site_name(name),
                                      MissingValues(elementwise_support(info.support), init))
            batch_ndims[name] = len(info.batch_shape)
        with FixSites(self.fixed), ObserveWithMissing(self.observed, fills, batch_ndims), \
                ParamsAsLatents():
            return self.fn(*args, **kwargs)

    def point_parameters(self) -> list:
        """Names of the model's ``pyro.param`` statements (not ``pyro.module`` weights) that
        are latent (not fixed): fits estimate them as points — jointly with everything else
        in MAP, held at the joint MAP estimate inside Laplace, VI and MCMC fits (``point=``)."""
        with self.context(), seeded(0), torch.no_grad(), pyro.poutine.block():
            tr = pyro.poutine.trace(self.program).get_trace(*self.args, **self.kwargs)
        return [name for name, node in tr.nodes.items() if node["type"] == "sample"
                and node["infer"].get("_genprog_param") and not node["infer"].get("_genprog_fixed")]

    @property
    def base_structure(self) -> ModelStructure:
        if self._base_structure is None:
            with self.context(), seeded(0):
                self._base_structure = inspect_model(self.base_program, self.args, self.kwargs)
        return self._base_structure

    @property
    def structure(self) -> ModelStructure:
        """Sites of the conditioned program (observed sites marked observed)."""
        if self._structure is None:
            with self.context(), seeded(0):
                self._structure = inspect_model(self.program, self.args, self.kwargs)
        return self._structure

    def density(self) -> JointDensity:
        """The conditioned model's joint density over its continuous latents."""
        missing = {k: torch.isnan(self.observed[k]) for k in self._missing_init}
        return JointDensity(self.program, self.args, self.kwargs, self.structure,
                            missing=missing, base_program=self.base_program)

    def _fixed_value(self, name: str, value) -> torch.Tensor:
        """``fit(fixed={name: value})``'s value as a tensor of the site's shape inside its
        support, or an error naming the site."""
        what = f"fit(fixed=...): site {name!r}"
        t = as_tensor(value, self.device, self.dtype, name=what)
        if not torch.is_tensor(t):
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise TypeError(f"{what} needs a number or tensor, got {type(value).__name__} {value!r:.40}")
            t = torch.tensor(float(t), device=self.device, dtype=self.dtype or torch.get_default_dtype())
        info = self.base_structure.sites[name]
        if tuple(t.shape) != info.shape:
            raise ValueError(f"{what} has shape {info.shape}, got {tuple(t.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}: values must be finite, got {t.flatten()[:5].tolist()}")
        if not bool(torch.as_tensor(info.support.check(t)).all()):
            raise ValueError(f"{what}: value(s) outside the site's support {info.support}: "
                             f"{t.flatten()[:5].tolist()}")
        return t

    def _check_names(self, names, what: str, allowed=None):
        sites = self.base_structure.sites
        allowed = allowed if allowed is not None else [
            n for n, s in sites.items() if s.kind in ("latent", "observed")
        ]
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise ValueError(f"{what}: unknown site(s) {unknown}; the model's sites are {allowed}")

    # ------------------------------------------------------------------ sample
    def sample(self, n: int = 1, seed: int | None = None) -> dict:
        """Ancestral samples of every sample and deterministic site, vectorized over draws.

        Parameters
        ----------
        n : int
            Number of draws.
        seed : int, optional
            Seed for reproducible draws (torch's global RNG is left untouched).

        Returns
        -------
        dict[str, Tensor]
            ``site -> [n, *site_shape]`` (observed sites are drawn too; marginalized
            sites are left out).
        """
        n = check_int("sample: n", n)
        if seed is not None:
            seed = check_seed("sample: seed", seed)
        structure = self.base_structure
        wanted = {name: info.shape for name, info in structure.sites.items()
                  if name not in self.marginalized and info.kind != "fixed"}
        with self.context(), seeded(seed), torch.no_grad():
            out, _ = sample_sites(self.base_program, self.args, self.kwargs, wanted, n,
                                  structure.max_plate_nesting, structure.batching)
        return out

    # ------------------------------------------------------------------ condition
    def condition(self, data=None, **obs) -> Model:
        """A new Model with the given sites observed.

        Parameters
        ----------
        data : dict or pandas.DataFrame, optional
            Site name -> observed values (a DataFrame's columns are sites).
        **obs
            More site name -> observed values. NaN entries are missing: they are
            imputed by inference as latent site ``"{name}_missing"``.

        Raises
        ------
        ValueError
            Unknown site names, shapes that differ from the site's, values outside the
            site's support, or missing entries in a site whose support couples entries.
        TypeError
            Non-numeric data.
        """
        values = {}
        if data is not None:
            if hasattr(data, "columns"):
                data = {c: data[c] for c in data.columns}
            if not isinstance(data, dict):
                raise TypeError(f"condition: data must be a dict or DataFrame, got {type(data).__name__}")
            values.update(data)
        values.update(obs)
        if not values:
            raise ValueError("condition: no observations given")
        structure = self.base_structure
        self._check_names(values, "condition")
        observed = dict(self.observed)
        missing_init = dict(self._missing_init)
        prior = None
        for name, v in values.items():
            info = structure.sites[name]
            t = as_tensor(v, self.device, self.dtype, name=f"condition: site {name!r}")
            if not torch.is_tensor(t):
                try:
                    t = torch.as_tensor(t, device=self.device)
                except (TypeError, ValueError, RuntimeError):
                    raise TypeError(
                        f"condition: site {name!r} needs numbers, got {type(v).__name__} {v!r:.60}"
                    ) from None
            if t.dtype == torch.bool:
                t = t.to(torch.get_default_dtype() if self.dtype is None else self.dtype)
            if tuple(t.shape) != info.shape:
                raise ValueError(
                    f"condition: site {name!r} has shape {info.shape}, got values of shape "
                    f"{tuple(t.shape)}"
                )
            if t.is_floating_point() and bool(torch.isinf(t).any()) and _standard_support(info.support):
                idx = [int(i) for i in torch.isinf(t).nonzero()[0]]
                raise ValueError(
                    f"condition: site {name!r} has an infinite value at index {idx}; observations "
                    "must be finite (NaN marks a missing entry)"
                )
            nan = torch.isnan(t) if t.is_floating_point() else torch.zeros_like(t, dtype=torch.bool)
            if not info.discrete and not t.is_floating_point():
                t = t.to(self.dtype or torch.get_default_dtype())
            if info.discrete and t.is_floating_point():
                ok = t[~nan]
                if not torch.equal(ok, ok.round()):
                    raise ValueError(f"condition: site {name!r} is discrete but got non-integer values")
            if nan.any() and elementwise_support(info.support) is None:
                raise ValueError(
                    f"condition: site {name!r} has NaN entries but its support "
                    f"{info.support} couples entries, so they cannot be imputed one by one"
                )
            if nan.any() and prior is None:
                prior = self.sample(1, seed=0)
            valid_fill = prior[name][0].to(t.dtype) if nan.any() else t
            inside = info.support.check(torch.where(nan, valid_fill, t))
            if not bool(torch.as_tensor(inside).all()):
                raise ValueError(
                    f"condition: site {name!r} got values outside its support {info.support}"
                )
            if nan.any():
                missing_init[name] = prior[name][0][nan].to(t.dtype)
            else:
                missing_init.pop(name, None)
            observed[name] = t
        return self._replace(observed=observed, _missing_init=missing_init)

    # ------------------------------------------------------------------ log p
    def log_prob(self, pointwise: bool = False, **values):
        """Log density of the given sites (and of the model's observations), with every
        other site integrated out.

        Continuous latents must all be given (the joint); discrete latents that are not
        given are summed out exactly by enumeration. A leading dim on every value (shape
        ``[N, *site_shape]``) evaluates N assignments at once.

        Parameters
        ----------
        pointwise : bool
            Return one term per observation (per batch element of each observed site):
            a tensor if one site is observed, else a dict site -> tensor.
        **values
            Site name -> value.

        Returns
        -------
        Tensor
            ``[]`` or ``[N]`` (pointwise: ``[*batch]`` or ``[N, *batch]``).

        Raises
        ------
        ValueError
            Unknown site, wrong shape, NaN values, or continuous latents left unassigned
            (their integral is not exact: use :meth:`log_marginal`).
        """
        structure = self.base_structure
        self._check_names(values, "log_prob")
        batched_n = None
        tensors = {}
        for name, v in values.items():
            info = structure.sites[name]
            t = as_tensor(v, self.device, self.dtype, name=f"log_prob: site {name!r}")
            if not torch.is_tensor(t):
                t = torch.as_tensor(t, device=self.device, dtype=self.dtype or torch.get_default_dtype())
            if t.is_floating_point() and torch.isnan(t).any():
                raise ValueError(
                    f"log_prob: site {name!r} has NaN values; condition on them (NaN = missing) "
                    "and use log_marginal() instead"
                )
            if tuple(t.shape) == info.shape:
                n = None
            elif tuple(t.shape[1:]) == info.shape:
                n = t.shape[0]
            else:
                raise ValueError(
                    f"log_prob: site {name!r} has shape {info.shape}; got {tuple(t.shape)} "
                    f"(expected {info.shape} or [N, *{info.shape}])"
                )
            if info.support is not None and not bool(torch.as_tensor(info.support.check(t)).all()):
                raise ValueError(
                    f"log_prob: site {name!r} got value(s) outside its support {info.support}; "
                    "the density there is 0 (log p = -inf)"
                )
            if n is not None:
                if batched_n not in (None, n):
                    raise ValueError(f"log_prob: inconsistent leading draw dims {batched_n} and {n}")
                batched_n = n
            tensors[name] = t
        with self.context():
            exact = self._exact_log_prob(tensors, pointwise)
            if exact is not None:
                return exact
            n = batched_n or 1
            batched = {k: (v if batched_n and v.shape != structure.sites[k].shape else
                           v.expand(n, *v.shape)) for k, v in tensors.items()}
            one = {k: v[0] for k, v in batched.items()}
            given_once = self._replace(observed={**self.observed, **one})
            left = [s.name for s in given_once.structure.latent_continuous]
            if left:
                raise ValueError(
                    f"log_prob: continuous latent site(s) {left} are not given; log_prob "
                    "integrates out only discrete sites exactly. Give them, or condition the "
                    "model and use log_marginal() for an estimate of the marginal"
                )
            density = JointDensity(self.program, self.args, self.kwargs, given_once.structure,
                                   missing=self.density().missing, given=batched)
            z = torch.zeros(n, 0)
            if pointwise:
                names = [s.name for s in self.structure.observed] or list(tensors)
                out = density.pointwise_log_likelihood({}, n, sites=names)
                out = {k2: (v if batched_n else v[0]) for k2, v in out.items()}
                return next(iter(out.values())) if len(out) == 1 else out
            lp = density.log_joint(z)
            return lp if batched_n else lp[0]

    def _exact_log_prob(self, values: dict, pointwise: bool):
        """Hook for closed-form log densities; None falls back to the generic path."""
        return None

    # ------------------------------------------------------------------ marginalize
    def marginalize(self, *sites: str) -> Model:
        """Sum discrete latent ``sites`` out of the model (exactly, by enumeration).

        The returned model no longer reports them in ``sample`` or in fits; their
        posterior is recoverable after a fit with :meth:`genprog.Fit.discrete_posterior`.
        """
        if not sites:
            raise ValueError("marginalize: name at least one site")
        self._check_names(sites, "marginalize")
        for name in sites:
            info = self.base_structure.sites[name]
            if info.kind != "latent" or name in self.observed:
                raise ValueError(f"marginalize: site {name!r} is observed, not latent")
            if not (info.discrete and info.enumerable):
                raise ValueError(
                    f"marginalize: site {name!r} is not discrete with finite support; generic "
                    "marginalization enumerates discrete sites (continuous latents are "
                    "integrated by log_marginal or by zoo classes in closed form)"
                )
        return self._replace(marginalized=self.marginalized | frozenset(sites))

    # ------------------------------------------------------------------ evidence
    def _exact_log_marginal(self):
        """Hook for a closed-form log p(observed); None falls back to the generic path."""
        return None

    def log_marginal(self, method: str = "auto", *, seed: int = 0, **options) -> Estimate:
        """An estimate of ``log p(observed)`` of a conditioned model, in nats.

        Parameters
        ----------
        method : {"auto", "exact", "is", "ais", "laplace"}
            ``"exact"``: closed form (zoo classes) or enumeration when every latent is
            discrete; ``"is"``: importance sampling from the prior (``num_samples``);
            ``"ais"``: annealed importance sampling with HMC transitions
            (``num_particles``, ``num_temps``, ``num_leapfrog``); ``"laplace"``: Gaussian
            approximation at the mode of the unconstrained posterior. ``"auto"`` takes
            ``"exact"`` when available, else ``"ais"``, and records the choice in
            ``details["chosen_by_auto"]``.
        seed : int
        **options
            Passed to the estimator.

        Returns
        -------
        Estimate
        """
        if method not in LOG_MARGINAL_METHODS:
            raise ValueError(f"log_marginal: unknown method {method!r}; choose from {LOG_MARGINAL_METHODS}")
        if not self.structure.observed:
            raise ValueError("log_marginal: the model has no observed sites; condition() it first")
        start = time.perf_counter()
        with self.context():
            exact = self._exact_log_marginal()
            if method in ("auto", "exact"):
                if exact is not None:
                    return Estimate(float(exact), 0.0, "exact", wall_time_s=time.perf_counter() - start,
                                    details={"chosen_by_auto": method == "auto", "source": "closed form"})
                if not self.structure.latent_continuous:
                    _reject_options(options, "exact", ())
                    value = self.density().log_joint(torch.zeros(1, 0))[0]
                    return Estimate(float(value), 0.0, "exact", wall_time_s=time.perf_counter() - start,
                                    details={"chosen_by_auto": method == "auto", "source": "enumeration"})
                if method == "exact":
                    raise ValueError(
                        "log_marginal('exact'): continuous latent site(s) "
                        f"{[s.name for s in self.structure.latent_continuous]} have no closed form "
                        "here; use 'ais', 'is' or 'laplace'"
                    )
                method = "ais"
                chosen = True
            else:
                chosen = False
            target = self.density()
            if method in ("is", "ais") and not target.prior_split_exact:
                raise ValueError(
                    f"log_marginal({method!r}): some observations are partly missing inside a "
                    "multivariate site (or next to enumerated discrete sites), so the prior of "
                    "the missing entries has no separate density here; use method='laplace', "
                    "a zoo class whose log_prob integrates missing entries exactly, or drop "
                    "the partly observed rows"
                )
            if method == "is":
                _reject_options(options, "is", ("num_samples", "batch_size"))
                est = evidence.importance_sampling(target, seed=seed, **options)
            elif method == "ais":
                _reject_options(options, "ais", ("num_particles", "num_temps", "num_leapfrog",
                                                 "schedule", "num_runs"))
                est = evidence.annealed_importance_sampling(target, seed=seed, **options)
            else:
                _reject_options(options, "laplace", ("init", "max_iters"))
                mode = evidence.find_mode(target, seed=seed, **options)
                est = evidence.laplace_evidence(target, mode)
        if chosen:
            est = Estimate(est.value, est.stderr, est.method, est.num_samples, est.num_evaluations,
                           est.wall_time_s, {**est.details, "chosen_by_auto": True})
        return est

    # ------------------------------------------------------------------ fit
    def fit(self, method: str, *, fixed: dict | None = None, **options):
        """Fit the model's latents: ``"map"``, ``"laplace"``, ``"vi"``, ``"nuts"`` or ``"hmc"``.

        Parameters
        ----------
        method : str
        fixed : dict, optional
            Sites held at given values (no density, no inference).
        **options
            The method's own options (see :mod:`genprog.infer`); ``point=[...]`` names
            sites to point-estimate inside a Bayesian fit. An unknown option is a
            ``TypeError`` listing the valid ones.

        Returns
        -------
        genprog.Fit
        """
        if method not in FIT_METHODS:
            raise ValueError(f"fit: unknown method {method!r}; choose from {sorted(FIT_METHODS)}")
        fn = FIT_METHODS[method]
        valid = params_of(fn)
        unknown = set(options) - set(valid)
        if unknown:
            raise TypeError(
                f"fit({method!r}) got unknown option(s) {sorted(unknown)}; valid options: {valid}"
            )
        model = self
        if fixed:
            self._check_names(fixed, "fit(fixed=...)",
                              allowed=[s.name for s in self.base_structure.of_kind("latent")])
            clash = set(fixed) & set(self.observed)
            if clash:
                raise ValueError(f"fit(fixed=...): site(s) {sorted(clash)} are observed")
            fixed_t = {k: self._fixed_value(k, v) for k, v in fixed.items()}
            model = self.with_fixed(fixed_t)
            try:
                _ = model.structure  # evaluate the model with the fixed values once
            except ValueError as e:
                if "Expected parameter" not in str(e):
                    raise
                given = {k: v.flatten()[:3].tolist() for k, v in fixed_t.items()}
                raise ValueError(
                    f"fit(fixed=...): the model cannot be evaluated with the fixed value(s) {given} "
                    f"(sites {sorted(fixed_t)}): {str(e).splitlines()[0]}"
                ) from None
        if not model.structure.observed:
            raise ValueError(f"fit({method!r}): the model has no observed sites; condition() it first")
        if options.get("point"):
            model._check_names(options["point"], "fit(point=...)",
                               allowed=[s.name for s in model.structure.latent_continuous])
        params = model.point_parameters()
        if params and "point" in params_of(fn):
            options["point"] = list(dict.fromkeys([*(options.get("point") or []), *params]))
        with model.context():
            record = fn(model, **options)
            fit = model.fit_from_record(record)
        if params:
            fit.info["point_parameters"] = params
        return fit

    def fit_from_record(self, record: InferenceRecord) -> Fit:
        """The complete :class:`~genprog.Fit` of an inference algorithm's raw record: draws
        constrained (deterministic sites and held ``point`` sites included) and, for MCMC,
        the convergence diagnostics (``info["diagnostics"]``; poor results warned about)."""
        fitted = self.with_fixed(dict(record.held)) if record.held else self
        density = fitted.density()
        c, n, d = record.unconstrained.shape
        with torch.no_grad():
            values, _ = density.constrain(record.unconstrained.reshape(c * n, d))
            draws = {k: v.reshape(c, n, *v.shape[1:]) for k, v in values.items()}
            draws.update(deterministic_sites(fitted, values, c * n, (c, n)))
            for k, v in record.held.items():
                draws[k] = v.detach().expand(c, n, *v.shape).clone()
        info = dict(record.info)
        info["batching"] = density.batching  # "plate" | "vmap" | "loop" (genprog.vectorize)
        if record.held:
            info["point"] = {k: v.detach() for k, v in record.held.items()}
        if record.method in MCMC_METHODS:
            info["diagnostics"] = check_convergence(record.method, draws, dict(record.sample_stats))
        else:
            bad = [k for k, v in draws.items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if bad:
                raise RuntimeError(f"fit({record.method!r}): non-finite values in the result for "
                                   f"site(s) {bad}; the fit failed (check the model and data)")
        return Fit(record.method, fitted, draws, dict(record.sample_stats), record.seed, info)

    def __repr__(self) -> str:
        s = self.base_structure
        latent = [n for n, i in s.sites.items() if i.kind == "latent" and n not in self.observed]
        return (f"{type(self).__name__}({self.name}, latent={latent}, "
                f"observed={sorted(self.observed)}, device={self.device or 'cpu'})")


def params_of(fn) -> list:
    """The options an inference function takes (its keyword parameters but ``model``)."""
    return [p for p in inspect.signature(fn).parameters if p != "model"]


def _standard_support(support) -> bool:
    """True for torch's / Pyro's own constraints (real, positive, intervals, ...), whose
    values are finite; a model's custom support (e.g. event times padded with +inf) may
    admit infinite values, and is left to the distribution to judge."""
    base = elementwise_support(support) if support is not None else None
    base = base if base is not None else support
    return type(base).__module__.startswith(("torch.distributions", "pyro.distributions.constraints"))


def _reject_options(options, method, valid):
    unknown = set(options) - set(valid)
    if unknown:
        raise TypeError(
            f"log_marginal({method!r}) got unknown option(s) {sorted(unknown)}; valid: {list(valid)}"
        )


def model(fn):
    """Decorator: ``fn(*inputs)`` then returns a :class:`Model` bound to the inputs.

    >>> import pyro, pyro.distributions as dist, genprog as gp
    >>> @gp.model
    ... def normal(scale):
    ...     pyro.sample("y", dist.Normal(0.0, scale))
    >>> type(normal(2.0)).__name__
    'Model'
    """

    @functools.wraps(fn)
    def bind(*args, **kwargs):
        return Model(fn, *args, **kwargs)

    bind.model_fn = fn
    return bind

"""``ZooModel``: the base of the zoo classes — a :class:`genprog.Model` whose operations
are overridden by exact forms where the model class allows them.

A zoo class is a generative story written as a Pyro function of its parameters,
``story(n=None, **params)``, whose observed variable is the site ``"y"``:

* ``n=None`` (an unconditioned model): one draw of ``y`` with shape ``event_shape``, so
  ``sample(k)["y"]`` is ``[k, *event_shape]``;
* ``n`` an int (a model conditioned on a data set): ``y`` is ``[n, *event_shape]``, the
  rows i.i.d. inside ``pyro.plate("data", n)``.

Parameters given to the constructor are constants of the story; parameters left
``None`` get the class's default priors inside the story, so the generic Bayesian route
``Cls(...).condition(y=Y).fit("nuts" | "vi" | ...)`` works on every class. Exact operations
need every parameter given (or learned by the classmethod ``mle``).

A subclass provides exact operations by overriding hooks; :func:`capabilities` reads the
overrides, so the table it prints cannot claim more than the code does:

=====================  ==========================================================
hook                   operation made exact
=====================  ==========================================================
``_log_prob_rows(y)``  ``log_prob(y=Y)`` (latents integrated out), one term per row
                       ``[N]``; also ``log_marginal`` of a model conditioned on ``y``
``_marginal(drop)``    ``marginalize(dims=...)``: the distribution of the other dims
``_conditional(obs)``  ``condition(dims={i: value})``: the distribution of the others
``posterior(y)``       the posterior over the latent variables given ``y``
                       (``posterior_estimate``: estimated, e.g. an encoder)
``mle(data, ...)``     classmethod: maximum likelihood (closed form, EM, ...)
=====================  ==========================================================

Estimated operations are declared with ``_log_prob_estimate(y, **options)`` returning a
:class:`genprog.Estimate` (e.g. a VAE's importance-weighted bound), and with
``_conditional_estimate(obs)`` / ``_marginal_estimate(drop)``; a class with an exact,
differentiable log density over a real vector gets both from inference by pointing
them at :func:`conditional_by_inference` and :class:`EstimatedMarginal`. A class whose
log density is not defined (a GAN) sets ``has_density = False``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from genprog.inputs import as_tensor
from genprog.model import Model

#: Every ZooModel subclass, in definition order (filled by ``__init_subclass__``).
REGISTRY: dict[str, type] = {}

OPERATIONS = ("sample", "log_prob", "log_marginal", "marginalize", "condition", "posterior",
              "mle", "fit")


def renamed_keywords(**renames: str):
    """Decorator: the function still accepts the old keyword names ``renames`` (``old=
    "new"``), with a ``DeprecationWarning``; giving both names is a ``TypeError``."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__qualname__}: give {new} only ({old} is its "
                                        "deprecated name)")
                    warnings.warn(f"{fn.__qualname__}: {old}= is deprecated; use {new}=",
                                  DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper

    return decorate


def deprecated_record(old: str, field: str | None = None) -> property:
    """A read-only property ``old`` returning the fit record ``info`` (or its entry
    ``field``): the deprecated name of the record, kept so user code keeps working."""

    def get(self):
        warnings.warn(f"{type(self).__name__}.{old} is deprecated; use .info",
                      DeprecationWarning, stacklevel=2)
        return self.info if field is None else self.info[field]

    where = "``info``" if field is None else f"``info[{field!r}]``"
    return property(get, doc=f"Deprecated name of {where} (the same record; read-only).")


def training_record(result, **extra) -> dict:
    """The ``info`` record of a zoo network trained by :func:`genprog.optim.minimize`:
    ``loss_trace`` (list of float, one per optimizer step), ``num_steps`` (steps taken),
    ``converged`` (the plateau rule fired before ``max_iters``), then ``extra``."""
    return {"loss_trace": list(result.trace), "num_steps": result.num_iters,
            "converged": result.converged, **extra}


def data_plate(n: int | None):
    """The zoo's plate of i.i.d. rows: ``pyro.plate("data", n)``, or no plate for ``n=None``
    (one draw)."""
    return pyro.plate("data", n) if n is not None else contextlib.nullcontext()


def sample_rows(n: int | None, d, name: str = "y"):
    """The zoo's observation convention: one draw of ``d`` at site ``name`` (``n=None``), or
    ``n`` i.i.d. rows inside ``pyro.plate("data", n)``."""
    with data_plate(n):
        return pyro.sample(name, d)


class ZooModel(Model):
    """Base class of the zoo; see the module docstring for the conventions.

    Subclasses define ``story`` (a staticmethod Pyro function ``story(n=None, **params)``)
    and ``event_shape`` and call ``super().__init__(**params)``.
    """

    #: Site name of the observed variable.
    observed_site = "y"
    #: Whether ``log_prob`` may take NaN entries in ``y`` (missing, integrated out exactly).
    supports_missing = False
    #: False for implicit models (GANs): log p is undefined, not just unavailable.
    has_density = True
    #: How ``mle`` fits, for the capability table ("closed form", "EM", "variational", ...).
    mle_kind: str | None = None
    #: How ``sample`` draws: "exact" (ancestral or enumeration) or, e.g., "estimated (MCMC)".
    sampling_kind: str = "exact"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_") and cls.__dict__.get("register", True):
            REGISTRY[cls.__name__] = cls

    def __init__(self, **params):
        story = type(self).story
        super().__init__(story, n=None, **params)

    @staticmethod
    def story(n=None, **params):  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ parameters
    @property
    def params(self) -> dict:
        """The story's parameters (``None`` for those given a prior)."""
        return {k: v for k, v in self.kwargs.items() if k != "n"}

    @property
    def event_shape(self) -> tuple:
        """Shape of one draw of ``y``: ``(dim,)`` for classes with a ``dim`` input; others
        override it."""
        if "dim" in self.kwargs:
            return (self.kwargs["dim"],)
        raise NotImplementedError

    @property
    def n_data(self) -> int | None:
        return self.kwargs.get("n")

    def missing_parameters(self) -> list[str]:
        """Parameters without a value (they have priors in the story)."""
        return [k for k, v in self.params.items() if v is None]

    def _require_parameters(self, what: str) -> None:
        missing = self.missing_parameters()
        if missing:
            raise ValueError(
                f"{type(self).__name__}.{what} is exact only with every parameter given; "
                f"{missing} are not (build with them, learn them with {type(self).__name__}.mle, "
                "or use log_marginal / fit for the Bayesian route)"
            )

    def _with_params(self, **params) -> ZooModel:
        """A new unconditioned instance of the same class with ``params`` replaced."""
        new = dict(self.params)
        new.update(params)
        return type(self)(**new)

    def _rebind(self, **inputs) -> ZooModel:
        """This model with story inputs replaced (kept in raw inputs so ``to()`` is exact)."""
        raw_args, raw_kwargs = self._raw_inputs
        raw_kwargs = {**raw_kwargs, **inputs}
        kwargs = {**self.kwargs, **{k: as_tensor(v, self.device, self.dtype) for k, v in inputs.items()}}
        return self._replace(kwargs=kwargs, _raw_inputs=(raw_args, raw_kwargs))

    # ------------------------------------------------------------------ data
    def _as_data(self, y, what: str) -> tuple[torch.Tensor, bool]:
        """``y`` as a float tensor ``[N, *event_shape]`` and whether it was a single row."""
        t = as_tensor(y, self.device, self.dtype, name=f"{what}: y")
        if not torch.is_tensor(t):
            t = torch.as_tensor(t, device=self.device, dtype=self.dtype or torch.get_default_dtype())
        if not t.is_floating_point():
            t = t.to(self.dtype or torch.get_default_dtype())
        ev = tuple(self.event_shape)
        if tuple(t.shape) == ev:
            single = True
            t = t.unsqueeze(0)
        elif tuple(t.shape[1:]) == ev:
            single = False
        else:
            raise ValueError(
                f"{what}: y must have shape {list(ev)} or [N, {', '.join(map(str, ev))}]; "
                f"got {list(t.shape)}"
            )
        nan = torch.isnan(t)
        if nan.any() and not self.supports_missing:
            raise ValueError(f"{what}: y has NaN entries and {type(self).__name__} does not "
                             "integrate missing entries out")
        if torch.isinf(t).any():
            raise ValueError(f"{what}: y has infinite entries")
        return t, single

    # ------------------------------------------------------------------ operations
    def log_prob(self, pointwise: bool = False, **values):
        """``log p(y)`` with every latent integrated out (exact where the class has a
        closed form; NaN entries are missing and integrated out where
        ``supports_missing``).

        ``y`` is one row ``event_shape`` or a data set ``[N, *event_shape]``; the result is
        the total log density (``pointwise=True``: one term per row, ``[N]``).
        """
        if set(values) == {self.observed_site} and self._has("_log_prob_rows"):
            self._require_parameters("log_prob")
            y, single = self._as_data(values[self.observed_site], "log_prob")
            with self.context():
                rows = self._log_prob_rows(y)
            if single:
                return rows[0]
            return rows if pointwise else rows.sum()
        if not self.has_density:
            raise ValueError(f"{type(self).__name__} is an implicit model: log p is not defined")
        return super().log_prob(pointwise=pointwise, **values)

    def _exact_log_marginal(self):
        y = self.observed.get(self.observed_site)
        if y is None or not self._has("_log_prob_rows") or self.missing_parameters():
            return None
        if len(self.observed) > 1:
            return None
        return float(self._log_prob_rows(y.reshape(-1, *self.event_shape)).sum().detach())

    def log_prob_estimate(self, y, **options):
        """An estimate of ``log p(y)`` (summed over rows of ``y [N, *event_shape]``) with
        its standard error, as a :class:`genprog.Estimate`, for classes whose log density
        has no closed form (the class's own estimator; see its ``_log_prob_estimate``)."""
        if not self._has("_log_prob_estimate"):
            if self._has("_log_prob_rows"):
                raise ValueError(f"{type(self).__name__}.log_prob is exact; use log_prob()")
            raise ValueError(f"{type(self).__name__} has no log p estimator of its own; "
                             "condition it on y and use log_marginal()")
        self._require_parameters("log_prob_estimate")
        with self.context():
            return self._log_prob_estimate(y, **options)

    def log_marginal(self, method: str = "auto", *, seed: int = 0, **options):
        """As :meth:`genprog.Model.log_marginal`; for a class whose log p has no closed form
        but an estimator of its own (``_log_prob_estimate``: IWAE, importance sampling
        over topic proportions, AIS for log Z, ...), ``method="auto"`` uses that estimator
        on the observed ``y``, passing ``options`` through."""
        y = self.observed.get(self.observed_site)
        if (method == "auto" and y is not None and len(self.observed) == 1
                and self._has("_log_prob_estimate") and not self._has("_log_prob_rows")
                and not self.missing_parameters()):
            if "seed" in inspect.signature(self._log_prob_estimate).parameters:
                options = {**options, "seed": seed}
            est = self.log_prob_estimate(y, **options)
            details = {**est.details, "chosen_by_auto": True, "source": "class estimator"}
            return type(est)(est.value, est.stderr, est.method, est.num_samples,
                             est.num_evaluations, est.wall_time_s, details)
        return super().log_marginal(method, seed=seed, **options)

    def condition(self, data=None, *, dims=None, **obs):
        """Condition on observations, or — with ``dims={index: value}`` — on some
        coordinates of ``y``, giving the exact distribution of the other coordinates.

        ``condition(y=Y)`` with ``Y`` ``[N, *event_shape]`` observes a data set (NaN entries
        are missing); the result's ``log_marginal()`` is exact where ``log_prob`` is, and
        ``fit`` gives posteriors over parameters left ``None``.
        """
        if dims is not None:
            if data is not None or obs:
                raise ValueError("condition: give either dims={index: value} or observations, not both")
            self._require_parameters("condition(dims=...)")
            checked = self._check_dims(dims, "condition")
            if self._has("_conditional"):
                return self._conditional(checked)
            if self._has("_conditional_estimate"):
                return self._conditional_estimate(checked)
            raise ValueError(f"{type(self).__name__} has no conditional over dims")
        if data is not None:
            if not isinstance(data, dict):
                return super().condition(data, **obs)
            obs = {**data, **obs}
        if self.observed_site in obs:
            y = obs[self.observed_site]
            t = as_tensor(y, self.device, self.dtype, name=f"condition: {self.observed_site}")
            t = torch.as_tensor(t)
            ev = tuple(self.event_shape)
            if t.dim() == len(ev) + 1 and tuple(t.shape[1:]) == ev:
                model = self._rebind(n=int(t.shape[0]))
            elif tuple(t.shape) == ev:
                model = self
            else:
                raise ValueError(
                    f"condition: {self.observed_site} must have shape {list(ev)} or "
                    f"[N, {', '.join(map(str, ev))}]; got {list(t.shape)}"
                )
            return Model.condition(model, **obs)
        return super().condition(**obs)

    def _check_dims(self, dims, what: str):
        ev = tuple(self.event_shape)
        if len(ev) != 1:
            raise ValueError(f"{what}(dims=...): {type(self).__name__} has event shape {list(ev)}; "
                             "dims indexes a vector-valued y")
        d = ev[0]
        if isinstance(dims, dict):
            idx = list(dims)
        else:
            idx = list(dims)
        for i in idx:
            if not isinstance(i, int) or not 0 <= i < d:
                raise ValueError(f"{what}(dims=...): {i!r} is not a dimension index in [0, {d})")
        if len(set(idx)) != len(idx):
            raise ValueError(f"{what}(dims=...): repeated dimension index in {idx}")
        if len(idx) >= d:
            raise ValueError(f"{what}(dims=...): must leave at least one of the {d} dimensions")
        if isinstance(dims, dict):
            return {i: torch.as_tensor(dims[i], dtype=self.dtype or torch.get_default_dtype())
                    for i in idx}
        return idx

    def marginalize(self, *sites: str, dims=None):
        """Integrate out discrete latent ``sites`` (generic enumeration) or — with
        ``dims=[...]`` — the listed coordinates of ``y``, giving the exact distribution of
        the other coordinates."""
        if dims is not None:
            if sites:
                raise ValueError("marginalize: give either sites or dims=, not both")
            self._require_parameters("marginalize(dims=...)")
            checked = self._check_dims(dims, "marginalize")
            if self._has("_marginal"):
                return self._marginal(checked)
            if self._has("_marginal_estimate"):
                return self._marginal_estimate(checked)
            raise ValueError(f"{type(self).__name__} has no marginal over dims")
        return super().marginalize(*sites)

    # ------------------------------------------------------------------ capability table
    @classmethod
    def _has(cls, hook: str) -> bool:
        """Whether ``cls`` overrides ``hook`` (defined below ZooModel in the MRO)."""
        for klass in cls.__mro__:
            if klass is ZooModel:
                return False
            if hook in klass.__dict__:
                return True
        return False

    @classmethod
    def capabilities(cls) -> dict[str, str]:
        """Per operation: ``"exact"``, ``"estimated"``, ``"generic"`` (genprog's
        inference-backed default) or ``"unavailable"`` — read from the hooks the class
        overrides."""
        exact_lp = cls._has("_log_prob_rows")
        est_lp = cls._has("_log_prob_estimate")
        if not cls.has_density:
            lp = lm = "unavailable"
        else:
            lp = "exact" if exact_lp else "estimated" if est_lp else "generic"
            lm = "exact" if exact_lp else "estimated"
        return {
            "sample": cls.sampling_kind,
            "log_prob": lp,
            "log_marginal": lm,
            "marginalize": "exact" if cls._has("_marginal") else
                           "estimated" if cls._has("_marginal_estimate") else "unavailable",
            "condition": "exact" if cls._has("_conditional") else
                         "estimated" if cls._has("_conditional_estimate") else "generic",
            "posterior": "exact" if cls._has("posterior") else
                         "estimated" if cls._has("posterior_estimate") else "generic",
            "mle": (cls.mle_kind or "yes") if cls._has("mle") else "unavailable",
            "fit": "generic" if cls.has_density else "own objective",
        }


class GenerativeClassifier(ZooModel):
    """A zoo class over features ``y`` with a discrete class: Bayes' rule on its
    ``_joint(x) -> log p(x, c = k)`` ``[N, K]`` (NaN features integrated out there) gives
    the class posterior, ``predict_proba`` and ``predict``."""

    register = False  # a base, not a model class of the table

    def _joint(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def posterior(self, y) -> torch.Tensor:
        """``p(c = k | y)`` by Bayes' rule, ``[N, K]`` (one row ``[d]`` gives ``[K]``); NaN
        features are integrated out exactly."""
        self._require_parameters("posterior")
        x, single = self._as_data(y, "posterior")
        with self.context():
            post = torch.softmax(self._joint(x), dim=-1)
        return post[0] if single else post

    def predict_proba(self, y) -> torch.Tensor:
        """Class probabilities ``p(c | y)``, ``[N, K]``; same as :meth:`posterior`."""
        return self.posterior(y)

    def predict(self, y) -> torch.Tensor:
        """Most probable class of each row, ``[N]`` (int64)."""
        return self.posterior(y).argmax(-1)


def capabilities():
    """The capability table of every zoo class: a pandas DataFrame, one row per class,
    one column per operation (see :meth:`ZooModel.capabilities`). (Importing this module
    imports the package ``genprog.models`` first, which registers every class.)"""
    import pandas as pd

    rows = {name: cls.capabilities() for name, cls in REGISTRY.items()}
    generic = {
        "sample": "exact", "log_prob": "exact (all latents given / enumerable)",
        "log_marginal": "estimated (IS, AIS, Laplace; exact by enumeration)",
        "marginalize": "exact (enumerable discrete sites)", "condition": "generic",
        "posterior": "generic", "mle": "unavailable", "fit": "generic",
    }
    table = pd.DataFrame.from_dict({"Model (any Pyro story)": generic, **rows}, orient="index")
    return table[list(OPERATIONS)]


@contextlib.contextmanager
def frozen_networks(zoo: ZooModel):
    """Within the block, the parameters of ``torch.nn.Module`` inputs of ``zoo`` (also inside
    lists, e.g. a flow's transforms) do not require grad: inference over the model's
    variables treats the trained networks as constants (and a compiled potential may
    record them as such)."""
    modules = []
    for v in zoo.kwargs.values():
        for item in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(item, torch.nn.Module):
                modules.append(item)
    params = [q for m in modules for q in m.parameters() if q.requires_grad]
    for q in params:
        q.requires_grad_(False)
    try:
        yield
    finally:
        for q in params:
            q.requires_grad_(True)


class _GivenFactor(dist.TorchDistribution):
    """An observed site whose log density is a precomputed tensor (the joint log density
    of the given coordinates with the current values of the others)."""

    arg_constraints: dict = {}
    support = constraints.real_vector

    def __init__(self, log_value: torch.Tensor, size: int):
        self.log_value = log_value
        super().__init__(log_value.shape, torch.Size([size]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return _GivenFactor(self.log_value.expand(batch_shape), self.event_shape[0])

    def log_prob(self, value):
        return self.log_value

    def sample(self, sample_shape=torch.Size()):
        raise NotImplementedError("the given coordinates are observed, not sampled")


def conditional_by_inference(zoo: ZooModel, obs: dict, num_reference_draws: int = 2000) -> Model:
    """The distribution of the coordinates of ``y`` not in ``obs`` given those in ``obs``,
    as a generic :class:`genprog.Model` to be fitted by inference.

    Its latent site ``"y_rest"`` ``[d - len(obs)]`` has density proportional to
    ``p(y_given, y_rest)`` (the class's exact joint log density); its observed site
    ``"y_given"`` holds the given values. So ``.fit("nuts")`` samples the conditional
    and ``.log_marginal()`` estimates ``log p(y_given)`` with an error bar. A Gaussian
    reference with the model's own moments of the other coordinates (from
    ``num_reference_draws`` samples) serves as the prior of ``"y_rest"`` (AIS starts there);
    the observed factor divides it back out, so the target is exact.
    """
    d = zoo.event_shape[0]
    given = sorted(obs)
    rest = [i for i in range(d) if i not in obs]
    dtype = zoo.dtype or torch.get_default_dtype()
    y_given = torch.stack([torch.as_tensor(obs[i], dtype=dtype).reshape(()) for i in given])
    with torch.no_grad():
        draws = zoo.sample(num_reference_draws, seed=0)[zoo.observed_site][:, rest]
    loc = draws.mean(0).to(dtype)
    scale = (1.5 * draws.std(0)).clamp_min(1e-3).to(dtype)
    index_given = torch.tensor(given)
    index_rest = torch.tensor(rest)

    def conditional(y_given):
        reference = dist.Normal(loc, scale).to_event(1)
        r = pyro.sample("y_rest", reference)
        batch = r.shape[:-1]
        full = torch.empty(*batch, d, dtype=r.dtype, device=r.device)
        full[..., index_rest] = r
        full[..., index_given] = y_given.to(r.dtype).expand(*batch, len(given))
        with zoo.context(), frozen_networks(zoo):
            lp = zoo._log_prob_rows(full.reshape(-1, d)).reshape(batch)
        pyro.sample("y_given", _GivenFactor(lp - reference.log_prob(r), len(given)), obs=y_given)

    conditional.__name__ = f"{type(zoo).__name__}_conditional"
    return Model(conditional, y_given).condition(y_given=y_given)


class EstimatedMarginal:
    """The distribution of the coordinates of ``y`` left after integrating out ``drop``,
    for a class without a closed-form marginal: exact sampling (sample the joint, drop
    coordinates) and ``log_prob`` estimated by inference with an error bar.
    """

    def __init__(self, zoo: ZooModel, drop: list):
        self.zoo = zoo
        self.drop = list(drop)
        self.keep = [i for i in range(zoo.event_shape[0]) if i not in self.drop]

    def sample(self, n: int = 1, seed: int | None = None) -> dict:
        """``{"y": [n, len(keep)]}``."""
        y = self.zoo.sample(n, seed=seed)[self.zoo.observed_site]
        return {self.zoo.observed_site: y[:, self.keep]}

    def log_prob(self, y, method: str = "ais", seed: int = 0, **options):
        """An :class:`genprog.Estimate` of ``log p(y_keep)`` for one row ``y [len(keep)]``
        (``method``: "ais", "is" or "laplace", as :meth:`genprog.Model.log_marginal`)."""
        y = torch.as_tensor(y, dtype=self.zoo.dtype or torch.get_default_dtype())
        if tuple(y.shape) != (len(self.keep),):
            raise ValueError(f"EstimatedMarginal.log_prob: y must have shape [{len(self.keep)}] "
                             f"(the kept dims {self.keep}); got {list(y.shape)}")
        cond = conditional_by_inference(self.zoo, {i: y[j] for j, i in enumerate(self.keep)})
        return cond.log_marginal(method, seed=seed, **options)

"""Effect handlers that turn a user's model into the program genprog evaluates.

Each is one small :class:`~pyro.poutine.messenger.Messenger`:

* :class:`ObserveWithMissing` — observe sites; NaN entries are missing values whose
  imputations come from a latent site ``"{name}_missing"`` (one entry per NaN).
* :class:`FixSites` — hold sites at given values with no density (``fit(fixed=...)``).
* :class:`SubstituteBatched` — substitute values that carry leading particle dims.
* :class:`SubstituteValues` — substitute the values of one draw (as Pyro's ``substitute``
  does for params), e.g. inside a program run under ``torch.func.vmap``.
* :class:`EnumerateDiscrete` — Pyro's parallel enumeration, runnable under ``torch.func.vmap``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.messenger import Messenger


def missing_site_name(name: str) -> str:
    """Name of the latent site that holds the imputations of site ``name``'s NaN entries."""
    return f"{name}_missing"


class PointParameter(dist.ImproperUniform):
    """Flat (improper) density over a ``pyro.param`` turned into a latent site: the
    parameter is estimated (by maximum likelihood under a flat density), never given a
    posterior. ``sample()`` returns the parameter's initial value.

    Parameters
    ----------
    support : Constraint
        The parameter's constraint.
    init : Tensor
        Its initial value.
    event_dim : int
        Rightmost dims of ``init`` that form one value (Pyro's ``event_dim``; default all).
    """

    def __init__(self, support, init: torch.Tensor, event_dim: int | None = None):
        event_dim = init.dim() if event_dim is None else event_dim
        batch = init.shape[: init.dim() - event_dim]
        event = init.shape[init.dim() - event_dim:]
        super().__init__(constraints.independent(support, event_dim) if event_dim else support,
                         batch, event)
        self.init = init

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(type(self), _instance)
        new.init = self.init
        dist.ImproperUniform.__init__(new, self.support, torch.Size(batch_shape), self.event_shape)
        new._validate_args = self.__dict__.get("_validate_args")
        return new

    def sample(self, sample_shape=torch.Size()):
        return self.init.expand(self._extended_shape(sample_shape)).clone()


class MissingValues(PointParameter):
    """Flat (improper) density over the ``n`` missing entries of an observed site.

    The observed site's own likelihood, evaluated at the completed data, supplies the
    density of the imputations, so this site contributes ``log p = 0``. ``sample()``
    returns ``init`` (a draw from the prior predictive) so initialisation is in support.

    Parameters
    ----------
    support : Constraint
        Per-element support of the observed site.
    init : Tensor [n]
        Initial values of the missing entries.
    """

    def __init__(self, support, init: torch.Tensor):
        super().__init__(support, init, event_dim=1)


def fill_missing(observed: torch.Tensor, missing: torch.Tensor, fill: torch.Tensor,
                 batch_ndim: int) -> torch.Tensor:
    """Complete ``observed`` (NaN where ``missing``) with ``fill``.

    Parameters
    ----------
    observed : Tensor [*shape]
    missing : BoolTensor [*shape]
    fill : Tensor [*prefix, n_missing]
        Possibly batched over leading particle dims (shaped as a site outside all plates).
    batch_ndim : int
        Number of batch dims of the observed site; that many trailing prefix dims are
        singleton plate slots and are dropped so the result lines up with the site.

    Returns
    -------
    Tensor [*prefix', *shape]
    """
    prefix = tuple(fill.shape[:-1])
    if batch_ndim:
        prefix = prefix[: max(len(prefix) - batch_ndim, 0)]
    fill = fill.reshape(*prefix, -1)
    flat_missing = missing.reshape(-1)
    # out of place (no index_put into an unbatched tensor), so it runs under torch.func.vmap:
    # entry j of the flattened site takes fill[(number of missing entries before j)]
    position = (torch.cumsum(flat_missing.long(), 0) - 1).clamp(min=0)
    flat = torch.nan_to_num(observed.reshape(-1), nan=0.0).to(fill.dtype)
    completed = torch.where(flat_missing, fill[..., position], flat)
    return completed.reshape(*prefix, *observed.shape)


class ObserveWithMissing(Messenger):
    """Observe sites at ``data``; entries that are NaN are completed from ``fills``.

    Parameters
    ----------
    data : dict[str, Tensor]
        Observed values (NaN = missing).
    fills : dict[str, Tensor]
        For sites with missing entries, the imputations ``[*particles, n_missing]``.
    batch_ndims : dict[str, int]
        For those sites, the number of batch dims of one (unvectorized) value.
    """

    def __init__(self, data: dict, fills: dict | None = None, batch_ndims: dict | None = None):
        super().__init__()
        self.data = data
        self.fills = fills or {}
        self.batch_ndims = batch_ndims or {}

    def _pyro_sample(self, msg):
        name = msg["name"]
        if name not in self.data:
            return
        value = self.data[name]
        if name in self.fills:
            missing = torch.isnan(value)
            value = fill_missing(value, missing, self.fills[name], self.batch_ndims[name])
            msg["infer"] = dict(msg["infer"], _genprog_observed_mask=~missing)
        msg["value"] = value
        msg["is_observed"] = True


class FixSites(Messenger):
    """Hold sites at values and drop their density (``fit(fixed={...})``)."""

    def __init__(self, values: dict):
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg):
        if msg["name"] in self.values:
            msg["value"] = self.values[msg["name"]]
            msg["is_observed"] = True
            msg["mask"] = False
            msg["infer"] = dict(msg["infer"], _genprog_fixed=True)


class SubstituteBatched(Messenger):
    """Substitute latent values that carry a leading particle dim ``[N, *shape]``.

    Values are reshaped so that the particle dim sits at ``-(max_plate_nesting + 1)``
    (left of every plate dim of the site), which is where a particle plate at that dim
    expects it. Sites keep their latent status (their log density is still counted).
    """

    def __init__(self, values: dict, max_plate_nesting: int, observe: bool = False):
        super().__init__()
        self.values = values
        self.max_plate_nesting = max_plate_nesting
        self.observe = observe

    def _pyro_sample(self, msg):
        name = msg["name"]
        if name not in self.values:
            return
        value = self.values[name]
        event_ndim = len(msg["fn"].event_shape)
        batch = value.shape[1:value.dim() - event_ndim]
        pad = self.max_plate_nesting - len(batch)
        if pad < 0:
            raise ValueError(
                f"site {name!r}: value of shape {tuple(value.shape[1:])} has more batch dims "
                f"than the model's {self.max_plate_nesting} plates"
            )
        msg["value"] = value.reshape(value.shape[0], *([1] * pad), *value.shape[1:])
        if self.observe:
            msg["is_observed"] = True


class SubstituteValues(Messenger):
    """Substitute one draw's site values ``{site: [*shape]}``; sites keep their latent
    status (their log density still counts) unless ``observe`` is True."""

    def __init__(self, values: dict, observe: bool = False):
        super().__init__()
        self.values = values
        self.observe = observe

    def _pyro_sample(self, msg):
        if msg["name"] in self.values:
            msg["value"] = self.values[msg["name"]]
            if self.observe:
                msg["is_observed"] = True


class EnumerateDiscrete(EnumMessenger):
    """Pyro's :class:`~pyro.poutine.enum_messenger.EnumMessenger` (parallel enumeration of
    sites marked for it), runnable under ``torch.func.vmap``: Pyro reads a site value's
    shape through ``value.data``, which a vmapped tensor does not allow, so that read is
    given a shape-only (meta) stand-in of the value."""

    def _pyro_post_sample(self, msg):
        value = msg["value"]
        if not (torch.is_tensor(value) and torch._C._functorch.is_batchedtensor(value)):
            return super()._pyro_post_sample(msg)
        msg["value"] = torch.empty(value.shape, device="meta")
        try:
            super()._pyro_post_sample(msg)
        finally:
            msg["value"] = value


def is_module_parameter(name: str) -> bool:
    """``pyro.module`` registers a network's weights as params named ``"module$$$weight"``;
    those stay trained weights, not parameters of the generative story."""
    return "$$$" in name


class ParamsAsLatents(Messenger):
    """Turn each ``pyro.param(name, init, constraint=...)`` of a model into a latent sample
    site ``name`` with a flat density over the constraint (:class:`PointParameter`), so that
    inference estimates it (MAP jointly; a point estimate held inside Bayesian fits) instead
    of silently keeping its initial value. ``pyro.module`` weights are left alone."""

    def _pyro_param(self, msg):
        name = msg["args"][0]
        if len(msg["args"]) < 2 or is_module_parameter(name):
            return
        init = msg["args"][1]
        init = init() if callable(init) else init
        init = torch.as_tensor(init)
        if not init.is_floating_point():
            init = init.to(torch.get_default_dtype())
        constraint = msg["kwargs"].get("constraint", constraints.real)
        event_dim = msg["kwargs"].get("event_dim")
        value = pyro.sample(name, PointParameter(constraint, init.detach(), event_dim),
                            infer={"_genprog_param": True})
        msg["value"] = value
        msg["done"] = True
        msg["stop"] = True

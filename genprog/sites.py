"""What a model's sites are: names, shapes, supports and plates, read off one trace.

A genprog model is assumed *static*: one prior trace tells its sample sites, their
shapes and the plates they live in. Everything that needs the structure of a model
(validation of observations, packing of latents into a flat vector, ArviZ dims)
reads it from a :class:`ModelStructure`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.poutine.subsample_messenger import _Subsample

#: Name of the plate genprog adds around a model to vectorize over draws / chains / particles.
PARTICLE_PLATE = "_genprog_particles"


@dataclass(frozen=True)
class SiteInfo:
    """One site of a model, as seen in a single (unbatched) prior trace.

    Attributes
    ----------
    name : str
    kind : str
        ``"latent"`` (unobserved sample site), ``"observed"``, ``"fixed"`` (held at a value
        with no density) or ``"deterministic"``.
    shape : tuple[int, ...]
        Shape of one value of the site (``batch_shape + event_shape``).
    batch_shape, event_shape : tuple[int, ...]
    support : Constraint | None
        Support of the site's distribution (None for deterministic sites).
    discrete : bool
        True when the support is discrete.
    enumerable : bool
        True when the distribution has finite enumerable support (``has_enumerate_support``).
    plates : tuple[tuple[str, int, int], ...]
        ``(plate name, dim, size)`` of every vectorized plate around the site.
    """

    name: str
    kind: str
    shape: tuple
    batch_shape: tuple
    event_shape: tuple
    support: object
    discrete: bool
    enumerable: bool
    plates: tuple

    @property
    def event_dim(self) -> int:
        return len(self.event_shape)

    def dim_names(self) -> list[str]:
        """Names of the value's dimensions: plate names where a plate indexes the dimension,
        otherwise ``"{site}_dim_{i}"``. (A deterministic site's dims are matched to plates
        by position from the right and size, since its value carries no batch shape.)"""
        by_dim = {dim: (name, size) for name, dim, size in self.plates}
        ndim = len(self.shape)
        b = ndim if self.kind == "deterministic" else len(self.batch_shape)
        names = []
        for i in range(ndim):
            plate = by_dim.get(i - b) if i < b else None
            names.append(plate[0] if plate and plate[1] == self.shape[i] else f"{self.name}_dim_{i}")
        return names


@dataclass(frozen=True)
class ModelStructure:
    """The sites of a model (in execution order) and its plate nesting.

    ``batching`` caches, per purpose (log density, forward run), how the program is run
    for many draws (a :class:`genprog.vectorize.Batching`); it is decided once per
    structure, i.e. per model, inputs and observations.
    """

    sites: dict
    max_plate_nesting: int
    plates: dict  # plate name -> (dim, size)
    batching: dict = field(default_factory=dict, compare=False, repr=False)

    def of_kind(self, *kinds: str) -> list[SiteInfo]:
        return [s for s in self.sites.values() if s.kind in kinds]

    @property
    def latent_continuous(self) -> list[SiteInfo]:
        return [s for s in self.of_kind("latent") if not s.discrete]

    @property
    def latent_discrete(self) -> list[SiteInfo]:
        return [s for s in self.of_kind("latent") if s.discrete]

    @property
    def observed(self) -> list[SiteInfo]:
        return self.of_kind("observed")


def is_model_site(node) -> bool:
    """True for a trace node that is a sample site of the model (not a plate's index site)."""
    return node["type"] == "sample" and not isinstance(node["fn"], _Subsample)


def _is_discrete(support) -> bool:
    return bool(getattr(support, "is_discrete", False))


def inspect_model(program, args=(), kwargs=None) -> ModelStructure:
    """Run ``program(*args, **kwargs)`` once (no gradients) and read off its structure."""
    kwargs = kwargs or {}
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(program).get_trace(*args, **kwargs)
    sites: dict[str, SiteInfo] = {}
    plates: dict[str, tuple[int, int]] = {}
    nesting = 0
    for name, node in trace.nodes.items():
        if not is_model_site(node):
            continue
        fn = node["fn"]
        frames = tuple(
            (f.name, f.dim, f.size) for f in node["cond_indep_stack"] if f.vectorized
        )
        for pname, pdim, psize in frames:
            plates[pname] = (pdim, psize)
            nesting = max(nesting, -pdim)
        # batch dims outside any plate also occupy dims left of the event (as in Pyro's
        # _guess_max_plate_nesting); the particle plate must sit left of all of them
        if not node["infer"].get("_deterministic"):
            nesting = max(nesting, len(fn.batch_shape))
        infer = node.get("infer", {})
        if infer.get("_deterministic"):
            kind = "deterministic"
        elif infer.get("_genprog_fixed"):
            kind = "fixed"
        elif node["is_observed"]:
            kind = "observed"
        else:
            kind = "latent"
        value = node["value"]
        shape = tuple(value.shape) if torch.is_tensor(value) else ()
        support = None if kind == "deterministic" else fn.support
        sites[name] = SiteInfo(
            name=name,
            kind=kind,
            shape=shape,
            batch_shape=tuple(fn.batch_shape),
            event_shape=tuple(fn.event_shape),
            support=support,
            discrete=kind != "deterministic" and _is_discrete(support),
            enumerable=bool(getattr(fn, "has_enumerate_support", False)),
            plates=frames,
        )
    return ModelStructure(sites=sites, max_plate_nesting=nesting, plates=plates)


def elementwise_support(support):
    """The per-element constraint of ``support`` (``independent(c, k)`` -> ``c``), or None
    when the support couples elements (simplex, correlation matrices, ...)."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    coupled = (
        constraints.simplex,
        constraints.corr_cholesky,
        constraints.lower_cholesky,
        constraints.positive_definite,
        constraints.corr_matrix,
    )
    if any(support is c for c in coupled) or type(support).__name__ in (
        "_Simplex",
        "_CorrCholesky",
        "_LowerCholesky",
        "_PositiveDefinite",
        "_CorrMatrix",
        "_OrderedVector",
        "_SoftplusLowerCholesky",
    ):
        return None
    return support

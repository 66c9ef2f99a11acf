"""A model's joint density as a batched function of a flat unconstrained vector.

:class:`JointDensity` packs a model's continuous latent sites into one flat vector
``z`` of shape ``[N, D]`` (N particles / chains / draws; D unconstrained coordinates),
and evaluates ``log p(z, observed)`` for all N at once: by running the Pyro program a
single time inside a particle plate when the model broadcasts, else under
``torch.func.vmap`` of a one-draw program, else draw by draw (:mod:`genprog.vectorize`;
the path taken is :attr:`JointDensity.batching`). Discrete latent sites are summed out
exactly by parallel enumeration (Pyro's ``poutine.enum`` + ``contract_to_tensor``).

This is the object every inference algorithm consumes: MAP/Laplace optimise it,
NUTS/HMC sample it, the evidence estimators split it into prior and likelihood.
"""

from __future__ import annotations

from collections import OrderedDict

import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.infer import config_enumerate
from pyro.ops.contract import contract_to_tensor
from pyro.ops.packed import unpack

from .handlers import EnumerateDiscrete, SubstituteBatched, SubstituteValues, missing_site_name
from .sites import PARTICLE_PLATE, ModelStructure, is_model_site
from .vectorize import (
    Batching,
    choose_batching,
    in_particle_plate,
    particle_dims_to_front,
    run_draws,
    sample_sites,
)
from .vmap_einsum import VmapLogRing

__all__ = ["JointDensity", "particle_dims_to_front", "run_vectorized"]


def run_vectorized(program, args, kwargs, n: int, max_plate_nesting: int):
    """Trace ``program`` (already wrapped in the particle plate of size ``n``)."""
    return poutine.trace(program).get_trace(*args, **kwargs)


def site_log_prob(site) -> torch.Tensor:
    """``log p`` of one trace site with its mask and scale applied (what
    ``Trace.compute_log_prob`` stores, without its per-site bookkeeping)."""
    lp = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    mask = site["mask"]
    if mask is not None:
        if mask is False:
            return torch.zeros_like(lp)
        if mask is not True:
            lp = torch.where(mask, lp, torch.zeros_like(lp))
    scale = site["scale"]
    if not (isinstance(scale, (int, float)) and scale == 1.0):
        lp = scale * lp
    return lp


class JointDensity:
    """``log p(latents, observed)`` of a (conditioned) program, batched over particles.

    Parameters
    ----------
    program : callable
        The Pyro program (observations and fixed sites already applied).
    args, kwargs : tuple, dict
        Its inputs.
    structure : ModelStructure
        The program's sites (from :func:`genprog.sites.inspect_model`).
    missing : dict[str, BoolTensor]
        For observed sites with NaN entries, the mask of missing entries.
    base_program : callable, optional
        The program without observations, used by :meth:`sample_prior` to draw missing
        entries from their prior predictive.
    given : dict[str, Tensor], optional
        Values ``[N, *shape]`` observed at sites, one per draw (``Model.log_prob`` of N
        assignments); every batched call then has N draws.

    Attributes
    ----------
    batching : str
        How the program is run for many draws: ``"plate"``, ``"vmap"`` or ``"loop"``
        (decided once per structure, see :mod:`genprog.vectorize`).
    """

    def __init__(self, program, args, kwargs, structure: ModelStructure, missing=None,
                 base_program=None, given=None):
        self.program = program
        self.given = given or {}
        self.args = args
        self.kwargs = kwargs
        self.structure = structure
        self.missing = missing or {}
        self.base_program = base_program
        self.max_plate_nesting = structure.max_plate_nesting
        not_enumerable = [s.name for s in structure.latent_discrete if not s.enumerable]
        if not_enumerable:
            raise ValueError(
                f"discrete latent site(s) {not_enumerable} have no finite enumerable support "
                "(e.g. Poisson); genprog sums discrete latents out exactly, so give them a "
                "bounded support or observe them"
            )
        self.has_enumeration = bool(structure.latent_discrete)
        self.sites = structure.latent_continuous
        self.transforms = {s.name: biject_to(s.support) for s in self.sites}
        self.unconstrained_shapes = {
            s.name: tuple(self.transforms[s.name].inverse_shape(torch.Size(s.shape)))
            for s in self.sites
        }
        self.sizes = {n: int(torch.Size(sh).numel()) for n, sh in self.unconstrained_shapes.items()}
        self.dim = sum(self.sizes.values())

    # ------------------------------------------------------------------ packing
    def unpack(self, z: torch.Tensor) -> dict:
        """``[N, D] -> {site: [N, *unconstrained_shape]}``."""
        out, start = {}, 0
        for s in self.sites:
            k = self.sizes[s.name]
            out[s.name] = z[:, start:start + k].reshape(z.shape[0], *self.unconstrained_shapes[s.name])
            start += k
        return out

    def constrain(self, z: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Map ``z [N, D]`` to constrained site values ``{site: [N, *shape]}`` and
        ``log|det J| [N]`` of the map."""
        values, ladj = {}, z.new_zeros(z.shape[0])
        parts = self.unpack(z)
        for s in self.sites:
            t = self.transforms[s.name]
            u = parts[s.name]
            x = t(u)
            values[s.name] = x
            lj = t.log_abs_det_jacobian(u, x)
            ladj = ladj + lj.reshape(z.shape[0], -1).sum(-1)
        return values, ladj

    def unconstrain(self, values: dict) -> torch.Tensor:
        """``{site: [N, *shape]} -> z [N, D]``."""
        parts = []
        for s in self.sites:
            x = values[s.name]
            u = self.transforms[s.name].inv(x)
            parts.append(u.reshape(x.shape[0], -1))
        if not parts:
            n = next(iter(values.values())).shape[0] if values else 1
            return torch.zeros(n, 0)
        return torch.cat(parts, -1)

    # ------------------------------------------------------------------ tracing
    def trace(self, values: dict, n: int, program=None, enumerate_discrete=True, given=None):
        """Run the program once for ``n`` particles with latent ``values`` ``[n, *shape]``
        substituted (the plate path)."""
        program = program or self.program
        k = self.max_plate_nesting
        given = self.given if given is None else given
        prog = SubstituteBatched(values, k)(program)
        if given:
            prog = SubstituteBatched(given, k, observe=True)(prog)
        if enumerate_discrete and self.has_enumeration:
            prog = poutine.enum(config_enumerate(prog, default="parallel"),
                                first_available_dim=-(k + 2))
        return run_vectorized(in_particle_plate(prog, n, k), self.args, self.kwargs, n, k)

    def trace_one(self, values: dict, given=None, enumerate_discrete=True):
        """Run the program for one draw with latent ``values`` ``[*shape]`` substituted
        (the vmap and loop paths); no particle plate."""
        prog = SubstituteValues(values)(self.program)
        if given:
            prog = SubstituteValues(given, observe=True)(prog)
        if enumerate_discrete and self.has_enumeration:
            prog = EnumerateDiscrete(first_available_dim=-(self.max_plate_nesting + 1))(
                config_enumerate(prog, default="parallel"))
        return poutine.trace(prog).get_trace(*self.args, **self.kwargs)

    def _sum_to_particles(self, lp: torch.Tensor, n: int, batched: bool = True) -> torch.Tensor:
        k = self.max_plate_nesting
        if not batched or lp.dim() < k + 1:
            return lp.sum().expand(n)
        lp = lp.movedim(-(k + 1), 0)
        return lp.reshape(lp.shape[0], -1).sum(-1).expand(n)

    def _factor_terms(self, tr, n: int, batched: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of continuous-latent log densities, sum of the rest), each ``[N]``; the
        rest (observed and discrete sites) has discrete latents summed out. ``batched``:
        ``tr`` was traced in the particle plate (else one draw, ``n = 1``)."""
        latent_names = {s.name for s in self.sites}
        if not self.has_enumeration:
            prior = lik = 0.0
            for name, site in tr.nodes.items():
                if not is_model_site(site):
                    continue
                lp = site_log_prob(site)
                if name in self.missing:
                    # missing entries of an observed site are latent: their density
                    # p(y_missing | parents) belongs to the prior (which sample_prior draws)
                    drawn = self._missing_batch_elements(name)
                    prior = prior + self._sum_to_particles(lp * drawn.to(lp.dtype), n, batched)
                    lik = lik + self._sum_to_particles(lp * (~drawn).to(lp.dtype), n, batched)
                    continue
                term = self._sum_to_particles(lp, n, batched)
                if name in latent_names:
                    prior = prior + term
                else:
                    lik = lik + term
            zero = torch.zeros(n, dtype=self._dtype(tr), device=self._device(tr))
            return zero + prior, zero + lik
        tr.compute_log_prob()
        tr.pack_tensors()
        particle = tr.plate_to_symbol.get(PARTICLE_PLATE) if batched else None
        enum_symbols = set(tr.symbol_to_dim) - set(tr.plate_to_symbol.values())
        prior_terms, tree = [], OrderedDict()
        for name, site in tr.nodes.items():
            if not is_model_site(site):
                continue
            packed = site["packed"]["log_prob"]
            if name in latent_names and not (set(packed._pyro_dims) & enum_symbols):
                prior_terms.append(self._sum_to_particles(site["log_prob"], n, batched))
                continue
            ordinal = frozenset(
                tr.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized
            )
            tree.setdefault(ordinal, []).append(packed)
        present = {d for terms in tree.values() for t in terms for d in t._pyro_dims}
        target = frozenset({particle}) & present if particle else frozenset()  # a 1-particle dim is packed away
        lik = contract_to_tensor(tree, enum_symbols, target_ordinal=target,
                                 ring=None if batched else VmapLogRing())
        lik = lik.expand(n) if particle and particle in lik._pyro_dims else lik.reshape(()).expand(n)
        prior = sum(prior_terms) if prior_terms else torch.zeros_like(lik)
        return prior, lik

    def _missing_batch_elements(self, name: str) -> torch.Tensor:
        """Batch elements of observed site ``name`` that are entirely missing ``[*batch]``."""
        info = self.structure.sites[name]
        miss = self.missing[name]
        ev = len(info.event_shape)
        return miss.reshape(*miss.shape[: miss.dim() - ev], -1).all(-1) if ev else miss

    @property
    def prior_split_exact(self) -> bool:
        """Whether :meth:`log_prior_and_likelihood` splits the joint into a normalised
        prior (that :meth:`sample_prior` draws from) and a likelihood — as estimators of
        ``log p(observed)`` that start from the prior (IS, AIS) need. False when a
        multivariate observation is partly missing (its missing coordinates' density has
        no separate closed form here) or when missing entries meet enumerated sites."""
        for name, miss in self.missing.items():
            info = self.structure.sites[name]
            ev = len(info.event_shape)
            if self.has_enumeration or (ev and bool((miss.reshape(*miss.shape[: miss.dim() - ev], -1)
                                                     .any(-1) & ~self._missing_batch_elements(name)).any())):
                return False
        return True

    @staticmethod
    def _dtype(tr):
        for site in tr.nodes.values():
            if site["type"] == "sample" and torch.is_tensor(site["value"]) and site["value"].is_floating_point():
                return site["value"].dtype
        return torch.get_default_dtype()

    @staticmethod
    def _device(tr):
        for site in tr.nodes.values():
            if site["type"] == "sample" and torch.is_tensor(site["value"]):
                return site["value"].device
        return torch.device("cpu")

    # ------------------------------------------------------------------ batching
    @property
    def batching(self) -> str:
        """``"plate"``, ``"vmap"`` or ``"loop"``: how this program runs for many draws."""
        return self.batching_decision.mode

    @property
    def batching_decision(self) -> Batching:
        """The :class:`~genprog.vectorize.Batching` (path and why), decided on a probe
        of two draws the first time it is needed and cached on the structure."""
        cache = self.structure.batching
        if "density" in cache:
            return cache["density"]
        g = torch.Generator(device=self._input_device()).manual_seed(0)
        try:  # two prior draws: in support, and in the latents' own dtype
            z = self.sample_prior(2, g)
        except Exception:  # noqa: BLE001 - a model that cannot be sampled: probe near the origin
            z = 0.5 * torch.randn(2, self.dim, generator=g, device=self._input_device(),
                                  dtype=torch.get_default_dtype())
        given = {k: (v[:2] if v.shape[0] >= 2 else v[:1].expand(2, *v.shape[1:]))
                 for k, v in self.given.items()}

        def plate(inputs):
            return self._factor_terms(self.trace(inputs["values"], 2, given=inputs["given"]), 2)

        return choose_batching(cache, "density", plate=plate, one_draw=self._one_draw_terms,
                               probe={"values": self.constrain(z)[0], "given": given},
                               what="the model's log density")

    def _input_device(self):
        for x in list(self.args) + list(self.kwargs.values()):
            if torch.is_tensor(x):
                return x.device
        return torch.empty(0).device

    def _one_draw_terms(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(log prior, log likelihood), scalars, of one draw of constrained latent values
        ``{"values": {site: [*shape]}, "given": {...}}`` (the prior without the Jacobian of
        the constraining map, which is computed batched, outside the vmapped region)."""
        tr = self.trace_one(inputs["values"], inputs["given"])
        prior, lik = self._factor_terms(tr, 1, batched=False)
        return prior[0], lik[0]

    def _terms(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log prior without Jacobian, log likelihood, log|J|), each ``[N]``."""
        n = z.shape[0]
        values, ladj = self.constrain(z)
        mode = self.batching
        if mode == "plate":
            prior, lik = self._factor_terms(self.trace(values, n), n)
        else:
            prior, lik = run_draws(self._one_draw_terms, {"values": values, "given": self.given}, n, mode)
        return prior, lik, ladj

    # ------------------------------------------------------------------ densities
    def log_prior_and_likelihood(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log prior incl. log|J|, log likelihood)``, each ``[N]``, at ``z [N, D]``."""
        prior, lik, ladj = self._terms(z)
        return prior + ladj, lik

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        return self.log_prior_and_likelihood(z)[0]

    def log_likelihood(self, z: torch.Tensor) -> torch.Tensor:
        return self.log_prior_and_likelihood(z)[1]

    def log_joint(self, z: torch.Tensor, jacobian: bool = True) -> torch.Tensor:
        """``log p(z, observed)`` ``[N]``; with ``jacobian=False`` the density of the
        constrained values (whose mode is the MAP estimate)."""
        prior, lik, ladj = self._terms(z)
        return prior + lik + (ladj if jacobian else 0.0)

    def potential_and_grad(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``U = -log p(z, observed)`` ``[N]`` and ``dU/dz`` ``[N, D]``; non-finite U
        (zero density or numerical failure) is reported as ``+inf`` with zero gradient."""
        # Pyro's argument validation costs ~25% per call here; out-of-support parameters
        # give NaN densities instead, which are caught below.
        with torch.enable_grad(), pyro.validation_enabled(False):
            z = z.detach().requires_grad_(True)
            try:
                U = -self.log_joint(z)
            except ValueError as e:  # a distribution rejected a parameter: zero density
                if "Expected parameter" not in str(e) and "constraint" not in str(e):
                    raise
                inf = torch.full((z.shape[0],), float("inf"), dtype=z.dtype, device=z.device)
                return inf, torch.zeros_like(z)
            grad, = torch.autograd.grad(U.sum(), z, allow_unused=True)
        grad = torch.zeros_like(z) if grad is None else grad
        bad = ~torch.isfinite(U) | ~torch.isfinite(grad).all(-1)
        U = torch.where(bad, torch.full_like(U, float("inf")), U).detach()
        grad = torch.where(bad.unsqueeze(-1), torch.zeros_like(grad), grad)
        return U, grad

    # ------------------------------------------------------------------ per observation
    def pointwise_log_likelihood(self, values: dict, n: int, sites=None) -> dict:
        """Log density of each observation, ``{site: [N, *batch_shape]}``, for ``n`` draws
        of the latent ``values``.

        Parameters
        ----------
        sites : list of str, optional
            Observed sites to report (default: all). A site coupled to enumerated discrete
            latents gets those latents summed out per element (at most one such site).
            Missing (NaN) entries are dropped: such a site gets ``[N, n_observed]``.
        """
        by_name = self.structure.sites
        report = [by_name[name] for name in (sites or [s.name for s in self.structure.observed])]
        mode = self.batching
        if mode == "plate":
            tr = self.trace(values, n)
            terms, nodes = self._pointwise_terms(tr, report, n), tr.nodes
        else:
            def one_draw(inputs):
                tr = self.trace_one(inputs["values"], inputs["given"])
                return {name: lp[0] for name, lp in self._pointwise_terms(tr, report, 1).items()}

            terms = run_draws(one_draw, {"values": values, "given": self.given}, n, mode)
            with torch.no_grad(), pyro.validation_enabled(False):  # masks: outside vmap
                nodes = self.trace_one({k: v[0] for k, v in values.items()},
                                       {k: v[0] for k, v in self.given.items()}).nodes
        out = {}
        for s in report:
            keep = self._observation_mask(nodes[s.name], s)
            out[s.name] = terms[s.name] if keep is None else terms[s.name][:, keep]
        return out

    def _pointwise_terms(self, tr, report, n: int) -> dict:
        """``{site: [n, *batch_shape]}`` log densities of the observed sites in ``report``
        from trace ``tr`` (of ``n`` particles, or of one draw with ``n = 1``)."""
        k = self.max_plate_nesting
        tr.compute_log_prob()
        pointwise = {s.name: tr.nodes[s.name]["log_prob"] for s in report}
        if self.has_enumeration:
            tr.pack_tensors()
            enum_symbols = set(tr.symbol_to_dim) - set(tr.plate_to_symbol.values())
            coupled = [s for s in report
                       if set(tr.nodes[s.name]["packed"]["log_prob"]._pyro_dims) & enum_symbols]
            if len(coupled) > 1:
                raise ValueError(
                    "pointwise log density with enumerated discrete latents is defined for one "
                    f"observed site at a time; sites {[s.name for s in coupled]} share them"
                )
            discrete = {s.name for s in self.structure.latent_discrete}
            for site in coupled:
                tree = OrderedDict()
                for name, node in tr.nodes.items():
                    if is_model_site(node) and (name in discrete or name == site.name):
                        ordinal = frozenset(tr.plate_to_symbol[f.name]
                                            for f in node["cond_indep_stack"] if f.vectorized)
                        tree.setdefault(ordinal, []).append(node["packed"]["log_prob"])
                present = {d for terms in tree.values() for t in terms for d in t._pyro_dims}
                target = frozenset(tr.plate_to_symbol[f.name]
                                   for f in tr.nodes[site.name]["cond_indep_stack"]
                                   if f.vectorized) & present
                ring = VmapLogRing() if PARTICLE_PLATE not in tr.plate_to_symbol else None
                pointwise[site.name] = unpack(
                    contract_to_tensor(tree, enum_symbols, target_ordinal=target, ring=ring),
                    tr.symbol_to_dim)
        out = {}
        for s in report:
            lp = pointwise[s.name]
            b = len(s.batch_shape)
            while lp.dim() < k + 1:
                lp = lp.unsqueeze(0)
            target_shape = (n,) + (1,) * (k - b) + tuple(s.batch_shape)
            out[s.name] = lp.expand(target_shape).reshape(n, *s.batch_shape)
        return out

    # ------------------------------------------------------------------ deterministic sites
    def deterministic_values(self, values: dict, n: int) -> dict:
        """Values of the deterministic sites, ``{site: [n, *shape]}``, at ``n`` draws of
        the latent ``values`` (none when discrete latents are summed out)."""
        det = [s for s in self.structure.sites.values() if s.kind == "deterministic"]
        if not det or self.has_enumeration:
            return {}
        mode = self.batching
        if mode == "plate":
            tr = self.trace(values, n, enumerate_discrete=False)
            return {s.name: particle_dims_to_front(tr.nodes[s.name]["value"], n, len(s.shape)) for s in det}

        def one_draw(inputs):
            tr = self.trace_one(inputs["values"], inputs["given"], enumerate_discrete=False)
            return {s.name: tr.nodes[s.name]["value"].expand(s.shape) for s in det}

        return run_draws(one_draw, {"values": values, "given": self.given}, n, mode)

    def _observation_mask(self, node, site):
        """Which batch elements of an observed site are observations: not missing (NaN)
        and not masked out by ``poutine.mask`` / ``.mask()`` (padding). None = all."""
        keep = None
        if site.name in self.missing:
            keep = ~self.missing[site.name]
            if site.event_dim:
                keep = keep.reshape(*keep.shape[: keep.dim() - site.event_dim], -1).all(-1)
        masks = [node.get("mask")]
        fn = node["fn"]
        while hasattr(fn, "base_dist"):
            masks.append(getattr(fn, "_mask", None))
            fn = fn.base_dist
        for m in masks:
            if torch.is_tensor(m) and m.dtype == torch.bool:
                b = len(site.batch_shape)
                m = m.reshape(-1, *m.shape[-b:]) if b and m.dim() >= b else m.reshape(1, *m.shape)
                m = m[0].expand(site.batch_shape) if b else m.reshape(())
                keep = m if keep is None else keep & m
        if keep is not None and bool(keep.all()):
            return None
        return keep

    # ------------------------------------------------------------------ prior draws
    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact prior draws of the latents, in unconstrained space ``[n, D]``.
        Missing entries of observed sites are drawn from their prior predictive."""
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item()) if generator else None
        program = self.base_program or self.program
        imputed = {missing_site_name(name) for name in self.missing}
        names_shapes = {s.name: s.shape for s in self.sites if s.name not in imputed}
        names_shapes.update({name: tuple(mask.shape) for name, mask in self.missing.items()})
        with torch.random.fork_rng(devices=_rng_devices(generator)), torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            values, _ = sample_sites(program, self.args, self.kwargs, names_shapes, n,
                                     self.max_plate_nesting, self.structure.batching)
        for name, mask in self.missing.items():
            values[missing_site_name(name)] = values.pop(name)[:, mask]
        return self.unconstrain(values)


def _rng_devices(generator) -> list:
    """Devices whose RNG a seeded draw forks (CUDA when the generator lives there)."""
    if generator is not None and generator.device.type == "cuda":
        return [generator.device.index or 0]
    return []

"""A model's joint density as a batched function of a flat unconstrained vector.

:class:`JointDensity` packs a model's continuous latent sites into one flat vector
``z`` of shape ``[N, D]`` (N particles / chains / draws; D unconstrained coordinates),
and evaluates ``log p(z, observed)`` for all N at once by running the Pyro program a
single time inside a particle plate. Discrete latent sites are summed out exactly by
parallel enumeration (Pyro's ``poutine.enum`` + ``contract_to_tensor``).

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

from .handlers import SubstituteBatched, missing_site_name
from .sites import PARTICLE_PLATE, ModelStructure, is_model_site

VECTORIZE_HINT = (
    "genprog evaluates many draws at once inside a plate at dim {dim}; write the model so it "
    "broadcasts over extra leading batch dims (as Pyro's enumeration requires): index with "
    "pyro.ops.indexing.Vindex(x)[..., i] and use `...` rather than fixed leading dims"
)


def run_vectorized(program, args, kwargs, n: int, max_plate_nesting: int):
    """Trace ``program`` (already wrapped in the particle plate), turning shape errors
    into a ValueError that explains how to make a model vectorizable."""
    try:
        return poutine.trace(program).get_trace(*args, **kwargs)
    except (RuntimeError, IndexError, ValueError) as e:
        if isinstance(e, NotImplementedError):
            raise
        msg = str(e)
        if n > 1 and ("hape" in msg or "size" in msg or "index" in msg or "dimension" in msg) \
                and "Expected parameter" not in msg:
            raise ValueError(
                f"running the model for {n} draws at once failed ({type(e).__name__}: "
                f"{msg.splitlines()[0]}). " + VECTORIZE_HINT.format(dim=-(max_plate_nesting + 1))
            ) from e
        raise


def _site_log_prob(site) -> torch.Tensor:
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


def particle_dims_to_front(value: torch.Tensor, n: int, site_ndim: int) -> torch.Tensor:
    """Reshape a value traced under the particle plate to ``[n, *site_shape]``.

    ``value`` has shape ``[(n|1), 1, ..., 1, *site_shape]`` (singleton plate slots between);
    ``site_ndim`` is ``len(site_shape)``.
    """
    site_shape = value.shape[value.dim() - site_ndim:] if site_ndim else torch.Size()
    lead = value.shape[: value.dim() - site_ndim]
    lead_n = 1
    for s in lead:
        lead_n *= s
    if lead_n not in (1, n):
        raise RuntimeError(f"cannot align value of shape {tuple(value.shape)} to {n} particles")
    return value.reshape(lead_n, *site_shape).expand(n, *site_shape)


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
    """

    def __init__(self, program, args, kwargs, structure: ModelStructure, missing=None,
                 base_program=None):
        self.program = program
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
    def trace(self, values: dict, n: int, program=None, enumerate_discrete=True):
        """Run the program once for ``n`` particles with latent ``values`` substituted."""
        program = program or self.program
        k = self.max_plate_nesting
        prog = SubstituteBatched(values, k)(program)
        if enumerate_discrete and self.has_enumeration:
            prog = poutine.enum(config_enumerate(prog, default="parallel"),
                                first_available_dim=-(k + 2))

        def vectorized(*args, **kwargs):
            with pyro.plate(PARTICLE_PLATE, n, dim=-(k + 1)):
                return prog(*args, **kwargs)

        return run_vectorized(vectorized, self.args, self.kwargs, n, k)

    def _sum_to_particles(self, lp: torch.Tensor, n: int) -> torch.Tensor:
        k = self.max_plate_nesting
        if lp.dim() < k + 1:
            return lp.sum().expand(n)
        lp = lp.movedim(-(k + 1), 0)
        return lp.reshape(lp.shape[0], -1).sum(-1).expand(n)

    def _factor_terms(self, tr, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of continuous-latent log densities, sum of the rest), each ``[N]``; the
        rest (observed and discrete sites) has discrete latents summed out."""
        latent_names = {s.name for s in self.sites}
        if not self.has_enumeration:
            prior = lik = 0.0
            for name, site in tr.nodes.items():
                if not is_model_site(site):
                    continue
                lp = _site_log_prob(site)
                if name in self.missing:
                    # missing entries of an observed site are latent: their density
                    # p(y_missing | parents) belongs to the prior (which sample_prior draws)
                    drawn = self._missing_batch_elements(name)
                    prior = prior + self._sum_to_particles(lp * drawn.to(lp.dtype), n)
                    lik = lik + self._sum_to_particles(lp * (~drawn).to(lp.dtype), n)
                    continue
                term = self._sum_to_particles(lp, n)
                if name in latent_names:
                    prior = prior + term
                else:
                    lik = lik + term
            zero = torch.zeros(n, dtype=self._dtype(tr), device=self._device(tr))
            return zero + prior, zero + lik
        tr.compute_log_prob()
        tr.pack_tensors()
        particle = tr.plate_to_symbol[PARTICLE_PLATE]
        enum_symbols = set(tr.symbol_to_dim) - set(tr.plate_to_symbol.values())
        prior_terms, tree = [], OrderedDict()
        for name, site in tr.nodes.items():
            if not is_model_site(site):
                continue
            packed = site["packed"]["log_prob"]
            if name in latent_names and not (set(packed._pyro_dims) & enum_symbols):
                prior_terms.append(self._sum_to_particles(site["log_prob"], n))
                continue
            ordinal = frozenset(
                tr.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized
            )
            tree.setdefault(ordinal, []).append(packed)
        present = {d for terms in tree.values() for t in terms for d in t._pyro_dims}
        target = frozenset({particle}) & present  # a 1-particle dim is packed away
        lik = contract_to_tensor(tree, enum_symbols, target_ordinal=target)
        lik = lik.expand(n) if particle in lik._pyro_dims else lik.reshape(()).expand(n)
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

    # ------------------------------------------------------------------ densities
    def log_prior_and_likelihood(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log prior incl. log|J|, log likelihood)``, each ``[N]``, at ``z [N, D]``."""
        values, ladj = self.constrain(z)
        tr = self.trace(values, z.shape[0])
        prior, lik = self._factor_terms(tr, z.shape[0])
        return prior + ladj, lik

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        return self.log_prior_and_likelihood(z)[0]

    def log_likelihood(self, z: torch.Tensor) -> torch.Tensor:
        return self.log_prior_and_likelihood(z)[1]

    def log_joint(self, z: torch.Tensor, jacobian: bool = True) -> torch.Tensor:
        """``log p(z, observed)`` ``[N]``; with ``jacobian=False`` the density of the
        constrained values (whose mode is the MAP estimate)."""
        values, ladj = self.constrain(z)
        tr = self.trace(values, z.shape[0])
        prior, lik = self._factor_terms(tr, z.shape[0])
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
        tr = self.trace(values, n)
        by_name = self.structure.sites
        report = [by_name[name] for name in (sites or [s.name for s in self.structure.observed])]
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
                pointwise[site.name] = unpack(
                    contract_to_tensor(tree, enum_symbols, target_ordinal=target), tr.symbol_to_dim)
        out = {}
        for s in report:
            lp = pointwise[s.name]
            b = len(s.batch_shape)
            while lp.dim() < k + 1:
                lp = lp.unsqueeze(0)
            target_shape = (n,) + (1,) * (k - b) + tuple(s.batch_shape)
            lp = lp.expand(target_shape).reshape(n, *s.batch_shape)
            keep = self._observation_mask(tr.nodes[s.name], s)
            if keep is not None:
                lp = lp[:, keep]
            out[s.name] = lp
        return out

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
        k = self.max_plate_nesting

        def vectorized(*args, **kwargs):
            with pyro.plate(PARTICLE_PLATE, n, dim=-(k + 1)):
                return program(*args, **kwargs)

        with torch.random.fork_rng(devices=[]), torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            tr = run_vectorized(vectorized, self.args, self.kwargs, n, k)
        values = {}
        for s in self.sites:
            if s.name in tr.nodes:
                values[s.name] = particle_dims_to_front(tr.nodes[s.name]["value"], n, len(s.shape))
        for name, mask in self.missing.items():
            full = particle_dims_to_front(tr.nodes[name]["value"], n, mask.dim())
            values[missing_site_name(name)] = full[:, mask]
        return self.unconstrain(values)

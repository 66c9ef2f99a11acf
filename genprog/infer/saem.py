"""SAEM: maximum likelihood for mixed-effects models, random effects sampled per group.

A *mixed-effects density* is a conditioned Pyro program whose random effects are latent
sites inside a plate of groups (subjects): for population parameters ``theta`` (every
other continuous latent; their priors are ignored) and the random effects ``b_g`` of group
``g``, the complete-data log likelihood splits over groups,

.. math:: \\log p(y, b \\mid \\theta) = \\sum_g L_g(\\theta, b_g),

where ``L_g`` sums the log densities of every site inside the group plate (the random
effects' own distribution, the observations, factors). The marginal likelihood
``p(y | theta) = prod_g int exp L_g db_g`` is maximised by the stochastic approximation EM
algorithm (Delyon, Lavielle & Moulines 1999; Kuhn & Lavielle 2005), as in Monolix and
nlmixr2:

1. **Simulation.** Every group's random effects, in ``chains`` copies, advance by a few
   random-walk Metropolis steps whose per-group proposal (scale and covariance) adapts to
   the group's conditional distribution, then by one random-walk step per coordinate with
   its own adapted scale (Monolix's third kernel), and by independence steps from Gaussians
   fitted to the group's draws (a near-fit and a wide one, :data:`FITTED_PROPOSAL_INFLATION`);
   optionally one independence step from a population proposal. The coordinate steps keep a weakly identified random effect
   mixing (one whose conditional law is close to its population law, e.g. Q in a
   two-compartment model): the joint proposal's scale is set by the well-determined
   coordinates, and without them that effect's draws stick, their spread falls short of
   the conditional law's and its omega drifts towards zero. All groups and chains move in one tensor program (the Pyro program
   is traced once per step inside a particle plate of chains).
2. **Stochastic approximation.** Per-group score ``d L_g / d theta``, the complete-data
   Hessian and the conditional moments of ``b_g`` are averaged with step ``gamma_k``: 1
   during the exploration phase, ``1/k`` in the averaging phase.
3. **Maximisation.** Sites with a closed-form M-step (supplied by a hook, e.g. an Omega
   from the averaged second moments of the random effects, a residual SD from averaged
   squared residuals) take it; the others take a stochastic-approximation Newton step
   ``theta += gamma_k I^{-1} s_k`` (Gu & Kong 1998) with ``s_k`` the complete-data score
   and ``I`` the complete-data information (exploration) or Louis' observed information
   (averaging), on the sites' unconstrained scale.

At the estimate, ``-2 log L`` comes from importance sampling with a per-group Student-t
proposal fitted to the group's conditional mean and covariance (Monolix's IS, NONMEM's
IMP), with its Monte Carlo standard error; standard errors of ``theta`` from the
stochastic approximation of the observed Fisher information by Louis' formula,
``I = -sum_g (E[d2 L_g] + Var[d L_g])``.

The generic entry point is :func:`fit_saem` (``Model.fit("saem", random=[...])``); model
families with more structure (population PK) pass :class:`SaemHooks` to :func:`saem`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import pyro
import torch
from pyro.distributions.transforms import biject_to

from ..density import site_log_prob
from ..estimate import Estimate
from ..rng import seeded
from ..sites import is_model_site
from .record import InferenceRecord

# =========================================================================== the density


class MixedEffectsDensity:
    """Per-group complete-data log density of a conditioned program.

    Parameters
    ----------
    density : genprog.density.JointDensity
        The conditioned program's joint density (``Model.density()``).
    random : sequence of str
        Latent sites that are random effects; they must lie inside the group plate.
    group : str, optional
        The plate of groups (default: the one plate every random site lies in).
    reparam : callable, optional
        ``reparam(values, b) -> (sites, logdet)``: maps the sampler's coordinates ``b
        [C, G, D]`` and the population ``values`` (natural scale, by site) to the random
        sites' *unconstrained* values ``{site: [C, *unconstrained_shape]}`` and the log
        Jacobian ``log |d site / d b|`` per group ``[C, G]``. Default: ``b`` is the random
        sites' unconstrained values, flattened per group. A centring map (``eta = b -
        mu(theta)``, ``eta_raw = L^{-1} eta``) makes EM-type updates of typical values and
        variances fast where the model is written non-centred.
    dim : int, optional
        ``D`` of the sampler's coordinates when ``reparam`` is given.

    Attributes
    ----------
    names : list[str]
        Population sites, in program order.
    size : int
        ``K``, the number of unconstrained population coordinates.
    n_groups : int
        ``G``.
    dim : int
        ``D``, random-effect coordinates per group.
    """

    def __init__(self, density, random, group=None, reparam=None, dim=None):
        structure = density.structure
        self.density = density
        self.random = list(random)
        if not self.random:
            raise ValueError("SAEM: random=[...] must name at least one random-effect site")
        latent = {s.name: s for s in structure.latent_continuous}
        unknown = [r for r in self.random if r not in latent]
        if unknown:
            raise ValueError(f"SAEM: random effect site(s) {unknown} are not continuous latent sites; "
                             f"the model's are {sorted(latent)}")
        if structure.latent_discrete:
            raise ValueError("SAEM: discrete latent sites "
                             f"{[s.name for s in structure.latent_discrete]} are not supported")
        if density.missing:
            raise ValueError("SAEM: observations with NaN (missing) entries are not supported; "
                             "mask them out in the model instead")
        self.group, self.group_dim, self.n_groups = self._group_plate(structure, group)
        for s in structure.latent_continuous:
            inside = any(p[0] == self.group for p in s.plates)
            if s.name not in self.random and inside:
                raise ValueError(f"SAEM: latent site {s.name!r} lies inside the group plate "
                                 f"{self.group!r}; list it in random=[...]")
        outside = [s.name for s in structure.observed if not any(p[0] == self.group for p in s.plates)]
        if outside:
            raise ValueError(f"SAEM: observed site(s) {outside} lie outside the group plate "
                             f"{self.group!r}; groups must be independent given the population")
        self.sites = [latent[r] for r in self.random]
        self.population = [s for s in structure.latent_continuous if s.name not in self.random]
        self.names = [s.name for s in self.population]
        self.transforms = {s.name: biject_to(s.support) for s in structure.latent_continuous}
        self.shapes = {s.name: tuple(s.shape) for s in structure.latent_continuous}
        self.ushapes = {n: tuple(self.transforms[n].inverse_shape(torch.Size(sh)))
                        for n, sh in self.shapes.items()}
        self.sizes = {n: int(torch.Size(self.ushapes[n]).numel()) for n in self.names}
        self.size = sum(self.sizes.values())
        self.axes = {}
        per_group = 0
        for s in self.sites:
            axis = len(s.batch_shape) + self.group_dim
            if axis < 0 or s.shape[axis] != self.n_groups:
                raise ValueError(f"SAEM: random effect {s.name!r} (shape {s.shape}) does not span the "
                                 f"group plate {self.group!r} of size {self.n_groups}")
            self.axes[s.name] = axis
            per_group += int(torch.Size(self.ushapes[s.name]).numel()) // self.n_groups
        self.reparam = reparam
        self.dim = int(dim) if reparam is not None else per_group
        self.max_plate_nesting = density.max_plate_nesting

    def _group_plate(self, structure, group):
        shared = None
        for r in self.random:
            plates = {p[0]: (p[1], p[2]) for p in structure.sites[r].plates}
            shared = plates if shared is None else {k: v for k, v in shared.items() if k in plates}
        if group is not None:
            if group not in (shared or {}):
                raise ValueError(f"SAEM: group plate {group!r} is not a plate of every random effect "
                                 f"(shared plates: {sorted(shared or {})})")
            return group, *shared[group]
        if not shared:
            raise ValueError(f"SAEM: the random effects {self.random} share no plate; random effects "
                             "must be local latents inside a plate of groups")
        if len(shared) > 1:
            raise ValueError(f"SAEM: the random effects share several plates {sorted(shared)}; "
                             "choose the plate of groups with group=...")
        (name, (dim, size)), = shared.items()
        return name, dim, size

    # ------------------------------------------------------------------ population values
    def unpack(self, theta: torch.Tensor) -> dict:
        """``theta [K]`` (unconstrained) -> natural values ``{site: [*shape]}``."""
        out, start = {}, 0
        for n in self.names:
            k = self.sizes[n]
            out[n] = self.transforms[n](theta[start:start + k].reshape(self.ushapes[n]))
            start += k
        return out

    def pack(self, values: dict) -> torch.Tensor:
        """Natural values ``{site: [*shape]}`` -> ``theta [K]``."""
        parts = [self.transforms[n].inv(torch.as_tensor(values[n])).reshape(-1) for n in self.names]
        return torch.cat(parts) if parts else torch.zeros(0)

    def slices(self) -> dict:
        """Site -> slice of its coordinates in ``theta``."""
        out, start = {}, 0
        for n in self.names:
            out[n] = slice(start, start + self.sizes[n])
            start += self.sizes[n]
        return out

    # ------------------------------------------------------------------ random effects
    def to_sites(self, b: torch.Tensor) -> dict:
        """Default coordinates: ``b [C, G, D]`` -> unconstrained site values ``{site: [C, *ushape]}``."""
        C = b.shape[0]
        out, start = {}, 0
        for s in self.sites:
            ushape = list(self.ushapes[s.name])
            axis = self.axes[s.name]
            moved = [ushape[axis]] + ushape[:axis] + ushape[axis + 1:]
            k = int(torch.Size(moved[1:]).numel())
            u = b[..., start:start + k].reshape(C, *moved)
            out[s.name] = u.movedim(1, 1 + axis)
            start += k
        return out

    def from_sites(self, values: dict) -> torch.Tensor:
        """Unconstrained site values ``{site: [C, *ushape]}`` -> ``b [C, G, D]``."""
        parts = []
        for s in self.sites:
            u = values[s.name].movedim(1 + self.axes[s.name], 1)
            parts.append(u.reshape(u.shape[0], self.n_groups, -1))
        return torch.cat(parts, -1)

    def initial_b(self, theta: torch.Tensor, chains: int, generator: torch.Generator) -> torch.Tensor:
        """Default start ``[C, G, D]``: draws of the random sites from the program at the
        population values ``theta`` (zeros with a ``reparam``, whose coordinates the
        program cannot draw). The global RNG is forked, seeded from ``generator``."""
        if self.reparam is not None:
            return torch.zeros(chains, self.n_groups, self.dim, dtype=theta.dtype, device=theta.device)
        values = {k: v.expand(chains, *v.shape) for k, v in self.unpack(theta).items()}
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device))
        with seeded(seed), torch.no_grad():
            tr = self.density.trace(values, chains)
        usites = {}
        for s in self.sites:
            x = tr.nodes[s.name]["value"]
            x = x.reshape(-1, *s.shape).expand(chains, *s.shape) if x.dim() > len(s.shape) else \
                x.expand(chains, *s.shape)
            usites[s.name] = self.transforms[s.name].inv(x)
        return self.from_sites(usites).to(theta.dtype)

    # ------------------------------------------------------------------ densities
    def per_group(self, values: torch.Tensor, axis: int) -> torch.Tensor:
        """Sum a per-particle tensor ``[C, ...]`` over everything but the group ``axis`` -> ``[C, G]``."""
        v = values.movedim(axis, 1)
        return v.reshape(v.shape[0], v.shape[1], -1).sum(-1)

    def log_density(self, theta: torch.Tensor, b: torch.Tensor, return_trace: bool = False):
        """Complete-data log density per chain and group, ``L_g(theta, b_g)`` ``[C, G]``
        (with the log Jacobian of ``b``'s coordinates), at ``theta [K]`` and ``b [C, G, D]``.
        With ``return_trace`` also the Pyro trace (``[C, ...]`` particles)."""
        C = b.shape[0]
        values = self.unpack(theta)
        if self.reparam is not None:
            usites, logdet = self.reparam(values, b)
        else:
            usites, logdet = self.to_sites(b), b.new_zeros(C, self.n_groups)
        site_values = {k: v.expand(C, *v.shape) for k, v in values.items()}
        for s in self.sites:
            u = usites[s.name]
            t = self.transforms[s.name]
            x = t(u)
            site_values[s.name] = x
            lj = t.log_abs_det_jacobian(u, x)
            if lj.dim() > 1:
                logdet = logdet + self.per_group(lj, 1 + self.axes[s.name])
        tr = self.density.trace(site_values, C)
        lp = logdet
        k = self.max_plate_nesting
        for node in tr.nodes.values():
            if not is_model_site(node) or not any(
                    f.vectorized and f.name == self.group for f in node["cond_indep_stack"]):
                continue
            term = site_log_prob(node)
            while term.dim() < k + 1:
                term = term.unsqueeze(0)
            term = term.expand(C, *term.shape[1:])
            lp = lp + self.per_group(term, term.dim() + self.group_dim)
        return (lp, tr) if return_trace else lp


# =========================================================================== hooks


class SaemHooks:
    """Model-specific help for :func:`saem`; every method is optional (this base class
    does nothing).

    Attributes
    ----------
    closed_form_sites : tuple[str, ...]
        Population sites whose M-step :meth:`closed_form` supplies (excluded from the
        Newton step).
    """

    closed_form_sites: tuple = ()

    def initial_b(self, values: dict):
        """Starting random effects ``[G, D]`` for population ``values`` (None: zeros)."""
        return None

    def statistics(self, values: dict, b: torch.Tensor, trace) -> dict:
        """Sufficient statistics of one simulation, each ``[C, ...]`` (averaged over the
        chains and stochastically approximated by :func:`saem`)."""
        return {}

    def closed_form(self, stats: dict, moments: tuple, values: dict, iteration: int) -> dict:
        """Natural values of :attr:`closed_form_sites` from the approximated ``stats``,
        the conditional ``moments = (mean [G, D], second moment [G, D, D])`` of ``b``, the
        current ``values`` (other sites already updated) and the iteration number."""
        return {}

    def population_proposal(self, values: dict):
        """``(mean [G, D], scale_tril [D, D])`` of an independence proposal (the random
        effects' population distribution), or None."""
        return None


# =========================================================================== the record


@dataclass(frozen=True)
class SaemResult:
    """Result of :func:`saem`.

    Attributes
    ----------
    estimates : dict[str, Tensor]
        Population parameters on their natural scale, by site.
    theta : Tensor [K]
        The estimate on the unconstrained scale (the sites' support transforms).
    names : tuple[str, ...]
        Population sites, in the order of ``theta``.
    covariance : Tensor [K, K] or None
        Inverse of the observed information (Louis' formula, stochastically approximated)
        of ``theta``; None when it is not positive definite.
    stderr : dict[str, Tensor]
        Standard errors of the natural-scale estimates (delta method), by site; NaN where
        ``covariance`` is None.
    log_likelihood : Estimate
        ``log p(y | theta)`` by importance sampling, with its Monte Carlo standard error.
    minus2ll, minus2ll_stderr : float
        ``-2 log_likelihood`` and its standard error.
    trace : dict[str, Tensor]
        Each site's natural value after every iteration, ``[iterations, *shape]``.
    conditional_mean : Tensor [G, D]
        Conditional means of the random effects (sampler coordinates) at the estimate.
    conditional_cov : Tensor [G, D, D]
        Their conditional covariances.
    acceptance_rate : Tensor [G]
        Random-walk acceptance rate per group over the averaging phase.
    iterations : tuple[int, int]
        Exploration and averaging iterations.
    chains : int
        Markov chains per group.
    seed : int
    timings : dict[str, float]
        Seconds in ``"simulation"``, ``"m_step"``, ``"importance_sampling"``, ``"total"``.
    information : Tensor [K, K]
        The approximated observed information.
    """

    estimates: dict
    theta: torch.Tensor
    names: tuple
    covariance: object
    stderr: dict
    log_likelihood: Estimate
    minus2ll: float
    minus2ll_stderr: float
    trace: dict
    conditional_mean: torch.Tensor
    conditional_cov: torch.Tensor
    acceptance_rate: torch.Tensor
    iterations: tuple
    chains: int
    seed: int
    timings: dict = field(default_factory=dict)
    information: object = None


# =========================================================================== sharding


@dataclass(frozen=True)
class GroupShard:
    """This process's block of the groups when the groups are split over processes
    (subject-sharded SAEM, :mod:`genprog.pk.distributed`).

    Every process draws the random numbers of *all* ``total`` groups from the same seeded
    generator and keeps its rows ``start:stop``, so each group's draws do not depend on how
    the groups are split; everything :func:`saem` sums over groups (the M-step's value,
    gradient and Hessian, the sufficient statistics, Louis' information, the
    importance-sampling log likelihood) is passed through ``reduce`` before it is used, so
    every process takes the same steps.

    Attributes
    ----------
    start, stop : int
        This process's groups are rows ``start:stop`` of the whole ``[total, ...]``.
    total : int
        ``G``, the groups of all processes.
    reduce : callable
        ``reduce(x: Tensor) -> Tensor`` (any shape): the sum of ``x`` over the processes,
        identical on every process (e.g. :func:`genprog.pk.distributed.reduce_sum`).
    """

    start: int
    stop: int
    total: int
    reduce: object

    def __post_init__(self):
        if not (0 <= self.start <= self.stop <= self.total):
            raise ValueError(f"GroupShard: need 0 <= start <= stop <= total, got "
                             f"{self.start}, {self.stop}, {self.total}")


def _identity(x):
    return x


def _draw(kind, shape, gen, dtype, device, shard, axis=1, **kw):
    """``torch.randn`` / ``torch.rand`` of ``shape`` whose group ``axis`` holds this
    process's groups: the rows ``shard.start:shard.stop`` of the draw for all groups."""
    f = torch.randn if kind == "normal" else torch.rand
    if shard is None:
        return f(shape, generator=gen, dtype=dtype, device=device)
    full = list(shape)
    full[axis] = shard.total
    return f(full, generator=gen, dtype=dtype, device=device).narrow(axis, shard.start, shard.stop - shard.start)


# =========================================================================== pieces


def _safe_log_density(md: MixedEffectsDensity, theta, b):
    """``L [C, G]`` with non-finite entries (and rejected parameters) as ``-inf``."""
    try:
        lp = md.log_density(theta, b)
    except ValueError as e:
        if "Expected parameter" not in str(e) and "constraint" not in str(e):
            raise
        return b.new_full(b.shape[:2], float("-inf"))
    return torch.where(torch.isfinite(lp), lp, torch.full_like(lp, float("-inf")))


def _rw_step(md, theta, b, lp, scale, chol, gen, shard=None):
    """One random-walk Metropolis step of every chain and group; ``scale [G]``,
    ``chol [G, D, D]``. Returns ``(b, lp, accepted [C, G])``."""
    z = _draw("normal", b.shape, gen, b.dtype, b.device, shard)
    prop = b + scale[None, :, None] * (chol[None] @ z[..., None]).squeeze(-1)
    lp_prop = _safe_log_density(md, theta, prop)
    u = _draw("uniform", lp.shape, gen, b.dtype, b.device, shard)
    accept = torch.log(u) < lp_prop - lp
    return torch.where(accept[..., None], prop, b), torch.where(accept, lp_prop, lp), accept


#: Scales of the Gaussian independence proposals fitted to each group's draws (times the
#: draws' Cholesky factor): a near-fit one (most accepted moves where the conditional law is
#: close to Gaussian) and a wide one. The draws of a weakly identified random effect on a
#: ridge with another (Q and V2 of a two-compartment model) under-spread the conditional
#: law, so the near-fit proposal alone keeps them too close and their omega drifts down
#: (oral2 validation design: omega_Q -47% with 1.2 alone, +6% with 2.5 too, IS -2LL 5.8
#: points lower, at FOCE-I's optimum).
FITTED_PROPOSAL_INFLATION = (1.2, 2.5)


def _coordinate_steps(md, theta, b, lp, scale, gen, shard=None):
    """One random-walk Metropolis step per coordinate ``d`` of ``b [C, G, D]``, in turn, with
    per-group, per-coordinate scales ``scale [G, D]``. Returns ``(b, lp, acceptance [G,
    D])`` (acceptance averaged over the chains)."""
    acceptance = torch.zeros_like(scale)
    for d in range(b.shape[-1]):
        z = _draw("normal", b.shape[:-1], gen, b.dtype, b.device, shard)
        prop = b.clone()
        prop[..., d] = prop[..., d] + scale[None, :, d] * z
        lp_prop = _safe_log_density(md, theta, prop)
        u = _draw("uniform", lp.shape, gen, b.dtype, b.device, shard)
        accept = torch.log(u) < lp_prop - lp
        b, lp = torch.where(accept[..., None], prop, b), torch.where(accept, lp_prop, lp)
        acceptance[:, d] = accept.to(b.dtype).mean(0)
    return b, lp, acceptance


def _independence_step(md, theta, b, lp, mean, tril, gen, shard=None):
    """One independence Metropolis step from ``N(mean [G, D], tril tril^T)``, with
    ``tril`` ``[D, D]`` (shared) or ``[G, D, D]`` (per group)."""
    tril = tril.expand(mean.shape[0], *tril.shape[-2:])
    z = _draw("normal", b.shape, gen, b.dtype, b.device, shard)
    prop = mean[None] + (tril[None] @ z[..., None]).squeeze(-1)
    lp_prop = _safe_log_density(md, theta, prop)

    def log_q(x):
        w = torch.linalg.solve_triangular(tril[None], (x - mean[None]).unsqueeze(-1), upper=False).squeeze(-1)
        return -0.5 * (w ** 2).sum(-1) - torch.log(tril.diagonal(dim1=-2, dim2=-1)).sum(-1)[None]

    u = _draw("uniform", lp.shape, gen, b.dtype, b.device, shard)
    accept = torch.log(u) < lp_prop - lp + log_q(b) - log_q(prop)
    return torch.where(accept[..., None], prop, b), torch.where(accept, lp_prop, lp)


def _derivatives(md, theta, b, idx):
    """For the coordinates ``idx`` (``k`` of them): per-chain, per-group scores ``d L_cg /
    d theta_idx`` ``[C, G, k]`` and the Hessian block of ``sum_cg L_cg`` ``[k, k]``; also
    ``L [C, G]`` and the trace. ``k`` double-backward passes (the per-group Jacobian
    through a linear dummy ``u``, the Hessian rows with it)."""
    with torch.enable_grad():
        th = theta.detach().requires_grad_(True)
        lp, tr = md.log_density(th, b, return_trace=True)
        u = torch.ones_like(lp, requires_grad=True)
        s, = torch.autograd.grad((lp * u).sum(), th, create_graph=True)
        cols, rows = [], []
        for j in idx:
            du, dth = torch.autograd.grad(s[j], (u, th), retain_graph=True, allow_unused=True)
            cols.append(torch.zeros_like(lp) if du is None else du)
            rows.append(torch.zeros_like(th) if dth is None else dth)
    scores = torch.stack(cols, -1) if idx else lp.new_zeros(*lp.shape, 0)
    hess = torch.stack(rows)[:, idx] if idx else lp.new_zeros(0, 0)
    return scores.detach(), 0.5 * (hess + hess.T).detach(), lp.detach(), tr


def _value_grad_hess(md, theta, b, idx, reduce=None):
    """``sum_cg L_cg / C``, its gradient ``[k]`` and Hessian ``[k, k]`` in the coordinates
    ``idx`` of ``theta`` (summed over processes by ``reduce``, one collective)."""
    C = b.shape[0]
    with torch.enable_grad():
        th = theta.detach().requires_grad_(True)
        q = md.log_density(th, b).sum() / C
        g, = torch.autograd.grad(q, th, create_graph=True)
        rows = [torch.autograd.grad(g[j], th, retain_graph=True, allow_unused=True)[0] for j in idx]
    H = torch.stack([torch.zeros_like(th) if r is None else r for r in rows])[:, idx]
    q, g = q.detach(), g.detach()[idx]
    if reduce is not None:
        k = len(idx)
        total = reduce(torch.cat([q.reshape(1), g, H.detach().reshape(-1)])).to(q.dtype)
        q, g, H = total[0], total[1:1 + k], total[1 + k:].reshape(k, k)
    return q, g, 0.5 * (H + H.T).detach()


def _newton_m_step(md, theta, b, free, max_step, iters, reduce=None):
    """Maximise the complete-data log likelihood of the current draws ``b`` over the
    ``free`` coordinates (BoolTensor ``[K]``): up to ``iters`` Newton steps (Hessian made
    positive definite, steps clipped to ``max_step``, halved while the objective falls),
    the whole move clipped to ``max_step``. One Newton step overshoots where the objective
    is far from quadratic (a scale far above its estimate, on the log scale), and a
    variance that overshoots towards 0 recovers only at EM's slow rate."""
    idx = [i for i in range(theta.numel()) if bool(free[i])]
    start = theta
    for _ in range(iters):
        q, g, H = _value_grad_hess(md, theta, b, idx, reduce)
        q = float(q)
        if not (bool(torch.isfinite(g).all()) and bool(torch.isfinite(H).all())):
            break
        step = torch.linalg.solve(_positive_definite(-H), g)
        step = step * min(1.0, max_step / float(step.abs().max().clamp_min(1e-300)))
        for _ in range(4):
            cand = theta.clone()
            cand[free] = cand[free] + step
            q_cand = _safe_log_density(md, cand, b).sum()
            q_cand = float(q_cand if reduce is None else reduce(q_cand.reshape(1))[0]) / b.shape[0]
            if math.isfinite(q_cand) and q_cand >= q - 1e-9 * abs(q):
                break
            step = step / 2
        else:
            break
        theta, q = cand, q_cand
        if float(step.abs().max()) < 1e-4:
            break
    delta = theta - start  # a trust region for the whole M-step
    return start + delta * min(1.0, max_step / float(delta.abs().max().clamp_min(1e-300)))


def _positive_definite(A: torch.Tensor, floor: float = 1e-8) -> torch.Tensor:
    """``A`` with its eigenvalues replaced by their absolute values, floored relative to
    the largest (a safe Newton preconditioner)."""
    if A.numel() == 0:
        return A
    w, V = torch.linalg.eigh(0.5 * (A + A.T))
    w = w.abs().clamp_min(floor * float(w.abs().max().clamp_min(1e-300)))
    return (V * w) @ V.T


def _sa(old, new, gamma):
    return new if old is None else old + gamma * (new - old)


# =========================================================================== the algorithm


#: exploration iterations at whose end the averaging phase's Newton preconditioner (Louis'
#: information of the free coordinates) starts accumulating: one iteration's chains
#: estimate ``Var[d L_g]`` poorly
INFO_WARMUP = 20

#: importance sampling at the estimate evaluates at most this many (draw, group) pairs per
#: pass: 250 draws per pass up to 4,000 groups, fewer above (10 at 10^5 groups)
IS_GROUP_DRAWS_PER_PASS = 1_000_000


def saem(md: MixedEffectsDensity, theta0: torch.Tensor, *, hooks: SaemHooks | None = None,
         exploration: int = 300, averaging: int = 200, chains: int | None = None,
         mh_steps: int = 3, max_step: float = 1.0, importance_draws: int = 2000,
         importance_df: float = 5.0, seed: int = 0, b0: torch.Tensor | None = None,
         standard_errors: bool = True, newton_iters: int = 5, burn_in: int = 5,
         conditional_draws: int = 50, shard: GroupShard | None = None) -> SaemResult:
    """Maximum likelihood by SAEM (see the module docstring).

    Parameters
    ----------
    md : MixedEffectsDensity
    theta0 : Tensor [K]
        Starting population parameters, unconstrained.
    hooks : SaemHooks, optional
        Closed-form M-steps, starting random effects, an independence proposal.
    exploration, averaging : int
        Iterations with step 1 (exploration) and with step ``1/k`` (averaging).
    chains : int, optional
        Markov chains per group (default ``ceil(50 / G)``, at least 1, as Monolix).
    mh_steps : int
        Random-walk Metropolis steps per iteration.
    max_step : float
        Largest change of an unconstrained coordinate per Newton step.
    importance_draws : int
        Draws per group for the importance-sampling log likelihood (0: skip, NaN).
    importance_df : float
        Degrees of freedom of the Student-t proposal.
    seed : int
        Seed of a private ``torch.Generator`` (the global RNG is not touched).
    b0 : Tensor [G, D], optional
        Starting random effects (default: the hook's, else zeros).
    newton_iters : int
        Newton iterations of the exploration phase's M-step (sites without a closed form);
        the M-step moves no unconstrained coordinate by more than ``max_step``.
    burn_in : int
        Iterations of simulation at ``theta0`` before the first M-step (as Monolix).
    conditional_draws : int
        Sweeps at the estimate for the conditional means and covariances of the random
        effects (recorded, and the centres of the importance-sampling proposals; 0: use
        the averages of the averaging phase).
    standard_errors : bool
        Approximate the observed information (Louis) during the averaging phase. When
        every site has a closed-form M-step and this is False, no derivatives are taken.
    shard : GroupShard, optional
        ``md`` holds groups ``shard.start:shard.stop`` of ``shard.total`` (its density is
        the whole model's restricted to them; call :func:`saem` on every process with the
        same arguments but ``md``, ``b0`` and ``shard``). Random numbers are drawn for all
        groups and each process keeps its rows; sums over groups go through
        ``shard.reduce``; ``hooks`` must reduce their own sums (their ``statistics`` are
        summed here). With the same ``seed`` the estimates equal those of one process
        holding every group up to the rounding of the partial sums (about ``1e-15``
        relative per iteration). The default ``chains`` counts all groups.

    Returns
    -------
    SaemResult
        With ``shard``: ``conditional_mean``, ``conditional_cov`` and ``acceptance_rate``
        are this process's groups' (``[stop - start, ...]``); everything else is the
        same on every process.
    """
    t_start = time.perf_counter()
    hooks = hooks or SaemHooks()
    dtype = theta0.dtype
    gen = torch.Generator(device=theta0.device).manual_seed(int(seed))
    G, D, K = md.n_groups, md.dim, md.size
    if shard is not None and shard.stop - shard.start != G:
        raise ValueError(f"saem: the shard holds groups {shard.start}:{shard.stop} but the density "
                         f"has {G} groups")
    reduce = shard.reduce if shard is not None else None
    C = int(chains) if chains is not None else max(1, math.ceil(50 / (shard.total if shard else G)))
    theta = theta0.detach().clone()
    values = md.unpack(theta)
    if b0 is None:
        b0 = hooks.initial_b(values)
    if b0 is None and shard is not None and md.reparam is None:
        raise ValueError("saem: with shard=..., pass b0 or hooks with initial_b (the default start "
                         "draws every group from one program run, which depends on the split)")
    b = md.initial_b(theta, C, gen) if b0 is None else b0.to(dtype)[None].expand(C, G, D).clone()
    b0 = b.mean(0)
    slices = md.slices()
    closed = [n for n in hooks.closed_form_sites if n in slices]
    dev = theta0.device
    free = torch.ones(K, dtype=torch.bool, device=dev)
    for n in closed:
        free[slices[n]] = False
    scale = torch.full((G,), 2.38 / math.sqrt(max(D, 1)) * 0.5, dtype=dtype, device=dev)
    eye = torch.eye(D, dtype=dtype, device=dev)
    chol = eye.expand(G, D, D).clone()
    coordinate_scale = torch.full((G, D), 0.3, dtype=dtype, device=dev)
    prop_m1 = b0.clone()
    prop_m2 = (b[..., :, None] * b[..., None, :]).mean(0) + 0.1 * eye
    stats = {}
    m1 = m2 = A = B = Dg = A_e = B_e = D_e = None
    acc_sum = torch.zeros(G, dtype=dtype, device=dev)
    acc_n = 0
    trace = {n: [] for n in md.names}
    t_sim = t_m = 0.0
    lp = _safe_log_density(md, theta, b)
    total = exploration + averaging
    fitted_after = min(20, exploration // 2)
    # with a closed-form M-step for every site, derivatives serve the information only:
    # about 50 evaluations over the averaging phase suffice
    info_every = max(1, averaging // 50)
    n_info = n_pre = 0
    all_idx = list(range(K))
    free_idx = [i for i in all_idx if bool(free[i])]
    with pyro.validation_enabled(False):
        for k in range(-burn_in, total):  # k < 0: burn-in, simulation at theta0 only
            phase2 = k >= exploration
            gamma = 1.0 / (k - exploration + 1) if phase2 else 1.0
            # ---------------------------------------------------------- simulation
            t0 = time.perf_counter()
            lp = _safe_log_density(md, theta, b)  # theta changed: refresh
            proposal = hooks.population_proposal(values)
            if proposal is not None:
                b, lp = _independence_step(md, theta, b, lp, proposal[0], proposal[1], gen, shard)
            if k >= fitted_after:
                # independence steps from Gaussians fitted to each group's draws so far:
                # nearly independent draws where the conditional law is close to Gaussian
                for inflation in FITTED_PROPOSAL_INFLATION:
                    b, lp = _independence_step(md, theta, b, lp, prop_m1, inflation * chol, gen, shard)
            acc = torch.zeros(G, dtype=dtype, device=dev)
            for _ in range(mh_steps):
                b, lp, accepted = _rw_step(md, theta, b, lp, scale, chol, gen, shard)
                acc = acc + accepted.to(dtype).mean(0)
            acc = acc / mh_steps
            b, lp, coordinate_acc = _coordinate_steps(md, theta, b, lp, coordinate_scale, gen, shard)
            # adapt the per-group proposal: scale toward 30% acceptance, shape to the draws;
            # each coordinate's scale toward 40% (the optimum for one dimension)
            rate = 0.5 if not phase2 else 0.5 / math.sqrt(k - exploration + 1)
            scale = scale * torch.exp(rate * (acc - 0.3))
            coordinate_scale = coordinate_scale * torch.exp(rate * (coordinate_acc - 0.4))
            w = 0.1 if not phase2 else 1.0 / (k - exploration + 10)
            prop_m1 = prop_m1 + w * (b.mean(0) - prop_m1)
            prop_m2 = prop_m2 + w * ((b[..., :, None] * b[..., None, :]).mean(0) - prop_m2)
            cov = prop_m2 - prop_m1[..., :, None] * prop_m1[..., None, :]
            cov = 0.5 * (cov + cov.transpose(-1, -2)) + 1e-8 * eye
            L, bad = torch.linalg.cholesky_ex(cov)
            chol = torch.where((bad == 0)[:, None, None], L, chol)
            if phase2:
                acc_sum += acc
                acc_n += 1
            t_sim += time.perf_counter() - t0
            if k < 0:
                continue
            # ---------------------------------------------------------- stochastic approximation
            t0 = time.perf_counter()
            m1 = _sa(m1, b.mean(0), gamma)
            m2 = _sa(m2, (b[..., :, None] * b[..., None, :]).mean(0), gamma)
            info_now = phase2 and standard_errors and (k - exploration) % info_every == 0
            # derivatives: every coordinate when the information is accumulated (for the
            # standard errors), the free ones for an averaging-phase Newton step, none else
            warm = k >= exploration - INFO_WARMUP  # the preconditioner's average starts
            idx = all_idx if info_now else (free_idx if warm and len(free_idx) else None)
            if idx is None:
                with torch.no_grad():
                    lp, tr = md.log_density(theta, b, return_trace=True)
            else:
                scores, hess, lp, tr = _derivatives(md, theta, b, idx)
                pos = [idx.index(i) for i in free_idx]
                sf = scores[..., pos]
                outer = torch.einsum("cgk,cgl->kl", scores, scores) / C
                outer_f = torch.einsum("cgk,cgl->kl", sf, sf) / C
                s_now = sf.sum((0, 1)) / C
                bad = not (bool(torch.isfinite(scores).all()) and bool(torch.isfinite(hess).all()))
                if reduce is not None:  # one collective: the sums over every process's groups
                    k_, f_ = len(idx), len(pos)
                    parts = [torch.tensor([float(bad)], dtype=dtype, device=dev), hess.reshape(-1),
                             outer.reshape(-1), outer_f.reshape(-1), s_now]
                    total = reduce(torch.cat(parts)).to(dtype)
                    bad = float(total[0]) > 0
                    hess, outer, outer_f, s_now = (p_.reshape(q_.shape) for p_, q_ in zip(
                        torch.split(total[1:], [k_ * k_, k_ * k_, f_ * f_, f_]), parts[1:]))
                    hess, outer = hess.reshape(k_, k_), outer.reshape(k_, k_)
                    outer_f = outer_f.reshape(f_, f_)
                if bad:
                    # a draw where the density is not differentiable: skip this update
                    for n in md.names:
                        trace[n].append(values[n].detach().clone())
                    t_m += time.perf_counter() - t0
                    continue
            if info_now:
                n_info += 1
                Dg = _sa(Dg, scores.mean(0), 1.0 / n_info)
                A = _sa(A, hess / C, 1.0 / n_info)
                B = _sa(B, outer, 1.0 / n_info)
            if idx is not None and len(free_idx):
                # the Newton preconditioner: the information of the free coordinates
                hf = hess[pos][:, pos]
                n_pre += 1  # a plain average from the last INFO_WARMUP exploration iterations on
                A_e = _sa(A_e, hf / C, 1.0 / n_pre)
                B_e = _sa(B_e, outer_f, 1.0 / n_pre)
                D_e = _sa(D_e, sf.mean(0), 1.0 / n_pre)
            # hooks' statistics are sums over groups: summed over the processes too
            new_stats = {key: v.detach().mean(0) for key, v in hooks.statistics(values, b, tr).items()}
            if reduce is not None:
                new_stats = {key: reduce(v).to(v.dtype) for key, v in new_stats.items()}
            stats = {key: _sa(stats.get(key), v, gamma) for key, v in new_stats.items()}
            # ---------------------------------------------------------- maximisation
            if len(free_idx) and not phase2:
                # exploration (step 1): the M-step of the current draws, solved by Newton
                theta = _newton_m_step(md, theta, b, free, max_step, newton_iters, reduce)
                values = md.unpack(theta)
            elif len(free_idx):
                # averaging: one stochastic-approximation Newton step, preconditioned by
                # Louis' observed information (the complete-data one where that is not
                # positive definite)
                info = -(A_e + B_e - (reduce or _identity)(D_e.T @ D_e))
                if int(torch.linalg.cholesky_ex(info)[1]) != 0:
                    info = -A_e
                step = torch.linalg.solve(_positive_definite(info, 1e-3), s_now)
                # the trust region applies to the Newton step itself, before the gain: a
                # near-singular information late in the averaging phase moves theta by at
                # most gamma * max_step
                step = gamma * step * min(1.0, max_step / float(step.abs().max().clamp_min(1e-300)))
                theta = theta.clone()
                theta[free] = theta[free] + step
                values = md.unpack(theta)
            if closed:
                new = hooks.closed_form(stats, (m1, m2), values, k)
                values = {**values, **{n: torch.as_tensor(v, dtype=dtype) for n, v in new.items()}}
                theta = md.pack(values).to(dtype)
                values = md.unpack(theta)
            for n in md.names:
                trace[n].append(values[n].detach().clone())
            t_m += time.perf_counter() - t0
    # ---------------------------------------------------------- at the estimate
    covariance = information = None
    if A is not None:
        information = -(A + B - (reduce or _identity)(Dg.T @ Dg))
        information = 0.5 * (information + information.T)
        chol_i, bad = torch.linalg.cholesky_ex(information)
        if int(bad) == 0 and bool(torch.isfinite(information).all()):
            covariance = torch.cholesky_inverse(chol_i)
    stderr = _natural_stderr(md, theta, covariance)
    t0 = time.perf_counter()
    if conditional_draws:
        # the conditional distributions at the estimate itself (the averages above follow
        # a moving theta): they centre the importance-sampling proposals
        with pyro.validation_enabled(False):
            m1, m2 = _conditional_moments(md, theta, b, hooks.population_proposal(values),
                                          prop_m1, chol, scale, mh_steps, conditional_draws, gen,
                                          shard, coordinate_scale)
    cond_cov = m2 - m1[..., :, None] * m1[..., None, :]
    cond_cov = 0.5 * (cond_cov + cond_cov.transpose(-1, -2))
    t_sim += time.perf_counter() - t0
    t0 = time.perf_counter()
    if importance_draws:
        with pyro.validation_enabled(False):
            # draws per pass bounded so that a pass holds at most 10^6 group-draws (memory
            # [pass, G, T, ...] on large populations; by all groups, so shards agree)
            batch = max(1, min(250, IS_GROUP_DRAWS_PER_PASS // (shard.total if shard is not None else G)))
            ll = importance_log_likelihood(md, theta, m1, cond_cov, draws=importance_draws,
                                           df=importance_df, generator=gen, batch=batch, shard=shard)
    else:
        ll = Estimate(float("nan"), float("nan"), "is")
    t_is = time.perf_counter() - t0
    return SaemResult(
        estimates={k: v.detach() for k, v in md.unpack(theta).items()}, theta=theta.detach(),
        names=tuple(md.names), covariance=covariance, stderr=stderr, log_likelihood=ll,
        minus2ll=-2 * ll.value, minus2ll_stderr=2 * ll.stderr,
        trace={n: torch.stack(v) for n, v in trace.items()},
        conditional_mean=m1, conditional_cov=cond_cov,
        acceptance_rate=acc_sum / max(acc_n, 1), iterations=(exploration, averaging), chains=C,
        seed=int(seed),
        timings={"simulation": t_sim, "m_step": t_m, "importance_sampling": t_is,
                 "total": time.perf_counter() - t_start},
        information=information)


def _conditional_moments(md, theta, b, proposal, fitted_mean, chol, scale, mh_steps, iterations, gen,
                         shard=None, coordinate_scale=None):
    """Mean ``[G, D]`` and second moment ``[G, D, D]`` of the random effects given the data
    at ``theta``, from ``iterations`` further sweeps of every chain (no adaptation)."""
    lp = _safe_log_density(md, theta, b)
    s1 = torch.zeros_like(b[0])
    s2 = torch.zeros(*b.shape[1:], b.shape[-1], dtype=b.dtype, device=b.device)
    for _ in range(iterations):
        if proposal is not None:
            b, lp = _independence_step(md, theta, b, lp, proposal[0], proposal[1], gen, shard)
        for inflation in FITTED_PROPOSAL_INFLATION:
            b, lp = _independence_step(md, theta, b, lp, fitted_mean, inflation * chol, gen, shard)
        for _ in range(mh_steps):
            b, lp, _ = _rw_step(md, theta, b, lp, scale, chol, gen, shard)
        if coordinate_scale is not None:
            b, lp, _ = _coordinate_steps(md, theta, b, lp, coordinate_scale, gen, shard)
        s1 = s1 + b.mean(0)
        s2 = s2 + (b[..., :, None] * b[..., None, :]).mean(0)
    return s1 / iterations, s2 / iterations


def _natural_stderr(md, theta, covariance) -> dict:
    """Delta-method standard errors of the natural-scale values, by site."""
    if covariance is None:
        return {n: torch.full(md.shapes[n], float("nan"), dtype=theta.dtype, device=theta.device)
                for n in md.names}
    J = torch.autograd.functional.jacobian(
        lambda t: torch.cat([v.reshape(-1) for v in md.unpack(t).values()]), theta)
    var = torch.einsum("ik,kl,il->i", J, covariance, J).clamp_min(0)
    out, start = {}, 0
    for n in md.names:
        k = int(torch.Size(md.shapes[n]).numel())
        out[n] = var[start:start + k].sqrt().reshape(md.shapes[n])
        start += k
    return out


# =========================================================================== importance sampling


def importance_log_likelihood(md: MixedEffectsDensity, theta: torch.Tensor, mean: torch.Tensor,
                              cov: torch.Tensor, *, draws: int = 2000, df: float = 5.0,
                              generator: torch.Generator | None = None, batch: int = 250,
                              inflate: float = 1.2, shard: GroupShard | None = None) -> Estimate:
    """``log p(y | theta)`` by importance sampling, one Student-t proposal per group.

    Parameters
    ----------
    md : MixedEffectsDensity
    theta : Tensor [K]
    mean, cov : Tensor [G, D], [G, D, D]
        Conditional mean and covariance of each group's random effects (e.g. from SAEM's
        draws); the proposal is ``t_df(mean, inflate^2 cov)``.
    draws : int
        Draws per group.
    df : float
        Degrees of freedom of the proposal.
    generator : torch.Generator, optional
    batch : int
        Draws evaluated per pass (memory).
    inflate : float
        Proposal scale relative to the conditional SD (> 1 keeps the tails covered).
    shard : GroupShard, optional
        ``md``, ``mean`` and ``cov`` hold groups ``start:stop`` of ``total``: the draws
        of all groups are made and this process's rows kept; the value and variance are
        summed over the processes (the same on every process).

    Returns
    -------
    Estimate
        ``value`` in nats; ``stderr`` from the per-group weight variances (delta method);
        ``details``: per-group estimates ``"per_group" [G]`` and effective sample sizes
        ``"ess" [G]`` (this process's groups with ``shard``).
    """
    start = time.perf_counter()
    G, D = mean.shape
    dtype = mean.dtype
    gen = generator or torch.Generator(device=mean.device).manual_seed(0)
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    eye = torch.eye(D, dtype=dtype, device=mean.device)
    ridge = 1e-10 * (cov.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12))[:, None, None]
    L = torch.linalg.cholesky(cov * inflate ** 2 + ridge * eye)
    logw = []
    with torch.no_grad():
        for lo in range(0, draws, batch):
            n = min(batch, draws - lo)
            z = _draw("normal", (n, G, D), gen, dtype, mean.device, shard)
            Gg = G if shard is None else shard.total
            chi2 = torch._standard_gamma(torch.full((n, Gg), df / 2, dtype=dtype, device=mean.device),
                                         generator=gen) * 2.0
            if shard is not None:
                chi2 = chi2[:, shard.start:shard.stop]
            u = torch.sqrt(df / chi2)[..., None]
            b = mean[None] + u * (L[None] @ z[..., None]).squeeze(-1)
            lp = _safe_log_density(md, theta, b)
            logw.append(lp - _log_student_t(b, mean, L, df))
    logw = torch.cat(logw, 0)  # [M, G]
    M = logw.shape[0]
    top = logw.max(0).values
    w = torch.exp(logw - top)
    mean_w = w.mean(0)
    per_group = top + torch.log(mean_w)
    rel_var = w.var(0) / (M * mean_w ** 2)  # Var(log mean w) by the delta method
    ess = w.sum(0) ** 2 / (w ** 2).sum(0)
    value, var = per_group.sum(), rel_var.sum()
    if shard is not None:
        value, var = shard.reduce(torch.stack([value, var]))
        G = shard.total
    return Estimate(float(value), float(var.sqrt()), "is", num_samples=M * G,
                    num_evaluations=M, wall_time_s=time.perf_counter() - start,
                    details={"per_group": per_group, "ess": ess, "proposal": f"student-t(df={df})"})


def _log_student_t(x, mean, L, df):
    """Log density of the multivariate t ``t_df(mean, L L^T)`` at ``x [M, G, D]``."""
    D = mean.shape[-1]
    diff = (x - mean[None]).unsqueeze(-1)
    w = torch.linalg.solve_triangular(L[None], diff, upper=False).squeeze(-1)
    maha = (w ** 2).sum(-1)
    logdet = torch.log(L.diagonal(dim1=-2, dim2=-1)).sum(-1)[None]
    return (math.lgamma((df + D) / 2) - math.lgamma(df / 2) - 0.5 * D * math.log(df * math.pi)
            - logdet - 0.5 * (df + D) * torch.log1p(maha / df))


# =========================================================================== generic entry


def fit_saem(model, *, random, group: str | None = None, exploration: int = 300,
             averaging: int = 200, chains: int | None = None, mh_steps: int = 3,
             importance_draws: int = 2000, seed: int = 0, init: dict | None = None,
             hooks: SaemHooks | None = None) -> InferenceRecord:
    """SAEM maximum likelihood of a conditioned model whose random effects are the
    latent sites ``random`` inside a plate of groups (``Model.fit("saem", random=[...])``).

    Every other continuous latent site is a population parameter, estimated by maximum
    likelihood (its prior is ignored) on the unconstrained scale of its support. Random
    effects are sampled on their own unconstrained scale: write them centred (``b ~
    Normal(0, tau)``, ``y ~ f(mu + b)``) for fast convergence of ``tau`` and ``mu``.

    Parameters
    ----------
    model : genprog.Model
        A conditioned model (anything with ``density()`` returning a
        :class:`genprog.density.JointDensity`).
    random : list of str
        The random-effect sites.
    group : str, optional
        The plate of groups (default: the plate the random sites share).
    exploration, averaging, chains, mh_steps, importance_draws, seed
        See :func:`saem`.
    init : dict, optional
        Starting population values on the natural scale (default: each site's prior
        median, from 101 prior draws).
    hooks : SaemHooks, optional
        Closed-form M-steps, an independence proposal; a hook with ``reparam`` and ``dim``
        attributes also sets the sampler's coordinates (see :class:`MixedEffectsDensity`).

    Returns
    -------
    InferenceRecord
        ``method="saem"``; ``unconstrained [1, 1, D]`` holds the population estimates and
        the random effects at their conditional means (so ``Model.fit`` gives a point
        ``Fit``); ``info["saem"]`` is the :class:`SaemResult` (estimates, standard errors,
        ``-2LL`` by importance sampling with its standard error, traces, timings), and
        ``info`` repeats ``estimates``, ``stderr``, ``minus2ll``, ``minus2ll_stderr``,
        ``wall_time_s``.

    Examples
    --------
    >>> import torch, pyro, pyro.distributions as dist, genprog as gp
    >>> def lmm(y=None):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    ...     tau = pyro.sample("tau", dist.HalfNormal(5.0))
    ...     sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
    ...     with pyro.plate("g", 6, dim=-2):
    ...         b = pyro.sample("b", dist.Normal(mu, tau))
    ...         with pyro.plate("obs", 4, dim=-1):
    ...             pyro.sample("y", dist.Normal(b, sigma), obs=y)
    >>> y = torch.arange(24.0).reshape(6, 4) / 4
    >>> fit = gp.Model(lmm).condition(y=y).fit("saem", random=["b"], exploration=50,
    ...                                        averaging=50, importance_draws=200)
    >>> round(float(fit.info["saem"].estimates["mu"]), 1)
    2.9
    """
    density = model.density()
    md = MixedEffectsDensity(density, random, group, reparam=getattr(hooks, "reparam", None),
                             dim=getattr(hooks, "dim", None))
    gen = torch.Generator(device=getattr(model, "device", None) or "cpu").manual_seed(int(seed))
    z0 = density.sample_prior(101, gen).median(0).values
    values, _ = density.constrain(z0[None])
    start = {n: values[n][0] for n in md.names}
    unknown = set(init or {}) - set(md.names)
    if unknown:
        raise ValueError(f"fit_saem: init for unknown population site(s) {sorted(unknown)}; "
                         f"population sites: {md.names}")
    for n, v in (init or {}).items():
        start[n] = torch.as_tensor(v, dtype=z0.dtype, device=z0.device).expand(md.shapes[n])
    theta0 = md.pack(start).to(z0.dtype)
    res = saem(md, theta0, hooks=hooks, exploration=exploration, averaging=averaging,
               chains=chains, mh_steps=mh_steps, importance_draws=importance_draws, seed=seed)
    slices = md.slices()
    random = md.to_sites(res.conditional_mean[None])
    parts = [(res.theta[slices[s.name]] if s.name in slices else random[s.name]).reshape(-1)
             for s in density.sites]
    z = torch.cat(parts)[None, None]
    info = {"saem": res, "estimates": res.estimates, "stderr": res.stderr, "minus2ll": res.minus2ll,
            "minus2ll_stderr": res.minus2ll_stderr, "wall_time_s": res.timings["total"]}
    return InferenceRecord("saem", z, info=info, seed=int(seed))

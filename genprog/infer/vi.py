"""Variational inference with Pyro's autoguides, with convergence detection.

The ELBO (``Trace_ELBO``, or ``TraceEnum_ELBO`` when discrete latents are summed out)
is minimised with Adam on the guide's parameters by :func:`genprog.optim.minimize`
(windowed plateau rule: learning rate cut 5x twice when the windowed ELBO stops improving
beyond noise or by more than ``tol``, then stop). Reaching ``max_iters`` first raises a
:class:`~genprog.errors.ConvergenceWarning`.
"""

from __future__ import annotations

import time
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import (
    AutoDelta,
    AutoGuideList,
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.infer.autoguide.initialization import init_to_value
from pyro.poutine.messenger import Messenger
from torch.distributions.utils import _standard_normal

from ..optim import minimize
from ..rng import make_generator, seeded, seeded_from
from ..validation import check_choice, check_float, check_int, check_seed
from . import data_parallel
from .init import initial_points
from .record import InferenceRecord
from .saem import GroupShard

#: guide name -> autoguide class
GUIDES = {
    "normal": AutoNormal,
    "full_rank": AutoMultivariateNormal,
    "low_rank": AutoLowRankMultivariateNormal,
    "flow": AutoIAFNormal,
}


class GuideProposal:
    """A fitted guide as a distribution over the flat unconstrained vector of a
    :class:`~genprog.density.JointDensity` (same packing order), for importance sampling.

    Parameters
    ----------
    base : torch.distributions.Distribution
        Distribution over the guide's own packed vector ``[D]``.
    order : LongTensor [D]
        ``z_density = z_guide[..., order]``.
    """

    def __init__(self, base, order):
        self.base = base
        self.order = order

    def sample_and_log_prob(self, n: int, generator: torch.Generator | None = None):
        with seeded_from(generator), torch.no_grad():
            zg = self.base.sample((n,))
            log_q = self.base.log_prob(zg)
        return zg[..., self.order], log_q


def _proposal_from_guide(guide, density) -> GuideProposal:
    names = [s.name for s in density.sites]
    if isinstance(guide, AutoNormal):
        locs, scales = [], []
        for name in names:
            loc, scale = guide._get_loc_and_scale(name)
            locs.append(loc.detach().reshape(-1))
            scales.append(scale.detach().reshape(-1))
        base = dist.Normal(torch.cat(locs), torch.cat(scales)).to_event(1)
        return GuideProposal(base, torch.arange(density.dim))
    posterior = guide.get_posterior()
    offsets, start = {}, 0
    for name, shape in guide._unconstrained_shapes.items():
        size = int(torch.Size(shape).numel())
        offsets[name] = torch.arange(start, start + size)
        start += size
    order = torch.cat([offsets[n] for n in names]) if names else torch.zeros(0, dtype=torch.long)
    return GuideProposal(posterior, order)


class ShardedGroups(Messenger):
    """Group-sharded VI (see :func:`fit_vi`'s ``group_shard``): this process holds groups
    ``shard.start:shard.stop`` of the plate ``plate``.

    * Sites outside the plate (the global latents, in the model and in the guide) are
      counted by the process holding the first group only (masked elsewhere), so the
      processes' losses add up to the whole data set's negative ELBO.
    * With ``noise=True`` (on the guide; mean-field ``AutoNormal``, whose other sites are
      deterministic Deltas), a reparameterised Normal draw of a site inside
      the plate is this process's rows of one draw for all ``shard.total`` groups from
      torch's RNG (as ``Normal.rsample`` draws it), so every group's noise, and the RNG
      state after it, do not depend on the split.
    """

    def __init__(self, plate: str, shard: GroupShard, noise: bool):
        super().__init__()
        self.plate, self.shard, self.noise = plate, shard, noise

    def _pyro_sample(self, msg):
        frames = [f for f in msg["cond_indep_stack"] if f.name == self.plate]
        if not frames:
            if self.shard.start != 0:
                msg["mask"] = False
            return
        if not self.noise or msg["is_observed"] or msg["value"] is not None:
            return
        fn = msg["fn"]
        base = fn.base_dist if isinstance(fn, torch.distributions.Independent) else fn
        if not isinstance(base, torch.distributions.Normal):
            return  # AutoNormal's Delta sites: deterministic functions of the Normal draws
        shape = fn.shape()
        axis = len(fn.batch_shape) + frames[0].dim
        full = list(shape)
        full[axis] = self.shard.total
        eps = _standard_normal(torch.Size(full), dtype=base.loc.dtype, device=base.loc.device)
        eps = eps.narrow(axis, self.shard.start, self.shard.stop - self.shard.start)
        msg["value"] = base.loc + eps * base.scale  # as Normal.rsample


def fit_vi(model, *, guide: str = "normal", draws: int = 1000, seed: int = 0,
           max_iters: int = 20000, learning_rate: float = 0.02, num_particles: int = 1,
           window: int = 200, tol: float = 1e-4, rank: int | None = None,
           point: list | None = None, progress: bool | None = None,
           distributed: bool = False, total_size: int | None = None,
           data_plate: str | None = None, max_steps: int | None = None,
           group_plate: str | None = None, group_shard: GroupShard | None = None,
           init_values: dict | None = None) -> InferenceRecord:
    """Variational inference with an autoguide.

    Parameters
    ----------
    model : genprog.Model
    guide : {"normal", "full_rank", "low_rank", "flow"}
        Mean-field normal, full-rank normal, low-rank-plus-diagonal normal, or an inverse
        autoregressive flow, all in unconstrained space.
    draws : int
        Draws taken from the fitted guide into ``Fit.draws`` (one chain).
    seed : int
    max_iters, learning_rate, num_particles, window, tol
        Optimisation settings (see the module docstring for the stopping rule).
    max_steps : int, optional
        Deprecated name of ``max_iters``.
    rank : int, optional
        Rank of the ``"low_rank"`` guide.
    point : list of str, optional
        Sites given a point estimate (``AutoDelta``) inside the variational fit.
    progress : bool, optional
        Show a progress bar (default: when attached to a terminal).
    distributed : bool
        Data-parallel VI over the processes of an initialized ``torch.distributed``
        group: this process's model is conditioned on its shard of the rows of
        ``data_plate``; gradients are averaged across ranks every step (see
        :mod:`genprog.infer.data_parallel`). Every rank returns the same fit.
    total_size : int, optional
        Rows in the whole data set (default: the sum of the shards' rows).
    data_plate : str, optional
        The plate holding the data rows (default: the one plate shared by all observed
        sites).
    group_plate : str, optional
        With ``group_shard``: the plate of independent groups (subjects) whose local
        latent sites (random effects) this process holds.
    group_shard : GroupShard, optional
        Group-sharded VI over processes (:func:`genprog.pk.distributed.fit_vi_distributed`):
        this process's model holds groups ``start:stop`` of ``total`` of ``group_plate``
        (the whole model restricted to them) and every process calls :func:`fit_vi` with
        the same arguments but the model, ``group_shard`` and ``init_values``. Each
        group's guide parameters (mean-field ``guide="normal"`` only) live on its
        process; the global guide parameters' gradients and the loss are summed over the
        processes with ``group_shard.reduce`` every step (:class:`ShardedGroups` counts
        the global terms once and draws every group's noise as one process would), so
        every process takes the same steps and, with the same ``seed``, the fit equals the
        one-process fit up to the rounding of the partial sums. The draws of the record
        are those of this process's model.
    init_values : dict, optional
        Starting values (constrained, by site, as the model's sites' shapes) of every
        latent site, instead of the prior median (with ``group_shard``: this process's
        rows of the whole model's starting values, which differ from the shard's own
        prior median).

    Returns
    -------
    InferenceRecord
        ``info``: ``elbo_trace`` (per step), ``converged``, ``num_iters``, ``guide``,
        ``final_elbo`` (mean of the last window), ``wall_time_s`` and the ``proposal`` (the
        fitted guide over the unconstrained vector) used by ``Fit.log_marginal``.
    """
    if max_steps is not None:
        warnings.warn("fit('vi'): max_steps is deprecated; use max_iters", DeprecationWarning,
                      stacklevel=3)
        max_iters = max_steps
    check_choice("fit('vi'): guide", guide, sorted(GUIDES))
    draws = check_int("fit('vi'): draws", draws)
    seed = check_seed("fit('vi'): seed", seed)
    max_iters = check_int("fit('vi'): max_iters", max_iters)
    num_particles = check_int("fit('vi'): num_particles", num_particles)
    window = check_int("fit('vi'): window", window, minimum=2)
    learning_rate = check_float("fit('vi'): learning_rate", learning_rate, 0.0, open_minimum=True)
    tol = check_float("fit('vi'): tol", tol, 0.0)
    if rank is not None:
        rank = check_int("fit('vi'): rank", rank)
    start = time.perf_counter()
    density = model.density()
    if density.dim == 0:
        raise ValueError("fit('vi'): the model has no continuous latent sites")
    local = _check_group_shard(model, density, guide, point, distributed, group_plate, group_shard)
    g = make_generator(seed, model.device)
    if init_values is None:
        z0 = initial_points(density, 1, "median", g, jitter=0.0)
        init_values = {k: v[0] for k, v in density.constrain(z0)[0].items()}
    else:
        missing = {s.name for s in density.sites} - set(init_values)
        if missing:
            raise ValueError(f"fit('vi'): init_values lacks site(s) {sorted(missing)}")
    k = density.max_plate_nesting
    program = model.program
    if density.has_enumeration:
        program = config_enumerate(program, default="parallel")
        elbo = TraceEnum_ELBO(max_plate_nesting=k, num_particles=num_particles,
                              vectorize_particles=num_particles > 1)
    else:
        elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1,
                          max_plate_nesting=k)
    point = list(point or [])
    rest = [s.name for s in density.sites if s.name not in point]
    init_loc_fn = init_to_value(values=init_values)
    guide_kwargs = {"init_loc_fn": init_loc_fn}
    if guide == "low_rank" and rank is not None:
        guide_kwargs["rank"] = rank
    if guide == "flow":
        guide_kwargs = {"hidden_dim": [max(2 * density.dim, 8)] * 2, "init_loc_fn": init_loc_fn}
    reduce = None
    if distributed:
        plate, scale = data_parallel.data_plate_and_scale(model, total_size, data_plate)
        program = data_parallel.ScaleDataPlate(plate, scale)(program)
        reduce = data_parallel.average_gradients_and_loss
    elif total_size is not None or data_plate is not None:
        raise ValueError("fit('vi'): total_size/data_plate apply only with distributed=True")
    main = GUIDES[guide](poutine.block(program, expose=rest), **guide_kwargs)
    if point:
        full_guide = AutoGuideList(program)
        full_guide.append(AutoDelta(poutine.block(program, expose=point), init_loc_fn=init_loc_fn))
        full_guide.append(main)
    else:
        full_guide = main
    model_fn, guide_fn = program, full_guide
    if group_shard is not None:
        model_fn = ShardedGroups(group_plate, group_shard, noise=False)(program)
        guide_fn = ShardedGroups(group_plate, group_shard, noise=True)(full_guide)
    with seeded(seed), pyro.get_param_store().scope():
        guide_fn(*model.args, **model.kwargs)  # create parameters
        params = list(full_guide.parameters())
        if distributed:
            data_parallel.broadcast_parameters(params)
        if group_shard is not None:
            # AutoNormal's parameters are "locs.<site>_unconstrained", "scales.<site>_unconstrained"
            by_site = [(n.split(".", 1)[-1].removesuffix("_unconstrained"), p)
                       for n, p in full_guide.named_parameters()]
            shared = [p for site, p in by_site if site not in local]
            if len(by_site) - len(shared) != 2 * len(local):
                raise ValueError(f"fit('vi', group_shard=...): cannot tell the guide parameters of the "
                                 f"local sites {sorted(local)} from {[n for n, _ in by_site]}")
            reduce = _sum_shared_gradients_and_loss(shared, group_shard.reduce)

        def loss_fn(step):
            return elbo.differentiable_loss(model_fn, guide_fn, *model.args, **model.kwargs)

        res = minimize(loss_fn, torch.optim.Adam(params, lr=learning_rate), max_iters=max_iters,
                       window=window, tol=tol, what=f"VI[{guide}]", progress=progress,
                       reduce=reduce, hint="raise max_iters or learning_rate")
        fitted, point_values = model, {}
        if point:
            delta = full_guide[0]
            with torch.no_grad():
                point_values = {n: v.detach() for n, v in delta.median().items()}
            fitted = model.with_fixed(point_values)
        fitted_density = fitted.density()
        with torch.no_grad():
            proposal = _proposal_from_guide(main, fitted_density)
            z, _ = proposal.sample_and_log_prob(draws, g)
    info = {"elbo_trace": [-v for v in res.trace], "converged": res.converged,
            "num_iters": res.num_iters, "guide": guide, "proposal": proposal,
            "final_elbo": -res.value, "wall_time_s": time.perf_counter() - start}
    return InferenceRecord("vi", z[None], held=point_values, info=info, seed=seed)


def _check_group_shard(model, density, guide, point, distributed, group_plate, group_shard) -> set:
    """The local (in-plate) latent sites of a group-sharded fit (empty without one)."""
    if group_shard is None:
        if group_plate is not None:
            raise ValueError("fit('vi'): group_plate applies only with group_shard")
        return set()
    if distributed:
        raise ValueError("fit('vi'): distributed=True (data-parallel rows) and group_shard "
                         "(sharded groups) exclude each other")
    if guide != "normal":
        raise ValueError(f"fit('vi', group_shard=...): only guide='normal' (mean field) keeps each "
                         f"group's guide parameters separable; got guide={guide!r}")
    if point:
        raise ValueError("fit('vi', group_shard=...): point=[...] is not supported")
    if density.has_enumeration:
        raise ValueError("fit('vi', group_shard=...): enumerated discrete sites are not supported")
    plates = model.structure.plates
    if group_plate not in plates:
        raise ValueError(f"fit('vi', group_shard=...): group_plate must name a plate of the model "
                         f"({sorted(plates)}), got {group_plate!r}")
    if plates[group_plate][1] != group_shard.stop - group_shard.start:
        raise ValueError(f"fit('vi', group_shard=...): plate {group_plate!r} has "
                         f"{plates[group_plate][1]} groups but the shard holds "
                         f"{group_shard.stop - group_shard.start}")
    return {s.name for s in density.sites if any(p[0] == group_plate for p in s.plates)}


def _sum_shared_gradients_and_loss(shared, reduce_sum):
    """``minimize``'s ``reduce``: the shared (global) parameters' gradients and the loss
    summed over the processes (one collective); local parameters keep their own."""
    def reduce(params, loss):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in shared]
        flat = torch.cat([loss.detach().reshape(1).to(grads[0].dtype if grads else loss.dtype)]
                         + [g.reshape(-1) for g in grads])
        total = reduce_sum(flat).to(flat.dtype)
        offset = 1
        for p, g in zip(shared, grads):
            n = g.numel()
            if p.grad is None:
                p.grad = g
            p.grad.copy_(total[offset:offset + n].view_as(g))
            offset += n
        return total[0].to(loss.dtype)
    return reduce

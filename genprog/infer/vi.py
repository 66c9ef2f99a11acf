"""Variational inference with Pyro's autoguides, with convergence detection.

The ELBO (``Trace_ELBO``, or ``TraceEnum_ELBO`` when discrete latents are summed out)
is minimised with Adam on the guide's parameters. Every ``window`` steps the mean loss
of the last window is compared with the one before; when the change is within noise
(|difference| < 2 standard errors, or relative change < ``tol``) the learning rate is
cut by 5x, and after two cuts the run stops as converged. Reaching ``max_steps`` first
raises a :class:`~genprog.errors.ConvergenceWarning`.
"""

from __future__ import annotations

import contextlib
import math
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
from tqdm.auto import tqdm

from ..errors import ConvergenceWarning
from .init import initial_points, make_generator

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
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item()) \
            if generator is not None else None
        with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            with torch.no_grad():
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


def _elbo_loop(loss_fn, params, *, max_steps, learning_rate, window, tol, progress, desc,
               reduce=None):
    opt = torch.optim.Adam(params, lr=learning_rate)
    losses, means, cuts, converged = [], [], 0, False
    bar = tqdm(total=max_steps, desc=desc, disable=None if progress is None else not progress,
               leave=False)
    step = 0
    try:
        for step in range(1, max_steps + 1):
            opt.zero_grad()
            loss = loss_fn()
            if not torch.isfinite(loss):
                raise RuntimeError(
                    f"VI: the ELBO became non-finite at step {step}; check the model's "
                    "support/priors or lower learning_rate"
                )
            loss.backward()
            if reduce is not None:  # data-parallel: average gradients and loss over ranks
                loss = reduce(params, loss)
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            if step % window == 0:
                w = torch.tensor(losses[-window:], dtype=torch.float64)
                means.append((float(w.mean()), float(w.var()) / window))
                bar.set_postfix(elbo=f"{-means[-1][0]:.4g}")
                if len(means) >= 2:
                    (m1, v1), (m0, v0) = means[-1], means[-2]
                    diff = abs(m1 - m0)
                    if diff < 2 * math.sqrt(v1 + v0) or diff < tol * (1 + abs(m1)):
                        if cuts == 2:
                            converged = True
                            break
                        cuts += 1
                        for group in opt.param_groups:
                            group["lr"] *= 0.2
    finally:
        bar.close()
    return losses, converged, step


def fit_vi(model, *, guide: str = "normal", draws: int = 1000, seed: int = 0,
           max_steps: int = 20000, learning_rate: float = 0.02, num_particles: int = 1,
           window: int = 200, tol: float = 1e-4, rank: int | None = None,
           point: list | None = None, progress: bool | None = None,
           distributed: bool = False, total_size: int | None = None,
           data_plate: str | None = None):
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
    max_steps, learning_rate, num_particles, window, tol
        Optimisation settings (see the module docstring for the stopping rule).
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

    Returns
    -------
    genprog.Fit
        ``info`` holds ``elbo_trace``, ``converged``, ``num_steps``, ``guide`` and the
        ``proposal`` used by ``Fit.log_marginal``.
    """
    from ..fit import Fit

    if guide not in GUIDES:
        raise ValueError(f"fit('vi'): unknown guide {guide!r}; choose from {sorted(GUIDES)}")
    start = time.perf_counter()
    density = model.density()
    if density.dim == 0:
        raise ValueError("fit('vi'): the model has no continuous latent sites")
    g = make_generator(seed, model.device)
    z0 = initial_points(density, 1, "median", g, jitter=0.0)
    init_values = {k: v[0] for k, v in density.constrain(z0)[0].items()}
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
        from . import data_parallel

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
    with torch.random.fork_rng(devices=[]), pyro.get_param_store().scope():
        pyro.set_rng_seed(seed)
        full_guide(*model.args, **model.kwargs)  # create parameters
        params = list(full_guide.parameters())
        if distributed:
            data_parallel.broadcast_parameters(params)

        def loss_fn():
            return elbo.differentiable_loss(program, full_guide, *model.args, **model.kwargs)

        losses, converged, steps = _elbo_loop(
            loss_fn, params, max_steps=max_steps, learning_rate=learning_rate, window=window,
            tol=tol, progress=progress, desc=f"vi[{guide}]", reduce=reduce,
        )
        fitted, point_values = model, {}
        if point:
            delta = full_guide[0]
            with torch.no_grad():
                point_values = {n: v.detach() for n, v in delta.median().items()}
            fitted = model._replace(fixed={**model.fixed, **point_values})
        fitted_density = fitted.density()
        with torch.no_grad():
            proposal = _proposal_from_guide(main, fitted_density)
            z, _ = proposal.sample_and_log_prob(draws, g)
    if not converged:
        warnings.warn(
            f"VI did not converge in {max_steps} steps (ELBO still changing: last window mean "
            f"{-sum(losses[-window:]) / window:.6g}); raise max_steps or learning_rate",
            ConvergenceWarning,
            stacklevel=3,
        )
    info = {"elbo_trace": [-v for v in losses], "converged": converged, "num_steps": steps,
            "guide": guide, "proposal": proposal, "final_elbo": -sum(losses[-window:]) / min(window, len(losses)),
            "wall_time_s": time.perf_counter() - start}
    return Fit.from_unconstrained(fitted, "vi", z[None], seed=seed, info=info, point=point_values)

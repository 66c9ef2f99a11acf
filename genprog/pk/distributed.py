"""Subject-sharded population fits (FOCE-I / Laplace, SAEM, VI) on ``torch.distributed``.

Subjects are independent given the population parameters ``phi``, so the population log
likelihood is a sum over subjects and so are its gradient, SAEM's sufficient statistics
and the ELBO. Each process (rank) holds one block of subjects
(:func:`genprog.pk.sharding.shard_dataset`) and computes its subjects' part; the ranks add
a few dozen numbers per step with :func:`reduce_sum` (an all-gather of the ranks' float64
vectors added in rank order on every rank, so every rank holds bitwise the same total
whatever the backend's reduction order), so every rank takes the same steps and returns
the same estimates.

* **FOCE-I** (:func:`fit_mle_distributed`): each rank solves its subjects' inner problems
  (the EBEs) and evaluates its part of the Laplace objective and of its gradient in
  ``phi``; one collective per evaluation sums the ``1 + K`` numbers. Every rank runs the
  same deterministic outer optimiser (:func:`genprog.pk.estimation.maximize_likelihood`)
  on the same numbers, stops at the same point, and computes the same standard errors
  (the finite-difference Hessian of the summed gradient).
* **SAEM** (:func:`fit_saem_distributed`): each rank advances its subjects' Markov
  chains; the M-step's sums over subjects are reduced
  (:class:`genprog.infer.saem.GroupShard`), and every subject's random numbers are those
  one process would draw.
* **VI** (:func:`fit_vi_distributed`): each subject's guide parameters live on its rank;
  the global ones' gradients and the loss are summed every step.

Per-subject results (EBEs, conditional means, guide parameters) stay on their rank until
the end, when they are gathered to rank 0 for the result.

Everything that depends on the whole data set is computed once, on rank 0, from the whole
data set, and broadcast: the default priors (which fix the parameter layout and the start),
the reference (median) of every covariate effect without a fixed reference, and SAEM's and
VI's starting values, so each shard's model is exactly the whole data set's model
restricted to its subjects.

Memory: per rank, the data of its subjects and ``[S_r, T, P]`` Jacobians and ``[S_r, P,
P]`` curvatures (plus the ``2P + 1`` central-difference points of the inner iterations,
``[2P + 1, S_r, T]``); nothing of size ``[S, T, T]``. Rank 0 also holds the whole data set
(for the priors and the result). See ``docs/scaling.md`` for SAEM's and VI's.

Start one process per core (CPU, ``gloo``) or per GPU (``nccl``) with ``torchrun``; see
``docs/scaling.md``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings

import pyro
import pyro.distributions as pdist
import torch
from pyro.distributions.transforms import biject_to

from ..dtypes import default_dtype
from ..errors import ConvergenceWarning
from ..infer.init import initial_points
from ..infer.record import InferenceRecord
from ..infer.saem import GroupShard
from ..infer.vi import GuideProposal, fit_vi
from ..rng import make_generator
from ..threads import threads_for, using_threads
from ..validation import check_int
from .data import read_nonmem
from .dataset import Dataset
from .estimation import (
    APPROXIMATIONS,
    STATIONARY_TOL,
    LaplaceObjective,
    PopulationFit,
    boundary_messages,
    check_fixed_and_init,
    covariance_of_estimates,
    flip_flop_messages,
    maximize_likelihood,
    outer_messages,
    start_point,
)
from .saem import run_saem, saem_population_fit, saem_start_values
from .sharding import concat_shards, shard_bounds, shard_dataset

__all__ = ["ShardedObjective", "fit_distributed", "fit_mle_distributed", "fit_saem_distributed",
           "fit_vi_distributed", "read_nonmem_shard", "reduce_sum"]

METHODS = ("mle", "saem", "vi")


# ---------------------------------------------------------------------- collectives
def _dist():
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        raise ValueError(
            "fit(..., distributed=True) needs an initialized torch.distributed process group "
            "(torch.distributed.init_process_group(...), e.g. under torchrun)")
    return tdist


def _collective_device(tdist):
    """Where collective tensors live: the current CUDA device for NCCL, else the CPU."""
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``x`` (any shape), in float64, bitwise identical on every
    rank: an all-gather of the ranks' tensors added in rank order (an all-reduce whose
    reduction order does not depend on the backend or the network)."""
    tdist = _dist()
    device = _collective_device(tdist)
    local = x.detach().to(device=device, dtype=torch.float64).contiguous()
    parts = [torch.empty_like(local) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, local)
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total.to(x.device)


def _all_gather_rows(x: torch.Tensor, sizes: list) -> torch.Tensor:
    """The ranks' ``x [n_r, ...]`` concatenated in rank order (``sizes``: every ``n_r``)."""
    tdist = _dist()
    device = _collective_device(tdist)
    width = max(sizes)
    local = torch.zeros((width, *x.shape[1:]), dtype=x.dtype, device=device)
    local[:x.shape[0]] = x.detach().to(device)
    parts = [torch.empty_like(local) for _ in sizes]
    tdist.all_gather(parts, local)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], 0).to(x.device)


def _agree(error: Exception | None) -> None:
    """Raise on every rank when any rank failed (so no rank waits forever in a collective
    the failed one never reaches): the failed rank re-raises its own error, the others a
    ValueError naming it."""
    tdist = _dist()
    messages = [None] * tdist.get_world_size()
    tdist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        r, m = failed[0]
        raise ValueError(f"fit(distributed=True): rank {r} failed: {m}")


# ---------------------------------------------------------------------- data
def read_nonmem_shard(source, rank: int, world: int, **options) -> Dataset:
    """This rank's block of subjects of a NONMEM data file (see
    :func:`genprog.pk.sharding.shard_dataset`).

    Every rank parses the whole file, so the category codes, observation types and padded
    widths are those of the whole data set, then keeps its block; only the block stays in
    memory. ``options`` go to :func:`genprog.pk.read_nonmem`.

    >>> from genprog import pk
    >>> read_nonmem_shard(pk.dataset_path("theo_sd"), 1, 2).ids
    [7, 8, 9, 10, 11, 12]
    """
    return shard_dataset(read_nonmem(source, **options), rank, world)


def with_covariate_references(pop, references: dict):
    """``pop`` with each covariate effect that has no fixed reference given the one in
    ``references`` (effect index -> value): the whole data set's median, so that a shard's
    covariate factors are those of the whole data set."""
    if not references:
        return pop
    by_param: dict = {}
    for i, e in enumerate(pop.covariate_effects):
        if i in references:
            e = dataclasses.replace(e, reference=references[i])
        by_param.setdefault(e.param, []).append(e)
    return dataclasses.replace(pop, covariates=by_param)


def covariate_references(pop, data: Dataset) -> dict:
    """The median (as :meth:`PopulationModel.covariate_factor` takes it) of every power,
    allometric or linear effect's covariate without a fixed reference, by effect index."""
    names = {k.lower(): k for k in data.covariates}
    out = {}
    for i, e in enumerate(pop.covariate_effects):
        if e.kind in ("power", "allometric", "linear") and e.reference is None:
            x = data.covariates[names[e.covariate.lower()]]
            out[i] = float(torch.quantile(x.to(torch.float64), 0.5).to(x.dtype))
    return out


# ---------------------------------------------------------------------- the objective
class ShardedObjective:
    """The Laplace objective of the whole data set from this rank's part: the
    :class:`~genprog.pk.estimation.LaplaceObjective` of the rank's subjects, whose value and
    gradient in ``phi`` are summed over the ranks at every evaluation.

    A drop-in for ``LaplaceObjective.log_likelihood`` in the outer loop and in the
    standard errors: every rank must call it with the same ``phi`` (collective)."""

    def __init__(self, local: LaplaceObjective):
        self.local = local
        self.layout = local.layout
        self.evaluations = 0

    def log_likelihood(self, phi: torch.Tensor, eta0, fresh: bool = True):
        """The whole data set's Laplace log likelihood at ``phi`` (a scalar whose gradient
        in ``phi`` is the summed gradient) and this rank's EBEs ``[S_r, P]``."""
        x = phi.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            ll, eta = self.local.log_likelihood(x, eta0, fresh=fresh)
            if ll.requires_grad and bool(torch.isfinite(ll)):
                g, = torch.autograd.grad(ll, x)
            else:
                g = torch.full_like(x, float("nan") if not bool(torch.isfinite(ll)) else 0.0)
        total = reduce_sum(torch.cat([ll.detach().reshape(1).to(x.dtype), g]))
        self.evaluations += 1
        value, grad = total[0].to(phi.dtype), total[1:].to(phi.dtype)
        # value exactly; gradient ``grad`` in phi (phi - phi.detach() is exactly 0)
        return value + ((phi - phi.detach()) * grad).sum(), eta


# ---------------------------------------------------------------------- the fit
def _checked_shards(pop, data, method: str, problems: list, rank: int, world: int, dtype):
    """Refuse on every rank at once the first of ``problems`` (messages, None where fine) or a
    model with inter-occasion variability; then ``(this rank's shard, the whole data set on
    rank 0 else None)`` in ``dtype`` (:func:`_whole_data`)."""
    iov = (f"fit(method={method!r}, distributed=True): models with inter-occasion variability "
           "(iov=...) are not sharded yet (occasion codes are per data set)")
    problems = [*problems, iov if pop.iov else None]
    first = next((p for p in problems if p), None)
    _agree(ValueError(first) if first else None)
    shard, whole = _whole_data(data, rank, world)
    return shard.to(dtype=dtype), (whole.to(dtype=dtype) if whole is not None else None)


def _whole_data(data: Dataset, rank: int, world: int):
    """(this rank's shard, the whole data set on rank 0 else None), from either a shard
    (:func:`shard_dataset` / :func:`read_nonmem_shard`; rank 0 gathers the others) or the
    whole data set on every rank."""
    tdist = _dist()
    error, info = None, data.summary.get("shard") if isinstance(data, Dataset) else None
    try:
        if not isinstance(data, Dataset):
            raise TypeError(f"fit(distributed=True): expected a pk.Dataset, got {type(data).__name__}")
        if info is not None and (info["rank"], info["world"]) != (rank, world):
            raise ValueError(f"fit(distributed=True): this rank ({rank} of {world}) holds shard "
                             f"{info['rank']} of {info['world']}")
    except (TypeError, ValueError) as e:
        error = e
    _agree(error)
    kinds = [None] * world
    tdist.all_gather_object(kinds, (info is not None, data.n_subjects))
    if len({k[0] for k in kinds}) > 1:
        _agree(ValueError("fit(distributed=True): some ranks passed a shard, others the whole data set"))
    if info is not None:
        gathered = [None] * world if rank == 0 else None
        tdist.gather_object(data, gathered, dst=0)
        return data, (concat_shards(gathered) if rank == 0 else None)
    if len({k[1] for k in kinds}) > 1:
        _agree(ValueError(f"fit(distributed=True): the ranks hold different data sets (subjects "
                          f"{[k[1] for k in kinds]}); pass each rank's shard or the same whole data set"))
    error, shard = None, None
    try:
        shard = shard_dataset(data, rank, world)
    except (TypeError, ValueError) as e:
        error = e
    _agree(error)
    return shard, (data if rank == 0 else None)


def fit_mle_distributed(pop, data: Dataset, *, max_iters: int = 200, max_rounds: int = 5, seed: int = 0,
                        init: dict | None = None, standard_errors: bool = True, dtype=torch.float64,
                        fixed: dict | None = None, approximation: str = "focei",
                        threads: int | None = None, newton_steps: int = 0) -> PopulationFit:
    """Population maximum likelihood (:func:`genprog.pk.estimation.fit_mle`) with the
    subjects sharded over the ranks of a ``torch.distributed`` process group.

    Call it on every rank, with the same arguments except ``data``.

    Parameters
    ----------
    pop : PopulationModel
        Without inter-occasion variability (occasion codes are per data set).
    data : Dataset
        This rank's shard (:func:`genprog.pk.sharding.shard_dataset`,
        :func:`read_nonmem_shard`), or the whole data set on every rank (then each rank
        keeps its block).
    max_iters, max_rounds, seed, init, standard_errors, dtype, fixed, approximation
        As :func:`~genprog.pk.estimation.fit_mle`.
    threads : int, optional
        torch intra-op threads per rank (default: chosen for the rank's share of the
        work by :func:`genprog.threads.threads_for`; one per rank at usual sizes).
    newton_steps : int
        Newton steps on the summed gradient after L-BFGS (finite-difference Hessian; each
        kept only if the log likelihood does not drop; ``info["newton_steps"]``). 0 (the
        default) gives :func:`~genprog.pk.estimation.fit_mle`'s optimum: on one rank
        bitwise, on several to the flatness of the objective at the optimum (L-BFGS stops
        on the change of the objective; the ranks' sums round differently, so the last
        steps differ by about ``1e-7`` in ``phi`` while the OFV agrees to ``1e-12``).
        Two steps locate the optimum to the gradient's precision (about ``1e-10``),
        independent of the number of ranks; the covariance is then the inverse Hessian
        at the L-BFGS optimum (computed for the steps, not again).

    Returns
    -------
    PopulationFit
        Identical estimates, covariance, ``minus2ll``/``ofv`` and convergence on every rank.
        On rank 0 the fit of the whole data set (``data``, ``eta`` ``[S, P]`` and
        ``individual`` for all subjects, gathered); on other ranks ``data``, ``eta`` and
        ``individual`` are those of the rank's shard (and ``population`` carries the whole
        data set's covariate references). ``info["distributed"]``: ``world``, this rank's
        ``shard`` bounds, ``evaluations`` (collective objective evaluations) and every
        rank's inner-solve seconds (``inner_s_by_rank``).

    Raises
    ------
    ValueError
        No process group, too few subjects for the ranks, shards that do not match the
        ranks, or a model with ``iov`` (on every rank at once).
    """
    start_time, start_cpu = time.perf_counter(), time.process_time()
    tdist = _dist()
    rank, world = tdist.get_rank(), tdist.get_world_size()
    problems = [f"fit_mle: approximation must be one of {APPROXIMATIONS}, got {approximation!r}"
                if approximation not in APPROXIMATIONS else None]
    shard, whole = _checked_shards(pop, data, "mle", problems, rank, world, dtype)
    S, T = shard.obs_dv.shape
    n_threads = threads_for(S * T * max(int(shard.dose_time.shape[-1]), 1) * max(pop.n_random(shard), 1),
                            threads)
    with using_threads(n_threads):
        fit = _fit(pop, shard, whole, rank, world, max_iters=max_iters, max_rounds=max_rounds, seed=seed,
                   init=init, standard_errors=standard_errors, dtype=dtype, fixed=fixed,
                   approximation=approximation, newton_steps=check_int("newton_steps", newton_steps, minimum=0))
    fit.info["threads"] = n_threads
    fit.info["wall_time_s"] = time.perf_counter() - start_time
    fit.info["timing"]["cpu_s"] = time.process_time() - start_cpu
    return fit


def _setup(pop, shard, whole, rank, dtype, fixed, init, extra=None):
    """Rank 0 checks the whole data set and computes the priors and covariate references
    (and ``extra(whole, priors, fixed)``, e.g. SAEM's start); every rank receives them and
    checks its shard. Returns ``(local_pop, priors, fixed)`` (and the extra)."""
    tdist = _dist()
    error, payload = None, [None]
    if rank == 0:
        try:
            pop.check_data(whole)
            priors = pop.priors_for(whole)
            fixed = check_fixed_and_init(priors, fixed, init, dtype)
            more = extra(whole, priors, fixed) if extra else None
            payload = [(priors, fixed, covariate_references(pop, whole), more)]
        except (TypeError, ValueError) as e:
            error = e
    _agree(error)
    tdist.broadcast_object_list(payload, src=0)
    priors, fixed, references, more = payload[0]
    local_pop = with_covariate_references(pop, references)
    error = None
    try:
        local_pop.check_data(shard)
    except (TypeError, ValueError) as e:
        error = e
    _agree(error)
    return (local_pop, priors, fixed) + ((more,) if extra else ())


def _fit(pop, shard, whole, rank, world, *, max_iters, max_rounds, seed, init, standard_errors, dtype,
         fixed, approximation, newton_steps) -> PopulationFit:
    """The outer loop of :func:`genprog.pk.estimation.fit_mle` on the summed objective."""
    tdist = _dist()
    start_time = time.perf_counter()
    # rejected trial points give NaN, not validation errors
    with default_dtype(dtype), pyro.validation_enabled(False):
        local_pop, priors, fixed = _setup(pop, shard, whole, rank, dtype, fixed, init)
        local = LaplaceObjective(local_pop, shard, priors, fixed, approximation)
        obj = ShardedObjective(local)
        phi0 = start_point(obj.layout, pop, shard, priors, fixed, init, dtype)
        eta0 = torch.zeros(shard.n_subjects, local.P, dtype=dtype, device=shard.obs_dv.device)
        outer = maximize_likelihood(obj, phi0, eta0, max_iters=max_iters, max_rounds=max_rounds)
        phi, ll, grad, eta_hat = outer.phi.clone(), outer.log_likelihood, outer.grad, outer.eta
        newton, newton_cov = _newton_steps(obj, phi, ll, grad, eta_hat, newton_steps) if newton_steps else ([], None)
        if newton:
            ll, grad, eta_hat = newton[-1][1:]
            outer = dataclasses.replace(outer, phi=phi.detach(), log_likelihood=ll.detach(), grad=grad, eta=eta_hat,
                                        converged=bool(torch.isfinite(ll)) and
                                        float(grad.abs().max()) <= STATIONARY_TOL * (1 + abs(float(ll))))
        outer_s = time.perf_counter() - start_time
        converged, messages = outer_messages(outer)
        phi = phi.detach()
        values = {k: v.detach() for k, v in obj.layout.unpack(phi).items()}
        boundary = boundary_messages(pop, values)
        messages += boundary
        flipped = (local.flip_flop(values, eta_hat) if local.P
                   else torch.zeros(shard.n_subjects, dtype=torch.bool))
        flip_ids = [shard.ids[i] for i in flipped.nonzero().flatten().tolist()]
        gathered = [None] * world
        tdist.all_gather_object(gathered, flip_ids)
        flip_ids = [i for part in gathered for i in part]
        messages += flip_flop_messages(flip_ids)
        for m in messages:
            warnings.warn(f"fit(method='mle', distributed=True): {m}", ConvergenceWarning, stacklevel=4)
        covariance, se_note = None, None
        se_start = time.perf_counter()
        if standard_errors and newton_cov is not None:
            covariance = newton_cov  # the Hessian at the L-BFGS optimum, ~1e-7 away in phi
        elif standard_errors:
            covariance, se_note = covariance_of_estimates(obj, phi, eta_hat)
            if se_note:
                warnings.warn(f"fit(method='mle', distributed=True): {se_note}", ConvergenceWarning,
                              stacklevel=4)
        se_s = time.perf_counter() - se_start
        n_obs = int(reduce_sum(torch.tensor([float(local.n_obs)])).item())
        inner = [None] * world
        tdist.all_gather_object(inner, (local.inner_seconds, local.inner_solves))
        eta_local = eta_hat.detach() if local.P else torch.zeros(shard.n_subjects, 0, dtype=dtype)
        sizes = [None] * world
        tdist.all_gather_object(sizes, shard.n_subjects)
        eta_all = _all_gather_rows(eta_local, sizes)
        if rank == 0:
            result_pop, result_data, eta_out = pop, whole, eta_all
        else:
            result_pop, result_data, eta_out = local_pop, shard, eta_local
        typical, betas, _ = local.split(values)
        individual = result_pop.individual_parameters(
            typical, betas, eta_out[:, :local.P_iiv] if local.P else None, result_data)
        individual = {k: v.detach().expand(result_data.n_subjects) for k, v in individual.items()}
        if pop.ka_above_k:
            v = values["v"] if "v" in values else values["v1"]
            values["ka"] = (values["ka_minus_k"] + values["cl"] / v).detach()
        minus2ll = -2 * float(ll)
        n_params = int(phi.numel())
        start_stop = shard_bounds(sum(sizes), rank, world)
    return PopulationFit(
        population=result_pop, data=result_data, estimates=values, phi=phi, covariance=covariance,
        eta=eta_out, individual=individual, minus2ll=minus2ll,
        ofv=minus2ll - n_obs * math.log(2 * math.pi), n_obs=n_obs, n_params=n_params, converged=converged,
        info={"evaluations": len(outer.trace), "rounds": outer.rounds, "objective_trace": outer.trace,
              "grad_norm": outer.grad_norm, "seed": seed, "standard_errors": se_note or "ok",
              "flip_flop_subjects": flip_ids, "boundary": boundary, "messages": messages,
              "timing": {"inner_s": local.inner_seconds, "inner_solves": local.inner_solves,
                         "outer_s": outer_s, "standard_errors_s": se_s},
              "newton_steps": [{"minus2ll": -2 * float(n[1]), "grad_norm": float(n[2].abs().max()),
                                "step": n[0]} for n in newton],
              "distributed": {"world": world, "rank": rank, "shard": start_stop,
                              "evaluations": obj.evaluations,
                              "inner_s_by_rank": [i[0] for i in inner]},
              "wall_time_s": time.perf_counter() - start_time, "layout": obj.layout.names},
        fixed=fixed, approximation=approximation,
    )


def _newton_steps(obj, phi, ll, grad, eta, steps):
    """Up to ``steps`` Newton steps ``phi += H^-1 grad`` from the L-BFGS optimum, with ``H``
    the finite-difference Hessian of ``-log L`` there (the one of the standard errors),
    each kept only if the log likelihood does not drop. L-BFGS stops where the objective
    is flat to its rounding (``|phi - phi*| ~ sqrt(eps |log L| / curvature)``, about
    ``1e-7``); the gradient locates the optimum to its own precision (about ``1e-10``).
    ``phi`` is updated in place; returns ``[(step size, log L, gradient, EBEs)]`` per kept
    step, and the covariance (inverse Hessian; None where it is not positive definite, and
    then no step is taken)."""
    covariance, _ = covariance_of_estimates(obj, phi.detach(), eta)
    out = []
    if covariance is None:
        return out, None
    for _ in range(steps):
        step = covariance @ grad.detach()
        x = (phi.detach() + step).requires_grad_(True)
        with torch.enable_grad():
            ll_x, eta_x = obj.log_likelihood(x, eta)
            g_x, = torch.autograd.grad(ll_x, x)
        ll_x, ll = ll_x.detach(), ll.detach()
        if not bool(torch.isfinite(ll_x)) or float(ll_x) < float(ll) - 1e-12 * abs(float(ll)):
            break
        with torch.no_grad():
            phi.copy_(x.detach())
        ll, grad, eta = ll_x, g_x, eta_x
        out.append((float(step.abs().max()), ll, grad, eta))
    return out, covariance


def fit_distributed(model, data: Dataset, method: str = "mle", **options):
    """``model.fit(data, method, distributed=True)``: a population fit with the subjects
    sharded over the ranks of the current ``torch.distributed`` process group.

    Parameters
    ----------
    model : PopulationModel
    data : Dataset
        This rank's shard or the whole data set (see :func:`fit_mle_distributed`).
    method : {"mle", "saem", "vi"}
        Population maximum likelihood by FOCE-I / Laplace (:func:`fit_mle_distributed`),
        by SAEM (:func:`fit_saem_distributed`), or variational inference
        (:func:`fit_vi_distributed`).
    **options
        As the method's function.
    """
    if method not in FITS:
        raise ValueError(f"fit(method={method!r}, distributed=True): subject-sharded fits support "
                         f"method in {METHODS}")
    return FITS[method](model, data, **options)


# ---------------------------------------------------------------------- SAEM
def fit_saem_distributed(pop, data: Dataset, *, exploration: int = 300, averaging: int = 200,
                         chains: int | None = None, mh_steps: int = 2, importance_draws: int = 1000,
                         seed: int = 0, init: dict | None = None, fixed: dict | None = None,
                         standard_errors: bool = True, threads: int | None = None) -> PopulationFit:
    """SAEM (:func:`genprog.pk.saem.fit_saem`) with the subjects sharded over the ranks of a
    ``torch.distributed`` process group. Call it on every rank with the same arguments
    except ``data``.

    Each rank advances the Markov chains of its own subjects only; every sum over subjects
    (the closed-form M-steps' means of the random effects' moments, the residual sum of
    squares, the Newton M-step's value, gradient and Hessian, Louis' information, the
    importance-sampling log likelihood, the FOCE-I objective at the estimate) is summed
    over the ranks in rank order (:func:`reduce_sum`, float64), so every rank takes the
    same steps. Every rank draws the random numbers of all ``S`` subjects from the same
    seeded generator and keeps its rows (:class:`genprog.infer.saem.GroupShard`): a
    subject's draws do not depend on the number of ranks, and the fit reproduces the
    single-process :func:`~genprog.pk.saem.fit_saem` with the same ``seed`` up to the
    rounding of the partial sums (about ``1e-15`` relative per iteration; measured
    ``1e-13`` to ``1e-10`` on the estimates after 100 iterations, see
    ``tests/pk/test_distributed.py``), unless a Metropolis decision falls within that
    rounding of its threshold (probability about ``1e-12`` per decision). Drawing the
    whole ``[chains, S, D]`` noise on every rank costs ``O(S D)`` per step, negligible
    next to the density (``O(S_r T D_doses)``).

    Parameters
    ----------
    pop : PopulationModel
        Without inter-occasion variability.
    data : Dataset
        This rank's shard or the whole data set on every rank (see
        :func:`fit_mle_distributed`).
    exploration, averaging, chains, mh_steps, importance_draws, seed, init, fixed, standard_errors
        As :func:`~genprog.pk.saem.fit_saem` (``chains`` defaults to ``ceil(50 / S)`` with
        ``S`` all subjects).
    threads : int, optional
        torch intra-op threads per rank.

    Returns
    -------
    PopulationFit
        ``method="saem"``; identical estimates, covariance, ``minus2ll`` / ``ofv`` (importance
        sampling) and ``info["ofv_focei"]`` on every rank. On rank 0 the whole data set's
        EBEs ``eta [S, P]``, ``info["eta_conditional_mean"] [S, D]`` and
        ``info["acceptance_rate"] [S]`` (gathered); other ranks hold their shard's.
        ``info["distributed"]``: ``world``, ``rank``, ``shard`` bounds.
    """
    start_time = time.perf_counter()
    tdist = _dist()
    rank, world = tdist.get_rank(), tdist.get_world_size()
    problems = [None if pop.random_effects else
                "fit(method='saem'): the model has no random effects; use method='mle'"]
    shard, whole = _checked_shards(pop, data, "saem", problems, rank, world, torch.float64)
    S_r, T = shard.obs_dv.shape
    sizes = [None] * world
    tdist.all_gather_object(sizes, S_r)
    S = sum(sizes)
    start, stop = shard_bounds(S, rank, world)
    C = chains or max(1, math.ceil(50 / S))
    n_threads = threads_for(S_r * T * max(int(shard.dose_time.shape[-1]), 1) * C, threads)
    with default_dtype(torch.float64), pyro.validation_enabled(False), using_threads(n_threads):
        local_pop, priors, fixed, start_values = _setup(
            pop, shard, whole, rank, torch.float64, fixed, init,
            extra=lambda w, p, f: saem_start_values(pop, w, p, init))
        # the shard's program takes the whole data set's priors (its own would be scaled by
        # the shard's data; they fix the supports and the layout)
        local_pop = dataclasses.replace(local_pop, priors=priors)
        group_shard = GroupShard(start, stop, S, reduce_sum)
        md, hooks, res = run_saem(local_pop, shard, priors, fixed, start_values, exploration=exploration,
                                  averaging=averaging, chains=chains if chains is not None else C,
                                  mh_steps=mh_steps, importance_draws=importance_draws, seed=seed,
                                  standard_errors=standard_errors, shard=group_shard)

        def gather(_pop, _data, eta, cond_mean, acceptance, n_obs):
            n_obs = int(reduce_sum(torch.tensor([float(n_obs)])).item())
            eta_all = _all_gather_rows(eta, sizes)
            cond_all = _all_gather_rows(cond_mean, sizes)
            acc_all = _all_gather_rows(acceptance[:, None], sizes)[:, 0]
            if rank == 0:
                return pop, whole, eta_all, cond_all, acc_all, n_obs
            return local_pop, shard, eta, cond_mean, acceptance, n_obs

        fit = saem_population_fit(local_pop, shard, priors, fixed, md, hooks, res, standard_errors,
                                   start_time, summed=ShardedObjective, gather=gather)
    fit.info["distributed"] = {"world": world, "rank": rank, "shard": (start, stop)}
    fit.info["threads"] = n_threads
    fit.info["wall_time_s"] = time.perf_counter() - start_time
    return fit


# ---------------------------------------------------------------------- VI
def _plate_axis(site, plate: str) -> int | None:
    """The axis of ``site``'s value ``[*batch, *event]`` that ``plate`` indexes (None: not in it)."""
    for name, dim, _ in site.plates:
        if name == plate:
            return len(site.batch_shape) + dim
    return None


def fit_vi_distributed(pop, data: Dataset, *, guide: str = "normal", draws: int = 1000, seed: int = 0,
                       max_iters: int = 20000, learning_rate: float = 0.02, num_particles: int = 1,
                       window: int = 200, tol: float = 1e-4, progress: bool | None = None,
                       threads: int | None = None, dtype=torch.float64):
    """Variational inference (``PopulationModel.fit(data, "vi")``, :func:`genprog.infer.vi.fit_vi`)
    with the subjects sharded over the ranks of a ``torch.distributed`` process group.
    Call it on every rank with the same arguments except ``data``.

    The guide is mean-field normal (``guide="normal"``): each subject's ``eta_raw`` guide
    parameters (loc and scale, ``[S_r, 1, P]`` each) live only on the rank that holds the
    subject and never move during the fit; the global guide parameters (typical values,
    omegas, residual SDs, covariate effects) are identical on every rank and their
    gradients, and the loss, are summed over the ranks in rank order (:func:`reduce_sum`)
    after every backward pass, so every rank takes the same Adam steps and stops at the
    same step. The global terms of the ELBO (their priors and guide entropies) are counted
    by rank 0 only; every rank draws the guide noise of all ``S`` subjects and keeps its
    rows (:class:`genprog.infer.vi.ShardedGroups`), so with the same ``seed`` the fit
    equals the one-process fit up to the rounding of the partial sums (measured ``1e-13``
    on the guide parameters in float64, see ``tests/pk/test_distributed.py``). Rank 0
    computes the starting point from the whole data set (the prior median, as one process
    would) and broadcasts it with the priors.

    Parameters
    ----------
    pop : PopulationModel
        Without inter-occasion variability.
    data : Dataset
        This rank's shard or the whole data set on every rank.
    guide, draws, seed, max_iters, learning_rate, num_particles, window, tol, progress
        As :func:`genprog.infer.vi.fit_vi` (only ``guide="normal"``).
    threads : int, optional
        torch intra-op threads per rank.
    dtype : torch.dtype
        Floating dtype of the data and of the fit (torch's default during it).

    Returns
    -------
    genprog.Fit
        ``method="vi"``. On rank 0 the fit of the whole data set: ``draws`` (one chain) from
        the whole guide (the gathered subjects' parameters and the global ones), drawn as
        one process would draw them. On other ranks the fit of the rank's shard (its
        subjects' etas and the global sites). ``info`` as ``fit_vi``'s (``elbo_trace``,
        ``converged``, ... the same on every rank) plus ``distributed`` (``world``,
        ``rank``, ``shard``, ``guide_loc`` and ``guide_scale`` by site: the guide's
        unconstrained loc and scale, the subjects' gathered from every rank, e.g.
        ``eta_raw`` ``[S, 1, P]``).

    Raises
    ------
    ValueError
        No process group, shards that do not match the ranks, a guide other than
        ``"normal"``, or a model with ``iov`` (on every rank at once).
    """
    start_time = time.perf_counter()
    tdist = _dist()
    rank, world = tdist.get_rank(), tdist.get_world_size()
    problems = [None if guide == "normal" else
                f"fit(method='vi', distributed=True): only guide='normal' (mean field) keeps each "
                f"subject's guide parameters on its rank; got guide={guide!r}"]
    shard, whole = _checked_shards(pop, data, "vi", problems, rank, world, dtype)
    sizes = [None] * world
    tdist.all_gather_object(sizes, shard.n_subjects)
    S = sum(sizes)
    start, stop = shard_bounds(S, rank, world)
    T = shard.obs_dv.shape[-1]
    n_threads = threads_for(shard.n_subjects * T * max(int(shard.dose_time.shape[-1]), 1), threads)
    kept = {}

    def whole_start(w, priors, fixed):  # rank 0: one process's starting point, and its generator
        model = pop(w)
        with model.context():
            density = model.density()
            g = make_generator(seed, model.device)
            z0 = initial_points(density, 1, "median", g, jitter=0.0)
            values = {k: v[0] for k, v in density.constrain(z0)[0].items()}
        kept.update(model=model, density=density, generator=g)
        return values

    with default_dtype(dtype), using_threads(n_threads):
        local_pop, priors, _, init = _setup(pop, shard, whole, rank, dtype, None, None, extra=whole_start)
        local_pop = dataclasses.replace(local_pop, priors=priors)
        model = local_pop(shard)
        density = model.density()
        local_init = {}
        for site in density.sites:
            axis = _plate_axis(site, "subject")
            v = init[site.name]
            local_init[site.name] = v if axis is None else v.narrow(axis, start, stop - start)
        with model.context():
            record = fit_vi(model, guide=guide, draws=draws, seed=seed, max_iters=max_iters,
                            learning_rate=learning_rate, num_particles=num_particles, window=window,
                            tol=tol, progress=progress, group_plate="subject",
                            group_shard=GroupShard(start, stop, S, reduce_sum), init_values=local_init)
        base = record.info["proposal"].base.base_dist  # Normal over this rank's [D_r]
        loc, scale = _split_by_site(density, base.loc), _split_by_site(density, base.scale)
        for site in density.sites:  # the subjects' parameters, gathered in subject order
            axis = _plate_axis(site, "subject")
            if axis is not None:
                loc[site.name] = _gather_site(loc[site.name], site, axis, sizes)
                scale[site.name] = _gather_site(scale[site.name], site, axis, sizes)
        if rank == 0:
            whole_model, whole_density, g = kept["model"], kept["density"], kept["generator"]
            with whole_model.context():
                cat = [(loc[s.name].reshape(-1), scale[s.name].reshape(-1)) for s in whole_density.sites]
                proposal = GuideProposal(pdist.Normal(torch.cat([c[0] for c in cat]),
                                                      torch.cat([c[1] for c in cat])).to_event(1),
                                         torch.arange(whole_density.dim))
                z, _ = proposal.sample_and_log_prob(draws, g)
                record = InferenceRecord("vi", z[None], info={**record.info, "proposal": proposal},
                                         seed=seed)
                fit = whole_model.fit_from_record(record)
        else:
            with model.context():
                fit = model.fit_from_record(record)
    fit.info["distributed"] = {"world": world, "rank": rank, "shard": (start, stop),
                               "guide_loc": {k: v.detach() for k, v in loc.items()},
                               "guide_scale": {k: v.detach() for k, v in scale.items()}}
    fit.info["threads"] = n_threads
    fit.info["wall_time_s"] = time.perf_counter() - start_time
    return fit


def _split_by_site(density, flat: torch.Tensor) -> dict:
    """A guide's flat unconstrained vector ``[D]`` (the density's packing order) by site,
    each in its unconstrained shape."""
    out, offset = {}, 0
    for site in density.sites:
        shape = biject_to(site.support).inverse_shape(torch.Size(site.shape))
        n = int(torch.Size(shape).numel())
        out[site.name] = flat[offset:offset + n].reshape(shape)
        offset += n
    return out


def _gather_site(x: torch.Tensor, site, axis: int, sizes: list) -> torch.Tensor:
    """A subject site's ``x`` (this rank's rows on ``axis``) -> all ranks' rows, in rank order
    (on every rank)."""
    moved = x.movedim(axis, 0)
    rows = _all_gather_rows(moved.reshape(moved.shape[0], -1), sizes)
    return rows.reshape(rows.shape[0], *moved.shape[1:]).movedim(0, axis)


#: method -> the subject-sharded fit
FITS = {"mle": fit_mle_distributed, "saem": fit_saem_distributed, "vi": fit_vi_distributed}

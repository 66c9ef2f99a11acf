"""Run a one-draw Pyro program for N draws.

genprog evaluates a model for many draws at once (chains, particles, prior and posterior
draws). There are three ways to do that, fastest first:

``"plate"``
    Run the program once inside a particle plate at dim ``-(max_plate_nesting + 1)``;
    needs a model that broadcasts over extra leading batch dims (as Pyro's
    enumeration does).
``"vmap"``
    Run the program for one draw under :func:`torch.func.vmap` over the draw dim; the
    model sees single-draw shapes, so ``X @ w``, ``torch.cat``, ``x[:, 0]`` and Python
    loops over ``t`` work as written. Pyro's validation (Python branches on tensor
    values) is switched off inside the vmapped region; distributions whose samplers
    cannot run under vmap are drawn by :class:`VmapSafeSampling`.
``"loop"``
    Run the one-draw program once per draw; the last resort for models that branch in
    Python on a latent value or call ``.item()``. Chosen with one
    :class:`~genprog.errors.VectorizationWarning` naming the reason and the cost.

:func:`choose_batching` picks the path once (by a probe of two draws that the faster
path must reproduce draw by draw) and caches the :class:`Batching` decision in the
caller's dict, e.g. :attr:`genprog.sites.ModelStructure.batching`.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.distributions import MultivariateNormal, StudentT
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.infer import config_enumerate, infer_discrete
from pyro.poutine.messenger import Messenger
from torch._C._functorch import _add_batch_dim, is_batchedtensor, maybe_current_level
from torch.distributions import Beta, Dirichlet, Independent, TransformedDistribution
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from .errors import VectorizationWarning
from .handlers import SubstituteBatched, SubstituteValues
from .sites import PARTICLE_PLATE, is_model_site

#: the batching paths, fastest first
BATCHINGS = ("plate", "vmap", "loop")


@dataclass(frozen=True)
class Batching:
    """How a program is run for many draws.

    Attributes
    ----------
    mode : str
        ``"plate"``, ``"vmap"`` or ``"loop"`` (see the module docstring).
    reason : str or None
        Why the faster paths were not taken (None for ``"plate"``).
    """

    mode: str
    reason: str | None = None


# --------------------------------------------------------------------------- plate path
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


def in_particle_plate(program, n: int, max_plate_nesting: int):
    """``program`` run inside the particle plate of size ``n`` at dim ``-(k + 1)``."""

    def vectorized(*args, **kwargs):
        with pyro.plate(PARTICLE_PLATE, n, dim=-(max_plate_nesting + 1)):
            return program(*args, **kwargs)

    return vectorized


def sum_to_particles(lp: torch.Tensor, n: int, max_plate_nesting: int) -> torch.Tensor:
    """Sum a site's log density traced under the particle plate to ``[n]``."""
    k = max_plate_nesting
    if lp.dim() < k + 1:
        return lp.sum().expand(n)
    lp = lp.movedim(-(k + 1), 0)
    return lp.reshape(lp.shape[0], -1).sum(-1).expand(n)


# --------------------------------------------------------------------------- vmap path
def _is_vmap_limitation(e: BaseException) -> bool:
    msg = str(e)
    return isinstance(e, RuntimeError) and ("vmap" in msg or "functorch" in msg
                                            or "setup_context" in msg)


def _uniform(shape, like: torch.Tensor) -> torch.Tensor:
    tiny = torch.finfo(like.dtype).tiny
    return torch.rand(shape, dtype=like.dtype, device=like.device).clamp(tiny, 1 - 1e-7)


def _standard_gamma(concentration: torch.Tensor, shape) -> torch.Tensor:
    return torch._standard_gamma(concentration.expand(shape)).clamp(min=torch.finfo(concentration.dtype).tiny)


def draw_without_inplace_randomness(fn, sample_shape=torch.Size()) -> torch.Tensor:
    """A draw of ``fn`` built from random ops that ``vmap(randomness="different")``
    batches (``torch.rand``, ``randn``, ``_standard_gamma``): the fallback of
    :class:`VmapSafeSampling` where torch's own sampler fails under vmap (Beta and
    Dirichlet use an autograd Function without a vmap rule; samplers that fill a fresh
    tensor in place are otherwise covered by :class:`BatchedFactories`).

    Raises
    ------
    NotImplementedError
        For a distribution with none of these constructions.
    """
    shape = fn.shape(sample_shape)
    if isinstance(fn, (Independent, MaskedDistribution)):
        return draw_without_inplace_randomness(fn.base_dist, sample_shape)
    if isinstance(fn, TransformedDistribution):
        x = draw_without_inplace_randomness(fn.base_dist, sample_shape)
        for t in fn.transforms:
            x = t(x)
        return x
    if isinstance(fn, MultivariateNormal):
        eps = torch.randn(shape, dtype=fn.loc.dtype, device=fn.loc.device)
        return fn.loc + (fn.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
    if isinstance(fn, StudentT):
        z = torch.randn(shape, dtype=fn.loc.dtype, device=fn.loc.device)
        chi2 = 2 * _standard_gamma(0.5 * fn.df, shape)
        return fn.loc + fn.scale * z * torch.rsqrt(chi2 / fn.df)
    if isinstance(fn, Dirichlet):
        g = _standard_gamma(fn.concentration, shape)
        return g / g.sum(-1, keepdim=True)
    if isinstance(fn, Beta):
        a = _standard_gamma(fn.concentration1, shape)
        b = _standard_gamma(fn.concentration0, shape)
        return a / (a + b)
    try:  # inverse CDF of a uniform draw (Cauchy, Exponential, Laplace, HalfCauchy, ...)
        like = fn.mean if fn.mean.is_floating_point() else torch.zeros(())
        return fn.icdf(_uniform(shape, like))
    except (NotImplementedError, AttributeError, RuntimeError) as e:
        raise NotImplementedError(f"no vmap-safe sampler for {type(fn).__name__}") from e


class VmapSafeSampling(Messenger):
    """Draw unobserved sites whose sampler fails under vmap from
    :func:`draw_without_inplace_randomness` instead (outermost handler of a one-draw
    program run under ``vmap(randomness="different")``)."""

    def _pyro_sample(self, msg):
        if msg["value"] is not None or msg["is_observed"] or msg["done"]:
            return
        fn = msg["fn"]
        try:
            value = fn(*msg["args"], **msg["kwargs"])
        except RuntimeError as e:
            if not _is_vmap_limitation(e):
                raise
            value = draw_without_inplace_randomness(fn, msg["kwargs"].get("sample_shape", torch.Size()))
        msg["value"] = value


_FACTORIES = frozenset({
    torch.empty, torch.zeros, torch.ones, torch.full,
    torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like,
    torch.Tensor.new, torch.Tensor.new_empty, torch.Tensor.new_zeros, torch.Tensor.new_ones,
    torch.Tensor.new_full,
})


class BatchedFactories(TorchFunctionMode):
    """Inside a vmapped one-draw program, fresh tensors from factories (``torch.zeros``,
    ``torch.empty``, ``x.new_zeros``, ...) are made batched over the ``n`` draws.

    vmap cannot write a batched value in place into an unbatched tensor, which is how
    programs fill preallocated buffers: ``h = torch.zeros(T); h[t] = ...`` in a model,
    ``solution[j] = ...`` in torchdiffeq's solvers, ``torch.empty(shape).normal_()`` in
    torch's samplers. A batched buffer takes such writes (and in-place random fills draw
    differently per draw).
    """

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _FACTORIES and torch.is_tensor(out) and out.device.type != "meta":
            level = maybe_current_level()
            if level is not None and not is_batchedtensor(out):
                out = _add_batch_dim(out.expand(self.n, *out.shape).contiguous(), 0, level)
        return out


@contextlib.contextmanager
def quiet_vmap():
    """Pyro's validation off (its checks branch on tensor values in Python) and
    functorch's "no batching rule, slow fallback" notices muted."""
    with pyro.validation_enabled(False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*performance drop because we have not yet implemented")
        yield


def run_draws(one_draw, inputs, n: int, mode: str, randomness: str = "same"):
    """``one_draw(inputs_i)`` for ``i < n``, its outputs stacked along a new dim 0.

    Parameters
    ----------
    one_draw : callable
        Maps a pytree of one draw's tensors to a pytree of tensors.
    inputs : pytree of Tensor
        Each leaf ``[n, ...]`` (may have no leaves: then the draws differ by randomness).
    n : int
    mode : {"vmap", "loop"}
    randomness : {"same", "different", "error"}
        vmap's treatment of random ops (``"different"`` for sampling).

    Returns
    -------
    pytree of Tensor
        Each leaf ``[n, ...]``.
    """
    has_leaves = bool(tree_flatten(inputs)[0])
    if n == 1:  # one draw needs no batching at all
        with quiet_vmap() if mode == "vmap" else contextlib.nullcontext():
            out = one_draw(tree_map(lambda x: x[0], inputs))
        return tree_map(lambda x: x.unsqueeze(0), out)
    if mode == "vmap":
        def batched_one_draw(x):
            with BatchedFactories(n):
                return one_draw(x if has_leaves else inputs)

        with quiet_vmap():
            return torch.func.vmap(batched_one_draw, randomness=randomness)(inputs if has_leaves else torch.zeros(n))
    if mode != "loop":
        raise ValueError(f"run_draws: mode must be 'vmap' or 'loop', got {mode!r}")
    outs = [one_draw(tree_map(lambda x, i=i: x[i], inputs)) for i in range(n)]
    leaves0, spec = tree_flatten(outs[0])
    stacked = [torch.stack([tree_flatten(o)[0][j] for o in outs]) for j in range(len(leaves0))]
    return spec.unflatten(stacked)


# --------------------------------------------------------------------------- decision
def agree(a, b) -> bool:
    """Whether two pytrees of tensors are equal up to float rounding and solver tolerance
    (NaN equals NaN)."""
    la, lb = tree_flatten(a)[0], tree_flatten(b)[0]
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if x.shape != y.shape:
            return False
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return False
            continue
        # loose enough for adaptive solvers (an ODE's steps differ between a batch and one
        # draw), tight enough to catch a model that does not broadcast (values differ at O(1))
        tol = 1e-4 if x.dtype == torch.float64 else 2e-3
        if not torch.allclose(x.detach(), y.detach().to(x.dtype), rtol=tol, atol=tol, equal_nan=True):
            return False
    return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def choose_batching(cache: dict, key, *, plate, one_draw, probe, randomness: str = "same",
                    check=None, what: str = "the model") -> Batching:
    """Pick (once per ``key``; cached in ``cache``) how to run a program for many draws.

    The plate path is taken when it runs and reproduces the one-draw program draw by
    draw on the probe; else vmap when it runs and reproduces it; else the loop (with one
    :class:`~genprog.errors.VectorizationWarning`).

    Parameters
    ----------
    cache : dict
        Where decisions live (e.g. ``ModelStructure.batching``).
    key : hashable
    plate : callable
        ``plate(inputs) -> outputs``: the particle-plate run for all draws of ``inputs``.
    one_draw : callable
        ``one_draw(inputs_i) -> outputs_i``: one draw, unbatched.
    probe : pytree of Tensor or int
        Inputs for two (or more) draws, leaves ``[m, ...]``; or the number ``m`` of
        draws when they differ only by randomness.
    randomness : str
        vmap's randomness mode for ``one_draw``.
    check : callable, optional
        ``check(mode, outputs) -> bool`` for random programs, whose outputs cannot be
        compared with separate one-draw runs. Default: the outputs must equal those of
        ``one_draw`` draw by draw.
    what : str
        What runs, for the warning.

    Returns
    -------
    Batching
    """
    if key in cache:
        return cache[key]
    leaves = [] if isinstance(probe, int) else tree_flatten(probe)[0]
    m = probe if isinstance(probe, int) else (leaves[0].shape[0] if leaves else 2)
    inputs = {} if isinstance(probe, int) else probe
    reasons = []
    decision = None
    # the probe must not move torch's RNG: a seeded run gives the same draws whether or
    # not its batching was decided before
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with pyro.validation_enabled(False), torch.no_grad(), torch.random.fork_rng(devices=devices):
        start = time.perf_counter()
        ref = run_draws(one_draw, inputs, m, "loop")  # the model's own errors surface here
        per_draw_s = (time.perf_counter() - start) / m
        for mode in ("plate", "vmap"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = plate(inputs) if mode == "plate" else run_draws(one_draw, inputs, m, "vmap", randomness)
                    ok = check(mode, out) if check is not None else agree(out, ref)
            except Exception as e:  # noqa: BLE001 - any failure of a faster path means: next path
                reasons.append(f"{mode}: {_first_line(e)}")
                continue
            if ok:
                decision = Batching(mode, "; ".join(reasons) or None)
                break
            reasons.append(f"{mode}: the batched run disagrees with one-draw runs")
    if decision is None:
        decision = Batching("loop", "; ".join(reasons))
    if decision.mode == "loop" and not cache.get("warned"):  # once per cache (model structure)
        cache["warned"] = True
        warnings.warn(
            f"{what} can be run neither batched in a plate nor under torch.func.vmap "
            f"({decision.reason}); genprog runs it once per draw instead, about "
            f"{1e3 * per_draw_s:.2g} ms per draw (N draws cost N runs: slow for many "
            "chains, particles or draws, but exact)",
            VectorizationWarning, stacklevel=4)
    cache[key] = decision
    return decision


# --------------------------------------------------------------------------- sampling
def _log_joint_per_particle(tr, n: int, k: int) -> torch.Tensor:
    """Per-particle sum of every sample site's log density in a particle-plate trace."""
    total = torch.zeros(n)
    for node in tr.nodes.values():
        if is_model_site(node):
            total = total + sum_to_particles(node["fn"].log_prob(node["value"]), n, k).to(total.dtype)
    return total


def _log_joint_one_draw(tr) -> torch.Tensor:
    total = torch.zeros(())
    for node in tr.nodes.values():
        if is_model_site(node):
            total = total + node["fn"].log_prob(node["value"]).sum().to(total.dtype)
    return total


def sample_sites(program, args, kwargs, names_shapes: dict, n: int, max_plate_nesting: int,
                 cache: dict, values: dict | None = None, discrete_posterior: bool = False,
                 ) -> tuple[dict, Batching]:
    """Run ``program`` forward for ``n`` draws and return site values.

    The plate path is checked on a probe of two draws: each plate draw must get, from
    the plate run, the log density a one-draw run gives the same values (a model that
    broadcasts wrongly, e.g. ``w[0]`` meaning the first coefficient, fails the check).

    Parameters
    ----------
    program : callable
        A Pyro program (one draw).
    args, kwargs
        Its inputs.
    names_shapes : dict[str, tuple]
        Sites to return and the shape of one value (sample or deterministic sites).
    n : int
    max_plate_nesting : int
    cache : dict
        Where the batching decision is cached (a ModelStructure's ``batching``).
    values : dict[str, Tensor], optional
        Site values ``[n, *shape]`` substituted (kept latent), e.g. posterior draws for
        predictions.
    discrete_posterior : bool
        Draw the enumerable discrete latents from their conditional given everything
        else (Pyro's ``infer_discrete``, temperature 1).

    Returns
    -------
    dict[str, Tensor]
        ``site -> [n, *shape]``.
    Batching
        The path taken.
    """
    values = values or {}
    k = max_plate_nesting

    def with_discrete(prog, first_dim):
        if not discrete_posterior:
            return prog
        return infer_discrete(config_enumerate(prog, default="parallel"),
                              first_available_dim=first_dim, temperature=1)

    def plate_trace(vals, m):
        prog = with_discrete(in_particle_plate(SubstituteBatched(vals, k)(program), m, k), -(k + 2))
        return poutine.trace(prog).get_trace(*args, **kwargs)

    def one_trace(vals):
        prog = with_discrete(SubstituteValues(vals)(program), -(k + 1))
        with VmapSafeSampling():
            return poutine.trace(prog).get_trace(*args, **kwargs)

    def one_draw(vals):
        tr = one_trace(vals)
        return {name: tr.nodes[name]["value"].expand(shape) for name, shape in names_shapes.items()}

    probe = {name: v[:2] for name, v in values.items()}
    if values and next(iter(probe.values())).shape[0] < 2:
        probe = {name: v[:1].expand(2, *v.shape[1:]) for name, v in values.items()}
    m = 2

    def check(mode, out):
        if mode == "vmap":
            return True  # random draws: vmap runs the one-draw program as written
        tr = out
        first = one_trace({name: v[0] for name, v in probe.items()})
        shapes = {name: node["value"].shape for name, node in first.nodes.items() if is_model_site(node)}
        drawn = {name: particle_dims_to_front(tr.nodes[name]["value"], m, len(shape))
                 for name, shape in shapes.items()}
        for name, shape in names_shapes.items():  # the requested sites must line up too
            particle_dims_to_front(tr.nodes[name]["value"], m, len(shape))
        got = _log_joint_per_particle(tr, m, k)
        ref = torch.stack([
            _log_joint_one_draw(poutine.trace(SubstituteValues({kk: v[i] for kk, v in drawn.items()})(program))
                                .get_trace(*args, **kwargs))
            for i in range(m)])
        return agree(got, ref)

    key = ("sample", tuple(sorted(names_shapes)), tuple(sorted(values)), discrete_posterior)
    decision = choose_batching(cache, key, plate=lambda vals: plate_trace(vals, m), one_draw=one_draw,
                               probe=probe if probe else m, randomness="different", check=check,
                               what="the model's forward run")
    if decision.mode == "plate":
        tr = plate_trace(values, n)
        out = {name: particle_dims_to_front(tr.nodes[name]["value"], n, len(shape))
               for name, shape in names_shapes.items()}
    else:
        out = run_draws(one_draw, values, n, decision.mode, randomness="different")
    return out, decision

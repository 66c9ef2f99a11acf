"""A model's potential compiled once into a flat tensor program.

:meth:`JointDensity.potential_and_grad <genprog.density.JointDensity.potential_and_grad>`
re-runs the Pyro program (effect handlers, distribution objects, transforms) and the
autograd tape for every call. During MCMC the program's *structure* never changes, only
the values of the latents, so :class:`CompiledPotential` records the whole computation
once per batch size ``N`` and replays it:

``"fx"`` (default, fastest)
    ``torch.fx.experimental.proxy_tensor.make_fx`` records the forward pass **and** its
    backward (the ops autograd runs) as one flat graph of ATen ops ``z [N, D] -> (U [N],
    dU/dz [N, D])``; the graph is then handed to ``torch.jit.trace`` so that it runs in
    TorchScript's C++ interpreter with no Python and no autograd tape per call. Python
    branches on *data* (e.g. ``if bool(data.blq.any())``) are evaluated once and burned in.
``"inductor"`` (opt in: ``compile="inductor"``)
    The same recorded graph compiled by ``torch._inductor`` (Inductor's C++/OpenMP code
    generation on the CPU, Triton on CUDA): the ~660 ATen ops of theo_sd fuse into a few
    loops. 0.04 ms per call at 4 chains against the TorchScript replay's 0.83 ms (CPU ms,
    float32, 1 thread), agreeing with it to 7e-8 relative; but compiling takes 30-95 s
    (Inductor's on-disk cache in ``/tmp/torchinductor_<user>`` makes a repeat faster,
    30 s here, not free), so it is not the default: it pays off for long runs.
``"jit"`` (fallback)
    Pyro's own ``jit_compile=True`` recipe (``pyro/infer/mcmc/util.py``: ``_PEMaker``,
    ``pyro/ops/jit.py``): ``torch.jit.trace`` of the log joint, with autograd through the
    traced graph at every call.
``"eager"``
    ``density.potential_and_grad`` itself: used for models with enumerated discrete
    sites, for models run draw by draw (``density.batching == "loop"``, see
    :mod:`genprog.vectorize`), or when both recordings fail or disagree with the model.

A model that does not broadcast runs under ``torch.func.vmap`` of a one-draw program
(``density.batching == "vmap"``); ``make_fx`` records through the vmap into the same
flat graph of batched ATen ops, validated against the eager potential as below.

Measured on theo_sd (one-compartment population PK, D = 43, float32, 1 CPU thread, a
loaded 2-core VM), milliseconds per potential-and-gradient call for all chains:

======  =======  =====  =====
chains  eager    jit    fx
======  =======  =====  =====
4       7.9      2.7    0.9
256     10.1     4.8    4.2
======  =======  =====  =====

(Inductor on the same fx graph, ``"inductor"`` above: 0.04 ms at 4 chains after 30-95 s of
compilation. An earlier attempt through ``torch.compile`` was no faster and disagreed with
eager; compiling the recorded ATen graph directly with ``compile_fx`` does neither.)

Every recording is *validated* before use: at the point where it was recorded and at
two perturbed points its output must match the eager potential (relative ``1e-4`` in
float32, ``1e-8`` in float64). Control flow that depends on the latent values would be
burned in silently by either recorder; the check catches the cases where it changes the
result, and the potential then falls back to the next mode with one
:class:`CompileWarning`. The contract is that of ``potential_and_grad``: ``U = +inf``
with a zero gradient wherever ``U`` or the gradient is not finite.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import pyro
import torch

from ..density import JointDensity
from ..errors import CompileWarning

__all__ = ["MODES", "CompileWarning", "CompiledPotential", "compile_potential"]

#: compilation modes, fastest first (``compile=True`` starts at ``"fx"``)
MODES = ("inductor", "fx", "jit", "eager")


@dataclass(frozen=True)
class CompileRecord:
    """How the potential for one batch size was obtained.

    Attributes
    ----------
    n : int
        Batch size (number of chains / particles) the recording is for.
    mode : str
        ``"inductor"``, ``"fx"``, ``"jit"`` or ``"eager"`` (see the module docstring).
    compile_time_s : float
        Seconds spent recording and validating (all modes tried).
    fallback_reason : str or None
        Why a faster mode was not used.
    """

    n: int
    mode: str
    compile_time_s: float
    fallback_reason: str | None = None


def _finish(U: torch.Tensor, grad: torch.Tensor | None, z: torch.Tensor):
    """Apply the ``potential_and_grad`` contract: non-finite -> (+inf, zero gradient)."""
    grad = torch.zeros_like(z) if grad is None else grad
    bad = ~torch.isfinite(U) | ~torch.isfinite(grad).all(-1)
    U = torch.where(bad, torch.full_like(U, float("inf")), U).detach()
    grad = torch.where(bad.unsqueeze(-1), torch.zeros_like(grad), grad).detach()
    return U, grad


class CompiledPotential:
    """``z [N, D] -> (U [N], dU/dz [N, D])`` of a :class:`JointDensity`, recorded once per
    ``(N, dtype, device)`` and replayed without running Pyro.

    Parameters
    ----------
    density : JointDensity
    mode : {"inductor", "fx", "jit", "eager"}
        The fastest mode to try; slower ones are the fallbacks.
    validate : bool
        Check each recording against the eager potential before using it.

    Attributes
    ----------
    records : dict[int, CompileRecord]
        One per batch size seen so far.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, torch, genprog as gp
    >>> def m(y=None):
    ...     mu = pyro.sample("mu", dist.Normal(0., 1.))
    ...     pyro.sample("y", dist.Normal(mu, 1.), obs=y)
    >>> density = gp.Model(m).condition(y=torch.tensor(1.)).density()
    >>> pg = CompiledPotential(density)
    >>> U, g = pg(torch.zeros(3, 1))
    >>> pg.records[3].mode, U.shape, g.shape
    ('fx', torch.Size([3]), torch.Size([3, 1]))
    """

    def __init__(self, density: JointDensity, mode: str = "fx", validate: bool = True):
        if mode not in MODES:
            raise ValueError(f"compile mode must be one of {MODES}, got {mode!r}")
        self.density = density
        self.mode = mode
        self.validate = validate
        self.records: dict[int, CompileRecord] = {}
        self._fns: dict[tuple, object] = {}
        self._warned = False

    # ---------------------------------------------------------------- recording
    def _forward(self, z: torch.Tensor) -> torch.Tensor:
        with pyro.validation_enabled(False):
            return -self.density.log_joint(z)

    def _graph(self, z: torch.Tensor):
        """The recorded forward+backward ``torch.fx.GraphModule`` ``z -> (U, grad)``."""
        from torch.fx.experimental.proxy_tensor import make_fx

        def potential_and_grad(z):
            with torch.enable_grad():
                z = z.detach().requires_grad_(True)
                U = self._forward(z)
                grad, = torch.autograd.grad(U.sum(), z, allow_unused=True)
            return _finish(U, grad, z)  # recorded too: no eager ops around the replay

        # Branches on data are evaluated on the real tensors while recording (as
        # torch.jit.trace does); the validation below guards against latent-dependent ones.
        graph = make_fx(potential_and_grad, _error_on_data_dependent_ops=False)(z)
        graph.graph.eliminate_dead_code()
        graph.recompile()
        return graph

    def _record_fx(self, z: torch.Tensor):
        return torch.jit.trace(self._graph(z), (z,), check_trace=False)

    def _record_inductor(self, z: torch.Tensor):
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(self._graph(z), [z])

        def call(z):
            return tuple(compiled(z))

        return call

    def _record_jit(self, z: torch.Tensor):
        traced = torch.jit.trace(self._forward, (z,), check_trace=False)

        def call(z):
            with torch.enable_grad():
                z = z.detach().requires_grad_(True)
                U = traced(z)
                grad, = torch.autograd.grad(U.sum(), z, allow_unused=True)
            return _finish(U, grad, z)

        return call

    def _check(self, fn, z: torch.Tensor) -> str | None:
        """None when ``fn`` matches the eager potential at ``z`` and two perturbed
        points, else what differs."""
        g = torch.Generator(device=z.device).manual_seed(0)
        tol = 1e-8 if z.dtype == torch.float64 else 1e-4
        points = [z] + [z + s * torch.randn(z.shape, generator=g, device=z.device, dtype=z.dtype)
                        for s in (0.1, 1.0)]
        for i, p in enumerate(points):
            for _ in range(3 if i == 0 else 1):  # TorchScript optimises after a few runs
                U, grad = fn(p)
            U0, g0 = self.density.potential_and_grad(p)
            if not torch.equal(torch.isfinite(U), torch.isfinite(U0)):
                return f"finite potentials differ at check point {i}"
            ok = torch.isfinite(U0)
            scale = U0[ok].abs().max().clamp(min=1.0) if bool(ok.any()) else 1.0
            gscale = g0[ok].abs().max().clamp(min=1.0) if bool(ok.any()) else 1.0
            du = float((U[ok] - U0[ok]).abs().max() / scale) if bool(ok.any()) else 0.0
            dg = float((grad[ok] - g0[ok]).abs().max() / gscale) if bool(ok.any()) else 0.0
            if not (du <= tol and dg <= tol):
                return (f"the recording disagrees with the model at check point {i} "
                        f"(relative error {max(du, dg):.2g}); the model may branch on latent "
                        "values in Python")
        return None

    def _build(self, z: torch.Tensor):
        n = z.shape[0]
        start = time.perf_counter()
        if self.density.has_enumeration or self.density.batching == "loop":
            fn, mode, reason = self.density.potential_and_grad, "eager", (
                "enumerated discrete sites are summed out by Pyro at every call"
                if self.density.has_enumeration else
                "the model runs draw by draw (batching 'loop'): a recording would burn in "
                "its Python branches on latent values")
            self.records[n] = CompileRecord(n, mode, time.perf_counter() - start, reason)
            return fn
        reasons = []
        for mode in MODES[MODES.index(self.mode):]:
            if mode == "eager":
                fn = self.density.potential_and_grad
                break
            try:
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore")  # TracerWarnings about burned-in branches
                    z0 = z.detach().clone()
                    fn = {"inductor": self._record_inductor, "fx": self._record_fx,
                          "jit": self._record_jit}[mode](z0)
                    problem = self._check(fn, z0) if self.validate else None
            except Exception as e:  # noqa: BLE001 - any failure to record means: fall back
                problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if problem is None:
                break
            reasons.append(f"{mode}: {problem}")
        reason = "; ".join(reasons) or None
        self.records[n] = CompileRecord(n, mode, time.perf_counter() - start, reason)
        if reasons and not self._warned:
            self._warned = True
            warnings.warn(f"could not compile the model's potential ({reason}); using the "
                          f"{mode!r} path, which is slower but exact", CompileWarning,
                          stacklevel=3)
        return fn

    # ---------------------------------------------------------------- calling
    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``U [N]`` and ``dU/dz [N, D]`` at ``z [N, D]`` (recorded on the first call with
        this ``N``, dtype and device)."""
        key = (z.shape[0], z.dtype, z.device)
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = self._build(z)
        return fn(z.detach())

    def describe(self) -> dict:
        """``{"mode", "compile_time_s", "fallback_reason"}`` over the batch sizes seen."""
        recs = list(self.records.values())
        return {
            "mode": ",".join(sorted({r.mode for r in recs})) if recs else None,
            "compile_time_s": sum(r.compile_time_s for r in recs),
            "fallback_reason": next((r.fallback_reason for r in recs if r.fallback_reason), None),
        }


def compile_potential(density: JointDensity, compile: bool | str = True):
    """The batched potential to sample with: compiled (``True`` or a mode name) or the
    generic ``density.potential_and_grad`` (``False``)."""
    if compile is False:
        return density.potential_and_grad
    if compile is True:
        return CompiledPotential(density)
    if isinstance(compile, str):
        return CompiledPotential(density, mode=compile)
    raise TypeError(f"compile must be True, False or one of {MODES}, got {compile!r}")

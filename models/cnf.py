"""Continuous normalizing flows (Chen et al. 2018; Grathwohl et al. 2019): ``y = z(1)``
where ``dz/dt = f(z, t)`` from ``z(0) ~ N(0, I_d)``, ``f`` a neural vector field, solved
with :func:`torchdiffeq.odeint`.

By the instantaneous change of variables, ``d log p(z(t)) / dt = -tr(df/dz)``, so

    log p(y) = log N(z(0); 0, I) - integral_0^1 tr(df/dz)(z(t), t) dt,

computed by integrating the state and the trace backwards from ``z(1) = y``. The trace
is exact (``d`` backward passes, fine in low dimension) for ``log_prob``; training uses
Hutchinson's unbiased estimator ``eps^T (df/dz) eps`` with Rademacher ``eps`` (one
backward pass). ``log_prob`` is exact up to the ODE solver's tolerance (``rtol``,
``atol``), which the tests check against a tighter solve and against the closed form
of a linear field (``f = A z``: ``y = expm(A) z(0)`` is Gaussian).

Shapes: ``d`` (``dim``); data ``[N, d]``.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints
from torchdiffeq import odeint

from genprog.optim import minimize
from genprog.rng import seeded
from genprog.validation import check_int

from .base import (
    EstimatedMarginal,
    ZooModel,
    conditional_by_inference,
    renamed_keywords,
    sample_rows,
    training_record,
)

_LOG_2PI = math.log(2 * math.pi)


class VectorField(nn.Module):
    """``f(z, t)``: an MLP on ``[z, t]`` with smooth (tanh) activations, ``[..., d] -> [..., d]``."""

    def __init__(self, dim: int, hidden=(32, 32)):
        super().__init__()
        dim = check_int("VectorField: dim", dim)
        layers, prev = [], dim + 1
        for width in hidden:
            layers += [nn.Linear(prev, width), nn.Tanh()]
            prev = width
        layers.append(nn.Linear(prev, dim))
        self.net = nn.Sequential(*layers)
        self.dim = dim

    def forward(self, t, z):
        tt = torch.as_tensor(t, dtype=z.dtype, device=z.device).expand(*z.shape[:-1], 1)
        return self.net(torch.cat([z, tt], -1))


class LinearField(nn.Module):
    """``f(z, t) = A z`` (its flow is ``z(1) = expm(A) z(0)``; a closed-form check)."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(torch.as_tensor(A))
        self.dim = self.A.shape[0]

    def forward(self, t, z):
        return z @ self.A.T


def _exact_trace(f, z):
    """``tr(df/dz)`` ``[N]`` by ``d`` vector-Jacobian products (``f`` of ``z [N, d]``)."""
    tr = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for i in range(z.shape[-1]):
        tr = tr + torch.autograd.grad(f[:, i].sum(), z, create_graph=True)[0][:, i]
    return tr


class _Augmented(nn.Module):
    """The ODE of ``(z, a)`` with ``da/dt = tr(df/dz)`` (exact, or Hutchinson with ``eps``)."""

    def __init__(self, field, eps=None):
        super().__init__()
        self.field = field
        self.eps = eps

    def forward(self, t, state):
        z = state[..., :-1]
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.requires_grad_(True)
            f = self.field(t, z)
            if self.eps is None:
                tr = _exact_trace(f, z)
            else:
                vjp = torch.autograd.grad(f, z, self.eps, create_graph=True)[0]
                tr = (vjp * self.eps).sum(-1)
        return torch.cat([f, tr.unsqueeze(-1)], -1)


def cnf_log_prob(field, y, rtol=1e-5, atol=1e-7, method="dopri5", eps=None, options=None):
    """``log p(y)`` ``[N]`` of the flow of ``field`` at data ``y [N, d]`` (see module doc)."""
    state = torch.cat([y, torch.zeros(*y.shape[:-1], 1, dtype=y.dtype, device=y.device)], -1)
    times = torch.tensor([1.0, 0.0], dtype=y.dtype, device=y.device)
    out = odeint(_Augmented(field, eps), state, times, rtol=rtol, atol=atol, method=method,
                 options=options)[-1]
    z0, a0 = out[..., :-1], out[..., -1]
    d = y.shape[-1]
    return -0.5 * (z0 ** 2).sum(-1) - 0.5 * d * _LOG_2PI + a0


class _CNFDistribution(dist.TorchDistribution):
    arg_constraints: dict = {}
    support = constraints.real_vector

    def __init__(self, field, dim, rtol, atol, batch_shape=torch.Size()):
        self.field, self.rtol, self.atol = field, rtol, atol
        super().__init__(torch.Size(batch_shape), torch.Size([dim]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return _CNFDistribution(self.field, self.event_shape[0], self.rtol, self.atol, batch_shape)

    def log_prob(self, value):
        flat = value.reshape(-1, value.shape[-1])
        return cnf_log_prob(self.field, flat, self.rtol, self.atol).reshape(value.shape[:-1])

    def sample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        p = next(self.field.parameters())
        z0 = torch.randn(shape, dtype=p.dtype, device=p.device)
        times = torch.tensor([0.0, 1.0], dtype=p.dtype, device=p.device)
        with torch.no_grad():
            return odeint(self.field, z0, times, rtol=self.rtol, atol=self.atol)[-1]


class ContinuousFlow(ZooModel):
    """A continuous normalizing flow over ``R^d``.

    Parameters
    ----------
    field : nn.Module
        The vector field ``f(t, z)`` (``forward(t, z [..., d]) -> [..., d]``), e.g.
        :class:`VectorField`.
    dim : int
    rtol, atol : float
        ODE solver tolerances for ``log_prob`` and sampling (dopri5).

    Attributes
    ----------
    info : dict
        The training record, set by :meth:`mle`: ``loss_trace`` (list of float, the
        minibatch loss at every Adam step), ``num_steps`` (int, steps taken),
        ``converged`` (bool, whether the plateau rule fired before ``max_iters``).
    """

    mle_kind = "maximum likelihood (Adam, Hutchinson trace)"

    def __init__(self, *, field: nn.Module, dim: int, rtol: float = 1e-5, atol: float = 1e-7):
        if not isinstance(field, nn.Module):
            raise TypeError(f"ContinuousFlow: field must be an nn.Module, got {type(field).__name__}")
        dim = check_int("ContinuousFlow: dim", dim)
        if not (rtol > 0 and atol > 0):
            raise ValueError("ContinuousFlow: rtol and atol must be positive")
        super().__init__(field=field, dim=dim, rtol=rtol, atol=atol)

    @staticmethod
    def story(n=None, field=None, dim=1, rtol=1e-5, atol=1e-7):
        d = _CNFDistribution(field, dim, rtol, atol)
        return sample_rows(n, d)

    @property
    def field(self) -> nn.Module:
        return self.kwargs["field"]

    def to(self, device=None, dtype=None) -> ContinuousFlow:
        self.field.to(device=device, dtype=dtype)
        return super().to(device, dtype)

    def _log_prob_rows(self, y):
        p = next(self.field.parameters())
        return cnf_log_prob(self.field, y.to(p.dtype), float(self.kwargs["rtol"]),
                            float(self.kwargs["atol"]))

    def _conditional_estimate(self, obs):
        return conditional_by_inference(self, obs)

    def _marginal_estimate(self, drop):
        return EstimatedMarginal(self, drop)

    @classmethod
    @renamed_keywords(max_steps="max_iters")
    def mle(cls, y, *, hidden=(32, 32), max_iters: int = 2000, batch_size: int = 256,
            learning_rate: float = 5e-3, steps_per_solve: int = 8, window: int = 100,
            seed: int = 0, progress: bool | None = None, **tolerances) -> ContinuousFlow:
        """Train on ``y [N, d]`` by maximum likelihood with Hutchinson's trace estimator and
        a fixed-step RK4 solve (``steps_per_solve`` steps over [0, 1]) per minibatch (give
        roughly standardised data: the base is N(0, I)). Stops on a plateau of the windowed
        loss (two learning-rate cuts) or warns with a :class:`ConvergenceWarning` at
        ``max_iters`` (``max_steps``: its deprecated name); ``info`` on the result is the
        training record (see :class:`ContinuousFlow`)."""
        y = torch.as_tensor(y, dtype=torch.get_default_dtype())
        if y.dim() != 2 or not torch.isfinite(y).all():
            raise ValueError("ContinuousFlow.mle: y must be a finite [N, d] tensor")
        n, d = y.shape
        with seeded(seed):
            field = VectorField(d, hidden)
        opt = torch.optim.Adam(field.parameters(), lr=learning_rate)
        g = torch.Generator().manual_seed(seed)
        opts = {"step_size": 1.0 / steps_per_solve}

        def loss_fn(step):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
            batch = y[idx]
            eps = torch.randint(0, 2, batch.shape, generator=g).to(batch.dtype) * 2 - 1
            return -cnf_log_prob(field, batch, method="rk4", eps=eps, options=opts).mean()

        result = minimize(loss_fn, opt, max_iters=max_iters, window=window,
                          what="ContinuousFlow.mle", progress=progress)
        out = cls(field=field, dim=d, **tolerances)
        out.info = training_record(result)
        return out

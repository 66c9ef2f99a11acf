"""Latent neural ODE (Rubanova, Chen & Duvenaud 2019): a time-conditioned generative model
of irregularly sampled profiles, e.g. drug concentrations after a dose.

The story, one subject:

    z0 ~ N(0, I_k),      dz/ds = f(z, s),  s = t / time_scale,
    y(t_j) ~ p(. | g(z(t_j)))  at each observation time t_j of the subject,

with ``f`` a neural vector field (``dynamics``, solved with :func:`torchdiffeq.odeint`) and
``g`` a decoder giving one number per time: the mean of ``y`` (``likelihood="normal"``,
``y ~ N(g, obs_noise^2)``) or the mean of ``log y`` (``"lognormal"``,
``log y ~ N(g, obs_noise^2)``, a proportional error; ``exp(g)`` is the median).

Doses (single-dose profiles): with ``dose_ref`` set and a dose per subject, kinetics are
taken as *linear* — the profile scales with the dose — so the decoder describes a
subject's profile after the reference dose and the observation mean is multiplied by
``dose / dose_ref`` (``"lognormal"``: ``log(dose / dose_ref)`` is added to ``g``); the encoder
sees dose-normalized observations. Multiple doses are not modelled.

Data layout (as :class:`genprog.pk.Dataset`): a population is padded tensors
``times [N, T]``, ``y [N, T]`` and ``mask [N, T]`` (True = observed); NaN entries of ``times``
or ``y`` are read as padding too. A single subject may be given as ``[T]``. The whole
population is solved by ONE batched ODE solve (no loop over subjects): with
``solver="rk4"`` the latent states are integrated on a common uniform grid of
``step_size`` (scaled time) and read off at each subject's own times by cubic Hermite
interpolation (the vector field at the grid points gives the slopes; error O(h^4));
with ``solver="dopri5"`` the adaptive solver outputs at the sorted union of all
subjects' times, gathered per subject. (The RK4 loop is written here because
torchdiffeq's fixed-grid solvers do not return the stage slopes the interpolation uses.)

Operations:

* ``sample``: exact (ancestral) — bind the times first: ``m.at(times, dose=...).sample(k)``
  gives ``{"z0": [k, (N,) latent_dim], "y": [k, (N,) T]}``.
* ``log_prob``: estimated, :meth:`LatentODE._log_prob_estimate` — ``method="iwae"``
  (importance sampling with the encoder ``q(z0 | y)`` as proposal; the importance-weighted
  bound) or ``"is"`` (importance sampling from a Student-t around the MAP with the
  Laplace covariance). Both give an :class:`genprog.Estimate` with a delta-method stderr.
  The generic route ``m.at(times).condition(y=Y).log_marginal("ais")`` also applies.
* ``posterior_estimate``: the encoder's ``q(z0 | y)``; :meth:`LatentODE.map_latent`: the
  exact posterior mode of ``z0`` given few observations (batched L-BFGS then per-subject
  Newton on ``log p(y | z0) + log p(z0)`` with the networks fixed) and its Laplace
  covariance.
* ``predict`` (the noiseless curve at ``z0``) and ``predict_profile`` (a new subject's
  profile from its first observations, with percentile bands from posterior draws of
  ``z0``: the Laplace approximation around the MAP, or the same draws importance-
  reweighted by the exact posterior — ``method="laplace" | "is"``).
* ``mle``: amortized variational inference — Pyro SVI (``Trace_ELBO``) with a GRU encoder
  run backwards in time over the (t, y) pairs as the guide of ``z0``, Adam, plateau
  stopping or a :class:`~genprog.errors.ConvergenceWarning`.

Shapes: ``k`` (``latent_dim``) latent coordinates; ``N`` subjects, ``T`` observation slots.
"""

from __future__ import annotations

import math
import time
import uuid
import warnings
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torchdiffeq import odeint

from genprog.errors import EstimatorWarning
from genprog.estimate import Estimate
from genprog.monte_carlo import log_mean_exp
from genprog.optim import minimize
from genprog.validation import check_float, check_int

from .base import ZooModel, data_plate, renamed_keywords, training_record

LIKELIHOODS = ("normal", "lognormal")
SOLVERS = ("rk4", "dopri5")
ESTIMATE_METHODS = ("iwae", "is")
PROFILE_METHODS = ("laplace", "is")


# ---------------------------------------------------------------------- networks
class LatentDynamics(nn.Module):
    """``f(s, z)``: an MLP with tanh activations, ``[..., k] -> [..., k]``; with
    ``time_dependent`` the scaled time ``s`` is an extra input (default: autonomous)."""

    def __init__(self, latent_dim: int, hidden=(32,), time_dependent: bool = False):
        super().__init__()
        layers, prev = [], latent_dim + int(time_dependent)
        for width in hidden:
            layers += [nn.Linear(prev, int(width)), nn.Tanh()]
            prev = int(width)
        layers.append(nn.Linear(prev, latent_dim))
        self.net = nn.Sequential(*layers)
        self.time_dependent = time_dependent

    def forward(self, t, z):
        if self.time_dependent:
            tt = torch.as_tensor(t, dtype=z.dtype, device=z.device).expand(*z.shape[:-1], 1)
            z = torch.cat([z, tt], -1)
        return self.net(z)


class LinearDynamics(nn.Module):
    """``f(s, z) = A z`` (so ``z(s) = expm(A s) z0``; with a linear decoder ``y`` is Gaussian,
    the closed-form check of the tests)."""

    def __init__(self, A):
        super().__init__()
        self.A = nn.Parameter(torch.as_tensor(A).clone())

    def forward(self, t, z):
        return z @ self.A.T


class MLPDecoder(nn.Module):
    """``g(z) = shift + scale * mlp(z)``, ``[..., k] -> [...]`` (``shift`` and ``scale`` are
    buffers: the data's location and spread, set by :meth:`LatentODE.mle`)."""

    def __init__(self, latent_dim: int, hidden=(32,), shift: float = 0.0, scale: float = 1.0):
        super().__init__()
        layers, prev = [], latent_dim
        for width in hidden:
            layers += [nn.Linear(prev, int(width)), nn.Tanh()]
            prev = int(width)
        layers.append(nn.Linear(prev, 1))
        self.net = nn.Sequential(*layers)
        self.register_buffer("shift", torch.tensor(float(shift)))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, z):
        return self.shift + self.scale * self.net(z).squeeze(-1)


class LinearDecoder(nn.Module):
    """``g(z) = c . z + b``, ``[..., k] -> [...]``."""

    def __init__(self, c, b=0.0):
        super().__init__()
        self.c = nn.Parameter(torch.as_tensor(c).clone())
        self.b = nn.Parameter(torch.as_tensor(b, dtype=self.c.dtype).clone())

    def forward(self, z):
        return z @ self.c + self.b


class GRUEncoder(nn.Module):
    """``q(z0 | y)`` from a subject's observations: a GRU run backwards in time over the
    observed ``(s_j, s_{j+1} - s_j, y_feature_j)`` (padding skipped), then a linear map of
    the final state to ``(loc [N, k], scale [N, k])``.

    ``forward(s [N, T], feature [N, T], mask [N, T])``: ``s`` scaled times, ``feature``
    the observation on the decoder's scale (``y``, or ``log y``; dose-normalized), ``mask``
    True where observed. ``shift``/``scale`` buffers standardize the feature.
    """

    def __init__(self, latent_dim: int, hidden: int = 16, shift: float = 0.0, scale: float = 1.0,
                 min_scale: float = 1e-3):
        super().__init__()
        self.cell = nn.GRUCell(3, int(hidden))
        self.out = nn.Linear(int(hidden), 2 * latent_dim)
        self.latent_dim, self.hidden, self.min_scale = latent_dim, int(hidden), min_scale
        self.register_buffer("shift", torch.tensor(float(shift)))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, s, feature, mask):
        N, T = s.shape
        key = torch.where(mask, s, torch.full_like(s, math.inf))
        order = torch.argsort(key, dim=-1)
        s, x, m = (torch.gather(v, -1, order) for v in (s, feature, mask))
        x = torch.where(m, (x - self.shift) / self.scale, torch.zeros_like(x))
        s = torch.where(m, s, torch.zeros_like(s))
        h = torch.zeros(N, self.hidden, dtype=s.dtype, device=s.device)
        s_next = torch.zeros(N, dtype=s.dtype, device=s.device)
        seen = torch.zeros(N, dtype=torch.bool, device=s.device)
        for j in range(T - 1, -1, -1):  # backwards in time; a loop over time slots only
            gap = torch.where(seen, s_next - s[:, j], torch.zeros_like(s_next))
            h_new = self.cell(torch.stack([s[:, j], gap, x[:, j]], -1), h)
            h = torch.where(m[:, j, None], h_new, h)
            s_next = torch.where(m[:, j], s[:, j], s_next)
            seen = seen | m[:, j]
        out = self.out(h)
        loc, raw = out[..., :self.latent_dim], out[..., self.latent_dim:]
        return loc, nn.functional.softplus(raw) + self.min_scale


# ---------------------------------------------------------------------- the ODE solve
def _take(sol: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``sol [..., G, k]`` at grid indices ``idx [..., T]`` (broadcast) -> ``[..., T, k]``."""
    batch = torch.broadcast_shapes(sol.shape[:-2], idx.shape[:-1])
    G, k = sol.shape[-2:]
    T = idx.shape[-1]
    sol = sol.expand(*batch, G, k)
    idx = idx.expand(*batch, T)
    return torch.gather(sol, -2, idx.unsqueeze(-1).expand(*batch, T, k))


def solve_latent(dynamics, z0: torch.Tensor, s: torch.Tensor, *, solver: str = "rk4",
                 step_size: float = 0.05, rtol: float = 1e-6, atol: float = 1e-8) -> torch.Tensor:
    """Latent states ``z(s)`` ``[..., T, k]`` from ``z(0) = z0 [..., k]`` at scaled times
    ``s >= 0`` (``[T]`` shared or ``[..., T]`` per row, broadcast against ``z0``'s batch) —
    one batched solve for every row (see the module docstring for the two solvers)."""
    s = s.to(z0.dtype)
    s_max = float(s.max()) if s.numel() else 0.0
    if s_max <= 0.0:
        return z0.unsqueeze(-2).expand(*torch.broadcast_shapes(z0.shape[:-1], s.shape[:-1]),
                                       s.shape[-1], z0.shape[-1])
    if solver == "dopri5":
        union = torch.unique(torch.cat([s.new_zeros(1), s.reshape(-1)]))
        sol = odeint(dynamics, z0, union, rtol=rtol, atol=atol, method="dopri5")
        return _take(sol.movedim(0, -2), torch.searchsorted(union, s.contiguous()))
    G = max(1, math.ceil(s_max / step_size - 1e-9))
    h = s_max / G
    states, slopes = _rk4_grid(dynamics, z0, h, G)  # [..., G+1, k] each
    j = torch.clamp(torch.floor(s / h), 0, G - 1).long()
    u = (s / h - j.to(s.dtype)).clamp(0.0, 1.0).unsqueeze(-1)
    y0, y1 = _take(states, j), _take(states, j + 1)
    f0, f1 = _take(slopes, j), _take(slopes, j + 1)
    u2, u3 = u * u, u * u * u
    return ((2 * u3 - 3 * u2 + 1) * y0 + (u3 - 2 * u2 + u) * h * f0
            + (-2 * u3 + 3 * u2) * y1 + (u3 - u2) * h * f1)


def _rk4_grid(dynamics, z0, h: float, G: int):
    """Classic RK4 from ``s = 0`` with ``G`` steps of ``h``: the states and the vector field
    at the ``G + 1`` grid points, each ``[..., G+1, k]`` (the field at a grid point is the
    first stage of the next step, so the slopes for interpolation cost one extra call).

    torchdiffeq's fixed-grid solvers do not return their stages, hence this loop (over
    time steps, never over subjects)."""
    states, slopes = [z0], []
    z = z0
    for i in range(G):
        s0 = torch.as_tensor(i * h, dtype=z0.dtype, device=z0.device)
        k1 = dynamics(s0, z)
        k2 = dynamics(s0 + h / 2, z + (h / 2) * k1)
        k3 = dynamics(s0 + h / 2, z + (h / 2) * k2)
        k4 = dynamics(s0 + h, z + h * k3)
        z = z + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        slopes.append(k1)
        states.append(z)
    slopes.append(dynamics(torch.as_tensor(G * h, dtype=z0.dtype, device=z0.device), z))
    return torch.stack(states, -2), torch.stack(slopes, -2)


def _dose_factor(dose, dose_ref, like):
    """``dose / dose_ref`` as ``[N, 1]`` (or None when doses are not modelled)."""
    if dose is None or dose_ref is None:
        return None
    d = torch.as_tensor(dose, dtype=like.dtype, device=like.device)
    return (d / float(dose_ref)).reshape(-1, 1) if d.dim() else (d / float(dose_ref))


def _location(decoder, dynamics, z0, s, factor, likelihood, solver, step_size, rtol, atol):
    """The decoder's output at each time, dose applied: ``[..., T]`` (the mean of ``y`` or
    of ``log y``)."""
    z = solve_latent(dynamics, z0, s, solver=solver, step_size=step_size, rtol=rtol, atol=atol)
    g = decoder(z)
    if g.dim() == z.dim():  # decoder returned [..., T, 1]
        g = g.squeeze(-1)
    if factor is not None:
        g = g + torch.log(factor) if likelihood == "lognormal" else g * factor
    return g


def _observation(loc, noise, likelihood, mask):
    base = dist.LogNormal(loc, noise) if likelihood == "lognormal" else dist.Normal(loc, noise)
    if mask is not None:
        base = base.mask(mask)
    return base.to_event(1)


# ---------------------------------------------------------------------- result records
@dataclass(frozen=True)
class LatentMAP:
    """Posterior modes of ``z0`` (one per subject), from :meth:`LatentODE.map_latent`.

    Attributes
    ----------
    z : Tensor [N, k]
        ``argmax_z log p(y | z) + log p(z)`` with the networks fixed.
    log_joint : Tensor [N]
        ``log p(y | z) + log p(z)`` at ``z``.
    covariance : Tensor [N, k, k]
        Laplace covariance, the inverse negative Hessian of ``log_joint`` at ``z``
        (a subject whose Hessian is not negative definite gets its eigenvalues floored).
    grad_norm : Tensor [N]
        max |gradient| at ``z``.
    converged : Tensor [N] (bool)
        ``grad_norm < 1e-4 (1 + |log_joint|)`` and a negative definite Hessian.
    """

    z: torch.Tensor
    log_joint: torch.Tensor
    covariance: torch.Tensor
    grad_norm: torch.Tensor
    converged: torch.Tensor


@dataclass(frozen=True)
class ProfilePrediction:
    """Predicted profiles from :meth:`LatentODE.predict_profile`.

    Attributes
    ----------
    times : Tensor [T] or [N, T]
    map : Tensor [(N,) T]
        The curve at the MAP of ``z0``.
    median, lower, upper : Tensor [(N,) T]
        Percentiles of the posterior draws (``lower``/``upper``: the central ``level`` band).
    draws : Tensor [n, (N,) T]
        Posterior (predictive, with ``noise=True``) draws of the profile.
    z_map : LatentMAP
    method : str
        ``"laplace"`` or ``"is"``.
    details : dict
        ``ess`` [N] for ``"is"``; ``level``.
    """

    times: torch.Tensor
    map: torch.Tensor
    median: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    draws: torch.Tensor
    z_map: LatentMAP
    method: str
    details: dict = field(default_factory=dict)


# ---------------------------------------------------------------------- the model
class LatentODE(ZooModel):
    """A latent neural ODE over profiles ``y(t)`` (see the module docstring).

    Parameters
    ----------
    dynamics : torch.nn.Module
        ``forward(s, z [..., k]) -> [..., k]`` (torchdiffeq's convention; ``s`` scaled time),
        e.g. :class:`LatentDynamics`.
    decoder : torch.nn.Module
        ``z [..., k] -> [...]`` (or ``[..., 1]``), e.g. :class:`MLPDecoder`.
    latent_dim : int
        ``k``.
    encoder : torch.nn.Module, optional
        ``forward(s [N, T], feature [N, T], mask [N, T]) -> (loc [N, k], scale [N, k])``,
        e.g. :class:`GRUEncoder`; needed for IWAE and ``posterior_estimate``.
    times : array [T] or [N, T], optional
        Observation times bound to the model (for ``sample``; NaN = padding); see :meth:`at`.
    mask : bool array like ``times``, optional
    dose : float or array [N], optional
        Dose per subject (used with ``dose_ref``).
    obs_noise : float
        SD of ``y`` (``"normal"``) or of ``log y`` (``"lognormal"``).
    likelihood : {"normal", "lognormal"}
    time_scale : float
        The ODE runs in ``s = t / time_scale``.
    dose_ref : float, optional
        Reference dose: the decoder describes the profile after this dose (linear kinetics).
    solver : {"rk4", "dopri5"}
    step_size : float
        RK4 step in scaled time.
    rtol, atol : float
        dopri5 tolerances.
    name : str, optional
        Prefix of the networks in Pyro's param store (default: unique per instance).

    Attributes
    ----------
    info : dict
        The training record, set by :meth:`mle`: ``loss_trace`` (list of float, the
        negative ELBO per subject of the minibatch at every Adam step), ``num_steps`` (int,
        steps taken), ``converged`` (bool, whether the plateau rule fired before
        ``max_iters``), ``wall_time_s`` (float, training time in seconds).

    Examples
    --------
    >>> import torch
    >>> m = LatentODE(dynamics=LinearDynamics(torch.tensor([[-0.5, 1.0], [-1.0, -0.5]])),
    ...               decoder=LinearDecoder(torch.tensor([1.0, 0.0])), latent_dim=2,
    ...               obs_noise=0.1)
    >>> m.at(torch.tensor([0.5, 1.0, 2.0])).sample(4, seed=0)["y"].shape
    torch.Size([4, 3])
    """

    mle_kind = "ELBO (SVI, amortized)"

    def __init__(self, *, dynamics, decoder, latent_dim: int, encoder=None, times=None, mask=None,
                 dose=None, obs_noise: float = 0.1, likelihood: str = "normal",
                 time_scale: float = 1.0, dose_ref: float | None = None, solver: str = "rk4",
                 step_size: float = 0.05, rtol: float = 1e-6, atol: float = 1e-8,
                 name: str | None = None):
        latent_dim = check_int("LatentODE: latent_dim", latent_dim)
        for label, net in (("dynamics", dynamics), ("decoder", decoder)):
            if not isinstance(net, nn.Module):
                raise TypeError(f"LatentODE: {label} must be a torch.nn.Module, got {type(net).__name__}")
        if encoder is not None and not isinstance(encoder, nn.Module):
            raise TypeError(f"LatentODE: encoder must be a torch.nn.Module, got {type(encoder).__name__}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"LatentODE: likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if solver not in SOLVERS:
            raise ValueError(f"LatentODE: solver must be one of {SOLVERS}, got {solver!r}")
        for label, v in (("obs_noise", obs_noise), ("time_scale", time_scale),
                         ("step_size", step_size), ("rtol", rtol), ("atol", atol)):
            check_float(f"LatentODE: {label}", v, minimum=0.0, open_minimum=True)
        if dose_ref is not None and not (isinstance(dose_ref, (int, float)) and dose_ref > 0):
            raise ValueError(f"LatentODE: dose_ref must be a positive number, got {dose_ref!r}")
        if name is None:
            name = f"LatentODE_{uuid.uuid4().hex[:12]}"
        if not isinstance(name, str) or "$$$" in name:
            raise ValueError(f"LatentODE: name must be a string without '$$$', got {name!r}")
        ref = _ref_of(decoder)
        with torch.no_grad():
            z = torch.zeros(1, latent_dim, **ref)
            f = dynamics(torch.zeros((), **ref), z)
            g = decoder(z)
        if not torch.is_tensor(f) or tuple(f.shape) != (1, latent_dim):
            raise ValueError(f"LatentODE: dynamics(s, z [1, {latent_dim}]) must give [1, {latent_dim}]")
        if not torch.is_tensor(g) or tuple(g.shape) not in ((1,), (1, 1)):
            raise ValueError(f"LatentODE: decoder(z [1, {latent_dim}]) must give [1] or [1, 1]; "
                             f"got {list(g.shape) if torch.is_tensor(g) else type(g).__name__}")
        params = {"dynamics": dynamics, "decoder": decoder, "encoder": encoder,
                  "latent_dim": latent_dim, "times": None, "mask": None, "dose": None,
                  "obs_noise": float(obs_noise), "likelihood": likelihood,
                  "time_scale": float(time_scale),
                  "dose_ref": None if dose_ref is None else float(dose_ref), "solver": solver,
                  "step_size": float(step_size), "rtol": float(rtol), "atol": float(atol),
                  "name": name}
        if times is not None:
            params.update(self._design(times, mask, dose, ref, "LatentODE"))
        elif dose is not None:
            params["dose"] = self._doses(dose, None, ref, "LatentODE")
        n = params["times"].shape[0] if params["times"] is not None and params["times"].dim() == 2 else None
        super().__init__(**params)
        if n is not None:
            raw_args, raw_kwargs = self._raw_inputs
            self._raw_inputs = (raw_args, {**raw_kwargs, "n": int(n)})
            self.kwargs["n"] = int(n)

    @staticmethod
    def story(n=None, dynamics=None, decoder=None, encoder=None, latent_dim=1, times=None,
              mask=None, dose=None, obs_noise=0.1, likelihood="normal", time_scale=1.0,
              dose_ref=None, solver="rk4", step_size=0.05, rtol=1e-6, atol=1e-8, name="latent_ode"):
        """``z0 ~ N(0, I_k)`` (site ``"z0"`` ``[k]``) and ``y`` ``[T]`` at ``times`` given
        ``z0`` (site ``"y"``), per subject inside ``pyro.plate("data", n)``; padded slots
        (``mask`` False) are masked out."""
        if times is None:
            raise ValueError("LatentODE: no observation times bound; use model.at(times) first")
        dynamics = pyro.module(f"{name}.dynamics", dynamics)
        decoder = pyro.module(f"{name}.decoder", decoder)
        ref = _ref_of(decoder)
        prior = dist.Normal(torch.zeros(latent_dim, **ref), torch.ones(latent_dim, **ref)).to_event(1)
        s = times.to(**ref) / time_scale
        with data_plate(n):
            z0 = pyro.sample("z0", prior)
            loc = _location(decoder, dynamics, z0, s, _dose_factor(dose, dose_ref, s),
                            likelihood, solver, step_size, rtol, atol)
            return pyro.sample("y", _observation(loc, obs_noise, likelihood, mask))

    def __repr__(self) -> str:
        times = self.kwargs["times"]
        bound = "no times bound" if times is None else f"times {list(times.shape)}"
        return (f"LatentODE(latent_dim={self.latent_dim}, likelihood={self.likelihood!r}, "
                f"obs_noise={self.obs_noise:.4g}, {bound}, observed={sorted(self.observed)})")

    # ------------------------------------------------------------------ accessors
    @property
    def event_shape(self) -> tuple:
        times = self.kwargs["times"]
        if times is None:
            raise ValueError("LatentODE: no observation times bound; use model.at(times) first")
        return (int(times.shape[-1]),)

    dynamics = property(lambda self: self.kwargs["dynamics"])
    decoder = property(lambda self: self.kwargs["decoder"])
    encoder = property(lambda self: self.kwargs["encoder"])
    latent_dim = property(lambda self: int(self.kwargs["latent_dim"]))
    likelihood = property(lambda self: self.kwargs["likelihood"])
    obs_noise = property(lambda self: float(self.kwargs["obs_noise"]))

    def to(self, device=None, dtype=None) -> LatentODE:
        """Also moves the networks."""
        for net in (self.dynamics, self.decoder, self.encoder):
            if net is not None:
                net.to(device=device, dtype=dtype)
        return super().to(device, dtype)

    def _ref(self) -> dict:
        return _ref_of(self.decoder)

    def _solver_options(self) -> dict:
        return {k: self.kwargs[k] for k in ("solver", "step_size", "rtol", "atol")}

    # ------------------------------------------------------------------ data
    @staticmethod
    def _doses(dose, N, ref, what):
        d = torch.as_tensor(dose, **ref) if not torch.is_tensor(dose) else dose.to(**ref)
        if d.dim() > 1 or (d.dim() == 1 and N is not None and d.shape[0] != N):
            raise ValueError(f"{what}: dose must be a number or [N={N}], got shape {list(d.shape)}")
        if not bool(torch.isfinite(d).all()) or not bool((d > 0).all()):
            raise ValueError(f"{what}: dose must be positive and finite")
        return d

    @classmethod
    def _design(cls, times, mask, dose, ref, what) -> dict:
        """Validated ``times`` (padding filled with 0), ``mask`` and ``dose``."""
        t = torch.as_tensor(times) if not torch.is_tensor(times) else times
        t = t.to(**ref)
        if t.dim() not in (1, 2) or t.shape[-1] < 1:
            raise ValueError(f"{what}: times must be [T] or [N, T], got shape {list(t.shape)}")
        m = ~torch.isnan(t)
        if mask is not None:
            mk = torch.as_tensor(mask, device=t.device)
            if mk.dtype != torch.bool or tuple(mk.shape) != tuple(t.shape):
                raise ValueError(f"{what}: mask must be a bool tensor of the shape of times "
                                 f"{list(t.shape)}, got {mk.dtype} {list(mk.shape)}")
            m = m & mk
        if bool((torch.isinf(t) & m).any()) or bool(((t < 0) & m).any()):
            raise ValueError(f"{what}: observation times must be finite and >= 0 (the dose is at 0)")
        t = torch.where(m, t, torch.zeros_like(t))
        out = {"times": t, "mask": m if not bool(m.all()) else None, "dose": None}
        if dose is not None:
            out["dose"] = cls._doses(dose, t.shape[0] if t.dim() == 2 else None, ref, what)
        return out

    def at(self, times, mask=None, dose=None) -> LatentODE:
        """This model with observation ``times`` bound (``[T]`` one profile per draw, or
        ``[N, T]`` a population of ``N`` subjects with their own times; NaN = padding) and
        optionally each subject's ``dose``; ``sample(k)["y"]`` is then ``[k, T]`` or
        ``[k, N, T]``."""
        design = self._design(times, mask, dose, self._ref(), "LatentODE.at")
        n = int(design["times"].shape[0]) if design["times"].dim() == 2 else None
        return self._rebind(**design, n=n)

    def _data(self, times, y, mask, dose, what):
        """``(s [N, T] scaled times, y [N, T] (padding filled), mask [N, T], dose factor or
        None, single)``."""
        ref = self._ref()
        if times is None:
            times = self.kwargs["times"]
            if times is None:
                raise ValueError(f"LatentODE.{what}: give times (no times are bound to the model)")
            if mask is None:
                mask = self.kwargs["mask"]
            if dose is None:
                dose = self.kwargs["dose"]
        yt = torch.as_tensor(y) if not torch.is_tensor(y) else y
        yt = yt.to(**ref)
        t = torch.as_tensor(times) if not torch.is_tensor(times) else times
        t = t.to(**ref)
        single = yt.dim() == 1
        if single:
            yt = yt.unsqueeze(0)
        if yt.dim() != 2:
            raise ValueError(f"LatentODE.{what}: y must be [T] or [N, T], got shape {list(yt.shape)}")
        if t.dim() == 1:
            t = t.expand(yt.shape[0], -1)
        if tuple(t.shape) != tuple(yt.shape):
            raise ValueError(f"LatentODE.{what}: times {list(t.shape)} and y {list(yt.shape)} "
                             "must have the same shape ([N, T], or [T] shared)")
        if mask is not None:
            mask = torch.as_tensor(mask, device=t.device)
            if mask.dim() == 1:
                mask = mask.expand_as(t)
        d = self._design(t, mask, dose, ref, f"LatentODE.{what}")
        m = torch.ones_like(t, dtype=torch.bool) if d["mask"] is None else d["mask"]
        m = m & ~torch.isnan(yt)
        if bool((torch.isinf(yt) & m).any()):
            raise ValueError(f"LatentODE.{what}: y has infinite entries")
        if self.likelihood == "lognormal" and bool(((yt <= 0) & m).any()):
            raise ValueError(f"LatentODE.{what}: y must be positive where observed for "
                             "likelihood='lognormal' (mask out or drop zero/BLQ values)")
        if not bool(m.any(-1).all()):
            raise ValueError(f"LatentODE.{what}: every subject needs at least one observation")
        fill = 1.0 if self.likelihood == "lognormal" else 0.0
        yt = torch.where(m, yt, torch.full_like(yt, fill))
        times = torch.where(m, d["times"], torch.zeros_like(d["times"]))
        factor = _dose_factor(d["dose"], self.kwargs["dose_ref"], yt)
        return times / self.kwargs["time_scale"], yt, m, factor, single

    def _feature(self, y, mask, factor):
        """Observations on the decoder's scale, dose-normalized: the encoder's input."""
        if self.likelihood == "lognormal":
            f = torch.log(y) - (torch.log(factor) if factor is not None else 0.0)
        else:
            f = y / factor if factor is not None else y
        return torch.where(mask, f, torch.zeros_like(f))

    def _log_lik(self, z0, s, y, mask, factor) -> torch.Tensor:
        """``log p(y | z0)`` ``[..., N]`` for ``z0 [..., N, k]`` (padding excluded)."""
        loc = _location(self.decoder, self.dynamics, z0, s, factor, self.likelihood,
                        **self._solver_options())
        noise = self.kwargs["obs_noise"]
        base = dist.LogNormal(loc, noise) if self.likelihood == "lognormal" else dist.Normal(loc, noise)
        ll = base.log_prob(y)
        return torch.where(mask, ll, torch.zeros_like(ll)).sum(-1)

    def _log_prior(self, z0):
        return (-0.5 * z0 ** 2 - 0.5 * math.log(2 * math.pi)).sum(-1)

    def _require_encoder(self, what):
        if self.encoder is None:
            raise ValueError(f"LatentODE.{what} needs an encoder (build with encoder=, or train "
                             "with LatentODE.mle)")
        return self.encoder

    # ------------------------------------------------------------------ posterior
    def posterior_estimate(self, y, times=None, *, mask=None, dose=None) -> dist.Distribution:
        """The encoder's ``q(z0 | y)``: ``Normal(loc, scale).to_event(1)``, batch ``[]`` (one
        subject ``y [T]``) or ``[N]`` (``y [N, T]``), event ``[k]``."""
        enc = self._require_encoder("posterior_estimate")
        s, y, m, factor, single = self._data(times, y, mask, dose, "posterior_estimate")
        with torch.no_grad():
            loc, scale = enc(s, self._feature(y, m, factor), m)
        if single:
            loc, scale = loc[0], scale[0]
        return dist.Normal(loc, scale).to_event(1)

    def map_latent(self, times, y, *, mask=None, dose=None, num_starts: int = 4,
                   max_iters: int = 50, newton_steps: int = 20, seed: int = 0) -> LatentMAP:
        """Posterior modes ``z* = argmax_z0 log p(y | z0) + log p(z0)`` of every subject at
        once, the networks fixed — e.g. a new subject from its first 2-3 samples.

        Starts: the encoder's mean (when there is an encoder), 0, and prior draws
        (``num_starts`` in all), all optimized together by L-BFGS on the summed objective
        (subjects are independent), then ``newton_steps`` damped Newton steps per subject;
        the best start per subject is kept.

        Parameters
        ----------
        times : [T] or [N, T];  y : [T] or [N, T] (NaN = padding)
        mask : bool [N, T], optional;  dose : float or [N], optional

        Returns
        -------
        LatentMAP  (batch ``[N]``; ``[1]`` for one subject)
        """
        num_starts = check_int("LatentODE.map_latent: num_starts", num_starts)
        s, y, m, factor, _ = self._data(times, y, mask, dose, "map_latent")
        N, k = y.shape[0], self.latent_dim
        ref = self._ref()
        g = torch.Generator(device=y.device).manual_seed(int(seed))
        starts = [torch.zeros(N, k, **ref)]
        if self.encoder is not None:
            with torch.no_grad():
                starts.insert(0, self.encoder(s, self._feature(y, m, factor), m)[0])
        while len(starts) < num_starts:
            starts.append(torch.randn(N, k, generator=g, device=y.device, dtype=ref.get("dtype")))
        starts = starts[:num_starts]
        R = len(starts)
        s_r, y_r, m_r = (v.repeat(R, 1) for v in (s, y, m))
        f_r = factor.repeat(R, 1) if factor is not None and factor.dim() else factor

        def objective(z):
            return self._log_lik(z, s_r, y_r, m_r, f_r) + self._log_prior(z)

        z = torch.cat(starts).detach().clone().requires_grad_(True)
        opt = torch.optim.LBFGS([z], lr=1.0, max_iter=max_iters, history_size=20,
                                tolerance_grad=1e-7, tolerance_change=1e-12,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = -objective(z).sum()
            if not torch.isfinite(loss):
                loss = loss.detach().new_tensor(1e30).requires_grad_(True) + 0 * z.sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            try:
                opt.step(closure)
            except (IndexError, RuntimeError):  # a degenerate line-search bracket
                pass
        z = z.detach()
        h, grad, H = _grad_hess(objective, z)
        bad = ~torch.isfinite(h)
        z = torch.where(bad[:, None], torch.cat(starts), z)
        h, grad, H = _grad_hess(objective, z)
        lam = torch.full((z.shape[0],), 1e-3, **ref)
        eye = torch.eye(k, **ref)
        for _ in range(newton_steps):
            A = -H + lam[:, None, None] * eye
            low = torch.linalg.eigvalsh(A)[:, :1, None]
            A = A + torch.where(low <= 1e-6, 1.0 - low, torch.zeros_like(low)) * eye
            cand = z + torch.linalg.solve(A, grad.unsqueeze(-1)).squeeze(-1)
            h_c, g_c, H_c = _grad_hess(objective, cand)
            better = torch.isfinite(h_c) & (h_c >= h - 1e-12)
            z = torch.where(better[:, None], cand, z)
            h = torch.where(better, h_c, h)
            grad = torch.where(better[:, None], g_c, grad)
            H = torch.where(better[:, None, None], H_c, H)
            lam = torch.where(better, lam * 0.3, lam * 10).clamp(1e-10, 1e8)
            if bool((grad.abs().max(-1).values < 1e-7 * (1 + h.abs())).all()):
                break
        best = torch.nan_to_num(h, nan=-math.inf).reshape(R, N).argmax(0)
        pick = best * N + torch.arange(N, device=z.device)
        z, h, grad, H = z[pick], h[pick], grad[pick], H[pick]
        evals, vecs = torch.linalg.eigh(-H)
        pd = evals.min(-1).values > 0
        evals = evals.clamp_min(1e-6)
        cov = vecs @ torch.diag_embed(1.0 / evals) @ vecs.transpose(-1, -2)
        gnorm = grad.abs().max(-1).values
        return LatentMAP(z=z, log_joint=h, covariance=0.5 * (cov + cov.transpose(-1, -2)),
                         grad_norm=gnorm, converged=pd & (gnorm < 1e-4 * (1 + h.abs())))

    # ------------------------------------------------------------------ prediction
    def predict(self, times, z, dose=None) -> torch.Tensor:
        """The noiseless profile at latent start ``z`` ``[..., k]`` (``[k]``, ``[N, k]``,
        ``[S, N, k]``) at ``times`` (``[T]`` or ``[N, T]``): the mean of ``y``
        (``"normal"``) or its median ``exp(g)`` (``"lognormal"``), ``[..., T]``."""
        ref = self._ref()
        t = torch.as_tensor(times) if not torch.is_tensor(times) else times
        t = t.to(**ref)
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError("LatentODE.predict: times must be finite and >= 0")
        z = torch.as_tensor(z).to(**ref)
        if z.shape[-1] != self.latent_dim:
            raise ValueError(f"LatentODE.predict: z must end in k={self.latent_dim}, got {list(z.shape)}")
        factor = None
        if dose is not None:
            factor = _dose_factor(self._doses(dose, None, ref, "LatentODE.predict"),
                                  self.kwargs["dose_ref"], t)
        with torch.no_grad():
            loc = _location(self.decoder, self.dynamics, z, t / self.kwargs["time_scale"], factor,
                            self.likelihood, **self._solver_options())
        return loc.exp() if self.likelihood == "lognormal" else loc

    def predict_profile(self, times_obs, y_obs, times_new, *, mask=None, dose=None, n: int = 1000,
                        level: float = 0.9, method: str = "laplace", noise: bool = False,
                        seed: int = 0) -> ProfilePrediction:
        """A new subject's profile at ``times_new`` from its observations ``y_obs`` at
        ``times_obs`` (one subject ``[T]``, or ``N`` at once ``[N, T]``).

        ``z0`` is located by :meth:`map_latent`; uncertainty comes from ``n`` draws of ``z0``:
        ``method="laplace"``: from the Laplace approximation ``N(z*, Sigma)``; ``"is"``: the
        same draws reweighted to the exact posterior ``p(z0 | y_obs)`` (importance sampling
        with a Student-t(5) proposal around ``z*``, then resampling). With ``noise`` the
        draws include the observation noise (a prediction interval instead of a band for
        the curve).

        Returns
        -------
        ProfilePrediction
        """
        if method not in PROFILE_METHODS:
            raise ValueError(f"LatentODE.predict_profile: method must be one of {PROFILE_METHODS}, "
                             f"got {method!r}")
        n = check_int("LatentODE.predict_profile: n", n, 2)
        if not 0 < level < 1:
            raise ValueError(f"LatentODE.predict_profile: level must be in (0, 1), got {level!r}")
        single = torch.as_tensor(y_obs).dim() == 1
        mp = self.map_latent(times_obs, y_obs, mask=mask, dose=dose, seed=seed)
        g = torch.Generator(device=mp.z.device).manual_seed(int(seed))
        N = mp.z.shape[0]
        L = torch.linalg.cholesky(mp.covariance)
        details = {"level": level}
        if method == "laplace":
            eps = torch.randn(n, *mp.z.shape, generator=g, device=mp.z.device, dtype=mp.z.dtype)
            z = mp.z + (L @ eps.unsqueeze(-1)).squeeze(-1)
        else:
            z, logw = self._laplace_is(mp, times_obs, y_obs, mask, dose, n, g)
            w = torch.softmax(logw, 0)
            ess = 1.0 / (w ** 2).sum(0)
            idx = torch.multinomial(w.T, n, replacement=True, generator=g)  # [N, n]
            z = z[idx.T, torch.arange(N, device=z.device)]
            details["ess"] = ess
        t = torch.as_tensor(times_new).to(**self._ref())
        if t.dim() == 1 and not single:
            t = t.expand(N, -1)
        dose_new = dose
        curves = self.predict(t, z if not single else z[:, 0], dose=dose_new)
        if noise:
            sd = self.kwargs["obs_noise"]
            e = torch.randn(curves.shape, generator=g, device=curves.device, dtype=curves.dtype) * sd
            curves = curves * torch.exp(e) if self.likelihood == "lognormal" else curves + e
        q = torch.tensor([0.5, (1 - level) / 2, (1 + level) / 2], dtype=curves.dtype,
                         device=curves.device)
        med, lo, hi = torch.quantile(curves, q, dim=0)
        at_map = self.predict(t, mp.z[0] if single else mp.z, dose=dose_new)
        return ProfilePrediction(times=t, map=at_map, median=med, lower=lo, upper=hi, draws=curves,
                                 z_map=mp, method=method, details=details)

    def _laplace_is(self, mp, times, y, mask, dose, S, g, df=5):
        """Draws ``z [S, N, k]`` from Student-t(df) around the MAP with the Laplace
        covariance and their log importance weights ``[S, N]`` towards ``p(z0 | y)``."""
        s, yy, m, factor, _ = self._data(times, y, mask, dose, "log p (is)")
        L = torch.linalg.cholesky(mp.covariance)
        q = dist.MultivariateStudentT(torch.tensor(df, dtype=mp.z.dtype, device=mp.z.device),
                                      mp.z, L)
        with torch.no_grad():
            z = _student_t(q, df, S, g)
            logw = self._log_lik(z, s, yy, m, factor) + self._log_prior(z) - q.log_prob(z)
        return z, logw

    # ------------------------------------------------------------------ log p estimates
    def _log_prob_estimate(self, y, times=None, *, mask=None, dose=None, method: str = "iwae",
                           num_samples: int = 1000, batch_size: int = 250, seed: int = 0) -> Estimate:
        """An estimate of ``sum_subjects log p(y_i)`` (nats) with its standard error.

        ``method="iwae"``: ``log mean_s w_s`` per subject, ``z_s ~ q(z0 | y)`` (the encoder),
        ``w = p(z) p(y | z) / q(z | y)``; the importance-weighted lower bound (biased low by
        about ``stderr^2 / 2``; its mean never decreases with ``num_samples``).
        ``method="is"``: the same with a Student-t(5) proposal centred at the MAP with the
        Laplace covariance (no encoder needed).

        ``details``: ``pointwise`` ``[N]``, ``pointwise_stderr`` ``[N]``, ``min_ess``, ``elbo``
        (the mean log weight, summed).
        """
        if method not in ESTIMATE_METHODS:
            raise ValueError(f"LatentODE._log_prob_estimate: unknown method {method!r}; choose "
                             f"from {ESTIMATE_METHODS}")
        num_samples = check_int("LatentODE._log_prob_estimate: num_samples", num_samples, 2)
        batch_size = check_int("LatentODE._log_prob_estimate: batch_size", batch_size)
        start = time.perf_counter()
        s, yy, m, factor, _ = self._data(times, y, mask, dose, "_log_prob_estimate")
        g = torch.Generator(device=yy.device).manual_seed(int(seed))
        if method == "iwae":
            enc = self._require_encoder("_log_prob_estimate(method='iwae')")
            out = []
            with torch.no_grad():
                loc, scale = enc(s, self._feature(yy, m, factor), m)
                q = dist.Normal(loc, scale).to_event(1)
                for s0 in range(0, num_samples, batch_size):
                    S = min(batch_size, num_samples - s0)
                    z = loc + scale * torch.randn((S, *loc.shape), generator=g, device=loc.device,
                                                  dtype=loc.dtype)
                    out.append(self._log_lik(z, s, yy, m, factor) + self._log_prior(z) - q.log_prob(z))
            logw = torch.cat(out, 0)
        else:
            mp = self.map_latent(times if times is not None else self.kwargs["times"], y,
                                 mask=mask, dose=dose, seed=seed)
            _, logw = self._laplace_is(mp, times, y, mask, dose, num_samples, g)
        if not bool(torch.isfinite(logw).any(0).all()):
            raise RuntimeError(f"LatentODE._log_prob_estimate({method!r}): a subject has no finite weight")
        values, se, ess = log_mean_exp(logw.transpose(0, 1))  # over the S draws of each row
        if bool((ess < 0.01 * num_samples).any()):
            warnings.warn(f"LatentODE._log_prob_estimate({method!r}): effective sample size "
                          f"{float(ess.min()):.1f} of {num_samples} for some subject; the estimate "
                          "and its stderr are unreliable", EstimatorWarning, stacklevel=2)
        return Estimate(float(values.sum()), float(se.pow(2).sum().sqrt()), method,
                        num_samples=num_samples, num_evaluations=num_samples * yy.shape[0],
                        wall_time_s=time.perf_counter() - start,
                        details={"pointwise": values, "pointwise_stderr": se,
                                 "min_ess": float(ess.min()),
                                 "elbo": float(logw.to(torch.float64).mean(0).sum())})

    # ------------------------------------------------------------------ training
    @classmethod
    @renamed_keywords(max_steps="max_iters")
    def mle(cls, times, y, *, mask=None, dose=None, latent_dim: int = 2, hidden=(32,),
            encoder_hidden: int = 16, time_dependent: bool = False, likelihood: str = "normal", obs_noise: float | None = None,
            time_scale: float | None = None, dose_ref: float | None = None, solver: str = "rk4",
            step_size: float = 0.05, dynamics=None, decoder=None, encoder=None,
            max_iters: int = 2000, batch_size: int | None = None, learning_rate: float = 1e-2,
            num_particles: int = 1, window: int = 100, seed: int = 0,
            progress: bool | None = None) -> LatentODE:
        """Train on a population ``times [N, T]`` (or ``[T]`` shared), ``y [N, T]`` (NaN or
        ``mask`` False = padding) by amortized variational inference.

        The loss is Pyro's ``Trace_ELBO`` (``num_particles`` draws) of the story with the
        encoder's ``q(z0 | y)`` as the guide, per subject, on minibatches of ``batch_size``
        subjects (default: all), minimised by Adam over the dynamics, decoder, encoder and
        (when ``obs_noise`` is None) the observation noise. Every ``window`` steps the mean
        loss is compared with the previous window's; within noise the learning rate is cut
        by 5x, and after two cuts training stops; reaching ``max_iters`` (deprecated name:
        ``max_steps``) first warns with a
        :class:`~genprog.errors.ConvergenceWarning`. Runs in a private Pyro param-store scope
        with torch's RNG forked and seeded.

        Defaults set from the data: ``time_scale`` = the latest observation time,
        ``dose_ref`` = the median dose (when doses are given), the decoder's and encoder's
        location/scale = mean/SD of the (log, dose-normalized) observations.

        Returns
        -------
        LatentODE
            With ``info``: ``loss_trace`` (negative ELBO per subject, per step),
            ``num_steps``, ``converged``, ``wall_time_s`` (see :class:`LatentODE`).
        """
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"LatentODE.mle: likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        latent_dim = check_int("LatentODE.mle: latent_dim", latent_dim)
        max_iters = check_int("LatentODE.mle: max_iters", max_iters)
        window = check_int("LatentODE.mle: window", window)
        yt = torch.as_tensor(y) if not torch.is_tensor(y) else y
        if not yt.is_floating_point():
            yt = yt.to(torch.get_default_dtype())
        if yt.dim() != 2 or yt.shape[0] < 2:
            raise ValueError(f"LatentODE.mle: y must be [N, T] with N >= 2, got shape {list(yt.shape)}")
        ref = {"device": yt.device, "dtype": yt.dtype}
        tt = torch.as_tensor(times).to(**ref) if not torch.is_tensor(times) else times.to(**ref)
        if tt.dim() == 1:
            tt = tt.expand_as(yt)
        if tt.shape != yt.shape:
            raise ValueError(f"LatentODE.mle: times {list(tt.shape)} and y {list(yt.shape)} must "
                             "have the same shape")
        obs = ~torch.isnan(tt) & ~torch.isnan(yt)
        if mask is not None:
            obs = obs & torch.as_tensor(mask, device=yt.device).bool()
        if time_scale is None:
            time_scale = float(tt[obs].max()) if bool(obs.any()) else 1.0
            time_scale = time_scale if time_scale > 0 else 1.0
        if dose is not None and dose_ref is None:
            dose_ref = float(torch.as_tensor(dose, dtype=torch.float64).median())
        N = yt.shape[0]
        batch_size = N if batch_size is None else check_int("LatentODE.mle: batch_size", batch_size)
        devices = [yt.device] if yt.device.type == "cuda" else []
        start_time = time.perf_counter()
        with torch.random.fork_rng(devices=devices), pyro.get_param_store().scope():
            torch.manual_seed(seed)
            if dynamics is None:
                dynamics = LatentDynamics(latent_dim, hidden, time_dependent=time_dependent)
            decoder = decoder if decoder is not None else MLPDecoder(latent_dim, hidden)
            encoder = encoder if encoder is not None else GRUEncoder(latent_dim, encoder_hidden)
            for net in (dynamics, decoder, encoder):
                net.to(**ref)
            model = cls(dynamics=dynamics, decoder=decoder, encoder=encoder, latent_dim=latent_dim,
                        obs_noise=1.0, likelihood=likelihood, time_scale=time_scale,
                        dose_ref=dose_ref, solver=solver, step_size=step_size)
            s, yy, m, factor, _ = model._data(tt, yt, obs, dose, "mle")
            feat = model._feature(yy, m, factor)
            loc0, sd0 = float(feat[m].mean()), float(feat[m].std()) if int(m.sum()) > 1 else 1.0
            sd0 = sd0 if sd0 > 0 else 1.0
            for net in (decoder, encoder):
                if isinstance(net, (MLPDecoder, GRUEncoder)):
                    net.shift.fill_(loc0)
                    net.scale.fill_(sd0)
            learn_noise = obs_noise is None
            log_noise = torch.tensor(math.log(0.3 * sd0 if learn_noise else obs_noise), **ref,
                                     requires_grad=learn_noise)
            p = model.params
            name = p["name"]
            opts = model._solver_options()

            def train_model(idx):
                dyn = pyro.module(f"{name}.dynamics", dynamics)
                dec = pyro.module(f"{name}.decoder", decoder)
                prior = dist.Normal(torch.zeros(latent_dim, **ref),
                                    torch.ones(latent_dim, **ref)).to_event(1)
                f = factor[idx] if factor is not None and factor.dim() else factor
                with pyro.plate("data", len(idx)):
                    z0 = pyro.sample("z0", prior)
                    loc = _location(dec, dyn, z0, s[idx], f, likelihood, **opts)
                    pyro.sample("y", _observation(loc, log_noise.exp(), likelihood, m[idx]),
                                obs=yy[idx])

            def guide(idx):
                enc = pyro.module(f"{name}.encoder", encoder)
                with pyro.plate("data", len(idx)):
                    loc, sc = enc(s[idx], feat[idx], m[idx])
                    pyro.sample("z0", dist.Normal(loc, sc).to_event(1))

            elbo = pyro.infer.Trace_ELBO(num_particles=num_particles)
            params = [*dynamics.parameters(), *decoder.parameters(), *encoder.parameters()]
            if learn_noise:
                params.append(log_noise)
            opt = torch.optim.Adam(params, lr=learning_rate)
            g = torch.Generator(device=yt.device).manual_seed(seed)

            def loss_fn(step):
                idx = (torch.arange(N, device=yt.device) if batch_size >= N else
                       torch.randperm(N, generator=g, device=yt.device)[:batch_size])
                return elbo.differentiable_loss(train_model, guide, idx) / len(idx)

            result = minimize(loss_fn, opt, max_iters=max_iters, window=window,
                              what="LatentODE.mle", progress=progress, clip_grad=(params, 100.0))
        out = cls(dynamics=dynamics, decoder=decoder, encoder=encoder, latent_dim=latent_dim,
                  obs_noise=float(log_noise.detach().exp()), likelihood=likelihood,
                  time_scale=time_scale, dose_ref=dose_ref, solver=solver, step_size=step_size,
                  name=name)
        out.info = training_record(result, wall_time_s=time.perf_counter() - start_time)
        return out


# ---------------------------------------------------------------------- helpers
def _ref_of(net) -> dict:
    p = next(net.parameters(), None)
    if p is None:
        p = next(net.buffers(), None)
    return {"device": p.device, "dtype": p.dtype} if p is not None else {}


def _grad_hess(objective, z):
    """``h = objective(z)`` ``[B]``, its gradient ``[B, k]`` and per-row Hessian ``[B, k, k]``
    (rows independent; ``k`` backward passes)."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        h = objective(z)
        (g,) = torch.autograd.grad(h.sum(), z, create_graph=True)
        rows = [torch.autograd.grad(g[:, j].sum(), z, retain_graph=True)[0] for j in range(z.shape[-1])]
    H = torch.stack(rows, -2)
    return h.detach(), g.detach(), 0.5 * (H + H.transpose(-1, -2)).detach()


def _student_t(q: dist.MultivariateStudentT, df: int, S: int, g: torch.Generator) -> torch.Tensor:
    """``S`` draws ``[S, *batch, k]`` of ``q`` (its integer ``df``) from the generator ``g``: a
    Gaussian draw divided by ``sqrt(chi2_df / df)``, the chi-square a sum of squares."""
    shape = (S, *q.loc.shape)
    x = torch.randn(shape, generator=g, device=q.loc.device, dtype=q.loc.dtype)
    chi2 = torch.randn((*shape[:-1], df), generator=g, device=q.loc.device,
                       dtype=q.loc.dtype).pow(2).sum(-1)
    return q.loc + (q.scale_tril @ x.unsqueeze(-1)).squeeze(-1) * torch.rsqrt(chi2 / df).unsqueeze(-1)

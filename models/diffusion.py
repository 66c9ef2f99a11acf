"""Score-based diffusion models (Song et al. 2021): a forward SDE turns data into noise,
a score network ``s(x, t) ~ grad_x log p_t(x)`` learned by denoising score matching
turns noise back into data.

Forward SDEs on ``t in [0, T]`` (``T = 1``), ``dx = f(x, t) dt + g(t) dW``, with Gaussian
perturbation kernels ``x_t | x_0 ~ N(alpha(t) x_0, v(t) I)``:

* ``"vp"`` (variance preserving): ``f = -beta(t) x / 2``, ``g^2 = beta(t)``,
  ``beta(t) = beta_min + t (beta_max - beta_min)``; ``alpha(t) = exp(-int_0^t beta / 2)``,
  ``v(t) = 1 - alpha(t)^2``; prior ``N(0, I)``.
* ``"ve"`` (variance exploding): ``f = 0``, ``g^2 = d sigma(t)^2 / dt``,
  ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``; ``alpha = 1``,
  ``v(t) = sigma(t)^2 - sigma_min^2``; prior ``N(0, v(T) I)``.

**Which model is this?** Two samplers share one score network but define two different
distributions. The *probability-flow model* draws ``x(T)`` from the prior and solves the
ODE ``dx/dt = f(x, t) - g(t)^2 s(x, t) / 2`` from ``T`` down to ``t_min``, giving
``y = x(t_min)``. Its density follows from the instantaneous change of variables,

    log p(y) = log prior(x(T)) + int_{t_min}^T tr(dF/dx)(x(t), t) dt,

integrated with :func:`torchdiffeq.odeint` (dopri5) together with ``x`` and with the
trace computed exactly (``d`` vector-Jacobian products per evaluation: fine in low
dimension). This is the *exact* density of the probability-flow model up to the ODE
tolerances (``rtol``, ``atol``) — the model of the story, of ``log_prob`` and of
``sample(method="ode")`` (the default). It is the data density only insofar as the
score is the true score of the diffused data *and* the prior equals ``p_T``: with the
analytic score of a diffused Gaussian mixture (:class:`GaussianMixtureScore`) it
equals the mixture's density at ``t_min`` up to the prior mismatch
``log p_T - log prior`` (first order in ``alpha(T) ~ 6e-3`` for the default VP schedule,
second order for zero-mean data; ``O(1 / sigma_max^2)`` for VE), which the tests bound
below 3e-4 and then check the ODE log p to 1e-3 nats. The *reverse-SDE sampler*
(``sample(method="sde")``, Euler-Maruyama) is another model whose density is not
available; it agrees with the probability-flow model when the score is exact and the
step count large.

Exact: ``log_prob`` / ``log_marginal`` (probability-flow model), ``sample`` (both
samplers are exact draws of their own models). Estimated by inference on the exact
density: ``condition(dims=...)`` (NUTS through the ODE) and ``marginalize(dims=...)``
(AIS) — slow, each density evaluation is an ODE solve. Training: :meth:`Diffusion.mle`,
denoising score matching with the ``v(t)`` weighting (not maximum likelihood).

Shapes: ``d`` (``dim``); data ``[N, d]``; times ``t`` scalars or ``[N]``.
"""

from __future__ import annotations

import math
import uuid
from typing import ClassVar

import pyro
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

SDES = ("vp", "ve")


# ---------------------------------------------------------------------- the forward SDE
class DiffusionSDE:
    """The forward SDE with its perturbation kernel ``N(alpha(t) x_0, v(t) I)``; see the
    module docstring. Functions of ``t`` take a float or a tensor and return tensors of
    its shape."""

    def __init__(self, kind: str = "vp", *, beta_min: float = 0.1, beta_max: float = 20.0,
                 sigma_min: float = 0.01, sigma_max: float = 10.0):
        if kind not in SDES:
            raise ValueError(f"Diffusion: sde must be one of {SDES}, got {kind!r}")
        if kind == "vp" and not 0 <= beta_min <= beta_max or beta_max <= 0:
            raise ValueError(f"Diffusion: need 0 <= beta_min <= beta_max, beta_max > 0; got "
                             f"beta_min={beta_min}, beta_max={beta_max}")
        if kind == "ve" and not 0 < sigma_min < sigma_max:
            raise ValueError(f"Diffusion: need 0 < sigma_min < sigma_max; got "
                             f"sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.kind = kind
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.T = 1.0

    def __repr__(self) -> str:
        if self.kind == "vp":
            return f"DiffusionSDE('vp', beta_min={self.beta_min}, beta_max={self.beta_max})"
        return f"DiffusionSDE('ve', sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t):
        """``log alpha(t)`` (0 for VE)."""
        t = torch.as_tensor(t)
        if self.kind == "ve":
            return torch.zeros_like(t)
        return -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t):
        return torch.exp(self.log_alpha(t))

    def var(self, t):
        """``v(t)``, the variance of the perturbation kernel (per coordinate)."""
        t = torch.as_tensor(t)
        if self.kind == "vp":
            return -torch.expm1(2 * self.log_alpha(t))
        r = math.log(self.sigma_max / self.sigma_min)
        return self.sigma_min ** 2 * torch.expm1(2 * r * t)

    def drift(self, x, t):
        """``f(x, t)`` for ``x [..., d]`` and ``t`` scalar or ``[...]``."""
        if self.kind == "ve":
            return torch.zeros_like(x)
        return -0.5 * _col(torch.as_tensor(self.beta(t), dtype=x.dtype, device=x.device), x) * x

    def g2(self, t):
        """``g(t)^2``."""
        t = torch.as_tensor(t)
        if self.kind == "vp":
            return self.beta(t)
        r = math.log(self.sigma_max / self.sigma_min)
        return 2 * r * self.sigma_min ** 2 * torch.exp(2 * r * t)

    @property
    def prior_std(self) -> float:
        """Standard deviation of the prior ``N(0, prior_std^2 I)`` at ``T``."""
        return 1.0 if self.kind == "vp" else float(self.var(torch.tensor(self.T,
                                                                        dtype=torch.float64))) ** 0.5


def _col(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` (scalar or ``[...]``) broadcast as a column against ``x [..., d]``."""
    return t.unsqueeze(-1) if t.dim() > 0 else t


def _times(t, x: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor ``[...]`` matching ``x [..., d]``'s batch shape."""
    return torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[:-1])


def _ref(module: nn.Module) -> dict:
    """Device and dtype of ``module``'s first parameter or buffer (default dtype if none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {"device": None, "dtype": torch.get_default_dtype()}


# ---------------------------------------------------------------------- score networks
class ScoreNet(nn.Module):
    """``s(x, t) = -net(x / sqrt(1 + v(t)), log v(t)) / sqrt(v(t))``: an MLP predicting
    the noise ``z`` in ``x_t = alpha x_0 + sqrt(v) z``, turned into a score (the
    parametrisation of Ho et al. 2020 / Song et al. 2021). ``forward(x [..., d], t)``
    with ``t`` scalar or ``[...]`` -> ``[..., d]``."""

    def __init__(self, dim: int, sde: DiffusionSDE, hidden=(64, 64)):
        super().__init__()
        dim = check_int("ScoreNet: dim", dim)
        if not isinstance(sde, DiffusionSDE):
            raise TypeError(f"ScoreNet: sde must be a DiffusionSDE, got {type(sde).__name__}")
        self.sde, self.dim = sde, dim
        layers, prev = [], dim + 1
        for width in hidden:
            layers += [nn.Linear(prev, width), nn.SiLU()]
            prev = width
        layers.append(nn.Linear(prev, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x, t):
        t = _times(t, x)
        v = self.sde.var(t).clamp_min(1e-12)
        h = torch.cat([x / torch.sqrt(1 + v).unsqueeze(-1), 0.25 * torch.log(v).unsqueeze(-1)], -1)
        return -self.net(h) / torch.sqrt(v).unsqueeze(-1)


class GaussianMixtureScore(nn.Module):
    """The exact score of a Gaussian mixture diffused by ``sde``: at time ``t`` the
    mixture ``sum_k w_k N(mu_k, S_k)`` becomes ``sum_k w_k N(alpha mu_k, alpha^2 S_k + v I)``
    and ``s(x, t)`` is the gradient of its log density (a closed-form "score network",
    the reference for the diffusion machinery).

    Parameters
    ----------
    weights : Tensor ``[K]``
    means : Tensor ``[K, d]``
    covariances : Tensor ``[K, d, d]``
    sde : DiffusionSDE
    """

    def __init__(self, weights, means, covariances, sde: DiffusionSDE):
        super().__init__()
        w, m, c = (torch.as_tensor(a) for a in (weights, means, covariances))
        if m.dim() != 2 or w.shape != m.shape[:1] or c.shape != (*m.shape, m.shape[1]):
            raise ValueError("GaussianMixtureScore: need weights [K], means [K, d], "
                             f"covariances [K, d, d]; got {list(w.shape)}, {list(m.shape)}, "
                             f"{list(c.shape)}")
        self.register_buffer("log_weights", torch.log(w / w.sum()))
        self.register_buffer("means", m)
        self.register_buffer("covariances", c)
        self.sde = sde

    def log_density(self, x, t):
        """``log p_t(x)`` ``[...]`` of the diffused mixture at ``x [..., d]``."""
        t = _times(t, x)
        a = self.sde.alpha(t)[..., None, None]  # [..., 1, 1]
        v = self.sde.var(t)[..., None, None, None]
        eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        cov = a.unsqueeze(-1) ** 2 * self.covariances + v * eye  # [..., K, d, d]
        comp = dist.MultivariateNormal(a * self.means, cov)
        return torch.logsumexp(self.log_weights + comp.log_prob(x.unsqueeze(-2)), -1)

    def forward(self, x, t):
        with torch.enable_grad():
            xg = x if x.requires_grad else x.detach().requires_grad_(True)
            lp = self.log_density(xg, t)
            (g,) = torch.autograd.grad(lp.sum(), xg, create_graph=torch.is_grad_enabled()
                                       and x.requires_grad)
        return g


# ---------------------------------------------------------------------- the probability flow
class ProbabilityFlow(nn.Module):
    """The probability-flow vector field ``F(x, t) = f(x, t) - g(t)^2 s(x, t) / 2`` as a
    torchdiffeq function ``forward(t, x)``."""

    def __init__(self, score: nn.Module, sde: DiffusionSDE):
        super().__init__()
        self.score, self.sde = score, sde

    def forward(self, t, x):
        g2 = torch.as_tensor(self.sde.g2(t), dtype=x.dtype, device=x.device)
        return self.sde.drift(x, t) - 0.5 * _col(g2, x) * self.score(x, t)


class _FlowWithTrace(nn.Module):
    """ODE of ``(x, a)`` with ``da/dt = tr(dF/dx)``, the trace by ``d`` vector-Jacobian
    products (a graph is kept only when the state requires grad, e.g. under NUTS)."""

    def __init__(self, flow: ProbabilityFlow):
        super().__init__()
        self.flow = flow

    def forward(self, t, state):
        keep = state.requires_grad
        with torch.enable_grad():
            x = state[..., :-1]
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            f = self.flow(t, x)
            tr = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
            for i in range(x.shape[-1]):
                (gi,) = torch.autograd.grad(f[..., i].sum(), x, create_graph=keep, retain_graph=True)
                tr = tr + gi[..., i]
        if not keep:
            f, tr = f.detach(), tr.detach()
        return torch.cat([f, tr.unsqueeze(-1)], -1)


def probability_flow_log_prob(score: nn.Module, sde: DiffusionSDE, y: torch.Tensor, *,
                              t_min: float = 1e-3, rtol: float = 1e-5, atol: float = 1e-7,
                              method: str = "dopri5") -> torch.Tensor:
    """``log p(y)`` ``[N]`` of the probability-flow model at ``y [N, d]`` (module doc):
    ``(x, a)`` integrated from ``t_min`` to ``T``, then ``log prior(x(T)) + a(T)``."""
    zeros = torch.zeros(*y.shape[:-1], 1, dtype=y.dtype, device=y.device)
    times = torch.tensor([t_min, sde.T], dtype=y.dtype, device=y.device)
    out = odeint(_FlowWithTrace(ProbabilityFlow(score, sde)), torch.cat([y, zeros], -1), times,
                 rtol=rtol, atol=atol, method=method)[-1]
    xT, a = out[..., :-1], out[..., -1]
    s = sde.prior_std
    d = y.shape[-1]
    return -0.5 * (xT ** 2).sum(-1) / s ** 2 - d * (math.log(s) + 0.5 * math.log(2 * math.pi)) + a


def probability_flow_sample(score: nn.Module, sde: DiffusionSDE, x_T: torch.Tensor, *,
                            t_min: float = 1e-3, rtol: float = 1e-5, atol: float = 1e-7,
                            method: str = "dopri5") -> torch.Tensor:
    """Solve the probability-flow ODE from ``x(T) = x_T [..., d]`` down to ``t_min``."""
    times = torch.tensor([sde.T, t_min], dtype=x_T.dtype, device=x_T.device)
    with torch.no_grad():
        return odeint(ProbabilityFlow(score, sde), x_T, times, rtol=rtol, atol=atol,
                      method=method)[-1]


def reverse_sde_sample(score: nn.Module, sde: DiffusionSDE, x_T: torch.Tensor, *,
                       t_min: float = 1e-3, steps: int = 1000) -> torch.Tensor:
    """Euler-Maruyama for the reverse SDE ``dx = [f - g^2 s] dt + g dW_bar`` from ``T``
    down to ``t_min`` in ``steps`` equal steps from ``x_T [..., d]``; the last step adds no
    noise (it returns the step's mean, as Song et al.'s samplers do)."""
    ts = torch.linspace(sde.T, t_min, steps + 1, dtype=x_T.dtype, device=x_T.device)
    x = x_T
    with torch.no_grad():
        for k in range(steps):
            t, dt = ts[k], ts[k] - ts[k + 1]
            g2 = sde.g2(t)
            mean = x - (sde.drift(x, t) - g2 * score(x, t)) * dt
            x = mean if k == steps - 1 else mean + torch.sqrt(g2 * dt) * torch.randn_like(x)
    return x


class ProbabilityFlowDistribution(dist.TorchDistribution):
    """The probability-flow model as a distribution over ``R^d``: exact ``log_prob``
    (ODE likelihood) and exact ``sample`` (prior draw pushed through the ODE)."""

    arg_constraints: ClassVar[dict] = {}
    support = constraints.real_vector

    def __init__(self, score, sde, dim, t_min, rtol, atol, batch_shape=()):
        self.score, self.sde = score, sde
        self.t_min, self.rtol, self.atol = t_min, rtol, atol
        super().__init__(torch.Size(batch_shape), torch.Size([dim]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return ProbabilityFlowDistribution(self.score, self.sde, self.event_shape[0],
                                           self.t_min, self.rtol, self.atol, batch_shape)

    def log_prob(self, value):
        flat = value.reshape(-1, value.shape[-1])
        lp = probability_flow_log_prob(self.score, self.sde, flat.to(_ref(self.score)["dtype"]),
                                       t_min=self.t_min, rtol=self.rtol, atol=self.atol)
        return lp.to(value.dtype).reshape(value.shape[:-1])

    def sample(self, sample_shape=()):
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        ref = _ref(self.score)
        x_T = self.sde.prior_std * torch.randn(shape, **ref)
        return probability_flow_sample(self.score, self.sde, x_T, t_min=self.t_min,
                                       rtol=self.rtol, atol=self.atol)


# ---------------------------------------------------------------------- the model
class Diffusion(ZooModel):
    """A score-based diffusion model over ``R^d`` (see the module docstring for which
    distribution ``log_prob`` refers to).

    Parameters
    ----------
    score : nn.Module
        ``forward(x [..., d], t) -> [..., d]``, ``t`` a scalar or ``[...]``: a
        :class:`ScoreNet`, a :class:`GaussianMixtureScore`, or any score model.
    dim : int
    sde : {"vp", "ve"}
    beta_min, beta_max : float
        VP noise schedule.
    sigma_min, sigma_max : float
        VE noise scales (``sigma_max`` should exceed the data's largest pairwise distance).
    t_min : float
        The output time ``y = x(t_min)`` (numerical stability near ``t = 0``).
    rtol, atol : float
        dopri5 tolerances of the ODE for ``log_prob`` and ``sample(method="ode")``.
    name : str, optional
        Prefix under which ``score`` is registered with ``pyro.module`` (unique by default).

    Attributes
    ----------
    info : dict
        The training record, set by :meth:`mle`: ``loss_trace`` (list of float, the
        minibatch loss at every Adam step), ``num_steps`` (int, steps taken),
        ``converged`` (bool, whether the plateau rule fired before ``max_iters``).

    Examples
    --------
    >>> import torch
    >>> sde = DiffusionSDE("vp")
    >>> true = GaussianMixtureScore(torch.ones(1), torch.zeros(1, 1), torch.ones(1, 1, 1), sde)
    >>> m = Diffusion(score=true, dim=1)       # a diffused N(0, 1) stays N(0, 1)
    >>> round(float(m.log_prob(y=torch.tensor([0.0]))), 3)
    -0.919
    """

    mle_kind = "denoising score matching"

    def __init__(self, *, score: nn.Module, dim: int, sde: str = "vp", beta_min: float = 0.1,
                 beta_max: float = 20.0, sigma_min: float = 0.01, sigma_max: float = 10.0,
                 t_min: float = 1e-3, rtol: float = 1e-5, atol: float = 1e-7,
                 name: str | None = None):
        if not isinstance(score, nn.Module):
            raise TypeError(f"Diffusion: score must be an nn.Module, got {type(score).__name__}")
        dim = check_int("Diffusion: dim", dim)
        DiffusionSDE(sde, beta_min=beta_min, beta_max=beta_max, sigma_min=sigma_min,
                     sigma_max=sigma_max)  # validates
        if not 0 < t_min < 1:
            raise ValueError(f"Diffusion: t_min must be in (0, 1), got {t_min!r}")
        if not (rtol > 0 and atol > 0):
            raise ValueError("Diffusion: rtol and atol must be positive")
        if name is None:
            name = f"Diffusion_{uuid.uuid4().hex[:12]}"
        super().__init__(score=score, dim=dim, sde=sde, beta_min=float(beta_min),
                         beta_max=float(beta_max), sigma_min=float(sigma_min),
                         sigma_max=float(sigma_max), t_min=float(t_min), rtol=float(rtol),
                         atol=float(atol), name=name)

    @staticmethod
    def story(n=None, score=None, dim=1, sde="vp", beta_min=0.1, beta_max=20.0, sigma_min=0.01,
              sigma_max=10.0, t_min=1e-3, rtol=1e-5, atol=1e-7, name="diffusion"):
        """``x(T) ~ prior``, ``y = x(t_min)`` by the probability-flow ODE (one site ``"y"``)."""
        score = pyro.module(f"{name}.score", score)
        d = ProbabilityFlowDistribution(
            score, DiffusionSDE(sde, beta_min=beta_min, beta_max=beta_max, sigma_min=sigma_min,
                                sigma_max=sigma_max), dim, t_min, rtol, atol)
        return sample_rows(n, d)

    @property
    def score(self) -> nn.Module:
        return self.kwargs["score"]

    @property
    def sde(self) -> DiffusionSDE:
        k = self.kwargs
        return DiffusionSDE(k["sde"], beta_min=k["beta_min"], beta_max=k["beta_max"],
                            sigma_min=k["sigma_min"], sigma_max=k["sigma_max"])

    def to(self, device=None, dtype=None) -> Diffusion:
        """Also moves the score network."""
        self.score.to(device=device, dtype=dtype)
        return super().to(device, dtype)

    def _ode_options(self) -> dict:
        k = self.kwargs
        return {"t_min": k["t_min"], "rtol": k["rtol"], "atol": k["atol"]}

    # ------------------------------------------------------------------ exact
    def _log_prob_rows(self, y):
        """Exact ``log p(y)`` ``[N]`` of the probability-flow model (ODE tolerance)."""
        ref = _ref(self.score)
        return probability_flow_log_prob(self.score, self.sde, y.to(**ref), **self._ode_options())

    def sample(self, n: int = 1, seed: int | None = None, *, method: str = "ode",
               steps: int = 1000) -> dict:
        """Draws of ``y``.

        Parameters
        ----------
        n : int
        seed : int, optional
        method : {"ode", "sde"}
            ``"ode"``: the probability-flow model (prior draws pushed through the ODE; the
            model whose ``log_prob`` this class computes). ``"sde"``: the reverse SDE by
            Euler-Maruyama with ``steps`` steps (a different model; the same distribution
            in the limit of an exact score and many steps).
        steps : int
            Euler-Maruyama steps (``"sde"`` only).

        Returns
        -------
        dict
            ``{"y": [n, d]}`` (``[n, N, d]`` for a model conditioned on ``N`` rows).
        """
        if method not in ("ode", "sde"):
            raise ValueError(f"Diffusion.sample: method must be 'ode' or 'sde', got {method!r}")
        if method == "ode":
            return super().sample(n, seed=seed)
        n = check_int("sample: n", n)
        steps = check_int("Diffusion.sample: steps", steps)
        shape = (n,) if self.n_data is None else (n, int(self.n_data))
        sde, ref = self.sde, _ref(self.score)
        with self.context(), seeded(seed):
            x_T = sde.prior_std * torch.randn(*shape, self.kwargs["dim"], **ref)
            y = reverse_sde_sample(self.score, sde, x_T, t_min=self.kwargs["t_min"], steps=steps)
        return {"y": y}

    # ------------------------------------------------------------------ estimated
    def _conditional_estimate(self, obs):
        return conditional_by_inference(self, obs)

    def _marginal_estimate(self, drop):
        return EstimatedMarginal(self, drop)

    # ------------------------------------------------------------------ training
    def score_matching_loss(self, y, *, seed: int | None = None) -> torch.Tensor:
        """The denoising score-matching loss on ``y [N, d]`` (no gradient):
        ``mean_i || sqrt(v(t_i)) s(x_t_i, t_i) + z_i ||^2`` with ``t_i ~ U(t_min, T)``."""
        y, _ = self._as_data(y, "score_matching_loss")
        with self.context(), seeded(seed), torch.no_grad():
            return _dsm_loss(self.score, self.sde, y.to(**_ref(self.score)), self.kwargs["t_min"],
                             None)

    @classmethod
    @renamed_keywords(max_steps="max_iters")
    def mle(cls, y, *, sde: str = "vp", hidden=(64, 64), score: nn.Module | None = None,
            max_iters: int = 10000, batch_size: int = 256, learning_rate: float = 5e-3,
            window: int = 1000, seed: int = 0, progress: bool | None = None,
            **options) -> Diffusion:
        """Train a score network on ``y [N, d]`` by denoising score matching.

        Each Adam step draws a minibatch, times ``t ~ U(t_min, 1)`` and noise
        ``z ~ N(0, I)``, forms ``x_t = alpha(t) y + sqrt(v(t)) z`` and minimises
        ``|| sqrt(v(t)) s(x_t, t) + z ||^2`` (Song et al.'s ``lambda(t) = v(t)`` weighting).
        Give roughly standardised data (VP's prior is ``N(0, I)``; for VE choose
        ``sigma_max`` above the largest pairwise distance). Stops on a plateau of the
        windowed loss (after two learning-rate cuts by 5) or warns with a
        :class:`ConvergenceWarning` at ``max_iters``.

        Parameters
        ----------
        y : array ``[N, d]``
        sde : {"vp", "ve"}
        hidden : tuple of int
            Widths of the default :class:`ScoreNet`.
        score : nn.Module, optional
            A score model to train instead of a fresh ScoreNet.
        max_iters, batch_size, window : int
            (``max_steps``: the deprecated name of ``max_iters``.)
        learning_rate : float
        seed : int
        progress : bool, optional
            Progress bar (default: only on a TTY).
        **options
            ``beta_min``, ``beta_max``, ``sigma_min``, ``sigma_max``, ``t_min``, ``rtol``,
            ``atol``, ``name``: passed to the constructor.

        Returns
        -------
        Diffusion
            With ``info``: ``loss_trace`` (per step), ``num_steps``, ``converged``.
        """
        valid = {"beta_min", "beta_max", "sigma_min", "sigma_max", "t_min", "rtol", "atol", "name"}
        unknown = set(options) - valid
        if unknown:
            raise TypeError(f"Diffusion.mle: unknown option(s) {sorted(unknown)}; valid: "
                            f"{sorted(valid)} and the named arguments")
        y = torch.as_tensor(y)
        if not y.is_floating_point():
            y = y.to(torch.get_default_dtype())
        if y.dim() != 2 or y.shape[0] < 2 or not bool(torch.isfinite(y).all()):
            raise ValueError("Diffusion.mle: y must be a finite [N, d] tensor with N >= 2")
        for name, v in (("max_iters", max_iters), ("batch_size", batch_size), ("window", window)):
            check_int(f"Diffusion.mle: {name}", v)
        n, d = y.shape
        sde_obj = DiffusionSDE(sde, **{k: options[k] for k in
                                       ("beta_min", "beta_max", "sigma_min", "sigma_max")
                                       if k in options})
        t_min = float(options.get("t_min", 1e-3))
        if score is None:
            with seeded(seed):
                score = ScoreNet(d, sde_obj, hidden).to(device=y.device, dtype=y.dtype)
        elif not isinstance(score, nn.Module):
            raise TypeError(f"Diffusion.mle: score must be an nn.Module, got {type(score).__name__}")
        y = y.to(**_ref(score))
        opt = torch.optim.Adam(score.parameters(), lr=learning_rate)
        g = torch.Generator(device=y.device).manual_seed(seed)

        def loss_fn(step):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=g, device=y.device)
            return _dsm_loss(score, sde_obj, y[idx], t_min, g)

        result = minimize(loss_fn, opt, max_iters=max_iters, window=window, what="Diffusion.mle",
                          progress=progress)
        out = cls(score=score, dim=d, sde=sde, **options)
        out.info = training_record(result)
        return out


def _dsm_loss(score, sde, y, t_min, generator) -> torch.Tensor:
    """Denoising score matching with the ``v(t)`` weighting on a batch ``y [B, d]``."""
    B = y.shape[0]
    t = t_min + (sde.T - t_min) * torch.rand(B, generator=generator, dtype=y.dtype, device=y.device)
    z = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)
    std = torch.sqrt(sde.var(t)).unsqueeze(-1)
    x = sde.alpha(t).unsqueeze(-1) * y + std * z
    return ((std * score(x, t) + z) ** 2).sum(-1).mean()

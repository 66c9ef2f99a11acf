"""Energy-based models: ``p(y) = exp(-E(y)) / Z`` over ``R^d`` with an energy network ``E``.

The normaliser ``Z = int exp(-E)`` has no closed form, so nothing about the density is
declared exact here:

* ``sample``: Markov chains driven by the score ``-grad E`` — MALA (Metropolis-adjusted
  Langevin, default; asymptotically exact, step size adapted during the first half of
  the chain then frozen) or unadjusted Langevin (``method="ula"``, biased by
  ``O(step_size)``), started from the base ``N(base_loc, base_scale^2 I)`` or, with
  ``init="ais"``, from AIS particles resampled by their weights (which gets the mode
  weights of a multimodal energy right where chains would not mix).
* ``log Z``: :meth:`EnergyBasedModel.log_partition_estimate`, annealed importance
  sampling (Neal 2001) from the Gaussian base along
  ``U_beta = (1 - beta) U_base + beta E`` with MALA transitions, as a
  :class:`genprog.Estimate` (delta-method stderr of the log of the mean weight).
* ``log p(y) = -E(y) - log Z``: ``_log_prob_estimate`` (so ``log_prob_estimate`` and a
  conditioned model's ``log_marginal()``); ``log_prob`` itself raises (the story's
  distribution is unnormalised and says so rather than returning ``-E``).
* ``condition(dims={i: v})``: :class:`EnergyConditional` — the normaliser cancels in
  ``p(rest | given) ∝ exp(-E(given, rest))``, so it is sampled by MALA on the other
  coordinates; its ``log_prob`` needs the conditional normaliser and is estimated by AIS
  over the other coordinates. (``conditional_by_inference`` is not used: it needs an
  exact normalised ``_log_prob_rows``, which this class does not have.)
* ``marginalize(dims=[...])``: :class:`EnergyMarginal` — samples by dropping coordinates
  of joint draws; ``log p(y_keep) = log Z(y_keep) - log Z``, both by AIS.
* ``mle``: score matching (denoising, or sliced when ``noise_scale=None``) or contrastive
  divergence with short-run Langevin chains and a replay buffer — neither is maximum
  likelihood.

Shapes: ``d`` (``dim``); data ``[N, d]``; energies ``[N]``.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints

from genprog.estimate import Estimate
from genprog.monte_carlo import log_mean_exp
from genprog.optim import minimize
from genprog.rng import seeded
from genprog.validation import check_int

from .base import ZooModel, deprecated_record, renamed_keywords, sample_rows, training_record

_LOG_2PI = math.log(2 * math.pi)
METHODS = ("score_matching", "contrastive_divergence")


def _ref(module: nn.Module) -> dict:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {"device": None, "dtype": torch.get_default_dtype()}


# ---------------------------------------------------------------------- energies
class EnergyNet(nn.Module):
    """``E(x) = mlp(x) + tether |x|^2``: an MLP with SiLU activations (linear growth at
    most) plus a quadratic tether that keeps ``exp(-E)`` integrable. ``[..., d] -> [...]``."""

    def __init__(self, dim: int, hidden=(64, 64), tether: float = 0.05):
        super().__init__()
        dim = check_int("EnergyNet: dim", dim)
        if not tether > 0:
            raise ValueError(f"EnergyNet: tether must be positive (integrability), got {tether!r}")
        layers, prev = [], dim
        for width in hidden:
            layers += [nn.Linear(prev, width), nn.SiLU()]
            prev = width
        layers.append(nn.Linear(prev, 1))
        self.net = nn.Sequential(*layers)
        self.tether = float(tether)

    def forward(self, x):
        return self.net(x).squeeze(-1) + self.tether * (x ** 2).sum(-1)


class GaussianEnergy(nn.Module):
    """``E(x) = (x - mean)^T precision (x - mean) / 2 + offset`` (a known quadratic;
    ``log Z = d log(2 pi) / 2 - log det(precision) / 2 - offset``)."""

    def __init__(self, mean, precision, offset: float = 0.0):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean))
        self.register_buffer("precision", torch.as_tensor(precision))
        self.offset = float(offset)

    def forward(self, x):
        r = x - self.mean
        return 0.5 * ((r @ self.precision) * r).sum(-1) + self.offset

    def log_partition(self) -> float:
        d = self.mean.shape[-1]
        return float(0.5 * d * _LOG_2PI - 0.5 * torch.logdet(self.precision) - self.offset)


class GaussianMixtureEnergy(nn.Module):
    """``E(x) = -log sum_k w_k N(x; mu_k, S_k) - log_scale``: an unnormalised mixture
    density ``exp(-E) = exp(log_scale) p(x)``, so ``log Z = log_scale``."""

    def __init__(self, weights, means, covariances, log_scale: float = 0.0):
        super().__init__()
        w = torch.as_tensor(weights)
        self.register_buffer("log_weights", torch.log(w / w.sum()))
        self.register_buffer("means", torch.as_tensor(means))
        self.register_buffer("covariances", torch.as_tensor(covariances))
        self.log_scale = float(log_scale)

    def forward(self, x):
        comp = dist.MultivariateNormal(self.means, self.covariances)
        return -torch.logsumexp(self.log_weights + comp.log_prob(x.unsqueeze(-2)), -1) - self.log_scale

    def log_partition(self) -> float:
        return self.log_scale


# ---------------------------------------------------------------------- MCMC and AIS
def _potential_and_grad(fn, x):
    """``U(x) [N]`` and ``grad U(x) [N, d]`` (no graph kept)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        u = fn(x)
        (g,) = torch.autograd.grad(u.sum(), x)
    return u.detach(), g.detach()


def _mala_step(fn, x, u, g, h, adjust: bool = True):
    """One (Metropolis-adjusted) Langevin step on ``exp(-fn)``, ``h`` a float or ``[N, 1]``:
    proposal ``x - h grad U + sqrt(2 h) xi``. Returns ``(x, u, g, accept [N])``."""
    prop = x - h * g + math.sqrt(2.0) * torch.sqrt(torch.as_tensor(h, dtype=x.dtype)) * torch.randn_like(x)
    up, gp = _potential_and_grad(fn, prop)
    if not adjust:
        return prop, up, gp, torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    fwd = ((prop - x + h * g) ** 2).sum(-1) / (4 * h)
    bwd = ((x - prop + h * gp) ** 2).sum(-1) / (4 * h)
    log_a = (u - up) + fwd - bwd
    log_a = torch.where(torch.isfinite(log_a), log_a, torch.full_like(log_a, -math.inf))
    acc = torch.log(torch.rand_like(log_a)) < log_a
    a = acc.unsqueeze(-1)
    return (torch.where(a, prop, x), torch.where(acc, up, u), torch.where(a, gp, g),
            torch.exp(log_a.clamp(max=0.0)))


def langevin(fn, x0, *, steps: int, step_size: float | None = None, adjust: bool = True,
             target_accept: float = 0.6) -> tuple[torch.Tensor, dict]:
    """Run ``N`` chains of MALA (``adjust=True``) or unadjusted Langevin on ``exp(-fn(x))``
    from ``x0 [N, d]`` for ``steps`` steps.

    With ``step_size=None`` (MALA only) the step size starts at ``0.1`` and is adapted
    during the first half of the steps towards a mean acceptance of ``target_accept``
    (multiplicatively, shared by the chains), then frozen for the second half, whose
    transitions leave the target invariant. Returns ``(x [N, d], info)`` with ``info``:
    ``step_size``, ``acceptance_rate`` (mean over the second half).
    """
    if step_size is None and not adjust:
        raise ValueError("langevin: unadjusted Langevin needs an explicit step_size")
    adapt = step_size is None
    h = 0.1 if adapt else float(step_size)
    if not h > 0:
        raise ValueError(f"langevin: step_size must be positive, got {step_size!r}")
    x = x0
    u, g = _potential_and_grad(fn, x)
    accs = []
    for k in range(steps):
        x, u, g, a = _mala_step(fn, x, u, g, h, adjust)
        rate = float(a.mean())
        if adapt and k < steps // 2:
            h = h * math.exp(2.0 * (rate - target_accept))
        else:
            accs.append(rate)
    return x, {"step_size": h, "acceptance_rate": sum(accs) / len(accs) if accs else float("nan")}


def ais_log_partition(energy, dim: int, *, base_loc, base_scale, num_particles: int = 256,
                      num_temps: int = 200, mala_steps: int = 1, seed: int | None = 0,
                      device=None, dtype=None) -> tuple[Estimate, torch.Tensor, torch.Tensor]:
    """Annealed importance sampling for ``log int exp(-energy(x)) dx`` over ``R^dim``.

    The base is ``q = N(base_loc, base_scale^2 I)`` (normalised, ``log Z_q = 0``); the
    intermediate targets ``exp(-U_k)``, ``U_k = (1 - beta_k) (-log q) + beta_k energy``
    follow ``beta_k = (k / K)^2`` (``K = num_temps - 1``; finer near the base), each
    bridged by ``mala_steps`` MALA steps whose step size is adapted from one temperature
    to the next towards acceptance 0.6. ``log Z`` is the log of the mean importance weight
    with the delta-method stderr (its downward bias is about ``stderr^2 / 2``).

    Returns
    -------
    (Estimate, x, log_weights)
        ``method="ais"``, ``details``: ``ess``, ``num_temps``, ``final_step_size``; the
        final particles ``[M, dim]`` and their log weights ``[M]``.
    """
    start = time.perf_counter()
    num_particles = check_int("AIS: num_particles", num_particles, minimum=2)
    num_temps = check_int("AIS: num_temps", num_temps, minimum=2)
    mala_steps = check_int("AIS: mala_steps", mala_steps)
    dtype = dtype or torch.get_default_dtype()
    loc = torch.as_tensor(base_loc, dtype=dtype, device=device).expand(dim)
    scale = torch.as_tensor(base_scale, dtype=dtype, device=device).expand(dim)
    if not bool((scale > 0).all()):
        raise ValueError("AIS: base_scale must be positive")
    log_norm = torch.log(scale).sum() + 0.5 * dim * _LOG_2PI

    def neg_log_q(x):
        return 0.5 * (((x - loc) / scale) ** 2).sum(-1) + log_norm

    K = num_temps - 1
    betas = (torch.arange(num_temps, dtype=torch.float64) / K) ** 2
    with seeded(seed):
        x = loc + scale * torch.randn(num_particles, dim, dtype=dtype, device=device)
        logw = torch.zeros(num_particles, dtype=dtype, device=device)
        h = 0.1 * float(scale.min()) ** 2
        with torch.no_grad():
            e_x = energy(x)
        for k in range(1, num_temps):
            b0, b1 = float(betas[k - 1]), float(betas[k])
            logw = logw + (b1 - b0) * (neg_log_q(x) - e_x)

            def U(z, b=b1):
                return (1 - b) * neg_log_q(z) + b * energy(z)

            u, g = _potential_and_grad(U, x)
            for _ in range(mala_steps):
                x, u, g, a = _mala_step(U, x, u, g, h)
                h = h * math.exp(2.0 * (float(a.mean()) - 0.6))
            with torch.no_grad():
                e_x = energy(x)
    if not bool(torch.isfinite(logw).all()):
        raise FloatingPointError("AIS: non-finite importance weights (is exp(-E) integrable, "
                                 "the base wide enough?)")
    value, se, ess = map(float, log_mean_exp(logw))
    est = Estimate(value, se, "ais", num_samples=num_particles,
                   num_evaluations=num_particles * K * (mala_steps + 1),
                   wall_time_s=time.perf_counter() - start,
                   details={"ess": ess, "num_temps": num_temps, "final_step_size": h,
                            "base_loc": loc, "base_scale": scale})
    return est, x, logw


# ---------------------------------------------------------------------- the distribution
class UnnormalizedEnergyDistribution(dist.TorchDistribution):
    """``exp(-E(y)) / Z`` over ``R^d`` as the story's distribution: ``sample`` runs MALA
    chains (default settings of :meth:`EnergyBasedModel.sample`); ``log_prob`` raises, since
    ``Z`` is unknown (use ``log_prob_estimate`` / ``log_marginal``)."""

    arg_constraints: ClassVar[dict] = {}
    support = constraints.real_vector

    def __init__(self, energy, dim, base_loc, base_scale, batch_shape=()):
        self.energy, self.base_loc, self.base_scale = energy, base_loc, base_scale
        super().__init__(torch.Size(batch_shape), torch.Size([dim]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return UnnormalizedEnergyDistribution(self.energy, self.event_shape[0], self.base_loc,
                                              self.base_scale, batch_shape)

    def log_prob(self, value):
        raise ValueError("EnergyBasedModel: log p(y) = -E(y) - log Z with an unknown normaliser; "
                         "use log_prob_estimate(y) or condition(y=...).log_marginal() (AIS), or "
                         "energy(y) for the unnormalised part")

    def sample(self, sample_shape=()):
        shape = torch.Size(sample_shape) + self.batch_shape
        d = self.event_shape[0]
        ref = _ref(self.energy)
        n = max(1, math.prod(shape))
        x0 = self.base_loc + self.base_scale * torch.randn(n, d, **ref)
        x, _ = langevin(self.energy, x0, steps=1000)
        return x.reshape(*shape, d)


# ---------------------------------------------------------------------- the model
class EnergyBasedModel(ZooModel):
    """``p(y) ∝ exp(-E(y))`` over ``R^d`` (see the module docstring for what is estimated
    and how).

    Parameters
    ----------
    energy : nn.Module
        ``forward(y [..., d]) -> [...]``, e.g. :class:`EnergyNet`; ``exp(-E)`` must be
        integrable.
    dim : int
    base_loc, base_scale : float or Tensor ``[d]``
        The Gaussian ``N(base_loc, base_scale^2 I)`` that starts Langevin chains and is the
        AIS base: it should cover the model's mass.
    name : str, optional
        Prefix under which ``energy`` is registered with ``pyro.module``.

    Attributes
    ----------
    info : dict
        The record of what was run on the model. :meth:`mle` sets ``loss_trace`` (list of
        float, the minibatch loss at every Adam step), ``num_steps`` (int, steps taken),
        ``converged`` (bool, whether the plateau rule fired before ``max_iters``) and
        ``method`` (the training objective); :meth:`sample` sets ``last_sample``, a dict
        with the Langevin chains' ``step_size`` (float, the final one) and
        ``acceptance_rate`` (float, mean over the second half; 1 for ``"ula"``).
    last_sample_info : dict
        Deprecated name of ``info["last_sample"]``.

    Examples
    --------
    >>> import torch
    >>> m = EnergyBasedModel(energy=GaussianEnergy(torch.zeros(2), torch.eye(2)), dim=2)
    >>> m.energy(torch.tensor([1.0, 1.0]))
    tensor(1.)
    """

    mle_kind = "score matching or contrastive divergence"
    sampling_kind = "estimated (MALA chains)"
    last_sample_info = deprecated_record("last_sample_info", "last_sample")

    def __init__(self, *, energy: nn.Module, dim: int, base_loc=0.0, base_scale=2.0,
                 name: str | None = None):
        if not isinstance(energy, nn.Module):
            raise TypeError(f"EnergyBasedModel: energy must be an nn.Module, got {type(energy).__name__}")
        dim = check_int("EnergyBasedModel: dim", dim)
        ref = _ref(energy)
        base_loc = torch.as_tensor(base_loc, **ref).expand(dim).clone()
        base_scale = torch.as_tensor(base_scale, **ref).expand(dim).clone()
        if not bool((base_scale > 0).all()) or not bool(torch.isfinite(base_loc).all()):
            raise ValueError("EnergyBasedModel: base_scale must be positive and base_loc finite")
        with torch.no_grad():
            e = energy(base_loc.unsqueeze(0))
        if not torch.is_tensor(e) or tuple(e.shape) != (1,):
            raise ValueError(f"EnergyBasedModel: energy(y [1, {dim}]) must return [1]; got "
                             f"{list(e.shape) if torch.is_tensor(e) else type(e).__name__}")
        if name is None:
            name = f"EBM_{uuid.uuid4().hex[:12]}"
        super().__init__(energy=energy, dim=dim, base_loc=base_loc, base_scale=base_scale, name=name)

    @staticmethod
    def story(n=None, energy=None, dim=1, base_loc=0.0, base_scale=2.0, name="ebm"):
        """``y ~ exp(-E(y)) / Z`` (one site ``"y"``; sampled by MALA)."""
        energy = pyro.module(f"{name}.energy", energy)
        d = UnnormalizedEnergyDistribution(energy, dim, base_loc, base_scale)
        return sample_rows(n, d)

    @property
    def energy_net(self) -> nn.Module:
        return self.kwargs["energy"]

    def _base(self):
        ref = _ref(self.energy_net)
        return self.kwargs["base_loc"].to(**ref), self.kwargs["base_scale"].to(**ref)

    def to(self, device=None, dtype=None) -> EnergyBasedModel:
        """Also moves the energy network."""
        self.energy_net.to(device=device, dtype=dtype)
        return super().to(device, dtype)

    def energy(self, y) -> torch.Tensor:
        """``E(y)``: ``[N]`` for ``y [N, d]``, a scalar for one row (``log p = -E - log Z``)."""
        y, single = self._as_data(y, "energy")
        with torch.no_grad():
            e = self.energy_net(y.to(**_ref(self.energy_net)))
        return e[0] if single else e

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int = 1, seed: int | None = None, *, steps: int = 1000,
               step_size: float | None = None, method: str = "mala", init: str = "base",
               **ais_options) -> dict:
        """Langevin draws of ``y``.

        Parameters
        ----------
        n : int
            Number of independent chains (one draw each: the last state).
        seed : int, optional
        steps : int
            Langevin steps per chain.
        step_size : float, optional
            ``h`` in ``y' = y - h grad E(y) + sqrt(2 h) xi``; None (MALA only): adapted
            during the first half of the chain, then frozen.
        method : {"mala", "ula"}
            Metropolis-adjusted (asymptotically exact) or unadjusted Langevin (bias
            ``O(h)``).
        init : {"base", "ais"}
            Chains start from the base Gaussian, or from AIS particles resampled by their
            importance weights (``ais_options``: ``num_temps``, ``mala_steps``), which gets
            the weights of separated modes right.

        Returns
        -------
        dict
            ``{"y": [n, d]}`` (``[n, N, d]`` for a model conditioned on ``N`` rows);
            ``info["last_sample"]`` holds ``step_size`` and ``acceptance_rate``.
        """
        if method not in ("mala", "ula"):
            raise ValueError(f"EnergyBasedModel.sample: method must be 'mala' or 'ula', got {method!r}")
        if init not in ("base", "ais"):
            raise ValueError(f"EnergyBasedModel.sample: init must be 'base' or 'ais', got {init!r}")
        n = check_int("sample: n", n)
        steps = check_int("EnergyBasedModel.sample: steps", steps)
        shape = (n,) if self.n_data is None else (n, int(self.n_data))
        total = math.prod(shape)
        with self.context(), seeded(seed):
            x0 = self._initial_states(self.energy_net, list(range(self.kwargs["dim"])), total,
                                      init, ais_options)
            x, info = langevin(self.energy_net, x0, steps=steps, step_size=step_size,
                               adjust=method == "mala")
        self.info = {**getattr(self, "info", {}), "last_sample": info}
        return {"y": x.reshape(*shape, self.kwargs["dim"])}

    def _initial_states(self, energy, coords, total, init, ais_options):
        loc, scale = self._base()
        loc, scale = loc[coords], scale[coords]
        if init == "base":
            if ais_options:
                raise TypeError(f"EnergyBasedModel.sample: {sorted(ais_options)} apply to init='ais' only")
            return loc + scale * torch.randn(total, len(coords), dtype=loc.dtype, device=loc.device)
        bad = set(ais_options) - {"num_temps", "mala_steps"}
        if bad:
            raise TypeError(f"EnergyBasedModel.sample: unknown option(s) {sorted(bad)}; "
                            "valid: num_temps, mala_steps")
        _, x, logw = ais_log_partition(energy, len(coords), base_loc=loc, base_scale=scale,
                                       num_particles=max(total, 2), seed=None, device=loc.device,
                                       dtype=loc.dtype, **ais_options)
        idx = torch.multinomial(torch.softmax(logw, 0), total, replacement=True)
        return x[idx]

    # ------------------------------------------------------------------ normaliser
    def log_partition_estimate(self, *, num_particles: int = 256, num_temps: int = 200,
                               mala_steps: int = 1, seed: int = 0) -> Estimate:
        """``log Z = log int exp(-E(y)) dy`` by annealed importance sampling from the base
        Gaussian (see :func:`ais_log_partition`).

        Returns
        -------
        Estimate
            ``method="ais"`` with its stderr; ``details``: ``ess`` of the weights,
            ``num_temps``, ``final_step_size``.
        """
        loc, scale = self._base()
        with self.context():
            est, _, _ = ais_log_partition(self.energy_net, self.kwargs["dim"], base_loc=loc,
                                          base_scale=scale, num_particles=num_particles,
                                          num_temps=num_temps, mala_steps=mala_steps, seed=seed,
                                          device=loc.device, dtype=loc.dtype)
        return est

    def _log_prob_estimate(self, y, *, num_particles: int = 256, num_temps: int = 200,
                           mala_steps: int = 1, seed: int = 0) -> Estimate:
        """``sum_rows log p(y) = -sum E(y) - N log Z`` with ``log Z`` from
        :meth:`log_partition_estimate` (stderr ``N`` times its stderr)."""
        e = self.energy(y).reshape(-1)
        est = self.log_partition_estimate(num_particles=num_particles, num_temps=num_temps,
                                          mala_steps=mala_steps, seed=seed)
        N = e.shape[0]
        return Estimate(float(-e.sum()) - N * est.value, N * est.stderr, "ais", est.num_samples,
                        est.num_evaluations, est.wall_time_s,
                        {**est.details, "log_partition": est.value})

    # ------------------------------------------------------------------ conditionals
    def _conditional_estimate(self, obs):
        return EnergyConditional(self, obs)

    def _marginal_estimate(self, drop):
        return EnergyMarginal(self, drop)

    # ------------------------------------------------------------------ training
    @classmethod
    @renamed_keywords(max_steps="max_iters")
    def mle(cls, y, *, method: str = "score_matching", hidden=(64, 64), energy=None,
            noise_scale: float | None = 0.1, max_iters: int = 3000, batch_size: int = 256,
            learning_rate: float = 2e-3, window: int = 200, cd_steps: int = 20,
            cd_step_size: float = 0.01, buffer_size: int = 5000, reinit: float = 0.05,
            regularization: float = 0.1, seed: int = 0, progress: bool | None = None,
            **options) -> EnergyBasedModel:
        """Train an energy network on ``y [N, d]`` (give roughly standardised data).

        Parameters
        ----------
        y : array ``[N, d]``
        method : {"score_matching", "contrastive_divergence"}
            ``"score_matching"``: denoising score matching
            ``|| noise_scale grad E(y + noise_scale z) - z ||^2`` (fits the data blurred
            by ``N(0, noise_scale^2 I)``), or sliced score matching (Song et al. 2019;
            ``v^T grad_y(v^T s) + (v^T s)^2 / 2`` with ``s = -grad E``, Rademacher ``v``)
            when ``noise_scale`` is None. ``"contrastive_divergence"``: minimise
            ``mean E(data) - mean E(negatives)`` + ``regularization`` times the mean
            squared energies, the negatives from ``cd_steps`` unadjusted Langevin steps of
            size ``cd_step_size`` started from a replay buffer of ``buffer_size`` past
            negatives (a fraction ``reinit`` restarted from the base each step; Du &
            Mordatch 2019).
        hidden : tuple of int
            Widths of the default :class:`EnergyNet`.
        energy : nn.Module, optional
            An energy network to train instead.
        max_iters, batch_size, window : int
            (``max_steps``: the deprecated name of ``max_iters``.)
        learning_rate : float
        seed : int
        progress : bool, optional
        **options
            ``base_loc``, ``base_scale``, ``name``: passed to the constructor.

        Stops on a plateau of the windowed loss (after two learning-rate cuts by 5) or
        warns with a :class:`ConvergenceWarning` at ``max_iters``.

        Returns
        -------
        EnergyBasedModel
            With ``info``: ``loss_trace``, ``num_steps``, ``converged``, ``method`` (see
            :class:`EnergyBasedModel`).
        """
        if method not in METHODS:
            raise ValueError(f"EnergyBasedModel.mle: method must be one of {METHODS}, got {method!r}")
        unknown = set(options) - {"base_loc", "base_scale", "name"}
        if unknown:
            raise TypeError(f"EnergyBasedModel.mle: unknown option(s) {sorted(unknown)}; valid: "
                            "base_loc, base_scale, name and the named arguments")
        y = torch.as_tensor(y)
        if not y.is_floating_point():
            y = y.to(torch.get_default_dtype())
        if y.dim() != 2 or y.shape[0] < 2 or not bool(torch.isfinite(y).all()):
            raise ValueError("EnergyBasedModel.mle: y must be a finite [N, d] tensor with N >= 2")
        for name, v in (("max_iters", max_iters), ("batch_size", batch_size), ("window", window),
                        ("cd_steps", cd_steps), ("buffer_size", buffer_size)):
            check_int(f"EnergyBasedModel.mle: {name}", v)
        if noise_scale is not None and not noise_scale > 0:
            raise ValueError(f"EnergyBasedModel.mle: noise_scale must be positive or None, got {noise_scale!r}")
        n, d = y.shape
        if energy is None:
            with seeded(seed):
                energy = EnergyNet(d, hidden).to(device=y.device, dtype=y.dtype)
        elif not isinstance(energy, nn.Module):
            raise TypeError(f"EnergyBasedModel.mle: energy must be an nn.Module, got {type(energy).__name__}")
        y = y.to(**_ref(energy))
        base_loc = torch.as_tensor(options.get("base_loc", 0.0), dtype=y.dtype, device=y.device)
        base_scale = torch.as_tensor(options.get("base_scale", 2.0), dtype=y.dtype, device=y.device)
        opt = torch.optim.Adam(energy.parameters(), lr=learning_rate)
        g = torch.Generator(device=y.device).manual_seed(seed)
        buffer = base_loc + base_scale * torch.randn(min(buffer_size, max(n, batch_size)), d,
                                                     generator=g, dtype=y.dtype, device=y.device)
        state = {"buffer": buffer}

        def loss_fn(step):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=g, device=y.device)
            batch = y[idx]
            if method == "score_matching":
                return _score_matching_loss(energy, batch, noise_scale, g)
            loss, state["buffer"] = _cd_loss(energy, batch, state["buffer"], cd_steps, cd_step_size,
                                             reinit, regularization, base_loc, base_scale, g)
            return loss

        result = minimize(loss_fn, opt, max_iters=max_iters, window=window,
                          what=f"EnergyBasedModel.mle ({method})", progress=progress)
        out = cls(energy=energy, dim=d, **options)
        out.info = training_record(result, method=method)
        return out


def _score_matching_loss(energy, x, noise_scale, g):
    if noise_scale is not None:  # denoising score matching
        z = torch.randn(x.shape, generator=g, dtype=x.dtype, device=x.device)
        xt = (x + noise_scale * z).requires_grad_(True)
        (grad,) = torch.autograd.grad(energy(xt).sum(), xt, create_graph=True)
        return ((noise_scale * grad - z) ** 2).sum(-1).mean()
    # sliced score matching with Rademacher projections
    v = torch.randint(0, 2, x.shape, generator=g, device=x.device).to(x.dtype) * 2 - 1
    xg = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(energy(xg).sum(), xg, create_graph=True)
    sv = -(grad * v).sum(-1)
    (hv,) = torch.autograd.grad(sv.sum(), xg, create_graph=True)
    return ((hv * v).sum(-1) + 0.5 * sv ** 2).mean()


def _cd_loss(energy, x, buffer, steps, h, reinit, alpha, base_loc, base_scale, g):
    B, d = x.shape
    idx = torch.randint(0, buffer.shape[0], (B,), generator=g, device=x.device)
    neg = buffer[idx]
    fresh = torch.rand(B, generator=g, device=x.device) < reinit
    neg = torch.where(fresh.unsqueeze(-1), base_loc + base_scale * torch.randn(
        B, d, generator=g, dtype=x.dtype, device=x.device), neg)
    for _ in range(steps):
        _, grad = _potential_and_grad(energy, neg)
        neg = neg - h * grad + math.sqrt(2 * h) * torch.randn(neg.shape, generator=g,
                                                              dtype=x.dtype, device=x.device)
    neg = neg.detach()
    buffer = buffer.clone()
    buffer[idx] = neg
    e_pos, e_neg = energy(x), energy(neg)
    loss = e_pos.mean() - e_neg.mean() + alpha * (e_pos ** 2 + e_neg ** 2).mean()
    return loss, buffer


# ---------------------------------------------------------------------- conditionals, marginals
class EnergyConditional:
    """``p(y_rest | y_given) ∝ exp(-E(y_given, y_rest))`` for an :class:`EnergyBasedModel`:
    ``sample`` by Langevin on the other coordinates (the normaliser cancels), ``log_prob``
    by AIS for the conditional normaliser ``Z(y_given) = int exp(-E) dy_rest``.

    Attributes
    ----------
    info : dict
        Set by :meth:`sample`: ``last_sample``, a dict with the chains' ``step_size`` and
        ``acceptance_rate`` (as :attr:`EnergyBasedModel.info`).
    last_sample_info : dict
        Deprecated name of ``info["last_sample"]``.
    """

    last_sample_info = deprecated_record("last_sample_info", "last_sample")

    def __init__(self, model: EnergyBasedModel, obs: dict):
        self.model = model
        d = model.kwargs["dim"]
        self.given = sorted(obs)
        self.rest = [i for i in range(d) if i not in obs]
        ref = _ref(model.energy_net)
        self.values = torch.stack([torch.as_tensor(obs[i]).reshape(()).to(**ref) for i in self.given])

    def energy(self, rest: torch.Tensor) -> torch.Tensor:
        """``E(y_given, rest)`` for ``rest [N, len(rest)]`` -> ``[N]``."""
        d = self.model.kwargs["dim"]
        full = torch.empty(*rest.shape[:-1], d, dtype=rest.dtype, device=rest.device)
        full[..., self.rest] = rest
        full[..., self.given] = self.values.to(rest.dtype).expand(*rest.shape[:-1], len(self.given))
        return self.model.energy_net(full)

    def sample(self, n: int = 1, seed: int | None = None, *, steps: int = 1000,
               step_size: float | None = None, method: str = "mala", init: str = "base",
               **ais_options) -> dict:
        """``{"y": [n, len(rest)]}``: the coordinates not given, in increasing order
        (options as :meth:`EnergyBasedModel.sample`)."""
        if method not in ("mala", "ula") or init not in ("base", "ais"):
            raise ValueError("EnergyConditional.sample: method is 'mala' or 'ula', init 'base' or 'ais'")
        n = check_int("sample: n", n)
        with self.model.context(), seeded(seed):
            x0 = self.model._initial_states(self.energy, self.rest, n, init, ais_options)
            x, info = langevin(self.energy, x0, steps=steps, step_size=step_size,
                               adjust=method == "mala")
        self.info = {"last_sample": info}
        return {"y": x}

    def log_partition_estimate(self, *, num_particles: int = 256, num_temps: int = 200,
                               mala_steps: int = 1, seed: int = 0) -> Estimate:
        """``log Z(y_given) = log int exp(-E(y_given, r)) dr`` by AIS over the other
        coordinates (base: the model's base Gaussian restricted to them)."""
        loc, scale = self.model._base()
        with self.model.context():
            est, _, _ = ais_log_partition(self.energy, len(self.rest), base_loc=loc[self.rest],
                                          base_scale=scale[self.rest], num_particles=num_particles,
                                          num_temps=num_temps, mala_steps=mala_steps, seed=seed,
                                          device=loc.device, dtype=loc.dtype)
        return est

    def log_prob(self, y, **ais_options) -> Estimate:
        """``sum_rows log p(y_rest | y_given)`` for ``y [len(rest)]`` or ``[N, len(rest)]``
        as an :class:`genprog.Estimate` (``-E - log Z(y_given)``, AIS)."""
        ref = _ref(self.model.energy_net)
        r = torch.as_tensor(y).to(**ref)
        if r.dim() == 1:
            r = r.unsqueeze(0)
        if r.dim() != 2 or r.shape[-1] != len(self.rest):
            raise ValueError(f"EnergyConditional.log_prob: y must be [{len(self.rest)}] or "
                             f"[N, {len(self.rest)}] (dims {self.rest}); got {list(torch.as_tensor(y).shape)}")
        with torch.no_grad():
            e = self.energy(r)
        est = self.log_partition_estimate(**ais_options)
        N = r.shape[0]
        return Estimate(float(-e.sum()) - N * est.value, N * est.stderr, "ais", est.num_samples,
                        est.num_evaluations, est.wall_time_s, dict(est.details))


class EnergyMarginal:
    """The distribution of the coordinates ``keep`` of an :class:`EnergyBasedModel` after
    integrating out ``drop``: ``sample`` drops coordinates of joint Langevin draws;
    ``log_prob(y_keep) = log Z(y_keep) - log Z`` with both normalisers by AIS."""

    def __init__(self, model: EnergyBasedModel, drop: list):
        self.model = model
        self.drop = list(drop)
        self.keep = [i for i in range(model.kwargs["dim"]) if i not in self.drop]

    def sample(self, n: int = 1, seed: int | None = None, **options) -> dict:
        """``{"y": [n, len(keep)]}`` (options as :meth:`EnergyBasedModel.sample`)."""
        y = self.model.sample(n, seed=seed, **options)["y"]
        return {"y": y[..., self.keep]}

    def log_prob(self, y, *, seed: int = 0, **ais_options) -> Estimate:
        """An :class:`genprog.Estimate` of ``log p(y_keep)`` for one row ``y [len(keep)]``."""
        y = torch.as_tensor(y)
        if tuple(y.shape) != (len(self.keep),):
            raise ValueError(f"EnergyMarginal.log_prob: y must have shape [{len(self.keep)}] "
                             f"(the kept dims {self.keep}); got {list(y.shape)}")
        cond = EnergyConditional(self.model, {i: y[j] for j, i in enumerate(self.keep)})
        top = cond.log_partition_estimate(seed=seed, **ais_options)
        bottom = self.model.log_partition_estimate(seed=seed + 1, **ais_options)
        return Estimate(top.value - bottom.value, math.hypot(top.stderr, bottom.stderr), "ais",
                        top.num_samples + bottom.num_samples,
                        top.num_evaluations + bottom.num_evaluations,
                        top.wall_time_s + bottom.wall_time_s,
                        {"log_partition_conditional": top.value, "log_partition": bottom.value})

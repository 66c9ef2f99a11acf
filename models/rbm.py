"""Binary restricted Boltzmann machine: :class:`RBM` and its visible marginal
:class:`RBMVisible`.

Energy ``E(v, h) = -b.v - c.h - v^T W h`` over ``v in {0,1}^V``, ``h in {0,1}^H``;
``p(v, h) = exp(-E(v, h)) / Z``. The hidden units sum out analytically, giving the free
energy ``F(v) = -b.v - sum_j softplus(c_j + (v W)_j)`` and ``p(v) = exp(-F(v)) / Z``.

The story: ``y ~ RBMVisible(W, b, c)``, a :class:`~pyro.distributions.TorchDistribution`
over ``{0,1}^V`` whose ``log_prob`` is exact — ``log Z`` by enumerating the ``2^m`` states
of the smaller layer (``m = min(V, H) <= max_enumerate``, vectorized, in chunks) — so the
generic machinery (``log_prob``, conditioning, ``fit("map")``) works unchanged; with both
layers above ``max_enumerate`` it raises and points to the AIS estimate.

Exact here: ``log_prob`` (enumerable models), ``posterior(v) = p(h | v)`` (factorized
Bernoulli), ``log_partition()`` and exact sampling through the smaller layer
(``sample(method="exact")``). Estimated: ``log Z`` by annealed importance sampling
(Salakhutdinov & Murray 2008), ``_log_prob_estimate``; ``mle`` is persistent contrastive
divergence (a stochastic approximation to maximum likelihood, not exact).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution, constraints

from genprog.estimate import Estimate
from genprog.monte_carlo import log_mean_exp
from genprog.rng import seeded
from genprog.validation import check_int

from .base import ZooModel, deprecated_record, sample_rows
from .gaussian import data_matrix, keep_float64, set_param

#: Largest layer enumerated by default for log Z (2^20 states).
MAX_ENUMERATE = 20
_CHUNK = 2 ** 14


def binary_states(m: int, device=None, dtype=None) -> torch.Tensor:
    """All ``2^m`` binary vectors, ``[2^m, m]`` (row ``i`` is the bits of ``i``, LSB first)."""
    idx = torch.arange(2 ** m, device=device)
    return ((idx.unsqueeze(-1) >> torch.arange(m, device=device)) & 1).to(
        dtype or torch.get_default_dtype())


def free_energy(v: torch.Tensor, W: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``F(v) = -b.v - sum_j softplus(c_j + (v W)_j)``: ``v [..., V]`` -> ``[...]``
    (broadcast against parameter batches ``W [..., V, H]``, ``b [..., V]``, ``c [..., H]``)."""
    act = c + (v.unsqueeze(-2) @ W).squeeze(-2)
    return -(v * b).sum(-1) - torch.nn.functional.softplus(act).sum(-1)


def _layer_log_weights(states, W, b, c, over_visible: bool):
    """Unnormalized log marginal of each state of the enumerated layer: ``[..., S]``."""
    if over_visible:  # log p*(v) = b.v + sum_j softplus(c + v W)
        act = c.unsqueeze(-2) + states @ W  # [..., S, H]
        return (states * b.unsqueeze(-2)).sum(-1) + torch.nn.functional.softplus(act).sum(-1)
    act = b.unsqueeze(-2) + states @ W.transpose(-1, -2)  # [..., S, V]
    return (states * c.unsqueeze(-2)).sum(-1) + torch.nn.functional.softplus(act).sum(-1)


def log_partition(W: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Exact ``log Z`` by enumerating the smaller layer in chunks of ``2^14`` states:
    ``[...]`` for parameter batches ``W [..., V, H]``. Cost ``O(2^min(V,H) V H)``."""
    V, H = W.shape[-2:]
    over_visible = V <= H
    m = V if over_visible else H
    out = None
    total = 2 ** m
    for start in range(0, total, _CHUNK):
        idx = torch.arange(start, min(total, start + _CHUNK), device=W.device)
        states = ((idx.unsqueeze(-1) >> torch.arange(m, device=W.device)) & 1).to(W.dtype)
        lse = torch.logsumexp(_layer_log_weights(states, W, b, c, over_visible), dim=-1)
        out = lse if out is None else torch.logaddexp(out, lse)
    return out


def gibbs_steps(v, W, b, c, steps: int, beta: float = 1.0, base_bias=None):
    """Run ``steps`` block Gibbs sweeps (``h | v`` then ``v | h``) from ``v [..., V]``;
    returns ``(v, h)``. With ``beta < 1`` the sweeps target the AIS intermediate
    ``p_beta(v, h) ∝ exp((1 - beta) base_bias.v + beta (b.v + c.h + v^T W h))``."""
    h = None
    for _ in range(steps):
        h = torch.bernoulli(torch.sigmoid(beta * (c + (v.unsqueeze(-2) @ W).squeeze(-2))))
        act = beta * (b + (h.unsqueeze(-2) @ W.transpose(-1, -2)).squeeze(-2))
        if base_bias is not None:
            act = act + (1 - beta) * base_bias
        v = torch.bernoulli(torch.sigmoid(act))
    return v, h


class RBMVisible(TorchDistribution):
    """The marginal distribution of the visible units of a binary RBM, over ``{0,1}^V``.

    Parameters
    ----------
    W : Tensor ``[..., V, H]``
    b : Tensor ``[..., V]`` visible biases
    c : Tensor ``[..., H]`` hidden biases
    max_enumerate : int
        ``log_prob`` and ``sample`` are exact when ``min(V, H) <= max_enumerate``;
        otherwise ``log_prob`` raises and ``sample`` runs ``gibbs_steps`` block Gibbs sweeps
        from ``Bernoulli(sigmoid(b))`` (approximate).
    gibbs_steps : int
    """

    arg_constraints: ClassVar[dict] = {"W": constraints.independent(constraints.real, 2),
                       "b": constraints.real_vector, "c": constraints.real_vector}
    support = constraints.independent(constraints.boolean, 1)

    def __init__(self, W, b, c, *, max_enumerate: int = MAX_ENUMERATE, gibbs_steps: int = 1000,
                 validate_args=None):
        self.W, self.b, self.c = W, b, c
        self.max_enumerate = max_enumerate
        self.num_gibbs_steps = gibbs_steps
        batch_shape = torch.broadcast_shapes(W.shape[:-2], b.shape[:-1], c.shape[:-1])
        super().__init__(batch_shape, W.shape[-2:-1], validate_args=validate_args)

    @property
    def enumerable(self) -> bool:
        return min(self.W.shape[-2:]) <= self.max_enumerate

    def expand(self, batch_shape, _instance=None):
        # Parameters stay unexpanded (broadcast on use), so log Z is computed once per
        # parameter batch, not once per data row.
        batch_shape = torch.Size(batch_shape)
        torch.broadcast_shapes(batch_shape, self.batch_shape)
        new = self._get_checked_instance(RBMVisible, _instance)
        new.W, new.b, new.c = self.W, self.b, self.c
        new.max_enumerate, new.num_gibbs_steps = self.max_enumerate, self.num_gibbs_steps
        super(RBMVisible, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_partition(self) -> torch.Tensor:
        """Exact ``log Z`` (``[*param_batch]``); ValueError when not enumerable."""
        if not self.enumerable:
            V, H = self.W.shape[-2:]
            raise ValueError(
                f"RBM: log Z needs 2^{min(V, H)} states (V={V}, H={H} > max_enumerate="
                f"{self.max_enumerate}); use the AIS estimate (RBM.log_partition_estimate, "
                "RBM._log_prob_estimate)")
        return log_partition(self.W, self.b, self.c)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        lp = -free_energy(value, self.W, self.b, self.c) - self.log_partition()
        return lp.expand(torch.broadcast_shapes(lp.shape, value.shape[:-1]))

    def sample(self, sample_shape=()):
        with torch.no_grad():
            return self.sample_joint(sample_shape)[0]

    def sample_joint(self, sample_shape=(), exact: bool | None = None, steps=None):
        """Draws ``(v, h)`` of shape ``[*sample_shape, *batch, V]`` and ``[..., H]``: exact
        through the smaller layer when enumerable (``exact=None``), else block Gibbs."""
        shape = torch.Size(sample_shape) + self.batch_shape
        W, b, c = self.W, self.b, self.c
        if exact is None:
            exact = self.enumerable
        if exact:
            if not self.enumerable:
                raise ValueError("RBM: exact sampling enumerates the smaller layer; "
                                 f"min(V, H) = {min(W.shape[-2:])} > max_enumerate = {self.max_enumerate}")
            V, H = W.shape[-2:]
            over_visible = V <= H
            states = binary_states(min(V, H), W.device, W.dtype)
            logits = _layer_log_weights(states, W, b, c, over_visible)
            idx = dist.Categorical(logits=logits).expand(shape).sample()
            s = states[idx]
            if over_visible:
                v = s
                h = torch.bernoulli(torch.sigmoid(c + (v.unsqueeze(-2) @ W).squeeze(-2)))
            else:
                h = s
                v = torch.bernoulli(torch.sigmoid(b + (h.unsqueeze(-2) @ W.transpose(-1, -2)).squeeze(-2)))
            return v, h
        v0 = torch.bernoulli(torch.sigmoid(b).expand(shape + self.event_shape))
        return gibbs_steps(v0, W, b, c, self.num_gibbs_steps if steps is None else steps)


@dataclass(frozen=True)
class CDInfo:
    """Record of a contrastive-divergence fit.

    Attributes
    ----------
    epochs : int
        Passes over the data.
    num_updates : int
        Parameter updates (minibatches).
    persistent : bool
        Persistent chains (PCD) or chains restarted at the data (CD-k).
    reconstruction_error : tuple[float, ...]
        Mean squared one-step reconstruction error per epoch (a rough progress signal,
        not the likelihood).
    """

    epochs: int
    num_updates: int
    persistent: bool
    reconstruction_error: tuple


class RBM(ZooModel):
    """A binary restricted Boltzmann machine; ``y`` is the visible vector ``{0,1}^V``.

    Parameters
    ----------
    W : Tensor ``[V, H]``, optional
        Weights (prior ``Normal(0, 1)`` entries when None).
    b : Tensor ``[V]``, optional
        Visible biases (prior ``Normal(0, 1)``).
    c : Tensor ``[H]``, optional
        Hidden biases (prior ``Normal(0, 1)``).
    n_visible, n_hidden : int, optional
        ``V`` and ``H``; needed only when the parameters that carry them are not given.
    max_enumerate : int
        Exact ``log Z`` (hence ``log_prob``) when ``min(V, H) <= max_enumerate`` (default 20:
        ``2^20`` states, vectorized in chunks).

    Attributes
    ----------
    info : CDInfo
        Set by :meth:`mle`, the fit record (:class:`CDInfo`): ``epochs`` (int, passes over
        the data), ``num_updates`` (int, minibatch updates), ``persistent`` (bool, PCD or
        CD-k), ``reconstruction_error`` (tuple of float, mean squared one-step
        reconstruction error per epoch).
    cd_info : CDInfo
        Deprecated name of ``info`` (the same record; read-only).

    Examples
    --------
    >>> import torch
    >>> rbm = RBM(W=torch.zeros(3, 2), b=torch.zeros(3), c=torch.zeros(2))
    >>> round(float(rbm.log_prob(y=torch.tensor([1.0, 0.0, 1.0]))), 4)  # uniform: -3 log 2
    -2.0794
    """

    mle_kind = "persistent contrastive divergence"
    cd_info = deprecated_record("cd_info")

    def __init__(self, *, W=None, b=None, c=None, n_visible=None, n_hidden=None,
                 max_enumerate: int = MAX_ENUMERATE):
        n_visible = None if n_visible is None else check_int("RBM: n_visible", n_visible)
        n_hidden = None if n_hidden is None else check_int("RBM: n_hidden", n_hidden)
        max_enumerate = check_int("RBM: max_enumerate", max_enumerate, minimum=0)
        super().__init__(W=W, b=b, c=c, n_visible=n_visible, n_hidden=n_hidden,
                         max_enumerate=max_enumerate)
        keep_float64(self)
        W, b, c = (self.kwargs[k] for k in ("W", "b", "c"))
        vs = {n_visible} if n_visible else set()
        hs = {n_hidden} if n_hidden else set()
        for name, t, nd in (("W", W, 2), ("b", b, 1), ("c", c, 1)):
            if t is None:
                continue
            if not torch.is_tensor(t) or t.dim() != nd:
                shape = list(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise ValueError(f"RBM: {name} must be a {'matrix [V, H]' if nd == 2 else 'vector'}"
                                 f", got {shape}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"RBM: {name} has non-finite entries")
        if W is not None:
            vs.add(int(W.shape[0]))
            hs.add(int(W.shape[1]))
        if b is not None:
            vs.add(int(b.shape[0]))
        if c is not None:
            hs.add(int(c.shape[0]))
        if len(vs) > 1 or len(hs) > 1:
            raise ValueError(f"RBM: W, b, c, n_visible and n_hidden disagree: V in {sorted(vs)}, "
                             f"H in {sorted(hs)}")
        if not vs or not hs:
            raise ValueError("RBM: give W, or n_visible and n_hidden for the priors")
        set_param(self, "n_visible", vs.pop())
        set_param(self, "n_hidden", hs.pop())

    @staticmethod
    def story(n=None, W=None, b=None, c=None, n_visible=None, n_hidden=None,
              max_enumerate=MAX_ENUMERATE):
        """``y ~ RBMVisible(W, b, c)`` (the hidden layer summed out analytically)."""
        V, H = int(n_visible), int(n_hidden)
        if W is None:
            W = pyro.sample("W", dist.Normal(0.0, 1.0).expand([V, H]).to_event(2))
        if b is None:
            b = pyro.sample("b", dist.Normal(0.0, 1.0).expand([V]).to_event(1))
        if c is None:
            c = pyro.sample("c", dist.Normal(0.0, 1.0).expand([H]).to_event(1))
        d = RBMVisible(W, b, c, max_enumerate=int(max_enumerate))
        sample_rows(n, d)

    @property
    def event_shape(self) -> tuple:
        return (int(self.kwargs["n_visible"]),)

    def _params(self):
        return self.kwargs["W"], self.kwargs["b"], self.kwargs["c"]

    def _binary(self, y, what):
        v, single = self._as_data(y, what)
        if not bool(((v == 0) | (v == 1)).all()):
            raise ValueError(f"RBM.{what}: y must be binary (entries 0 or 1)")
        return v, single

    def _distribution(self) -> RBMVisible:
        W, b, c = self._params()
        return RBMVisible(W, b, c, max_enumerate=int(self.kwargs["max_enumerate"]))

    # ------------------------------------------------------------------ exact operations
    def _log_prob_rows(self, y):
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("RBM.log_prob: y must be binary (entries 0 or 1)")
        W, b, c = self._params()
        return -free_energy(y, W, b, c) - self._distribution().log_partition()

    def log_partition(self) -> float:
        """Exact ``log Z`` in nats by enumerating the smaller layer (ValueError when
        ``min(V, H) > max_enumerate``)."""
        self._require_parameters("log_partition")
        with self.context():
            return float(self._distribution().log_partition())

    def free_energy(self, y) -> torch.Tensor:
        """``F(v)`` of each row ``[N]`` (``log p(v) = -F(v) - log Z``)."""
        self._require_parameters("free_energy")
        v, single = self._binary(y, "free_energy")
        W, b, c = self._params()
        f = free_energy(v, W, b, c)
        return f[0] if single else f

    def posterior(self, y):
        """Exact ``p(h | v) = prod_j Bernoulli(h_j; sigmoid(c_j + (v W)_j))``.

        Parameters
        ----------
        y : Tensor ``[V]`` or ``[N, V]`` (binary)

        Returns
        -------
        pyro.distributions.Independent
            Bernoulli over ``h`` with event shape ``[H]`` and batch shape ``[]`` or ``[N]``.
        """
        self._require_parameters("posterior")
        v, single = self._binary(y, "posterior")
        W, _, c = self._params()
        p = torch.sigmoid(c + v @ W)
        return dist.Bernoulli(probs=p[0] if single else p).to_event(1)

    def sample(self, n: int = 1, seed: int | None = None, *, method: str = "auto",
               burn_in: int = 1000) -> dict:
        """Draws of the visible and hidden units.

        Parameters
        ----------
        n : int
            Number of draws (independent chains for Gibbs).
        seed : int, optional
        method : {"auto", "exact", "gibbs"}
            ``"exact"``: ancestral sampling through the smaller layer, whose marginal is
            enumerated (``min(V, H) <= max_enumerate``); ``"gibbs"``: ``n`` independent block
            Gibbs chains (``h | v``, ``v | h``) run ``burn_in`` sweeps from
            ``Bernoulli(sigmoid(b))`` — approximate, the bias shrinking with ``burn_in``.
            ``"auto"``: exact when enumerable.
        burn_in : int

        Returns
        -------
        dict
            ``"y"``: ``[n, V]`` and ``"h"``: ``[n, H]`` (``[n, N, ...]`` for a model
            conditioned on ``N`` rows). With parameters left to their priors the generic
            ancestral sampler runs instead (``"y"`` and the parameter sites).
        """
        if method not in ("auto", "exact", "gibbs"):
            raise ValueError(f"RBM.sample: unknown method {method!r}; choose auto, exact or gibbs")
        if self.missing_parameters():
            return super().sample(n, seed=seed)
        n = check_int("sample: n", n)
        burn_in = check_int("RBM.sample: burn_in", burn_in)
        shape = (n,) if self.n_data is None else (n, int(self.n_data))
        d = self._distribution()
        exact = {"auto": None, "exact": True, "gibbs": False}[method]
        with self.context(), seeded(seed), torch.no_grad():
            v, h = d.sample_joint(shape, exact=exact, steps=burn_in)
        return {"y": v, "h": h}

    # ------------------------------------------------------------------ AIS
    def log_partition_estimate(self, *, num_particles: int = 100, num_temps: int = 1000,
                               base_bias=None, seed: int = 0) -> Estimate:
        """Annealed importance sampling estimate of ``log Z`` (Salakhutdinov & Murray 2008).

        The base model is the RBM with ``W = 0`` and visible biases ``base_bias`` (default:
        this RBM's ``b``), ``log Z_A = H log 2 + sum_i softplus(base_bias_i)``; the
        intermediate distributions ``p_k(v) ∝ exp((1 - beta_k) base_bias.v + beta_k b.v)
        prod_j (1 + exp(beta_k (c_j + (v W)_j)))`` are bridged by one tempered block Gibbs
        sweep each, along ``num_temps`` linearly spaced ``beta_k``. ``Z`` is estimated
        unbiasedly by the mean weight; ``log Z`` takes the log of that mean with the
        delta-method standard error ``sd(w) / (sqrt(M) mean(w))`` (its downward bias,
        about ``stderr^2 / 2``, is small when the stderr is).

        Returns
        -------
        Estimate
            ``method="ais"``; ``details``: ``ess`` (effective sample size of the weights),
            ``log_weights`` (Tensor ``[M]``), ``log_partition_base``.
        """
        self._require_parameters("log_partition_estimate")
        num_particles = check_int("RBM.log_partition_estimate: num_particles", num_particles, 2)
        num_temps = check_int("RBM.log_partition_estimate: num_temps", num_temps, 2)
        start = time.perf_counter()
        W, b, c = self._params()
        V, H = W.shape
        if base_bias is None:
            bA = b
        else:
            bA = torch.as_tensor(base_bias, device=W.device, dtype=W.dtype)
            if bA.shape != b.shape or not bool(torch.isfinite(bA).all()):
                raise ValueError(f"RBM.log_partition_estimate: base_bias must be finite [V]={V}")
        with self.context(), seeded(seed), torch.no_grad():
            betas = torch.linspace(0.0, 1.0, num_temps, device=W.device, dtype=W.dtype)

            def log_pstar(v, beta):
                act = beta * (c + v @ W)
                return ((v * ((1 - beta) * bA + beta * b)).sum(-1)
                        + torch.nn.functional.softplus(act).sum(-1))

            v = torch.bernoulli(torch.sigmoid(bA).expand(num_particles, V))
            logw = torch.zeros(num_particles, device=W.device, dtype=W.dtype)
            for k in range(1, num_temps):
                logw = logw + log_pstar(v, betas[k]) - log_pstar(v, betas[k - 1])
                v, _ = gibbs_steps(v, W, b, c, 1, beta=float(betas[k]), base_bias=bA)
            log_za = H * math.log(2.0) + float(torch.nn.functional.softplus(bA).sum())
            value, se, ess = map(float, log_mean_exp(logw))
        return Estimate(log_za + value, se, "ais", num_samples=num_particles,
                        num_evaluations=num_particles * num_temps,
                        wall_time_s=time.perf_counter() - start,
                        details={"ess": ess, "log_weights": logw, "log_partition_base": log_za,
                                 "num_temps": num_temps})

    def _log_prob_estimate(self, y, *, num_particles: int = 100, num_temps: int = 1000,
                           base_bias=None, seed: int = 0) -> Estimate:
        """``sum_rows log p(y) = -sum F(y) - N log Z`` with ``log Z`` from
        :meth:`log_partition_estimate` (stderr ``N`` times its stderr); for RBMs too large
        to enumerate."""
        self._require_parameters("_log_prob_estimate")
        v, _ = self._binary(y, "_log_prob_estimate")
        W, b, c = self._params()
        est = self.log_partition_estimate(num_particles=num_particles, num_temps=num_temps,
                                          base_bias=base_bias, seed=seed)
        N = v.shape[0]
        value = float(-free_energy(v, W, b, c).sum()) - N * est.value
        return Estimate(value, N * est.stderr, "ais", est.num_samples, est.num_evaluations,
                        est.wall_time_s, {**est.details, "log_partition": est.value})

    # ------------------------------------------------------------------ learning
    @classmethod
    def mle(cls, data, n_hidden: int, *, epochs: int = 50, batch_size: int = 100,
            lr: float = 0.1, k: int = 1, persistent: bool = True, momentum: float = 0.5,
            weight_decay: float = 1e-4, seed: int = 0) -> RBM:
        """Fit by (persistent) contrastive divergence, a stochastic approximation to maximum
        likelihood (Hinton 2002; Tieleman 2008).

        Parameters
        ----------
        data : array ``[N, V]`` of 0/1
        n_hidden : int
        epochs, batch_size : int
            Passes over the (shuffled) data and minibatch size.
        lr : float
            Learning rate, decayed linearly to 0 over the run.
        k : int
            Gibbs sweeps per update for the negative phase.
        persistent : bool
            PCD: one persistent chain per minibatch row, never reset; else CD-k from the data.
        momentum, weight_decay : float
        seed : int

        Returns
        -------
        RBM
            Initialised at ``W ~ N(0, 0.01^2)``, ``b = logit(mean of the data)`` (the
            independent-Bernoulli fit), ``c = 0``; a :class:`CDInfo` as attribute ``info``.
        """
        x = data_matrix(cls, data, "mle")
        if not bool(((x == 0) | (x == 1)).all()):
            raise ValueError("RBM.mle: data must be binary (entries 0 or 1)")
        H = check_int("RBM.mle: n_hidden", n_hidden)
        epochs = check_int("RBM.mle: epochs", epochs)
        batch_size = check_int("RBM.mle: batch_size", batch_size)
        k = check_int("RBM.mle: k", k)
        N, V = x.shape
        batch_size = min(batch_size, N)
        g = torch.Generator(device=x.device).manual_seed(seed)
        W = 0.01 * torch.randn(V, H, generator=g, device=x.device, dtype=x.dtype)
        p = x.mean(0).clamp(1e-3, 1 - 1e-3)
        b = torch.log(p) - torch.log1p(-p)
        c = torch.zeros(H, device=x.device, dtype=x.dtype)
        dW, db, dc = torch.zeros_like(W), torch.zeros_like(b), torch.zeros_like(c)
        chains = torch.bernoulli(p.expand(batch_size, V), generator=g)
        per_epoch = N // batch_size
        total = epochs * per_epoch
        step, recon = 0, []

        def bern(probs):
            return torch.bernoulli(probs, generator=g)

        for _ in range(epochs):
            perm = torch.randperm(N, generator=g, device=x.device)
            err = 0.0
            for i in range(per_epoch):
                v = x[perm[i * batch_size:(i + 1) * batch_size]]
                ph = torch.sigmoid(c + v @ W)
                vn = chains if persistent else v
                for _ in range(k):
                    hn = bern(torch.sigmoid(c + vn @ W))
                    vn = bern(torch.sigmoid(b + hn @ W.T))
                phn = torch.sigmoid(c + vn @ W)
                if persistent:
                    chains = vn
                err += float(((v - torch.sigmoid(b + bern(ph) @ W.T)) ** 2).mean())
                rate = lr * (1 - step / total)
                B = v.shape[0]
                dW = momentum * dW + rate * ((v.T @ ph - vn.T @ phn) / B - weight_decay * W)
                db = momentum * db + rate * (v.mean(0) - vn.mean(0))
                dc = momentum * dc + rate * (ph.mean(0) - phn.mean(0))
                W, b, c = W + dW, b + db, c + dc
                step += 1
            recon.append(err / per_epoch)
        model = cls(W=W, b=b, c=c).to(device=x.device, dtype=x.dtype)
        model.info = CDInfo(epochs, total, persistent, tuple(recon))
        return model

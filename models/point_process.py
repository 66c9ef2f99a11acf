"""Temporal point processes on ``[0, T)``: homogeneous and inhomogeneous Poisson
processes and the Hawkes process with an exponential kernel.

**Representation of an event sequence.** The number of events is random, so one draw
``y`` is a fixed-length vector ``[max_events]``: the event times (in the units of ``T``)
in increasing order, padded at the end with ``+inf`` ("no further event before the
horizon"). ``+inf`` rather than NaN because NaN means *missing* everywhere in genprog.
``event_shape == [max_events]``; a data set ``Y [N, max_events]`` holds ``N`` independent
sequences on the same window. :func:`pad_events` builds ``Y`` from a list of arrays and
:func:`event_lists` turns it back.

``y`` is exactly the *first* ``max_events`` events of the process on ``[0, T)``: a row
without padding is a sequence observed up to its ``max_events``-th event ``t_M`` (censored
there), and its density integrates the intensity over ``[0, t_M]`` instead of ``[0, T]``;
sampling keeps the first ``max_events`` events. So every ``max_events`` gives an exact,
consistent distribution (sampling, log p and fits agree; prior draws of an explosive
Hawkes process stay finite). By default ``max_events`` is set far in the upper tail of
the count distribution (mean + 10 sd + 10), where censoring practically never happens.

The density of a sequence ``t_1 < ... < t_k`` (with respect to the measure of a unit-rate
Poisson process) is the classic point-process likelihood::

    log p(t_1..t_k) = sum_i log lambda(t_i | history) - integral_0^T lambda(t | history) dt

(``T`` replaced by ``t_M`` for a full row).

Each class has a Pyro ``story`` whose observed site ``"y"`` is a custom
``TorchDistribution`` over the padded sequence with that log density, so parameters left
``None`` get priors and ``fit("map" | "nuts")`` infers them; its sampler is exact
(Poisson: cumulated exponential gaps, through the inverse compensator for piecewise
rates; Hawkes and callable intensities: Ogata's thinning).

* :class:`PoissonProcess` ``(rate, T)``: ``lambda = rate`` (events per unit time);
  ``log p = N log rate - rate T``. MLE ``rate = N / T`` (closed form).
* :class:`InhomogeneousPoissonProcess` ``(rates, edges, T)`` piecewise-constant (exact
  compensator; MLE closed form, count per piece over its width) or ``(intensity, T)`` a
  vectorised callable ``t -> lambda(t)`` (compensator: the callable ``compensator`` if
  given, else composite Gauss-Legendre quadrature, 64 panels x 20 nodes: accurate to
  rounding for smooth intensities; thinning needs ``bound >= max lambda``).
* :class:`HawkesProcess` ``(mu, alpha, beta, T)``:
  ``lambda(t) = mu + alpha sum_{t_i < t} exp(-beta (t - t_i))``; ``alpha / beta`` is the
  branching ratio (mean number of children per event; < 1 for stationarity). The log
  likelihood in O(n) with ``A_i = sum_{j<i} exp(-beta (t_i - t_j))`` from a running
  log-sum-exp, compensator ``mu T + alpha/beta sum_i (1 - exp(-beta (T - t_i)))``. MLE by
  L-BFGS on the log parameters.

Every class has ``intensity(history, t)`` (the conditional intensity at times ``t`` given
the events in ``history``) and ``compensator(y)`` (``Lambda(t_i)`` at each event: by the
time-rescaling theorem its increments are i.i.d. Exp(1) under the model).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution

from genprog.validation import check_int

from .base import ZooModel, renamed_keywords, sample_rows

__all__ = [
    "HawkesProcess",
    "InhomogeneousPoissonProcess",
    "PoissonProcess",
    "event_lists",
    "pad_events",
]


# ---------------------------------------------------------------------------- representation
def pad_events(sequences, max_events: int | None = None, dtype=torch.float64) -> torch.Tensor:
    """A list of event-time arrays -> ``[N, max_events]`` sorted, padded with ``+inf``.

    The default ``max_events`` is one more than the longest sequence, so no row is full
    (a full row is read as observed only up to its last event; see the module docstring).
    """
    seqs = [torch.sort(torch.as_tensor(np.asarray(s, dtype=float), dtype=dtype).reshape(-1)).values
            for s in sequences]
    longest = max((len(s) for s in seqs), default=0)
    m = longest + 1 if max_events is None else int(max_events)
    if longest > m:
        raise ValueError(f"pad_events: a sequence has {longest} events, more than max_events={m}")
    out = torch.full((len(seqs), m), math.inf, dtype=dtype)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def event_lists(y) -> list:
    """``[N, max_events]`` padded sequences (or one ``[max_events]``) -> list of 1-d
    tensors of the finite event times."""
    y = torch.as_tensor(y)
    rows = y.reshape(-1, y.shape[-1])
    return [r[torch.isfinite(r)] for r in rows]


class _EventTimes(constraints.Constraint):
    """Sorted times in ``[0, T]`` padded at the end with ``+inf`` (event_dim 1)."""

    event_dim = 1

    def __init__(self, T):
        self.T = T
        super().__init__()

    def check(self, value):
        fin = torch.isfinite(value)
        pad_ok = (fin | (value == math.inf)).all(-1)
        trailing = (fin[..., 1:] <= fin[..., :-1]).all(-1) if value.shape[-1] > 1 else pad_ok
        v = torch.where(fin, value, torch.zeros_like(value))
        T = torch.as_tensor(self.T, dtype=value.dtype, device=value.device)
        inside = ((v >= 0) & (v <= T[..., None])).all(-1)
        vs = torch.where(fin, value, torch.full_like(value, math.inf))
        ordered = (vs[..., 1:] >= vs[..., :-1]).all(-1) if value.shape[-1] > 1 else pad_ok
        return pad_ok & trailing & inside & ordered


def _validate_sequences(y, T, what):
    """ValueError unless every row of ``y [N, M]`` is a valid padded sequence on [0, T]."""
    if torch.isnan(y).any():
        raise ValueError(f"{what}: y has NaN entries; pad event sequences with +inf, not NaN "
                         "(see pad_events)")
    if (y == -math.inf).any():
        raise ValueError(f"{what}: y has -inf entries")
    ok = _EventTimes(T).check(y)
    if not bool(ok.all()):
        bad = int((~ok).nonzero()[0, 0]) if ok.dim() else 0
        raise ValueError(f"{what}: row {bad} is not a valid event sequence (times sorted within "
                         f"[0, T={float(T):g}], then +inf padding)")


def _end(yf, fin, T):
    """End of the observed stretch of each row: ``T``, or the last event time of a full
    row (one censored at its ``max_events``-th event)."""
    T = torch.as_tensor(T, dtype=yf.dtype, device=yf.device)
    return torch.where(fin[..., -1], yf[..., -1], T)


def _fill(y, T):
    """Padded entries replaced by ``T`` (finite, so gradients stay finite) and the mask."""
    fin = torch.isfinite(y)
    T = torch.as_tensor(T, dtype=y.dtype, device=y.device)
    return torch.where(fin, y, T[..., None].expand_as(y) if T.dim() else T), fin


# ---------------------------------------------------------------------------- distributions
class _SequenceDistribution(TorchDistribution):
    """Base of the event-sequence distributions: values ``[*batch, max_events]``."""

    has_rsample = False

    def __init__(self, T, max_events, batch_shape, validate_args=None):
        self.T = T
        self.max_events = int(max_events)
        super().__init__(batch_shape, torch.Size([self.max_events]), validate_args=validate_args)

    @constraints.dependent_property(event_dim=1)
    def support(self):
        return _EventTimes(self.T)

    def _params(self):
        raise NotImplementedError

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        new = self._new_like({k: v.expand(batch_shape + v.shape[len(self.batch_shape):])
                              for k, v in self._params().items()})
        return new

    def _flat_params(self, sample_shape):
        """Parameters expanded to ``sample_shape + batch_shape`` and flattened ``[B, ...]``."""
        shape = torch.Size(sample_shape) + self.batch_shape
        B = int(np.prod(shape)) if len(shape) else 1
        out = {}
        for k, v in self._params().items():
            extra = v.shape[len(self.batch_shape):]
            out[k] = v.expand(torch.Size(shape) + extra).reshape(B, *extra)
        return shape, B, out

    @staticmethod
    def _first(t, max_events, T):
        """Sorted candidate times ``[B, m]`` -> the first ``max_events`` before ``T``."""
        t = torch.where(t < T, t, torch.full_like(t, math.inf))
        m = t.shape[-1]
        if m < max_events:
            t = torch.cat([t, t.new_full((t.shape[0], max_events - m), math.inf)], -1)
        return t[:, :max_events]


class PoissonProcessDistribution(_SequenceDistribution):
    """Homogeneous Poisson process on ``[0, T)`` with ``rate [*batch]`` (per unit time)."""

    arg_constraints: ClassVar[dict] = {"rate": constraints.positive}

    def __init__(self, rate, T, max_events, validate_args=None):
        self.rate = torch.as_tensor(rate)
        super().__init__(T, max_events, self.rate.shape, validate_args)

    def _params(self):
        return {"rate": self.rate}

    def _new_like(self, p):
        return PoissonProcessDistribution(p["rate"], self.T, self.max_events)

    def log_prob(self, y):
        if self._validate_args:
            self._validate_sample(y)
        yf, fin = _fill(y, self.T)
        n = fin.sum(-1).to(self.rate.dtype)
        return n * torch.log(self.rate) - self.rate * _end(yf, fin, self.T)

    def sample(self, sample_shape=()):
        with torch.no_grad():
            shape, B, p = self._flat_params(sample_shape)
            rate = p["rate"]
            gaps = torch.empty(B, self.max_events, dtype=rate.dtype, device=rate.device).exponential_()
            t = torch.cumsum(gaps / rate[:, None], -1)
            return self._first(t, self.max_events, self.T).reshape(*shape, self.max_events)


class PiecewisePoissonDistribution(_SequenceDistribution):
    """Poisson process with intensity ``rates[..., k]`` on ``[edges[k], edges[k+1])``."""

    arg_constraints: ClassVar[dict] = {"rates": constraints.independent(constraints.positive, 1)}

    def __init__(self, rates, edges, max_events, validate_args=None):
        self.rates = torch.as_tensor(rates)
        self.edges = edges
        super().__init__(edges[-1], max_events, self.rates.shape[:-1], validate_args)

    def _params(self):
        return {"rates": self.rates}

    def _new_like(self, p):
        return PiecewisePoissonDistribution(p["rates"], self.edges, self.max_events)

    def log_prob(self, y):
        if self._validate_args:
            self._validate_sample(y)
        yf, fin = _fill(y, self.T)
        k = self.rates.shape[-1]
        idx = (torch.searchsorted(self.edges.contiguous(), yf.contiguous(), right=True) - 1).clamp(0, k - 1)
        onehot = (idx[..., None] == torch.arange(k, device=y.device)) & fin[..., None]
        log_r = torch.log(self.rates)[..., None, :]
        events = torch.where(onehot, log_r, torch.zeros_like(log_r)).sum((-1, -2))
        end = _end(yf, fin, self.T)
        exposure = (end[..., None] - self.edges[:-1]).clamp(min=0) \
            .minimum(self.edges[1:] - self.edges[:-1])  # [*, K] time spent in each piece
        return events - (self.rates * exposure).sum(-1)

    def sample(self, sample_shape=()):
        """Unit-rate arrivals mapped through the inverse compensator (exact)."""
        with torch.no_grad():
            shape, B, p = self._flat_params(sample_shape)
            rates = p["rates"]
            widths = self.edges[1:] - self.edges[:-1]
            cum = torch.cat([torch.zeros_like(rates[:, :1]), torch.cumsum(rates * widths, -1)], -1)
            gaps = torch.empty(B, self.max_events, dtype=rates.dtype, device=rates.device).exponential_()
            e = torch.cumsum(gaps, -1)
            k = (torch.searchsorted(cum.contiguous(), e.contiguous(), right=True) - 1) \
                .clamp(0, widths.shape[0] - 1)
            t = self.edges[k] + (e - torch.gather(cum, 1, k)) / torch.gather(rates, 1, k)
            t = torch.where(e < cum[:, -1:], t, torch.full_like(t, math.inf))
            return self._first(t, self.max_events, self.T).reshape(*shape, self.max_events)


class IntensityPoissonDistribution(_SequenceDistribution):
    """Poisson process with a callable intensity ``t -> lambda(t)`` (no parameters)."""

    arg_constraints: ClassVar[dict] = {}

    def __init__(self, intensity, T, max_events, bound, compensator, dtype, device,
                 validate_args=None):
        self.intensity, self.bound, self.compensator_fn = intensity, bound, compensator
        self.dtype, self.device = dtype, device
        super().__init__(T, max_events, torch.Size(), validate_args)

    def _params(self):
        return {}

    def _new_like(self, p):  # pragma: no cover - no batch parameters
        return self

    def expand(self, batch_shape, _instance=None):
        new = IntensityPoissonDistribution(self.intensity, self.T, self.max_events, self.bound,
                                           self.compensator_fn, self.dtype, self.device)
        TorchDistribution.__init__(new, torch.Size(batch_shape), self.event_shape, validate_args=False)
        return new

    def log_prob(self, y):
        if self._validate_args:
            self._validate_sample(y)
        yf, fin = _fill(y, self.T)
        lam = self.intensity(yf)
        lp = torch.where(fin, torch.log(lam), torch.zeros_like(lam)).sum(-1)
        total = _cumulative(self.intensity, self.compensator_fn, _end(yf, fin, self.T), self.T)
        return (lp - total).expand(torch.broadcast_shapes(lp.shape, self.batch_shape))

    def sample(self, sample_shape=()):
        shape = torch.Size(sample_shape) + self.batch_shape
        B = int(np.prod(shape)) if len(shape) else 1
        with torch.no_grad():
            bound = torch.as_tensor(self.bound, dtype=self.dtype, device=self.device)
            T = float(self.T)
            counts = torch.poisson(bound * T * torch.ones(B, dtype=self.dtype, device=self.device))
            m = max(int(counts.max()), 1)
            cand = torch.rand(B, m, dtype=self.dtype, device=self.device) * T
            pos = torch.arange(m, device=self.device)
            cand = torch.where(pos < counts[:, None], cand, torch.full_like(cand, math.inf))
            lam = self.intensity(torch.where(torch.isfinite(cand), cand, torch.zeros_like(cand)))
            if bool((torch.isfinite(cand) & (lam > bound * (1 + 1e-12))).any()):
                raise ValueError("InhomogeneousPoissonProcess: the intensity exceeds bound at a "
                                 "candidate time; give a larger bound")
            keep = torch.isfinite(cand) & (torch.rand_like(cand) * bound <= lam)
            t = torch.sort(torch.where(keep, cand, torch.full_like(cand, math.inf)), -1).values
            return self._first(t, self.max_events, T).reshape(*shape, self.max_events)


class HawkesDistribution(_SequenceDistribution):
    """Hawkes process with exponential kernel: ``lambda(t) = mu + alpha sum exp(-beta (t - t_i))``."""

    arg_constraints: ClassVar[dict] = {"mu": constraints.positive, "alpha": constraints.nonnegative,
                       "beta": constraints.positive}

    def __init__(self, mu, alpha, beta, T, max_events, validate_args=None):
        self.mu, self.alpha, self.beta = torch.broadcast_tensors(
            torch.as_tensor(mu), torch.as_tensor(alpha), torch.as_tensor(beta))
        super().__init__(T, max_events, self.mu.shape, validate_args)

    def _params(self):
        return {"mu": self.mu, "alpha": self.alpha, "beta": self.beta}

    def _new_like(self, p):
        return HawkesDistribution(p["mu"], p["alpha"], p["beta"], self.T, self.max_events)

    def _log_excitation(self, yf):
        """``log A_i = log sum_{j<i} exp(-beta (t_i - t_j))`` ``[*, M]`` (-inf for i = 0)."""
        b = self.beta[..., None]
        bt = b * yf
        lcse = torch.logcumsumexp(bt, -1)
        prev = torch.cat([torch.full_like(lcse[..., :1], -math.inf), lcse[..., :-1]], -1)
        return prev - bt

    def log_prob(self, y):
        if self._validate_args:
            self._validate_sample(y)
        yf, fin = _fill(y, self.T)
        log_a = self._log_excitation(yf)
        log_lam = torch.logaddexp(torch.log(self.mu)[..., None],
                                  torch.log(self.alpha)[..., None] + log_a)
        events = torch.where(fin, log_lam, torch.zeros_like(log_lam)).sum(-1)
        end = _end(yf, fin, self.T)
        decay = -torch.expm1(-self.beta[..., None] * (end[..., None] - yf))
        decay = torch.where(fin, decay, torch.zeros_like(decay))
        return events - self.mu * end - self.alpha / self.beta * decay.sum(-1)

    def compensator(self, y):
        """``Lambda(t_i) = mu t_i + alpha/beta (i - A_i)`` at each event (+inf at padding)."""
        yf, fin = _fill(y, self.T)
        a = torch.exp(self._log_excitation(yf))
        i = torch.arange(y.shape[-1], dtype=y.dtype, device=y.device)
        lam = self.mu[..., None] * yf + (self.alpha / self.beta)[..., None] * (i - a)
        return torch.where(fin, lam, torch.full_like(lam, math.inf))

    def sample(self, sample_shape=()):
        with torch.no_grad():
            shape, B, p = self._flat_params(sample_shape)
            mu, alpha, beta = p["mu"], p["alpha"], p["beta"]
            T = float(self.T)
            out = torch.full((B, self.max_events), math.inf, dtype=mu.dtype, device=mu.device)
            s = torch.zeros(B, dtype=mu.dtype, device=mu.device)  # current time
            exc = torch.zeros_like(s)  # sum exp(-beta (s - t_i)) over events so far
            count = torch.zeros(B, dtype=torch.long, device=mu.device)
            active = torch.ones(B, dtype=torch.bool, device=mu.device)
            rows = torch.arange(B, device=mu.device)
            while bool(active.any()):
                lam_bar = mu + alpha * exc  # the intensity only decays until the next event
                w = torch.empty_like(s).exponential_() / lam_bar
                s = torch.where(active, s + w, s)
                exc = torch.where(active, exc * torch.exp(-beta * w), exc)
                active = active & (s < T)
                accept = active & (torch.rand_like(s) * lam_bar <= mu + alpha * exc)
                out[rows[accept], count[accept]] = s[accept]
                exc = exc + accept.to(exc.dtype)
                count = count + accept.long()
                active = active & (count < self.max_events)  # the first max_events only
            return out.reshape(*shape, self.max_events)


# ---------------------------------------------------------------------------- quadrature
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(20)


def _cumulative(intensity, compensator, t, T, panels: int = 64):
    """``int_0^t lambda`` for each ``t [*]``: ``compensator(t)`` if given, else composite
    Gauss-Legendre (``panels`` panels of ``[0, T]``, 20 nodes each; the panel holding ``t``
    integrated on its part ``[start, t]``)."""
    if compensator is not None:
        return compensator(t)
    x, w = (torch.as_tensor(a, dtype=t.dtype, device=t.device) for a in (_GL_NODES, _GL_WEIGHTS))
    h = T / panels
    starts = torch.arange(panels, dtype=t.dtype, device=t.device) * h
    nodes = starts[:, None] + 0.5 * h * (x + 1)
    full = (intensity(nodes) * w).sum(-1) * 0.5 * h  # [panels]
    cum = torch.cat([torch.zeros(1, dtype=t.dtype, device=t.device), torch.cumsum(full, 0)])
    k = torch.clamp(torch.floor(t / h), 0, panels - 1).long()
    a = starts[k]
    part_nodes = a[..., None] + 0.5 * (t - a)[..., None] * (x + 1)
    part = (intensity(part_nodes) * w).sum(-1) * 0.5 * (t - a)
    return cum[k] + part


# ---------------------------------------------------------------------------- models
def _number(v):
    if isinstance(v, (int, float, list, tuple)) and not isinstance(v, (bool,)):
        return np.asarray(v, dtype=float)
    return v





def _default_max_events(mean, var):
    return math.ceil(mean + 10 * math.sqrt(max(var, 1e-12)) + 10)


class _PointProcess(ZooModel):
    """Shared validation and operations of the point processes (not registered)."""

    def _check_common(self):
        T = self.kwargs["T"]
        if T is None or not torch.is_tensor(T) or T.dim() != 0 or not float(T) > 0 \
                or not math.isfinite(float(T)):
            raise ValueError(f"{type(self).__name__}: T (the observation window [0, T), in time "
                             f"units) must be a positive finite number, got {T!r}")
        m = self.kwargs["max_events"]
        check_int(f"{type(self).__name__}: max_events (the padded length of y)", m)

    @staticmethod
    def _positive(name, v, cls):
        if v is None:
            return
        if not torch.is_tensor(v) or not torch.isfinite(v).all() or not bool((v > 0).all()):
            raise ValueError(f"{cls}: {name} must be positive and finite, got {v!r}")

    @property
    def event_shape(self) -> tuple:
        return (self.kwargs["max_events"],)

    def _as_data(self, y, what):
        t = torch.as_tensor(y, dtype=self.dtype or torch.get_default_dtype(), device=self.device) \
            if not torch.is_tensor(y) else y.to(device=self.device, dtype=self.dtype or
                                                 torch.get_default_dtype())
        ev = tuple(self.event_shape)
        if tuple(t.shape) == ev:
            single, t = True, t.unsqueeze(0)
        elif t.dim() == 2 and t.shape[1] == ev[0]:
            single = False
        else:
            raise ValueError(f"{what}: y must be one padded sequence [max_events] = {list(ev)} or "
                             f"[N, {ev[0]}]; got {list(t.shape)} (see pad_events)")
        _validate_sequences(t, self.kwargs["T"], what)
        return t, single

    def _distribution(self):
        raise NotImplementedError

    def _log_prob_rows(self, y):
        return self._distribution().log_prob(y)

    def compensator(self, y):
        """``Lambda(t_i) = int_0^{t_i} lambda(t | history) dt`` at each event of ``y``
        (``[max_events]`` or ``[N, max_events]``; ``+inf`` at the padding). Under the
        model, the increments of ``Lambda`` are i.i.d. Exp(1) (time rescaling)."""
        self._require_parameters("compensator")
        t, single = self._as_data(y, "compensator")
        with self.context():
            out = self._compensator(t)
        return out[0] if single else out

    def simulate(self, num: int = 1, seed: int | None = None) -> torch.Tensor:
        """``num`` independent sequences ``[num, max_events]`` (``sample(num)["y"]``)."""
        return self.sample(num, seed=seed)["y"]

    def _history(self, history):
        h = torch.as_tensor(history, dtype=self.dtype or torch.get_default_dtype()) \
            if not torch.is_tensor(history) else history.to(self.dtype or torch.get_default_dtype())
        h = h.reshape(-1).to(self.device)
        return h[torch.isfinite(h)]


class PoissonProcess(_PointProcess):
    """Homogeneous Poisson process on ``[0, T)``.

    Parameters
    ----------
    rate : float, optional
        Events per unit time (``None``: prior ``LogNormal(0, 2)``).
    T : float
        Length of the observation window, in time units.
    max_events : int, optional
        Padded length of ``y`` (default: far in the upper tail of Poisson(rate T)).

    Examples
    --------
    >>> from genprog.models.point_process import PoissonProcess
    >>> pp = PoissonProcess(rate=2.0, T=5.0)
    >>> y = pp.simulate(3, seed=0)
    >>> y.shape == (3, pp.event_shape[0])
    True
    """

    mle_kind = "closed form"

    def __init__(self, *, rate=None, T=None, max_events=None):
        if max_events is None:
            if rate is None or T is None:
                raise ValueError("PoissonProcess: give max_events when rate is left to a prior")
            mean = float(np.asarray(rate, dtype=float)) * float(np.asarray(T, dtype=float))
            max_events = _default_max_events(mean, mean)
        super().__init__(rate=_number(rate), T=_number(T), max_events=max_events)
        self._check_common()
        self._positive("rate", self.kwargs["rate"], "PoissonProcess")
        if self.kwargs["rate"] is not None and self.kwargs["rate"].dim() != 0:
            raise ValueError("PoissonProcess: rate must be a scalar")

    @staticmethod
    def story(n=None, rate=None, T=None, max_events=None):
        if rate is None:
            rate = pyro.sample("rate", dist.LogNormal(0.0, 2.0))
        d = PoissonProcessDistribution(rate, T, max_events)
        return sample_rows(n, d)

    def _distribution(self):
        return PoissonProcessDistribution(self.kwargs["rate"], self.kwargs["T"],
                                          self.kwargs["max_events"])

    def intensity(self, history, t):
        """``lambda(t) = rate`` at times ``t [m]`` (the history does not matter)."""
        t = torch.as_tensor(t, dtype=self.kwargs["rate"].dtype, device=self.device)
        return self.kwargs["rate"].expand(t.shape)

    def _compensator(self, y):
        return self.kwargs["rate"] * y

    @classmethod
    def mle(cls, y, T, max_events=None):
        """``rate = (total events) / (total observed time)`` from padded sequences ``y [N, M]``
        (or ``[M]``): ``N T``, less the unobserved ends of full (censored) rows."""
        yt = torch.as_tensor(y, dtype=torch.float64) if not torch.is_tensor(y) else y.double()
        yt = yt.reshape(-1, yt.shape[-1])
        _validate_sequences(yt, torch.as_tensor(float(T), dtype=yt.dtype), "mle")
        yf, fin = _fill(yt, float(T))
        n = fin.sum()
        if int(n) == 0:
            raise ValueError("mle: no events in y; the rate MLE would be 0")
        rate = n.double() / _end(yf, fin, float(T)).sum()
        return cls(rate=rate, T=float(T), max_events=max_events or yt.shape[1]).to(dtype=torch.float64)


class InhomogeneousPoissonProcess(_PointProcess):
    """Poisson process with a time-varying intensity on ``[0, T)``: piecewise constant
    (``rates`` on the pieces between ``edges``) or a callable ``intensity``.

    Parameters
    ----------
    rates : array [K], optional
        Events per unit time on each piece (``None`` with ``edges`` given: prior
        ``LogNormal(0, 2)`` each).
    edges : array [K + 1], optional
        Piece boundaries, increasing from 0 to ``T``.
    intensity : callable, optional
        ``t [*] -> lambda(t) [*]`` (torch, vectorised, positive), instead of rates/edges.
    T : float
        Window length (with ``edges``: ``edges[-1]``, may be omitted).
    bound : float, optional
        ``>= max_t lambda(t)`` for thinning a callable intensity (default: 1.5 times the
        largest value on a 2048-point grid; sampling checks it at every candidate).
    compensator : callable, optional
        ``t -> int_0^t lambda`` in closed form (else Gauss-Legendre quadrature).
    max_events : int, optional
    """

    mle_kind = "closed form (piecewise constant)"

    def __init__(self, *, rates=None, edges=None, intensity=None, T=None, bound=None,
                 compensator=None, max_events=None):
        if intensity is not None:
            if rates is not None or edges is not None:
                raise ValueError("InhomogeneousPoissonProcess: give either intensity (a callable) "
                                 "or rates and edges, not both")
            if not callable(intensity):
                raise TypeError("InhomogeneousPoissonProcess: intensity must be a callable t -> "
                                "lambda(t); for a piecewise-constant intensity give rates= and edges=")
        elif edges is None:
            raise ValueError("InhomogeneousPoissonProcess: give intensity= (a callable) or edges= "
                             "(with rates=)")
        else:
            e = np.asarray(edges.detach().cpu() if torch.is_tensor(edges) else edges, dtype=float)
            if rates is not None and torch.is_tensor(rates):
                rates = rates.detach()
            if e.ndim != 1 or len(e) < 2 or e[0] != 0 or not np.all(np.diff(e) > 0):
                raise ValueError("InhomogeneousPoissonProcess: edges must increase from 0 to T")
            if T is not None and float(np.asarray(T, dtype=float)) != e[-1]:
                raise ValueError(f"InhomogeneousPoissonProcess: T={T} differs from edges[-1]={e[-1]}")
            T = float(e[-1])
            if rates is not None and np.shape(rates) != (len(e) - 1,):
                raise ValueError(f"InhomogeneousPoissonProcess: rates must be [K] = [{len(e) - 1}] "
                                 f"(one per piece), got shape {list(np.shape(rates))}")
            edges = _number(edges) if not torch.is_tensor(edges) else edges
        cls = "InhomogeneousPoissonProcess"
        if T is None:
            raise ValueError(f"{cls}: T (the window length) is required")
        if intensity is not None:
            grid = torch.linspace(0, float(np.asarray(T, dtype=float)), 2048, dtype=torch.float64)
            lam = intensity(grid)
            if not torch.is_tensor(lam) or lam.shape != grid.shape or not torch.isfinite(lam).all() \
                    or bool((lam < 0).any()):
                raise ValueError(f"{cls}: intensity must map a tensor of times [m] to finite, "
                                 "non-negative intensities [m] on [0, T]")
            if bound is None:
                bound = 1.5 * float(lam.max())
        if max_events is None:
            if intensity is not None:
                Tt = torch.tensor(float(np.asarray(T, dtype=float)), dtype=torch.float64)
                mean = float(_cumulative(intensity, compensator, Tt[None], Tt)[0])
            elif rates is None:
                raise ValueError(f"{cls}: give max_events when rates are left to a prior")
            else:
                r = rates.cpu().numpy() if torch.is_tensor(rates) else np.asarray(rates, dtype=float)
                mean = float((r * np.diff(e)).sum())
            max_events = _default_max_events(mean, mean)
        super().__init__(rates=_number(rates), edges=edges, intensity=intensity, T=_number(T),
                         bound=_number(bound), compensator=compensator, max_events=max_events)
        self._check_common()
        self._positive("rates", self.kwargs["rates"], cls)
        self._positive("bound", self.kwargs["bound"], cls)

    def missing_parameters(self) -> list[str]:
        """``["rates"]`` when the piecewise rates are left to a prior (the callable form and
        the optional ``bound`` / ``compensator`` are never missing)."""
        p = self.kwargs
        return ["rates"] if p["intensity"] is None and p["rates"] is None else []

    @staticmethod
    def story(n=None, rates=None, edges=None, intensity=None, T=None, bound=None,
              compensator=None, max_events=None):
        if intensity is not None:
            d = IntensityPoissonDistribution(intensity, T, max_events, bound, compensator,
                                             T.dtype, T.device)
        else:
            if rates is None:
                rates = pyro.sample("rates", dist.LogNormal(0.0, 2.0).expand([edges.shape[0] - 1])
                                    .to_event(1))
            d = PiecewisePoissonDistribution(rates, edges, max_events)
        return sample_rows(n, d)

    def _distribution(self):
        p = self.kwargs
        if p["intensity"] is not None:
            return IntensityPoissonDistribution(p["intensity"], p["T"], p["max_events"], p["bound"],
                                                p["compensator"], p["T"].dtype, p["T"].device)
        return PiecewisePoissonDistribution(p["rates"], p["edges"], p["max_events"])

    def intensity(self, history, t):
        """``lambda(t)`` at times ``t [m]`` (the history does not matter)."""
        p = self.kwargs
        t = torch.as_tensor(t, dtype=p["T"].dtype, device=self.device)
        if p["intensity"] is not None:
            return p["intensity"](t)
        self._require_parameters("intensity")
        k = p["rates"].shape[0]
        idx = (torch.searchsorted(p["edges"].contiguous(), t.contiguous(), right=True) - 1).clamp(0, k - 1)
        return p["rates"][idx]

    def _compensator(self, y):
        p = self.kwargs
        yf, fin = _fill(y, p["T"])
        if p["intensity"] is not None:
            lam = _cumulative(p["intensity"], p["compensator"], yf, p["T"])
        else:
            widths = p["edges"][1:] - p["edges"][:-1]
            cum = torch.cat([torch.zeros_like(widths[:1]), torch.cumsum(p["rates"] * widths, 0)])
            k = widths.shape[0]
            idx = (torch.searchsorted(p["edges"].contiguous(), yf.contiguous(), right=True) - 1).clamp(0, k - 1)
            lam = cum[idx] + p["rates"][idx] * (yf - p["edges"][idx])
        return torch.where(fin, lam, torch.full_like(lam, math.inf))

    @classmethod
    def mle(cls, y, edges, max_events=None):
        """Piecewise-constant rates: events in each piece over the time observed in it
        (``N`` times its width, less the unobserved ends of full rows)."""
        yt = torch.as_tensor(y, dtype=torch.float64) if not torch.is_tensor(y) else y.double()
        yt = yt.reshape(-1, yt.shape[-1])
        e = torch.as_tensor(np.asarray(edges.detach().cpu() if torch.is_tensor(edges) else edges,
                                       dtype=float), dtype=torch.float64, device=yt.device)
        _validate_sequences(yt, e[-1], "mle")
        fin = torch.isfinite(yt)
        k = e.shape[0] - 1
        idx = (torch.searchsorted(e, torch.where(fin, yt, e[-1]).contiguous(), right=True) - 1).clamp(0, k - 1)
        counts = torch.zeros(k, dtype=torch.float64, device=yt.device).index_add_(
            0, idx[fin], torch.ones_like(yt[fin]))
        if bool((counts == 0).any()):
            raise ValueError("mle: a piece has no events; its rate MLE would be 0 (merge pieces)")
        end = _end(torch.where(fin, yt, e[-1]), fin, e[-1])
        exposure = (end[:, None] - e[:-1]).clamp(min=0).minimum(e[1:] - e[:-1]).sum(0)
        rates = counts / exposure
        return cls(rates=rates, edges=e, max_events=max_events or yt.shape[1]).to(dtype=torch.float64)


class HawkesProcess(_PointProcess):
    """Self-exciting Hawkes process on ``[0, T)`` with exponential kernel:
    ``lambda(t) = mu + alpha sum_{t_i < t} exp(-beta (t - t_i))``.

    Parameters
    ----------
    mu : float, optional
        Baseline intensity, events per unit time (``None``: prior ``LogNormal(0, 1)``).
    alpha : float, optional
        Jump of the intensity at each event, events per unit time (prior ``LogNormal(0, 1)``).
    beta : float, optional
        Decay rate per unit time (prior ``LogNormal(0, 1)``); ``alpha / beta`` is the
        branching ratio.
    T : float
    max_events : int, optional
        Default from the stationary count mean and variance when ``alpha / beta < 1``.

    Examples
    --------
    >>> from genprog.models.point_process import HawkesProcess
    >>> hp = HawkesProcess(mu=1.0, alpha=0.5, beta=2.0, T=10.0)
    >>> float(hp.intensity([1.0], [1.0, 2.0])[1]) > 1.0
    True
    """

    mle_kind = "numerical (L-BFGS on log parameters)"

    def __init__(self, *, mu=None, alpha=None, beta=None, T=None, max_events=None):
        if max_events is None:
            if mu is None or alpha is None or beta is None or T is None:
                raise ValueError("HawkesProcess: give max_events when a parameter is left to a prior")
            br = float(np.asarray(alpha, dtype=float)) / float(np.asarray(beta, dtype=float))
            if br >= 1:
                raise ValueError(f"HawkesProcess: alpha / beta = {br:.3g} >= 1 (explosive); give "
                                 "max_events explicitly to simulate it on a finite window")
            mean = float(np.asarray(mu, dtype=float)) * float(np.asarray(T, dtype=float)) / (1 - br)
            max_events = _default_max_events(mean, mean / (1 - br) ** 2)
        super().__init__(mu=_number(mu), alpha=_number(alpha), beta=_number(beta), T=_number(T),
                         max_events=max_events)
        self._check_common()
        for name in ("mu", "beta"):
            self._positive(name, self.kwargs[name], "HawkesProcess")
        a = self.kwargs["alpha"]
        if a is not None and (not torch.isfinite(a).all() or bool((a < 0).any())):
            raise ValueError(f"HawkesProcess: alpha must be non-negative and finite, got {a!r}")

    @staticmethod
    def story(n=None, mu=None, alpha=None, beta=None, T=None, max_events=None):
        mu = mu if mu is not None else pyro.sample("mu", dist.LogNormal(0.0, 1.0))
        alpha = alpha if alpha is not None else pyro.sample("alpha", dist.LogNormal(0.0, 1.0))
        beta = beta if beta is not None else pyro.sample("beta", dist.LogNormal(0.0, 1.0))
        d = HawkesDistribution(mu, alpha, beta, T, max_events)
        return sample_rows(n, d)

    def _distribution(self):
        p = self.kwargs
        return HawkesDistribution(p["mu"], p["alpha"], p["beta"], p["T"], p["max_events"])

    def intensity(self, history, t):
        """The conditional intensity ``lambda(t | history)`` at times ``t [m]`` given the
        events ``history`` (1-d, ``+inf`` padding allowed): ``[m]``, events per unit time."""
        self._require_parameters("intensity")
        p = self.kwargs
        h = self._history(history)
        t = torch.as_tensor(np.asarray(t, dtype=float) if not torch.is_tensor(t) else t,
                            dtype=p["mu"].dtype, device=self.device).reshape(-1)
        lag = t[:, None] - h[None, :]
        before = lag > 0
        k = torch.where(before, torch.exp(-p["beta"] * torch.where(before, lag, torch.zeros_like(lag))),
                        torch.zeros_like(lag))
        return p["mu"] + p["alpha"] * k.sum(-1)

    def _compensator(self, y):
        return self._distribution().compensator(y)

    @classmethod
    @renamed_keywords(max_iter="max_iters")
    def mle(cls, y, T, *, init: dict | None = None, max_events=None, max_iters: int = 200):
        """Maximum likelihood ``mu, alpha, beta`` from padded sequences ``y [N, M]`` on
        ``[0, T)``: the exact log likelihood maximised by L-BFGS over the log parameters
        (start: ``mu`` half the event rate, ``beta`` the event rate, ``alpha = beta / 2``;
        override with ``init``), at most ``max_iters`` L-BFGS iterations (``max_iter`` is
        its deprecated name)."""
        yt = torch.as_tensor(y, dtype=torch.float64) if not torch.is_tensor(y) else y.double()
        yt = yt.reshape(-1, yt.shape[-1])
        Tt = torch.tensor(float(T), dtype=torch.float64, device=yt.device)
        _validate_sequences(yt, Tt, "mle")
        n = int(torch.isfinite(yt).sum())
        if n < 3:
            raise ValueError(f"mle: {n} events are too few to fit a Hawkes process")
        rate = n / (yt.shape[0] * float(T))
        start = {"mu": rate / 2, "beta": rate, "alpha": rate / 2, **(init or {})}
        unknown = set(start) - {"mu", "alpha", "beta"}
        if unknown:
            raise TypeError(f"mle: unknown init name(s) {sorted(unknown)}; names: mu, alpha, beta")
        raw = torch.tensor([math.log(start[k]) for k in ("mu", "alpha", "beta")],
                           dtype=torch.float64, device=yt.device, requires_grad=True)
        opt = torch.optim.LBFGS([raw], max_iter=max_iters, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-10, tolerance_change=1e-14)

        def closure():
            opt.zero_grad()
            mu, alpha, beta = raw.clamp(-30, 30).exp()
            loss = -HawkesDistribution(mu, alpha, beta, Tt, yt.shape[1]).log_prob(yt).sum()
            loss.backward()
            return loss

        opt.step(closure)
        mu, alpha, beta = raw.detach().clamp(-30, 30).exp()
        return cls(mu=mu, alpha=alpha, beta=beta, T=float(T),
                   max_events=max_events or yt.shape[1]).to(dtype=torch.float64)

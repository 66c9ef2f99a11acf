"""Autoregressive sequence models: Gaussian :class:`AR` (p) and :class:`DiscreteAR`, a
``k``-th order Markov chain over a finite alphabet.

A draw of ``y`` is **one sequence** ``[T]``; a data set is ``[N, T]``, ``N`` independent
sequences of the same length (``n`` in the story counts sequences).

:class:`AR`: ``y_t = c + sum_i phi_i y_{t-i} + e_t``, ``e_t ~ N(0, sigma^2)``, stationary.
Its ``log_prob`` is the **exact (full) likelihood**: ``y_1..y_p`` from the stationary
distribution, then the conditionals; :meth:`AR.conditional_log_prob` gives the likelihood
conditional on the first ``p`` values (what least squares maximises and what statsmodels'
``AutoReg`` reports).

:class:`DiscreteAR`: ``p(y_1..y_k) = initial[y_1, ..., y_k]`` and
``p(y_t | y_{t-k}..y_{t-1}) = probs[y_{t-k}, ..., y_{t-1}, y_t]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution

from genprog.inputs import as_tensor
from genprog.validation import check_int

from .base import ZooModel, sample_rows
from .gaussian import keep_float64, set_param
from .hmm import check_probs


# ---------------------------------------------------------------------- Gaussian AR(p)
def companion(coefs: torch.Tensor) -> torch.Tensor:
    """Companion matrix ``[..., p, p]`` of AR coefficients ``[..., p]``."""
    p = coefs.shape[-1]
    F = torch.zeros(*coefs.shape, p, dtype=coefs.dtype, device=coefs.device)
    F[..., 0, :] = coefs
    if p > 1:
        F[..., 1:, :-1] = torch.eye(p - 1, dtype=coefs.dtype, device=coefs.device)
    return F


def autocovariance(coefs: torch.Tensor, sigma: torch.Tensor, lags: int) -> torch.Tensor:
    """Stationary autocovariances ``gamma_0..gamma_{lags-1}`` ``[..., lags]`` of an AR(p),
    from the discrete Lyapunov equation of the companion form (``vec S = (I - F (x) F)^-1
    vec(sigma^2 e1 e1^T)``), extended by ``gamma_k = sum_i phi_i gamma_{k-i}``."""
    p = coefs.shape[-1]
    F = companion(coefs)
    FF = (F[..., :, None, :, None] * F[..., None, :, None, :]).reshape(*F.shape[:-2], p * p, p * p)
    rhs = torch.zeros(*F.shape[:-2], p * p, dtype=coefs.dtype, device=coefs.device)
    rhs = rhs + 0.0 * sigma.unsqueeze(-1)
    rhs[..., 0] = sigma ** 2
    eye = torch.eye(p * p, dtype=coefs.dtype, device=coefs.device)
    S = torch.linalg.solve(eye - FF, rhs.unsqueeze(-1)).squeeze(-1).reshape(*rhs.shape[:-1], p, p)
    gam = list(S[..., 0, :].unbind(-1))
    for k in range(p, lags):
        gam.append(sum(coefs[..., i] * gam[k - 1 - i] for i in range(p)))
    return torch.stack(gam[:lags], -1) if lags > 0 else S[..., 0, :0]


def _toeplitz(gam: torch.Tensor) -> torch.Tensor:
    L = gam.shape[-1]
    idx = torch.arange(L, device=gam.device)
    return gam[..., (idx[:, None] - idx[None, :]).abs()]


def is_stationary(coefs: torch.Tensor) -> bool:
    """Whether every root of the companion matrix lies inside the unit circle."""
    return bool((torch.linalg.eigvals(companion(coefs)).abs() < 1).all())


def pacf_to_coefs(pacf: torch.Tensor) -> torch.Tensor:
    """AR coefficients ``[..., p]`` from partial autocorrelations in ``(-1, 1)``
    (Durbin-Levinson; Monahan 1984): every such vector gives a stationary AR(p)."""
    phi = pacf[..., :1]
    for k in range(1, pacf.shape[-1]):
        r = pacf[..., k:k + 1]
        phi = torch.cat([phi - r * phi.flip(-1), r], -1)
    return phi


class ARProcess(TorchDistribution):
    """Stationary Gaussian AR(p) sequence of length ``T`` as a distribution over ``[T]``.

    Parameters: ``coefs [..., p]``, ``sigma [...]``, ``intercept [...]``, ``length`` T.
    """

    arg_constraints: ClassVar[dict] = {"sigma": constraints.positive}
    support = constraints.independent(constraints.real, 1)
    has_rsample = False

    def __init__(self, coefs, sigma, intercept, length, validate_args=None):
        self.coefs = coefs
        batch = torch.broadcast_shapes(coefs.shape[:-1], sigma.shape, intercept.shape)
        self.sigma = sigma.expand(batch)
        self.intercept = intercept.expand(batch)
        self.coefs = coefs.expand(*batch, coefs.shape[-1])
        self.length = int(length)
        super().__init__(batch, torch.Size([self.length]), validate_args=validate_args)

    @property
    def order(self) -> int:
        return self.coefs.shape[-1]

    @property
    def mu(self) -> torch.Tensor:
        """Stationary mean ``c / (1 - sum phi)``."""
        return self.intercept / (1 - self.coefs.sum(-1))

    def log_prob(self, value):
        p, T = self.order, value.shape[-1]
        m = min(p, T)
        gam = autocovariance(self.coefs, self.sigma, m)
        head = dist.MultivariateNormal(self.mu.unsqueeze(-1).expand(*self.mu.shape, m),
                                       covariance_matrix=_toeplitz(gam)).log_prob(value[..., :m])
        if T <= p:
            return head
        lags = value.unfold(-1, p, 1)[..., :-1, :].flip(-1)  # [..., T-p, p]: y_{t-1}..y_{t-p}
        pred = self.intercept.unsqueeze(-1) + (lags * self.coefs.unsqueeze(-2)).sum(-1)
        return head + dist.Normal(pred, self.sigma.unsqueeze(-1)).log_prob(value[..., p:]).sum(-1)

    @torch.no_grad()
    def sample(self, sample_shape=()):
        shape = torch.Size(sample_shape) + self.batch_shape
        p, T = self.order, self.length
        m = min(p, T)
        gam = autocovariance(self.coefs, self.sigma, m)
        head = dist.MultivariateNormal(self.mu.unsqueeze(-1).expand(*self.mu.shape, m),
                                       covariance_matrix=_toeplitz(gam)).sample(sample_shape)
        ys = list(head.unbind(-1))
        eps = torch.randn(*shape, max(T - p, 0), dtype=self.coefs.dtype, device=self.coefs.device)
        for t in range(p, T):
            pred = self.intercept + sum(self.coefs[..., i] * ys[t - 1 - i] for i in range(p))
            ys.append(pred + self.sigma * eps[..., t - p])
        return torch.stack(ys, -1)


@dataclass(frozen=True)
class ARForecast:
    """Predictive distribution of the next ``steps`` values given a prefix.

    Attributes
    ----------
    mean : Tensor ``[N, steps]`` (``[steps]`` for a single prefix)
    cov : Tensor ``[steps, steps]``: the joint predictive covariance (it does not depend on
        the prefix values)
    """

    mean: torch.Tensor
    cov: torch.Tensor

    @property
    def var(self) -> torch.Tensor:
        """Predictive variances ``[steps]``."""
        return torch.diagonal(self.cov)

    def interval(self, z: float = 1.96):
        sd = self.var.sqrt()
        return self.mean - z * sd, self.mean + z * sd


class AR(ZooModel):
    """Stationary Gaussian autoregression AR(p) of sequences ``y`` ``[T]``.

    Parameters
    ----------
    coefs : Tensor ``[p]``, optional
        ``phi_1..phi_p``; must be stationary (prior: uniform partial autocorrelations in
        ``(-1, 1)``, site ``pacf``, mapped to coefficients).
    sigma : float, optional
        Innovation standard deviation (prior ``LogNormal(0, 1)``).
    intercept : float, optional
        ``c`` (default 0.0; None gives it a ``Normal(0, 5)`` prior). The stationary mean is
        ``c / (1 - sum phi)``.
    order : int, optional
        ``p`` (read from ``coefs``).
    length : int, optional
        ``T`` of a draw; needed to sample or condition (``log_prob`` takes any length).

    Examples
    --------
    >>> import torch
    >>> ar = AR(coefs=torch.tensor([0.5]), sigma=1.0, length=3)
    >>> f = ar.forecast(torch.tensor([2.0]), steps=2)
    >>> f.mean.tolist(), f.var.tolist()
    ([1.0, 0.5], [1.0, 1.25])
    """

    mle_kind = "closed form"

    def __init__(self, *, coefs=None, sigma=None, intercept=0.0, order=None, length=None):
        order = None if order is None else check_int("AR: order", order)
        length = None if length is None else check_int("AR: length", length)
        super().__init__(coefs=coefs, sigma=sigma, intercept=intercept, order=order, length=length)
        keep_float64(self)
        p = self.kwargs
        for name in ("sigma", "intercept"):
            v = p[name]
            if v is not None:
                v = torch.as_tensor(v, dtype=self.dtype or torch.get_default_dtype(),
                                    device=self.device)
                if v.dim() != 0 or not bool(torch.isfinite(v)):
                    raise ValueError(f"AR: {name} must be a finite scalar, got {p[name]!r}")
                set_param(self, name, v)
        if p["sigma"] is not None and float(p["sigma"]) <= 0:
            raise ValueError(f"AR: sigma must be > 0, got {float(p['sigma'])}")
        coefs = p["coefs"]
        if coefs is not None:
            if not torch.is_tensor(coefs) or coefs.dim() != 1 or coefs.shape[0] < 1:
                raise ValueError(f"AR: coefs must be a vector [p] with p >= 1, got {coefs!r}")
            if order is not None and coefs.shape[0] != order:
                raise ValueError(f"AR: coefs has {coefs.shape[0]} entries but order={order}")
            if not bool(torch.isfinite(coefs).all()) or not is_stationary(coefs):
                raise ValueError("AR: coefs are not stationary (a root of the companion matrix "
                                 "lies on or outside the unit circle)")
            order = int(coefs.shape[0])
        if order is None:
            raise ValueError("AR: give coefs or order")
        set_param(self, "order", order)

    def missing_parameters(self) -> list[str]:
        return [n for n in ("coefs", "sigma", "intercept") if self.kwargs[n] is None]

    @property
    def event_shape(self) -> tuple:
        if self.kwargs["length"] is None:
            raise ValueError("AR: built without length=T; give it to sample or condition")
        return (self.kwargs["length"],)

    @staticmethod
    def story(n=None, coefs=None, sigma=None, intercept=0.0, order=None, length=None):
        """``y`` ``[T]`` from the stationary AR(p) (``[n, T]`` inside ``pyro.plate("data", n)``)."""
        if length is None:
            raise ValueError("AR: sampling needs the sequence length (length=T)")
        if coefs is None:
            pacf = pyro.sample("pacf", dist.Uniform(-1.0, 1.0).expand([int(order)]).to_event(1))
            coefs = pyro.deterministic("coefs", pacf_to_coefs(pacf))
        if sigma is None:
            sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        if intercept is None:
            intercept = pyro.sample("intercept", dist.Normal(0.0, 5.0))
        sigma, intercept = torch.as_tensor(sigma), torch.as_tensor(intercept)
        seq = ARProcess(coefs, sigma, intercept, length)
        sample_rows(n, seq)

    def _process(self, T):
        p = self.kwargs
        return ARProcess(p["coefs"], p["sigma"], p["intercept"], T)

    def _as_data(self, y, what: str):
        return _sequences(self, y, what)

    def _log_prob_rows(self, y):
        return self._process(y.shape[-1]).log_prob(y)

    def conditional_log_prob(self, y, pointwise: bool = False) -> torch.Tensor:
        """``log p(y_{p+1}..y_T | y_1..y_p)``: the likelihood conditional on the first ``p``
        values (statsmodels ``AutoReg``'s ``llf``).

        Parameters
        ----------
        y : array ``[T]`` or ``[N, T]`` with ``T > p``

        Returns
        -------
        Tensor ``[]`` (total) or ``[N]`` (``pointwise=True``).
        """
        self._require_parameters("conditional_log_prob")
        y, single = self._as_data(y, "conditional_log_prob")
        p = self.kwargs["order"]
        if y.shape[-1] <= p:
            raise ValueError(f"conditional_log_prob: sequences need more than p={p} values")
        with self.context():
            proc = self._process(y.shape[-1])
            lags = y.unfold(-1, p, 1)[..., :-1, :].flip(-1)
            pred = proc.intercept + (lags * proc.coefs).sum(-1)
            rows = dist.Normal(pred, proc.sigma).log_prob(y[..., p:]).sum(-1)
        return rows[0] if single else rows if pointwise else rows.sum()

    def forecast(self, prefix, steps: int) -> ARForecast:
        """Predictive distribution of the next ``steps`` values given ``prefix`` (exact
        Gaussian conditioning; only the last ``p`` values matter, and a prefix shorter than
        ``p`` — even empty — is conditioned on under the stationary distribution).

        Parameters
        ----------
        prefix : array ``[L]`` or ``[N, L]``
        steps : int >= 1

        Returns
        -------
        ARForecast
            ``mean [N, steps]`` (``[steps]``), joint ``cov [steps, steps]``.
        """
        self._require_parameters("forecast")
        steps = check_int("forecast: steps", steps)
        t = as_tensor(prefix, self.device, self.dtype, name="forecast: prefix")
        t = torch.as_tensor(t, dtype=self.dtype or torch.get_default_dtype(), device=self.device)
        if t.dim() not in (1, 2):
            raise ValueError(f"forecast: prefix must be [L] or [N, L], got {list(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError("forecast: prefix has NaN or infinite values")
        single = t.dim() == 1
        t = t.unsqueeze(0) if single else t
        p = self.kwargs["order"]
        with self.context():
            proc = self._process(1)
            m = min(p, t.shape[-1])
            G = _toeplitz(autocovariance(proc.coefs, proc.sigma, m + steps))
            mu = proc.mu
            if m == 0:
                mean = mu.expand(t.shape[0], steps)
                cov = G
            else:
                Goo, Gfo, Gff = G[:m, :m], G[m:, :m], G[m:, m:]
                gain = torch.linalg.solve(Goo, Gfo.T).T  # [steps, m]
                mean = mu + (t[:, -m:] - mu) @ gain.T
                cov = Gff - gain @ Gfo.T
            cov = 0.5 * (cov + cov.T)
        return ARForecast(mean[0] if single else mean, cov)

    @classmethod
    def mle(cls, data, order: int, *, intercept: bool = True) -> AR:
        """Conditional maximum likelihood (= conditional least squares), closed form:
        regress ``y_t`` on ``1, y_{t-1}, ..., y_{t-p}`` for ``t > p`` in every sequence;
        ``sigma^2`` = residual sum of squares / number of regressions (statsmodels
        ``AutoReg(y, lags=p, trend="c")``'s ``params`` and ``sigma2``).

        Parameters
        ----------
        data : array ``[N, T]`` or ``[T]`` (no NaN), ``T > p``
        order : int
        intercept : bool
            Fit ``c`` (else ``c = 0``).

        Raises
        ------
        ValueError
            If the estimated coefficients are not stationary (the exact likelihood needs a
            stationary process).
        """
        p = check_int("AR.mle: order", order)
        y = _data(cls, data, "mle")
        if y.shape[-1] <= p + 1:
            raise ValueError(f"AR.mle: sequences need more than order + 1 = {p + 1} values")
        lags = y.unfold(-1, p, 1)[..., :-1, :].flip(-1).reshape(-1, p)
        target = y[..., p:].reshape(-1)
        X = torch.cat([torch.ones_like(target).unsqueeze(-1), lags], -1) if intercept else lags
        beta = torch.linalg.lstsq(X, target.unsqueeze(-1)).solution.squeeze(-1)
        resid = target - X @ beta
        sigma = torch.sqrt((resid ** 2).mean())
        c, coefs = (beta[0], beta[1:]) if intercept else (torch.zeros((), dtype=y.dtype), beta)
        if not is_stationary(coefs):
            raise ValueError(f"AR.mle: the least-squares coefficients {coefs.tolist()} are not "
                             "stationary")
        return cls(coefs=coefs, sigma=sigma, intercept=c, length=int(y.shape[-1])).to(
            device=y.device, dtype=y.dtype)


# ---------------------------------------------------------------------- discrete AR(k)
class MarkovChainSequence(TorchDistribution):
    """A ``k``-th order Markov chain of length ``T`` over ``{0..M-1}``: a distribution
    over ``[T]``. ``initial [..., M, ..., M]`` (k axes), ``probs [..., M, ..., M, M]``
    (k + 1 axes)."""

    support = constraints.independent(constraints.nonnegative_integer, 1)
    arg_constraints: ClassVar[dict] = {}

    def __init__(self, initial, probs, order, length, validate_args=None):
        k = int(order)
        self.order, self.length = k, int(length)
        M = probs.shape[-1]
        batch = torch.broadcast_shapes(initial.shape[:initial.dim() - k],
                                       probs.shape[:probs.dim() - k - 1])
        self.initial = initial.expand(*batch, *([M] * k))
        self.probs = probs.expand(*batch, *([M] * (k + 1)))
        self.num_symbols = M
        super().__init__(batch, torch.Size([self.length]), validate_args=validate_args)

    def log_prob(self, value):
        return markov_log_prob(self.initial, self.probs, self.order, value)

    @torch.no_grad()
    def sample(self, sample_shape=()):
        k, M, T = self.order, self.num_symbols, self.length
        shape = torch.Size(sample_shape) + self.batch_shape
        init = self.initial.reshape(*self.batch_shape, M ** k).expand(*shape, M ** k)
        first = dist.Categorical(probs=init).sample()  # flat index of y_1..y_k
        ys = [(first // M ** (k - 1 - j)) % M for j in range(k)]
        P = self.probs.reshape(*self.batch_shape, M ** k, M).expand(*shape, M ** k, M)
        for t in range(k, T):
            ctx = sum(ys[t - k + j] * M ** (k - 1 - j) for j in range(k))
            row = P.gather(-2, ctx[..., None, None].expand(*shape, 1, M)).squeeze(-2)
            ys.append(dist.Categorical(probs=row).sample())
        return torch.stack(ys[:T], -1)


def markov_log_prob(initial, probs, k, value):
    """``log p(value)`` ``[...]`` of sequences ``value [..., T]`` under a ``k``-th order
    chain (``initial [*B, M^k axes]``, ``probs [*B, M^(k+1) axes]``)."""
    M = probs.shape[-1]
    T = value.shape[-1]
    v = value.long()
    batch = probs.shape[:probs.dim() - k - 1]
    m = min(k, T)
    init = initial.sum(tuple(range(initial.dim() - (k - m), initial.dim()))) if m < k else initial
    init = init.reshape(*batch, M ** m)
    weights = M ** torch.arange(m - 1, -1, -1, device=v.device)
    idx = (v[..., :m] * weights).sum(-1)
    shape = torch.broadcast_shapes(idx.shape, batch)
    out = torch.log(init.expand(*shape, M ** m).gather(-1, idx.expand(shape).unsqueeze(-1))
                    ).squeeze(-1)
    if T <= k:
        return out
    win = v.unfold(-1, k + 1, 1)  # [..., T-k, k+1]
    w = M ** torch.arange(k, -1, -1, device=v.device)
    flat = (win * w).sum(-1)  # [..., T-k]
    P = torch.log(probs.reshape(*batch, M ** (k + 1)))
    shape = torch.broadcast_shapes(flat.shape[:-1], batch)
    lp = P.unsqueeze(-2).expand(*shape, T - k, M ** (k + 1)).gather(
        -1, flat.expand(*shape, T - k).unsqueeze(-1)).squeeze(-1)
    return out + lp.sum(-1)


class DiscreteAR(ZooModel):
    """A ``k``-th order Markov chain over the alphabet ``{0, ..., M-1}``.

    Parameters
    ----------
    order : int
        ``k`` >= 1.
    probs : Tensor ``[M, ..., M, M]`` (``k + 1`` axes), optional
        ``probs[a_1, ..., a_k, b] = p(y_t = b | y_{t-k} = a_1, ..., y_{t-1} = a_k)``
        (prior ``Dirichlet(1)`` per context).
    initial : Tensor ``[M, ..., M]`` (``k`` axes) or "uniform", optional
        Joint distribution of the first ``k`` symbols (prior ``Dirichlet(1)`` over the
        ``M^k`` windows when None).
    num_symbols : int, optional
        ``M`` (read from ``probs``).
    length : int, optional
        ``T`` of a draw; needed to sample or condition.

    Examples
    --------
    >>> import torch
    >>> chain = DiscreteAR(order=1, probs=torch.tensor([[0.9, 0.1], [0.5, 0.5]]),
    ...                    initial="uniform", length=3)
    >>> round(float(chain.log_prob(y=torch.tensor([0.0, 0.0, 1.0]))), 4)  # .5 * .9 * .1
    -3.1011
    >>> [round(v, 4) for v in chain.predict(torch.tensor([0.0]), steps=2)[1].tolist()]
    [0.86, 0.14]
    """

    mle_kind = "closed form"

    def __init__(self, *, order=1, probs=None, initial=None, num_symbols=None, length=None):
        order = None if order is None else check_int("DiscreteAR: order", order)
        num_symbols = None if num_symbols is None else check_int("DiscreteAR: num_symbols", num_symbols)
        length = None if length is None else check_int("DiscreteAR: length", length)
        uniform = isinstance(initial, str)
        if uniform and initial != "uniform":
            raise ValueError(f"DiscreteAR: initial must be an array or 'uniform', got {initial!r}")
        super().__init__(order=order, probs=probs, initial=None if uniform else initial,
                         num_symbols=num_symbols, length=length)
        keep_float64(self)
        k, M, P = order, num_symbols, self.kwargs["probs"]
        if P is not None:
            if not torch.is_tensor(P) or P.dim() != k + 1 or len(set(P.shape)) != 1:
                raise ValueError(f"DiscreteAR: probs must have k + 1 = {k + 1} axes of equal size "
                                 f"M, got {P if not torch.is_tensor(P) else list(P.shape)}")
            if M is not None and P.shape[0] != M:
                raise ValueError(f"DiscreteAR: probs has {P.shape[0]} symbols, num_symbols={M}")
            M = int(P.shape[0])
            check_probs("DiscreteAR: probs", P, (M,) * (k + 1))
        if M is None:
            raise ValueError("DiscreteAR: give probs or num_symbols")
        set_param(self, "num_symbols", M)
        if uniform:
            dt = self.dtype or torch.get_default_dtype()
            set_param(self, "initial", torch.full((M,) * k, float(M) ** -k, dtype=dt,
                                                  device=self.device))
        I0 = self.kwargs["initial"]
        if I0 is not None:
            if not torch.is_tensor(I0) or tuple(I0.shape) != (M,) * k:
                raise ValueError(f"DiscreteAR: initial must have shape {[M] * k}, got "
                                 f"{list(I0.shape) if torch.is_tensor(I0) else I0!r}")
            check_probs("DiscreteAR: initial (flattened)", I0.reshape(-1), (M ** k,))

    def missing_parameters(self) -> list[str]:
        return [n for n in ("probs", "initial") if self.kwargs[n] is None]

    @property
    def event_shape(self) -> tuple:
        if self.kwargs["length"] is None:
            raise ValueError("DiscreteAR: built without length=T; give it to sample or condition")
        return (self.kwargs["length"],)

    @staticmethod
    def story(n=None, order=1, probs=None, initial=None, num_symbols=None, length=None):
        """``y`` ``[T]`` from the chain (``[n, T]`` inside ``pyro.plate("data", n)``)."""
        if length is None:
            raise ValueError("DiscreteAR: sampling needs the sequence length (length=T)")
        k, M = int(order), int(num_symbols)
        if probs is None:
            rows = pyro.sample("probs_rows", dist.Dirichlet(torch.ones(M ** k, M)).to_event(1))
            probs = pyro.deterministic("probs", rows.reshape(*rows.shape[:-2], *([M] * (k + 1))))
        if initial is None:
            flat = pyro.sample("initial_flat", dist.Dirichlet(torch.ones(M ** k)))
            initial = pyro.deterministic("initial", flat.reshape(*flat.shape[:-1], *([M] * k)))
        seq = MarkovChainSequence(initial, probs, k, length)
        sample_rows(n, seq)

    def _as_data(self, y, what: str):
        t, single = _sequences(self, y, what)
        M = self.kwargs["num_symbols"]
        if not bool(((t == t.round()) & (t >= 0) & (t < M)).all()):
            raise ValueError(f"{what}: y must hold symbols in 0..{M - 1}")
        return t, single

    def _log_prob_rows(self, y):
        p = self.kwargs
        return markov_log_prob(p["initial"], p["probs"], p["order"], y)

    def predict(self, prefix, steps: int) -> torch.Tensor:
        """Marginal distributions of the next ``steps`` symbols given ``prefix``, exact by
        propagating the distribution of the last ``k`` symbols (a prefix shorter than
        ``k`` conditions the initial distribution).

        Parameters
        ----------
        prefix : array ``[L]`` or ``[N, L]`` of symbols (``L >= 0``)
        steps : int >= 1

        Returns
        -------
        Tensor ``[steps, M]`` or ``[N, steps, M]``: ``p(y_{L+s} = b | prefix)``.
        """
        self._require_parameters("predict")
        steps = check_int("predict: steps", steps)
        t = as_tensor(prefix, self.device, self.dtype, name="predict: prefix")
        t = torch.as_tensor(t, device=self.device)
        if t.dim() not in (1, 2):
            raise ValueError(f"predict: prefix must be [L] or [N, L], got {list(t.shape)}")
        single = t.dim() == 1
        t = t.unsqueeze(0) if single else t
        if t.is_floating_point() and not bool((t == t.round()).all()):
            raise ValueError("predict: prefix must hold integer symbols")
        p = self.kwargs
        k, M = p["order"], p["num_symbols"]
        t = t.long()
        if bool(((t < 0) | (t >= M)).any()):
            raise ValueError(f"predict: prefix must hold symbols in 0..{M - 1}")
        N, L = t.shape
        with self.context():
            P = p["probs"].reshape(M, M ** (k - 1), M)
            if L >= k:
                ctx = (t[:, L - k:] * M ** torch.arange(k - 1, -1, -1, device=t.device)).sum(-1)
                w = torch.nn.functional.one_hot(ctx, M ** k).to(P.dtype)
                outs = []
            else:  # condition the initial window on the first L symbols
                init = p["initial"].reshape(M ** L, M ** (k - L))
                ctx = (t * M ** torch.arange(L - 1, -1, -1, device=t.device)).sum(-1)
                rest = init[ctx]  # [N, M^(k-L)]
                rest = rest / rest.sum(-1, keepdim=True)
                r = rest.reshape(N, *([M] * (k - L)))
                outs = [_marginal_axis(r, j + 1) for j in range(k - L)]
                w = torch.zeros(N, M ** L, M ** (k - L), dtype=P.dtype, device=P.device)
                w[torch.arange(N), ctx] = rest
                w = w.reshape(N, M ** k)
            while len(outs) < steps:
                joint = w.reshape(N, M, M ** (k - 1), 1) * P  # [N, M, M^(k-1), M]
                w = joint.sum(1).reshape(N, M ** k)
                outs.append(w.reshape(N, M ** (k - 1), M).sum(1))
            out = torch.stack(outs[:steps], 1)
        return out[0] if single else out

    def next_symbol_probs(self, prefix) -> torch.Tensor:
        """``p(y_{L+1} | prefix)``: ``[M]`` or ``[N, M]``."""
        out = self.predict(prefix, 1)
        return out[..., 0, :]

    @classmethod
    def mle(cls, data, order: int = 1, *, num_symbols: int | None = None,
            smoothing: float = 0.0) -> DiscreteAR:
        """Maximum likelihood by counting ``(k+1)``-grams (and first windows for
        ``initial``), with ``smoothing`` pseudo-counts added to every cell (``0``: the MLE;
        contexts never seen then get uniform next-symbol probabilities).

        Parameters
        ----------
        data : array ``[N, T]`` or ``[T]`` of symbols, ``T >= order``
        order : int
        num_symbols : int, optional
            ``M`` (default: largest symbol + 1).
        smoothing : float >= 0
        """
        k = check_int("DiscreteAR.mle: order", order)
        y = _data(cls, data, "mle")
        if not bool(((y == y.round()) & (y >= 0)).all()):
            raise ValueError("DiscreteAR.mle: data must hold non-negative integer symbols")
        M = int(y.max()) + 1 if num_symbols is None else check_int("DiscreteAR.mle: num_symbols",
                                                                   num_symbols)
        if int(y.max()) >= M:
            raise ValueError(f"DiscreteAR.mle: data has symbol {int(y.max())} >= num_symbols={M}")
        if not (isinstance(smoothing, (int, float)) and smoothing >= 0):
            raise ValueError(f"DiscreteAR.mle: smoothing must be a number >= 0, got {smoothing!r}")
        if y.shape[-1] < k:
            raise ValueError(f"DiscreteAR.mle: sequences need at least order = {k} symbols")
        v = y.long()
        w = M ** torch.arange(k, -1, -1, device=v.device)
        flat = (v.unfold(-1, k + 1, 1) * w).sum(-1).reshape(-1) if y.shape[-1] > k else \
            v.new_zeros(0)
        counts = torch.bincount(flat, minlength=M ** (k + 1)).to(y.dtype).reshape(M ** k, M)
        counts = counts + smoothing
        tot = counts.sum(-1, keepdim=True)
        probs = torch.where(tot > 0, counts / tot.clamp_min(1e-300), torch.full_like(counts, 1 / M))
        first = (v[:, :k] * w[1:]).sum(-1)
        c0 = torch.bincount(first, minlength=M ** k).to(y.dtype) + smoothing
        initial = c0 / c0.sum()
        return cls(order=k, probs=probs.reshape(*([M] * (k + 1))),
                   initial=initial.reshape(*([M] * k)), length=int(y.shape[-1])).to(
            device=y.device, dtype=y.dtype)


# ---------------------------------------------------------------------- data helpers
def _marginal_axis(r: torch.Tensor, axis: int) -> torch.Tensor:
    """Sum ``r`` ``[N, M, ..., M]`` over every axis but 0 and ``axis``."""
    others = tuple(a for a in range(1, r.dim()) if a != axis)
    return r.sum(others) if others else r


def _sequences(model, y, what):
    t = as_tensor(y, model.device, model.dtype, name=f"{what}: y")
    if not torch.is_tensor(t):
        t = torch.as_tensor(t, device=model.device, dtype=model.dtype or torch.get_default_dtype())
    if not t.is_floating_point():
        t = t.to(model.dtype or torch.get_default_dtype())
    if t.dim() not in (1, 2) or t.shape[-1] < 1:
        raise ValueError(f"{what}: y must be [T] or [N, T]; got {list(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what}: y has NaN or infinite entries; {type(model).__name__} does "
                         "not integrate missing values out")
    single = t.dim() == 1
    return (t.unsqueeze(0) if single else t), single


def _data(cls, data, what):
    dtype = data.dtype if torch.is_tensor(data) and data.is_floating_point() else torch.float64
    y = as_tensor(data, None, dtype, name=f"{cls.__name__}.{what}: data")
    if not torch.is_tensor(y):
        raise TypeError(f"{cls.__name__}.{what}: data must be an array [N, T], got "
                        f"{type(data).__name__}")
    y = y if y.is_floating_point() else y.to(torch.float64)
    if y.dim() == 1:
        y = y.unsqueeze(0)
    if y.dim() != 2:
        raise ValueError(f"{cls.__name__}.{what}: data must be [N, T] or [T], got shape "
                         f"{list(y.shape)}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{cls.__name__}.{what}: data has NaN or infinite entries")
    return y



"""Linear-Gaussian state-space models (:class:`LinearGaussianSSM`): Kalman filtering,
RTS smoothing, forecasting and maximum likelihood.

    x_1 ~ N(m0, P0),   x_t = A x_{t-1} + w_t,  w_t ~ N(0, Q),
    y_t = C x_t + v_t,                         v_t ~ N(0, R),     t = 1..T.

A draw of ``y`` is **one sequence** ``[T, p]`` (``p = obs_dim``; ``h = state_dim`` is the
dimension of ``x``); a data set is ``[N, T, p]``, ``N`` independent sequences of the same
length (``n`` in the story counts sequences). NaN entries of ``y`` are missing: a NaN
row skips the Kalman update, NaN entries update on the observed coordinates only; the
likelihood is that of the observed entries.

Everything is vectorized over sequences (loops run over time steps only). The story
writes ``y`` as one :class:`pyro.distributions.GaussianHMM` site (states integrated out
by Pyro), whose first step draws ``x_1 ~ N(m0, P0)``; the exact operations here use
their own Kalman recursions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch

from genprog.inputs import as_tensor
from genprog.validation import check_int

from .base import ZooModel, deprecated_record, renamed_keywords, sample_rows
from .gaussian import check_positive_definite, keep_float64, set_param

_LOG_2PI = math.log(2 * math.pi)
_PARAMS = ("A", "C", "Q", "R", "m0", "P0")


@dataclass(frozen=True)
class GaussianStates:
    """Gaussian marginals of the states given (some of) the data.

    Attributes
    ----------
    mean : Tensor ``[N, T, h]`` (``[T, h]`` for a single sequence)
    cov : Tensor ``[N, T, h, h]`` (``[T, h, h]``)
    """

    mean: torch.Tensor
    cov: torch.Tensor


@dataclass(frozen=True)
class Forecast:
    """Predictive distribution of future observations given a sequence.

    Attributes
    ----------
    mean : Tensor ``[N, steps, p]`` (``[steps, p]`` for a single sequence)
    cov : Tensor ``[N, steps, p, p]``: the marginal covariance of each future ``y``
    """

    mean: torch.Tensor
    cov: torch.Tensor

    def interval(self, z: float = 1.96) -> tuple[torch.Tensor, torch.Tensor]:
        """Pointwise ``mean -/+ z * sd`` (``z = 1.96``: 95% intervals)."""
        sd = torch.diagonal(self.cov, dim1=-2, dim2=-1).sqrt()
        return self.mean - z * sd, self.mean + z * sd


@dataclass(frozen=True)
class OptimInfo:
    """Record of a numerical maximum-likelihood fit.

    Attributes
    ----------
    log_likelihood : float
        Total log-likelihood of the data at the returned parameters, in nats.
    num_iters : int
        Optimiser iterations run.
    converged : bool
        Whether the optimiser stopped on its tolerance before ``max_iters``.
    """

    log_likelihood: float
    num_iters: int
    converged: bool


class LinearGaussianSSM(ZooModel):
    """Linear-Gaussian state-space model (a Kalman filter model).

    Parameters
    ----------
    A : Tensor ``[h, h]``, optional
        State transition (prior ``Normal(0, 0.5)`` entries when None).
    C : Tensor ``[p, h]``, optional
        Observation matrix (prior ``Normal(0, 1)``).
    Q : Tensor ``[h, h]``, optional
        State noise covariance (prior: diagonal, ``LogNormal(-1, 1)`` variances).
    R : Tensor ``[p, p]``, optional
        Observation noise covariance (prior: diagonal, ``LogNormal(-1, 1)`` variances).
    m0 : Tensor ``[h]``, optional
        Mean of the first state ``x_1`` (prior ``Normal(0, 1)``).
    P0 : Tensor ``[h, h]``, optional
        Covariance of ``x_1`` (prior: diagonal, ``LogNormal(0, 1)`` variances).
    state_dim, obs_dim : int, optional
        ``h`` and ``p``, read from the matrices when those are given.
    length : int, optional
        ``T`` of a draw; needed to sample or condition (``log_prob``, ``filter``,
        ``posterior`` and ``forecast`` take sequences of any length).

    Attributes
    ----------
    info : OptimInfo
        Set by :meth:`mle`, the fit record (:class:`OptimInfo`): ``log_likelihood``
        (float, total log-likelihood at the returned parameters, nats), ``num_iters`` (int,
        L-BFGS iterations), ``converged`` (bool, whether L-BFGS stopped on its tolerance
        before ``max_iters``).
    fit_info : OptimInfo
        Deprecated name of ``info`` (the same record; read-only).

    Examples
    --------
    >>> import torch
    >>> one = torch.ones(1, 1)
    >>> ll = LinearGaussianSSM(A=one, C=one, Q=one, R=one, m0=torch.zeros(1), P0=one)
    >>> round(float(ll.log_prob(y=torch.zeros(1, 1))), 4)  # y_1 ~ N(0, P0 + R)
    -1.2655
    >>> ll.forecast(torch.zeros(3, 1), steps=2).mean.shape
    torch.Size([2, 1])
    """

    supports_missing = True
    mle_kind = "numerical (L-BFGS on the exact Kalman log p)"
    fit_info = deprecated_record("fit_info")

    def __init__(self, *, A=None, C=None, Q=None, R=None, m0=None, P0=None, state_dim=None,
                 obs_dim=None, length=None):
        state_dim = None if state_dim is None else check_int("LinearGaussianSSM: state_dim", state_dim)
        obs_dim = None if obs_dim is None else check_int("LinearGaussianSSM: obs_dim", obs_dim)
        length = None if length is None else check_int("LinearGaussianSSM: length", length)
        super().__init__(A=A, C=C, Q=Q, R=R, m0=m0, P0=P0, state_dim=state_dim, obs_dim=obs_dim,
                         length=length)
        keep_float64(self)
        self._check_params()

    def _check_params(self) -> None:
        p = self.kwargs
        h, q = p["state_dim"], p["obs_dim"]
        for name in _PARAMS:
            v = p[name]
            if v is not None and (not torch.is_tensor(v) or not v.is_floating_point()):
                raise ValueError(f"LinearGaussianSSM: {name} must be a float array, got {v!r}")
            if v is not None and not bool(torch.isfinite(v).all()):
                raise ValueError(f"LinearGaussianSSM: {name} has non-finite entries")
        dims = {"A": ("h", "h"), "C": ("p", "h"), "Q": ("h", "h"), "R": ("p", "p"),
                "m0": ("h",), "P0": ("h", "h")}
        size = {"h": h, "p": q}
        for name, want in dims.items():
            v = p[name]
            if v is None:
                continue
            if v.dim() != len(want):
                raise ValueError(f"LinearGaussianSSM: {name} must be [{', '.join(want)}], got "
                                 f"shape {list(v.shape)}")
            for letter, s in zip(want, v.shape):
                if size[letter] is not None and size[letter] != s:
                    what = "state_dim" if letter == "h" else "obs_dim"
                    raise ValueError(f"LinearGaussianSSM: {name} has shape {list(v.shape)}, "
                                     f"which disagrees with {what}={size[letter]}")
                size[letter] = int(s)
        if size["h"] is None or size["p"] is None:
            raise ValueError("LinearGaussianSSM: give state_dim and obs_dim (or matrices that "
                             "show them)")
        for name in ("Q", "R", "P0"):
            if p[name] is not None:
                check_positive_definite(f"LinearGaussianSSM: {name}", p[name])
        set_param(self, "state_dim", size["h"])
        set_param(self, "obs_dim", size["p"])

    def missing_parameters(self) -> list[str]:
        return [n for n in _PARAMS if self.kwargs[n] is None]

    @property
    def event_shape(self) -> tuple:
        T = self.kwargs["length"]
        if T is None:
            raise ValueError("LinearGaussianSSM: built without length=T; give it to sample or "
                             "condition (log_prob, filter, posterior and forecast take any length)")
        return (T, self.kwargs["obs_dim"])

    @staticmethod
    def story(n=None, A=None, C=None, Q=None, R=None, m0=None, P0=None, state_dim=None,
              obs_dim=None, length=None):
        """``y`` ``[T, p]`` from a :class:`~pyro.distributions.GaussianHMM` (``[n, T, p]``
        i.i.d. sequences inside ``pyro.plate("data", n)``)."""
        if length is None:
            raise ValueError("LinearGaussianSSM: sampling needs the sequence length (length=T)")
        h, q, T = int(state_dim), int(obs_dim), int(length)
        if A is None:
            A = pyro.sample("A", dist.Normal(0.0, 0.5).expand([h, h]).to_event(2))
        if C is None:
            C = pyro.sample("C", dist.Normal(0.0, 1.0).expand([q, h]).to_event(2))
        if Q is None:
            Q = torch.diag_embed(pyro.sample("Q_diag", dist.LogNormal(-1.0, 1.0).expand([h])
                                             .to_event(1)))
        if R is None:
            R = torch.diag_embed(pyro.sample("R_diag", dist.LogNormal(-1.0, 1.0).expand([q])
                                             .to_event(1)))
        if m0 is None:
            m0 = pyro.sample("m0", dist.Normal(0.0, 1.0).expand([h]).to_event(1))
        if P0 is None:
            P0 = torch.diag_embed(pyro.sample("P0_diag", dist.LogNormal(0.0, 1.0).expand([h])
                                              .to_event(1)))
        seq = gaussian_hmm(A, C, Q, R, m0, P0, T)
        sample_rows(n, seq)

    # ------------------------------------------------------------------ data
    def _as_data(self, y, what: str):
        """``y`` as ``[N, T, p]`` (any ``T >= 1``) and whether it was one sequence."""
        t = as_tensor(y, self.device, self.dtype, name=f"{what}: y")
        if not torch.is_tensor(t):
            t = torch.as_tensor(t, device=self.device, dtype=self.dtype or torch.get_default_dtype())
        if not t.is_floating_point():
            t = t.to(self.dtype or torch.get_default_dtype())
        p = self.kwargs["obs_dim"]
        if t.dim() not in (2, 3) or t.shape[-1] != p or t.shape[-2] < 1:
            raise ValueError(f"{what}: y must be [T, {p}] or [N, T, {p}]; got {list(t.shape)}")
        if torch.isinf(t).any():
            raise ValueError(f"{what}: y has infinite entries")
        single = t.dim() == 2
        return (t.unsqueeze(0) if single else t), single

    # ------------------------------------------------------------------ Kalman filter
    def _kalman(self, y):
        """Filter ``y`` ``[N, T, p]``: predicted and filtered means/covs (lists over t) and
        ``log p(y_obs)`` ``[N]``."""
        p = self.kwargs
        A, C, Q, R = p["A"], p["C"], p["Q"], p["R"]
        N, T, _ = y.shape
        h = A.shape[0]
        m = p["m0"].expand(N, h)
        P = p["P0"].expand(N, h, h)
        ll = y.new_zeros(N)
        m_pred, P_pred, m_filt, P_filt = [], [], [], []
        for t in range(T):
            if t > 0:
                m = m @ A.T
                P = A @ P @ A.T + Q
            m_pred.append(m)
            P_pred.append(P)
            obs = ~torch.isnan(y[:, t])
            o = obs.to(y.dtype)
            yt = torch.where(obs, y[:, t], torch.zeros_like(y[:, t]))
            Ct = C * o.unsqueeze(-1)                                    # [N, p, h]
            Rt = R * o.unsqueeze(-1) * o.unsqueeze(-2) + torch.diag_embed(1 - o)
            S = Ct @ P @ Ct.transpose(-1, -2) + Rt
            S = 0.5 * (S + S.transpose(-1, -2))
            L = torch.linalg.cholesky(S)
            v = yt - (Ct @ m.unsqueeze(-1)).squeeze(-1)                 # 0 where missing
            w = torch.linalg.solve_triangular(L, v.unsqueeze(-1), upper=False).squeeze(-1)
            logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
            ll = ll - 0.5 * ((w ** 2).sum(-1) + logdet + o.sum(-1) * _LOG_2PI)
            PCt = P @ Ct.transpose(-1, -2)                              # [N, h, p]
            K = torch.cholesky_solve(PCt.transpose(-1, -2), L).transpose(-1, -2)
            m = m + (K @ v.unsqueeze(-1)).squeeze(-1)
            IKC = torch.eye(h, dtype=y.dtype, device=y.device) - K @ Ct
            P = IKC @ P @ IKC.transpose(-1, -2) + K @ Rt @ K.transpose(-1, -2)  # Joseph form
            m_filt.append(m)
            P_filt.append(0.5 * (P + P.transpose(-1, -2)))
        return m_pred, P_pred, m_filt, P_filt, ll

    def _log_prob_rows(self, y):
        return _log_prob(self.kwargs, y)

    def filter(self, y) -> GaussianStates:
        """Filtered state marginals ``p(x_t | y_1..y_t)`` (Kalman filter).

        Parameters
        ----------
        y : array ``[T, p]`` or ``[N, T, p]`` (NaN = missing)

        Returns
        -------
        GaussianStates
            ``mean [N, T, h]``, ``cov [N, T, h, h]`` (no ``N`` for a single sequence).
        """
        self._require_parameters("filter")
        y, single = self._as_data(y, "filter")
        with self.context():
            _, _, mf, Pf, _ = self._kalman(y)
            out = GaussianStates(torch.stack(mf, 1), torch.stack(Pf, 1))
        return _squeeze(out, single)

    def posterior(self, y) -> GaussianStates:
        """Smoothed state marginals ``p(x_t | y_1..y_T)`` (Rauch-Tung-Striebel smoother).

        Parameters
        ----------
        y : array ``[T, p]`` or ``[N, T, p]`` (NaN = missing)

        Returns
        -------
        GaussianStates
            ``mean [N, T, h]``, ``cov [N, T, h, h]`` (no ``N`` for a single sequence).
        """
        self._require_parameters("posterior")
        y, single = self._as_data(y, "posterior")
        with self.context():
            out = self._smooth(y)
        return _squeeze(out, single)

    def _smooth(self, y) -> GaussianStates:
        A = self.kwargs["A"]
        mp, Pp, mf, Pf, _ = self._kalman(y)
        T = len(mf)
        ms, Ps = [mf[-1]], [Pf[-1]]
        for t in range(T - 2, -1, -1):
            # J = Pf A^T Pp^-1, with Pp symmetric positive definite
            J = torch.linalg.solve(Pp[t + 1], A @ Pf[t]).transpose(-1, -2)
            m = mf[t] + (J @ (ms[0] - mp[t + 1]).unsqueeze(-1)).squeeze(-1)
            P = Pf[t] + J @ (Ps[0] - Pp[t + 1]) @ J.transpose(-1, -2)
            ms.insert(0, m)
            Ps.insert(0, 0.5 * (P + P.transpose(-1, -2)))
        return GaussianStates(torch.stack(ms, 1), torch.stack(Ps, 1))

    def forecast(self, y, steps: int) -> Forecast:
        """Predictive distribution of ``y_{T+1}, ..., y_{T+steps}`` given ``y_1..y_T``.

        Parameters
        ----------
        y : array ``[T, p]`` or ``[N, T, p]`` (NaN = missing)
        steps : int >= 1

        Returns
        -------
        Forecast
            ``mean [N, steps, p]`` and the marginal covariance of each future ``y``
            ``cov [N, steps, p, p]`` (no ``N`` for a single sequence).
        """
        self._require_parameters("forecast")
        steps = check_int("forecast: steps", steps)
        y, single = self._as_data(y, "forecast")
        p = self.kwargs
        A, C, Q, R = p["A"], p["C"], p["Q"], p["R"]
        with self.context():
            _, _, mf, Pf, _ = self._kalman(y)
            m, P = mf[-1], Pf[-1]
            means, covs = [], []
            for _ in range(steps):
                m = m @ A.T
                P = A @ P @ A.T + Q
                means.append(m @ C.T)
                covs.append(C @ P @ C.T + R)
            out = Forecast(torch.stack(means, 1), torch.stack(covs, 1))
        return Forecast(out.mean[0], out.cov[0]) if single else out

    # ------------------------------------------------------------------ maximum likelihood
    @classmethod
    @renamed_keywords(max_iter="max_iters")
    def mle(cls, data, state_dim: int, *, fixed: dict | None = None, init: dict | None = None,
            max_iters: int = 500, tol: float = 1e-9, seed: int = 0) -> LinearGaussianSSM:
        """Maximum likelihood by L-BFGS on the exact Kalman log-likelihood (missing entries
        integrated out).

        Parameters
        ----------
        data : array ``[N, T, p]`` or ``[T, p]`` (NaN = missing)
        state_dim : int
            ``h``.
        fixed : dict, optional
            Parameters held at given values, e.g. ``{"A": ones(1, 1), "C": ones(1, 1)}``
            for a local-level model (the others are estimated). Without constraints the
            model is identified only up to an invertible change of state basis.
        init : dict, optional
            Starting values of estimated parameters (default: ``A = 0.9 I``, random ``C``,
            ``Q``, ``R`` from the data variance, ``m0 = 0``, ``P0 = I``).
        max_iters : int
            ``max_iter`` is its deprecated name.
        tol : float
            Tolerance on the change of the mean log-likelihood per observed entry.
        seed : int

        Returns
        -------
        LinearGaussianSSM
            With the record :class:`OptimInfo` as ``info``.
        """
        h = check_int("LinearGaussianSSM.mle: state_dim", state_dim)
        y = as_tensor(data, None, data.dtype if torch.is_tensor(data) and data.is_floating_point()
                      else torch.float64, name="LinearGaussianSSM.mle: data")
        if not torch.is_tensor(y):
            raise TypeError(f"LinearGaussianSSM.mle: data must be an array, got {type(data).__name__}")
        y = y.to(torch.float64) if not y.is_floating_point() else y
        if y.dim() == 2:
            y = y.unsqueeze(0)
        if y.dim() != 3:
            raise ValueError(f"LinearGaussianSSM.mle: data must be [N, T, p] or [T, p], got "
                             f"shape {list(y.shape)}")
        if torch.isinf(y).any():
            raise ValueError("LinearGaussianSSM.mle: data has infinite entries")
        nobs = int((~torch.isnan(y)).sum())
        if nobs == 0:
            raise ValueError("LinearGaussianSSM.mle: every observation is missing")
        q = int(y.shape[-1])
        fixed = dict(fixed or {})
        init = dict(init or {})
        for name in list(fixed) + list(init):
            if name not in _PARAMS:
                raise ValueError(f"LinearGaussianSSM.mle: unknown parameter {name!r}; "
                                 f"parameters are {list(_PARAMS)}")
        dt, dev = y.dtype, y.device
        fixed = {k: as_tensor(v, dev, dt) for k, v in fixed.items()}
        init = {k: as_tensor(v, dev, dt) for k, v in init.items()}
        cls(**fixed, state_dim=h, obs_dim=q)  # validates shapes of the fixed parameters
        gen = torch.Generator().manual_seed(seed)
        cnt = (~torch.isnan(y)).sum((0, 1)).clamp_min(1)
        mean = torch.nan_to_num(y, nan=0.0).sum((0, 1)) / cnt
        var = torch.nan_to_num(y - mean, nan=0.0).pow(2).sum((0, 1)) / cnt
        var = var.clamp_min(1e-6).to(device=dev, dtype=dt)
        eye_h = torch.eye(h, dtype=dt, device=dev)
        start = {
            "A": 0.9 * eye_h,
            "C": torch.randn(q, h, generator=gen, dtype=dt).to(dev) * var.sqrt().unsqueeze(-1)
            / math.sqrt(h),
            "Q": 0.1 * eye_h,
            "R": torch.diag(0.5 * var),
            "m0": torch.zeros(h, dtype=dt, device=dev),
            "P0": eye_h.clone(),
        }
        start.update(init)
        free = [k for k in _PARAMS if k not in fixed]
        raw = {k: _to_unconstrained(k, start[k]).clone().requires_grad_(True) for k in free}

        def build():
            vals = dict(fixed)
            vals.update({k: _from_unconstrained(k, raw[k]) for k in free})
            return vals

        def objective():
            return -_log_prob(build(), y).sum() / nobs

        opt = torch.optim.LBFGS(list(raw.values()), max_iter=max_iters, tolerance_change=tol,
                                tolerance_grad=1e-10, line_search_fn="strong_wolfe",
                                history_size=20)

        def closure():
            opt.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        if free:
            opt.step(closure)
        n_iter = int(opt.state[opt._params[0]].get("n_iter", 0)) if free else 0
        with torch.no_grad():
            vals = {k: v.detach() for k, v in build().items()}
            ll = float(_log_prob(vals, y).sum())
        model = cls(**vals, length=int(y.shape[1])).to(device=dev, dtype=dt)
        model.info = OptimInfo(log_likelihood=ll, num_iters=n_iter,
                                   converged=n_iter < max_iters)
        return model


def _log_prob(params: dict, y: torch.Tensor) -> torch.Tensor:
    """``log p(y_obs)`` ``[N]`` for ``y`` ``[N, T, p]`` (NaN = missing) by Pyro's
    :class:`~pyro.distributions.GaussianHMM` (a parallel scan over time).

    Missing entries get observation value 0, a zero row of ``C`` and unit noise
    independent of the rest, so each contributes ``N(0; 0, 1)``, which is divided out."""
    A, C, R = params["A"], params["C"], params["R"]
    T = y.shape[1]
    obs = ~torch.isnan(y)
    if bool(obs.all()):
        return gaussian_hmm(A, C, params["Q"], R, params["m0"], params["P0"], T).log_prob(y)
    o = obs.to(y.dtype)                                                  # [N, T, p]
    Ct = C * o.unsqueeze(-1)                                             # [N, T, p, h]
    Rt = R * o.unsqueeze(-1) * o.unsqueeze(-2) + torch.diag_embed(1 - o)
    hmm = gaussian_hmm(A, Ct, params["Q"], Rt, params["m0"], params["P0"], T, time_varying_obs=True)
    filled = torch.where(obs, y, torch.zeros_like(y))
    return hmm.log_prob(filled) + 0.5 * _LOG_2PI * (1 - o).sum((-1, -2))


def _to_unconstrained(name, v):
    if name in ("Q", "R", "P0"):
        L = torch.linalg.cholesky(v)
        return torch.tril(L, -1) + torch.diag_embed(torch.log(torch.diagonal(L)))
    return v


def _from_unconstrained(name, u):
    if name in ("Q", "R", "P0"):
        L = torch.tril(u, -1) + torch.diag_embed(torch.exp(torch.diagonal(u)))
        return L @ L.T
    return u


def gaussian_hmm(A, C, Q, R, m0, P0, T, time_varying_obs: bool = False) -> dist.GaussianHMM:
    """Pyro's :class:`~pyro.distributions.GaussianHMM` for ``T`` steps of the model
    ``x_1 ~ N(m0, P0)``, ``x_t = A x_{t-1} + N(0, Q)``, ``y_t = C x_t + N(0, R)`` (batch
    dims of the parameters broadcast; with ``time_varying_obs``, ``C`` is ``[..., T, p, h]``
    and ``R`` ``[..., T, p, p]``). Pyro's chain starts one step before the first
    observation, so the first transition ignores that state and draws ``N(m0, P0)``."""
    h = A.shape[-1]
    tv = 1 if time_varying_obs else 0
    batch = torch.broadcast_shapes(A.shape[:-2], C.shape[:-2 - tv], Q.shape[:-2],
                                   R.shape[:-2 - tv], m0.shape[:-1], P0.shape[:-2])
    trans = torch.cat([torch.zeros_like(A).expand(*batch, 1, h, h),
                       A.transpose(-1, -2).unsqueeze(-3).expand(*batch, T - 1, h, h)], -3)
    loc = torch.cat([m0.unsqueeze(-2).expand(*batch, 1, h),
                     torch.zeros_like(m0).unsqueeze(-2).expand(*batch, T - 1, h)], -2)
    cov = torch.cat([P0.unsqueeze(-3).expand(*batch, 1, h, h),
                     Q.unsqueeze(-3).expand(*batch, T - 1, h, h)], -3)
    init = dist.MultivariateNormal(torch.zeros_like(m0), covariance_matrix=torch.eye(
        h, dtype=A.dtype, device=A.device).expand(*batch, h, h))
    return dist.GaussianHMM(init, trans, dist.MultivariateNormal(loc, covariance_matrix=cov),
                            C.transpose(-1, -2), dist.MultivariateNormal(
                                torch.zeros_like(R[..., 0]), covariance_matrix=R),
                            duration=T)


def _squeeze(states: GaussianStates, single: bool) -> GaussianStates:
    return GaussianStates(states.mean[0], states.cov[0]) if single else states

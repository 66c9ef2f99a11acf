"""Gaussian Dirichlet-process mixture, truncated stick-breaking: :class:`DirichletProcessMixture`.

The story (truncation ``T``): ``v_t ~ Beta(1, alpha)`` for ``t < T``, ``weights_t = v_t
prod_{s<t} (1 - v_s)`` with the last stick taking the rest, component means and
covariances from the base measure, ``y ~ sum_t weights_t N(means_t, covariances_t)`` (the
assignment summed out with :class:`~pyro.distributions.MixtureSameFamily`, so the generic
NUTS / VI / MAP fits see only continuous latents).

With ``weights``, ``means`` and ``covariances`` given the model *is* a finite Gaussian
mixture, and every operation is exact *for that mixture*: ``log p``, the
responsibilities ``p(z | y)`` (``posterior``), marginals over coordinates and
conditionals on coordinates. :meth:`DirichletProcessMixture.fit_variational` (also
``mle``) fits the truncated DP by mean-field variational inference (Blei & Jordan 2006;
Normal-Wishart base as in Bishop 2006 ch. 10 and scikit-learn's
``BayesianGaussianMixture``) and returns the finite mixture at the variational point
estimate (``E_q[weights]``, ``E_q[means]``, ``E_q[precision]^-1``): its ``log p`` is the
exact log density of that plug-in mixture — not the DP's marginal likelihood, which only
the ELBO (``info.elbo``) bounds from below.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch

from genprog.errors import ConvergenceWarning
from genprog.validation import check_int

from .base import ZooModel, deprecated_record, renamed_keywords, sample_rows
from .gaussian import (
    check_positive_definite,
    data_matrix,
    gaussian_log_prob,
    keep_float64,
    set_param,
    split_observed,
)
from .mixture import kmeans_plus_plus


def stick_breaking(v: torch.Tensor) -> torch.Tensor:
    """Weights ``[..., T]`` from stick fractions ``v [..., T-1]`` (the last stick takes
    the remainder, so the weights sum to 1)."""
    one = torch.ones_like(v[..., :1])
    rest = torch.cumprod(1 - v, dim=-1)
    return torch.cat([v, one], -1) * torch.cat([one, rest], -1)


class DirichletProcessMixture(ZooModel):
    """A Gaussian mixture with a truncated stick-breaking Dirichlet-process prior.

    Parameters
    ----------
    weights : Tensor ``[T]``, optional
        Mixing weights, non-negative, summing to 1 (stick-breaking prior with
        concentration ``alpha`` when None).
    means : Tensor ``[T, d]``, optional
        Component means (base: ``Normal(base_mean, base_scale)`` entries when None).
    covariances : Tensor ``[T, d, d]``, optional
        Symmetric positive definite (base: LogNormal(0, 1) scales times LKJ(2)
        correlation Cholesky factors when None, sites ``scales`` and ``corr``).
    alpha : float, optional
        DP concentration (prior ``Gamma(1, 1)`` when None and ``weights`` is None).
    truncation : int, optional
        ``T``; needed when no given parameter carries it.
    dim : int, optional
        ``d``; needed when neither ``means`` nor ``covariances`` is given.
    base_mean, base_scale : float
        The base measure's normal prior on the means.

    Attributes
    ----------
    info : VIInfo
        Set by :meth:`fit_variational`, the fit record (:class:`VIInfo`): ``elbo`` (float,
        evidence lower bound at the returned ``q``, nats), ``num_iters`` (int),
        ``converged`` (bool), ``trace`` (tuple of float, ELBO after each iteration),
        ``stick_params`` (Tensor ``[T-1, 2]``, the Beta parameters of ``q(v_t)``),
        ``responsibilities`` (Tensor ``[N, T]``, ``q(z_n)`` of the training rows).
    vi_info : VIInfo
        Deprecated name of ``info`` (the same record; read-only).

    Examples
    --------
    >>> import torch
    >>> m = DirichletProcessMixture(weights=torch.tensor([0.7, 0.3]),
    ...                             means=torch.tensor([[0.0], [5.0]]),
    ...                             covariances=torch.ones(2, 1, 1))
    >>> m.posterior(torch.tensor([5.0])).argmax().item()
    1
    """

    mle_kind = "variational (truncated stick-breaking, mean field)"
    vi_info = deprecated_record("vi_info")

    def __init__(self, *, weights=None, means=None, covariances=None, alpha=None,
                 truncation=None, dim=None, base_mean: float = 0.0, base_scale: float = 10.0):
        truncation = None if truncation is None else check_int("DirichletProcessMixture: truncation", truncation)
        dim = None if dim is None else check_int("DirichletProcessMixture: dim", dim)
        super().__init__(weights=weights, means=means, covariances=covariances, alpha=alpha,
                         truncation=truncation, dim=dim, base_mean=base_mean,
                         base_scale=base_scale)
        keep_float64(self)
        name = "DirichletProcessMixture"
        w, m, c, a = (self.kwargs[k] for k in ("weights", "means", "covariances", "alpha"))
        ts, ds = ({truncation} if truncation else set()), ({dim} if dim else set())
        if a is not None and not float(torch.as_tensor(a)) > 0:
            raise ValueError(f"{name}: alpha must be > 0, got {float(torch.as_tensor(a))}")
        if not float(base_scale) > 0:
            raise ValueError(f"{name}: base_scale must be > 0, got {base_scale}")
        if w is not None:
            if not torch.is_tensor(w) or w.dim() != 1:
                raise ValueError(f"{name}: weights must be a vector [T]")
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ValueError(f"{name}: weights must be finite and non-negative")
            if abs(float(w.sum()) - 1.0) > 1e-5:
                raise ValueError(f"{name}: weights must sum to 1, got {float(w.sum()):.6g}")
            ts.add(int(w.shape[0]))
        if m is not None:
            if not torch.is_tensor(m) or m.dim() != 2:
                raise ValueError(f"{name}: means must be [T, d]")
            if not bool(torch.isfinite(m).all()):
                raise ValueError(f"{name}: means have non-finite entries")
            ts.add(int(m.shape[0]))
            ds.add(int(m.shape[1]))
        if c is not None:
            if not torch.is_tensor(c) or c.dim() != 3:
                raise ValueError(f"{name}: covariances must be [T, d, d]")
            check_positive_definite(f"{name}: covariances", c)
            ts.add(int(c.shape[0]))
            ds.add(int(c.shape[1]))
        if len(ts) > 1 or len(ds) > 1:
            raise ValueError(f"{name}: weights, means, covariances, truncation and dim disagree: "
                             f"T in {sorted(ts)}, d in {sorted(ds)}")
        if not ts or not ds:
            raise ValueError(f"{name}: give the parameters, or truncation and dim for the priors")
        set_param(self, "truncation", ts.pop())
        set_param(self, "dim", ds.pop())

    @staticmethod
    def story(n=None, weights=None, means=None, covariances=None, alpha=None, truncation=None,
              dim=None, base_mean=0.0, base_scale=10.0):
        """Stick-breaking weights, base-measure components, ``y`` from the mixture (the
        assignment summed out)."""
        T, d = int(truncation), int(dim)
        if weights is None:
            if alpha is None:
                alpha = pyro.sample("alpha", dist.Gamma(1.0, 1.0))
            conc = torch.as_tensor(alpha).unsqueeze(-1)
            conc = conc.expand(conc.shape[:-1] + (T - 1,))
            v = pyro.sample("v", dist.Beta(torch.ones_like(conc), conc).to_event(1))
            weights = pyro.deterministic("weights", stick_breaking(v))
        if means is None:
            means = pyro.sample("means", dist.Normal(float(base_mean), float(base_scale))
                                .expand([T, d]).to_event(2))
        if covariances is None:
            scales = pyro.sample("scales", dist.LogNormal(0.0, 1.0).expand([T, d]).to_event(2))
            if d > 1:
                corr = pyro.sample("corr", dist.LKJCholesky(d, 2.0).expand([T]).to_event(1))
            else:
                corr = torch.ones(T, 1, 1)
            tril = scales.unsqueeze(-1) * corr
        else:
            tril = torch.linalg.cholesky(covariances)
        batch = torch.broadcast_shapes(weights.shape[:-1], means.shape[:-2], tril.shape[:-3])
        mix = dist.MixtureSameFamily(
            dist.Categorical(weights.expand(batch + (T,))),
            dist.MultivariateNormal(means.expand(batch + (T, d)),
                                    scale_tril=tril.expand(batch + (T, d, d))))
        sample_rows(n, mix)

    @property
    def event_shape(self) -> tuple:
        return (int(self.kwargs["dim"]),)

    def missing_parameters(self) -> list[str]:
        """Parameters without a value; ``alpha`` matters only while ``weights`` is None."""
        missing = super().missing_parameters()
        if self.kwargs["weights"] is not None and "alpha" in missing:
            missing.remove("alpha")
        return missing

    def _wmc(self):
        return tuple(self.kwargs[k] for k in ("weights", "means", "covariances"))

    # ------------------------------------------------------------------ exact operations
    def _component_log_probs(self, y):
        """``log w_t + log N(y; means_t, covariances_t)``: ``[N, T]``."""
        w, m, c = self._wmc()
        return torch.log(w) + gaussian_log_prob(y.unsqueeze(-2), m, c)

    def _log_prob_rows(self, y):
        return torch.logsumexp(self._component_log_probs(y), dim=-1)

    def posterior(self, y):
        """Responsibilities ``p(z = t | y)`` of the finite mixture: ``[T]`` or ``[N, T]``."""
        self._require_parameters("posterior")
        x, single = self._as_data(y, "posterior")
        with self.context():
            r = torch.softmax(self._component_log_probs(x), dim=-1)
        return r[0] if single else r

    def predict(self, y) -> torch.Tensor:
        """Most probable component of each row: ``[N]`` (int64)."""
        return self.posterior(y).argmax(-1)

    def effective_components(self, threshold: float = 0.01) -> int:
        """Number of components with weight above ``threshold``."""
        self._require_parameters("effective_components")
        return int((self.kwargs["weights"] > threshold).sum())

    def _new(self, **params):
        return type(self)(alpha=self.kwargs["alpha"], **params).to(self.device, self.dtype)

    def _marginal(self, drop):
        keep = [i for i in range(int(self.kwargs["dim"])) if i not in drop]
        w, m, c = self._wmc()
        return self._new(weights=w, means=m[:, keep], covariances=c[:, keep][:, :, keep])

    def _conditional(self, obs):
        w, m, c = self._wmc()
        a, b, xb = split_observed(obs, int(self.kwargs["dim"]), m.device, m.dtype)
        c_bb = c[:, b][:, :, b]
        c_ab = c[:, a][:, :, b]
        logw = torch.log(w) + gaussian_log_prob(xb.unsqueeze(0), m[:, b], c_bb)
        gain = torch.linalg.solve(c_bb, c_ab.transpose(-1, -2)).transpose(-1, -2)  # [T, a, b]
        means = m[:, a] + (gain @ (xb - m[:, b]).unsqueeze(-1)).squeeze(-1)
        covs = c[:, a][:, :, a] - gain @ c_ab.transpose(-1, -2)
        covs = 0.5 * (covs + covs.transpose(-1, -2))
        return self._new(weights=torch.softmax(logw, -1), means=means, covariances=covs)

    # ------------------------------------------------------------------ variational fit
    @classmethod
    @renamed_keywords(max_iter="max_iters")
    def fit_variational(cls, data, truncation: int = 10, alpha: float = 1.0, *,
                        mean_prior=None, mean_precision_prior: float = 1.0,
                        degrees_of_freedom_prior: float | None = None, covariance_prior=None,
                        max_iters: int = 500, tol: float = 1e-8, n_init: int = 1,
                        seed: int = 0) -> DirichletProcessMixture:
        """Mean-field VI for the truncated DP Gaussian mixture.

        ``q(v_t) = Beta``, ``q(means_t, precision_t) = Normal-Wishart``, ``q(z_n) =
        Categorical``; coordinate ascent on the ELBO from k-means++ responsibilities.

        Parameters
        ----------
        data : array ``[N, d]``
        truncation : int
            ``T``, the number of sticks.
        alpha : float
            DP concentration (fixed).
        mean_prior : array ``[d]``, optional
            Base mean of the means (default: the data mean).
        mean_precision_prior : float
            ``beta_0``: the means' prior precision relative to the component precision.
        degrees_of_freedom_prior : float, optional
            ``nu_0`` of the Wishart (default ``d``).
        covariance_prior : array ``[d, d]``, optional
            ``W_0^{-1}`` (default: the data covariance), scikit-learn's convention.
        max_iters, tol : int, float
            (``max_iter`` is the deprecated name of ``max_iters``.)
            Stop when the ELBO per row changes by less than ``tol`` nats.
        n_init : int
            Restarts; the highest ELBO wins.
        seed : int

        Returns
        -------
        DirichletProcessMixture
            The finite mixture at the variational point estimate (``truncation`` components,
            most with negligible weight), with a :class:`VIInfo` as attribute ``info``.
            A ``ConvergenceWarning`` is raised when the best restart stopped unconverged.
        """
        y = data_matrix(cls, data, "fit_variational")
        T = check_int("DirichletProcessMixture.fit_variational: truncation", truncation)
        n_init = check_int("DirichletProcessMixture.fit_variational: n_init", n_init)
        max_iters = check_int("DirichletProcessMixture.fit_variational: max_iters", max_iters)
        N = y.shape[0]
        if T > N:
            raise ValueError(f"DirichletProcessMixture.fit_variational: truncation {T} exceeds "
                             f"the number of rows {N}")
        if not float(alpha) > 0:
            raise ValueError(f"DirichletProcessMixture.fit_variational: alpha must be > 0, got {alpha}")
        prior = _NWPrior.make(y, mean_prior, mean_precision_prior, degrees_of_freedom_prior,
                              covariance_prior)
        g = torch.Generator(device=y.device).manual_seed(seed)
        best = None
        for _ in range(n_init):
            q, info = _cavi(y, kmeans_plus_plus(y, T, g), float(alpha), prior, max_iters, tol)
            if best is None or info.elbo > best[1].elbo:
                best = (q, info)
        q, info = best
        if not info.converged:
            warnings.warn(f"DirichletProcessMixture.fit_variational: stopped unconverged after "
                          f"{info.num_iters} iterations; raise max_iters", ConvergenceWarning,
                          stacklevel=2)
        model = cls(weights=q.weights(), means=q.m, covariances=q.covariances(), alpha=float(alpha),
                    ).to(device=y.device, dtype=y.dtype)
        model.info = info
        return model

    @classmethod
    def mle(cls, data, truncation: int = 10, alpha: float = 1.0, **options):
        """Alias of :meth:`fit_variational` (a variational fit, not maximum likelihood)."""
        return cls.fit_variational(data, truncation, alpha, **options)


# ---------------------------------------------------------------------- CAVI internals
@dataclass(frozen=True)
class VIInfo:
    """Record of a variational fit.

    Attributes
    ----------
    elbo : float
        Evidence lower bound (nats, whole data set) at the returned ``q``.
    num_iters : int
    converged : bool
    trace : tuple[float, ...]
        ELBO after each iteration (non-decreasing under coordinate ascent).
    stick_params : Tensor ``[T-1, 2]``
        ``q(v_t) = Beta(stick_params[t, 0], stick_params[t, 1])``.
    responsibilities : Tensor ``[N, T]``
        ``q(z_n)`` for the training rows.
    """

    elbo: float
    num_iters: int
    converged: bool
    trace: tuple
    stick_params: torch.Tensor
    responsibilities: torch.Tensor


@dataclass
class _NWPrior:
    m0: torch.Tensor
    beta0: float
    nu0: float
    W0_inv: torch.Tensor

    @classmethod
    def make(cls, y, mean_prior, beta0, nu0, cov_prior):
        d = y.shape[1]
        m0 = y.mean(0) if mean_prior is None else torch.as_tensor(mean_prior, dtype=y.dtype,
                                                                    device=y.device).reshape(d)
        nu0 = float(d) if nu0 is None else float(nu0)
        if nu0 <= d - 1:
            raise ValueError(f"DirichletProcessMixture.fit_variational: degrees_of_freedom_prior "
                             f"must be > d - 1 = {d - 1}, got {nu0}")
        if not float(beta0) > 0:
            raise ValueError("DirichletProcessMixture.fit_variational: mean_precision_prior "
                             "must be > 0")
        if cov_prior is None:
            W0_inv = torch.atleast_2d(torch.cov(y.T))
        else:
            W0_inv = torch.as_tensor(cov_prior, dtype=y.dtype, device=y.device)
        check_positive_definite("DirichletProcessMixture.fit_variational: covariance_prior",
                                W0_inv.reshape(d, d))
        return cls(m0, float(beta0), nu0, W0_inv.reshape(d, d))


@dataclass
class _Q:
    g1: torch.Tensor   # [T-1]
    g2: torch.Tensor   # [T-1]
    m: torch.Tensor    # [T, d]
    beta: torch.Tensor  # [T]
    nu: torch.Tensor   # [T]
    W_inv: torch.Tensor  # [T, d, d]

    def weights(self):
        return stick_breaking(self.g1 / (self.g1 + self.g2))

    def covariances(self):
        return self.W_inv / self.nu[:, None, None]

    def e_log_weights(self):
        dg = torch.digamma(self.g1 + self.g2)
        e_log_v = torch.digamma(self.g1) - dg
        e_log_1mv = torch.digamma(self.g2) - dg
        zero = torch.zeros_like(e_log_v[:1])
        return torch.cat([e_log_v, zero]) + torch.cat([zero, torch.cumsum(e_log_1mv, 0)])

    def e_log_det(self):
        d = self.m.shape[1]
        i = torch.arange(d, device=self.m.device, dtype=self.m.dtype)
        return (torch.digamma((self.nu[:, None] - i) / 2).sum(-1) + d * math.log(2.0)
                - torch.logdet(self.W_inv))


def _log_wishart_norm(W_logdet, nu, d):
    """``log B(W, nu)`` of the Wishart normaliser (Bishop B.79) from ``log|W|``."""
    i = torch.arange(d, dtype=nu.dtype, device=nu.device)
    return (-nu / 2 * W_logdet - nu * d / 2 * math.log(2.0) - d * (d - 1) / 4 * math.log(math.pi)
            - torch.lgamma((nu[..., None] - i) / 2).sum(-1))


def _m_step(y, r, alpha, p: _NWPrior) -> _Q:
    nk = r.sum(0) + 10 * torch.finfo(y.dtype).eps
    xbar = (r.T @ y) / nk[:, None]
    diff = y.unsqueeze(1) - xbar  # [N, T, d]
    S = torch.einsum("nt,nti,ntj->tij", r, diff, diff) / nk[:, None, None]
    g1 = 1 + nk[:-1]
    tail = torch.flip(torch.cumsum(torch.flip(nk, [0]), 0), [0])  # sum_{j >= t}
    g2 = alpha + tail[1:]
    beta = p.beta0 + nk
    m = (p.beta0 * p.m0 + nk[:, None] * xbar) / beta[:, None]
    dm = xbar - p.m0
    W_inv = (p.W0_inv + nk[:, None, None] * S
             + (p.beta0 * nk / beta)[:, None, None] * dm.unsqueeze(-1) * dm.unsqueeze(-2))
    W_inv = 0.5 * (W_inv + W_inv.transpose(-1, -2))
    nu = p.nu0 + nk
    return _Q(g1, g2, m, beta, nu, W_inv)


def _log_rho(y, q: _Q):
    """``E_q[log pi_t] + E_q[log N(y_n; mu_t, Lambda_t^-1)]``: ``[N, T]``."""
    d = y.shape[1]
    chol = torch.linalg.cholesky(q.W_inv)  # W = (L L^T)^-1
    diff = (y.unsqueeze(1) - q.m).unsqueeze(-1)  # [N, T, d, 1]
    sol = torch.linalg.solve_triangular(chol, diff, upper=False).squeeze(-1)
    maha = q.nu * (sol ** 2).sum(-1)  # nu (y - m)^T W (y - m)
    return (q.e_log_weights() + 0.5 * q.e_log_det() - d / 2 * math.log(2 * math.pi)
            - 0.5 * (d / q.beta + maha))


def _elbo(y, r, alpha, p: _NWPrior, q: _Q) -> float:
    """The evidence lower bound (Bishop 10.70-10.77 with stick-breaking weights)."""
    d = y.shape[1]
    log_rho = _log_rho(y, q)
    ent_z = -(r * torch.log(r.clamp_min(1e-300))).sum()
    e_lik_and_z = (r * log_rho).sum()  # E[log p(y | z, mu, Lambda)] + E[log p(z | v)]
    dg = torch.digamma(q.g1 + q.g2)
    e_log_v, e_log_1mv = torch.digamma(q.g1) - dg, torch.digamma(q.g2) - dg
    e_p_v = (math.log(alpha) + (alpha - 1) * e_log_1mv).sum()
    e_q_v = ((q.g1 - 1) * e_log_v + (q.g2 - 1) * e_log_1mv
             - (torch.lgamma(q.g1) + torch.lgamma(q.g2) - torch.lgamma(q.g1 + q.g2))).sum()
    ld = q.e_log_det()
    W0_logdet = -torch.logdet(p.W0_inv)
    W_logdet = -torch.logdet(q.W_inv)
    dm = q.m - p.m0
    chol = torch.linalg.cholesky(q.W_inv)
    sol = torch.linalg.solve_triangular(chol, dm.unsqueeze(-1), upper=False).squeeze(-1)
    tr_W0inv_W = torch.einsum("ij,tji->t", p.W0_inv, torch.cholesky_inverse(chol))
    T = q.m.shape[0]
    nu0 = torch.tensor(p.nu0, dtype=y.dtype, device=y.device)
    e_p_mu_lam = (0.5 * (d * math.log(p.beta0 / (2 * math.pi)) + ld - d * p.beta0 / q.beta
                         - p.beta0 * q.nu * (sol ** 2).sum(-1)).sum()
                  + T * _log_wishart_norm(W0_logdet, nu0, d)
                  + (p.nu0 - d - 1) / 2 * ld.sum() - 0.5 * (q.nu * tr_W0inv_W).sum())
    h_wishart = (-_log_wishart_norm(W_logdet, q.nu, d) - (q.nu - d - 1) / 2 * ld
                 + q.nu * d / 2)
    e_q_mu_lam = (0.5 * ld + d / 2 * torch.log(q.beta / (2 * math.pi)) - d / 2 - h_wishart).sum()
    return float(e_lik_and_z + ent_z + e_p_v - e_q_v + e_p_mu_lam - e_q_mu_lam)


def _cavi(y, r, alpha, prior, max_iters, tol):
    N = y.shape[0]
    trace, converged = [], False
    q = _m_step(y, r, alpha, prior)
    for it in range(1, max_iters + 1):
        r = torch.softmax(_log_rho(y, q), dim=-1)
        q = _m_step(y, r, alpha, prior)
        trace.append(_elbo(y, r, alpha, prior, q))
        if it > 1 and abs(trace[-1] - trace[-2]) < tol * N:
            converged = True
            break
    info = VIInfo(trace[-1], it, converged, tuple(trace),
                  torch.stack([q.g1, q.g2], -1), r)
    return q, info

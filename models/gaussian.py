"""Gaussian models of vectors: a full-covariance :class:`Gaussian`, probabilistic PCA
(:class:`PPCA`) and :class:`FactorAnalysis`.

All three are multivariate normal in ``y`` (PPCA and factor analysis after integrating
their latent factors ``z`` out), so every operation is exact: ``log p`` with missing
(NaN) entries integrated out, marginals and conditionals of any subset of coordinates,
imputation by conditional means, and — for the latent-factor models — the posterior
``p(z | y)``.

Shapes: ``d`` is the dimension of ``y`` (``dim``), ``k`` the number of latent factors.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from genprog.errors import ConvergenceWarning
from genprog.inputs import as_tensor
from genprog.validation import check_int

from .base import ZooModel, data_plate, deprecated_record, renamed_keywords, sample_rows

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# ---------------------------------------------------------------------- shared helpers
def keep_float64(model: ZooModel) -> None:
    """Give ``model`` dtype float64 when one of its given parameters is float64 (genprog
    otherwise converts inputs to torch's default dtype), so exact results stay exact."""
    raw = model._raw_inputs[1]
    if model.dtype is None and any(
        (torch.is_tensor(v) and v.dtype == torch.float64)
        or (isinstance(v, np.ndarray) and v.dtype == np.float64)
        for v in raw.values()
    ):
        model.dtype = torch.float64
        model.kwargs = {k: as_tensor(v, model.device, torch.float64) for k, v in raw.items()}


def set_param(model: ZooModel, name: str, value) -> None:
    """Set a story input in both the converted and the raw inputs (so ``to()`` keeps it)."""
    raw_args, raw_kwargs = model._raw_inputs
    model._raw_inputs = (raw_args, {**raw_kwargs, name: value})
    model.kwargs[name] = value


def check_positive_definite(name: str, cov: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of ``cov`` ``[..., d, d]``; ValueError if it is not symmetric
    positive definite."""
    if cov.dim() < 2 or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"{name} must be square [..., d, d], got shape {list(cov.shape)}")
    if not torch.isfinite(cov).all():
        raise ValueError(f"{name} has non-finite entries")
    scale = cov.abs().amax().clamp_min(1e-30)
    if not torch.allclose(cov, cov.transpose(-1, -2), rtol=0, atol=1e-6 * float(scale)):
        raise ValueError(f"{name} is not symmetric")
    chol, info = torch.linalg.cholesky_ex(cov)
    if bool((info != 0).any()):
        raise ValueError(f"{name} is not positive definite")
    return chol


def gaussian_log_prob(y: torch.Tensor, loc: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``log N(y_obs; loc_obs, cov_obs)`` with the NaN entries of ``y`` integrated out.

    Parameters
    ----------
    y : Tensor ``[N, *B, d]`` (NaN = missing; a row with every entry missing gets 0)
    loc : Tensor ``[*B, d]``
    cov : Tensor ``[*B, d, d]``

    Returns
    -------
    Tensor ``[N, *B]``

    Rows with missing entries are evaluated with the covariance whose missing rows and
    columns are replaced by those of the identity (the observed block is unchanged and
    the missing coordinates, set to their mean, decouple), then corrected by
    ``log(2 pi) / 2`` per missing entry — one batched Cholesky, no loop over rows.
    """
    obs = ~torch.isnan(y)
    if bool(obs.all()):
        return dist.MultivariateNormal(loc, covariance_matrix=cov).log_prob(y)
    o = obs.to(loc.dtype)
    filled = torch.where(obs, y, loc)
    cov_o = cov * o.unsqueeze(-1) * o.unsqueeze(-2) + torch.diag_embed(1 - o)
    return (dist.MultivariateNormal(loc, covariance_matrix=cov_o).log_prob(filled)
            + _HALF_LOG_2PI * (1 - o).sum(-1))


def low_rank_log_prob(y, loc, cov_factor, cov_diag) -> torch.Tensor:
    """As :func:`gaussian_log_prob` for ``cov = cov_factor cov_factor^T + diag(cov_diag)``
    (``cov_factor [d, k]``, ``cov_diag [d]``), in ``O(N d k^2)`` with
    :class:`pyro.distributions.LowRankMultivariateNormal`."""
    obs = ~torch.isnan(y)
    if bool(obs.all()):
        return dist.LowRankMultivariateNormal(loc, cov_factor, cov_diag).log_prob(y)
    o = obs.to(loc.dtype)
    filled = torch.where(obs, y, loc)
    lr = dist.LowRankMultivariateNormal(loc, cov_factor * o.unsqueeze(-1), cov_diag * o + (1 - o))
    return lr.log_prob(filled) + _HALF_LOG_2PI * (1 - o).sum(-1)


def conditional_mean(y: torch.Tensor, loc: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``y`` ``[N, d]`` with each NaN entry replaced by ``E[y_missing | y_observed]`` under
    ``N(loc, cov)``; vectorized over rows with the same masked covariance as
    :func:`gaussian_log_prob`."""
    obs = ~torch.isnan(y)
    o = obs.to(loc.dtype)
    resid = torch.where(obs, y - loc, torch.zeros_like(y))
    cov_o = cov * o.unsqueeze(-1) * o.unsqueeze(-2) + torch.diag_embed(1 - o)
    x = torch.linalg.solve(cov_o, resid.unsqueeze(-1))  # zero on the missing coordinates
    pred = loc + (cov @ x).squeeze(-1)
    return torch.where(obs, y, pred)


def split_observed(obs: dict, d: int, device, dtype):
    """Sorted observed indices, the other indices and the observed values ``[len(b)]``."""
    b = sorted(obs)
    a = [i for i in range(d) if i not in obs]
    vals = []
    for i in b:
        v = torch.as_tensor(obs[i]).to(device=device, dtype=dtype)
        if v.numel() != 1:
            raise ValueError(f"condition(dims=...): the value for dim {i} must be a scalar, "
                             f"got shape {list(v.shape)}")
        if not torch.isfinite(v).all():
            raise ValueError(f"condition(dims=...): the value for dim {i} is not finite")
        vals.append(v.reshape(()))
    return a, b, torch.stack(vals)


@dataclass(frozen=True)
class EMInfo:
    """Record of an EM fit.

    Attributes
    ----------
    log_likelihood : float
        Total log-likelihood of the data at the returned parameters, in nats.
    num_iters : int
        EM iterations run (of the best restart, for mixtures).
    converged : bool
        Whether the change in mean log-likelihood per row fell below ``tol``.
    trace : tuple[float, ...]
        Mean log-likelihood per row after each iteration.
    """

    log_likelihood: float
    num_iters: int
    converged: bool
    trace: tuple


def warn_unconverged(what: str, info: EMInfo) -> None:
    if not info.converged:
        warnings.warn(f"{what}: EM stopped unconverged after {info.num_iters} iterations "
                      f"(mean log-likelihood {info.trace[-1]:.6g}); raise max_iters or tol",
                      ConvergenceWarning, stacklevel=3)


def data_matrix(cls, data, what: str, allow_nan: bool = False) -> torch.Tensor:
    """``data`` as a floating tensor ``[N, d]`` (float64 for NumPy input)."""
    if torch.is_tensor(data) and data.is_floating_point():
        dtype, device = data.dtype, data.device
    else:
        dtype, device = (torch.float64 if isinstance(data, np.ndarray) else None), None
    t = as_tensor(data, device, dtype, name=f"{cls.__name__}.{what}: data")
    if not torch.is_tensor(t):
        raise TypeError(f"{cls.__name__}.{what}: data must be an array [N, d], got {type(data).__name__}")
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if t.dim() != 2 or t.shape[0] < 2:
        raise ValueError(f"{cls.__name__}.{what}: data must be [N, d] with N >= 2, "
                         f"got shape {list(t.shape)}")
    if not allow_nan and torch.isnan(t).any():
        raise ValueError(f"{cls.__name__}.{what}: data has NaN entries; fit on complete rows")
    if torch.isinf(t).any():
        raise ValueError(f"{cls.__name__}.{what}: data has infinite entries")
    return t


# ---------------------------------------------------------------------- base
class _GaussianFamily(ZooModel):
    """A model whose ``y`` is ``N(loc, covariance_matrix)``; subclasses give both."""

    supports_missing = True

    @property
    def event_shape(self) -> tuple:
        return (int(self.kwargs["dim"]),)

    @property
    def loc(self) -> torch.Tensor:
        """Mean of ``y``, ``[d]``."""
        raise NotImplementedError

    @property
    def covariance_matrix(self) -> torch.Tensor:
        """Covariance of ``y``, ``[d, d]``."""
        raise NotImplementedError

    def _log_prob_rows(self, y):
        return gaussian_log_prob(y, self.loc, self.covariance_matrix)

    def impute(self, y) -> torch.Tensor:
        """``y`` ``[N, d]`` (or one row ``[d]``) with every NaN entry replaced by its
        conditional mean given the row's observed entries (the posterior mean of the
        missing coordinates)."""
        self._require_parameters("impute")
        t, single = self._as_data(y, "impute")
        out = conditional_mean(t, self.loc, self.covariance_matrix)
        return out[0] if single else out


# ---------------------------------------------------------------------- Gaussian
class Gaussian(_GaussianFamily):
    """A multivariate normal ``y ~ N(mean, cov)`` with a full covariance.

    Parameters
    ----------
    mean : Tensor ``[d]``, optional
        Mean (prior ``Normal(0, 10)`` per coordinate when None).
    cov : Tensor ``[d, d]``, optional
        Symmetric positive definite covariance (prior: half-Cauchy(2.5) scales times an
        LKJ(1) correlation Cholesky factor, sites ``cov_scale`` and ``cov_corr``).
    dim : int, optional
        ``d``; needed only when neither ``mean`` nor ``cov`` is given.

    Examples
    --------
    >>> import torch
    >>> g = Gaussian(mean=torch.zeros(2), cov=torch.eye(2))
    >>> round(float(g.log_prob(y=torch.zeros(2))), 4)
    -1.8379
    >>> g.condition(dims={0: 1.0}).event_shape
    (1,)
    """

    mle_kind = "closed form"

    def __init__(self, *, mean=None, cov=None, dim=None):
        dim = None if dim is None else check_int("Gaussian: dim", dim)
        super().__init__(mean=mean, cov=cov, dim=dim)
        keep_float64(self)
        mean, cov = self.kwargs["mean"], self.kwargs["cov"]
        if mean is not None and (not torch.is_tensor(mean) or mean.dim() != 1):
            raise ValueError(f"Gaussian: mean must be a vector [d], got {shape_of(mean)}")
        if cov is not None:
            if not torch.is_tensor(cov) or cov.dim() != 2:
                raise ValueError(f"Gaussian: cov must be a matrix [d, d], got {shape_of(cov)}")
            check_positive_definite("Gaussian: cov", cov)
        dims = {int(x.shape[0]) for x in (mean, cov) if x is not None} | ({dim} if dim else set())
        if len(dims) > 1:
            raise ValueError(f"Gaussian: mean, cov and dim disagree on the dimension: {sorted(dims)}")
        if not dims:
            raise ValueError("Gaussian: give mean, cov or dim")
        set_param(self, "dim", dims.pop())

    @staticmethod
    def story(n=None, mean=None, cov=None, dim=None):
        """``y ~ N(mean, cov)``; ``[n, d]`` i.i.d. rows when ``n`` is given."""
        d = int(dim)
        if mean is None:
            mean = pyro.sample("mean", dist.Normal(0.0, 10.0).expand([d]).to_event(1))
        if cov is None:
            scale = pyro.sample("cov_scale", dist.HalfCauchy(2.5).expand([d]).to_event(1))
            if d > 1:
                corr = pyro.sample("cov_corr", dist.LKJCholesky(d, 1.0))
            else:
                corr = torch.ones(1, 1)
            tril = scale.unsqueeze(-1) * corr
            pyro.deterministic("cov", tril @ tril.transpose(-1, -2))
        else:
            tril = torch.linalg.cholesky(cov)
        sample_rows(n, dist.MultivariateNormal(mean, scale_tril=tril))

    @property
    def loc(self):
        return self.kwargs["mean"]

    @property
    def covariance_matrix(self):
        return self.kwargs["cov"]

    def _marginal(self, drop):
        keep = [i for i in range(self.event_shape[0]) if i not in drop]
        cov = self.kwargs["cov"]
        return Gaussian(mean=self.kwargs["mean"][keep], cov=cov[keep][:, keep])

    def _conditional(self, obs):
        mean, cov = self.kwargs["mean"], self.kwargs["cov"]
        a, b, yb = split_observed(obs, self.event_shape[0], mean.device, mean.dtype)
        chol = torch.linalg.cholesky(cov[b][:, b])
        s_ab = cov[a][:, b]
        gain = torch.cholesky_solve(s_ab.T, chol).T  # S_ab S_bb^-1, [|a|, |b|]
        new_mean = mean[a] + gain @ (yb - mean[b])
        new_cov = cov[a][:, a] - gain @ s_ab.T
        return Gaussian(mean=new_mean, cov=0.5 * (new_cov + new_cov.T))

    @classmethod
    def mle(cls, data, *, ddof: int = 0) -> Gaussian:
        """Maximum likelihood: the sample mean and the sample covariance (divisor
        ``N - ddof``; ``ddof=0`` is the MLE).

        Parameters
        ----------
        data : array ``[N, d]`` (no NaN)
        ddof : {0, 1}
        """
        y = data_matrix(cls, data, "mle")
        if ddof not in (0, 1):
            raise ValueError(f"Gaussian.mle: ddof must be 0 or 1, got {ddof!r}")
        mean = y.mean(0)
        r = y - mean
        cov = r.T @ r / (y.shape[0] - ddof)
        return cls(mean=mean, cov=0.5 * (cov + cov.T)).to(device=y.device, dtype=y.dtype)


# ---------------------------------------------------------------------- factor models
class _FactorModel(_GaussianFamily):
    """``z ~ N(0, I_k)``, ``y | z ~ N(W z + mu, diag(psi))``; subclasses give ``psi``."""

    @property
    def psi(self) -> torch.Tensor:
        """Noise variances, ``[d]``."""
        raise NotImplementedError

    @property
    def loc(self):
        return self.kwargs["mu"]

    @property
    def covariance_matrix(self):
        W = self.kwargs["W"]
        return W @ W.T + torch.diag(self.psi)

    def _log_prob_rows(self, y):
        return low_rank_log_prob(y, self.kwargs["mu"], self.kwargs["W"], self.psi)

    def _posterior_params(self, y, psi_weights):
        """Mean ``[N, k]`` and covariance ``[N, k, k]`` of ``z | y`` given per-row inverse
        noise variances ``psi_weights [N, d]`` (0 for missing entries)."""
        W, mu = self.kwargs["W"], self.kwargs["mu"]
        k = W.shape[1]
        resid = torch.nan_to_num(y - mu, nan=0.0)
        prec = torch.eye(k, dtype=W.dtype, device=W.device) + W.T @ (psi_weights.unsqueeze(-1) * W)
        chol = torch.linalg.cholesky(prec)
        cov = torch.cholesky_inverse(chol)
        mean = (cov @ (W.T @ (psi_weights * resid).unsqueeze(-1))).squeeze(-1)
        return mean, 0.5 * (cov + cov.transpose(-1, -2))

    def posterior(self, y):
        """The posterior of the latent factors, ``p(z | y)``, in closed form.

        Parameters
        ----------
        y : Tensor ``[N, d]`` or ``[d]`` (NaN entries are missing and ignored)

        Returns
        -------
        pyro.distributions.MultivariateNormal
            Batch shape ``[N]`` (``[]`` for one row), event shape ``[k]``:
            covariance ``(I + W^T Psi_o^-1 W)^-1`` over the observed entries ``o`` and
            mean ``cov W^T Psi_o^-1 (y_o - mu_o)``.
        """
        self._require_parameters("posterior")
        t, single = self._as_data(y, "posterior")
        weights = torch.where(torch.isnan(t), torch.zeros_like(t), 1.0 / self.psi.expand_as(t))
        mean, cov = self._posterior_params(t, weights)
        if single:
            mean, cov = mean[0], cov[0]
        return dist.MultivariateNormal(mean, covariance_matrix=cov)

    def _conditional_parts(self, obs):
        """``W_a L``, ``mu_a + W_a m`` and the index lists, where ``z | y_b ~ N(m, L L^T)``."""
        W, mu = self.kwargs["W"], self.kwargs["mu"]
        a, b, yb = split_observed(obs, self.event_shape[0], W.device, W.dtype)
        y = torch.full((1, W.shape[0]), float("nan"), dtype=W.dtype, device=W.device)
        y[0, b] = yb
        weights = torch.zeros_like(y)
        weights[0, b] = 1.0 / self.psi[b]
        m, c = self._posterior_params(y, weights)
        L = torch.linalg.cholesky(c[0])
        return W[a] @ L, mu[a] + W[a] @ m[0], a


class PPCA(_FactorModel):
    """Probabilistic PCA (Tipping & Bishop 1999): ``z ~ N(0, I_k)``,
    ``y | z ~ N(W z + mu, sigma^2 I_d)``, so ``y ~ N(mu, W W^T + sigma^2 I)``.

    Parameters
    ----------
    W : Tensor ``[d, k]``, optional
        Loadings (prior ``Normal(0, 1)`` entries when None).
    mu : Tensor ``[d]``, optional
        Mean (prior ``Normal(0, 10)``).
    sigma : float, optional
        Noise standard deviation, > 0 (prior ``HalfCauchy(1)``).
    dim, k : int, optional
        ``d`` and ``k``; needed only when ``W`` is not given.

    Examples
    --------
    >>> import torch
    >>> m = PPCA(W=torch.ones(3, 1), mu=torch.zeros(3), sigma=0.5)
    >>> m.posterior(torch.ones(3)).mean.shape
    torch.Size([1])
    """

    mle_kind = "closed form"

    def __init__(self, *, W=None, mu=None, sigma=None, dim=None, k=None):
        dim = None if dim is None else check_int("PPCA: dim", dim)
        k = None if k is None else check_int("PPCA: k", k)
        super().__init__(W=W, mu=mu, sigma=sigma, dim=dim, k=k)
        keep_float64(self)
        _check_factor_params(self, "PPCA")
        s = self.kwargs["sigma"]
        if s is not None:
            if not torch.is_tensor(s):
                s = torch.tensor(float(s), device=self.device,
                                 dtype=self.dtype or torch.get_default_dtype())
            if s.numel() != 1 or not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
                raise ValueError(f"PPCA: sigma must be one positive number, got {s!r}")
            set_param(self, "sigma", s.reshape(()))

    @staticmethod
    def story(n=None, W=None, mu=None, sigma=None, dim=None, k=None):
        """``z ~ N(0, I_k)``, ``y ~ N(W z + mu, sigma^2 I_d)`` (sites ``"z"``, ``"y"``)."""
        d, k = int(dim), int(k)
        if W is None:
            W = pyro.sample("W", dist.Normal(0.0, 1.0).expand([d, k]).to_event(2))
        if mu is None:
            mu = pyro.sample("mu", dist.Normal(0.0, 10.0).expand([d]).to_event(1))
        if sigma is None:
            sigma = pyro.sample("sigma", dist.HalfCauchy(1.0))
        with data_plate(n):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([k]).to_event(1))
            loc = (W @ z.unsqueeze(-1)).squeeze(-1) + mu
            pyro.sample("y", dist.Normal(loc, sigma.unsqueeze(-1)).to_event(1))

    @property
    def psi(self):
        s = self.kwargs["sigma"]
        return (s * s).expand(int(self.kwargs["dim"]))

    def _marginal(self, drop):
        keep = [i for i in range(self.event_shape[0]) if i not in drop]
        return PPCA(W=self.kwargs["W"][keep], mu=self.kwargs["mu"][keep], sigma=self.kwargs["sigma"])

    def _conditional(self, obs):
        W, mu, _ = self._conditional_parts(obs)
        return PPCA(W=W, mu=mu, sigma=self.kwargs["sigma"])

    @classmethod
    def mle(cls, data, k: int, *, ddof: int = 0) -> PPCA:
        """Closed-form maximum likelihood (Tipping & Bishop 1999): with eigenpairs
        ``(lambda_j, u_j)`` of the sample covariance (divisor ``N - ddof``),
        ``sigma^2`` is the mean of the ``d - k`` smallest eigenvalues and
        ``W = U_k (Lambda_k - sigma^2 I)^{1/2}`` (determined up to a rotation).

        ``ddof=1`` reproduces scikit-learn's ``PCA`` likelihood model; ``ddof=0`` is the MLE.

        Parameters
        ----------
        data : array ``[N, d]`` (no NaN)
        k : int, ``1 <= k < d``
        """
        y = data_matrix(cls, data, "mle")
        d = y.shape[1]
        k = check_int("PPCA.mle: k", k)
        if k >= d:
            raise ValueError(f"PPCA.mle: k must be < d = {d}, got {k}")
        if ddof not in (0, 1):
            raise ValueError(f"PPCA.mle: ddof must be 0 or 1, got {ddof!r}")
        mu = y.mean(0)
        r = y - mu
        S = r.T @ r / (y.shape[0] - ddof)
        evals, evecs = torch.linalg.eigh(0.5 * (S + S.T))
        evals, evecs = evals.flip(0), evecs.flip(1)
        sigma2 = evals[k:].mean().clamp_min(torch.finfo(y.dtype).tiny)
        W = evecs[:, :k] * (evals[:k] - sigma2).clamp_min(0).sqrt()
        return cls(W=W, mu=mu, sigma=sigma2.sqrt()).to(device=y.device, dtype=y.dtype)


class FactorAnalysis(_FactorModel):
    """Factor analysis: ``z ~ N(0, I_k)``, ``y | z ~ N(W z + mu, diag(psi))``, so
    ``y ~ N(mu, W W^T + diag(psi))``.

    Parameters
    ----------
    W : Tensor ``[d, k]``, optional
        Loadings (prior ``Normal(0, 1)`` entries when None).
    mu : Tensor ``[d]``, optional
        Mean (prior ``Normal(0, 10)``).
    psi : Tensor ``[d]``, optional
        Noise variances, > 0 (prior ``HalfCauchy(1)`` each).
    dim, k : int, optional
        ``d`` and ``k``; needed only when ``W`` is not given.

    Attributes
    ----------
    info : EMInfo
        Set by :meth:`mle`, the fit record (:class:`~genprog.models.gaussian.EMInfo`):
        ``log_likelihood`` (float, total log-likelihood of the data at the returned
        parameters, nats), ``num_iters`` (int, EM iterations), ``converged`` (bool,
        whether the change in mean log-likelihood per row fell below ``tol``), ``trace``
        (tuple of float, mean log-likelihood per row after each iteration).
    em_info : EMInfo
        Deprecated name of ``info`` (the same record; read-only).

    Examples
    --------
    >>> import torch
    >>> fa = FactorAnalysis(W=torch.ones(3, 1), mu=torch.zeros(3), psi=torch.ones(3))
    >>> fa.marginalize(dims=[0]).event_shape
    (2,)
    """

    mle_kind = "EM"
    em_info = deprecated_record("em_info")

    def __init__(self, *, W=None, mu=None, psi=None, dim=None, k=None):
        dim = None if dim is None else check_int("FactorAnalysis: dim", dim)
        k = None if k is None else check_int("FactorAnalysis: k", k)
        super().__init__(W=W, mu=mu, psi=psi, dim=dim, k=k)
        keep_float64(self)
        _check_factor_params(self, "FactorAnalysis")
        psi = self.kwargs["psi"]
        if psi is not None:
            if not torch.is_tensor(psi) or psi.shape != (self.kwargs["dim"],):
                raise ValueError(f"FactorAnalysis: psi must be a vector [{self.kwargs['dim']}], "
                                 f"got {shape_of(psi)}")
            if not bool(torch.isfinite(psi).all()) or not bool((psi > 0).all()):
                raise ValueError("FactorAnalysis: psi (noise variances) must be positive and finite")

    @staticmethod
    def story(n=None, W=None, mu=None, psi=None, dim=None, k=None):
        """``z ~ N(0, I_k)``, ``y ~ N(W z + mu, diag(psi))`` (sites ``"z"``, ``"y"``)."""
        d, k = int(dim), int(k)
        if W is None:
            W = pyro.sample("W", dist.Normal(0.0, 1.0).expand([d, k]).to_event(2))
        if mu is None:
            mu = pyro.sample("mu", dist.Normal(0.0, 10.0).expand([d]).to_event(1))
        if psi is None:
            psi = pyro.sample("psi", dist.HalfCauchy(1.0).expand([d]).to_event(1))
        with data_plate(n):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([k]).to_event(1))
            loc = (W @ z.unsqueeze(-1)).squeeze(-1) + mu
            pyro.sample("y", dist.Normal(loc, psi.sqrt()).to_event(1))

    @property
    def psi(self):
        return self.kwargs["psi"]

    def _marginal(self, drop):
        keep = [i for i in range(self.event_shape[0]) if i not in drop]
        return FactorAnalysis(W=self.kwargs["W"][keep], mu=self.kwargs["mu"][keep],
                              psi=self.kwargs["psi"][keep])

    def _conditional(self, obs):
        W, mu, a = self._conditional_parts(obs)
        return FactorAnalysis(W=W, mu=mu, psi=self.kwargs["psi"][a])

    @classmethod
    @renamed_keywords(max_iter="max_iters")
    def mle(cls, data, k: int, *, max_iters: int = 2000, tol: float = 1e-9,
            min_psi: float = 1e-8) -> FactorAnalysis:
        """Maximum likelihood by EM (Rubin & Thayer 1982), started from the PPCA fit.

        Parameters
        ----------
        data : array ``[N, d]`` (no NaN)
        k : int, ``1 <= k < d``
        max_iters : int
            ``max_iter`` is its deprecated name.
        tol : float
            Stop when the mean log-likelihood per row changes by less than ``tol`` nats.
        min_psi : float
            Lower bound on the noise variances (Heywood cases), relative to the data
            variance of each coordinate.

        Returns
        -------
        FactorAnalysis
            With the fit record :class:`EMInfo` as attribute ``info``; a
            ``ConvergenceWarning`` is raised if EM stops unconverged.
        """
        y = data_matrix(cls, data, "mle")
        N, d = y.shape
        k = check_int("FactorAnalysis.mle: k", k)
        if k >= d:
            raise ValueError(f"FactorAnalysis.mle: k must be < d = {d}, got {k}")
        mu = y.mean(0)
        r = y - mu
        S = r.T @ r / N
        S = 0.5 * (S + S.T)
        init = PPCA.mle(y, k)
        W = init.kwargs["W"].to(y.dtype)
        floor = min_psi * torch.diagonal(S).clamp_min(torch.finfo(y.dtype).tiny)
        psi = torch.maximum(torch.diagonal(S - W @ W.T), floor)
        eye = torch.eye(k, dtype=y.dtype, device=y.device)
        trace, prev, converged, it = [], None, False, 0

        def mean_loglik(W, psi):
            lr = dist.LowRankMultivariateNormal(torch.zeros_like(mu), W, psi)
            C = W @ W.T + torch.diag(psi)
            # E over the data of log N(y; mu, C) from the sufficient statistic S
            return lr.log_prob(torch.zeros_like(mu)) - 0.5 * torch.trace(torch.linalg.solve(C, S))

        for it in range(1, max_iters + 1):
            Wp = W / psi.unsqueeze(-1)                      # Psi^-1 W
            G = torch.cholesky_inverse(torch.linalg.cholesky(eye + W.T @ Wp))  # cov of z | y
            beta = G @ Wp.T                                 # E[z | y] = beta (y - mu)
            SB = S @ beta.T                                 # [d, k]
            Ezz = G + beta @ SB                             # average E[z z^T]
            W = torch.linalg.solve(Ezz, SB.T).T
            psi = torch.maximum(torch.diagonal(S - W @ SB.T), floor)
            ll = float(mean_loglik(W, psi))
            trace.append(ll)
            if prev is not None and abs(ll - prev) < tol:
                converged = True
                break
            prev = ll
        info = EMInfo(log_likelihood=trace[-1] * N, num_iters=it, converged=converged,
                      trace=tuple(trace))
        warn_unconverged("FactorAnalysis.mle", info)
        model = cls(W=W, mu=mu, psi=psi).to(device=y.device, dtype=y.dtype)
        model.info = info
        return model


def _check_factor_params(model, name):
    """Shapes of ``W`` ``[d, k]`` and ``mu`` ``[d]``; fills ``dim`` and ``k``."""
    W, mu = model.kwargs["W"], model.kwargs["mu"]
    dim, k = model.kwargs["dim"], model.kwargs["k"]
    if W is not None:
        if not torch.is_tensor(W) or W.dim() != 2:
            raise ValueError(f"{name}: W must be a matrix [d, k], got {shape_of(W)}")
        if not bool(torch.isfinite(W).all()):
            raise ValueError(f"{name}: W has non-finite entries")
        if dim not in (None, W.shape[0]) or k not in (None, W.shape[1]):
            raise ValueError(f"{name}: W has shape {list(W.shape)} but dim={dim}, k={k}")
        dim, k = int(W.shape[0]), int(W.shape[1])
    if mu is not None:
        if not torch.is_tensor(mu) or mu.dim() != 1 or (dim is not None and mu.shape[0] != dim):
            raise ValueError(f"{name}: mu must be a vector [{dim if dim else 'd'}], got {shape_of(mu)}")
        dim = int(mu.shape[0])
    if dim is None or k is None:
        raise ValueError(f"{name}: give W, or dim and k (the prior over W needs its shape)")
    set_param(model, "dim", dim)
    set_param(model, "k", k)


def shape_of(x):
    """How a bad argument looks in an error message: its shape, or its repr."""
    return f"shape {list(x.shape)}" if torch.is_tensor(x) else repr(x)

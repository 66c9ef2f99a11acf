"""Gaussian mixture models of vectors: :class:`GaussianMixture` (full covariances).

``z ~ Categorical(weights)``, ``y | z ~ N(means[z], covariances[z])``. Every operation is
exact: ``log p`` (missing entries integrated out), the responsibilities ``p(z | y)``,
marginals (a mixture over the kept coordinates) and conditionals (a mixture again, with
reweighted components); ``mle`` fits by EM. The story keeps ``z`` as a discrete latent
site, which genprog's generic fits sum out by enumeration.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex

from genprog.validation import check_int

from .base import ZooModel, data_plate, deprecated_record, renamed_keywords
from .gaussian import (
    EMInfo,
    check_positive_definite,
    conditional_mean,
    data_matrix,
    gaussian_log_prob,
    keep_float64,
    set_param,
    shape_of,
    split_observed,
    warn_unconverged,
)


class GaussianMixture(ZooModel):
    """A mixture of ``K`` multivariate normals with full covariances.

    Parameters
    ----------
    weights : Tensor ``[K]``, optional
        Mixing weights, non-negative, summing to 1 (prior ``Dirichlet(1)`` when None).
    means : Tensor ``[K, d]``, optional
        Component means (prior ``Normal(0, 10)`` entries).
    covariances : Tensor ``[K, d, d]``, optional
        Component covariances, symmetric positive definite (prior: half-Cauchy(2.5)
        scales times LKJ(1) correlation Cholesky factors, sites ``scales`` and ``corr``).
    k, dim : int, optional
        ``K`` and ``d``; needed only when the parameters that carry them are not given.

    Attributes
    ----------
    info : EMInfo
        Set by :meth:`mle`, the fit record (:class:`~genprog.models.gaussian.EMInfo`):
        ``log_likelihood`` (float, total log-likelihood of the data at the returned
        parameters, nats), ``num_iters`` (int, EM iterations of the best restart), ``converged`` (bool,
        whether the change in mean log-likelihood per row fell below ``tol``), ``trace``
        (tuple of float, mean log-likelihood per row after each iteration).
    em_info : EMInfo
        Deprecated name of ``info`` (the same record; read-only).

    Examples
    --------
    >>> import torch
    >>> gm = GaussianMixture(weights=torch.tensor([0.5, 0.5]),
    ...                      means=torch.tensor([[-2.0], [2.0]]),
    ...                      covariances=torch.ones(2, 1, 1))
    >>> gm.posterior(torch.tensor([2.0])).argmax().item()
    1
    """

    supports_missing = True
    mle_kind = "EM"
    em_info = deprecated_record("em_info")

    def __init__(self, *, weights=None, means=None, covariances=None, k=None, dim=None):
        k = None if k is None else check_int("GaussianMixture: k", k)
        dim = None if dim is None else check_int("GaussianMixture: dim", dim)
        super().__init__(weights=weights, means=means, covariances=covariances, k=k, dim=dim)
        keep_float64(self)
        w, m, c = (self.kwargs[n] for n in ("weights", "means", "covariances"))
        ks, ds = ({k} if k else set()), ({dim} if dim else set())
        if w is not None:
            if not torch.is_tensor(w) or w.dim() != 1:
                raise ValueError(f"GaussianMixture: weights must be a vector [K], got {shape_of(w)}")
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ValueError("GaussianMixture: weights must be finite and non-negative")
            if abs(float(w.sum()) - 1.0) > 1e-5:
                raise ValueError(f"GaussianMixture: weights must sum to 1, got {float(w.sum()):.6g}")
            ks.add(int(w.shape[0]))
        if m is not None:
            if not torch.is_tensor(m) or m.dim() != 2:
                raise ValueError(f"GaussianMixture: means must be [K, d], got {shape_of(m)}")
            if not bool(torch.isfinite(m).all()):
                raise ValueError("GaussianMixture: means have non-finite entries")
            ks.add(int(m.shape[0]))
            ds.add(int(m.shape[1]))
        if c is not None:
            if not torch.is_tensor(c) or c.dim() != 3:
                raise ValueError(f"GaussianMixture: covariances must be [K, d, d], got {shape_of(c)}")
            check_positive_definite("GaussianMixture: covariances", c)
            ks.add(int(c.shape[0]))
            ds.add(int(c.shape[1]))
        if len(ks) > 1 or len(ds) > 1:
            raise ValueError("GaussianMixture: weights, means, covariances, k and dim disagree: "
                             f"K in {sorted(ks)}, d in {sorted(ds)}")
        if not ks or not ds:
            raise ValueError("GaussianMixture: give the parameters, or k and dim for the priors")
        set_param(self, "k", ks.pop())
        set_param(self, "dim", ds.pop())

    @staticmethod
    def story(n=None, weights=None, means=None, covariances=None, k=None, dim=None):
        """``z ~ Categorical(weights)`` (enumerated), ``y ~ N(means[z], covariances[z])``."""
        K, d = int(k), int(dim)
        if weights is None:
            weights = pyro.sample("weights", dist.Dirichlet(torch.ones(K)))
        if means is None:
            means = pyro.sample("means", dist.Normal(0.0, 10.0).expand([K, d]).to_event(2))
        if covariances is None:
            scales = pyro.sample("scales", dist.HalfCauchy(2.5).expand([K, d]).to_event(2))
            if d > 1:
                corr = pyro.sample("corr", dist.LKJCholesky(d, 1.0).expand([K]).to_event(1))
            else:
                corr = torch.ones(K, 1, 1)
            tril = scales.unsqueeze(-1) * corr
            pyro.deterministic("covariances", tril @ tril.transpose(-1, -2))
        else:
            tril = torch.linalg.cholesky(covariances)
        with data_plate(n):
            z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
            pyro.sample("y", dist.MultivariateNormal(Vindex(means)[..., z, :],
                                                     scale_tril=Vindex(tril)[..., z, :, :]))

    @property
    def event_shape(self) -> tuple:
        return (int(self.kwargs["dim"]),)

    # ------------------------------------------------------------------ exact operations
    def _component_log_probs(self, y):
        """``log w_k + log N(y_obs; means_k, covariances_k)``: ``[N, K]`` (NaN = missing)."""
        w, m, c = (self.kwargs[n] for n in ("weights", "means", "covariances"))
        return torch.log(w) + gaussian_log_prob(y.unsqueeze(-2), m, c)

    def _log_prob_rows(self, y):
        return torch.logsumexp(self._component_log_probs(y), dim=-1)

    def posterior(self, y):
        """Responsibilities ``p(z = j | y)`` (NaN entries of ``y`` are missing and
        integrated out).

        Parameters
        ----------
        y : Tensor ``[N, d]`` or ``[d]``

        Returns
        -------
        Tensor ``[N, K]`` (``[K]`` for one row), rows summing to 1.
        """
        self._require_parameters("posterior")
        t, single = self._as_data(y, "posterior")
        lp = self._component_log_probs(t)
        r = torch.softmax(lp, dim=-1)
        return r[0] if single else r

    def predict(self, y) -> torch.Tensor:
        """Most probable component of each row, ``[N]`` (int64)."""
        return self.posterior(y).argmax(-1)

    def impute(self, y) -> torch.Tensor:
        """``y`` ``[N, d]`` (or ``[d]``) with each NaN entry replaced by its conditional
        mean ``E[y_missing | y_observed] = sum_j p(z=j | y_obs) E_j[y_missing | y_obs]``."""
        self._require_parameters("impute")
        t, single = self._as_data(y, "impute")
        r = torch.softmax(self._component_log_probs(t), dim=-1)           # [N, K]
        per = conditional_mean(t.unsqueeze(-2).expand(-1, r.shape[-1], -1),
                               self.kwargs["means"], self.kwargs["covariances"])  # [N, K, d]
        out = (r.unsqueeze(-1) * per).sum(-2)
        out = torch.where(torch.isnan(t), out, t)
        return out[0] if single else out

    def _marginal(self, drop):
        keep = [i for i in range(self.event_shape[0]) if i not in drop]
        c = self.kwargs["covariances"]
        return GaussianMixture(weights=self.kwargs["weights"], means=self.kwargs["means"][:, keep],
                               covariances=c[:, keep][:, :, keep])

    def _conditional(self, obs):
        w, m, c = (self.kwargs[n] for n in ("weights", "means", "covariances"))
        a, b, yb = split_observed(obs, self.event_shape[0], m.device, m.dtype)
        c_bb = c[:, b][:, :, b]
        c_ab = c[:, a][:, :, b]
        chol = torch.linalg.cholesky(c_bb)
        gain = torch.cholesky_solve(c_ab.transpose(-1, -2), chol).transpose(-1, -2)  # [K, a, b]
        means = m[:, a] + (gain @ (yb - m[:, b]).unsqueeze(-1)).squeeze(-1)
        covs = c[:, a][:, :, a] - gain @ c_ab.transpose(-1, -2)
        logw = torch.log(w) + dist.MultivariateNormal(m[:, b], scale_tril=chol).log_prob(yb)
        return GaussianMixture(weights=torch.softmax(logw, -1), means=means,
                               covariances=0.5 * (covs + covs.transpose(-1, -2)))

    # ------------------------------------------------------------------ EM
    @classmethod
    @renamed_keywords(max_iter="max_iters")
    def mle(cls, data, k: int, *, n_init: int = 3, max_iters: int = 500, tol: float = 1e-8,
            reg_covar: float = 1e-6, seed: int = 0) -> GaussianMixture:
        """Maximum likelihood by EM, best of ``n_init`` k-means++ starts.

        Parameters
        ----------
        data : array ``[N, d]`` (no NaN)
        k : int
            Number of components.
        n_init : int
            Restarts; the fit with the highest log-likelihood is returned.
        max_iters : int
            ``max_iter`` is its deprecated name.
        tol : float
            Stop when the mean log-likelihood per row changes by less than ``tol`` nats.
        reg_covar : float
            Added to the covariance diagonals (as scikit-learn does), keeping them
            positive definite.
        seed : int

        Returns
        -------
        GaussianMixture
            With :class:`genprog.models.gaussian.EMInfo` as attribute ``info``; a
            ``ConvergenceWarning`` is raised if the best restart stopped unconverged.
        """
        y = data_matrix(cls, data, "mle")
        k = check_int("GaussianMixture.mle: k", k)
        n_init = check_int("GaussianMixture.mle: n_init", n_init)
        N = y.shape[0]
        if k > N:
            raise ValueError(f"GaussianMixture.mle: k = {k} exceeds the number of rows {N}")
        g = torch.Generator(device=y.device).manual_seed(seed)
        best = None
        for _ in range(n_init):
            params, info = _em(y, kmeans_plus_plus(y, k, g), max_iters, tol, reg_covar)
            if best is None or info.log_likelihood > best[1].log_likelihood:
                best = (params, info)
        (w, m, c), info = best
        warn_unconverged("GaussianMixture.mle", info)
        model = cls(weights=w, means=m, covariances=c).to(device=y.device, dtype=y.dtype)
        model.info = info
        return model


def kmeans_plus_plus(y, k, g):
    """Initial responsibilities ``[N, K]``: k-means++ seeding then 10 Lloyd steps."""
    N = y.shape[0]
    centers = y[torch.randint(N, (1,), generator=g, device=y.device)]
    for _ in range(1, k):
        d2 = torch.cdist(y, centers).min(-1).values ** 2
        p = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / N)
        centers = torch.cat([centers, y[torch.multinomial(p, 1, generator=g)]])
    for _ in range(10):
        lab = torch.cdist(y, centers).argmin(-1)
        onehot = torch.nn.functional.one_hot(lab, k).to(y.dtype)
        counts = onehot.sum(0)
        new = (onehot.T @ y) / counts.clamp_min(1).unsqueeze(-1)
        centers = torch.where(counts.unsqueeze(-1) > 0, new, centers)
    return torch.nn.functional.one_hot(torch.cdist(y, centers).argmin(-1), k).to(y.dtype)


def _m_step(y, r, reg_covar):
    nk = r.sum(0) + 10 * torch.finfo(y.dtype).eps                      # [K]
    w = nk / nk.sum()
    m = (r.T @ y) / nk.unsqueeze(-1)                                  # [K, d]
    diff = y.unsqueeze(1) - m                                         # [N, K, d]
    c = torch.einsum("nk,nki,nkj->kij", r, diff, diff) / nk[:, None, None]
    c = 0.5 * (c + c.transpose(-1, -2)) + reg_covar * torch.eye(y.shape[1], dtype=y.dtype,
                                                                 device=y.device)
    return w, m, c


def _em(y, r, max_iters, tol, reg_covar):
    """EM from responsibilities ``r``; returns ``((w, m, c), EMInfo)``."""
    N = y.shape[0]
    trace, prev, converged, it = [], None, False, 0
    w, m, c = _m_step(y, r, reg_covar)
    for it in range(1, max_iters + 1):
        lp = torch.log(w) + dist.MultivariateNormal(m, covariance_matrix=c).log_prob(y.unsqueeze(1))
        ll = torch.logsumexp(lp, -1)
        mean_ll = float(ll.mean())
        trace.append(mean_ll)
        if prev is not None and abs(mean_ll - prev) < tol:
            converged = True
            break
        prev = mean_ll
        r = torch.exp(lp - ll.unsqueeze(-1))
        w, m, c = _m_step(y, r, reg_covar)
    return (w, m, c), EMInfo(log_likelihood=trace[-1] * N, num_iters=it, converged=converged,
                             trace=tuple(trace))

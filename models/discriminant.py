"""``GaussianDiscriminant``: quadratic / linear discriminant analysis as a generative classifier.

The story: a class ``c ~ Categorical(class_prior)`` (a discrete latent, or observed when
training on labels), then the features ``y | c ~ N(means[c], covariances[c])``; with
``shared=True`` every class has the same covariance (LDA), otherwise each has its own (QDA).

Exact operations: ``log_prob`` (the class summed out: a mixture of Gaussians), with NaN
features integrated out (the marginal Gaussian over the observed dims of each row);
``posterior`` / ``predict_proba`` (Bayes' rule, again exact with missing features);
``marginalize(dims=...)`` and ``condition(dims=...)`` (a Gaussian mixture's marginals and
conditionals are again class-conditional Gaussians, with reweighted class probabilities);
``mle`` in closed form (class frequencies, class means, biased ``1/n`` covariances: per class,
or pooled within-class for ``shared=True``).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex

from genprog.inputs import as_tensor

from .base import GenerativeClassifier

__all__ = ["GaussianDiscriminant"]

LOG_2PI = math.log(2 * math.pi)


class GaussianDiscriminant(GenerativeClassifier):
    """Gaussian class-conditional classifier (QDA, or LDA with ``shared=True``).

    Parameters
    ----------
    class_prior : Tensor ``[K]``, optional
        Class probabilities (non-negative, summing to 1). None: ``Dirichlet(1)`` prior.
    means : Tensor ``[K, d]``, optional
        Class means, in the units of the features. None: ``Normal(0, 10)`` prior.
    covariances : Tensor ``[K, d, d]`` (``[d, d]`` when ``shared``), optional
        Class covariances (units squared, positive definite). None: an LKJ(1) correlation
        times ``HalfCauchy(5)`` scales prior.
    shared : bool
        One covariance for every class (LDA) instead of one per class (QDA).
    n_classes, dim : int, optional
        ``K`` and ``d`` when no parameter gives them.

    Examples
    --------
    >>> import torch
    >>> m = GaussianDiscriminant(class_prior=[0.5, 0.5], means=[[0.0], [2.0]],
    ...                          covariances=[[1.0]], shared=True)
    >>> [round(p, 3) for p in m.predict_proba(torch.tensor([1.0])).tolist()]
    [0.5, 0.5]
    """

    mle_kind = "closed form"
    supports_missing = True

    def __init__(self, *, class_prior=None, means=None, covariances=None, shared: bool = False,
                 n_classes: int | None = None, dim: int | None = None):
        if not isinstance(shared, bool):
            raise TypeError(f"GaussianDiscriminant: shared must be a bool, got {shared!r}")
        super().__init__(class_prior=numeric_or_none(class_prior), means=numeric_or_none(means),
                         covariances=numeric_or_none(covariances), shared=shared, n_classes=n_classes,
                         dim=dim)
        self._validate()

    # ------------------------------------------------------------------ story
    @staticmethod
    def story(n=None, class_prior=None, means=None, covariances=None, shared=False,
              n_classes=None, dim=None):
        """Pyro story: ``c ~ Categorical(class_prior)``, ``y | c ~ N(means[c], cov[c])``."""
        k, d = _sizes(class_prior, means, covariances, shared, n_classes, dim)
        if class_prior is None:
            class_prior = pyro.sample("class_prior", dist.Dirichlet(torch.ones(k)))
        if means is None:
            means = pyro.sample("means", dist.Normal(0.0, 10.0).expand([k, d]).to_event(2))
        if covariances is None:
            shape = [] if shared else [k]
            corr = pyro.sample("corr_cholesky",
                               dist.LKJCholesky(d, 1.0).expand(shape).to_event(len(shape)))
            scales = pyro.sample("scales",
                                 dist.HalfCauchy(5.0).expand(shape + [d]).to_event(len(shape) + 1))
            scale_tril = scales.unsqueeze(-1) * corr
        else:
            scale_tril = torch.linalg.cholesky(covariances)
        plate = pyro.plate("data", n) if n is not None else contextlib.nullcontext()
        with plate:
            c = pyro.sample("c", dist.Categorical(class_prior))
            if not shared:  # one covariance per class; a shared one broadcasts as it is
                scale_tril = Vindex(scale_tril)[..., c, :, :]
            pyro.sample("y", dist.MultivariateNormal(Vindex(means)[..., c, :],
                                                     scale_tril=scale_tril))

    # ------------------------------------------------------------------ parameters
    @property
    def n_classes(self) -> int:
        p = self.params
        return _sizes(p["class_prior"], p["means"], p["covariances"], p["shared"],
                      p["n_classes"], p["dim"])[0]

    @property
    def event_shape(self) -> tuple:
        p = self.params
        return (_sizes(p["class_prior"], p["means"], p["covariances"], p["shared"],
                       p["n_classes"], p["dim"])[1],)

    def missing_parameters(self) -> list[str]:
        return [k for k in ("class_prior", "means", "covariances") if self.params[k] is None]

    def _validate(self) -> None:
        p = self.params
        k, d = _sizes(p["class_prior"], p["means"], p["covariances"], p["shared"],
                      p["n_classes"], p["dim"])
        pi, mu, cov = p["class_prior"], p["means"], p["covariances"]
        if pi is not None:
            if tuple(pi.shape) != (k,):
                raise ValueError(f"GaussianDiscriminant: class_prior must have shape [{k}], "
                                 f"got {list(pi.shape)}")
            if (pi < 0).any() or abs(float(pi.sum()) - 1.0) > 1e-5:
                raise ValueError("GaussianDiscriminant: class_prior must be non-negative and "
                                 f"sum to 1 (sums to {float(pi.sum()):.6g})")
        if mu is not None and tuple(mu.shape) != (k, d):
            raise ValueError(f"GaussianDiscriminant: means must have shape [{k}, {d}], "
                             f"got {list(mu.shape)}")
        if cov is not None:
            want = (d, d) if p["shared"] else (k, d, d)
            if tuple(cov.shape) != want:
                raise ValueError(f"GaussianDiscriminant: covariances must have shape {list(want)} "
                                 f"(shared={p['shared']}), got {list(cov.shape)}")
            if not torch.allclose(cov, cov.transpose(-1, -2), atol=1e-6, rtol=1e-6):
                raise ValueError("GaussianDiscriminant: covariances must be symmetric")
            _, info = torch.linalg.cholesky_ex(cov)
            if (info != 0).any():
                raise ValueError("GaussianDiscriminant: covariances must be positive definite "
                                 "(Cholesky failed)")

    def _covs(self) -> torch.Tensor:
        """Per-class covariances ``[K, d, d]``."""
        cov = self.params["covariances"]
        k, d = self.n_classes, self.event_shape[0]
        return cov.expand(k, d, d) if self.params["shared"] else cov

    def _new(self, **params) -> GaussianDiscriminant:
        m = GaussianDiscriminant(**params)
        return m.to(self.device, self.dtype) if (self.dtype or self.device) else m

    # ------------------------------------------------------------------ exact hooks
    def class_log_likelihood(self, y) -> torch.Tensor:
        """``log p(y | c = k)`` of each row and class, ``[N, K]`` (NaN features integrated
        out: the marginal Gaussian over each row's observed dims).

        Parameters
        ----------
        y : Tensor ``[N, d]`` (or one row ``[d]``)
        """
        self._require_parameters("class_log_likelihood")
        x, _ = self._as_data(y, "class_log_likelihood")
        with self.context():
            return self._class_ll(x)

    def _class_ll(self, x: torch.Tensor) -> torch.Tensor:
        mu, cov = self.params["means"], self._covs()
        obs = ~torch.isnan(x)
        out = x.new_empty(x.shape[0], mu.shape[0])
        full = obs.all(-1)
        if full.any():
            mvn = dist.MultivariateNormal(mu, scale_tril=torch.linalg.cholesky(cov))
            out[full] = mvn.log_prob(x[full].unsqueeze(-2))
        part = ~full
        if part.any():
            # Marginal over the observed dims, vectorized over rows: replace the missing rows
            # and columns of each covariance by the identity and the residual there by 0; the
            # determinant and quadratic form are then those of the observed block.
            o = obs[part].to(x.dtype)                                      # [M, d]
            mask = o.unsqueeze(-1) * o.unsqueeze(-2)                        # [M, d, d]
            eye = torch.diag_embed(1.0 - o)
            cov_o = cov.unsqueeze(0) * mask.unsqueeze(1) + eye.unsqueeze(1)  # [M, K, d, d]
            resid = torch.where(obs[part].unsqueeze(1), x[part].unsqueeze(1) - mu, 0.0)
            chol = torch.linalg.cholesky(cov_o)
            z = torch.linalg.solve_triangular(chol, resid.unsqueeze(-1), upper=False).squeeze(-1)
            logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
            out[part] = -0.5 * ((z ** 2).sum(-1) + logdet + o.sum(-1, keepdim=True) * LOG_2PI)
        return out

    def _joint(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(y, c = k)``, ``[N, K]``."""
        return self._class_ll(x) + torch.log(self.params["class_prior"])

    def _log_prob_rows(self, y: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self._joint(y), dim=-1)

    def _marginal(self, drop: list[int]) -> GaussianDiscriminant:
        keep = [i for i in range(self.event_shape[0]) if i not in drop]
        idx = torch.tensor(keep, device=self.params["means"].device)
        cov = self.params["covariances"]
        cov = cov.index_select(-1, idx).index_select(-2, idx)
        return self._new(class_prior=self.params["class_prior"],
                         means=self.params["means"].index_select(-1, idx), covariances=cov,
                         shared=self.params["shared"])

    def _conditional(self, obs: dict) -> GaussianDiscriminant:
        d = self.event_shape[0]
        mu, cov = self.params["means"], self._covs()
        o_idx = list(obs)
        r_idx = [i for i in range(d) if i not in obs]
        dev = mu.device
        o = torch.tensor(o_idx, device=dev)
        r = torch.tensor(r_idx, device=dev)
        x_o = torch.stack([obs[i] for i in o_idx]).to(device=dev, dtype=mu.dtype)
        row = torch.full((1, d), float("nan"), dtype=mu.dtype, device=dev)
        row[0, o] = x_o
        weights = torch.softmax(self._joint(row)[0], dim=-1)
        s_oo = cov.index_select(-1, o).index_select(-2, o)
        s_ro = cov.index_select(-1, o).index_select(-2, r)
        s_rr = cov.index_select(-1, r).index_select(-2, r)
        gain = torch.linalg.solve(s_oo, s_ro.transpose(-1, -2)).transpose(-1, -2)  # [K, r, o]
        means = mu.index_select(-1, r) + (gain @ (x_o - mu.index_select(-1, o)).unsqueeze(-1)
                                          ).squeeze(-1)
        covs = s_rr - gain @ s_ro.transpose(-1, -2)
        covs = 0.5 * (covs + covs.transpose(-1, -2))
        shared = self.params["shared"]
        return self._new(class_prior=weights, means=means,
                         covariances=covs[0] if shared else covs, shared=shared)

    @classmethod
    def mle(cls, data, labels, *, shared: bool = False, n_classes: int | None = None
            ) -> GaussianDiscriminant:
        """Maximum likelihood from labelled data, in closed form.

        Parameters
        ----------
        data : Tensor ``[N, d]``
            Features (no NaN).
        labels : Tensor ``[N]``
            Integer classes in ``[0, K)``.
        shared : bool
            Pooled within-class covariance (LDA) instead of one per class (QDA).
        n_classes : int, optional
            ``K`` (default: ``max(labels) + 1``); every class needs at least two rows.

        Returns
        -------
        GaussianDiscriminant
            ``class_prior = n_k / N``, ``means`` the class means, ``covariances`` the biased
            (``1 / n_k``) class covariances or, with ``shared``, ``sum_k n_k S_k / N`` (the
            pooled ``1 / N`` within-class scatter). Same device and dtype as ``data``.
        """
        x, y, k = labelled_rows(data, labels, n_classes, "GaussianDiscriminant.mle")
        if torch.isnan(x).any():
            raise ValueError("GaussianDiscriminant.mle: data has NaN entries (not supported)")
        onehot = torch.nn.functional.one_hot(y, k).to(x.dtype)              # [N, K]
        counts = onehot.sum(0)
        if (counts < 2).any():
            raise ValueError(f"GaussianDiscriminant.mle: every class needs at least 2 rows; "
                             f"counts per class {counts.long().tolist()}")
        means = (onehot.T @ x) / counts.unsqueeze(-1)
        resid = x - means[y]
        scatter = torch.einsum("nk,ni,nj->kij", onehot, resid, resid)      # [K, d, d]
        if shared:
            cov = scatter.sum(0) / x.shape[0]
        else:
            cov = scatter / counts.view(-1, 1, 1)
        m = cls(class_prior=counts / x.shape[0], means=means, covariances=cov, shared=shared)
        return m.to(x.device, x.dtype)


def numeric_or_none(value):
    """Nested lists of numbers as a float64 NumPy array (converted to the model's dtype by the
    base class); anything else unchanged."""
    if isinstance(value, (list, tuple)):
        try:
            return np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"expected numbers, got {value!r:.60}") from None
    return value


def _sizes(class_prior, means, covariances, shared, n_classes, dim) -> tuple[int, int]:
    """``(K, d)`` from whichever parameters are given."""
    k = (class_prior.shape[0] if class_prior is not None else
         means.shape[0] if means is not None else
         covariances.shape[0] if covariances is not None and not shared else n_classes)
    d = (means.shape[-1] if means is not None else
         covariances.shape[-1] if covariances is not None else dim)
    if k is None or d is None:
        raise ValueError("GaussianDiscriminant: give n_classes and dim when the parameters "
                         "that fix them (class_prior, means, covariances) are left None")
    return int(k), int(d)


def labelled_rows(data, labels, n_classes, what):
    """Data ``[N, d]`` (floating), labels ``[N]`` (int64) and ``K``, validated."""
    keep = data.dtype if torch.is_tensor(data) and data.is_floating_point() else None
    x = as_tensor(data, dtype=keep, name=f"{what}: data")
    if not torch.is_tensor(x):
        x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if x.dim() != 2:
        raise ValueError(f"{what}: data must be [N, d], got shape {list(x.shape)}")
    y = as_tensor(labels, x.device, name=f"{what}: labels")
    y = torch.as_tensor(y, device=x.device)
    if y.shape != (x.shape[0],):
        raise ValueError(f"{what}: labels must have shape [{x.shape[0]}], got {list(y.shape)}")
    if y.is_floating_point() and (torch.isnan(y).any() or not torch.equal(y, y.round())):
        raise ValueError(f"{what}: labels must be integers")
    y = y.long()
    if (y < 0).any():
        raise ValueError(f"{what}: labels must be non-negative class indices")
    k = int(y.max()) + 1 if n_classes is None else int(n_classes)
    if (y >= k).any():
        raise ValueError(f"{what}: labels must be < n_classes={k}")
    return x, y, k

"""``GaussianCopula``: continuous marginals joined by the dependence of a latent Gaussian.

The story, for ``d`` dims with correlation matrix ``corr [d, d]`` and continuous marginal
distributions ``F_1, ..., F_d``::

    z ~ MultivariateNormal(0, corr),     y_i = F_i^{-1}(Phi(z_i)),

so ``y_i ~ F_i`` and the dependence is that of ``z``. The density (exact, no latent to
integrate: ``z = Phi^{-1}(F(y))`` is a bijection)::

    log p(y) = log N(z; 0, corr) - sum_i log phi(z_i) + sum_i log f_i(y_i).

Marginals are torch/Pyro distributions with a ``cdf`` (``Normal``, ``LogNormal``,
``Gamma``, ``Beta``, ``Exponential``, ``Weibull``, ``Uniform``, ``Laplace``, ``Gumbel``,
...), given as instances (fixed parameters) or as classes (parameters get priors in the
story: ``LogNormal(0, 1.5)`` for positive ones, ``Normal(0, 10)`` for real ones, so
``fit("nuts")`` infers them). Where torch lacks them, the cdf (Beta: regularised
incomplete beta by continued fraction) and the inverse cdf (Gamma, Beta: bisection on the
cdf to machine precision) are computed here. A correlation left ``None`` gets an LKJ(1)
prior.

Operations: exact ``log_prob``; sampling; ``marginalize(dims=...)`` (a copula over the
other dims with the sub-correlation); ``condition(dims={i: y_i})`` — ``z_rest | z_obs``
is Gaussian with mean ``m`` and covariance ``S = D R D``, so ``y_rest`` given ``y_obs`` is
again a Gaussian copula, with correlation ``R`` and the marginals
``G_i(y) = Phi((Phi^{-1}(F_i(y)) - m_i) / D_i)`` (:class:`NormalScoreShift`);
``mle``: each marginal by its own maximum likelihood, then the correlation of the normal
scores (the two-step "inference functions for margins" estimator).

Parameters of the marginals are kept as flat model parameters ``m{i}_{name}`` (e.g.
``m0_concentration``; a conditioned marginal adds ``m{i}_score_shift`` and
``m{i}_score_scale``), so ``to(device)`` moves them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.distributions.transforms import biject_to

from .base import ZooModel, renamed_keywords, sample_rows

__all__ = ["GaussianCopula", "NormalScoreShift", "marginal_cdf", "marginal_icdf"]

_SQRT2 = math.sqrt(2.0)


# ---------------------------------------------------------------------------- cdf / icdf
def _betainc(a, b, x, tol: float = 4e-16, max_iters: int = 300):
    """Regularised incomplete beta ``I_x(a, b)`` (continued fraction, modified Lentz,
    iterated to relative change ``tol``; the symmetry ``I_x(a, b) = 1 - I_{1-x}(b, a)``
    where the fraction converges faster)."""
    a, b, x = torch.broadcast_tensors(a, b, x)
    flip = x > (a + 1) / (a + b + 2)
    val = _betainc_cf(torch.where(flip, b, a), torch.where(flip, a, b),
                      torch.where(flip, 1 - x, x), tol, max_iters)
    out = torch.where(flip, 1 - val, val)
    out = torch.where(x <= 0, torch.zeros_like(out), out)
    return torch.where(x >= 1, torch.ones_like(out), out)


def _betainc_cf(a, b, x, tol=4e-16, max_iters=300):
    """``I_x(a, b)`` by its continued fraction (accurate for ``x < (a + 1) / (a + b + 2)``)."""
    x = x.clamp(1e-300, 1 - 1e-16)
    tiny = 1e-300

    def guard(t):
        return torch.where(t.abs() < tiny, torch.full_like(t, tiny), t)

    c = torch.ones_like(x)
    d = 1 / guard(1 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, max_iters + 1):
        m2 = 2 * m
        delta = torch.ones_like(h)
        for step in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
                     -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1 / guard(1 + step * d)
            c = guard(1 + step / c)
            delta = d * c
            h = h * delta
        if bool(((delta - 1).abs() <= tol).all()):
            break
    log_front = (a * torch.log(x) + b * torch.log1p(-x) - torch.lgamma(a) - torch.lgamma(b)
                 + torch.lgamma(a + b) - torch.log(a))
    return torch.exp(log_front) * h


def marginal_cdf(d, y):
    """``F(y)`` of a univariate distribution ``d`` (torch's ``cdf``; Beta computed here)."""
    if isinstance(d, dist.Beta):
        return _betainc(d.concentration1, d.concentration0, y)
    return d.cdf(y)


def marginal_icdf(d, u, iters: int = 64):
    """``F^{-1}(u)``: torch's ``icdf`` where it has one, else bisection on the cdf in the
    unconstrained space of ``d.support`` (``iters`` halvings of a bracket of width ~1:
    machine precision)."""
    try:
        return d.icdf(u)
    except NotImplementedError:
        pass
    t = biject_to(d.support)
    lo = torch.full_like(u, -1.0)
    hi = torch.full_like(u, 1.0)
    for _ in range(64):  # widen the bracket until it holds every u
        below = marginal_cdf(d, t(lo)) > u
        above = marginal_cdf(d, t(hi)) < u
        if not bool(below.any() or above.any()):
            break
        lo = torch.where(below, 2 * lo, lo)
        hi = torch.where(above, 2 * hi, hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        left = marginal_cdf(d, t(mid)) < u
        lo, hi = torch.where(left, mid, lo), torch.where(left, hi, mid)
    return t(0.5 * (lo + hi))


def _normal_icdf(u):
    return _SQRT2 * torch.special.erfinv(2 * u - 1)


def _normal_scores(d, y):
    """``Phi^{-1}(F(y))``: directly for Normal, LogNormal and :class:`NormalScoreShift`;
    from the lower or the upper tail probability (whichever is smaller, so the upper tail
    keeps its precision) for Gamma and Beta; else from the cdf, clamped to ``(0, 1)``."""
    if isinstance(d, dist.Normal):
        return (y - d.loc) / d.scale
    if isinstance(d, dist.LogNormal):
        return (torch.log(y) - d.loc) / d.scale
    if isinstance(d, NormalScoreShift):
        return (_normal_scores(d.base, y) - d.shift) / d.scale
    tiny = torch.finfo(y.dtype).tiny
    if isinstance(d, (dist.Gamma, dist.Beta)):
        if isinstance(d, dist.Gamma):
            lower = torch.special.gammainc(d.concentration, d.rate * y)
            upper = torch.special.gammaincc(d.concentration, d.rate * y)
        else:
            a, b, x = torch.broadcast_tensors(d.concentration1, d.concentration0, y)
            lower, upper = _betainc(a, b, x), _betainc(b, a, 1 - x)
        z_lo = torch.special.ndtri(lower.clamp_min(tiny))
        z_up = -torch.special.ndtri(upper.clamp_min(tiny))
        return torch.where(lower < 0.5, z_lo, z_up)
    u = marginal_cdf(d, y).clamp(tiny, 1 - torch.finfo(y.dtype).eps / 2)
    return torch.special.ndtri(u)


class NormalScoreShift(TorchDistribution):
    """The distribution of ``F^{-1}(Phi(m + s w))``, ``w ~ N(0, 1)``: cdf
    ``Phi((Phi^{-1}(F(y)) - m) / s)`` — a marginal of a conditioned Gaussian copula.

    Parameters
    ----------
    base : Distribution
        The marginal ``F``.
    shift, scale : Tensor
        ``m`` and ``s > 0`` of the latent normal score.
    """

    arg_constraints: ClassVar[dict] = {"shift": constraints.real, "scale": constraints.positive}
    has_rsample = False

    def __init__(self, base, shift, scale, validate_args=None):
        shift, scale = torch.as_tensor(shift), torch.as_tensor(scale)
        if isinstance(base, NormalScoreShift):  # m1 + s1 (m2 + s2 w): one shift
            base, shift, scale = base.base, base.shift + base.scale * shift, base.scale * scale
        self.base = base
        self.shift, self.scale = torch.broadcast_tensors(shift, scale)
        batch = torch.broadcast_shapes(base.batch_shape, self.shift.shape)
        super().__init__(batch, validate_args=validate_args)

    @constraints.dependent_property
    def support(self):
        return self.base.support

    def cdf(self, y):
        z = _normal_scores(self.base, y)
        return torch.special.ndtr((z - self.shift) / self.scale)

    def icdf(self, u):
        return marginal_icdf(self.base, torch.special.ndtr(self.shift + self.scale * torch.special.ndtri(u)))

    def log_prob(self, y):
        z = _normal_scores(self.base, y)
        w = (z - self.shift) / self.scale
        return self.base.log_prob(y) - 0.5 * w * w - torch.log(self.scale) + 0.5 * z * z

    def sample(self, sample_shape=()):
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            u = torch.rand(shape, dtype=self.shift.dtype, device=self.shift.device)
            return self.icdf(u)

    def expand(self, batch_shape, _instance=None):
        return NormalScoreShift(self.base.expand(batch_shape), self.shift.expand(batch_shape),
                                self.scale.expand(batch_shape))


# ---------------------------------------------------------------------------- marginal specs
@dataclass(frozen=True)
class _MarginalSpec:
    """How to rebuild marginal ``i`` from flat parameters: a distribution class and its
    parameter names (a :class:`NormalScoreShift` wraps a base spec)."""

    family: type
    names: tuple
    base: _MarginalSpec | None = None

    @classmethod
    def of(cls, d, i):
        if isinstance(d, type):
            if not issubclass(d, torch.distributions.Distribution):
                raise TypeError(f"GaussianCopula: marginal {i} must be a distribution or "
                                f"distribution class, got {d!r}")
            names = tuple(d.arg_constraints)
            return cls(d, names), {n: None for n in names}
        if isinstance(d, NormalScoreShift):
            base_spec, base_vals = cls.of(d.base, i)
            return cls(NormalScoreShift, ("score_shift", "score_scale"), base_spec), \
                {**base_vals, "score_shift": d.shift, "score_scale": d.scale}
        if not isinstance(d, torch.distributions.Distribution):
            raise TypeError(f"GaussianCopula: marginal {i} must be a torch/Pyro distribution, got "
                            f"{type(d).__name__}")
        if d.event_shape != () or d.batch_shape != ():
            raise ValueError(f"GaussianCopula: marginal {i} must be univariate with batch shape (), "
                             f"got batch {tuple(d.batch_shape)} event {tuple(d.event_shape)}")
        if d.support.is_discrete:
            raise ValueError(f"GaussianCopula: marginal {i} ({type(d).__name__}) is discrete; the "
                             "copula density here needs continuous marginals")
        names = tuple(n for n in d.arg_constraints if hasattr(d, n))
        return cls(type(d), names), {n: getattr(d, n) for n in names}

    def all_names(self) -> tuple:
        return (self.base.all_names() if self.base else ()) + self.names

    def build(self, values: dict):
        if self.base is not None:
            base = self.base.build(values)
            return NormalScoreShift(base, values["score_shift"], values["score_scale"])
        return self.family(**{n: values[n] for n in self.names})

    def priors(self, prefix, values):
        """Values with priors drawn for those that are None."""
        out = dict(values)
        for n in self.all_names():
            if out[n] is None:
                c = self.family.arg_constraints[n]
                prior = dist.Normal(0.0, 10.0) if c is constraints.real else \
                    dist.TransformedDistribution(dist.Normal(0.0, 1.5), biject_to(c))
                out[n] = pyro.sample(prefix + n, prior)
        return out


def _number(v):
    if isinstance(v, (int, float, list, tuple)) and not isinstance(v, bool):
        return np.asarray(v, dtype=float)
    if torch.is_tensor(v) and v.is_floating_point():
        return v.detach()
    return v


# ---------------------------------------------------------------------------- the model
class GaussianCopula(ZooModel):
    """A Gaussian copula with continuous marginals (see the module docstring).

    Parameters
    ----------
    corr : array [d, d], optional
        Correlation matrix of the latent Gaussian (unit diagonal, positive definite);
        ``None``: LKJ(1) prior.
    marginals : list of d distributions (instances or classes)
        Univariate continuous distributions with a cdf; classes get priors on their
        parameters.
    **marginal_params
        Flat marginal parameters ``m{i}_{name}`` overriding the marginals' (used when the
        model is rebuilt; :meth:`marginal_parameter_names` lists them).

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> from genprog.models.copula import GaussianCopula
    >>> c = GaussianCopula(corr=[[1.0, 0.5], [0.5, 1.0]],
    ...                    marginals=[dist.Gamma(2.0, 1.0), dist.Normal(0.0, 1.0)])
    >>> c.sample(4, seed=0)["y"].shape
    torch.Size([4, 2])
    """

    mle_kind = "two-step (marginal MLEs, then the correlation of the normal scores)"

    def __init__(self, *, corr=None, marginals=None, **marginal_params):
        if marginals is None or len(marginals) < 1:
            raise ValueError("GaussianCopula: marginals (a list of d univariate distributions) "
                             "are required")
        specs, flat = [], {}
        for i, m in enumerate(marginals):
            if isinstance(m, _MarginalSpec):
                spec, vals = m, {n: None for n in m.all_names()}
            else:
                spec, vals = _MarginalSpec.of(m, i)
            specs.append(spec)
            flat.update({f"m{i}_{n}": v for n, v in vals.items()})
        unknown = set(marginal_params) - set(flat)
        if unknown:
            raise TypeError(f"GaussianCopula: unknown parameter(s) {sorted(unknown)}; the marginal "
                            f"parameters are {list(flat)}")
        flat.update(marginal_params)
        flat = {k: _number(v) for k, v in flat.items()}
        super().__init__(corr=_number(corr), marginals=tuple(specs), **flat)
        self._validate()

    def _validate(self):
        d = len(self.kwargs["marginals"])
        r = self.kwargs["corr"]
        if r is not None:
            if not torch.is_tensor(r) or r.shape != (d, d):
                raise ValueError(f"GaussianCopula: corr must be [{d}, {d}] (one row per marginal), "
                                 f"got {list(getattr(r, 'shape', []))}")
            if not torch.isfinite(r).all() or not torch.allclose(r, r.T, atol=1e-10):
                raise ValueError("GaussianCopula: corr must be a finite symmetric matrix")
            if not torch.allclose(r.diagonal(), torch.ones_like(r.diagonal()), atol=1e-8):
                raise ValueError("GaussianCopula: corr must have a unit diagonal (a correlation matrix)")
            if bool(torch.linalg.cholesky_ex(r).info != 0):
                raise ValueError("GaussianCopula: corr is not positive definite")
        for i, spec in enumerate(self.kwargs["marginals"]):
            vals = self._marginal_values(i)
            if any(v is None for v in vals.values()):
                continue
            try:
                spec.build({k: torch.as_tensor(v) for k, v in vals.items()})
            except ValueError as e:
                raise ValueError(f"GaussianCopula: marginal {i} has invalid parameters: {e}") from None

    def _marginal_values(self, i):
        spec = self.kwargs["marginals"][i]
        return {n: self.kwargs[f"m{i}_{n}"] for n in spec.all_names()}

    def marginal_parameter_names(self) -> list[str]:
        """The flat names ``m{i}_{name}`` of the marginals' parameters."""
        return [f"m{i}_{n}" for i, s in enumerate(self.kwargs["marginals"]) for n in s.all_names()]

    @property
    def marginals(self) -> list:
        """The marginal distributions (built from this model's parameters)."""
        self._require_parameters("marginals")
        return [s.build(self._marginal_values(i)) for i, s in enumerate(self.kwargs["marginals"])]

    # ------------------------------------------------------------------ story
    @staticmethod
    def story(n=None, corr=None, marginals=None, **flat):
        d = len(marginals)
        if corr is None:
            lkj = pyro.sample("corr_cholesky", dist.LKJCholesky(d, 1.0))
            chol = lkj
        else:
            chol = torch.linalg.cholesky(corr)
        dists = []
        for i, spec in enumerate(marginals):
            vals = spec.priors(f"m{i}_", {nm: flat[f"m{i}_{nm}"] for nm in spec.all_names()})
            dists.append(spec.build(vals))
        return sample_rows(n, _CopulaDistribution(chol, dists))

    @property
    def event_shape(self) -> tuple:
        return (len(self.kwargs["marginals"]),)

    # ------------------------------------------------------------------ exact operations
    def _log_prob_rows(self, y):
        chol = torch.linalg.cholesky(self.kwargs["corr"])
        return _CopulaDistribution(chol, self.marginals).log_prob(y)

    def _new(self, corr, marginals):
        return type(self)(corr=corr, marginals=marginals).to(self.device, self.dtype)

    def _marginal(self, drop):
        keep = [i for i in range(self.event_shape[0]) if i not in set(drop)]
        ms = self.marginals
        return self._new(self.kwargs["corr"][keep][:, keep], [ms[i] for i in keep])

    def _conditional(self, obs):
        idx = list(obs)
        keep = [i for i in range(self.event_shape[0]) if i not in set(idx)]
        ms = self.marginals
        r = self.kwargs["corr"]
        y_obs = torch.stack([torch.as_tensor(obs[i], dtype=r.dtype, device=r.device) for i in idx])
        for j, i in enumerate(idx):
            if not bool(ms[i].support.check(y_obs[j])):
                raise ValueError(f"condition(dims=...): y[{i}] = {float(y_obs[j])} is outside the "
                                 f"support of marginal {i}")
        z_obs = torch.stack([_normal_scores(ms[i], y_obs[j]) for j, i in enumerate(idx)])
        roo, rko, rkk = r[idx][:, idx], r[keep][:, idx], r[keep][:, keep]
        sol = torch.linalg.solve(roo, torch.cat([z_obs[:, None], rko.T], 1))
        m = rko @ sol[:, 0]
        s = rkk - rko @ sol[:, 1:]
        sd = s.diagonal().sqrt()
        corr_c = s / sd[:, None] / sd[None, :]
        corr_c = 0.5 * (corr_c + corr_c.T)
        corr_c.diagonal().fill_(1.0)
        return self._new(corr_c, [NormalScoreShift(ms[i], m[j], sd[j]) for j, i in enumerate(keep)])

    # ------------------------------------------------------------------ maximum likelihood
    @classmethod
    @renamed_keywords(max_iter="max_iters")
    def mle(cls, y, marginals, *, max_iters: int = 200, dtype=torch.float64):
        """Two-step maximum likelihood: each marginal family by its own MLE (closed form for
        Normal and LogNormal; L-BFGS on the unconstrained parameters from moment-matched
        starting values otherwise), then the correlation of the normal scores
        ``Phi^{-1}(F_i(y_i))`` under the fitted marginals.

        Parameters
        ----------
        y : array [N, d]
        marginals : list of d distribution classes (``dist.Gamma``, ...) or instances (kept
            fixed)
        max_iters : int
            ``max_iter`` is its deprecated name.
            L-BFGS iterations per marginal.

        Returns
        -------
        GaussianCopula
        """
        yt = torch.as_tensor(np.asarray(y, dtype=float), dtype=dtype) if not torch.is_tensor(y) \
            else y.to(dtype)
        if yt.dim() != 2 or yt.shape[0] < 2:
            raise ValueError(f"mle: y must be [N, d] with N >= 2, got {list(yt.shape)}")
        if yt.shape[1] != len(marginals):
            raise ValueError(f"mle: y has {yt.shape[1]} columns but {len(marginals)} marginals were given")
        if not torch.isfinite(yt).all():
            raise ValueError("mle: y has NaN or infinite entries")
        fitted = [(_fit_marginal(m, yt[:, i], i, max_iters) if isinstance(m, type) else m)
                  for i, m in enumerate(marginals)]
        z = torch.stack([_normal_scores(m, yt[:, i]) for i, m in enumerate(fitted)], 1)
        zc = z - z.mean(0)
        cov = zc.T @ zc / z.shape[0]
        sd = cov.diagonal().sqrt()
        corr = cov / sd[:, None] / sd[None, :]
        corr = 0.5 * (corr + corr.T)
        corr.diagonal().fill_(1.0)
        return cls(corr=corr, marginals=fitted).to(dtype=dtype)


def _fit_marginal(family, y, i, max_iters):
    """Maximum likelihood fit of a univariate ``family`` to ``y [N]``."""
    if not issubclass(family, torch.distributions.Distribution):
        raise TypeError(f"mle: marginal {i} must be a distribution class, got {family!r}")
    if family is dist.Normal:
        return dist.Normal(y.mean(), y.std(unbiased=False))
    if family is dist.LogNormal:
        _check_support(y, constraints.positive, family, i)
        ly = y.log()
        return dist.LogNormal(ly.mean(), ly.std(unbiased=False))
    m, v = y.mean(), y.var()
    starts = {
        dist.Gamma: lambda: {"concentration": m * m / v, "rate": m / v},
        dist.Exponential: lambda: {"rate": 1 / m},
        dist.Beta: lambda: {"concentration1": m * (m * (1 - m) / v - 1),
                            "concentration0": (1 - m) * (m * (1 - m) / v - 1)},
    }
    names = list(family.arg_constraints)
    if family in starts:
        init = starts[family]()
        names = list(init)
    else:
        init = {}
    cons = {n: family.arg_constraints[n] for n in names}
    if family in (dist.Gamma, dist.Exponential, dist.Weibull):
        _check_support(y, constraints.positive, family, i)
    if family is dist.Beta:
        _check_support(y, constraints.unit_interval, family, i)
        if not bool((y > 0).all() and (y < 1).all()):
            raise ValueError(f"mle: marginal {i} (Beta) needs data strictly inside (0, 1)")
    raw = {n: (biject_to(c).inv(init[n].clamp_min(1e-6)) if n in init
               else torch.zeros((), dtype=y.dtype, device=y.device)).detach().clone().requires_grad_(True)
           for n, c in cons.items()}
    opt = torch.optim.LBFGS(list(raw.values()), max_iter=max_iters, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        d = family(**{n: biject_to(c)(raw[n]) for n, c in cons.items()})
        loss = -d.log_prob(y).mean()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return family(**{n: biject_to(c)(raw[n]).detach() for n, c in cons.items()})


def _check_support(y, support, family, i):
    if not bool(support.check(y).all()):
        raise ValueError(f"mle: column {i} has values outside the support of {family.__name__}")


class _CopulaDistribution(TorchDistribution):
    """The Gaussian-copula distribution of ``y [*, d]`` given the Cholesky factor of the
    correlation ``[*, d, d]`` and ``d`` marginal distributions."""

    arg_constraints: ClassVar[dict] = {}
    support = constraints.real_vector  # each coordinate checked against its marginal
    has_rsample = False

    def __init__(self, corr_cholesky, marginals, validate_args=None):
        self.corr_cholesky = corr_cholesky
        self.marginals = list(marginals)
        d = len(self.marginals)
        batch = torch.broadcast_shapes(corr_cholesky.shape[:-2],
                                       *[m.batch_shape for m in self.marginals])
        super().__init__(batch, torch.Size([d]), validate_args=False)

    def log_prob(self, y):
        z = torch.stack([_normal_scores(m, y[..., i]) for i, m in enumerate(self.marginals)], -1)
        lf = torch.stack([m.log_prob(y[..., i]) for i, m in enumerate(self.marginals)], -1)
        inside = torch.stack([m.support.check(y[..., i]) for i, m in enumerate(self.marginals)], -1)
        mvn = dist.MultivariateNormal(torch.zeros_like(z), scale_tril=self.corr_cholesky)
        lp = mvn.log_prob(z) - (-0.5 * z * z - 0.5 * math.log(2 * math.pi)).sum(-1) + lf.sum(-1)
        return torch.where(inside.all(-1), lp, torch.full_like(lp, -math.inf))

    def sample(self, sample_shape=()):
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            eps = torch.randn(shape, dtype=self.corr_cholesky.dtype, device=self.corr_cholesky.device)
            z = (self.corr_cholesky @ eps[..., None])[..., 0]
            u = torch.special.ndtr(z)
            return torch.stack([marginal_icdf(m, u[..., i]) for i, m in enumerate(self.marginals)], -1)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        new = _CopulaDistribution.__new__(_CopulaDistribution)
        new.corr_cholesky = self.corr_cholesky.expand(*batch_shape, *self.corr_cholesky.shape[-2:])
        new.marginals = [m.expand(batch_shape) for m in self.marginals]
        TorchDistribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        return new

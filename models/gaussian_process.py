"""``GaussianProcess``: a Gaussian process observed with Gaussian noise at fixed inputs.

The story: a function ``f ~ GP(mean, k)`` with a stationary covariance kernel ``k``
(:class:`RBF`, :class:`Matern32`, :class:`Matern52`, :class:`Periodic`, and sums /
products of them), observed at the inputs ``x [n_points, p]`` with independent noise of
variance ``noise``::

    y = f(x) + eps,        y ~ MultivariateNormal(mean * 1, K(x, x) + noise * I).

``y`` is the vector of values at ``x``: ``event_shape == [n_points]``. A data set
``Y [N, n_points]`` holds ``N`` independent replicates (independent function draws, each
observed at the same inputs); ``N = 1`` is the usual regression setting.

The model may also be the *posterior* process given earlier observations ``y_obs`` at
inputs ``x_obs`` (the noise acting on them too): then ``y`` at ``x`` has the posterior
predictive distribution. This is what :meth:`GaussianProcess.condition` with
``dims={i: value}`` returns, and what :meth:`GaussianProcess.predict` computes.

Hyperparameters live in the model's parameters under flat names (one leaf kernel:
``lengthscale``, ``variance``, ``period``; a composite kernel prefixes each leaf's names
with its kind, e.g. ``rbf_lengthscale``, ``periodic_period``, ``rbf2_variance`` for a second
RBF); :meth:`GaussianProcess.hyperparameter_names` lists them. Hyperparameters left
``None`` get priors on their logarithm in the story (``LogNormal(0, 1)``; noise
``LogNormal(-2, 1)``; the constant mean ``Normal(0, 1)``), so ``fit("map" | "nuts")`` is
a Bayesian fit of them; :meth:`GaussianProcess.mle` maximises the exact log marginal
likelihood by L-BFGS on the log hyperparameters.

Kernel parametrisations follow scikit-learn (``ConstantKernel(v) * RBF(l)`` is
``RBF(lengthscale=l, variance=v)``, ``ExpSineSquared(l, p)`` is ``Periodic``), with
``d = ||x - x'||`` (lengthscale: a scalar, or one per input dim ``[p]`` for ARD):

* ``RBF``: ``v exp(-d^2 / (2 l^2))``
* ``Matern32``: ``v (1 + sqrt(3) d/l) exp(-sqrt(3) d/l)``
* ``Matern52``: ``v (1 + sqrt(5) d/l + 5 d^2/(3 l^2)) exp(-sqrt(5) d/l)``
* ``Periodic``: ``v exp(-2 sin^2(pi d / period) / l^2)``
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from .base import ZooModel, renamed_keywords, sample_rows

__all__ = ["RBF", "GaussianProcess", "Kernel", "Matern32", "Matern52", "Periodic"]


# ---------------------------------------------------------------------------- kernels
class Kernel:
    """A covariance kernel expression: leaf kernels combined by ``+`` and ``*``.

    A kernel object holds the hyperparameter values given at construction (``None``:
    unknown); a :class:`GaussianProcess` copies them into its flat parameters and
    evaluates the kernel from those, so moving the model to a device moves them.
    """

    def __add__(self, other):
        if not isinstance(other, Kernel):
            return NotImplemented
        return Sum(self, other)

    def __mul__(self, other):
        if not isinstance(other, Kernel):
            return NotImplemented
        return Product(self, other)

    # -- flat naming
    def leaves(self) -> list[_Leaf]:
        raise NotImplementedError

    def _prefixes(self) -> list[str]:
        leaves = self.leaves()
        if len(leaves) == 1:
            return [""]
        seen: dict[str, int] = {}
        out = []
        for leaf in leaves:
            seen[leaf.kind] = seen.get(leaf.kind, 0) + 1
            k = seen[leaf.kind]
            out.append(f"{leaf.kind}_" if k == 1 else f"{leaf.kind}{k}_")
        return out

    def hyperparameters(self) -> dict:
        """Flat name -> value given at construction (``None`` if not given)."""
        out = {}
        for prefix, leaf in zip(self._prefixes(), self.leaves()):
            for name in leaf.names:
                out[prefix + name] = getattr(leaf, name)
        return out

    def ard_names(self) -> list[str]:
        """Flat names of the lengthscales with one value per input dim (ARD)."""
        return [prefix + "lengthscale" for prefix, leaf in zip(self._prefixes(), self.leaves())
                if leaf.ard]

    def _strip(self) -> Kernel:
        """The same expression with every value removed (values live in the GP)."""
        raise NotImplementedError

    def with_values(self, values: dict) -> Kernel:
        """The expression with hyperparameter values from the flat ``values``."""
        leaves = iter(zip(self._prefixes(), self.leaves()))
        return self._rebuild(leaves, values)

    def _rebuild(self, leaves, values):
        raise NotImplementedError

    def matrix(self, x1: torch.Tensor, x2: torch.Tensor, values: dict) -> torch.Tensor:
        """The covariance ``k(x1, x2)``: ``x1 [n1, p]``, ``x2 [n2, p]``, flat hyperparameter
        ``values`` (each ``[*batch]``, ARD lengthscales ``[*batch, p]``) -> ``[*batch, n1, n2]``."""
        return self._matrix(x1, x2, values, iter(self._prefixes()))

    def _matrix(self, x1, x2, values, prefixes):
        raise NotImplementedError


def _bin(op):
    @dataclass(frozen=True, eq=False, repr=False)
    class _Binary(Kernel):
        left: Kernel
        right: Kernel

        def leaves(self):
            return self.left.leaves() + self.right.leaves()

        def _strip(self):
            return type(self)(self.left._strip(), self.right._strip())

        def _rebuild(self, leaves, values):
            return type(self)(self.left._rebuild(leaves, values), self.right._rebuild(leaves, values))

        def _matrix(self, x1, x2, values, prefixes):
            return op(self.left._matrix(x1, x2, values, prefixes),
                      self.right._matrix(x1, x2, values, prefixes))

        def __repr__(self):
            sym = "+" if op is torch.add else "*"
            return f"({self.left!r} {sym} {self.right!r})"

    return _Binary


class Sum(_bin(torch.add)):
    """``k1 + k2``."""


class Product(_bin(torch.mul)):
    """``k1 * k2``."""


def _scaled_distance(x1, x2, lengthscale, ard):
    """``||(x1_i - x2_j) / l||``: ``[*batch, n1, n2]`` (gradient-safe at 0)."""
    ls = lengthscale[..., None, :] if ard else lengthscale[..., None, None]
    a, b = x1 / ls, x2 / ls
    sq = (a.unsqueeze(-2) - b.unsqueeze(-3)).pow(2).sum(-1)
    pos = sq > 0
    return torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


class _Leaf(Kernel):
    """A leaf kernel (a frozen dataclass): hyperparameter fields ``names`` and a structural
    flag ``ard`` (one lengthscale per input dim), set from the lengthscale given."""

    kind = ""
    names: tuple = ("lengthscale", "variance")

    def __post_init__(self):
        if self.lengthscale is not None:
            object.__setattr__(self, "ard", bool(np.ndim(_numpy(self.lengthscale)) == 1))

    def leaves(self):
        return [self]

    def _strip(self):
        return replace(self, **{n: None for n in self.names})

    def _rebuild(self, leaves, values):
        prefix, _ = next(leaves)
        return replace(self, **{n: values.get(prefix + n) for n in self.names})

    def _matrix(self, x1, x2, values, prefixes):
        prefix = next(prefixes)
        v = {n: values[prefix + n] for n in self.names}
        return v["variance"][..., None, None] * self._corr(x1, x2, v, self.ard)

    def _corr(self, x1, x2, v, ard):
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{n}={_short(getattr(self, n))}" for n in self.names)
        return f"{type(self).__name__}({args})"


def _numpy(v):
    """A hyperparameter value as a NumPy array (for shapes and display only)."""
    return np.asarray(v.detach().cpu() if torch.is_tensor(v) else v, dtype=float)


def _short(v):
    if v is None:
        return "None"
    a = _numpy(v)
    return f"{float(a):.4g}" if a.ndim == 0 else np.array2string(a, precision=4)


@dataclass(frozen=True, eq=False, repr=False)
class RBF(_Leaf):
    """Squared-exponential kernel ``variance * exp(-d^2 / (2 lengthscale^2))``.

    Parameters
    ----------
    lengthscale : float or array [p], optional
        In the units of ``x``; one per input dim for ARD.
    variance : float, optional
        Signal variance, in the squared units of ``y``.
    ard : bool
        One lengthscale per input dim (automatic relevance determination); set from the
        lengthscale's shape when it is given, so needed only for a lengthscale left
        ``None`` (a prior, or estimated by ``GaussianProcess.mle``).
    """

    lengthscale: object = None
    variance: object = None
    ard: bool = False
    kind = "rbf"

    def _corr(self, x1, x2, v, ard):
        d = _scaled_distance(x1, x2, v["lengthscale"], ard)
        return torch.exp(-0.5 * d * d)


@dataclass(frozen=True, eq=False, repr=False)
class Matern32(_Leaf):
    """Matern kernel with smoothness 3/2: ``variance (1 + sqrt(3) r) exp(-sqrt(3) r)``,
    ``r = d / lengthscale`` (parameters as :class:`RBF`)."""

    lengthscale: object = None
    variance: object = None
    ard: bool = False
    kind = "matern32"

    def _corr(self, x1, x2, v, ard):
        r = math.sqrt(3.0) * _scaled_distance(x1, x2, v["lengthscale"], ard)
        return (1 + r) * torch.exp(-r)


@dataclass(frozen=True, eq=False, repr=False)
class Matern52(_Leaf):
    """Matern kernel with smoothness 5/2: ``variance (1 + sqrt(5) r + 5 r^2 / 3)
    exp(-sqrt(5) r)``, ``r = d / lengthscale`` (parameters as :class:`RBF`)."""

    lengthscale: object = None
    variance: object = None
    ard: bool = False
    kind = "matern52"

    def _corr(self, x1, x2, v, ard):
        r = math.sqrt(5.0) * _scaled_distance(x1, x2, v["lengthscale"], ard)
        return (1 + r + r * r / 3) * torch.exp(-r)


@dataclass(frozen=True, eq=False, repr=False)
class Periodic(_Leaf):
    """Periodic (exp-sine-squared) kernel ``variance exp(-2 sin^2(pi d / period) /
    lengthscale^2)`` (scikit-learn's ``ExpSineSquared``); ``period`` in the units of ``x``,
    ``lengthscale`` a scalar (unitless)."""

    lengthscale: object = None
    period: object = None
    variance: object = None
    ard: bool = False
    names: tuple = ("lengthscale", "period", "variance")
    kind = "periodic"

    def _corr(self, x1, x2, v, ard):
        one = torch.ones_like(v["period"])
        d = _scaled_distance(x1, x2, one, False)
        s = torch.sin(math.pi * d / v["period"][..., None, None])
        return torch.exp(-2 * s * s / v["lengthscale"][..., None, None] ** 2)


# ---------------------------------------------------------------------------- the model
_PRIORS = {"noise": (-2.0, 1.0)}


def _prior_site(name, value, size=None):
    """``value`` or a draw from the default prior of hyperparameter ``name`` (``size``:
    a vector of that many, for ARD lengthscales)."""
    if value is not None:
        return value
    if name == "mean":
        return pyro.sample("mean", dist.Normal(0.0, 1.0))
    loc, scale = _PRIORS.get(name, (0.0, 1.0))
    prior = dist.LogNormal(loc, scale)
    if size is not None:
        prior = prior.expand([size]).to_event(1)
    return pyro.sample(name, prior)


def _gp_loc_cov(x, kernel, values, noise, mean, x_obs=None, y_obs=None):
    """Mean ``[*batch, n]`` and covariance ``[*batch, n, n]`` of ``y`` at ``x``, given
    noisy observations ``y_obs`` at ``x_obs`` if any."""
    n = x.shape[0]
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    noise = torch.as_tensor(noise, dtype=x.dtype, device=x.device)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
    cov = kernel.matrix(x, x, values) + noise[..., None, None] * eye
    loc = mean[..., None].expand(*mean.shape, n)
    if x_obs is not None and x_obs.shape[0] > 0:
        m = x_obs.shape[0]
        koo = kernel.matrix(x_obs, x_obs, values) + noise[..., None, None] * torch.eye(
            m, dtype=x.dtype, device=x.device)
        kxo = kernel.matrix(x, x_obs, values)
        chol = _cholesky(koo, "the covariance of the conditioning points x_obs")
        a = torch.linalg.solve_triangular(chol, kxo.transpose(-1, -2), upper=False)  # [*, m, n]
        r = torch.linalg.solve_triangular(chol, (y_obs - mean[..., None])[..., None], upper=False)
        loc = loc + (a.transpose(-1, -2) @ r)[..., 0]
        cov = cov - a.transpose(-1, -2) @ a
    return loc, cov


def _cholesky(cov, what):
    chol, info = torch.linalg.cholesky_ex(cov)
    if bool((info != 0).any()):
        raise ValueError(f"{what} is not positive definite (check the kernel hyperparameters "
                         "and noise; a noise-free model needs distinct inputs)")
    return chol


class GaussianProcess(ZooModel):
    """A Gaussian process observed with noise at inputs ``x`` (see the module docstring).

    Parameters
    ----------
    x : array [n_points, p] or [n_points]
        Inputs where ``y`` is observed (a 1-d array is one input dim).
    kernel : Kernel, optional
        Covariance kernel expression (default ``RBF()``); its hyperparameter values (or
        ``None`` for a prior) become this model's flat parameters.
    noise : float, optional
        Observation noise variance, in the squared units of ``y`` (``None``: prior).
    mean : float, optional
        Constant prior mean of ``f`` (``None``: prior ``Normal(0, 1)``).
    x_obs, y_obs : arrays [m, p] and [m], optional
        Earlier noisy observations the process is conditioned on (a posterior process).
    **hyperparameters
        Flat hyperparameter values (``lengthscale=``, ``rbf_variance=``, ...), overriding
        the kernel's.

    Examples
    --------
    >>> import torch
    >>> from genprog.models.gaussian_process import GaussianProcess, RBF
    >>> gp = GaussianProcess(x=torch.linspace(0, 1, 5), kernel=RBF(0.5, 1.0), noise=0.1, mean=0.0)
    >>> gp.sample(3, seed=0)["y"].shape
    torch.Size([3, 5])
    """

    mle_kind = "numerical (L-BFGS on log hyperparameters)"

    def __init__(self, *, x=None, kernel=None, noise=None, mean=None, x_obs=None, y_obs=None,
                 **hyperparameters):
        kernel = RBF() if kernel is None else kernel
        if not isinstance(kernel, Kernel):
            raise TypeError(f"GaussianProcess: kernel must be a Kernel (RBF(), Matern32(), ..., "
                            f"sums and products), got {type(kernel).__name__}")
        flat = kernel.hyperparameters()
        unknown = set(hyperparameters) - set(flat)
        if unknown:
            raise TypeError(f"GaussianProcess: unknown hyperparameter(s) {sorted(unknown)} for "
                            f"kernel {kernel!r}; its hyperparameters are {list(flat)}")
        flat.update(hyperparameters)
        x = _as_2d(x, "x")
        if (x_obs is None) != (y_obs is None):
            raise ValueError("GaussianProcess: give both x_obs and y_obs, or neither")
        x_obs = _as_2d(x_obs, "x_obs")
        if x_obs is None and x is not None:  # no earlier observations: empty sets
            x_obs, y_obs = np.zeros((0, np.shape(x)[1])), np.zeros(0)
        flat = {k: _number(v) for k, v in flat.items()}
        noise, mean, y_obs = _number(noise), _number(mean), _number(y_obs)
        super().__init__(x=x, kernel=kernel.with_values(flat)._strip(),
                         noise=noise, mean=mean, x_obs=x_obs, y_obs=y_obs, **flat)
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self):
        p = self.kwargs
        x = p["x"]
        if x is None:
            raise ValueError("GaussianProcess: x (the inputs, [n_points, p]) is required")
        if not torch.is_tensor(x) or x.dim() != 2 or x.shape[0] < 1:
            raise ValueError(f"GaussianProcess: x must be [n_points, p], got shape "
                             f"{list(getattr(x, 'shape', []))}")
        if not torch.isfinite(x).all():
            raise ValueError("GaussianProcess: x has NaN or infinite entries")
        for name in self.hyperparameter_names() + ["noise"]:
            v = p[name]
            if v is None:
                continue
            if not torch.is_tensor(v):
                raise TypeError(f"GaussianProcess: {name} must be a number or array")
            if not bool((v > 0).all()) or not torch.isfinite(v).all():
                raise ValueError(f"GaussianProcess: {name} must be positive and finite, got {v}")
            allowed = {0, 1} if name.endswith("lengthscale") else {0}
            if v.dim() not in allowed or (v.dim() == 1 and v.shape[0] != x.shape[1]):
                raise ValueError(f"GaussianProcess: {name} must be a scalar"
                                 + (f" or [p] = [{x.shape[1]}]" if 1 in allowed else "")
                                 + f", got shape {list(v.shape)}")
        if p["mean"] is not None and p["mean"].dim() != 0:
            raise ValueError("GaussianProcess: mean must be a scalar (a constant mean)")
        if p["x_obs"] is not None:  # empty when there are no earlier observations
            xo, yo = p["x_obs"], p["y_obs"]
            if xo.shape[1] != x.shape[1]:
                raise ValueError(f"GaussianProcess: x_obs has {xo.shape[1]} input dims, x has {x.shape[1]}")
            if not torch.is_tensor(yo) or yo.shape != (xo.shape[0],):
                raise ValueError(f"GaussianProcess: y_obs must be [m] = [{xo.shape[0]}], got "
                                 f"{list(getattr(yo, 'shape', []))}")

    # ------------------------------------------------------------------ story
    @staticmethod
    def story(n=None, x=None, kernel=None, noise=None, mean=None, x_obs=None, y_obs=None,
              **hyper):
        ard = kernel.ard_names()
        values = {k: _prior_site(k, v, x.shape[1] if k in ard else None) for k, v in hyper.items()}
        noise = _prior_site("noise", noise)
        mean = _prior_site("mean", mean)
        loc, cov = _gp_loc_cov(x, kernel, _as_tensors(values, x), noise, mean, x_obs, y_obs)
        return sample_rows(n, dist.MultivariateNormal(loc, covariance_matrix=cov))

    @property
    def event_shape(self) -> tuple:
        return (int(self.kwargs["x"].shape[0]),)

    # ------------------------------------------------------------------ helpers
    @property
    def kernel(self) -> Kernel:
        """The kernel expression with this model's hyperparameter values."""
        return self.kwargs["kernel"].with_values(self.hyperparameters)

    def hyperparameter_names(self) -> list[str]:
        """The flat names of the kernel's hyperparameters."""
        return list(self.kwargs["kernel"].hyperparameters())

    @property
    def hyperparameters(self) -> dict:
        """Flat name -> value (tensor, or None where the story has a prior)."""
        return {k: self.kwargs[k] for k in self.hyperparameter_names()}

    def _values(self):
        return _as_tensors(self.hyperparameters, self.kwargs["x"])

    def _loc_cov(self, x=None):
        p = self.kwargs
        return _gp_loc_cov(p["x"] if x is None else x, p["kernel"], self._values(),
                           p["noise"], p["mean"], p["x_obs"], p["y_obs"])

    def _new(self, **changes):
        return type(self)(**{**self.params, **changes}).to(self.device, self.dtype)

    def _inputs(self, x_new, what):
        x_new = torch.as_tensor(_as_2d(x_new, what), dtype=self.kwargs["x"].dtype,
                                device=self.kwargs["x"].device)
        if x_new.dim() != 2 or x_new.shape[1] != self.kwargs["x"].shape[1]:
            raise ValueError(f"{what} must be [m, {self.kwargs['x'].shape[1]}], got {list(x_new.shape)}")
        return x_new

    def _observed_vector(self, y, what):
        t, single = self._as_data(y, what)
        if not single:
            raise ValueError(f"{what}: y must be one vector [n_points] = {list(self.event_shape)}, "
                             f"got {list(t.shape)}")
        return t[0]

    # ------------------------------------------------------------------ exact operations
    def _log_prob_rows(self, y):
        loc, cov = self._loc_cov()
        chol = _cholesky(cov, "the covariance of y")
        return dist.MultivariateNormal(loc, scale_tril=chol).log_prob(y)

    def _marginal(self, drop):
        keep = [i for i in range(self.event_shape[0]) if i not in set(drop)]
        return self._new(x=self.kwargs["x"][keep])

    def _conditional(self, obs):
        idx = list(obs)
        keep = [i for i in range(self.event_shape[0]) if i not in set(idx)]
        x = self.kwargs["x"]
        vals = torch.stack([torch.as_tensor(obs[i], dtype=x.dtype, device=x.device) for i in idx])
        if not torch.isfinite(vals).all():
            raise ValueError("condition(dims=...): the conditioning values must be finite")
        x_obs, y_obs = x[idx], vals
        x_obs = torch.cat([self.kwargs["x_obs"], x_obs])
        y_obs = torch.cat([self.kwargs["y_obs"], y_obs])
        return self._new(x=x[keep], x_obs=x_obs, y_obs=y_obs)

    def predict(self, x_new, y=None, *, include_noise: bool = False, full_cov: bool = True):
        """Posterior predictive of ``f`` (or of a new noisy ``y``) at ``x_new``.

        Parameters
        ----------
        x_new : array [m, p] or [m]
            New inputs.
        y : array [n_points], optional
            Values observed at this model's inputs ``x`` (``None``: the process as it is,
            the prior or the posterior given ``x_obs, y_obs``).
        include_noise : bool
            Add the noise variance to the covariance (the predictive of a new ``y``).
        full_cov : bool
            Return the covariance ``[m, m]`` (else the variances ``[m]``).

        Returns
        -------
        mean : Tensor [m]
        cov : Tensor [m, m] (or [m] variances)
        """
        self._require_parameters("predict")
        x_new = self._inputs(x_new, "predict: x_new")
        p = self.kwargs
        x_obs, y_obs = p["x_obs"], p["y_obs"]
        if y is not None:
            yv = self._observed_vector(y, "predict")
            x_obs, y_obs = torch.cat([x_obs, p["x"]]), torch.cat([y_obs, yv])
        noise = p["noise"] if include_noise else torch.zeros_like(p["noise"])
        with self.context():
            if include_noise:
                loc, cov = _gp_loc_cov(x_new, p["kernel"], self._values(), noise, p["mean"],
                                       x_obs, y_obs)
            else:  # noise acts on the conditioning points only
                loc, cov = _gp_loc_cov(x_new, p["kernel"], self._values(), p["noise"],
                                       p["mean"], x_obs, y_obs)
                cov = cov - p["noise"] * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        return (loc, cov) if full_cov else (loc, cov.diagonal(dim1=-2, dim2=-1))

    def posterior(self, y):
        """The posterior of the latent function values ``f(x)`` given ``y [n_points]``:
        ``{"mean": [n_points], "cov": [n_points, n_points]}``."""
        mean, cov = self.predict(self.kwargs["x"], y)
        return {"mean": mean, "cov": cov}

    def sample_functions(self, x_new, num: int = 1, y=None, *, include_noise: bool = False,
                         seed: int | None = None, jitter: float = 1e-10):
        """Draws of ``f(x_new)`` (or of noisy ``y`` with ``include_noise``) from the
        (posterior) process: ``[num, m]``. ``jitter`` times the mean prior variance is
        added to the diagonal, since smooth kernels give near-singular covariances."""
        mean, cov = self.predict(x_new, y, include_noise=include_noise)
        scale = cov.diagonal().mean().clamp_min(1e-300)
        cov = cov + jitter * scale * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        chol = _cholesky(cov, "the predictive covariance at x_new")
        gen = None
        if seed is not None:
            gen = torch.Generator(device=cov.device).manual_seed(seed)
        eps = torch.randn(num, cov.shape[0], dtype=cov.dtype, device=cov.device, generator=gen)
        return mean + eps @ chol.transpose(-1, -2)

    # ------------------------------------------------------------------ maximum likelihood
    @classmethod
    @renamed_keywords(max_iter="max_iters")
    def mle(cls, x, y, kernel=None, noise=None, mean=0.0, *, init: dict | None = None,
            max_iters: int = 500, dtype=torch.float64):
        """Maximum likelihood hyperparameters: the exact log marginal likelihood
        ``log N(y; mean, K + noise I)`` maximised by L-BFGS over the logarithms of the
        hyperparameters left ``None`` (values given in ``kernel``, ``noise`` or ``mean``
        stay fixed; ``mean=None`` estimates the constant mean).

        Parameters
        ----------
        x : array [n_points, p] or [n_points]
        y : array [n_points] or [N, n_points] (N replicates at the same inputs)
        kernel : Kernel, optional
            Default ``RBF()``.
        noise, mean : float or None
        init : dict, optional
            Starting values by flat name (default: lengthscales the median pairwise
            distance, variances ``var(y)``, noise ``var(y) / 10``, period a quarter of the
            input range, mean ``mean(y)``).
        max_iters : int
            ``max_iter`` is its deprecated name.
            L-BFGS iterations.

        Returns
        -------
        GaussianProcess
            With the fitted values (``dtype`` floating point).
        """
        kernel = RBF() if kernel is None else kernel
        if not isinstance(kernel, Kernel):
            raise TypeError(f"mle: kernel must be a Kernel, got {type(kernel).__name__}")
        xt = torch.as_tensor(np.asarray(_as_2d(x, "x"), dtype=float), dtype=dtype) \
            if not torch.is_tensor(x) else _as_2d(x, "x").to(dtype)
        yt = torch.as_tensor(np.asarray(y, dtype=float), dtype=dtype) if not torch.is_tensor(y) \
            else y.to(dtype)
        if yt.dim() == 1:
            yt = yt[None]
        if yt.dim() != 2 or yt.shape[1] != xt.shape[0]:
            raise ValueError(f"mle: y must be [n_points] or [N, n_points] with n_points = "
                             f"{xt.shape[0]}, got {list(yt.shape)}")
        if not torch.isfinite(yt).all():
            raise ValueError("mle: y has NaN or infinite entries")
        init = dict(init or {})
        flat = kernel.hyperparameters()
        unknown = set(init) - set(flat) - {"noise", "mean"}
        if unknown:
            raise TypeError(f"mle: unknown init name(s) {sorted(unknown)}; names: "
                            f"{list(flat) + ['noise', 'mean']}")
        vy = float(yt.var()) if yt.numel() > 1 else 1.0
        vy = vy if vy > 0 else 1.0
        dist_med = float(torch.pdist(xt).median()) if xt.shape[0] > 1 else 1.0
        span = float((xt.max(0).values - xt.min(0).values).max()) or 1.0

        ard = kernel.ard_names()
        kinds = {pre + n: leaf.kind for pre, leaf in zip(kernel._prefixes(), kernel.leaves())
                 for n in leaf.names}

        def default(name):
            if name in ard:
                return [max(float(d), 1e-3) for d in xt.std(0)]
            if name.endswith("lengthscale"):
                return 1.0 if kinds.get(name) == "periodic" else max(dist_med, 1e-3)
            if name.endswith("period"):
                return span / 4
            return vy

        free, fixed = {}, {}
        for name, v in {**flat, "noise": noise}.items():
            if v is None:
                start = init.get(name, vy / 10 if name == "noise" else default(name))
                free[name] = torch.log(torch.as_tensor(start, dtype=dtype, device=xt.device)).clone()
            else:
                fixed[name] = v.to(xt.device, dtype) if torch.is_tensor(v) else \
                    torch.as_tensor(np.asarray(v, dtype=float), dtype=dtype, device=xt.device)
        fit_mean = mean is None
        yt = yt.to(xt.device)
        mu0 = torch.tensor(float(init.get("mean", yt.mean())) if fit_mean else float(mean),
                           dtype=dtype, device=xt.device)
        params = [t.requires_grad_(True) for t in free.values()]
        mu = mu0.clone().requires_grad_(fit_mean)
        if fit_mean:
            params.append(mu)
        structure = kernel._strip()

        def objective():
            vals = {**fixed, **{k: t.clamp(-30, 30).exp() for k, t in free.items()}}
            noise_v = vals.pop("noise")
            loc, cov = _gp_loc_cov(xt, structure, vals, noise_v, mu)
            chol, info = torch.linalg.cholesky_ex(cov)
            if bool(info != 0):
                return None
            return dist.MultivariateNormal(loc, scale_tril=chol).log_prob(yt).sum()

        if params:
            opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iters, history_size=20,
                                    tolerance_grad=1e-9, tolerance_change=1e-12,
                                    line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                ll = objective()
                loss = (-ll) if ll is not None and torch.isfinite(ll) else \
                    sum(p.sum() for p in params) * 0 + 1e30
                loss.backward()
                return loss

            opt.step(closure)
        with torch.no_grad():
            values = {**fixed, **{k: t.clamp(-30, 30).exp() for k, t in free.items()}}
        noise_v = values.pop("noise")
        fitted = structure.with_values({k: v.detach() for k, v in values.items()})
        return cls(x=xt, kernel=fitted, noise=noise_v.detach(), mean=mu.detach()).to(dtype=dtype)


def _number(v):
    """Python numbers and lists as float64 NumPy arrays (full precision in the raw inputs,
    converted to the model's dtype by ``Model``); tensors and arrays unchanged."""
    if isinstance(v, (int, float, list, tuple)) and not isinstance(v, bool):
        return np.asarray(v, dtype=float)
    return v


def _as_tensors(values, x):
    """Hyperparameter values as tensors of ``x``'s dtype/device."""
    return {k: torch.as_tensor(v, dtype=x.dtype, device=x.device) for k, v in values.items()}


def _as_2d(x, what):
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        x = np.asarray(x, dtype=float)
    nd = x.dim() if torch.is_tensor(x) else np.ndim(x)
    if nd == 1:
        return x.reshape(-1, 1)
    if nd != 2:
        raise ValueError(f"GaussianProcess: {what} must be [n, p] or [n], got {nd} dims")
    return x

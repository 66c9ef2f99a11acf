"""Normalizing flows: ``y = T(u)``, ``u ~ N(0, I_d)``, with ``T`` a composition of
invertible transforms from :mod:`pyro.distributions.transforms` (or any
``torch.distributions.Transform`` with a log-determinant).

``log p(y) = log N(T^{-1}(y); 0, I) - log |det dT/du|`` is exact, and so is sampling.
Marginals and conditionals of a subset of coordinates have no closed form; they are
estimated by inference on the exact joint (AIS for ``log p`` of a subset, NUTS for the
conditional), see :func:`genprog.models.base.conditional_by_inference`.

A flow's networks are trained by maximum likelihood (:meth:`Flow.mle`: Adam on the
transforms' parameters, minibatches, stopping on a plateau of the held-in loss).

Shapes: ``d`` (``dim``) is the dimension of ``y``; data are ``[N, d]``.
"""

from __future__ import annotations

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch.distributions import constraints

from genprog.optim import minimize
from genprog.rng import seeded
from genprog.validation import check_int

from .base import (
    EstimatedMarginal,
    ZooModel,
    conditional_by_inference,
    renamed_keywords,
    sample_rows,
    training_record,
)

KINDS = ("affine_coupling", "spline_coupling", "affine_autoregressive", "spline_autoregressive")


class SinhTransform(T.Transform):
    """``y = sinh(x)``, a bijection of the real line (with affine maps it gives
    Johnson's S_U family)."""

    domain = constraints.real
    codomain = constraints.real
    bijective = True
    sign = +1

    def __eq__(self, other):
        return isinstance(other, SinhTransform)

    def _call(self, x):
        return torch.sinh(x)

    def _inverse(self, y):
        return torch.asinh(y)

    def log_abs_det_jacobian(self, x, y):
        return torch.log(torch.cosh(x))


def _modules(transforms) -> list[torch.nn.Module]:
    return [t for t in transforms if isinstance(t, torch.nn.Module)]


def build_transforms(dim: int, kind: str = "spline_coupling", layers: int = 4,
                     hidden: int = 32, count_bins: int = 8, bound: float = 5.0) -> list:
    """A stack of ``layers`` trainable transforms of ``kind`` over ``dim`` coordinates,
    with fixed permutations in between (so every coordinate is transformed), ending
    with a learned elementwise affine map.

    ``kind``: ``"affine_coupling"`` (RealNVP), ``"spline_coupling"`` (neural spline
    flow), ``"affine_autoregressive"`` (MAF/IAF-style), ``"spline_autoregressive"``.
    Coupling transforms need ``dim >= 2``.
    """
    if kind not in KINDS:
        raise ValueError(f"Flow: unknown kind {kind!r}; choose from {KINDS}")
    dim = check_int("Flow: dim", dim)
    layers = check_int("Flow: layers", layers)
    if "coupling" in kind and dim < 2:
        raise ValueError("Flow: coupling transforms need dim >= 2; use an autoregressive kind")
    out: list = []
    g = torch.Generator().manual_seed(0)
    for i in range(layers):
        if kind == "affine_coupling":
            split = dim // 2
            out.append(T.affine_coupling(dim, hidden_dims=[hidden, hidden], split_dim=split))
        elif kind == "spline_coupling":
            out.append(T.spline_coupling(dim, hidden_dims=[hidden, hidden], count_bins=count_bins,
                                         bound=bound))
        elif kind == "affine_autoregressive":
            out.append(T.affine_autoregressive(dim, hidden_dims=[hidden, hidden]))
        else:
            out.append(T.spline_autoregressive(dim, hidden_dims=[hidden, hidden],
                                               count_bins=count_bins, bound=bound))
        if dim > 1 and i < layers - 1:
            out.append(T.Permute(torch.randperm(dim, generator=g)))
    out.append(T.AffineTransform(torch.zeros(dim), torch.ones(dim), event_dim=1))
    return out


class Flow(ZooModel):
    """A normalizing flow over ``R^d``.

    Parameters
    ----------
    transforms : list of Transform
        Applied in order to ``u ~ N(0, I_d)``; each must map ``R^d`` to ``R^d`` (event
        dim 1, or elementwise). Networks inside them keep their own parameters.
    dim : int
        ``d``.

    Attributes
    ----------
    info : dict
        The training record, set by :meth:`mle`: ``loss_trace`` (list of float, the
        minibatch loss at every Adam step), ``num_steps`` (int, steps taken),
        ``converged`` (bool, whether the plateau rule fired before ``max_iters``).

    Examples
    --------
    >>> import torch, pyro.distributions.transforms as T
    >>> from genprog.models.flow import Flow
    >>> f = Flow(transforms=[T.AffineTransform(torch.tensor([1.0]), torch.tensor([2.0]))], dim=1)
    >>> round(float(f.log_prob(y=torch.tensor([1.0]))), 4)   # N(1, 2^2) at its mean
    -1.6121
    """

    mle_kind = "maximum likelihood (Adam)"

    def __init__(self, *, transforms, dim: int):
        dim = check_int("Flow: dim", dim)
        transforms = list(transforms)
        for i, t in enumerate(transforms):
            if not isinstance(t, torch.distributions.Transform):
                raise TypeError(f"Flow: transforms[{i}] is a {type(t).__name__}, not a Transform")
        super().__init__(transforms=transforms, dim=dim)

    @staticmethod
    def story(n=None, transforms=(), dim=1):
        zeros = torch.zeros(dim)
        base = dist.Normal(zeros, torch.ones(dim)).to_event(1)
        d = dist.TransformedDistribution(base, list(transforms))
        return sample_rows(n, d)

    @property
    def transforms(self) -> list:
        return self.kwargs["transforms"]

    def distribution(self) -> dist.TransformedDistribution:
        """The flow as a Pyro distribution over ``[d]`` (on the model's device/dtype)."""
        dim = self.kwargs["dim"]
        dtype = self.dtype or torch.get_default_dtype()
        base = dist.Normal(torch.zeros(dim, device=self.device, dtype=dtype),
                           torch.ones(dim, device=self.device, dtype=dtype)).to_event(1)
        return dist.TransformedDistribution(base, self.transforms)

    def to(self, device=None, dtype=None) -> Flow:
        """Also moves the transforms' networks and tensors."""
        for m in _modules(self.transforms):
            m.to(device=device, dtype=dtype)
        for t in self.transforms:
            if isinstance(t, T.AffineTransform):
                for attr in ("loc", "scale"):
                    v = getattr(t, attr)
                    if torch.is_tensor(v):
                        setattr(t, attr, v.to(device=device, dtype=dtype or v.dtype))
        return super().to(device, dtype)

    def _log_prob_rows(self, y: torch.Tensor) -> torch.Tensor:
        return self.distribution().log_prob(y)

    def _conditional_estimate(self, obs):
        return conditional_by_inference(self, obs)

    def _marginal_estimate(self, drop):
        return EstimatedMarginal(self, drop)

    def base_point(self, y) -> torch.Tensor:
        """``u = T^{-1}(y)`` ``[N, d]``: the latent (base) coordinates of data rows."""
        y, _ = self._as_data(y, "base_point")
        u = y
        for t in reversed(self.transforms):
            u = t.inv(u)
        return u

    # ------------------------------------------------------------------ training
    @classmethod
    @renamed_keywords(max_steps="max_iters")
    def mle(cls, y, *, kind: str = "spline_coupling", layers: int = 4, hidden: int = 32,
            count_bins: int = 8, transforms=None, max_iters: int = 5000, batch_size: int = 256,
            learning_rate: float = 5e-3, window: int = 100, seed: int = 0,
            progress: bool | None = None) -> Flow:
        """Train a flow by maximum likelihood on ``y [N, d]``.

        The data are standardised first (the final affine transform undoes it), then the
        mean negative log-likelihood of minibatches is minimised by Adam. Every
        ``window`` steps the mean loss of the window is compared with the previous one;
        when the change is within noise the learning rate is cut by 5x, and after two
        cuts training stops. Reaching ``max_iters`` first raises a
        :class:`~genprog.errors.ConvergenceWarning`. ``info`` on the result holds the loss
        trace, the number of steps and whether it converged (see :class:`Flow`).
        ``max_steps`` is the deprecated name of ``max_iters``.
        """
        y = torch.as_tensor(y, dtype=torch.get_default_dtype())
        if y.dim() != 2:
            raise ValueError(f"Flow.mle: y must be [N, d], got shape {list(y.shape)}")
        if not torch.isfinite(y).all():
            raise ValueError("Flow.mle: y has NaN or infinite entries")
        n, dim = y.shape
        if transforms is None:
            with seeded(seed):
                transforms = build_transforms(dim, kind, layers, hidden, count_bins)
        # standardise: the last affine transform maps the unit-scale flow to the data scale
        loc, scale = y.mean(0), y.std(0).clamp_min(1e-8)
        last = transforms[-1]
        if isinstance(last, T.AffineTransform):
            last.loc, last.scale = loc, scale
        flow = cls(transforms=transforms, dim=dim)
        params = [p for m in _modules(transforms) for p in m.parameters()]
        if not params:
            raise ValueError("Flow.mle: the transforms have no trainable parameters")
        opt = torch.optim.Adam(params, lr=learning_rate)
        g = torch.Generator().manual_seed(seed)

        def loss_fn(step):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
            return -flow.distribution().log_prob(y[idx]).mean()

        result = minimize(loss_fn, opt, max_iters=max_iters, window=window, what="Flow.mle",
                          progress=progress)
        flow.info = training_record(result)
        return flow

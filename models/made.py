"""A neural autoregressive model of binary vectors: MADE (Germain et al., 2015).

``p(y) = prod_i Bernoulli(y_i; sigmoid(f_i(y_<i)))`` in a fixed ordering, with all
conditionals computed in one pass of a masked MLP. So ``log p`` is exact; sampling is
exact (one pass per coordinate); the marginal of a *prefix* of the ordering is exact
(the product of its conditionals), and so is conditioning on a prefix (sample the rest
ancestrally). Marginals of, and conditioning on, any other subset are estimated by
sequential importance sampling: the proposal samples the unobserved coordinates from
their model conditionals and clamps the observed ones, with weight
``prod_{i observed} p(y_i | y_<i)`` — unbiased for ``p(y_observed)``, with a standard error,
and exact (zero variance) when the observed set is a prefix.

Shapes: ``d`` (``dim``) coordinates; data ``[N, d]`` of 0/1 floats.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints

from genprog.estimate import Estimate
from genprog.monte_carlo import log_mean_exp
from genprog.optim import minimize
from genprog.rng import seeded
from genprog.validation import check_int

from .base import ZooModel, renamed_keywords, sample_rows, training_record


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 ``mask [out, in]``."""

    def __init__(self, n_in: int, n_out: int, mask: torch.Tensor):
        super().__init__(n_in, n_out)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x):
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


class MADENet(nn.Module):
    """Masked MLP mapping ``y [..., d]`` to the logits ``[..., d]`` of each coordinate's
    conditional given the coordinates before it in ``order`` (a permutation of
    ``range(d)``; default the natural order).

    Parameters
    ----------
    dim : int
    hidden : list of int
        Hidden layer widths.
    order : sequence of int, optional
    seed : int
        Seed for the hidden units' connectivity degrees.
    """

    def __init__(self, dim: int, hidden=(128,), order=None, seed: int = 0):
        super().__init__()
        dim = check_int("MADENet: dim", dim)
        order = torch.arange(dim) if order is None else torch.as_tensor(order, dtype=torch.long)
        if sorted(order.tolist()) != list(range(dim)):
            raise ValueError(f"MADENet: order must be a permutation of range({dim}), got {order.tolist()}")
        self.dim = dim
        self.register_buffer("order", order)
        # degree of input coordinate j = its position in the ordering (1..d)
        degree_in = torch.empty(dim, dtype=torch.long)
        degree_in[order] = torch.arange(1, dim + 1)
        g = torch.Generator().manual_seed(seed)
        layers, prev = [], degree_in
        for width in hidden:
            low = int(prev.min()) if dim > 1 else 1
            deg = torch.randint(min(low, dim - 1) if dim > 1 else 1, max(dim, 2), (width,), generator=g)
            mask = (deg.unsqueeze(1) >= prev.unsqueeze(0))
            layers += [MaskedLinear(len(prev), width, mask), nn.ReLU()]
            prev = deg
        out_mask = degree_in.unsqueeze(1) > prev.unsqueeze(0)
        layers.append(MaskedLinear(len(prev), dim, out_mask))
        self.net = nn.Sequential(*layers)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


class _AutoregressiveBernoulli(dist.TorchDistribution):
    """The distribution of ``y [d]`` defined by a :class:`MADENet`."""

    arg_constraints: dict = {}
    support = constraints.independent(constraints.boolean, 1)
    has_enumerate_support = False

    def __init__(self, net: MADENet, batch_shape=torch.Size()):
        self.net = net
        super().__init__(torch.Size(batch_shape), torch.Size([net.dim]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return _AutoregressiveBernoulli(self.net, batch_shape)

    def log_prob(self, value):
        logits = self.net(value)
        return -nn.functional.binary_cross_entropy_with_logits(
            logits, value, reduction="none").sum(-1)

    def sample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        p = next(self.net.parameters())
        y = torch.zeros(shape, dtype=p.dtype, device=p.device)
        with torch.no_grad():
            for i in self.net.order.tolist():
                probs = torch.sigmoid(self.net(y)[..., i])
                y[..., i] = torch.bernoulli(probs)
        return y


class MADE(ZooModel):
    """A MADE autoregressive model over binary vectors ``y [d]``.

    Parameters
    ----------
    net : MADENet
        Its masked network (trained by :meth:`mle`).

    Attributes
    ----------
    info : dict
        The training record, set by :meth:`mle`: ``loss_trace`` (list of float, the
        minibatch loss at every Adam step), ``num_steps`` (int, steps taken),
        ``converged`` (bool, whether the plateau rule fired before ``max_iters``).
    """

    mle_kind = "maximum likelihood (Adam)"

    def __init__(self, *, net: MADENet):
        if not isinstance(net, MADENet):
            raise TypeError(f"MADE: net must be a MADENet, got {type(net).__name__}")
        super().__init__(net=net)

    @staticmethod
    def story(n=None, net=None):
        d = _AutoregressiveBernoulli(net)
        return sample_rows(n, d)

    @property
    def net(self) -> MADENet:
        return self.kwargs["net"]

    @property
    def event_shape(self) -> tuple:
        return (self.net.dim,)

    def to(self, device=None, dtype=None) -> MADE:
        self.net.to(device=device, dtype=dtype)
        return super().to(device, dtype)

    def _check_binary(self, y, what: str, allow_nan: bool = False) -> torch.Tensor:
        """``y`` as ``[N, d]`` 0/1 floats (NaN = missing where ``allow_nan``)."""
        t = torch.as_tensor(y, dtype=next(self.net.parameters()).dtype)
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2 or t.shape[-1] != self.net.dim:
            raise ValueError(f"{what}: y must have shape [{self.net.dim}] or [N, {self.net.dim}]; "
                             f"got {list(torch.as_tensor(y).shape)}")
        nan = torch.isnan(t)
        if nan.any() and not allow_nan:
            raise ValueError(f"{what}: y has NaN entries")
        if not bool((nan | (t == 0) | (t == 1)).all()):
            raise ValueError(f"{what}: y must hold 0/1 values")
        return t

    def _log_prob_rows(self, y: torch.Tensor) -> torch.Tensor:
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("log_prob: y must hold 0/1 values")
        return _AutoregressiveBernoulli(self.net).log_prob(y.to(next(self.net.parameters()).dtype))

    def conditionals(self, y) -> torch.Tensor:
        """``p(y_i = 1 | y_<i)`` for every coordinate, ``[N, d]``."""
        y = self._check_binary(y, "conditionals")
        return torch.sigmoid(self.net(y))

    # ------------------------------------------------------------------ subsets
    def _sis(self, y_obs: torch.Tensor, observed: torch.Tensor, num_samples: int, generator):
        """Sequential importance sampling with the observed coordinates clamped.

        Returns the completed samples ``[S, d]`` and their log weights ``[S]``
        (``log prod_{i observed} p(y_i | y_<i)``)."""
        p = next(self.net.parameters())
        y = torch.zeros(num_samples, self.net.dim, dtype=p.dtype, device=p.device)
        logw = torch.zeros(num_samples, dtype=p.dtype, device=p.device)
        with torch.no_grad():
            for i in self.net.order.tolist():
                logits = self.net(y)[:, i]
                if bool(observed[i]):
                    v = y_obs[i].to(p.dtype)
                    y[:, i] = v
                    logw = logw - nn.functional.binary_cross_entropy_with_logits(
                        logits, v.expand_as(logits), reduction="none")
                else:
                    y[:, i] = torch.bernoulli(torch.sigmoid(logits), generator=generator)
        return y, logw

    def marginal_log_prob(self, y, num_samples: int = 1000, seed: int = 0) -> Estimate:
        """``log p(y_observed)`` for one row ``y [d]`` whose NaN entries are integrated out:
        exact when the observed coordinates form a prefix of the ordering, otherwise a
        sequential importance sampling estimate with a delta-method standard error."""
        y = self._check_binary(y, "marginal_log_prob", allow_nan=True)
        if y.shape[0] != 1:
            raise ValueError("marginal_log_prob: give one row y [d]")
        y = y[0]
        observed = ~torch.isnan(y)
        pos = observed[self.net.order]
        is_prefix = not bool((pos[1:] & ~pos[:-1]).any())
        g = torch.Generator(device=y.device).manual_seed(seed)
        s = 1 if is_prefix else num_samples
        _, logw = self._sis(torch.nan_to_num(y), observed, s, g)
        value, stderr, ess = map(float, log_mean_exp(logw))
        if is_prefix:
            return Estimate(value, 0.0, "exact", details={"source": "prefix of the ordering"})
        return Estimate(value, stderr, "sis", num_samples=s, num_evaluations=s * self.net.dim,
                        details={"ess": ess})

    def complete(self, y, n: int = 100, num_samples: int = 2000, seed: int = 0) -> torch.Tensor:
        """Draws ``[n, d]`` from ``p(y_missing | y_observed)`` for one row ``y [d]`` with NaN
        entries missing: exact ancestral sampling when the observed coordinates are a
        prefix, otherwise sampling-importance-resampling from ``num_samples`` particles."""
        y = self._check_binary(y, "complete", allow_nan=True)
        if y.shape[0] != 1:
            raise ValueError("complete: give one row y [d]")
        y = y[0]
        observed = ~torch.isnan(y)
        g = torch.Generator(device=y.device).manual_seed(seed)
        pos = observed[self.net.order]
        if not bool((pos[1:] & ~pos[:-1]).any()):
            draws, _ = self._sis(torch.nan_to_num(y), observed, n, g)
            return draws
        draws, logw = self._sis(torch.nan_to_num(y), observed, num_samples, g)
        idx = torch.multinomial(torch.softmax(logw, 0), n, replacement=True, generator=g)
        return draws[idx]

    def _marginal_estimate(self, drop):
        return _MADESubset(self, {}, drop)

    def _conditional_estimate(self, obs):
        return _MADESubset(self, obs, [])

    # ------------------------------------------------------------------ training
    @classmethod
    @renamed_keywords(max_steps="max_iters")
    def mle(cls, y, *, hidden=(128,), order=None, max_iters: int = 3000, batch_size: int = 128,
            learning_rate: float = 1e-3, weight_decay: float = 0.0, window: int = 100,
            seed: int = 0, progress: bool | None = None) -> MADE:
        """Train by maximum likelihood on binary data ``y [N, d]`` (Adam on minibatches;
        the learning rate is cut by 5x when the windowed mean loss stops improving beyond
        noise, and training stops after two cuts; a :class:`ConvergenceWarning` if
        ``max_iters`` comes first). ``info`` holds the loss trace (see :class:`MADE`).
        ``max_steps`` is the deprecated name of ``max_iters``."""
        y = torch.as_tensor(y, dtype=torch.get_default_dtype())
        if y.dim() != 2:
            raise ValueError(f"MADE.mle: y must be [N, d], got shape {list(y.shape)}")
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("MADE.mle: y must hold 0/1 values (no NaN)")
        n, d = y.shape
        with seeded(seed):
            net = MADENet(d, hidden, order, seed)
        opt = torch.optim.Adam(net.parameters(), lr=learning_rate, weight_decay=weight_decay)
        g = torch.Generator().manual_seed(seed)
        model = _AutoregressiveBernoulli(net)

        def loss_fn(step):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
            return -model.log_prob(y[idx]).mean()

        result = minimize(loss_fn, opt, max_iters=max_iters, window=window, what="MADE.mle",
                          progress=progress)
        out = cls(net=net)
        out.info = training_record(result)
        return out


class _MADESubset:
    """A MADE restricted to a subset: the marginal of the kept coordinates
    (``drop`` integrated out) or the conditional given ``obs`` — ``log_prob`` /
    ``log_normalizer`` as :class:`genprog.Estimate` (exact for prefixes), ``sample`` by
    :meth:`MADE.complete`."""

    def __init__(self, made: MADE, obs: dict, drop: list):
        self.made, self.obs, self.drop = made, dict(obs), list(drop)
        d = made.net.dim
        self.keep = [i for i in range(d) if i not in self.drop and i not in self.obs]

    def _row(self, values=None):
        row = torch.full((self.made.net.dim,), float("nan"))
        for i, v in self.obs.items():
            row[i] = float(v)
        if values is not None:
            values = torch.as_tensor(values, dtype=row.dtype).reshape(-1)
            if values.shape[0] != len(self.keep):
                raise ValueError(f"log_prob: y must have {len(self.keep)} entries (dims {self.keep})")
            row[self.keep] = values
        return row

    def log_prob(self, y, num_samples: int = 1000, seed: int = 0) -> Estimate:
        """``log p(y_keep)`` (marginal) for one row over the kept dims."""
        return self.made.marginal_log_prob(self._row(y), num_samples, seed)

    def log_normalizer(self, num_samples: int = 1000, seed: int = 0) -> Estimate:
        """``log p(y_observed)`` of the conditioning values."""
        return self.made.marginal_log_prob(self._row(), num_samples, seed)

    def sample(self, n: int = 1, seed: int = 0) -> dict:
        """``{"y": [n, len(keep)]}``: draws of the kept dims given ``obs``."""
        draws = self.made.complete(self._row(), n=n, seed=seed)
        return {"y": draws[:, self.keep]}


def binarized_digits(threshold: float = 8.0):
    """scikit-learn's bundled 8x8 digits (offline), binarized: ``(X [1797, 64], labels)``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data > threshold, dtype=torch.get_default_dtype())
    return x, torch.tensor(data.target)

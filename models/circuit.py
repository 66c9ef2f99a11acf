"""``ProbabilisticCircuit``: a small probabilistic circuit (sum-product network) as a zoo model.

A circuit is a DAG of nodes: leaves (:class:`GaussianLeaf`, :class:`BernoulliLeaf`,
:class:`CategoricalLeaf`, each over one variable), :class:`Product` nodes over children with
disjoint scopes (decomposable) and :class:`Sum` nodes mixing children over the same scope
(smooth). Both properties are checked by the constructors, so every circuit built from these
nodes is valid: it is a normalised density, and any marginal is one bottom-up pass with the
leaves of the integrated variables set to 1.

The story (ancestral sampling): every sum node picks a child, ``z_i ~ Categorical(w_i)``
(discrete latents ``"z_0"``, ``"z_1"``, ... in topological order); the chosen children form
an induced tree whose leaves cover every variable exactly once, and ``y[v]`` is drawn from
the leaf over ``v`` in that tree. ``y`` is the vector of all ``D`` variables (category
indices and 0/1 values stored as floats).

Exact operations: ``log_prob`` (NaN entries marginalised), ``marginalize(dims=...)``,
``condition(dims=...)`` (sum weights reweighted by the evidence), and ``mle`` by EM with the
structure fixed (sum weights and leaf parameters; missing entries handled exactly in the
E-step).
"""

from __future__ import annotations

import contextlib
from typing import ClassVar

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from genprog.inputs import as_tensor
from genprog.validation import check_int

from .base import ZooModel

__all__ = [
    "BernoulliLeaf",
    "CategoricalLeaf",
    "GaussianLeaf",
    "ProbabilisticCircuit",
    "Product",
    "Sum",
]


def _param(value, name: str) -> torch.Tensor:
    """A floating tensor (Python numbers and NumPy arrays become float64)."""
    if value is None:
        raise ValueError(f"{name} is required")
    if torch.is_tensor(value):
        return value if value.is_floating_point() else value.to(torch.float64)
    try:
        return torch.as_tensor(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be numbers, got {value!r:.60}") from None


class Node:
    """A circuit node; ``scope`` is the frozenset of variable indices it is a density over."""

    scope: frozenset
    children: tuple = ()


class _Leaf(Node):
    def __init__(self, variable: int):
        self.variable = check_int(f"{type(self).__name__}: variable (an index)", variable,
                                  minimum=0)
        self.scope = frozenset({self.variable})

    def distribution(self, device, dtype) -> dist.Distribution:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, v: torch.Tensor) -> None:
        """Raise ValueError when observed values ``v`` lie outside the leaf's support."""

    def with_variable(self, variable: int) -> _Leaf:
        raise NotImplementedError  # pragma: no cover - abstract


class GaussianLeaf(_Leaf):
    """Normal density over one variable.

    Parameters
    ----------
    variable : int
        Index of the variable in ``y``.
    loc, scale : float
        Mean and standard deviation (the variable's units; ``scale > 0``).
    """

    def __init__(self, variable: int, loc, scale):
        super().__init__(variable)
        self.loc, self.scale = _param(loc, "GaussianLeaf: loc"), _param(scale, "GaussianLeaf: scale")
        if self.loc.shape != () or self.scale.shape != ():
            raise ValueError("GaussianLeaf: loc and scale must be scalars")
        if not float(self.scale) > 0:
            raise ValueError(f"GaussianLeaf: scale must be positive, got {float(self.scale)}")

    def distribution(self, device, dtype):
        return dist.Normal(self.loc.to(device, dtype), self.scale.to(device, dtype))

    def with_variable(self, variable):
        return GaussianLeaf(variable, self.loc, self.scale)

    def __repr__(self):
        return f"GaussianLeaf({self.variable}, loc={float(self.loc):.4g}, scale={float(self.scale):.4g})"


class BernoulliLeaf(_Leaf):
    """Bernoulli over one 0/1 variable with ``p = P(y[variable] = 1)``."""

    def __init__(self, variable: int, p):
        super().__init__(variable)
        self.p = _param(p, "BernoulliLeaf: p")
        if self.p.shape != () or not 0.0 <= float(self.p) <= 1.0:
            raise ValueError(f"BernoulliLeaf: p must be a scalar in [0, 1], got {self.p.tolist()}")

    def distribution(self, device, dtype):
        return dist.Bernoulli(probs=self.p.to(device, dtype))

    def check(self, v):
        if ((v != 0) & (v != 1)).any():
            raise ValueError(f"BernoulliLeaf over variable {self.variable}: values must be 0 or 1")

    def with_variable(self, variable):
        return BernoulliLeaf(variable, self.p)

    def __repr__(self):
        return f"BernoulliLeaf({self.variable}, p={float(self.p):.4g})"


class CategoricalLeaf(_Leaf):
    """Categorical over one variable taking values ``0 .. m-1`` with probabilities ``probs``."""

    def __init__(self, variable: int, probs):
        super().__init__(variable)
        self.probs = _param(probs, "CategoricalLeaf: probs")
        if self.probs.dim() != 1 or (self.probs < 0).any() or abs(float(self.probs.sum()) - 1) > 1e-6:
            raise ValueError("CategoricalLeaf: probs must be a vector of non-negative numbers "
                             "summing to 1")

    def distribution(self, device, dtype):
        return dist.Categorical(probs=self.probs.to(device, dtype))

    def check(self, v):
        if not torch.equal(v, v.round()) or (v < 0).any() or (v >= self.probs.shape[0]).any():
            raise ValueError(f"CategoricalLeaf over variable {self.variable}: values must be "
                             f"integers in [0, {self.probs.shape[0]})")

    def with_variable(self, variable):
        return CategoricalLeaf(variable, self.probs)

    def __repr__(self):
        return f"CategoricalLeaf({self.variable}, probs={[round(p, 4) for p in self.probs.tolist()]})"


class Product(Node):
    """Product of children over disjoint scopes (decomposable)."""

    def __init__(self, children):
        children = tuple(children)
        if not children or not all(isinstance(c, Node) for c in children):
            raise TypeError("Product: children must be a non-empty sequence of circuit nodes")
        seen: set = set()
        for c in children:
            if seen & c.scope:
                raise ValueError(f"Product: children scopes overlap on variables "
                                 f"{sorted(seen & c.scope)} (a product must be decomposable: "
                                 "disjoint scopes)")
            seen |= c.scope
        self.children = children
        self.scope = frozenset(seen)

    def __repr__(self):
        return f"Product(scope={sorted(self.scope)}, {len(self.children)} children)"


class Sum(Node):
    """Mixture of children over the same scope (smooth), with weights summing to 1.

    ``weights=None`` leaves them to a ``Dirichlet(1)`` prior (the Bayesian route); exact
    operations need them given.
    """

    def __init__(self, children, weights=None):
        children = tuple(children)
        if not children or not all(isinstance(c, Node) for c in children):
            raise TypeError("Sum: children must be a non-empty sequence of circuit nodes")
        scope = children[0].scope
        for c in children[1:]:
            if c.scope != scope:
                raise ValueError(f"Sum: children must have the same scope (a sum must be smooth); "
                                 f"got {sorted(scope)} and {sorted(c.scope)}")
        self.children, self.scope = children, scope
        if weights is not None:
            weights = _param(weights, "Sum: weights")
            if weights.shape != (len(children),):
                raise ValueError(f"Sum: weights must have shape [{len(children)}], "
                                 f"got {list(weights.shape)}")
            if (weights < 0).any() or abs(float(weights.sum()) - 1) > 1e-6:
                raise ValueError(f"Sum: weights must be non-negative and sum to 1, got "
                                 f"{weights.tolist()}")
        self.weights = weights

    def __repr__(self):
        return f"Sum(scope={sorted(self.scope)}, {len(self.children)} children)"


def topological(root: Node) -> list[Node]:
    """The distinct nodes under ``root``, children before parents (root last)."""
    order, seen = [], set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in reversed(node.children) if id(c) not in seen)
    # a node reached twice before finishing could be appended once only; keep first finish
    uniq, ids = [], set()
    for n in order:
        if id(n) not in ids:
            ids.add(id(n))
            uniq.append(n)
    return uniq


class ProbabilisticCircuit(ZooModel):
    """A smooth, decomposable probabilistic circuit over ``y = (y_0, ..., y_{D-1})``.

    Parameters
    ----------
    root : Node
        The root node; its scope must be ``{0, ..., D-1}``.

    Examples
    --------
    >>> import torch
    >>> pc = ProbabilisticCircuit(root=Sum([
    ...     Product([BernoulliLeaf(0, 0.9), BernoulliLeaf(1, 0.9)]),
    ...     Product([BernoulliLeaf(0, 0.1), BernoulliLeaf(1, 0.1)])], weights=[0.5, 0.5]))
    >>> round(float(pc.log_prob(y=torch.tensor([1.0, float("nan")])).exp()), 3)
    0.5
    """

    mle_kind = "EM"
    supports_missing = True

    def __init__(self, *, root: Node = None):
        if not isinstance(root, Node):
            raise TypeError(f"ProbabilisticCircuit: root must be a circuit node (Sum, Product or a "
                            f"leaf), got {type(root).__name__}")
        d = len(root.scope)
        if root.scope != frozenset(range(d)):
            raise ValueError(f"ProbabilisticCircuit: the root's scope must be the variables "
                             f"0..{d - 1}; got {sorted(root.scope)}")
        super().__init__(root=root)

    @property
    def root(self) -> Node:
        return self.params["root"]

    @property
    def event_shape(self) -> tuple:
        return (len(self.root.scope),)

    def missing_parameters(self) -> list[str]:
        n = sum(1 for node in topological(self.root) if isinstance(node, Sum) and node.weights is None)
        return [f"weights of {n} sum node(s)"] if n else []

    def _dtype(self):
        return self.dtype or torch.get_default_dtype()

    def _new(self, root: Node) -> ProbabilisticCircuit:
        m = ProbabilisticCircuit(root=root)
        return m.to(self.device, self.dtype) if (self.dtype or self.device) else m

    # ------------------------------------------------------------------ story
    @staticmethod
    def story(n=None, root=None):
        """Pyro story: a child choice ``z_i`` at every sum node, then ``y`` from the leaves of
        the induced tree."""
        order = topological(root)
        sums = [node for node in order if isinstance(node, Sum)]
        choices = {}
        weights = []
        for i, node in enumerate(sums):
            w = node.weights
            if w is None:
                w = pyro.sample(f"weights_{i}", dist.Dirichlet(torch.ones(len(node.children))))
            else:
                w = w.to(torch.empty(()).device, torch.get_default_dtype())
            weights.append(w)
        plate = pyro.plate("data", n) if n is not None else contextlib.nullcontext()
        with plate:
            for i, (node, w) in enumerate(zip(sums, weights)):
                choices[id(node)] = pyro.sample(f"z_{i}", dist.Categorical(w))
            pyro.sample("y", _InducedTree(order, choices))

    # ------------------------------------------------------------------ exact hooks
    def _node_values(self, x: torch.Tensor, log_w=None, leaf_values=None) -> dict:
        """``log`` value of every node on every row, ``{id(node): [N]}`` (NaN = leaf set to 1).

        ``log_w`` (``{id(sum): [k]}``) and ``leaf_values`` (``{id(leaf): [N]}``) override the
        weights and leaf terms (used by EM to read flows off gradients).
        """
        dev, dt = x.device, x.dtype
        vals: dict = {}
        for node in topological(self.root):
            if isinstance(node, _Leaf):
                if leaf_values is not None:
                    vals[id(node)] = leaf_values[id(node)]
                    continue
                v = x[:, node.variable]
                obs = ~torch.isnan(v)
                node.check(v[obs])
                filled = torch.where(obs, v, torch.zeros((), dtype=dt, device=dev))
                lp = node.distribution(dev, dt).log_prob(filled)
                vals[id(node)] = torch.where(obs, lp, 0.0)
            elif isinstance(node, Product):
                vals[id(node)] = torch.stack([vals[id(c)] for c in node.children]).sum(0)
            else:
                lw = (log_w[id(node)] if log_w is not None
                      else torch.log(node.weights.to(dev, dt)))
                kids = torch.stack([vals[id(c)] for c in node.children], dim=-1)
                vals[id(node)] = torch.logsumexp(kids + lw, dim=-1)
        return vals

    def _log_prob_rows(self, y: torch.Tensor) -> torch.Tensor:
        return self._node_values(y)[id(self.root)]

    def _reduce(self, removed: set, values: dict | None) -> Node:
        """The circuit over the variables not in ``removed`` (renumbered in order): nodes
        whose scope is all removed become the constant 1; with ``values`` (log node values
        under evidence on ``removed``) sum weights are reweighted to ``w_j S_j(e) / S(e)``,
        giving the conditional circuit, without them the marginal one."""
        d = self.event_shape[0]
        rest = [v for v in range(d) if v not in removed]
        renumber = {v: i for i, v in enumerate(rest)}
        memo: dict = {}
        for node in topological(self.root):
            if not (node.scope - removed):
                memo[id(node)] = None
            elif isinstance(node, _Leaf):
                memo[id(node)] = node.with_variable(renumber[node.variable])
            elif isinstance(node, Product):
                kids = [memo[id(c)] for c in node.children if memo[id(c)] is not None]
                memo[id(node)] = kids[0] if len(kids) == 1 else Product(kids)
            else:
                kids = [memo[id(c)] for c in node.children]
                w = node.weights.to(torch.float64)
                if values is not None:
                    lw = torch.log(w) + torch.stack([values[id(c)][0].to(w.device, torch.float64)
                                                     for c in node.children])
                    w = torch.softmax(lw, 0) if torch.isfinite(lw.max()) else w
                memo[id(node)] = Sum(kids, w / w.sum())
        return memo[id(self.root)]

    def _marginal(self, drop: list[int]) -> ProbabilisticCircuit:
        return self._new(self._reduce(set(drop), None))

    def _conditional(self, obs: dict) -> ProbabilisticCircuit:
        d = self.event_shape[0]
        row = torch.full((1, d), float("nan"), dtype=self._dtype(), device=self.device)
        for v, value in obs.items():
            row[0, v] = value
        with self.context():
            values = self._node_values(row)
        if not torch.isfinite(values[id(self.root)][0]):
            raise ValueError("condition(dims=...): the observed values have probability 0")
        return self._new(self._reduce(set(obs), values))

    def conditional_log_prob(self, y, given) -> torch.Tensor:
        """``log p(y_rest | y_given)`` row by row, ``[N]``: ``y`` ``[N, D]`` holds the values
        of every variable involved (NaN elsewhere, marginalised); ``given`` lists the
        evidence dims. Equal to ``log p(y) - log p(y_given)``."""
        self._require_parameters("conditional_log_prob")
        x, single = self._as_data(y, "conditional_log_prob")
        ev = self._check_dims(list(given), "conditional_log_prob")
        with self.context():
            e = torch.full_like(x, float("nan"))
            e[:, ev] = x[:, ev]
            out = self._log_prob_rows(x) - self._log_prob_rows(e)
        return out[0] if single else out

    @classmethod
    def mle(cls, data, *, root: Node, iters: int = 100, tol: float = 1e-8,
            min_scale: float = 1e-3) -> ProbabilisticCircuit:
        """Maximum likelihood by EM with the structure of ``root`` fixed.

        Every sum node's weights and every leaf's parameters are updated; the expected
        counts of the E-step are the circuit's flows, read off the gradient of the total
        log-likelihood with respect to the log weights and leaf terms. Missing (NaN) entries
        are integrated out in the E-step (a leaf's expected sufficient statistics under its
        current parameters).

        Parameters
        ----------
        data : Tensor ``[N, D]``
        root : Node
            The starting circuit (weights and leaf parameters are the initial values; sum
            weights left None start uniform).
        iters : int
            Maximum number of EM iterations.
        tol : float
            Stop when the mean log-likelihood per row improves by less than ``tol``.
        min_scale : float
            Lower bound on Gaussian leaf scales (the variable's units).

        Returns
        -------
        ProbabilisticCircuit
            The fitted circuit, with ``em_trace`` (mean log-likelihood per row before each
            iteration's M-step; non-decreasing) attached.
        """
        keep = data.dtype if torch.is_tensor(data) and data.is_floating_point() else None
        x = as_tensor(data, dtype=keep, name="ProbabilisticCircuit.mle: data")
        x = torch.as_tensor(x)
        if not x.is_floating_point():
            x = x.to(torch.get_default_dtype())
        model = cls(root=_copy_circuit(root, uniform=True))
        if x.dim() != 2 or x.shape[1] != model.event_shape[0]:
            raise ValueError(f"ProbabilisticCircuit.mle: data must be [N, {model.event_shape[0]}], "
                             f"got {list(x.shape)}")
        iters = check_int("ProbabilisticCircuit.mle: iters", iters)
        trace = []
        dev, dt = x.device, x.dtype
        nodes = topological(model.root)
        sums = [nd for nd in nodes if isinstance(nd, Sum)]
        leaves = [nd for nd in nodes if isinstance(nd, _Leaf)]
        for _ in range(iters):
            base = model._node_values(x)
            log_w = {id(s): torch.log(s.weights.to(dev, dt)).requires_grad_() for s in sums}
            leaf_vals = {id(lf): base[id(lf)].detach().requires_grad_() for lf in leaves}
            with torch.enable_grad():
                ll = model._node_values(x, log_w, leaf_vals)[id(model.root)]
                grads = torch.autograd.grad(ll.sum(), list(log_w.values()) + list(leaf_vals.values()),
                                            allow_unused=True)
            trace.append(float(ll.detach().mean()))
            g_w, g_leaf = grads[:len(sums)], grads[len(sums):]
            for s, g in zip(sums, g_w):
                if g is not None and float(g.sum()) > 0:
                    s.weights = (g / g.sum()).detach()
            for lf, r in zip(leaves, g_leaf):
                if r is not None:
                    _leaf_m_step(lf, x[:, lf.variable], r.detach(), min_scale)
            if len(trace) > 1 and abs(trace[-1] - trace[-2]) < tol:
                break
        fitted = cls(root=_copy_circuit(model.root)).to(x.device, x.dtype)
        fitted.em_trace = trace
        return fitted


def _leaf_m_step(leaf: _Leaf, v: torch.Tensor, r: torch.Tensor, min_scale: float) -> None:
    """Weighted maximum likelihood of ``leaf`` with responsibilities ``r`` ``[N]``; missing
    values contribute the leaf's current expected statistics (exact EM)."""
    total = r.sum()
    if not float(total) > 0:
        return
    obs = ~torch.isnan(v)
    if isinstance(leaf, GaussianLeaf):
        mu, sd = leaf.loc.to(v), leaf.scale.to(v)
        ex = torch.where(obs, v, mu)
        ex2 = torch.where(obs, v * v, mu * mu + sd * sd)
        mean = (r * ex).sum() / total
        var = (r * ex2).sum() / total - mean * mean
        leaf.loc = mean
        leaf.scale = var.clamp_min(min_scale ** 2).sqrt()
    elif isinstance(leaf, BernoulliLeaf):
        leaf.p = (r * torch.where(obs, v, leaf.p.to(v))).sum() / total
    else:
        probs = leaf.probs.to(v)
        m = probs.shape[0]
        hot = torch.nn.functional.one_hot(torch.where(obs, v, 0.0).long(), m).to(v)
        ex = torch.where(obs.unsqueeze(-1), hot, probs)
        leaf.probs = (r.unsqueeze(-1) * ex).sum(0) / total


def _copy_circuit(root: Node, uniform: bool = False) -> Node:
    """A structural copy of ``root`` with fresh nodes (DAG sharing kept); ``uniform`` gives
    sums without weights uniform ones."""
    memo: dict = {}
    for node in topological(root):
        if isinstance(node, GaussianLeaf):
            new = GaussianLeaf(node.variable, node.loc.clone(), node.scale.clone())
        elif isinstance(node, BernoulliLeaf):
            new = BernoulliLeaf(node.variable, node.p.clone())
        elif isinstance(node, CategoricalLeaf):
            new = CategoricalLeaf(node.variable, node.probs.clone())
        elif isinstance(node, Product):
            new = Product([memo[id(c)] for c in node.children])
        else:
            w = node.weights
            if w is None and uniform:
                w = torch.full((len(node.children),), 1.0 / len(node.children), dtype=torch.float64)
            new = Sum([memo[id(c)] for c in node.children], None if w is None else w.clone())
        memo[id(node)] = new
    return memo[id(root)]


class _InducedTree(dist.TorchDistribution):
    """``y`` given the child chosen at every sum node: independent draws from the leaves of
    the induced tree (each variable is covered by exactly one of them)."""

    arg_constraints: ClassVar[dict] = {}
    support = dist.constraints.independent(dist.constraints.real, 1)

    def __init__(self, order, choices, batch_shape=None):
        self.order, self.choices = order, choices
        if batch_shape is None:
            batch_shape = torch.broadcast_shapes(*[c.shape for c in choices.values()]) \
                if choices else torch.Size()
        d = len(order[-1].scope)
        super().__init__(torch.Size(batch_shape), torch.Size([d]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return _InducedTree(self.order, self.choices, batch_shape)

    def _reached(self) -> dict:
        """``{id(leaf): bool mask}`` of the leaves in the induced tree (broadcastable)."""
        reached = {id(self.order[-1]): torch.ones((), dtype=torch.bool)}
        for node in reversed(self.order):
            r = reached.get(id(node))
            if r is None or isinstance(node, _Leaf):
                continue
            for j, c in enumerate(node.children):
                rc = r & (self.choices[id(node)] == j) if isinstance(node, Sum) else r
                reached[id(c)] = reached[id(c)] | rc if id(c) in reached else rc
        return {id(nd): reached.get(id(nd), torch.zeros((), dtype=torch.bool))
                for nd in self.order if isinstance(nd, _Leaf)}

    def _leaves(self):
        return [nd for nd in self.order if isinstance(nd, _Leaf)]

    def sample(self, sample_shape=()):
        shape = torch.Size(sample_shape) + self.batch_shape
        dt = torch.get_default_dtype()
        dev = (next(iter(self.choices.values())).device if self.choices
               else torch.empty(()).device)
        out = torch.zeros(shape + self.event_shape, dtype=dt, device=dev)
        for leaf, mask in zip(self._leaves(), self._reached().values()):
            draw = leaf.distribution(dev, dt).sample(shape).to(dt)
            mask = mask.to(device=out.device).expand(shape)
            out[..., leaf.variable] = torch.where(mask, draw, out[..., leaf.variable])
        return out

    def log_prob(self, value):
        dt = value.dtype
        total = torch.zeros((), dtype=dt, device=value.device)
        for leaf, mask in zip(self._leaves(), self._reached().values()):
            v = value[..., leaf.variable]
            obs = ~torch.isnan(v)
            lp = leaf.distribution(value.device, dt).log_prob(torch.where(obs, v, 0.0))
            total = total + torch.where(mask.to(value.device) & obs, lp, 0.0)
        return total.expand(torch.broadcast_shapes(total.shape, self.batch_shape))

"""``NaiveBayes``: a class label and features that are independent given the class, each
feature with its own leaf family (Gaussian, Bernoulli, categorical or Poisson).

The story: ``c ~ Categorical(class_prior)`` (a discrete latent, or observed when training
on labels), then each feature ``y[j] | c`` independently from its family with the class's
parameters. ``y`` is the feature vector ``[d]`` (mixed types stored as floats: 0/1 for
Bernoulli, category indices for categorical, counts for Poisson).

Parameters are grouped by family, in the order the features of that family appear in
``features``: ``mean``/``var`` ``[K, d_gauss]``, ``p`` ``[K, d_bern]``, ``probs``
``[K, d_cat, M]`` (feature ``j`` uses its first ``categories[j]`` entries; the rest are 0)
and ``rate`` ``[K, d_pois]``.

Exact operations: ``log_prob`` (class summed out; a NaN feature drops out of the product),
``posterior`` / ``predict_proba`` (Bayes' rule, exact with missing features),
``marginalize(dims=...)`` (drop features), ``condition(dims=...)`` (the class prior becomes
``p(c | observed features)``, the other features keep their leaves) and ``mle`` in closed form
from labelled data (NaN entries skipped feature by feature; additive smoothing).
"""

from __future__ import annotations

import contextlib
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.ops.indexing import Vindex

from .base import GenerativeClassifier
from .discriminant import labelled_rows, numeric_or_none

__all__ = ["NaiveBayes"]

KINDS = ("gaussian", "bernoulli", "categorical", "poisson")
#: Per family, the parameter names (in the constructor) it owns.
FAMILY_PARAMS = {"gaussian": ("mean", "var"), "bernoulli": ("p",), "categorical": ("probs",),
                 "poisson": ("rate",)}


class NaiveBayes(GenerativeClassifier):
    """Naive Bayes with a leaf family per feature.

    Parameters
    ----------
    class_prior : Tensor ``[K]``, optional
        Class probabilities. None: ``Dirichlet(1)`` prior.
    features : sequence of str
        The family of each feature, in order: ``"gaussian"``, ``"bernoulli"``,
        ``"categorical"`` or ``"poisson"``. Its length is ``d``.
    mean, var : Tensor ``[K, d_gauss]``, optional
        Gaussian features' class means and variances (feature units, units squared).
        None: ``Normal(0, 10)`` and ``InverseGamma(2, 1)`` priors.
    p : Tensor ``[K, d_bern]``, optional
        Bernoulli features' class probabilities of a 1. None: ``Beta(1, 1)``.
    probs : Tensor ``[K, d_cat, M]``, optional
        Categorical features' class probabilities (zero-padded past ``categories[j]``).
        None: ``Dirichlet(1)``.
    rate : Tensor ``[K, d_pois]``, optional
        Poisson features' class rates (counts per row). None: ``Gamma(1, 0.1)``.
    categories : sequence of int, optional
        Number of categories of each categorical feature (default: ``probs.shape[-1]``
        for every one).
    n_classes : int, optional
        ``K`` when neither ``class_prior`` nor a family parameter gives it.

    Examples
    --------
    >>> import torch
    >>> m = NaiveBayes(class_prior=[0.5, 0.5], features=["gaussian", "bernoulli"],
    ...                mean=[[0.0], [2.0]], var=[[1.0], [1.0]], p=[[0.5], [0.5]])
    >>> [round(v, 3) for v in m.predict_proba(torch.tensor([1.0, 1.0])).tolist()]
    [0.5, 0.5]
    """

    mle_kind = "closed form"
    supports_missing = True

    def __init__(self, *, class_prior=None, features=("gaussian",), mean=None, var=None, p=None,
                 probs=None, rate=None, categories=None, n_classes: int | None = None):
        if isinstance(features, str) or not all(isinstance(f, str) for f in features):
            raise TypeError("NaiveBayes: features must be a sequence of family names "
                            f"{KINDS}, got {features!r}")
        features = tuple(features)
        unknown = [f for f in features if f not in KINDS]
        if unknown:
            raise ValueError(f"NaiveBayes: unknown feature famil(ies) {unknown}; choose from {KINDS}")
        if not features:
            raise ValueError("NaiveBayes: needs at least one feature")
        n_cat = features.count("categorical")
        if categories is not None:
            categories = tuple(int(c) for c in (
                categories.tolist() if hasattr(categories, "tolist") else categories))
            if len(categories) != n_cat or any(c < 1 for c in categories):
                raise ValueError(f"NaiveBayes: categories must give a positive count for each of "
                                 f"the {n_cat} categorical features, got {categories}")
        given = {"mean": mean, "var": var, "p": p, "probs": probs, "rate": rate}
        for fam, names in FAMILY_PARAMS.items():
            if fam not in features:
                extra = [nm for nm in names if given[nm] is not None]
                if extra:
                    raise ValueError(f"NaiveBayes: {extra} given but no feature is {fam!r}")
        # categories travel as a string so they stay structural (no tensor) through to()
        super().__init__(class_prior=numeric_or_none(class_prior), features=features,
                         mean=numeric_or_none(mean), var=numeric_or_none(var), p=numeric_or_none(p),
                         probs=numeric_or_none(probs), rate=numeric_or_none(rate),
                         categories=None if categories is None else ",".join(map(str, categories)),
                         n_classes=n_classes)
        self._validate()

    # ------------------------------------------------------------------ structure
    @property
    def features(self) -> tuple:
        return self.params["features"]

    @property
    def event_shape(self) -> tuple:
        return (len(self.features),)

    @property
    def n_classes(self) -> int:
        return _n_classes(self.params)

    @property
    def categories(self) -> tuple:
        """Number of categories of each categorical feature."""
        return _categories(self.params)

    def missing_parameters(self) -> list[str]:
        names = ["class_prior"] + [nm for fam in KINDS if fam in self.features
                                   for nm in FAMILY_PARAMS[fam]]
        return [nm for nm in names if self.params[nm] is None]

    def _index(self, fam: str) -> list[int]:
        return [j for j, f in enumerate(self.features) if f == fam]

    def _validate(self) -> None:
        prm = self.params
        k = self.n_classes
        _ = self.categories  # raises when categorical features have no count
        shapes = {"mean": 2, "var": 2, "p": 2, "rate": 2, "probs": 3}
        for fam, names in FAMILY_PARAMS.items():
            dk = self.features.count(fam)
            for nm in names:
                v = prm[nm]
                if v is None:
                    continue
                if v.dim() != shapes[nm] or tuple(v.shape[:2]) != (k, dk):
                    want = f"[{k}, {dk}" + (", M]" if nm == "probs" else "]")
                    raise ValueError(f"NaiveBayes: {nm} must have shape {want}, got {list(v.shape)}")
        pi = prm["class_prior"]
        if pi is not None:
            if tuple(pi.shape) != (k,):
                raise ValueError(f"NaiveBayes: class_prior must have shape [{k}], got {list(pi.shape)}")
            if (pi < 0).any() or abs(float(pi.sum()) - 1.0) > 1e-5:
                raise ValueError("NaiveBayes: class_prior must be non-negative and sum to 1 "
                                 f"(sums to {float(pi.sum()):.6g})")
        if prm["var"] is not None and (prm["var"] <= 0).any():
            raise ValueError("NaiveBayes: var must be positive")
        if prm["p"] is not None and ((prm["p"] < 0) | (prm["p"] > 1)).any():
            raise ValueError("NaiveBayes: p must lie in [0, 1]")
        if prm["rate"] is not None and (prm["rate"] <= 0).any():
            raise ValueError("NaiveBayes: rate must be positive")
        if prm["probs"] is not None:
            pr, cats = prm["probs"], self.categories
            if max(cats, default=0) > pr.shape[-1]:
                raise ValueError(f"NaiveBayes: probs has {pr.shape[-1]} categories but "
                                 f"categories asks for {max(cats)}")
            valid = _category_mask(cats, pr.shape[-1], pr.device)
            if (pr < 0).any() or (pr[:, ~valid] != 0).any():
                raise ValueError("NaiveBayes: probs must be non-negative, zero past each "
                                 "feature's number of categories")
            if (pr.sum(-1) - 1).abs().max() > 1e-5:
                raise ValueError("NaiveBayes: probs must sum to 1 over categories")

    def _new(self, **params) -> NaiveBayes:
        m = NaiveBayes(**params)
        return m.to(self.device, self.dtype) if (self.dtype or self.device) else m

    # ------------------------------------------------------------------ story
    @staticmethod
    def story(n=None, class_prior=None, features=("gaussian",), mean=None, var=None, p=None,
              probs=None, rate=None, categories=None, n_classes=None):
        """Pyro story: ``c ~ Categorical(class_prior)``; ``y[j] | c`` from feature j's family."""
        prm = {"class_prior": class_prior, "features": tuple(features), "mean": mean, "var": var, "p": p,
                   "probs": probs, "rate": rate, "categories": categories, "n_classes": n_classes}
        k = _n_classes(prm)
        count = {fam: prm["features"].count(fam) for fam in KINDS}
        if class_prior is None:
            class_prior = pyro.sample("class_prior", dist.Dirichlet(torch.ones(k)))
        if count["gaussian"] and mean is None:
            mean = pyro.sample("mean", dist.Normal(0.0, 10.0).expand([k, count["gaussian"]])
                               .to_event(2))
        if count["gaussian"] and var is None:
            var = pyro.sample("var", dist.InverseGamma(2.0, 1.0).expand([k, count["gaussian"]])
                              .to_event(2))
        if count["bernoulli"] and p is None:
            p = pyro.sample("p", dist.Beta(1.0, 1.0).expand([k, count["bernoulli"]]).to_event(2))
        if count["categorical"] and probs is None:
            cats = _categories(prm)
            m = max(cats)
            cols = []
            for j, mj in enumerate(cats):
                pj = pyro.sample(f"probs_{j}", dist.Dirichlet(torch.ones(mj)).expand([k]).to_event(1))
                cols.append(torch.nn.functional.pad(pj, (0, m - mj)))
            probs = torch.stack(cols, dim=-2)
        if count["poisson"] and rate is None:
            rate = pyro.sample("rate", dist.Gamma(1.0, 0.1).expand([k, count["poisson"]]).to_event(2))
        plate = pyro.plate("data", n) if n is not None else contextlib.nullcontext()
        with plate:
            c = pyro.sample("c", dist.Categorical(class_prior))
            leaves = {}
            if count["gaussian"]:
                leaves["gaussian"] = dist.Normal(Vindex(mean)[..., c, :], Vindex(var)[..., c, :].sqrt())
            if count["bernoulli"]:
                leaves["bernoulli"] = dist.Bernoulli(probs=Vindex(p)[..., c, :])
            if count["categorical"]:
                leaves["categorical"] = dist.Categorical(probs=Vindex(probs)[..., c, :, :])
            if count["poisson"]:
                leaves["poisson"] = dist.Poisson(Vindex(rate)[..., c, :])
            pyro.sample("y", _Features(prm["features"], leaves))

    # ------------------------------------------------------------------ exact hooks
    def class_log_likelihood(self, y) -> torch.Tensor:
        """``log p(y | c = k)``, ``[N, K]``; a NaN feature drops out of the product.

        Parameters
        ----------
        y : Tensor ``[N, d]`` (or one row ``[d]``)
        """
        self._require_parameters("class_log_likelihood")
        x, _ = self._as_data(y, "class_log_likelihood")
        with self.context():
            return self._class_ll(x)

    def _leaf(self, fam: str) -> dist.Distribution:
        """Family ``fam``'s leaves with batch shape ``[K, d_fam]``."""
        prm = self.params
        if fam == "gaussian":
            return dist.Normal(prm["mean"], prm["var"].sqrt())
        if fam == "bernoulli":
            return dist.Bernoulli(probs=prm["p"], validate_args=False)
        if fam == "categorical":
            return dist.Categorical(probs=prm["probs"])
        return dist.Poisson(prm["rate"])

    def _class_ll(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape[0], self.n_classes)
        for fam in KINDS:
            idx = self._index(fam)
            if not idx:
                continue
            v = x[:, idx]
            obs = ~torch.isnan(v)
            _check_values(fam, v, obs, self.categories if fam == "categorical" else None)
            filled = torch.where(obs, v, 0.0)
            leaf = self._leaf(fam)
            if fam == "categorical":
                logp = torch.log(self.params["probs"])                     # [K, dc, M]
                cols = torch.arange(len(idx), device=x.device)
                terms = logp[:, cols, filled.long()].permute(1, 0, 2)      # [N, K, dc]
            else:
                terms = leaf.log_prob(filled.unsqueeze(1))                  # [N, K, dk]
            out = out + torch.where(obs.unsqueeze(1), terms, 0.0).sum(-1)
        return out

    def _joint(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(y, c = k)``, ``[N, K]`` (sklearn's ``predict_joint_log_proba``)."""
        return self._class_ll(x) + torch.log(self.params["class_prior"])

    def joint_log_prob(self, y) -> torch.Tensor:
        """``log p(y, c = k)`` of each row and class, ``[N, K]`` (NaN features drop out)."""
        self._require_parameters("joint_log_prob")
        x, _ = self._as_data(y, "joint_log_prob")
        with self.context():
            return self._joint(x)

    def _log_prob_rows(self, y: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self._joint(y), dim=-1)

    def _subset(self, keep: list[int], class_prior) -> NaiveBayes:
        """The model over features ``keep`` (in order) with ``class_prior`` replaced."""
        prm = self.params
        new = {"class_prior": class_prior, "features": [self.features[j] for j in keep]}
        cats = self.categories
        for fam, names in FAMILY_PARAMS.items():
            idx = self._index(fam)
            sel = [idx.index(j) for j in keep if j in idx]
            if not sel:
                continue
            cols = torch.tensor(sel, device=prm[names[0]].device)
            for nm in names:
                new[nm] = prm[nm].index_select(1, cols)
            if fam == "categorical":
                new["categories"] = [cats[i] for i in sel]
        return self._new(**new)

    def _marginal(self, drop: list[int]) -> NaiveBayes:
        keep = [j for j in range(len(self.features)) if j not in drop]
        return self._subset(keep, self.params["class_prior"])

    def _conditional(self, obs: dict) -> NaiveBayes:
        d = len(self.features)
        pi = self.params["class_prior"]
        row = torch.full((1, d), float("nan"), dtype=pi.dtype, device=pi.device)
        for j, v in obs.items():
            row[0, j] = v
        _, _ = self._as_data(row, "condition(dims=...)")
        joint = self._joint(row)[0]
        if not torch.isfinite(torch.logsumexp(joint, -1)):
            raise ValueError("condition(dims=...): the observed values have probability 0")
        keep = [j for j in range(d) if j not in obs]
        return self._subset(keep, torch.softmax(joint, -1))

    @classmethod
    def mle(cls, data, labels, *, kinds, alpha: float = 1.0, var_smoothing: float = 1e-9,
            categories=None, n_classes: int | None = None) -> NaiveBayes:
        """Maximum likelihood (with additive smoothing) from labelled data, in closed form.

        Parameters
        ----------
        data : Tensor ``[N, d]``
            Features; NaN entries are missing and skipped (each feature's statistics use the
            rows where it is observed).
        labels : Tensor ``[N]``
            Integer classes in ``[0, K)``.
        kinds : sequence of str
            The family of each feature (see the class docstring).
        alpha : float
            Additive smoothing of the discrete families (scikit-learn's ``alpha``):
            Bernoulli ``p = (n_1 + alpha) / (n + 2 alpha)``, categorical
            ``(n_i + alpha) / (n + m alpha)``, Poisson ``(sum + alpha) / (n + alpha)`` (the
            posterior mean under a ``Gamma(alpha, alpha)`` prior). 0: plain maximum
            likelihood.
        var_smoothing : float
            Added to the Gaussian variances (biased, ``1 / n``) as a fraction of the largest
            variance of the Gaussian features (scikit-learn ``GaussianNB``'s rule).
        categories : sequence of int, optional
            Number of categories of each categorical feature (default: largest value + 1).
        n_classes : int, optional
            ``K`` (default: ``max(labels) + 1``).

        Returns
        -------
        NaiveBayes
            On the device and dtype of ``data``; ``class_prior`` the class frequencies.
        """
        what = "NaiveBayes.mle"
        x, y, k = labelled_rows(data, labels, n_classes, what)
        kinds = tuple(kinds)
        if len(kinds) != x.shape[1]:
            raise ValueError(f"{what}: kinds names {len(kinds)} features but data has {x.shape[1]}")
        if alpha < 0 or var_smoothing < 0:
            raise ValueError(f"{what}: alpha and var_smoothing must be >= 0")
        onehot = torch.nn.functional.one_hot(y, k).to(x.dtype)                # [N, K]
        counts = onehot.sum(0)
        if (counts == 0).any():
            raise ValueError(f"{what}: class(es) {torch.nonzero(counts == 0).flatten().tolist()} "
                             "have no rows")
        params = {"class_prior": counts / x.shape[0], "features": kinds}
        for fam in KINDS:
            idx = [j for j, f in enumerate(kinds) if f == fam]
            if not idx:
                continue
            v = x[:, idx]
            obs = ~torch.isnan(v)
            cats = None
            if fam == "categorical":
                if categories is None:
                    cats = [int(torch.nan_to_num(v[:, i], nan=0.0).max()) + 1 for i in range(len(idx))]
                else:
                    cats = [int(c) for c in categories]
                params["categories"] = cats
            _check_values(fam, v, obs, cats, what=what)
            w = onehot.T @ obs.to(x.dtype)                                      # [K, dk] rows seen
            if (w == 0).any():
                raise ValueError(f"{what}: some {fam} feature has no observed value in some class")
            filled = torch.where(obs, v, 0.0)
            s1 = onehot.T @ filled                                              # [K, dk]
            if fam == "gaussian":
                mean = s1 / w
                resid = torch.where(obs, filled - mean[y], 0.0)
                var = (onehot.T @ resid ** 2) / w
                col_var = torch.stack([v[obs[:, i], i].var(unbiased=False)
                                       for i in range(len(idx))])
                params["mean"], params["var"] = mean, var + var_smoothing * col_var.max()
            elif fam == "bernoulli":
                params["p"] = (s1 + alpha) / (w + 2 * alpha)
            elif fam == "poisson":
                params["rate"] = (s1 + alpha) / (w + alpha)
            else:
                m = max(cats)
                hot = torch.nn.functional.one_hot(filled.long(), m).to(x.dtype) * obs.unsqueeze(-1)
                nk = torch.einsum("nk,ndm->kdm", onehot, hot)                   # [K, dc, M]
                valid = _category_mask(cats, m, x.device)
                num = torch.where(valid, nk + alpha, 0.0)
                params["probs"] = num / num.sum(-1, keepdim=True)
        if params.get("rate") is not None and (params["rate"] <= 0).any():
            raise ValueError(f"{what}: a Poisson feature is all zeros in some class; use alpha > 0")
        return cls(**params).to(x.device, x.dtype)


class _Features(dist.TorchDistribution):
    """The feature vector ``y`` given the class: independent leaves, one family per feature.

    ``leaves`` maps a family to a distribution with batch shape ``[*batch, d_fam]``; the
    result has event shape ``[d]`` and batch shape ``batch``.
    """

    arg_constraints: ClassVar[dict] = {}
    support = constraints.independent(constraints.real, 1)

    def __init__(self, features, leaves, validate_args=None):
        self.features = tuple(features)
        self.leaves = leaves
        self.index = {fam: [j for j, f in enumerate(self.features) if f == fam] for fam in leaves}
        batch = torch.broadcast_shapes(*[leaf.batch_shape[:-1] for leaf in leaves.values()])
        super().__init__(batch, torch.Size([len(self.features)]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        leaves = {fam: leaf.expand(batch_shape + leaf.batch_shape[-1:])
                  for fam, leaf in self.leaves.items()}
        return _Features(self.features, leaves)

    def sample(self, sample_shape=()):
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        first = next(iter(self.leaves.values()))
        dtype = first.mean.dtype if first.mean.is_floating_point() else torch.get_default_dtype()
        out = torch.empty(shape, dtype=dtype, device=first.mean.device)
        for fam, leaf in self.leaves.items():
            out[..., self.index[fam]] = leaf.expand(self.batch_shape + leaf.batch_shape[-1:]
                                                    ).sample(sample_shape).to(dtype)
        return out

    def log_prob(self, value):
        total = 0.0
        for fam, leaf in self.leaves.items():
            v = value[..., self.index[fam]]
            obs = ~torch.isnan(v)
            filled = torch.where(obs, v, 0.0)
            if fam in ("categorical",):
                filled = filled.long()
            total = total + torch.where(obs, leaf.log_prob(filled), 0.0).sum(-1)
        return total


def _n_classes(prm: dict) -> int:
    for nm in ("class_prior", "mean", "var", "p", "probs", "rate"):
        if prm.get(nm) is not None:
            return int(prm[nm].shape[0])
    if prm.get("n_classes") is None:
        raise ValueError("NaiveBayes: give n_classes when class_prior and the feature "
                         "parameters are all left None")
    return int(prm["n_classes"])


def _categories(prm: dict) -> tuple:
    n_cat = prm["features"].count("categorical")
    cats = prm.get("categories")
    if cats is not None:
        return tuple(int(c) for c in cats.split(","))
    if n_cat and prm.get("probs") is not None:
        return (int(prm["probs"].shape[-1]),) * n_cat
    if n_cat:
        raise ValueError("NaiveBayes: give categories (one count per categorical feature) "
                         "when probs is left None")
    return ()


def _category_mask(cats, m: int, device) -> torch.Tensor:
    """``[d_cat, m]`` True where category ``i < categories[j]``."""
    return torch.arange(m, device=device) < torch.tensor(cats, device=device).unsqueeze(-1)


def _check_values(fam, v, obs, cats=None, what="NaiveBayes"):
    """Raise ValueError when observed values lie outside family ``fam``'s support."""
    if fam == "gaussian":
        return
    ok = v[obs]
    if not torch.equal(ok, ok.round()) or (ok < 0).any():
        raise ValueError(f"{what}: {fam} features need non-negative integer values")
    if fam == "bernoulli" and (ok > 1).any():
        raise ValueError(f"{what}: bernoulli features need values 0 or 1")
    if fam == "categorical":
        limit = torch.tensor(cats, device=v.device, dtype=v.dtype).expand_as(v)
        if (v[obs] >= limit[obs]).any():
            raise ValueError(f"{what}: a categorical feature has a value >= its number of "
                             f"categories {list(cats)}")

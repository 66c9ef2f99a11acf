"""NaiveBayes against scikit-learn's GaussianNB / BernoulliNB / CategoricalNB and SciPy."""

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp, softmax
from sklearn.datasets import load_iris
from sklearn.naive_bayes import BernoulliNB, CategoricalNB, GaussianNB

from genprog.model import Model
from genprog.models.naive_bayes import NaiveBayes

F64 = torch.float64
X, LABELS = load_iris(return_X_y=True)


def _t(a):
    return torch.as_tensor(np.asarray(a), dtype=F64)


def _discrete_data(seed=0, n=300):
    """Labels in 3 classes; 4 Bernoulli, 2 categorical (3 and 5 levels), 2 Poisson columns
    whose distributions depend on the class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    bern = (rng.random((n, 4)) < np.array([0.2, 0.5, 0.8])[y, None] * [1, 0.9, 0.5, 0.3]).astype(float)
    cat = np.stack([(rng.integers(0, 3, n) + y) % 3, (rng.integers(0, 3, n) + 2 * y) % 5], 1)
    pois = rng.poisson(np.array([1.0, 3.0, 6.0])[y, None] * [1.0, 0.5], size=(n, 2))
    return y, bern, cat.astype(float), pois.astype(float)


@pytest.mark.reference("NaiveBayes", "mle", "sklearn GaussianNB fitted theta_, var_, class_prior_")
@pytest.mark.reference("NaiveBayes", "posterior", "sklearn GaussianNB.predict_proba")
@pytest.mark.reference("NaiveBayes", "log_prob",
                       "logsumexp of sklearn GaussianNB.predict_joint_log_proba")
@pytest.mark.reference("NaiveBayes", "log_marginal",
                       "logsumexp of sklearn GaussianNB.predict_joint_log_proba")
def test_gaussian_features_match_gaussian_nb():
    sk = GaussianNB().fit(X, LABELS)
    m = NaiveBayes.mle(_t(X), torch.as_tensor(LABELS), kinds=["gaussian"] * 4)
    assert m.dtype == F64
    np.testing.assert_allclose(m.params["class_prior"].numpy(), sk.class_prior_, rtol=1e-12)
    np.testing.assert_allclose(m.params["mean"].numpy(), sk.theta_, rtol=1e-12)
    np.testing.assert_allclose(m.params["var"].numpy(), sk.var_, rtol=1e-10)
    np.testing.assert_allclose(m.predict_proba(_t(X)).numpy(), sk.predict_proba(X), atol=1e-10)
    joint = sk.predict_joint_log_proba(X)
    np.testing.assert_allclose(m.joint_log_prob(_t(X)).numpy(), joint, rtol=1e-10)
    ref = logsumexp(joint, axis=-1)
    np.testing.assert_allclose(m.log_prob(y=_t(X), pointwise=True).numpy(), ref, rtol=1e-10)
    lm = m.condition(y=_t(X)).log_marginal()
    assert lm.method == "exact" and lm.value == pytest.approx(ref.sum(), rel=1e-10)


@pytest.mark.reference("NaiveBayes", "mle",
                       "sklearn BernoulliNB / CategoricalNB feature_log_prob_ (alpha=1)")
@pytest.mark.reference("NaiveBayes", "posterior",
                       "sklearn BernoulliNB / CategoricalNB predict_proba")
@pytest.mark.reference("NaiveBayes", "log_prob",
                       "logsumexp of sklearn BernoulliNB / CategoricalNB joint log likelihood")
def test_discrete_features_match_sklearn():
    y, bern, cat, _ = _discrete_data()
    lab = torch.as_tensor(y)
    sb = BernoulliNB(alpha=1.0).fit(bern, y)
    mb = NaiveBayes.mle(_t(bern), lab, kinds=["bernoulli"] * 4, alpha=1.0)
    np.testing.assert_allclose(np.log(mb.params["p"].numpy()), sb.feature_log_prob_, rtol=1e-12)
    np.testing.assert_allclose(mb.predict_proba(_t(bern)).numpy(), sb.predict_proba(bern), atol=1e-12)
    np.testing.assert_allclose(mb.log_prob(y=_t(bern), pointwise=True).numpy(),
                               logsumexp(sb.predict_joint_log_proba(bern), axis=-1), rtol=1e-12)
    sc = CategoricalNB(alpha=1.0).fit(cat, y)
    mc = NaiveBayes.mle(_t(cat), lab, kinds=["categorical"] * 2, alpha=1.0)
    assert mc.categories == (3, 5)
    for j in range(2):
        m_j = mc.categories[j]
        np.testing.assert_allclose(np.log(mc.params["probs"][:, j, :m_j].numpy()),
                                   sc.feature_log_prob_[j], rtol=1e-12)
    np.testing.assert_allclose(mc.predict_proba(_t(cat)).numpy(), sc.predict_proba(cat), atol=1e-12)
    np.testing.assert_allclose(mc.log_prob(y=_t(cat), pointwise=True).numpy(),
                               logsumexp(sc.predict_joint_log_proba(cat), axis=-1), rtol=1e-12)


def _mixed():
    y, bern, cat, pois = _discrete_data(seed=1)
    data = np.column_stack([np.where(y[:, None] == 0, 1.0, 2.5) + np.random.default_rng(2)
                            .normal(size=(len(y), 1)), bern[:, :2], cat, pois])
    kinds = ["gaussian", "bernoulli", "bernoulli", "categorical", "categorical", "poisson", "poisson"]
    return data, y, kinds


def _scipy_class_ll(m, data):
    """log p(x | c=k) ``[N, K]`` by hand with scipy.stats, NaN entries skipped."""
    prm = {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in m.params.items()}
    K = len(prm["class_prior"])
    out = np.zeros((len(data), K))
    counters = dict.fromkeys(["gaussian", "bernoulli", "categorical", "poisson"], 0)
    for j, kind in enumerate(m.features):
        i = counters[kind]
        counters[kind] += 1
        v = data[:, j]
        obs = ~np.isnan(v)
        vv = np.where(obs, v, 0)
        for k in range(K):
            if kind == "gaussian":
                t = stats.norm(prm["mean"][k, i], np.sqrt(prm["var"][k, i])).logpdf(vv)
            elif kind == "bernoulli":
                t = stats.bernoulli(prm["p"][k, i]).logpmf(vv)
            elif kind == "poisson":
                t = stats.poisson(prm["rate"][k, i]).logpmf(vv)
            else:
                t = np.log(prm["probs"][k, i][vv.astype(int)])
            out[:, k] += np.where(obs, t, 0.0)
    return out


@pytest.mark.reference("NaiveBayes", "log_prob",
                       "scipy.stats norm/bernoulli/poisson + categorical by hand (mixed features, NaN)")
@pytest.mark.reference("NaiveBayes", "posterior", "Bayes' rule by hand with scipy.stats")
@pytest.mark.reference("NaiveBayes", "mle",
                       "Poisson rate = class mean by hand (alpha=0); (sum + alpha) / (n + alpha)")
def test_mixed_and_poisson_features_vs_scipy():
    data, y, kinds = _mixed()
    m0 = NaiveBayes.mle(_t(data[:, 5:]), torch.as_tensor(y), kinds=["poisson"] * 2, alpha=0.0)
    rate = np.stack([data[y == k][:, 5:].mean(0) for k in range(3)])
    np.testing.assert_allclose(m0.params["rate"].numpy(), rate, rtol=1e-12)
    m = NaiveBayes.mle(_t(data), torch.as_tensor(y), kinds=kinds, alpha=1.0)
    smoothed = np.stack([(data[y == k][:, 5:].sum(0) + 1) / ((y == k).sum() + 1) for k in range(3)])
    np.testing.assert_allclose(m.params["rate"].numpy(), smoothed, rtol=1e-12)
    holes = data.copy()
    rng = np.random.default_rng(5)
    holes[rng.random(holes.shape) < 0.3] = np.nan
    for d in (data, holes):
        joint = _scipy_class_ll(m, d) + np.log(m.params["class_prior"].numpy())
        np.testing.assert_allclose(m.log_prob(y=_t(d), pointwise=True).numpy(),
                                   logsumexp(joint, axis=-1), rtol=1e-11)
        np.testing.assert_allclose(m.predict_proba(_t(d)).numpy(), softmax(joint, axis=-1),
                                   atol=1e-12)


@pytest.mark.reference("NaiveBayes", "posterior",
                       "sklearn GaussianNB / CategoricalNB fit on the observed columns only")
def test_missing_features_match_sklearn_on_observed_columns():
    m = NaiveBayes.mle(_t(X), torch.as_tensor(LABELS), kinds=["gaussian"] * 4, var_smoothing=0.0)
    patterns = [[0, 2], [1], [1, 2, 3]]
    blocks = np.array_split(np.arange(len(X)), len(patterns))
    Xm = X.copy()
    for cols, block in zip(patterns, blocks):
        Xm[np.ix_(block, [j for j in range(4) if j not in cols])] = np.nan
    got = m.predict_proba(_t(Xm)).numpy()
    for cols, block in zip(patterns, blocks):
        sk = GaussianNB(var_smoothing=0.0).fit(X[:, cols], LABELS)
        np.testing.assert_allclose(got[block], sk.predict_proba(X[np.ix_(block, cols)]), atol=1e-10)
    y, _, cat, _ = _discrete_data()
    mc = NaiveBayes.mle(_t(cat), torch.as_tensor(y), kinds=["categorical"] * 2)
    sk = CategoricalNB().fit(cat[:, [1]], y)
    miss = cat.copy()
    miss[:, 0] = np.nan
    np.testing.assert_allclose(mc.predict_proba(_t(miss)).numpy(), sk.predict_proba(cat[:, [1]]),
                               atol=1e-12)


@pytest.mark.reference("NaiveBayes", "marginalize",
                       "sklearn GaussianNB fit on the kept columns (joint log likelihood)")
def test_marginalize_drops_features():
    m = NaiveBayes.mle(_t(X), torch.as_tensor(LABELS), kinds=["gaussian"] * 4, var_smoothing=0.0)
    mm = m.marginalize(dims=[0, 2])
    assert mm.features == ("gaussian", "gaussian") and mm.dtype == F64
    sk = GaussianNB(var_smoothing=0.0).fit(X[:, [1, 3]], LABELS)
    np.testing.assert_allclose(mm.log_prob(y=_t(X[:, [1, 3]]), pointwise=True).numpy(),
                               logsumexp(sk.predict_joint_log_proba(X[:, [1, 3]]), axis=-1),
                               rtol=1e-10)
    data, y, kinds = _mixed()
    mx = NaiveBayes.mle(_t(data), torch.as_tensor(y), kinds=kinds)
    keep = [0, 2, 4, 5]
    mk = mx.marginalize(dims=[1, 3, 6])
    assert mk.features == tuple(kinds[j] for j in keep) and mk.categories == (5,)
    nan = data.copy()
    nan[:, [1, 3, 6]] = np.nan
    np.testing.assert_allclose(mk.log_prob(y=_t(data[:, keep]), pointwise=True).numpy(),
                               mx.log_prob(y=_t(nan), pointwise=True).numpy(), rtol=1e-12)


@pytest.mark.reference("NaiveBayes", "condition",
                       "scipy.stats by hand: log p(x) - log p(x_obs); class prior vs predict_proba")
def test_condition_on_dims():
    data, y, kinds = _mixed()
    m = NaiveBayes.mle(_t(data), torch.as_tensor(y), kinds=kinds)
    obs = {0: 1.7, 3: 2.0, 5: 4.0}
    mc = m.condition(dims=obs)
    rest = [1, 2, 4, 6]
    assert mc.features == tuple(kinds[j] for j in rest)
    x = data[:25].copy()
    for j, v in obs.items():
        x[:, j] = v
    prior = np.log(m.params["class_prior"].numpy())
    joint = logsumexp(_scipy_class_ll(m, x) + prior, axis=-1)
    e = np.full((1, 7), np.nan)
    for j, v in obs.items():
        e[0, j] = v
    evid = _scipy_class_ll(m, e) + prior
    np.testing.assert_allclose(mc.log_prob(y=_t(x[:, rest]), pointwise=True).numpy(),
                               joint - logsumexp(evid, axis=-1), rtol=1e-11)
    np.testing.assert_allclose(mc.params["class_prior"].numpy(), softmax(evid[0]), atol=1e-12)


def test_sample_frequencies_match_the_leaves():
    data, y, kinds = _mixed()
    m = NaiveBayes.mle(_t(data), torch.as_tensor(y), kinds=kinds)
    n = 30000
    s = m.sample(n, seed=0)
    c, ys = s["c"].numpy(), s["y"].numpy()
    pi = m.params["class_prior"].numpy()
    assert np.all(np.abs(np.bincount(c, minlength=3) / n - pi) < 4 * np.sqrt(pi * (1 - pi) / n))
    k = 1
    rows = ys[c == k]
    nk = len(rows)
    mu, var = m.params["mean"][k, 0].item(), m.params["var"][k, 0].item()
    assert abs(rows[:, 0].mean() - mu) < 4 * np.sqrt(var / nk)
    p = m.params["p"][k].numpy()
    assert np.all(np.abs(rows[:, 1:3].mean(0) - p) < 4 * np.sqrt(p * (1 - p) / nk))
    probs = m.params["probs"][k, 1].numpy()
    freq = np.bincount(rows[:, 4].astype(int), minlength=5) / nk
    assert np.all(np.abs(freq - probs) < 4 * np.sqrt(probs * (1 - probs) / nk) + 1e-12)
    rate = m.params["rate"][k].numpy()
    assert np.all(np.abs(rows[:, 5:].mean(0) - rate) < 4 * np.sqrt(rate / nk))


def test_mle_skips_missing_entries_feature_by_feature():
    data, y, kinds = _mixed()
    holes = data.copy()
    holes[::4, 0] = np.nan
    holes[1::5, 5] = np.nan
    m = NaiveBayes.mle(_t(holes), torch.as_tensor(y), kinds=kinds, alpha=0.0, var_smoothing=0.0)
    for k in range(3):
        g = holes[(y == k) & ~np.isnan(holes[:, 0]), 0]
        assert m.params["mean"][k, 0].item() == pytest.approx(g.mean(), rel=1e-12)
        assert m.params["var"][k, 0].item() == pytest.approx(g.var(), rel=1e-12)
        r = holes[(y == k) & ~np.isnan(holes[:, 5]), 5]
        assert m.params["rate"][k, 0].item() == pytest.approx(r.mean(), rel=1e-12)


def test_generic_map_fit_with_observed_labels():
    true = NaiveBayes(class_prior=[0.5, 0.5], features=["gaussian", "bernoulli"],
                      mean=[[-1.0], [2.0]], var=[[1.0], [0.5]], p=[[0.2], [0.9]])
    s = true.sample(500, seed=4)
    m = NaiveBayes(class_prior=[0.5, 0.5], features=["gaussian", "bernoulli"], var=[[1.0], [0.5]])
    fit = m.condition(y=s["y"], c=s["c"]).fit("map", seed=0)
    yy, cc = s["y"].numpy(), s["c"].numpy()
    emp_mean = [yy[cc == k, 0].mean() for k in range(2)]
    emp_p = [yy[cc == k, 1].mean() for k in range(2)]
    np.testing.assert_allclose(fit.draws["mean"].reshape(2).numpy(), emp_mean, atol=0.05)
    np.testing.assert_allclose(fit.draws["p"].reshape(2).numpy(), emp_p, atol=0.02)  # Beta(1,1): mode = MLE
    np.testing.assert_allclose(emp_mean, [-1.0, 2.0], atol=0.2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown feature famil"):
        NaiveBayes(class_prior=[1.0], features=["gamma"])
    with pytest.raises(TypeError, match="sequence of family names"):
        NaiveBayes(class_prior=[1.0], features="gaussian")
    with pytest.raises(ValueError, match="mean must have shape"):
        NaiveBayes(class_prior=[0.5, 0.5], features=["gaussian"], mean=[[0.0, 1.0]], var=[[1.0, 1.0]])
    with pytest.raises(ValueError, match="sum to 1 over categories"):
        NaiveBayes(class_prior=[1.0], features=["categorical"], probs=[[[0.5, 0.6]]])
    with pytest.raises(ValueError, match="but no feature is 'poisson'"):
        NaiveBayes(class_prior=[1.0], features=["gaussian"], rate=[[1.0]])
    m = NaiveBayes(class_prior=[0.5, 0.5], features=["bernoulli", "categorical"],
                   p=[[0.5], [0.5]], probs=[[[0.5, 0.5]], [[0.2, 0.8]]])
    with pytest.raises(ValueError, match="values 0 or 1"):
        m.log_prob(y=torch.tensor([2.0, 0.0]))
    with pytest.raises(ValueError, match="number of categories"):
        m.predict_proba(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="kinds names 1 features"):
        NaiveBayes.mle(_t(X), torch.as_tensor(LABELS), kinds=["gaussian"])
    with pytest.raises(ValueError, match="give categories"):
        NaiveBayes(features=["categorical"], n_classes=2)


def test_pyro_story_agrees_with_the_exact_log_prob():
    """Pyro's enumeration of the class in the story gives the same log p."""
    data, y, kinds = _mixed()
    m = NaiveBayes.mle(_t(data), torch.as_tensor(y), kinds=kinds)
    for row in _t(data[:3]):
        assert float(Model.log_prob(m, y=row)) == pytest.approx(float(m.log_prob(y=row)), rel=1e-10)

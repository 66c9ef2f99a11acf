"""GaussianDiscriminant (QDA / LDA) against scikit-learn's discriminant analysis and SciPy."""

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp
from sklearn.datasets import load_iris
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis, QuadraticDiscriminantAnalysis

from genprog.model import Model
from genprog.models.discriminant import GaussianDiscriminant

F64 = torch.float64
X, LABELS = load_iris(return_X_y=True)


def _t(a):
    return torch.as_tensor(np.asarray(a), dtype=F64)


def _model(prior, means, covs, shared):
    return GaussianDiscriminant(class_prior=_t(prior), means=_t(means), covariances=_t(covs),
                                shared=shared).to(dtype=F64)


def _scipy_joint(x, prior, means, covs):
    """log p(x, c=k) ``[N, K]`` with SciPy, over the dims of ``x`` (covs ``[K, d, d]``)."""
    return np.stack([np.log(prior[k]) + stats.multivariate_normal(means[k], covs[k]).logpdf(x)
                     for k in range(len(prior))], axis=-1)


@pytest.fixture(scope="module")
def qda():
    return QuadraticDiscriminantAnalysis(reg_param=0.0, store_covariance=True).fit(X, LABELS)


@pytest.mark.reference("GaussianDiscriminant", "posterior",
                       "sklearn QuadraticDiscriminantAnalysis.predict_proba at the same parameters")
@pytest.mark.reference("GaussianDiscriminant", "log_prob",
                       "SciPy multivariate_normal mixture over classes")
@pytest.mark.reference("GaussianDiscriminant", "log_marginal",
                       "SciPy multivariate_normal mixture over classes")
def test_qda_predict_proba_and_log_prob(qda):
    covs = np.array(qda.covariance_)
    m = _model(qda.priors_, qda.means_, covs, shared=False)
    got = m.predict_proba(_t(X)).numpy()
    np.testing.assert_allclose(got, qda.predict_proba(X), atol=1e-8)
    np.testing.assert_array_equal(m.predict(_t(X)).numpy(), qda.predict(X))
    ref = logsumexp(_scipy_joint(X, qda.priors_, qda.means_, covs), axis=-1)
    np.testing.assert_allclose(m.log_prob(y=_t(X), pointwise=True).numpy(), ref, rtol=1e-10)
    lm = m.condition(y=_t(X)).log_marginal()
    assert lm.method == "exact" and lm.stderr == 0
    assert lm.value == pytest.approx(ref.sum(), rel=1e-10)


@pytest.mark.parametrize("solver", ["lsqr", "eigen"])
@pytest.mark.reference("GaussianDiscriminant", "posterior",
                       "sklearn LinearDiscriminantAnalysis.predict_proba (lsqr, eigen)")
def test_lda_predict_proba(solver):
    lda = LinearDiscriminantAnalysis(solver=solver).fit(X, LABELS)
    m = _model(lda.priors_, lda.means_, lda.covariance_, shared=True)
    np.testing.assert_allclose(m.predict_proba(_t(X)).numpy(), lda.predict_proba(X), atol=1e-8)


@pytest.mark.reference("GaussianDiscriminant", "mle",
                       "sklearn QDA / LDA(lsqr) fitted priors_, means_, covariance_ (1/n normalised)")
def test_mle_matches_sklearn_fitted_attributes(qda):
    m = GaussianDiscriminant.mle(_t(X), torch.as_tensor(LABELS))
    assert m.dtype == F64
    np.testing.assert_allclose(m.params["class_prior"].numpy(), qda.priors_, rtol=1e-12)
    np.testing.assert_allclose(m.params["means"].numpy(), qda.means_, rtol=1e-12)
    # sklearn 1.9's QDA covariance_ is the biased (1/n_k) class covariance, as is our MLE;
    # the normalisation is pinned here with NumPy so a change on either side shows up.
    biased = np.stack([np.cov(X[LABELS == k].T, bias=True) for k in range(3)])
    np.testing.assert_allclose(np.array(qda.covariance_), biased, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(m.params["covariances"].numpy(), biased, rtol=1e-10, atol=1e-13)
    # LDA's covariance_ is sum_k prior_k * (1/n_k) scatter_k = pooled scatter / N
    lda = LinearDiscriminantAnalysis(solver="lsqr").fit(X, LABELS)
    ml = GaussianDiscriminant.mle(_t(X), torch.as_tensor(LABELS), shared=True)
    pooled = sum((X[LABELS == k] - X[LABELS == k].mean(0)).T @ (X[LABELS == k] - X[LABELS == k].mean(0))
                  for k in range(3)) / len(X)
    np.testing.assert_allclose(lda.covariance_, pooled, rtol=1e-10)
    np.testing.assert_allclose(ml.params["covariances"].numpy(), pooled, rtol=1e-10)
    np.testing.assert_allclose(ml.predict_proba(_t(X)).numpy(), lda.predict_proba(X), atol=1e-8)


@pytest.mark.reference("GaussianDiscriminant", "posterior",
                       "sklearn QDA fit on the observed columns only (per missing pattern)")
@pytest.mark.reference("GaussianDiscriminant", "log_prob",
                       "SciPy mixture over the observed dims (missing features)")
def test_missing_features_are_marginalised(qda):
    m = GaussianDiscriminant.mle(_t(X), torch.as_tensor(LABELS))
    patterns = [[0, 2], [1], [0, 1, 3], [3]]          # observed columns, one pattern per block
    rows = np.arange(len(X))
    Xm = X.copy()
    blocks = np.array_split(rows, len(patterns))
    for cols, block in zip(patterns, blocks):
        miss = [j for j in range(4) if j not in cols]
        Xm[np.ix_(block, miss)] = np.nan
    got = m.predict_proba(_t(Xm)).numpy()
    got_lp = m.log_prob(y=_t(Xm), pointwise=True).numpy()
    covs = np.array(qda.covariance_)
    for cols, block in zip(patterns, blocks):
        sk = QuadraticDiscriminantAnalysis(reg_param=0.0).fit(X[:, cols], LABELS)
        np.testing.assert_allclose(got[block], sk.predict_proba(X[np.ix_(block, cols)]), atol=1e-8)
        sub = covs[:, cols][:, :, cols]
        ref = logsumexp(_scipy_joint(X[np.ix_(block, cols)], qda.priors_, qda.means_[:, cols], sub),
                        axis=-1)
        np.testing.assert_allclose(got_lp[block], ref, rtol=1e-9)
    # a row with every feature missing: p(c) and log p = 0
    none = torch.full((4,), float("nan"), dtype=F64)
    np.testing.assert_allclose(m.predict_proba(none).numpy(), qda.priors_, rtol=1e-12)
    assert float(m.log_prob(y=none)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.reference("GaussianDiscriminant", "marginalize",
                       "SciPy mixture of the class Gaussians over the kept dims")
def test_marginalize(qda):
    covs = np.array(qda.covariance_)
    for shared in (False, True):
        c = covs if not shared else covs.mean(0)
        m = _model(qda.priors_, qda.means_, c, shared)
        mm = m.marginalize(dims=[1, 2])
        assert mm.event_shape == (2,) and mm.params["shared"] is shared
        full = np.broadcast_to(c, (3, 4, 4))
        ref = logsumexp(_scipy_joint(X[:, [0, 3]], qda.priors_, qda.means_[:, [0, 3]],
                                     full[:, [0, 3]][:, :, [0, 3]]), axis=-1)
        np.testing.assert_allclose(mm.log_prob(y=_t(X[:, [0, 3]]), pointwise=True).numpy(), ref,
                                   rtol=1e-10)


@pytest.mark.reference("GaussianDiscriminant", "condition",
                       "Bayes' rule with SciPy: log p(x) - log p(x_obs) on a grid of the rest")
def test_condition_on_dims(qda):
    covs = np.array(qda.covariance_)
    for shared in (False, True):
        c = covs if not shared else covs.mean(0)
        m = _model(qda.priors_, qda.means_, c, shared)
        full = np.broadcast_to(c, (3, 4, 4))
        obs = {1: 3.1, 2: 4.4}
        mc = m.condition(dims=obs)
        assert mc.event_shape == (2,)
        rest = X[:20][:, [0, 3]]
        x = np.column_stack([rest[:, 0], np.full(20, 3.1), np.full(20, 4.4), rest[:, 1]])
        joint = logsumexp(_scipy_joint(x, qda.priors_, qda.means_, full), axis=-1)
        evid = logsumexp(_scipy_joint(np.array([[3.1, 4.4]]), qda.priors_, qda.means_[:, [1, 2]],
                                      full[:, [1, 2]][:, :, [1, 2]]), axis=-1)
        np.testing.assert_allclose(mc.log_prob(y=_t(rest), pointwise=True).numpy(), joint - evid,
                                   rtol=1e-9)


def test_sample_moments_match_the_mixture(qda):
    covs = np.array(qda.covariance_)
    m = _model(qda.priors_, qda.means_, covs, shared=False)
    n = 40000
    s = m.sample(n, seed=1)
    y, c = s["y"].numpy(), s["c"].numpy()
    freq = np.bincount(c, minlength=3) / n
    assert np.all(np.abs(freq - qda.priors_) < 4 * np.sqrt(qda.priors_ * (1 - qda.priors_) / n))
    mean = qda.priors_ @ qda.means_
    cov = sum(p * (S + np.outer(mu - mean, mu - mean))
              for p, mu, S in zip(qda.priors_, qda.means_, covs))
    se = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(y.mean(0) - mean) < 4 * se)
    np.testing.assert_allclose(np.cov(y.T), cov, rtol=0.05, atol=0.01)


def test_generic_map_fit_recovers_class_means():
    true = GaussianDiscriminant(class_prior=[0.4, 0.6], means=[[-2.0, 0.0], [2.0, 1.0]],
                                covariances=[[1.0, 0.3], [0.3, 0.5]], shared=True)
    s = true.sample(400, seed=3)
    m = GaussianDiscriminant(class_prior=[0.4, 0.6], covariances=[[1.0, 0.3], [0.3, 0.5]],
                             shared=True)
    fit = m.condition(y=s["y"], c=s["c"]).fit("map", seed=0)
    got = fit.draws["means"].reshape(2, 2).numpy()
    emp = np.stack([s["y"][s["c"] == k].mean(0).numpy() for k in range(2)])
    np.testing.assert_allclose(got, emp, atol=0.05)
    np.testing.assert_allclose(got, [[-2.0, 0.0], [2.0, 1.0]], atol=0.25)


def test_bad_inputs():
    with pytest.raises(ValueError, match="positive definite"):
        GaussianDiscriminant(class_prior=[1.0], means=[[0.0, 0.0]],
                             covariances=[[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianDiscriminant(class_prior=[0.5, 0.6], means=[[0.0], [1.0]], covariances=[[1.0]],
                             shared=True)
    with pytest.raises(ValueError, match="covariances must have shape"):
        GaussianDiscriminant(class_prior=[0.5, 0.5], means=[[0.0], [1.0]], covariances=[[1.0]])
    with pytest.raises(TypeError, match="shared must be a bool"):
        GaussianDiscriminant(class_prior=[1.0], means=[[0.0]], covariances=[[1.0]], shared=1)
    with pytest.raises(ValueError, match="n_classes and dim"):
        GaussianDiscriminant()
    m = GaussianDiscriminant.mle(_t(X), torch.as_tensor(LABELS))
    with pytest.raises(ValueError, match="shape"):
        m.predict_proba(torch.zeros(5, 3, dtype=F64))
    Xn = X.copy()
    Xn[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        GaussianDiscriminant.mle(_t(Xn), torch.as_tensor(LABELS))
    with pytest.raises(ValueError, match="at least 2 rows"):
        GaussianDiscriminant.mle(_t(X[:51]), torch.as_tensor(LABELS[:51]))
    with pytest.raises(ValueError, match="labels must be integers"):
        GaussianDiscriminant.mle(_t(X), torch.as_tensor(LABELS + 0.5))
    with pytest.raises(ValueError, match="exact only with every parameter"):
        GaussianDiscriminant(n_classes=2, dim=2).predict_proba(torch.zeros(2))


def test_pyro_story_agrees_with_the_exact_log_prob():
    """Pyro's enumeration of the class in the story gives the same log p."""
    for shared in (False, True):
        m = GaussianDiscriminant.mle(_t(X), torch.as_tensor(LABELS), shared=shared)
        for row in _t(X[::70]):
            assert float(Model.log_prob(m, y=row)) == pytest.approx(float(m.log_prob(y=row)),
                                                                    rel=1e-10)

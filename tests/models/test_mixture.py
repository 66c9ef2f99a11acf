"""GaussianMixture: exact operations against scikit-learn, SciPy and brute-force sums over
components, EM recovery, and the generic Bayesian route with z enumerated (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp
from sklearn.mixture import GaussianMixture as SkGMM

from genprog.model import Model
from genprog.models.mixture import GaussianMixture

F64 = torch.float64
TOL = 1e-9


def _t(x):
    return torch.as_tensor(np.asarray(x), dtype=F64)


def _params(seed=0, k=3, d=3, sep=1.0):
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.full(k, 3.0))
    means = rng.normal(scale=2.0 * sep, size=(k, d))
    A = rng.normal(size=(k, d, d)) * 0.7
    covs = A @ A.transpose(0, 2, 1) + 0.3 * np.eye(d)
    return w, means, covs


def _model(w, means, covs):
    return GaussianMixture(weights=_t(w), means=_t(means), covariances=_t(covs))


def _sample(w, means, covs, n, seed=1):
    rng = np.random.default_rng(seed)
    z = rng.choice(len(w), size=n, p=w)
    return np.stack([rng.multivariate_normal(means[j], covs[j]) for j in z]), z


def _sklearn(w, means, covs):
    sk = SkGMM(n_components=len(w), covariance_type="full")
    sk.weights_, sk.means_, sk.covariances_ = w, means, covs
    chol = np.linalg.cholesky(covs)
    sk.precisions_cholesky_ = np.stack([np.linalg.solve(c, np.eye(len(c))).T for c in chol])
    sk.n_features_in_ = means.shape[1]
    return sk


def _brute_log_prob(w, means, covs, Y):
    """log sum_j w_j N(y_obs; ...) row by row over the observed sub-vector."""
    out, resp = [], []
    for row in Y:
        o = ~np.isnan(row)
        if not o.any():
            out.append(0.0)
            resp.append(w)
            continue
        lp = np.log(w) + np.array([stats.multivariate_normal(m[o], c[np.ix_(o, o)]).logpdf(row[o])
                                   for m, c in zip(means, covs)])
        out.append(logsumexp(lp))
        resp.append(np.exp(lp - logsumexp(lp)))
    return np.array(out), np.array(resp)


@pytest.mark.reference("GaussianMixture", "log_prob", "sklearn GaussianMixture.score_samples, same parameters")
@pytest.mark.reference("GaussianMixture", "log_marginal", "sum of sklearn score_samples")
@pytest.mark.reference("GaussianMixture", "posterior", "sklearn GaussianMixture.predict_proba")
def test_log_prob_and_responsibilities_match_sklearn():
    w, means, covs = _params()
    Y, _ = _sample(w, means, covs, 60)
    gm, sk = _model(w, means, covs), _sklearn(w, means, covs)
    np.testing.assert_allclose(gm.log_prob(y=_t(Y), pointwise=True).numpy(), sk.score_samples(Y),
                               rtol=0, atol=TOL)
    np.testing.assert_allclose(gm.posterior(_t(Y)).numpy(), sk.predict_proba(Y), atol=1e-10)
    np.testing.assert_array_equal(gm.predict(_t(Y)).numpy(), sk.predict(Y))
    est = gm.condition(y=_t(Y)).log_marginal()
    assert est.method == "exact" and est.value == pytest.approx(sk.score_samples(Y).sum(), abs=1e-8)


@pytest.mark.reference("GaussianMixture", "log_prob",
                       "genprog's generic log_prob, enumerating the discrete site z of the story")
def test_log_prob_matches_generic_enumeration_of_the_story():
    w, means, covs = _params(seed=3, k=2, d=2)
    Y, _ = _sample(w, means, covs, 10)
    gm = _model(w, means, covs)
    generic = Model.log_prob(gm, pointwise=True, y=_t(Y))
    np.testing.assert_allclose(gm.log_prob(y=_t(Y), pointwise=True).numpy(), generic.numpy(), atol=1e-9)


@pytest.mark.reference("GaussianMixture", "log_prob", "brute-force sum over components of scipy "
                       "logpdf of the observed sub-vector")
@pytest.mark.reference("GaussianMixture", "posterior", "brute-force Bayes' rule on observed entries")
def test_missing_entries_are_integrated_out():
    w, means, covs = _params(seed=4)
    Y, _ = _sample(w, means, covs, 15)
    mask = np.random.default_rng(2).random(Y.shape) < 0.4
    mask[0] = True
    mask[1] = False
    Y[mask] = np.nan
    ref_lp, ref_r = _brute_log_prob(w, means, covs, Y)
    gm = _model(w, means, covs)
    np.testing.assert_allclose(gm.log_prob(y=_t(Y), pointwise=True).numpy(), ref_lp, atol=TOL)
    np.testing.assert_allclose(gm.posterior(_t(Y)).numpy(), ref_r, atol=1e-10)
    assert gm.condition(y=_t(Y)).log_marginal().value == pytest.approx(ref_lp.sum(), abs=1e-8)


def test_impute_is_the_mixture_conditional_mean():
    w, means, covs = _params(seed=5, k=2, d=3)
    y = np.array([0.3, np.nan, -1.0])
    got = _model(w, means, covs).impute(_t(y)).numpy()
    _, r = _brute_log_prob(w, means, covs, y[None])
    o, m = ~np.isnan(y), np.isnan(y)
    per = [mu[m] + c[np.ix_(m, o)] @ np.linalg.solve(c[np.ix_(o, o)], y[o] - mu[o])
           for mu, c in zip(means, covs)]
    np.testing.assert_allclose(got[m], r[0] @ np.array(per), atol=1e-10)
    np.testing.assert_allclose(got[o], y[o])


@pytest.mark.reference("GaussianMixture", "marginalize", "scipy mixture logpdf over the kept dims")
def test_marginal_is_a_mixture_over_kept_dims():
    w, means, covs = _params(seed=6)
    keep = [0, 2]
    marg = _model(w, means, covs).marginalize(dims=[1])
    assert isinstance(marg, GaussianMixture) and marg.event_shape == (2,)
    Y, _ = _sample(w, means, covs, 20)
    full = np.full((20, 3), np.nan)
    full[:, keep] = Y[:, keep]
    ref, _ = _brute_log_prob(w, means, covs, full)
    np.testing.assert_allclose(marg.log_prob(y=_t(Y[:, keep]), pointwise=True).numpy(), ref, atol=TOL)


@pytest.mark.reference("GaussianMixture", "condition",
                       "scipy: log p(y) - log p(y_b) with brute-force mixture sums")
def test_conditional_is_joint_over_marginal():
    w, means, covs = _params(seed=7)
    cond = _model(w, means, covs).condition(dims={1: 0.5})
    assert isinstance(cond, GaussianMixture) and cond.event_shape == (2,)
    Y, _ = _sample(w, means, covs, 20)
    full = Y.copy()
    full[:, 1] = 0.5
    joint, _ = _brute_log_prob(w, means, covs, full)
    yb = np.array([[np.nan, 0.5, np.nan]])
    marg, r = _brute_log_prob(w, means, covs, yb)
    np.testing.assert_allclose(cond.log_prob(y=_t(Y[:, [0, 2]]), pointwise=True).numpy(),
                               joint - marg[0], atol=1e-9)
    np.testing.assert_allclose(cond.kwargs["weights"].numpy(), r[0], atol=1e-12)


@pytest.mark.reference("GaussianMixture", "sample",
                       "component frequencies and mixture mean/covariance of 20000 draws (5 s.e.)")
def test_sample_moments():
    w, means, covs = _params(seed=8)
    s = _model(w, means, covs).sample(20000, seed=0)
    freq = np.bincount(s["z"].numpy(), minlength=3) / 20000
    assert np.all(np.abs(freq - w) < 5 * np.sqrt(w * (1 - w) / 20000))
    y = s["y"].numpy()
    mean = w @ means
    cov = np.einsum("k,kij->ij", w, covs) + np.einsum("k,ki,kj->ij", w, means, means) - np.outer(mean, mean)
    assert np.all(np.abs(y.mean(0) - mean) < 5 * np.sqrt(np.diag(cov) / 20000))
    se_cov = np.sqrt(2 * np.outer(np.diag(cov), np.diag(cov)) / 20000) * 3  # heavier tails
    assert np.all(np.abs(np.cov(y.T) - cov) < 5 * se_cov)


@pytest.mark.reference("GaussianMixture", "mle",
                       "recovery of well-separated simulated clusters; sklearn fit log-likelihood")
def test_em_recovers_separated_clusters_and_matches_sklearn():
    w, means, covs = _params(seed=9, sep=4.0)
    Y, z = _sample(w, means, covs, 1500)
    fit = GaussianMixture.mle(Y, k=3, seed=0)
    assert fit.info.converged
    order = [int(np.argmin(np.linalg.norm(fit.kwargs["means"].numpy() - m, axis=1))) for m in means]
    assert sorted(order) == [0, 1, 2]
    # well separated: EM lands on the complete-data MLE of the true clusters ...
    freq = np.bincount(z, minlength=3) / len(z)
    sample_means = np.stack([Y[z == j].mean(0) for j in range(3)])
    sample_covs = np.stack([np.cov(Y[z == j].T, bias=True) for j in range(3)])
    np.testing.assert_allclose(fit.kwargs["weights"].numpy()[order], freq, atol=1e-3)
    np.testing.assert_allclose(fit.kwargs["means"].numpy()[order], sample_means, atol=0.01)
    np.testing.assert_allclose(fit.kwargs["covariances"].numpy()[order], sample_covs, atol=0.03)
    # ... which is near the truth
    np.testing.assert_allclose(fit.kwargs["means"].numpy()[order], means, atol=0.3)
    ours = float(fit.log_prob(y=Y)) / len(Y)
    assert fit.info.log_likelihood / len(Y) == pytest.approx(ours, abs=1e-8)
    sk = SkGMM(n_components=3, covariance_type="full", random_state=0, tol=1e-6).fit(Y)
    assert ours >= sk.score(Y) - 1e-5
    assert np.all(np.diff(fit.info.trace) > -1e-9)


def test_bayesian_map_fit_sums_z_out():
    w, means, covs = np.array([0.4, 0.6]), np.array([[-4.0, 0.0], [4.0, 1.0]]), np.stack([np.eye(2)] * 2)
    Y, z = _sample(w, means, covs, 150)
    m = GaussianMixture(k=2, dim=2, covariances=_t(covs)).condition(y=_t(Y))
    assert "z" in [s.name for s in m.structure.latent_discrete]
    fit = m.fit("map", seed=0)
    got_means = fit.draws["means"][0, 0].numpy()
    got_w = fit.draws["weights"][0, 0].numpy()
    order = np.argsort(got_means[:, 0])
    # separated clusters, flat-ish priors: the MAP is close to the per-cluster sample means
    sample_means = np.stack([Y[z == j].mean(0) for j in range(2)])
    np.testing.assert_allclose(got_means[order], sample_means, atol=0.02)
    np.testing.assert_allclose(got_w[order], np.bincount(z) / len(z), atol=0.02)
    np.testing.assert_allclose(got_means[order], means, atol=0.5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:nuts. R-hat above 1.01")   # 100 draws; checked below at 1.05
def test_bayesian_nuts_fit_sums_z_out():
    """Short NUTS (about 45 s on one core): each chain's posterior means of the component
    means are near the per-cluster sample means (labels sorted within each chain)."""
    w, means, covs = np.array([0.4, 0.6]), np.array([[-4.0, 0.0], [4.0, 1.0]]), np.stack([np.eye(2)] * 2)
    Y, z = _sample(w, means, covs, 100)
    m = GaussianMixture(k=2, dim=2, covariances=_t(covs)).condition(y=_t(Y))
    fit = m.fit("nuts", chains=2, warmup=100, draws=100, seed=0)
    assert float(fit.summary()["r_hat"].max()) < 1.05
    sample_means = np.stack([Y[z == j].mean(0) for j in range(2)])
    for chain in fit.draws["means"].numpy():
        post = chain.mean(0)
        post = post[np.argsort(post[:, 0])]
        np.testing.assert_allclose(post, sample_means, atol=0.3)   # posterior sd ~0.15


def test_prior_story_samples():
    s = GaussianMixture(k=2, dim=3).sample(4, seed=0)
    assert s["covariances"].shape == (4, 2, 3, 3) and s["z"].shape == (4,) and s["y"].shape == (4, 3)


@pytest.mark.gpu
def test_cuda_log_prob_and_posterior():
    w, means, covs = _params()
    gm = _model(w, means, covs).to("cuda")
    Y = _t(_sample(w, means, covs, 10)[0]).cuda()
    Y[0, 0] = float("nan")
    assert gm.log_prob(y=Y, pointwise=True).device.type == "cuda"
    assert gm.posterior(Y).device.type == "cuda"
    np.testing.assert_allclose(gm.log_prob(y=Y, pointwise=True).cpu().numpy(),
                               _model(w, means, covs).log_prob(y=Y.cpu(), pointwise=True).numpy(),
                               atol=1e-9)
    fit = GaussianMixture.mle(Y[1:], k=2, n_init=1)
    assert fit.kwargs["means"].device.type == "cuda"


def test_bad_input_errors():
    w, means, covs = _params()
    with pytest.raises(ValueError, match="sum to 1"):
        _model(w * 2, means, covs)
    with pytest.raises(ValueError, match="non-negative"):
        _model(np.array([1.5, -0.25, -0.25]), means, covs)
    bad = covs.copy()
    bad[1] = np.array([[1.0, 2.0, 0], [2.0, 1.0, 0], [0, 0, 1.0]])
    with pytest.raises(ValueError, match="not positive definite"):
        _model(w, means, bad)
    with pytest.raises(ValueError, match="disagree"):
        _model(w[:2] / w[:2].sum(), means, covs)
    with pytest.raises(ValueError, match="k and dim for the priors"):
        GaussianMixture(k=2)
    with pytest.raises(ValueError, match="NaN"):
        GaussianMixture.mle(np.array([[0.0, np.nan], [1.0, 1.0], [2.0, 0.0]]), k=1)
    with pytest.raises(ValueError, match="exceeds the number of rows"):
        GaussianMixture.mle(np.zeros((3, 2)), k=4)
    gm = _model(w, means, covs)
    with pytest.raises(ValueError, match="must have shape"):
        gm.posterior(torch.zeros(4, 2, dtype=F64))
    with pytest.raises(ValueError, match="infinite"):
        gm.log_prob(y=torch.tensor([np.inf, 0.0, 0.0], dtype=F64))

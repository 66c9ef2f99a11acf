"""HMM: forward log p, forward-backward marginals and Viterbi against brute-force
enumeration of all K^T paths and against hmmlearn; Baum-Welch against hmmlearn and
simulated truth; the story (Pyro DiscreteHMM) and the generic MAP route.

Tolerances: 1e-9 (float64) against enumeration, 1e-6 against hmmlearn."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from hmmlearn import hmm as hl
from scipy.stats import multivariate_normal

import genprog as gp
from genprog.models.hmm import HMM

D = torch.float64
PI = torch.tensor([0.5, 0.3, 0.2], dtype=D)
A = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6]], dtype=D)
B = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], dtype=D)
MU = torch.tensor([[0.0, 0.0], [2.0, 1.0]], dtype=D)
S = torch.stack([torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=D),
                 torch.tensor([[0.6, -0.2], [-0.2, 1.5]], dtype=D)])
A2 = torch.tensor([[0.9, 0.1], [0.25, 0.75]], dtype=D)
PI2 = torch.tensor([0.6, 0.4], dtype=D)


def categorical():
    return HMM(initial=PI, transition=A, emission_probs=B, length=4)


def gaussian(full=True):
    cov = S if full else torch.diagonal(S, dim1=-2, dim2=-1)
    return HMM(initial=PI2, transition=A2, means=MU, covariances=cov, length=4)


def brute_force(init, trans, emis_logp):
    """All K^T paths: log p(y), state marginals [T, K], the best path (emis_logp [T, K])."""
    T, K = emis_logp.shape
    paths, logps = [], []
    for path in itertools.product(range(K), repeat=T):
        lp = np.log(init[path[0]]) + emis_logp[0, path[0]]
        for t in range(1, T):
            lp += np.log(trans[path[t - 1], path[t]]) + emis_logp[t, path[t]]
        paths.append(path)
        logps.append(lp)
    logps = np.array(logps)
    logZ = np.logaddexp.reduce(logps)
    w = np.exp(logps - logZ)
    marg = np.zeros((T, K))
    for path, wi in zip(paths, w):
        marg[np.arange(T), path] += wi
    return logZ, marg, list(paths[int(np.argmax(logps))])


@pytest.mark.reference("HMM", "log_prob", "brute-force enumeration of all K^T paths")
@pytest.mark.reference("HMM", "posterior", "brute-force enumeration of all K^T paths")
def test_categorical_matches_brute_force_with_missing_steps():
    m = categorical()
    y = torch.tensor([[0.0, 2.0, float("nan"), 1.0], [1.0, 1.0, 0.0, 2.0]], dtype=D)
    lp = m.log_prob(y=y, pointwise=True)
    post = m.posterior(y)
    path = m.viterbi(y)
    for i in range(2):
        yi = y[i].numpy()
        emis = np.array([[0.0] * 3 if np.isnan(v) else np.log(B[:, int(v)].numpy()) for v in yi])
        logZ, marg, best = brute_force(PI.numpy(), A.numpy(), emis)
        assert abs(float(lp[i]) - logZ) < 1e-9
        np.testing.assert_allclose(post[i].numpy(), marg, atol=1e-9)
        assert path[i].tolist() == best
    assert post.shape == (2, 4, 3) and m.posterior(y[1]).shape == (4, 3)


@pytest.mark.reference("HMM", "log_prob", "brute force with SciPy multivariate_normal emissions")
@pytest.mark.reference("HMM", "posterior", "brute force with SciPy multivariate_normal emissions")
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_gaussian_matches_brute_force_with_missing_entries(full):
    m = gaussian(full)
    y = m.sample(2, seed=1)["y"].clone()
    y[0, 1, 0] = float("nan")       # a partially observed vector
    y[1, 2] = float("nan")          # a missing time step
    lp, post, path = m.log_prob(y=y, pointwise=True), m.posterior(y), m.viterbi(y)
    covs = S.numpy() if full else np.stack([np.diag(np.diag(s)) for s in S.numpy()])
    for i in range(2):
        emis = np.zeros((4, 2))
        for t in range(4):
            o = ~np.isnan(y[i, t].numpy())
            for k in range(2):
                if o.any():
                    emis[t, k] = multivariate_normal(MU[k].numpy()[o], covs[k][np.ix_(o, o)]).logpdf(
                        y[i, t].numpy()[o])
        logZ, marg, best = brute_force(PI2.numpy(), A2.numpy(), emis)
        assert abs(float(lp[i]) - logZ) < 1e-9
        np.testing.assert_allclose(post[i].numpy(), marg, atol=1e-9)
        assert path[i].tolist() == best


def _hmmlearn_categorical():
    ref = hl.CategoricalHMM(n_components=3, n_features=3)
    ref.startprob_, ref.transmat_, ref.emissionprob_ = PI.numpy(), A.numpy(), B.numpy()
    return ref


@pytest.mark.reference("HMM", "log_prob", "hmmlearn CategoricalHMM.score")
@pytest.mark.reference("HMM", "log_marginal", "hmmlearn CategoricalHMM.score")
@pytest.mark.reference("HMM", "posterior", "hmmlearn CategoricalHMM.predict_proba")
def test_categorical_matches_hmmlearn():
    m = HMM(initial=PI, transition=A, emission_probs=B, length=30)
    y = m.sample(3, seed=0)["y"].to(D)
    ref = _hmmlearn_categorical()
    lp, post, path = m.log_prob(y=y, pointwise=True), m.posterior(y), m.viterbi(y)
    for i in range(3):
        X = y[i].long().numpy().reshape(-1, 1)
        assert abs(float(lp[i]) - ref.score(X)) < 1e-6
        np.testing.assert_allclose(post[i].numpy(), ref.predict_proba(X), atol=1e-6)
        _, states = ref.decode(X, algorithm="viterbi")
        assert path[i].tolist() == states.tolist()
    est = m.condition(y=y).log_marginal()
    assert est.method == "exact" and est.stderr == 0
    assert abs(est.value - sum(ref.score(y[i].long().numpy().reshape(-1, 1)) for i in range(3))) < 1e-6


@pytest.mark.reference("HMM", "log_prob", "hmmlearn GaussianHMM.score (full and diag)")
@pytest.mark.reference("HMM", "posterior", "hmmlearn GaussianHMM.predict_proba")
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_gaussian_matches_hmmlearn(full):
    cov = S if full else torch.diagonal(S, dim1=-2, dim2=-1)
    m = HMM(initial=PI2, transition=A2, means=MU, covariances=cov, length=25)
    y = m.sample(2, seed=3)["y"]
    ref = hl.GaussianHMM(n_components=2, covariance_type="full" if full else "diag")
    ref.startprob_, ref.transmat_, ref.means_ = PI2.numpy(), A2.numpy(), MU.numpy()
    ref.covars_ = cov.numpy()
    lp, post, path, best = (m.log_prob(y=y, pointwise=True), m.posterior(y),
                            *m.viterbi(y, return_log_prob=True))
    for i in range(2):
        X = y[i].numpy()
        assert abs(float(lp[i]) - ref.score(X)) < 1e-6
        np.testing.assert_allclose(post[i].numpy(), ref.predict_proba(X), atol=1e-6)
        logp, states = ref.decode(X)
        assert path[i].tolist() == states.tolist() and abs(float(best[i]) - logp) < 1e-6


def test_missing_steps_contribute_one():
    m = categorical()
    y = torch.tensor([1.0, float("nan"), float("nan"), float("nan")], dtype=D)
    assert abs(float(m.log_prob(y=y)) - float(torch.log(PI @ B[:, 1]))) < 1e-12
    assert float(m.log_prob(y=torch.full((4,), float("nan"), dtype=D))) == pytest.approx(0.0, abs=1e-12)
    g = gaussian()
    assert float(g.log_prob(y=torch.full((4, 2), float("nan"), dtype=D))) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.reference("HMM", "log_marginal", "the story's generic exact evidence (Pyro DiscreteHMM)")
def test_story_density_and_sampling():
    m = categorical()
    y = m.sample(3, seed=0)["y"].to(D)
    generic = gp.Model(HMM.story, n=None, **m.params).to(dtype=D).condition(y=y[0]).log_marginal()
    assert abs(generic.value - float(m.log_prob(y=y[0]))) < 1e-9
    # marginal frequencies of y_1 and y_2 against PI B and PI A B (4000 draws, ~4 sd)
    draws = m.sample(4000, seed=1)["y"]
    for t, probs in ((0, PI @ B), (1, PI @ A @ B)):
        freq = torch.bincount(draws[:, t].long(), minlength=3).to(D) / 4000
        assert ((freq - probs).abs() < 4 * torch.sqrt(probs * (1 - probs) / 4000)).all()
    x, ys = m.sample_states(4000, seed=2)
    freq = torch.bincount(x[:, 1], minlength=3).to(D) / 4000
    assert ((freq - PI @ A).abs() < 0.03).all()
    agree = (ys[x == 0] == 0).to(D).mean()
    assert abs(float(agree) - 0.7) < 0.03


@pytest.mark.reference("HMM", "mle", "hmmlearn GaussianHMM.fit from the same start; simulated truth")
def test_baum_welch_matches_hmmlearn_and_recovers_truth():
    truth = HMM(initial=PI2, transition=A2, means=MU * 2, covariances=S, length=40)
    y = truth.sample(30, seed=0)["y"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = HMM.mle(y, k=2, emission="gaussian", max_iters=300, tol=1e-10)
    order = torch.argsort(fit.kwargs["means"][:, 0])
    assert torch.allclose(fit.kwargs["means"][order], MU * 2, atol=0.25)
    assert torch.allclose(fit.kwargs["transition"][order][:, order], A2, atol=0.06)
    assert fit.info.log_likelihood >= float(truth.log_prob(y=y)) - 1e-6
    # hmmlearn from the same start reaches the same maximum
    ref = hl.GaussianHMM(n_components=2, covariance_type="full", init_params="", params="stmc",
                         n_iter=300, tol=1e-10, min_covar=1e-6, covars_prior=0.0)
    ref.startprob_, ref.transmat_ = PI2.numpy(), A2.numpy()
    ref.means_, ref.covars_ = (MU * 2).numpy(), S.numpy()
    X = y.reshape(-1, 2).numpy()
    ref.fit(X, lengths=[40] * 30)
    refll = sum(ref.score(y[i].numpy()) for i in range(30))
    assert abs(fit.info.log_likelihood - refll) < 1e-3
    assert torch.allclose(fit.kwargs["means"][order], torch.from_numpy(ref.means_), atol=1e-3)


@pytest.mark.reference("HMM", "mle", "hmmlearn CategoricalHMM.fit from the same start")
def test_categorical_baum_welch_with_missing_matches_hmmlearn_without():
    m = HMM(initial=PI, transition=A, emission_probs=B, length=20)
    y = m.sample(20, seed=4)["y"].to(D)
    init = HMM(initial=torch.full((3,), 1 / 3, dtype=D), transition=0.5 * torch.eye(3, dtype=D) + 0.5 / 3,
               emission_probs=torch.tensor([[.5, .3, .2], [.2, .6, .2], [.3, .3, .4]], dtype=D))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = HMM.mle(y, k=3, init=init, max_iters=25, tol=0.0)
    ref = hl.CategoricalHMM(n_components=3, n_features=3, init_params="", params="ste",
                            n_iter=25, tol=0.0)
    ref.startprob_, ref.transmat_ = init.kwargs["initial"].numpy(), init.kwargs["transition"].numpy()
    ref.emissionprob_ = init.kwargs["emission_probs"].numpy()
    ref.fit(y.long().reshape(-1, 1).numpy(), lengths=[20] * 20)
    np.testing.assert_allclose(fit.kwargs["transition"].numpy(), ref.transmat_, atol=1e-8)
    np.testing.assert_allclose(fit.kwargs["emission_probs"].numpy(), ref.emissionprob_, atol=1e-8)
    # missing steps: EM runs and the likelihood (of the observed steps) does not decrease
    y2 = y.clone()
    y2[:, 5:8] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit2 = HMM.mle(y2, k=3, init=init, max_iters=30, tol=0.0)
    trace = np.array(fit2.info.trace)
    assert (np.diff(trace) > -1e-9).all()


def test_generic_map_fit_lands_near_truth():
    truth = HMM(initial=PI2, transition=A2, means=MU * 2, covariances=S, length=30)
    y = truth.sample(10, seed=5)["y"]
    model = HMM(initial=PI2, means=MU * 2, covariances=S, length=30).condition(y=y)
    fit = model.fit("map", seed=0)
    est = fit.draws["transition"].reshape(2, 2)
    assert torch.allclose(est.to(D), A2, atol=0.1)


def test_bad_inputs():
    with pytest.raises(ValueError, match="transition: each row must sum to 1"):
        HMM(initial=PI, transition=A * 1.1, emission_probs=B)
    with pytest.raises(ValueError, match="not positive definite"):
        HMM(initial=PI2, transition=A2, means=MU, covariances=-S)
    with pytest.raises(ValueError, match="symbols in 0..2"):
        categorical().log_prob(y=torch.tensor([0.0, 3.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"y must be \[T, 2\]"):
        gaussian().log_prob(y=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="covariance_type must be"):
        HMM.mle(torch.randn(2, 5, 2), k=2, covariance_type="tied")
    with pytest.raises(ValueError, match="both categorical"):
        HMM(initial=PI, transition=A, emission_probs=B, means=MU)
    with pytest.raises(ValueError, match="emission_probs"):
        HMM(initial=PI, transition=A, emission="categorical", num_symbols=3, length=2).log_prob(
            y=torch.zeros(2))

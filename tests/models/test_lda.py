"""LDA: topic recovery by variational EM (Hungarian matching), the importance-sampling
log p calibrated against exact values (1-D quadrature for K = 2, brute-force enumeration
of token assignments, one-word documents), held-out fit against scikit-learn's
LatentDirichletAllocation, sampling moments, the variational posterior, bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.optimize import linear_sum_assignment
from scipy.special import gammaln
from scipy.stats import beta as beta_dist
from sklearn.decomposition import LatentDirichletAllocation

from genprog.models.lda import LDA, multinomial_log_coefficient

F64 = torch.float64


def _topics(K=4, V=40, seed=0):
    """Well-separated topics: topic k puts most mass on words [10k, 10k + 10)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.full((K, V), 0.02, dtype=F64)
    for k in range(K):
        t[k, 10 * k:10 * (k + 1)] += torch.rand(10, generator=g, dtype=F64) + 0.5
    return t / t.sum(-1, keepdim=True)


@pytest.fixture(scope="module")
def corpus():
    truth = LDA(topics=_topics(), alpha=0.3, doc_length=80)
    Y = truth.sample(400, seed=0)["y"]
    return truth, Y[:300], Y[300:]


@pytest.fixture(scope="module")
def fitted(corpus):
    _, train, _ = corpus
    return LDA.mle(train, k=4, alpha=0.3, seed=0)


def _match(true, learned):
    cos = (true @ learned.T) / np.outer(np.linalg.norm(true, axis=1), np.linalg.norm(learned, axis=1))
    i, j = linear_sum_assignment(-cos)
    return cos[i, j], 0.5 * np.abs(true[i] - learned[j]).sum(1)


def test_variational_em_recovers_topics(corpus, fitted):
    truth, train, _ = corpus
    assert fitted.dtype == F64 and fitted.kwargs["topics"].shape == (4, 40)
    cos, tv = _match(truth.kwargs["topics"].numpy(), fitted.kwargs["topics"].numpy())
    assert cos.min() > 0.99 and tv.max() < 0.08, (cos, tv)
    info = fitted.info
    assert info.converged and info.doc_topic.shape == (300, 4)
    assert np.all(np.diff(info.trace) > -1e-6)  # the ELBO per word never drops
    learned = LDA.mle(train, k=4, seed=1, max_iters=100)  # alpha learned too
    a = learned.kwargs["alpha"]
    assert a.shape == (4,) and bool(((a > 0.15) & (a < 0.6)).all()), a  # truth 0.3


def _exact_k2(y, topics, alpha):
    """log p(y | N) for K = 2 by 1-D quadrature over theta_1 ~ Beta(alpha_1, alpha_2)."""
    t = topics.numpy()
    a1, a2 = alpha

    def log_f(s):
        return np.sum(y * np.log(s * t[0] + (1 - s) * t[1])) + beta_dist.logpdf(s, a1, a2)

    grid = np.linspace(1e-9, 1 - 1e-9, 4001)
    vals = (y * np.log(np.outer(grid, t[0]) + np.outer(1 - grid, t[1]))).sum(1) \
        + beta_dist.logpdf(grid, a1, a2)
    top = vals.max()
    integral = quad(lambda s: np.exp(log_f(s) - top), 0, 1, points=[grid[vals.argmax()]],
                    limit=200, epsabs=1e-14, epsrel=1e-8)[0]
    return gammaln(y.sum() + 1) - gammaln(y + 1).sum() + top + np.log(integral)


@pytest.mark.parametrize("proposal,num_samples", [("variational", 4000), ("prior", 20000)])
def test_log_prob_estimate_is_calibrated_by_quadrature(proposal, num_samples):
    topics = torch.distributions.Dirichlet(torch.full((20,), 0.5, dtype=F64)).sample((2,))
    alpha = torch.tensor([0.5, 0.8], dtype=F64)
    m = LDA(topics=topics, alpha=alpha, doc_length=30)
    Y = m.sample(12, seed=1)["y"]
    exact = np.array([_exact_k2(y.numpy(), topics, alpha.numpy()) for y in Y])
    est = m._log_prob_estimate(Y, num_samples=num_samples, proposal=proposal, seed=2)
    assert est.method == "is" and 0 < est.stderr < 0.1
    assert abs(est.value - exact.sum()) < 4 * est.stderr
    z = (est.details["pointwise"].numpy() - exact) / est.details["pointwise_stderr"].numpy()
    assert np.all(np.abs(z) < 4.5), z


def test_log_prob_estimate_matches_brute_force_token_enumeration():
    K, V = 3, 6
    topics = torch.distributions.Dirichlet(torch.ones(V, dtype=F64)).sample((K,))
    alpha = torch.tensor([0.4, 1.0, 2.0], dtype=F64)
    m = LDA(topics=topics, alpha=alpha, doc_length=5)
    Y = m.sample(6, seed=0)["y"]
    a, t = alpha.numpy(), topics.numpy()
    exact = []
    for y in Y.numpy().astype(int):
        tokens = np.repeat(np.arange(V), y)
        total = -np.inf  # log sum over all K^N topic assignments z of prod beta * E[prod theta]
        for z in itertools.product(range(K), repeat=len(tokens)):
            n = np.bincount(z, minlength=K)
            log_moment = (gammaln(a.sum()) - gammaln(a.sum() + len(tokens))
                          + (gammaln(a + n) - gammaln(a)).sum())
            total = np.logaddexp(total, np.log(t[list(z), tokens]).sum() + log_moment)
        exact.append(total + gammaln(y.sum() + 1) - gammaln(y + 1).sum())
    exact = np.array(exact)
    for proposal in ("variational", "prior"):
        est = m._log_prob_estimate(Y, num_samples=20000, proposal=proposal, seed=1)
        assert est.stderr < 0.05
        assert abs(est.value - exact.sum()) < 4 * est.stderr, (proposal, est, exact.sum())


def test_one_word_documents_have_closed_form():
    topics = _topics(K=3, V=40)
    alpha = torch.tensor([0.2, 0.5, 1.3], dtype=F64)
    m = LDA(topics=topics, alpha=alpha, doc_length=1)
    Y = torch.eye(40, dtype=F64)[[0, 5, 12, 25, 39]]
    exact = torch.log((alpha / alpha.sum()) @ topics)[[0, 5, 12, 25, 39]]
    est = m._log_prob_estimate(Y, num_samples=5000, proposal="prior")
    assert abs(est.value - float(exact.sum())) < 4 * est.stderr and est.stderr < 0.05


def test_held_out_fit_is_comparable_to_sklearn(corpus, fitted):
    _, train, test = corpus
    sk = LatentDirichletAllocation(n_components=4, doc_topic_prior=0.3, topic_word_prior=0.01,
                                   learning_method="batch", max_iter=30, random_state=0)
    sk.fit(train.numpy())
    sk_topics = torch.tensor(sk.components_ / sk.components_.sum(1, keepdims=True))
    sk_model = LDA(topics=sk_topics, alpha=0.3)
    ours = fitted._log_prob_estimate(test, num_samples=1000, seed=0)
    theirs = sk_model._log_prob_estimate(test, num_samples=1000, seed=0)
    words = float(test.sum())
    # the same estimator on both fits: ours no worse than 0.01 nats/word
    assert ours.value / words > theirs.value / words - 0.01
    # perplexity per token (no multinomial coefficient) vs scikit-learn's own (a bound)
    token_lp = ours.value - float(multinomial_log_coefficient(test).sum())
    assert np.exp(-token_lp / words) < 1.02 * sk.perplexity(test.numpy())


def test_sample_moments_and_variational_posterior():
    topics, alpha = _topics(), torch.tensor([0.3, 0.5, 0.8, 1.0], dtype=F64)
    m = LDA(topics=topics, alpha=alpha, doc_length=400)
    s = m.sample(3000, seed=0)
    y, theta = s["y"], s["theta"]
    assert y.shape == (3000, 40) and theta.shape == (3000, 4)
    assert torch.all(y.sum(-1) == 400)
    mean = 400 * (alpha / alpha.sum()) @ topics
    se = y.std(0) / 3000 ** 0.5
    assert torch.all((y.mean(0) - mean).abs() < 4.5 * se)
    q = m.posterior_estimate(y[:200])
    assert q.batch_shape == (200,) and q.event_shape == (4,)
    assert float((q.mean - theta[:200]).abs().mean()) < 0.03
    assert m.posterior_estimate(y[0]).batch_shape == ()


def test_bad_input():
    t = _topics()
    with pytest.raises(ValueError, match="sum to 1"):
        LDA(topics=2 * t, alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        LDA(topics=t, alpha=-1.0)
    with pytest.raises(ValueError, match="disagree"):
        LDA(topics=t, alpha=torch.ones(3))
    with pytest.raises(ValueError, match="k and vocab_size"):
        LDA(alpha=1.0)
    m = LDA(topics=t, alpha=1.0)
    with pytest.raises(ValueError, match="integer word counts"):
        m._log_prob_estimate(torch.full((2, 40), 0.5))
    with pytest.raises(ValueError, match="shape"):
        m.posterior_estimate(torch.ones(2, 7))
    with pytest.raises(ValueError, match="unknown proposal"):
        m._log_prob_estimate(torch.ones(2, 40), proposal="laplace")
    with pytest.raises(TypeError):
        m._log_prob_estimate(torch.ones(2, 40), num_particles=10)
    with pytest.raises(ValueError, match="integer word counts"):
        LDA.mle(-torch.ones(5, 4), k=2)
    with pytest.raises(ValueError, match="k must be"):
        LDA.mle(torch.ones(5, 4), k=0)

"""MADE: exact log p against brute-force enumeration (normalisation, chain rule,
autoregressive masks), prefix marginals exact, other subsets estimated and calibrated,
training beats an independent-Bernoulli baseline on binarized digits."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from genprog.errors import ConvergenceWarning
from genprog.models.made import MADE, MADENet, binarized_digits

D = 5


def _made(order=None, seed=1):
    torch.manual_seed(seed)
    net = MADENet(D, hidden=(16, 16), order=order, seed=seed)
    with torch.no_grad():  # sharpen the random network so the distribution is far from uniform
        for p in net.parameters():
            p.mul_(3.0)
    return MADE(net=net)


ALL = torch.tensor(list(itertools.product([0.0, 1.0], repeat=D)))


@pytest.mark.reference("MADE", "log_prob", "brute-force enumeration of all 2^d states and a per-coordinate chain-rule loop")
@pytest.mark.reference("MADE", "log_marginal", "brute-force enumeration (sum of row log p)")
@pytest.mark.parametrize("order", [None, [3, 0, 4, 1, 2]])
def test_log_prob_is_a_normalised_chain_rule(order):
    m = _made(order)
    with torch.no_grad():
        lp = m.log_prob(y=ALL, pointwise=True)
        assert abs(float(torch.logsumexp(lp, 0))) < 1e-5
        # chain rule by an independent loop: p(y_i | y_<i) from inputs with later coords scrambled
        order_list = list(range(D)) if order is None else order
        manual = torch.zeros(len(ALL))
        for pos, i in enumerate(order_list):
            later = order_list[pos:]
            scrambled = ALL.clone()
            scrambled[:, later] = torch.bernoulli(torch.full((len(ALL), len(later)), 0.5))
            p1 = torch.sigmoid(m.net(scrambled)[:, i])
            manual += torch.where(ALL[:, i] == 1, p1, 1 - p1).log()
        torch.testing.assert_close(lp, manual, rtol=1e-5, atol=1e-5)
        est = m.condition(y=ALL[:7]).log_marginal()
        assert est.method == "exact"
        assert abs(est.value - float(lp[:7].sum())) < 1e-4


def _enumerated_marginal(m, row):
    obs = ~torch.isnan(row)
    with torch.no_grad():
        lp = m.log_prob(y=ALL, pointwise=True)
    match = (ALL[:, obs] == row[obs]).all(-1)
    return float(torch.logsumexp(lp[match], 0)), lp, match


def test_prefix_marginal_is_exact_and_other_subsets_are_calibrated():
    m = _made()
    prefix = torch.tensor([1.0, 0.0, float("nan"), float("nan"), float("nan")])
    est = m.marginal_log_prob(prefix)
    assert est.method == "exact" and est.stderr == 0
    assert abs(est.value - _enumerated_marginal(m, prefix)[0]) < 1e-5
    hits = 0
    row = torch.tensor([float("nan"), 1.0, float("nan"), 0.0, 1.0])
    exact = _enumerated_marginal(m, row)[0]
    for seed in range(5):
        est = m.marginal_log_prob(row, num_samples=400, seed=seed)
        assert est.method == "sis" and est.stderr > 0
        hits += abs(est.value - exact) < 3 * est.stderr
    assert hits >= 4
    sub = m.marginalize(dims=[0, 2])
    e2 = sub.log_prob(torch.tensor([1.0, 0.0, 1.0]), num_samples=4000)
    assert abs(e2.value - exact) < 4 * e2.stderr + 1e-6


def test_samples_and_conditional_samples_match_enumeration():
    m = _made()
    with torch.no_grad():
        probs = m.log_prob(y=ALL, pointwise=True).exp()
        draws = m.sample(20000, seed=0)["y"]
    codes = (draws * 2 ** torch.arange(D - 1, -1, -1)).sum(-1).long()
    freq = torch.bincount(codes, minlength=2**D).double() / len(codes)
    assert 0.5 * float((freq - probs.double()).abs().sum()) < 0.03
    row = torch.tensor([float("nan"), 1.0, float("nan"), 0.0, float("nan")])
    _, lp, match = _enumerated_marginal(m, row)
    cond = torch.where(match, lp, torch.tensor(-float("inf"))).softmax(0)
    comp = m.condition(dims={1: 1.0, 3: 0.0}).sample(4000, seed=1)["y"]
    full = torch.zeros(len(comp), D)
    full[:, [0, 2, 4]] = comp
    full[:, 1], full[:, 3] = 1.0, 0.0
    codes = (full * 2 ** torch.arange(D - 1, -1, -1)).sum(-1).long()
    freq = torch.bincount(codes, minlength=2**D).double() / len(codes)
    assert 0.5 * float((freq - cond.double()).abs().sum()) < 0.06


def test_trained_made_beats_independent_bernoulli_on_digits():
    x, _ = binarized_digits()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, test = x[perm[:1400]], x[perm[1400:]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        m = MADE.mle(train, hidden=(128,), max_iters=400, batch_size=128, learning_rate=3e-3)
    with torch.no_grad():
        made_lp = float(m.log_prob(y=test)) / len(test)
    p = ((train.sum(0) + 1) / (len(train) + 2)).clamp(1e-4, 1 - 1e-4)
    indep = float(torch.distributions.Bernoulli(p).log_prob(test).sum(-1).mean())
    assert made_lp > indep + 5.0, (made_lp, indep)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="permutation"):
        MADENet(3, order=[0, 0, 1])
    with pytest.raises(TypeError, match="MADENet"):
        MADE(net=torch.nn.Linear(2, 2))
    m = _made()
    with pytest.raises(ValueError, match="0/1"):
        m.log_prob(y=torch.full((2, D), 0.5))
    with pytest.raises(ValueError, match="shape"):
        m.log_prob(y=torch.zeros(2, D + 1))

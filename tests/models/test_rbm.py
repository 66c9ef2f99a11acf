"""RBM: exact log p / log Z / p(h | v) against brute-force enumeration of the joint,
sampling (exact and block Gibbs) against enumerated marginals, AIS calibration against
exact log Z, PCD against the exact log-likelihood, the generic MAP route, bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from genprog.models.rbm import RBM, RBMVisible

F64 = torch.float64


def _rbm(V, H, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = scale * torch.randn(V, H, generator=g, dtype=F64)
    b = 0.5 * torch.randn(V, generator=g, dtype=F64)
    c = 0.5 * torch.randn(H, generator=g, dtype=F64)
    return W, b, c


def _brute_force(W, b, c):
    """Joint log p(v, h) over every (v, h) from the energy, in NumPy: ``[2^V, 2^H]``,
    with the states as arrays of 0/1 (itertools order)."""
    W, b, c = (t.numpy() for t in (W, b, c))
    V, H = W.shape
    vs = np.array(list(itertools.product([0, 1], repeat=V)), dtype=float)
    hs = np.array(list(itertools.product([0, 1], repeat=H)), dtype=float)
    neg_e = (vs @ b)[:, None] + (hs @ c)[None, :] + vs @ W @ hs.T
    log_z = np.logaddexp.reduce(neg_e.ravel())
    return vs, hs, neg_e - log_z, log_z


@pytest.mark.reference("RBM", "log_prob", "brute-force sum of exp(-E(v, h)) over all (v, h)")
@pytest.mark.reference("RBM", "log_marginal", "brute-force enumeration of the joint")
@pytest.mark.parametrize("V,H", [(5, 3), (3, 6)], ids=["enumerate-visible", "enumerate-hidden"])
def test_log_prob_and_log_partition_match_brute_force(V, H):
    W, b, c = _rbm(V, H)
    vs, _, joint, log_z = _brute_force(W, b, c)
    ref = np.logaddexp.reduce(joint, axis=1)  # log p(v) for every v
    m = RBM(W=W, b=b, c=c)
    assert m.log_partition() == pytest.approx(log_z, abs=1e-10)
    lp = m.log_prob(y=torch.tensor(vs), pointwise=True)
    np.testing.assert_allclose(lp.numpy(), ref, atol=1e-10)
    assert np.exp(ref).sum() == pytest.approx(1.0, abs=1e-12)
    Y = torch.tensor(vs[[0, 3, 3, 7]])
    total = float(ref[[0, 3, 3, 7]].sum())
    assert float(m.log_prob(y=Y)) == pytest.approx(total, abs=1e-10)
    est = m.condition(y=Y).log_marginal()
    assert est.method == "exact" and est.value == pytest.approx(total, abs=1e-10)


@pytest.mark.reference("RBM", "posterior", "brute-force p(h | v) = p(v, h) / sum_h p(v, h)")
def test_posterior_is_brute_force_conditional():
    W, b, c = _rbm(4, 3)
    vs, hs, joint, _ = _brute_force(W, b, c)
    cond = joint - np.logaddexp.reduce(joint, axis=1, keepdims=True)  # [2^V, 2^H]
    post = RBM(W=W, b=b, c=c).posterior(torch.tensor(vs))
    assert post.batch_shape == (16,) and post.event_shape == (3,)
    lp = post.log_prob(torch.tensor(hs).unsqueeze(1))  # [2^H, 2^V]
    np.testing.assert_allclose(lp.numpy().T, cond, atol=1e-10)
    one = RBM(W=W, b=b, c=c).posterior(torch.tensor(vs[5]))
    assert one.batch_shape == ()


@pytest.mark.parametrize("method,burn_in", [("exact", 1), ("gibbs", 300)])
def test_sample_marginals_match_enumeration(method, burn_in):
    W, b, c = _rbm(5, 3, scale=1.5, seed=1)
    vs, hs, joint, _ = _brute_force(W, b, c)
    p = np.exp(joint)
    ev, eh = p.sum(1) @ vs, p.sum(0) @ hs
    evh = vs.T @ p @ hs  # E[v_i h_j]
    n = 20000
    s = RBM(W=W, b=b, c=c).sample(n, seed=3, method=method, burn_in=burn_in)
    v, h = s["y"].numpy(), s["h"].numpy()
    assert v.shape == (n, 5) and h.shape == (n, 3)
    for est, ref in ((v.mean(0), ev), (h.mean(0), eh), ((v.T @ h) / n, evh)):
        se = np.sqrt(ref * (1 - ref) / n)
        assert np.all(np.abs(est - ref) < 4.5 * se + 1e-12), (est, ref)


def test_ais_log_partition_is_calibrated_against_exact():
    W, b, c = _rbm(12, 16, scale=0.4, seed=2)
    m = RBM(W=W, b=b, c=c)
    exact = m.log_partition()
    est = m.log_partition_estimate(num_particles=100, num_temps=500, seed=0)
    assert est.method == "ais" and 0 < est.stderr < 0.05
    assert abs(est.value - exact) < 4 * est.stderr + 1e-3
    V = m.sample(10, seed=0)["y"]
    lp = m._log_prob_estimate(V, num_particles=100, num_temps=500, seed=1)
    assert abs(lp.value - float(m.log_prob(y=V))) < 4 * lp.stderr + 1e-2
    assert lp.stderr == pytest.approx(10 * m.log_partition_estimate(
        num_particles=100, num_temps=500, seed=1).stderr)


def test_ais_with_data_base_rate_and_too_large_to_enumerate():
    W, b, c = _rbm(12, 30, scale=0.3, seed=4)
    m = RBM(W=W, b=b, c=c, max_enumerate=8)
    with pytest.raises(ValueError, match="AIS estimate"):
        m.log_prob(y=torch.zeros(12, dtype=F64))
    exact = RBM(W=W, b=b, c=c).log_partition()  # 2^12 states
    data = RBM(W=W, b=b, c=c).sample(500, seed=0)["y"]
    p = data.mean(0).clamp(0.01, 0.99)
    est = m.log_partition_estimate(num_particles=100, num_temps=500, base_bias=torch.logit(p))
    assert abs(est.value - exact) < 4 * est.stderr + 1e-3 and est.stderr < 0.05
    assert m.sample(7, seed=0, burn_in=20)["y"].shape == (7, 12)  # Gibbs fallback


@pytest.mark.reference("RBM", "mle", "exact log-likelihood by enumeration vs init and "
                       "independent-Bernoulli baseline")
def test_pcd_raises_exact_log_likelihood():
    # two "bars": hidden unit j switches visible block j on; strongly correlated visibles
    W = torch.zeros(8, 2, dtype=F64)
    W[:4, 0], W[4:, 1] = 4.0, 4.0
    truth = RBM(W=W, b=torch.full((8,), -2.0, dtype=F64), c=torch.full((2,), -8.0, dtype=F64))
    Y = truth.sample(2000, seed=0)["y"]
    p = Y.mean(0).clamp(1e-3, 1 - 1e-3)
    baseline = float((Y * p.log() + (1 - Y) * (-p).log1p()).sum(1).mean())
    fit = RBM.mle(Y, n_hidden=3, epochs=60, batch_size=50, lr=0.1, seed=0)
    assert fit.dtype == F64 and fit.kwargs["W"].shape == (8, 3)
    ll_fit = float(fit.log_prob(y=Y)) / 2000
    ll_true = float(truth.log_prob(y=Y)) / 2000
    init = RBM.mle(Y, n_hidden=3, epochs=1, lr=0.0, seed=0)  # lr 0: the initialisation
    ll_init = float(init.log_prob(y=Y)) / 2000
    assert ll_init == pytest.approx(baseline, abs=0.01)
    assert ll_true > baseline + 1.0  # the problem has structure to learn
    assert ll_fit > ll_init + 1.0
    assert ll_fit > ll_true - 0.1
    assert len(fit.info.reconstruction_error) == 60


def test_generic_map_recovers_visible_biases():
    W, b, c = _rbm(6, 3, seed=6)
    Y = RBM(W=W, b=b, c=c).sample(3000, seed=0)["y"]
    m = RBM(W=W, c=c, n_visible=6).to(dtype=F64)
    fit = m.condition(y=Y).fit("map")
    b_hat = fit.draws["b"].reshape(-1, 6)[0]
    assert torch.allclose(b_hat, b, atol=0.2), (b_hat, b)


def test_distribution_batches_and_expands():
    W, b, c = _rbm(4, 3)
    d = RBMVisible(W.expand(2, 4, 3), b, c)
    assert d.batch_shape == (2,) and d.event_shape == (4,)
    e = d.expand([5, 2])
    y = e.sample()
    assert y.shape == (5, 2, 4)
    np.testing.assert_allclose(e.log_prob(y).numpy(), d.log_prob(y).numpy())


def test_bad_input():
    W, b, c = _rbm(4, 3)
    with pytest.raises(ValueError, match="disagree"):
        RBM(W=W, b=torch.zeros(5), c=c)
    with pytest.raises(ValueError, match="matrix"):
        RBM(W=torch.zeros(4), b=b, c=c)
    with pytest.raises(ValueError, match="non-finite"):
        RBM(W=W * float("nan"), b=b, c=c)
    with pytest.raises(ValueError, match="give W"):
        RBM(b=b)
    m = RBM(W=W, b=b, c=c)
    with pytest.raises(ValueError, match="binary"):
        m.log_prob(y=torch.full((4,), 0.5, dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        m.posterior(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="unknown method"):
        m.sample(2, method="metropolis")
    with pytest.raises(ValueError, match="binary"):
        RBM.mle(torch.rand(10, 4), n_hidden=2)
    with pytest.raises(ValueError, match="n_hidden"):
        RBM.mle(torch.ones(10, 4), n_hidden=0)
    with pytest.raises(TypeError):
        m.log_partition_estimate(num_chains=3)
    with pytest.raises(ValueError, match="every parameter"):
        RBM(W=W, c=c).posterior(torch.zeros(4))

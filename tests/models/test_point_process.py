"""Point processes: exact sequence log-likelihoods against closed forms, SciPy quadrature
and a brute-force O(n^2) Hawkes sum; simulation checked by counts (scipy.stats.poisson)
and the time-rescaling theorem (KS); ML by recovery and against SciPy's optimiser."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate as si
import scipy.optimize as so
import scipy.special as sp
import scipy.stats as st
import torch

from genprog.models.point_process import (
    HawkesProcess,
    InhomogeneousPoissonProcess,
    PoissonProcess,
    event_lists,
    pad_events,
)

F64 = torch.float64
SEQS = [[0.3, 1.1, 1.7, 4.2], [2.5], [], [0.05, 0.1, 3.9, 4.0, 4.95]]
Y = pad_events(SEQS, max_events=8)


def rescaled_gaps(comp):
    """Increments of the compensator at the events, pooled over sequences."""
    out = []
    for r in comp:
        r = r[torch.isfinite(r)].numpy()
        out.extend(np.diff(np.r_[0.0, r]))
    return np.asarray(out)


# ---------------------------------------------------------------------------- Poisson
@pytest.mark.reference("PoissonProcess", "log_prob", "closed form N log rate - rate T = scipy.stats.poisson.logpmf(N) + log N! - N log T")
@pytest.mark.reference("PoissonProcess", "log_marginal", "closed form N log rate - rate T")
def test_poisson_log_prob():
    m = PoissonProcess(rate=1.7, T=5.0, max_events=8).to(dtype=F64)
    n = np.array([len(s) for s in SEQS])
    closed = n * np.log(1.7) - 1.7 * 5.0
    via_counts = st.poisson(1.7 * 5.0).logpmf(n) + sp.gammaln(n + 1) - n * np.log(5.0)
    np.testing.assert_allclose(closed, via_counts, atol=1e-12)
    np.testing.assert_allclose(m.log_prob(y=Y, pointwise=True).numpy(), closed, atol=1e-12)
    assert m.condition(y=Y).log_marginal().value == pytest.approx(closed.sum(), abs=1e-10)


@pytest.mark.reference("PoissonProcess", "sample", "counts vs scipy.stats.poisson (chi-square), times ~ Uniform(0, T) (KS)")
def test_poisson_sampling():
    m = PoissonProcess(rate=2.0, T=3.0).to(dtype=F64)
    y = m.simulate(3000, seed=0)
    counts = torch.isfinite(y).sum(1).numpy()
    ks = np.arange(0, 13)
    obs = np.array([(counts == k).sum() for k in ks[:-1]] + [(counts >= 12).sum()])
    p = st.poisson(6.0).pmf(ks[:-1])
    exp = 3000 * np.r_[p, 1 - p.sum()]
    assert st.chisquare(obs, exp).pvalue > 1e-3
    times = y[torch.isfinite(y)].numpy()
    assert st.kstest(times, st.uniform(0, 3.0).cdf).pvalue > 1e-3
    assert bool((y[:, 1:] >= y[:, :-1]).all())  # sorted, padding last


@pytest.mark.reference("PoissonProcess", "mle", "scipy.optimize.minimize_scalar of the closed-form negative log-likelihood")
def test_poisson_mle():
    y = PoissonProcess(rate=2.0, T=3.0).simulate(500, seed=1)
    fit = PoissonProcess.mle(y, T=3.0)
    n = int(torch.isfinite(y).sum())
    ref = so.minimize_scalar(lambda r: -(n * np.log(r) - r * 3.0 * 500), bounds=(0.01, 10),
                             method="bounded", options={"xatol": 1e-10})
    assert float(fit.kwargs["rate"]) == pytest.approx(ref.x, rel=1e-6)
    assert float(fit.kwargs["rate"]) == pytest.approx(2.0, rel=0.05)


# ---------------------------------------------------------------------------- inhomogeneous
RATES, EDGES = [1.0, 3.0, 0.5], [0.0, 1.0, 2.5, 5.0]


def piecewise(t):
    return np.where(t < 1.0, 1.0, np.where(t < 2.5, 3.0, 0.5))


def smooth_np(t):
    return 2.0 + np.sin(t)


def smooth(t):
    return 2.0 + torch.sin(t)


def ref_loglik(seqs, lam, T, points=None):
    total = si.quad(lam, 0, T, points=points, epsabs=1e-13, epsrel=1e-13)[0]
    return np.array([np.log(lam(np.asarray(s))).sum() - total for s in seqs])


@pytest.mark.reference("InhomogeneousPoissonProcess", "log_prob", "sum log lambda(t_i) - scipy.integrate.quad of the intensity")
@pytest.mark.reference("InhomogeneousPoissonProcess", "log_marginal", "sum log lambda(t_i) - scipy.integrate.quad of the intensity")
def test_inhomogeneous_log_prob():
    m = InhomogeneousPoissonProcess(rates=RATES, edges=EDGES, max_events=8).to(dtype=F64)
    ref = ref_loglik(SEQS, piecewise, 5.0, points=[1.0, 2.5])
    np.testing.assert_allclose(m.log_prob(y=Y, pointwise=True).numpy(), ref, atol=1e-10)
    assert m.condition(y=Y).log_marginal().value == pytest.approx(ref.sum(), abs=1e-9)
    c = InhomogeneousPoissonProcess(intensity=smooth, T=5.0, max_events=8).to(dtype=F64)
    ref = ref_loglik(SEQS, smooth_np, 5.0)
    np.testing.assert_allclose(c.log_prob(y=Y, pointwise=True).numpy(), ref, atol=1e-10)
    # the compensator at the events against quad
    comp = c.compensator(Y[0])
    want = [si.quad(smooth_np, 0, s, epsabs=1e-13)[0] for s in SEQS[0]]
    np.testing.assert_allclose(comp[:4].numpy(), want, atol=1e-10)
    assert bool(torch.isinf(comp[4:]).all())
    np.testing.assert_allclose(c.intensity(None, [0.5, 2.0]).numpy(), smooth_np(np.array([0.5, 2.0])))


@pytest.mark.reference("InhomogeneousPoissonProcess", "sample", "time rescaling: Lambda(t_i) / Lambda(T) ~ Uniform (KS); counts ~ Poisson(Lambda(T)) (scipy)")
@pytest.mark.parametrize("kind", ["piecewise", "callable"])
def test_inhomogeneous_sampling(kind):
    if kind == "piecewise":
        m = InhomogeneousPoissonProcess(rates=RATES, edges=EDGES).to(dtype=F64)
        total = si.quad(piecewise, 0, 5.0, points=[1.0, 2.5])[0]
    else:
        m = InhomogeneousPoissonProcess(intensity=smooth, T=5.0).to(dtype=F64)
        total = si.quad(smooth_np, 0, 5.0)[0]
    y = m.simulate(1500, seed=2)
    comp = m.compensator(y)
    u = comp[torch.isfinite(comp)].numpy() / total
    assert st.kstest(u, "uniform").pvalue > 1e-3
    counts = torch.isfinite(y).sum(1).numpy()
    assert abs(counts.mean() - total) < 4 * math.sqrt(total / 1500)
    assert counts.var() == pytest.approx(total, rel=0.15)


@pytest.mark.reference("InhomogeneousPoissonProcess", "mle", "numpy.histogram counts per piece over N x width")
def test_inhomogeneous_mle():
    m = InhomogeneousPoissonProcess(rates=RATES, edges=EDGES).to(dtype=F64)
    y = m.simulate(400, seed=3)
    fit = InhomogeneousPoissonProcess.mle(y, edges=EDGES)
    counts, _ = np.histogram(y[torch.isfinite(y)].numpy(), bins=EDGES)
    np.testing.assert_allclose(fit.kwargs["rates"].numpy(), counts / (400 * np.diff(EDGES)), rtol=1e-12)
    np.testing.assert_allclose(fit.kwargs["rates"].numpy(), RATES, rtol=0.1)


# ---------------------------------------------------------------------------- Hawkes
MU, ALPHA, BETA = 1.0, 0.8, 2.0


def brute_loglik(ts, mu, alpha, beta, T):
    """O(n^2) double sum: lambda(t_i) = mu + alpha sum_{j < i} exp(-beta (t_i - t_j))."""
    ts = np.asarray(ts, dtype=float)
    lag = ts[:, None] - ts[None, :]
    before = np.tril(np.ones_like(lag, dtype=bool), k=-1)
    lam = mu + alpha * np.where(before, np.exp(-beta * np.where(before, lag, 0.0)), 0.0).sum(1)
    return np.log(lam).sum() - mu * T - alpha / beta * (1 - np.exp(-beta * (T - ts))).sum()


def hawkes(T=5.0, **kw):
    return HawkesProcess(mu=MU, alpha=ALPHA, beta=BETA, T=T, **kw).to(dtype=F64)


@pytest.mark.reference("HawkesProcess", "log_prob", "brute-force O(n^2) double sum (numpy)")
@pytest.mark.reference("HawkesProcess", "log_marginal", "brute-force O(n^2) double sum (numpy)")
def test_hawkes_log_prob():
    m = hawkes(max_events=8)
    ref = np.array([brute_loglik(s, MU, ALPHA, BETA, 5.0) for s in SEQS])
    np.testing.assert_allclose(m.log_prob(y=Y, pointwise=True).numpy(), ref, atol=1e-10)
    assert m.condition(y=Y).log_marginal().value == pytest.approx(ref.sum(), abs=1e-9)
    # a long simulated sequence (recursion accuracy over hundreds of events)
    long = hawkes(T=200.0)
    y = long.simulate(1, seed=4)[0]
    ts = y[torch.isfinite(y)].numpy()
    assert float(long.log_prob(y=y)) == pytest.approx(brute_loglik(ts, MU, ALPHA, BETA, 200.0), abs=1e-8)


def test_hawkes_intensity_and_compensator():
    m = hawkes(max_events=8)
    hist = np.array(SEQS[3])
    t = np.array([0.0, 0.07, 2.0, 4.0, 4.5])
    want = [MU + ALPHA * np.exp(-BETA * (s - hist[hist < s])).sum() for s in t]
    np.testing.assert_allclose(m.intensity(Y[3], t).numpy(), want, atol=1e-12)
    comp = m.compensator(Y[3])
    lam = lambda s: MU + ALPHA * np.exp(-BETA * (s - hist[hist < s])).sum()
    want = [si.quad(lam, 0, s, points=hist[hist < s], limit=200, epsabs=1e-13)[0] for s in hist]
    np.testing.assert_allclose(comp[:5].numpy(), want, atol=1e-9)


@pytest.mark.reference("HawkesProcess", "sample", "time rescaling: compensator increments ~ Exp(1) (KS); mean count mu T / (1 - alpha/beta)")
def test_hawkes_sampling_time_rescaling():
    m = hawkes(T=300.0)
    y = m.simulate(6, seed=5)
    gaps = rescaled_gaps(m.compensator(y))
    assert gaps.size > 2000
    assert st.kstest(gaps, "expon").pvalue > 1e-3
    short = hawkes(T=10.0).simulate(1000, seed=6)
    counts = torch.isfinite(short).sum(1).numpy().astype(float)
    # E N(T) = mu T / (1 - n) - mu n / (beta (1 - n)^2) (1 - exp(-beta (1 - n) T)), n = alpha/beta
    n = ALPHA / BETA
    mean = MU * 10 / (1 - n) - MU * n / (BETA * (1 - n) ** 2) * (1 - math.exp(-BETA * (1 - n) * 10))
    assert abs(counts.mean() - mean) < 4 * counts.std() / math.sqrt(1000)


@pytest.mark.reference("HawkesProcess", "mle", "scipy.optimize.minimize (Nelder-Mead) of the brute-force log-likelihood; recovery")
def test_hawkes_mle():
    y = hawkes(T=150.0).simulate(4, seed=7)
    fit = HawkesProcess.mle(y, T=150.0)
    p = [float(fit.kwargs[k]) for k in ("mu", "alpha", "beta")]
    seqs = event_lists(y)

    def nll(logp):
        mu, a, b = np.exp(logp)
        return -sum(brute_loglik(s.numpy(), mu, a, b, 150.0) for s in seqs)

    ref = so.minimize(nll, np.log([0.5, 0.5, 1.0]), method="Nelder-Mead",
                      options={"xatol": 1e-7, "fatol": 1e-9, "maxiter": 4000})
    assert -nll(np.log(p)) >= -ref.fun - 1e-6
    np.testing.assert_allclose(p, np.exp(ref.x), rtol=1e-3)
    assert p[0] == pytest.approx(MU, rel=0.3)
    assert p[1] / p[2] == pytest.approx(ALPHA / BETA, abs=0.12)


def test_hawkes_map_fit_lands_near_truth():
    """Generic Bayesian route through the custom sequence distribution: mu, alpha, beta
    left None (LogNormal(0, 1) priors)."""
    y = hawkes(T=100.0).simulate(3, seed=1)
    model = HawkesProcess(T=100.0, max_events=y.shape[1]).to(dtype=F64)
    fit = model.condition(y=y).fit("map")
    mu, alpha, beta = (float(fit.draws[k].reshape(-1)[0]) for k in ("mu", "alpha", "beta"))
    assert mu == pytest.approx(MU, rel=0.3)
    assert alpha / beta == pytest.approx(ALPHA / BETA, abs=0.15)


@pytest.mark.slow
def test_hawkes_nuts_fit():
    y = hawkes(T=100.0).simulate(3, seed=1)
    model = HawkesProcess(T=100.0, max_events=y.shape[1]).to(dtype=F64)
    fit = model.condition(y=y).fit("nuts", chains=2, warmup=200, draws=200, seed=0)
    assert float(fit.draws["mu"].mean()) == pytest.approx(MU, rel=0.3)
    br = (fit.draws["alpha"] / fit.draws["beta"]).mean()
    assert float(br) == pytest.approx(ALPHA / BETA, abs=0.15)


# ---------------------------------------------------------------------------- censoring at max_events
@pytest.mark.reference("PoissonProcess", "log_prob", "full rows: scipy.stats.expon.logpdf of the M gaps (first M arrivals)")
@pytest.mark.reference("PoissonProcess", "sample", "full rows: t_M ~ Gamma(M, rate) below T (scipy.stats.gamma, KS)")
def test_poisson_full_rows_are_the_first_arrivals():
    m = PoissonProcess(rate=2.0, T=5.0, max_events=3).to(dtype=F64)
    y = m.simulate(3000, seed=8)
    full = torch.isfinite(y[:, -1])
    counts = torch.isfinite(y).sum(1).numpy()
    np.testing.assert_allclose(full.double().mean(), st.poisson(10.0).sf(2), atol=0.02)
    g = st.gamma(3, scale=0.5)  # t_3 given t_3 < T
    assert st.kstest(y[full, -1].numpy(), lambda v: g.cdf(v) / g.cdf(5.0)).pvalue > 1e-3
    row = y[full][0]
    gaps = np.diff(np.r_[0.0, row.numpy()])
    assert float(m.log_prob(y=row)) == pytest.approx(st.expon(scale=0.5).logpdf(gaps).sum(), abs=1e-10)
    assert counts.max() == 3


@pytest.mark.reference("HawkesProcess", "log_prob", "full rows: brute-force O(n^2) sum with the compensator up to t_M")
def test_hawkes_full_rows_are_censored_at_the_last_event():
    m = hawkes(T=50.0, max_events=4)
    y = m.simulate(200, seed=9)
    assert bool(torch.isfinite(y[:, -1]).all())  # 50 time units hold more than 4 events
    ts = y[0].numpy()
    assert float(m.log_prob(y=y[0])) == pytest.approx(brute_loglik(ts, MU, ALPHA, BETA, ts[-1]), abs=1e-10)
    gaps = rescaled_gaps(m.compensator(y))  # the first 4 rescaled gaps are i.i.d. Exp(1)
    assert st.kstest(gaps, "expon").pvalue > 1e-3


# ---------------------------------------------------------------------------- representation / errors
def test_padding_round_trip_and_prior_sampling():
    assert [list(s.numpy()) for s in event_lists(Y)] == [list(map(float, s)) for s in SEQS]
    draws = PoissonProcess(T=2.0, max_events=30).sample(5, seed=0)
    assert draws["y"].shape == (5, 30) and draws["rate"].shape == (5,)


def test_bad_input():
    m = PoissonProcess(rate=1.0, T=5.0, max_events=8)
    with pytest.raises(ValueError, match="pad event sequences with \\+inf, not NaN"):
        m.log_prob(y=torch.tensor([1.0] + [math.nan] * 7))
    with pytest.raises(ValueError, match="not a valid event sequence"):
        m.log_prob(y=torch.tensor([2.0, 1.0] + [math.inf] * 6))
    with pytest.raises(ValueError, match="not a valid event sequence"):
        m.log_prob(y=torch.tensor([1.0, 6.0] + [math.inf] * 6))
    with pytest.raises(ValueError, match="not a valid event sequence"):
        m.log_prob(y=torch.tensor([1.0, math.inf, 2.0] + [math.inf] * 5))
    with pytest.raises(ValueError, match="y must be one padded sequence"):
        m.log_prob(y=torch.ones(3))
    with pytest.raises(ValueError, match="rate must be positive"):
        PoissonProcess(rate=-1.0, T=5.0, max_events=8)
    with pytest.raises(ValueError, match="T .* must be a positive"):
        PoissonProcess(rate=1.0, T=-5.0, max_events=8)
    with pytest.raises(ValueError, match="give max_events"):
        PoissonProcess(T=5.0)
    with pytest.raises(ValueError, match="explosive"):
        HawkesProcess(mu=1.0, alpha=3.0, beta=2.0, T=5.0)
    with pytest.raises(ValueError, match="alpha must be non-negative"):
        HawkesProcess(mu=1.0, alpha=-0.1, beta=2.0, T=5.0, max_events=10)
    with pytest.raises(ValueError, match="either intensity"):
        InhomogeneousPoissonProcess(intensity=smooth, rates=RATES, edges=EDGES)
    with pytest.raises(ValueError, match="edges must increase from 0"):
        InhomogeneousPoissonProcess(rates=RATES, edges=[1.0, 2.0, 3.0, 5.0])
    with pytest.raises(ValueError, match="rates must be \\[K\\]"):
        InhomogeneousPoissonProcess(rates=[1.0, 2.0], edges=EDGES)
    with pytest.raises(TypeError, match="must be a callable"):
        InhomogeneousPoissonProcess(intensity=3.0, T=5.0)
    with pytest.raises(ValueError, match="intensity exceeds bound"):
        InhomogeneousPoissonProcess(intensity=smooth, T=5.0, bound=1.0).simulate(10, seed=0)
    with pytest.raises(ValueError, match="a piece has no events"):
        InhomogeneousPoissonProcess.mle(pad_events([[0.5]]), edges=EDGES)
    with pytest.raises(ValueError, match="more than max_events"):
        pad_events([[1.0, 2.0, 3.0]], max_events=2)

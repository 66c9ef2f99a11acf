"""Tests for ``genprog.infer.evidence`` against models with closed-form evidence.

Every stochastic estimator is checked with its own error bar: over 10 seeds,
``|estimate - truth| < 3 * stderr`` in at least 9, with ``stderr < 0.5`` nats. The
references are computed independently of torch (SciPy).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats
from torch.distributions import Normal

from genprog.infer.evidence import (
    EstimatorWarning,
    EvidenceTarget,
    annealed_importance_sampling,
    find_mode,
    importance_sampling,
    laplace_evidence,
)

# --------------------------------------------------------------------------- targets


class NormalNormal:
    """``mu ~ N(m0, s0^2)``, ``y_i ~ N(mu, s^2)``; D = 1."""

    dim = 1
    device = "cpu"

    def __init__(self, m0=0.5, s0=2.0, s=1.0, n=8, dtype=torch.float32, seed=1):
        rng = np.random.default_rng(seed)
        self.m0, self.s0, self.s, self.dtype = m0, s0, s, dtype
        self.y_np = rng.normal(m0 + 1.0, s, size=n)
        self.y = torch.tensor(self.y_np, dtype=dtype)

    def log_prior(self, z):
        return Normal(self.m0, self.s0).log_prob(z[:, 0])

    def log_likelihood(self, z):
        return Normal(z, self.s).log_prob(self.y).sum(-1)

    def sample_prior(self, n, generator):
        eps = torch.randn(n, 1, generator=generator, dtype=self.dtype)
        return self.m0 + self.s0 * eps

    def log_evidence(self):  # SciPy reference: y ~ N(m0 1, s^2 I + s0^2 1 1^T)
        n = self.y_np.size
        cov = self.s**2 * np.eye(n) + self.s0**2 * np.ones((n, n))
        return stats.multivariate_normal.logpdf(self.y_np, mean=np.full(n, self.m0), cov=cov)

    def posterior(self):
        n = self.y_np.size
        prec = 1 / self.s0**2 + n / self.s**2
        mean = (self.m0 / self.s0**2 + self.y_np.sum() / self.s**2) / prec
        return np.array([mean]), np.array([[1.0 / prec]])


class BetaBinomial:
    """``p ~ Beta(a, b)``, ``k ~ Binomial(n, p)``, seen through ``z = logit(p)``; D = 1."""

    dim = 1
    device = "cpu"

    def __init__(self, a=2.0, b=3.0, n=20, k=7, dtype=torch.float32):
        self.a, self.b, self.n, self.k, self.dtype = a, b, n, k, dtype
        self.log_comb = math.log(special.comb(n, k, exact=True))

    def log_prior(self, z):  # Beta density of sigmoid(z) times |dp/dz| = p (1 - p)
        z = z[:, 0]
        log_p, log_1mp = torch.nn.functional.logsigmoid(z), torch.nn.functional.logsigmoid(-z)
        return self.a * log_p + self.b * log_1mp - float(special.betaln(self.a, self.b))

    def log_likelihood(self, z):
        z = z[:, 0]
        log_p, log_1mp = torch.nn.functional.logsigmoid(z), torch.nn.functional.logsigmoid(-z)
        return self.log_comb + self.k * log_p + (self.n - self.k) * log_1mp

    def sample_prior(self, n, generator):  # inverse CDF of Beta(a, b), then logit
        u = torch.rand(n, generator=generator, dtype=torch.float64).numpy()
        p = special.betaincinv(self.a, self.b, u)
        return torch.tensor(special.logit(p), dtype=self.dtype).unsqueeze(-1)

    def log_evidence(self):
        return (
            self.log_comb
            + special.betaln(self.a + self.k, self.b + self.n - self.k)
            - special.betaln(self.a, self.b)
        )


class LinearRegression:
    """``w ~ N(0, tau^2 I_5)``, ``y = X w + N(0, sigma^2 I_n)`` with known X; D = 5."""

    device = "cpu"

    def __init__(self, n=12, dim=5, tau=1.0, sigma=1.0, dtype=torch.float32, seed=2):
        rng = np.random.default_rng(seed)
        self.dim, self.tau, self.sigma, self.dtype = dim, tau, sigma, dtype
        self.X_np = rng.normal(size=(n, dim))
        self.y_np = self.X_np @ rng.normal(0.0, tau, size=dim) + rng.normal(0.0, sigma, size=n)
        self.X = torch.tensor(self.X_np, dtype=dtype)
        self.y = torch.tensor(self.y_np, dtype=dtype)

    def log_prior(self, z):
        return Normal(0.0, self.tau).log_prob(z).sum(-1)

    def log_likelihood(self, z):
        return Normal(z @ self.X.T, self.sigma).log_prob(self.y).sum(-1)

    def sample_prior(self, n, generator):
        return self.tau * torch.randn(n, self.dim, generator=generator, dtype=self.dtype)

    def log_evidence(self):
        n = self.y_np.size
        cov = self.sigma**2 * np.eye(n) + self.tau**2 * self.X_np @ self.X_np.T
        return stats.multivariate_normal.logpdf(self.y_np, mean=np.zeros(n), cov=cov)

    def posterior(self):
        prec = self.X_np.T @ self.X_np / self.sigma**2 + np.eye(self.dim) / self.tau**2
        cov = np.linalg.inv(prec)
        return cov @ self.X_np.T @ self.y_np / self.sigma**2, cov


class GaussianProposal:
    """``q = N(mean, cov)`` in the target's unconstrained space (a guide for IS)."""

    def __init__(self, mean, cov, dtype=torch.float64):
        self.mean = torch.as_tensor(mean, dtype=dtype).reshape(-1)
        cov = torch.as_tensor(cov, dtype=dtype).reshape(self.mean.numel(), -1)
        self.chol = torch.linalg.cholesky(cov)
        self.dist = torch.distributions.MultivariateNormal(self.mean, scale_tril=self.chol)

    def sample_and_log_prob(self, n, generator):
        eps = torch.randn(n, self.mean.numel(), generator=generator, dtype=self.mean.dtype)
        z = self.mean + eps @ self.chol.T
        return z, self.dist.log_prob(z)


def posterior_guide(target, inflate=1.0):
    """Gaussian proposal equal to the exact posterior, covariance scaled by ``inflate``."""
    mean, cov = target.posterior()
    return GaussianProposal(mean, cov * inflate, dtype=target.dtype)


# --------------------------------------------------------------------------- cases

MODELS = {
    "normal-normal": NormalNormal,
    "beta-binomial": BetaBinomial,
    "regression-5d": LinearRegression,
}

SEEDS = range(10)


def _is_prior(target, seed):
    return importance_sampling(target, num_samples=10_000, seed=seed)


def _is_guide(target, seed):
    guide = posterior_guide(target, inflate=2.0)
    return importance_sampling(target, num_samples=4_000, proposal=guide, seed=seed)


def _ais(target, seed):
    return annealed_importance_sampling(target, num_particles=128, num_temps=100, seed=seed)


def _ais_runs(target, seed):
    return annealed_importance_sampling(
        target, num_particles=32, num_temps=100, num_runs=8, seed=seed, schedule="geometric"
    )


# (estimator id, estimator, model ids); prior IS is left out on the 5-D regression, where the
# posterior is too narrow for the prior to be a useful proposal.
CASES = [
    ("is-prior", _is_prior, ["normal-normal", "beta-binomial"]),
    ("is-guide", _is_guide, ["normal-normal", "regression-5d"]),
    ("ais", _ais, ["normal-normal", "beta-binomial", "regression-5d"]),
    ("ais-runs", _ais_runs, ["normal-normal", "regression-5d"]),
]
PARAMS = [
    pytest.param(estimator, model, id=f"{name}-{model}")
    for name, estimator, models in CASES
    for model in models
]


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("estimator, model", PARAMS)
def test_calibrated_against_exact_evidence(estimator, model):
    target = MODELS[model]()
    truth = target.log_evidence()
    estimates = [estimator(target, seed) for seed in SEEDS]
    errors = np.array([e.value - truth for e in estimates])
    stderrs = np.array([e.stderr for e in estimates])
    assert np.all(np.isfinite(errors)) and np.all(stderrs > 0)
    assert np.all(stderrs < 0.5), stderrs
    covered = np.abs(errors) < 3 * stderrs
    assert covered.sum() >= 9, (errors, stderrs)
    # the error bars are not inflated either: the errors are not all tiny compared to them
    assert np.mean((errors / stderrs) ** 2) > 0.1, (errors, stderrs)


@pytest.mark.slow
def test_ais_default_settings_calibrated_on_regression():
    target = LinearRegression()
    truth = target.log_evidence()
    estimates = [annealed_importance_sampling(target, seed=seed) for seed in SEEDS]
    covered = [abs(e.value - truth) < 3 * e.stderr for e in estimates]
    assert sum(covered) >= 9
    assert all(e.stderr < 0.1 for e in estimates)


# --------------------------------------------------------------------------- records


def test_importance_sampling_record():
    target = NormalNormal()
    est = importance_sampling(target, num_samples=5_000, batch_size=1_000, seed=3)
    assert est.method == "is"
    assert est.num_samples == est.num_evaluations == 5_000
    assert est.details["proposal"] == "prior"
    assert 0 < est.details["ess"] <= 5_000
    assert est.details["num_zero_weight"] == 0
    k = est.details["pareto_k"]
    assert k is None or k < 0.7  # bounded weights: a light tail
    guided = importance_sampling(target, num_samples=100, proposal=posterior_guide(target))
    assert guided.details["proposal"] == "guide"


def test_ais_record():
    est = annealed_importance_sampling(NormalNormal(), num_particles=64, num_temps=20, seed=1)
    assert est.method == "ais"
    assert est.num_samples == 64
    assert est.num_evaluations == 64 * (1 + 19 * 6)
    d = est.details
    assert d["schedule"] == "sigmoid" and d["num_temps"] == 20 and d["num_runs"] == 1
    assert d["stderr_method"] == "particles"
    assert len(d["step_size"]) == 1 and d["step_size"][0] > 0
    assert 0.3 < d["acceptance_rate"] < 0.95
    runs = annealed_importance_sampling(
        NormalNormal(), num_particles=16, num_temps=20, num_runs=4, seed=1
    )
    assert runs.num_samples == 64 and len(runs.details["step_size"]) == 4
    assert runs.details["stderr_method"] == "runs"


def test_seed_reproducible_and_distinct():
    target = BetaBinomial()
    a = annealed_importance_sampling(target, num_particles=32, num_temps=20, seed=5)
    b = annealed_importance_sampling(target, num_particles=32, num_temps=20, seed=5)
    c = annealed_importance_sampling(target, num_particles=32, num_temps=20, seed=6)
    assert a.value == b.value and a.value != c.value
    assert (
        importance_sampling(target, 500, seed=2).value
        == importance_sampling(target, 500, seed=2).value
    )


@pytest.mark.parametrize("schedule", ["sigmoid", "linear", "geometric"])
def test_ais_schedules(schedule):
    target = BetaBinomial()
    est = annealed_importance_sampling(target, num_particles=128, num_temps=50, schedule=schedule)
    assert est.details["schedule"] == schedule
    assert abs(est.value - target.log_evidence()) < 4 * est.stderr + 1e-3


def test_ais_custom_schedule_equals_named():
    target = NormalNormal()
    betas = torch.linspace(0, 1, 31, dtype=torch.float64).tolist()
    custom = annealed_importance_sampling(target, num_particles=32, schedule=betas, seed=4)
    linear = annealed_importance_sampling(
        target, num_particles=32, num_temps=30, schedule="linear", seed=4
    )
    assert custom.details["schedule"] == "custom" and custom.details["num_temps"] == 30
    assert custom.value == pytest.approx(linear.value, abs=1e-6)


# --------------------------------------------------------------------------- failure modes


class BadProposal(GaussianProposal):
    """Far from the posterior and too narrow: the weights degenerate."""

    def __init__(self):
        super().__init__([8.0], [[0.01]], dtype=torch.float32)


def test_bad_proposal_warns():
    with pytest.warns(EstimatorWarning, match="effective sample size"):
        est = importance_sampling(NormalNormal(), num_samples=2_000, proposal=BadProposal())
    assert est.details["ess"] < 20
    assert math.isfinite(est.value)


class NaNLikelihood(NormalNormal):
    """Likelihood NaN for ``mu > cut`` (everywhere when ``cut = -inf``)."""

    def __init__(self, cut, **kwargs):
        super().__init__(**kwargs)
        self.cut = cut

    def log_likelihood(self, z):
        ll = super().log_likelihood(z)
        return torch.where(z[:, 0] > self.cut, torch.full_like(ll, math.nan), ll)


def test_all_nan_likelihood_raises():
    target = NaNLikelihood(cut=-math.inf)
    with pytest.raises(RuntimeError, match="zero weight"):
        annealed_importance_sampling(target, num_particles=16, num_temps=10)
    with pytest.raises(RuntimeError, match="zero weight"):
        importance_sampling(target, num_samples=100)


def test_some_nan_likelihood_gives_zero_weight_not_nan():
    target = NaNLikelihood(cut=2.5)  # about 16% of prior draws land in the NaN region
    ais = annealed_importance_sampling(target, num_particles=128, num_temps=50, seed=0)
    is_ = importance_sampling(target, num_samples=2_000, seed=0)
    for est in (ais, is_):
        assert math.isfinite(est.value) and math.isfinite(est.stderr)
        assert est.details["num_zero_weight"] > 0
    # the NaN region holds little posterior mass, so both stay near the full evidence
    assert abs(ais.value - target.log_evidence()) < 0.5


def test_rejects_non_target_and_bad_arguments():
    with pytest.raises(TypeError, match="EvidenceTarget"):
        importance_sampling(object())
    with pytest.raises(ValueError, match="num_particles"):
        annealed_importance_sampling(NormalNormal(), num_particles=0)
    with pytest.raises(ValueError, match="schedule"):
        annealed_importance_sampling(NormalNormal(), schedule="cosine")
    with pytest.raises(ValueError, match="schedule"):
        annealed_importance_sampling(NormalNormal(), schedule=[0.0, 0.7, 0.5, 1.0])
    with pytest.raises(TypeError, match="sample_and_log_prob"):
        importance_sampling(NormalNormal(), proposal=object())
    assert isinstance(NormalNormal(), EvidenceTarget)


# --------------------------------------------------------------------------- float64


def test_float64_exact_guide_is_exact():
    # with q = posterior every weight equals the evidence: float64 arithmetic throughout
    # gives the truth to ~1e-12 (float32 would be off by ~1e-6)
    target = LinearRegression(dtype=torch.float64)
    est = importance_sampling(target, num_samples=1_000, proposal=posterior_guide(target))
    assert est.value == pytest.approx(target.log_evidence(), abs=1e-9)
    assert est.stderr < 1e-9
    assert est.details["ess"] == pytest.approx(1_000)


def test_float64_ais_calibrated():
    target = NormalNormal(dtype=torch.float64)
    truth = target.log_evidence()
    estimates = [
        annealed_importance_sampling(target, num_particles=64, num_temps=50, seed=s) for s in SEEDS
    ]
    assert sum(abs(e.value - truth) < 3 * e.stderr for e in estimates) >= 9
    assert all(e.stderr < 0.5 for e in estimates)


# --------------------------------------------------------------------------- Laplace


@pytest.mark.parametrize("model", ["normal-normal", "regression-5d"])
def test_find_mode_and_laplace_exact_for_gaussian_posterior(model):
    target = MODELS[model](dtype=torch.float64)
    mode = find_mode(target)
    assert mode.shape == (target.dim,) and mode.dtype == torch.float64
    np.testing.assert_allclose(mode.numpy(), target.posterior()[0], atol=1e-6)
    est = laplace_evidence(target, mode)
    assert est.method == "laplace" and est.stderr == 0.0
    assert "deterministic" in est.details["note"]
    assert est.value == pytest.approx(target.log_evidence(), abs=1e-4)
    assert est.details["newton_decrement"] < 1e-8


def test_laplace_given_hessian_matches_autograd():
    target = LinearRegression(dtype=torch.float64)
    mode = find_mode(target)
    prec = torch.tensor(np.linalg.inv(target.posterior()[1]))  # exact -d2 log joint
    given = laplace_evidence(target, mode, hessian=prec)
    auto = laplace_evidence(target, mode)
    assert given.value == pytest.approx(auto.value, abs=1e-8)


def test_laplace_beta_binomial_is_approximate():
    # The logit-space posterior is not Gaussian: Laplace is an approximation, here within
    # 0.1 nats of the truth (but not exact).
    target = BetaBinomial(dtype=torch.float64)
    mode = find_mode(target)
    a_post, b_post = target.a + target.k, target.b + target.n - target.k
    assert mode.item() == pytest.approx(math.log(a_post / b_post), abs=1e-6)
    err = laplace_evidence(target, mode).value - target.log_evidence()
    assert 1e-4 < abs(err) < 0.1


class Saddle(NormalNormal):
    """Log joint ``-mu^2/2 + mu^2 = +mu^2/2``: a minimum at 0, no maximum."""

    def __init__(self):
        super().__init__(m0=0.0, s0=1.0, dtype=torch.float64)

    def log_likelihood(self, z):
        return z[:, 0] ** 2


def test_laplace_not_positive_definite_raises():
    with pytest.raises(ValueError, match="not positive definite"):
        laplace_evidence(Saddle(), torch.zeros(1, dtype=torch.float64))
    target = NormalNormal(dtype=torch.float64)
    with pytest.raises(ValueError, match="not positive definite"):
        laplace_evidence(target, find_mode(target), hessian=-torch.eye(1, dtype=torch.float64))


def test_laplace_away_from_mode_warns():
    target = NormalNormal(dtype=torch.float64)
    with pytest.warns(EstimatorWarning, match="not a maximum"):
        laplace_evidence(target, find_mode(target) + 0.5)


def test_find_mode_from_given_init_float32():
    target = BetaBinomial()
    mode = find_mode(target, init=torch.tensor([3.0]))
    assert mode.dtype == torch.float32
    assert mode.item() == pytest.approx(math.log(9.0 / 16.0), abs=1e-4)


# --------------------------------------------------------------------------- docs, device


def test_module_doctest():
    import doctest

    import genprog.infer.evidence as module

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    class CudaRegression(LinearRegression):
        device = "cuda"

        def __init__(self):
            super().__init__()
            self.X, self.y = self.X.cuda(), self.y.cuda()

        def sample_prior(self, n, generator):
            return self.tau * torch.randn(n, self.dim, generator=generator, device="cuda")

    target = CudaRegression()
    truth = target.log_evidence()
    ais = annealed_importance_sampling(target, num_particles=256, num_temps=100)
    assert abs(ais.value - truth) < 4 * ais.stderr
    mode = find_mode(target)
    assert mode.is_cuda
    assert abs(laplace_evidence(target, mode).value - truth) < 1e-2  # float32

"""Latent neural ODE: the batched solve and sampling against the closed form of a linear
latent ODE (``z(s) = expm(A s) z0``, so with a linear decoder ``y`` is Gaussian), log p
estimates (IWAE, Laplace-proposal IS, generic AIS) calibrated against that exact value,
MAP / Laplace against the closed-form Gaussian posterior, and training on simulated
one-compartment oral PK profiles: predictions of a new subject's later concentrations
from its first three samples beat the population-mean curve (and, slow, are compared with
the NLME compartment model's individual predictions)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.stats as st
import torch

from genprog import pk
from genprog.errors import ConvergenceWarning, EstimatorWarning
from genprog.models.latent_ode import (
    LatentODE,
    LinearDecoder,
    LinearDynamics,
    solve_latent,
)

D64 = torch.float64
A = np.array([[-0.3, 1.2], [-1.2, -0.3]])
C = np.array([1.0, 0.5])
B = 0.2
SIGMA = 0.3
NAN = float("nan")
# two subjects with their own times; the first has a padded slot
TIMES = torch.tensor([[0.3, 0.7, 1.5, 2.0, NAN], [0.1, 0.5, 1.0, 4.0, 5.0]], dtype=D64)


def _loadings(times):
    """``M [T, 2]``: row ``t`` is ``c^T expm(A t)``, so ``y = b + M z0 + noise``."""
    return np.stack([C @ scipy.linalg.expm(A * t) for t in times])


def _exact_log_p(times, y):
    M = _loadings(times)
    cov = M @ M.T + SIGMA ** 2 * np.eye(len(times))
    return st.multivariate_normal(np.full(len(times), B), cov).logpdf(y)


class ExactLinearEncoder(torch.nn.Module):
    """The exact Gaussian posterior of ``z0`` given the observed entries (its mean and
    marginal SDs): the best diagonal proposal for IWAE."""

    def forward(self, s, feature, mask):
        locs, scales = [], []
        for i in range(s.shape[0]):
            m = mask[i].numpy()
            M = _loadings(s[i].numpy()[m])
            prec = np.eye(2) + M.T @ M / SIGMA ** 2
            cov = np.linalg.inv(prec)
            locs.append(cov @ M.T @ (feature[i].numpy()[m] - B) / SIGMA ** 2)
            scales.append(np.sqrt(np.diag(cov)))
        return torch.tensor(np.array(locs), dtype=D64), torch.tensor(np.array(scales), dtype=D64)


def _linear(solver="rk4", encoder=None):
    return LatentODE(dynamics=LinearDynamics(torch.tensor(A, dtype=D64)),
                     decoder=LinearDecoder(torch.tensor(C, dtype=D64), B), encoder=encoder,
                     latent_dim=2, obs_noise=SIGMA, solver=solver, step_size=0.05)


@pytest.fixture(scope="module")
def linear_data():
    g = torch.Generator().manual_seed(3)
    y = torch.empty_like(TIMES)
    for i in range(2):
        t = TIMES[i][~torch.isnan(TIMES[i])].numpy()
        M = _loadings(t)
        z0 = torch.randn(2, generator=g, dtype=D64).numpy()
        row = B + M @ z0 + SIGMA * torch.randn(len(t), generator=g, dtype=D64).numpy()
        y[i, :len(t)] = torch.tensor(row)
        y[i, len(t):] = NAN
    exact = sum(_exact_log_p(TIMES[i][~torch.isnan(TIMES[i])].numpy(),
                             y[i][~torch.isnan(y[i])].numpy()) for i in range(2))
    return y, float(exact)


# ---------------------------------------------------------------------- solve and sample
@pytest.mark.parametrize("solver", ["rk4", "dopri5"])
def test_batched_solve_matches_the_matrix_exponential(solver):
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(3, 2, 2, generator=g, dtype=D64)  # [draws, subjects, k]
    s = torch.nan_to_num(TIMES, nan=0.0)  # each subject its own times
    z = solve_latent(LinearDynamics(torch.tensor(A, dtype=D64)), z0, s, solver=solver,
                     step_size=0.05)
    assert z.shape == (3, 2, 5, 2)
    ref = np.einsum("ntij,dnj->dnti",
                    np.stack([[scipy.linalg.expm(A * float(t)) for t in row] for row in s]),
                    z0.numpy())
    np.testing.assert_allclose(z.detach().numpy(), ref, atol=2e-6)


@pytest.mark.reference("LatentODE", "sample", "closed form of a linear latent ODE: y ~ N(b, M M^T + sigma^2 I), M_t = c^T expm(A t)")
def test_sample_moments_match_the_linear_gaussian():
    t = torch.tensor([0.2, 1.0, 2.5], dtype=D64)
    draws = _linear().at(t).sample(6000, seed=0)
    assert draws["z0"].shape == (6000, 2) and draws["y"].shape == (6000, 3)
    M = _loadings(t.numpy())
    y = draws["y"].numpy()
    np.testing.assert_allclose(y.mean(0), B, atol=0.06)
    np.testing.assert_allclose(np.cov(y.T), M @ M.T + SIGMA ** 2 * np.eye(3), atol=0.08)
    pop = _linear().at(TIMES).sample(5, seed=1)  # a population with its own (padded) times
    assert pop["y"].shape == (5, 2, 5) and pop["z0"].shape == (5, 2, 2)


# ---------------------------------------------------------------------- log p estimates
def test_iwae_is_a_calibrated_lower_bound(linear_data):
    y, exact = linear_data
    m = _linear(encoder=ExactLinearEncoder())
    small = m._log_prob_estimate(y, TIMES, num_samples=20, seed=0)
    large = m._log_prob_estimate(y, TIMES, num_samples=4000, seed=1)
    assert large.method == "iwae" and large.stderr > 0
    # below the exact value (a lower bound) up to its error bar, and close to it
    assert large.value < exact + 4 * large.stderr
    assert abs(large.value - exact) < 4 * large.stderr + 0.02
    # more samples do not lower the bound beyond noise: the mean over 30 small-S runs
    reps = [m._log_prob_estimate(y, TIMES, num_samples=20, seed=s).value for s in range(30)]
    se_mean = np.std(reps) / np.sqrt(len(reps))
    assert np.mean(reps) < large.value + 4 * (se_mean + large.stderr)
    assert small.details["elbo"] < exact


def test_laplace_proposal_importance_sampling_is_calibrated(linear_data):
    y, exact = linear_data
    est = _linear()._log_prob_estimate(y, TIMES, method="is", num_samples=3000, seed=0)
    assert abs(est.value - exact) < 4 * est.stderr + 1e-3, (est, exact)


def test_generic_importance_sampling_on_the_story_agrees(linear_data):
    y, _ = linear_data
    m = _linear().at(TIMES[1])  # genprog's generic estimator on the story's z0
    est = m.condition(y=y[1]).log_marginal("is", num_samples=4000, seed=0)
    ref = _exact_log_p(TIMES[1].numpy(), y[1].numpy())
    assert abs(est.value - ref) < 4 * est.stderr + 1e-3, (est, ref)


@pytest.mark.slow
def test_generic_ais_on_the_story_agrees(linear_data):
    y, _ = linear_data
    m = _linear().at(TIMES[1:])  # one subject as a population of one
    est = m.condition(y=y[1:]).log_marginal("ais", num_particles=64, num_temps=60, seed=0)
    ref = _exact_log_p(TIMES[1].numpy(), y[1].numpy())
    assert abs(est.value - ref) < 4 * est.stderr + 0.05, (est, ref)


# ---------------------------------------------------------------------- MAP and prediction
@pytest.mark.reference("LatentODE", "posterior", "closed-form Gaussian posterior of z0 in a linear latent ODE (mode and covariance)")
def test_map_latent_is_the_exact_posterior_mode(linear_data):
    y, _ = linear_data
    mp = _linear().map_latent(TIMES, y)
    assert bool(mp.converged.all())
    for i in range(2):
        keep = ~torch.isnan(TIMES[i])
        M = _loadings(TIMES[i][keep].numpy())
        cov = np.linalg.inv(np.eye(2) + M.T @ M / SIGMA ** 2)
        mean = cov @ M.T @ (y[i][keep].numpy() - B) / SIGMA ** 2
        np.testing.assert_allclose(mp.z[i].numpy(), mean, atol=1e-5)
        np.testing.assert_allclose(mp.covariance[i].numpy(), cov, atol=1e-5)


def test_predict_profile_bands_cover_the_gaussian_predictive(linear_data):
    y, _ = linear_data
    m = _linear()
    t_obs, y_obs = TIMES[1, :2], y[1, :2]
    t_new = torch.tensor([1.0, 3.0, 6.0], dtype=D64)
    for method in ("laplace", "is"):
        pred = m.predict_profile(t_obs, y_obs, t_new, n=4000, level=0.9, method=method, seed=0)
        M, Mn = _loadings(t_obs.numpy()), _loadings(t_new.numpy())
        cov = np.linalg.inv(np.eye(2) + M.T @ M / SIGMA ** 2)
        mean = cov @ M.T @ (y_obs.numpy() - B) / SIGMA ** 2
        sd = np.sqrt(np.diag(Mn @ cov @ Mn.T))
        np.testing.assert_allclose(pred.map.numpy(), B + Mn @ mean, atol=1e-5)
        np.testing.assert_allclose(pred.upper.numpy(), B + Mn @ mean + 1.6449 * sd, atol=0.05)
        np.testing.assert_allclose(pred.lower.numpy(), B + Mn @ mean - 1.6449 * sd, atol=0.05)


# ---------------------------------------------------------------------- PK training
NOMINAL = np.array([0.5, 1.5, 3.0, 5.0, 8.0, 12.0, 18.0, 24.0])
FIRST = 3  # observations of a new subject given; the later ones are predicted


def simulate_oral(n, seed, jitter=0.15, noise=0.1):
    """One-compartment oral profiles (``pk.one_compartment_oral``): log-normal IIV on ka,
    CL, V; doses 100/200/300; per-subject times (nominal x log-normal jitter);
    proportional (log-normal) residual error."""
    g = np.random.default_rng(seed)
    ka = 1.2 * np.exp(0.4 * g.standard_normal(n))
    cl = 3.0 * np.exp(0.3 * g.standard_normal(n))
    v = 30.0 * np.exp(0.3 * g.standard_normal(n))
    dose = g.choice([100.0, 200.0, 300.0], n)
    t = np.sort(NOMINAL * np.exp(jitter * g.standard_normal((n, len(NOMINAL)))), 1)
    c = pk.one_compartment_oral(torch.tensor(t), torch.tensor(dose)[:, None],
                                torch.tensor(ka)[:, None], torch.tensor(cl)[:, None],
                                torch.tensor(v)[:, None]).numpy()
    y = c * np.exp(noise * g.standard_normal(c.shape))
    f32 = torch.float32
    return {"times": torch.tensor(t, dtype=f32), "y": torch.tensor(y, dtype=f32),
            "dose": torch.tensor(dose, dtype=f32), "ka": ka, "cl": cl, "v": v, "c": c}


def _log_rmse(pred, y):
    return float(((torch.as_tensor(pred).log() - y.log()) ** 2).mean().sqrt())


def _population_mean_prediction(train, test):
    """The empirical population curve: per sampling slot, the training mean of
    ``log(y / dose)``, times the new subject's dose."""
    per_dose = (train["y"] / train["dose"][:, None]).log().mean(0)
    return per_dose.exp()[None, FIRST:] * test["dose"][:, None]


def simulate_linear(n, seed, sigma=0.1):
    """A population of the linear latent ODE (``z0 ~ N(0, I)``, ``y = b + c^T expm(A t) z0 +
    noise``) at eight jittered times per subject in (0, 4.5]."""
    g = np.random.default_rng(seed)
    t = np.sort(np.linspace(0.25, 4.0, 8) * np.exp(0.1 * g.standard_normal((n, 8))), 1)
    z0 = g.standard_normal((n, 2))
    y = np.stack([_loadings(t[i]) @ z0[i] for i in range(n)]) + B + sigma * g.standard_normal((n, 8))
    return torch.tensor(t, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)


@pytest.fixture(scope="module")
def linear_fit():
    train, test = simulate_linear(60, seed=0), simulate_linear(30, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        m = LatentODE.mle(*train, latent_dim=2, hidden=(32,), step_size=0.1, learning_rate=0.03,
                          max_iters=300, window=50, seed=0, progress=False)
    return train, test, m


def test_training_lowers_the_loss_and_learns_the_noise(linear_fit):
    _, _, m = linear_fit
    trace = m.info["loss_trace"]
    assert np.mean(trace[-50:]) < np.mean(trace[:50]) - 1.0
    assert 0.05 < m.obs_noise < 0.25  # true 0.1; starts at 0.3 x the data's SD (~0.3)


def test_map_prediction_from_three_samples_beats_the_population_mean(linear_fit):
    (_, y_train), (t, y), m = linear_fit
    mp = m.map_latent(t[:, :FIRST], y[:, :FIRST])
    pred = m.predict(t[:, FIRST:], mp.z)
    rmse = float(((pred - y[:, FIRST:]) ** 2).mean().sqrt())
    base = float(((y_train[:, FIRST:].mean(0) - y[:, FIRST:]) ** 2).mean().sqrt())
    assert rmse < 0.6 * base, (rmse, base)
    # the encoder's posterior and IWAE work on the trained model; IWAE <= the
    # Laplace-proposal IS estimate of the same log p, within error bars
    q = m.posterior_estimate(y[:, :FIRST], t[:, :FIRST])
    assert q.batch_shape == (30,) and q.event_shape == (2,)
    with warnings.catch_warnings():  # a briefly trained encoder is a poor proposal (low ESS)
        warnings.simplefilter("ignore", EstimatorWarning)
        iwae = m._log_prob_estimate(y[:5], t[:5], num_samples=500)
    is_ = m._log_prob_estimate(y[:5], t[:5], method="is", num_samples=500)
    assert iwae.value < is_.value + 4 * math.hypot(iwae.stderr, is_.stderr) + 0.05


def test_padding_by_nan_equals_a_mask(linear_fit):
    _, (t, y), m = linear_fit
    t, y = t[:4].clone(), y[:4].clone()
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 3:] = False
    with_mask = m.map_latent(t, y, mask=mask)
    with_nan = m.map_latent(t, torch.where(mask, y, torch.full_like(y, NAN)))
    torch.testing.assert_close(with_mask.z, with_nan.z)


def _train(train, steps, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LatentODE.mle(train["times"], train["y"], dose=train["dose"], likelihood="lognormal",
                             latent_dim=3, hidden=(32,), step_size=0.1, learning_rate=0.03,
                             max_iters=steps, window=50, seed=seed, progress=False)


@pytest.mark.slow
def test_longer_training_against_the_nlme_fit():
    """The compartment model (the true structure) fitted by population ML; its individual
    predictions from the first three samples (EBEs at the fitted population parameters)
    and the latent ODE's MAP predictions on the same held-out points."""
    train, test = simulate_oral(100, seed=0), simulate_oral(40, seed=1)
    m = _train(train, 2000)
    mp = m.map_latent(test["times"][:, :FIRST], test["y"][:, :FIRST], dose=test["dose"])
    later = test["y"][:, FIRST:]
    ode = _log_rmse(m.predict(test["times"][:, FIRST:], mp.z, dose=test["dose"]), later)
    base = _log_rmse(_population_mean_prediction(train, test), later)
    nlme = _log_rmse(nlme_individual_prediction(train, test, FIRST), later)
    print(f"\nlog-RMSE of later concentrations: latent ODE {ode:.3f}, NLME {nlme:.3f}, "
          f"population mean {base:.3f}")
    assert ode < base - 0.05
    assert nlme < base


def nlme_individual_prediction(train, test, first):
    """Fit ``pk.PopulationModel`` (1-cmt oral, IIV on ka/CL/V, exponential error) by
    ``fit_mle`` on ``train``; for ``test``, EBEs from the first ``first`` samples at the
    fitted population parameters, and the individual predictions at the later times
    ``[N, T - first]``."""
    import pandas as pd

    from genprog.pk.estimation import LaplaceObjective, fit_mle

    def frame(sim, keep):
        rows = []
        for i in range(len(sim["dose"])):
            rows.append((i + 1, 0.0, 0.0, float(sim["dose"][i]), 1, 1, 1))
            for j in range(sim["times"].shape[1]):
                mdv = 0 if j < keep else 1
                rows.append((i + 1, float(sim["times"][i, j]), float(sim["y"][i, j]), 0.0, 0, mdv, 2))
        return pd.DataFrame(rows, columns=["ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT"])

    pop = pk.PopulationModel(structure=pk.OneCompartment(), random_effects=["ka", "cl", "v"],
                             error="exponential")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = fit_mle(pop, pk.read_nonmem(frame(train, train["times"].shape[1])),
                      standard_errors=False)
    T = test["times"].shape[1]
    given = pk.read_nonmem(frame(test, first)).to(dtype=D64)
    obj = LaplaceObjective(pop, given, pop.priors_for(given))
    values = obj.layout.unpack(fit.phi)
    eta = obj.ebe(values, torch.zeros(given.n_subjects, obj.P, dtype=D64))
    # predictions at every design time of the test subjects, from the EBEs
    full = pk.read_nonmem(frame(test, T)).to(dtype=D64)
    obj_full = LaplaceObjective(pop, full, pop.priors_for(full))
    _, pred = obj_full.conditional(values, eta)
    return pred[:, first:T].detach().float()


def test_bad_input_is_named():
    dyn = LinearDynamics(torch.tensor(A, dtype=D64))
    dec = LinearDecoder(torch.tensor(C, dtype=D64), B)
    with pytest.raises(TypeError, match="dynamics"):
        LatentODE(dynamics=lambda t, z: z, decoder=dec, latent_dim=2)
    with pytest.raises(ValueError, match="likelihood"):
        LatentODE(dynamics=dyn, decoder=dec, latent_dim=2, likelihood="poisson")
    with pytest.raises(ValueError, match="decoder"):
        LatentODE(dynamics=dyn, decoder=torch.nn.Linear(2, 3).double(), latent_dim=2)
    m = _linear()
    with pytest.raises(ValueError, match="times"):
        m.map_latent(torch.tensor([-1.0, 1.0]), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="same shape"):
        m.map_latent(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="encoder"):
        m.posterior_estimate(torch.ones(3), torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="at\\(times\\)"):
        m.sample(2)
    lognormal = LatentODE(dynamics=dyn, decoder=dec, latent_dim=2, likelihood="lognormal")
    with pytest.raises(ValueError, match="positive"):
        lognormal.map_latent(torch.tensor([0.5, 1.0]), torch.tensor([0.0, 1.0]))

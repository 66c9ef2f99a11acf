"""VAE: a linear-Gaussian VAE is probabilistic PCA, so its log p estimates (IWAE, AIS,
genprog's generic AIS) are checked against PPCA's exact log p and its encoder against
PPCA's exact posterior; a digits VAE beats the independent-pixel baseline on held-out
log p, and its inpainting beats mean imputation."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from genprog.errors import ConvergenceWarning, EstimatorWarning
from genprog.models.gaussian import PPCA
from genprog.models.made import binarized_digits
from genprog.models.vae import (
    VAE,
    GaussianEncoder,
    LinearDecoder,
    LinearEncoder,
    MLPDecoder,
    independent_bernoulli_log_prob,
)

D, K = 5, 2


def _ppca(orthogonal: bool):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(D, K, generator=g, dtype=torch.float64)
    if orthogonal:
        q, _ = torch.linalg.qr(W)
        W = q * torch.tensor([2.0, 1.2], dtype=torch.float64)
    mu = torch.randn(D, generator=g, dtype=torch.float64)
    sigma = 0.6
    ppca = PPCA(W=W, mu=mu, sigma=sigma)
    Y = ppca.sample(30, seed=1)["y"]
    return W, mu, sigma, ppca, Y


def _linear_vae(W, mu, sigma, encoder=None):
    if encoder is None:
        encoder = LinearEncoder.ppca_posterior(W, mu, sigma)
    return VAE(decoder=LinearDecoder(W, mu), encoder=encoder, latent_dim=K,
               likelihood="gaussian", scale=torch.tensor(sigma, dtype=torch.float64))


def test_sample_of_a_linear_vae_has_the_ppca_moments():
    W, mu, sigma, _, _ = _ppca(orthogonal=False)
    vae = _linear_vae(W, mu, sigma)
    draws = vae.sample(40000, seed=0)
    assert draws["z"].shape == (40000, K) and draws["y"].shape == (40000, D)
    y = draws["y"].double()
    cov = W @ W.T + sigma ** 2 * torch.eye(D, dtype=torch.float64)
    # sampling error of means / covariances with 40k draws: a few 1e-2 at these scales
    torch.testing.assert_close(y.mean(0), mu, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(y.T), cov, atol=0.1, rtol=0.03)


def test_iwae_with_the_exact_posterior_encoder_is_exact():
    """Orthogonal W: PPCA's posterior is diagonal, so the encoder is the exact posterior,
    every importance weight equals p(y) and IWAE (and the ELBO) are exact."""
    W, mu, sigma, ppca, Y = _ppca(orthogonal=True)
    vae = _linear_vae(W, mu, sigma)
    exact = float(ppca.log_prob(y=Y))
    est = vae._log_prob_estimate(Y, num_samples=50)
    assert est.method == "iwae"
    assert abs(est.value - exact) < 1e-4
    assert est.stderr < 1e-5
    assert abs(est.details["elbo"] - exact) < 1e-4
    torch.testing.assert_close(est.details["pointwise"], ppca.log_prob(y=Y, pointwise=True).double(),
                               atol=1e-5, rtol=0)
    # the encoder is PPCA's posterior (mean and marginal sd)
    q = vae.posterior_estimate(Y)
    post = ppca.posterior(Y)
    torch.testing.assert_close(q.mean.double(), post.mean.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(q.stddev.double(), post.stddev.double(), atol=1e-6, rtol=0)


def test_iwae_and_ais_are_calibrated_against_ppca():
    """Non-orthogonal W: the diagonal encoder is only an approximation. IWAE is below the
    exact log p (a bound in expectation) and within its error bars; the ELBO is below
    both; batched AIS from the prior matches within 4 stderr."""
    W, mu, sigma, ppca, Y = _ppca(orthogonal=False)
    vae = _linear_vae(W, mu, sigma)
    exact = float(ppca.log_prob(y=Y))
    iw = vae._log_prob_estimate(Y, num_samples=2000, seed=1)
    assert iw.stderr > 0
    assert iw.value < exact + 4 * iw.stderr
    assert abs(iw.value - exact) < 4 * iw.stderr
    assert iw.details["elbo"] < iw.value - 0.05  # the approximation is visibly loose
    ais = vae._log_prob_estimate(Y, method="ais", num_particles=32, num_temps=100, seed=2)
    assert ais.method == "ais" and ais.stderr > 0
    assert abs(ais.value - exact) < 4 * ais.stderr
    assert 0.4 < ais.details["acceptance_rate"] < 0.9
    # per row too: the estimates of each row cover the exact value
    z = (ais.details["pointwise"] - ppca.log_prob(y=Y, pointwise=True).double()).abs()
    assert float((z < 4 * ais.details["pointwise_stderr"]).double().mean()) >= 0.9


def test_generic_ais_over_z_for_one_row_matches_ppca():
    """The story has a latent "z" per row, so genprog's generic log_marginal applies."""
    W, mu, sigma, ppca, Y = _ppca(orthogonal=False)
    vae = _linear_vae(W, mu, sigma)
    est = vae.condition(y=Y[0]).log_marginal("ais", num_particles=64, num_temps=100)
    exact = float(ppca.log_prob(y=Y[0]))
    assert abs(est.value - exact) < 4 * est.stderr


def test_input_validation():
    W, mu, sigma, _, Y = _ppca(orthogonal=True)
    with pytest.raises(ValueError, match="scale"):
        VAE(decoder=LinearDecoder(W, mu), latent_dim=K)
    with pytest.raises(ValueError, match="likelihood"):
        VAE(decoder=LinearDecoder(W, mu), latent_dim=K, likelihood="poisson")
    with pytest.raises(TypeError, match="decoder"):
        VAE(decoder=lambda z: z, latent_dim=K, scale=1.0)
    with pytest.raises(ValueError, match="encoder"):
        VAE(decoder=LinearDecoder(W, mu), encoder=LinearEncoder.ppca_posterior(W[:, :1], mu, 1.0),
            latent_dim=K, scale=1.0)
    vae = _linear_vae(W, mu, sigma)
    with pytest.raises(ValueError, match="shape"):
        vae._log_prob_estimate(Y[:, :3])
    with pytest.raises(ValueError, match="method"):
        vae._log_prob_estimate(Y, method="exact")
    with pytest.raises(TypeError, match="num_particles"):
        vae._log_prob_estimate(Y, method="iwae", num_particles=3)
    with pytest.raises(ValueError, match="NaN"):
        vae._log_prob_estimate(torch.full((D,), float("nan")))
    no_encoder = VAE(decoder=LinearDecoder(W, mu), latent_dim=K, scale=1.0)
    with pytest.raises(ValueError, match="encoder"):
        no_encoder.posterior_estimate(Y)
    with pytest.raises(ValueError, match="0/1"):
        VAE.mle(Y, likelihood="bernoulli", max_iters=2)
    with pytest.raises(ValueError, match="NaN"):
        VAE.mle(torch.full((4, 3), float("nan")), max_iters=2)


def test_two_instances_do_not_share_parameters_in_the_param_store():
    import pyro

    a = VAE(decoder=MLPDecoder(2, 3, (4,)), latent_dim=2, scale=1.0)
    b = VAE(decoder=MLPDecoder(2, 3, (4,)), latent_dim=2, scale=1.0)
    a.sample(2, seed=0)
    b.sample(2, seed=0)
    names = list(pyro.get_param_store().keys())
    assert any(n.startswith(a.params["name"]) for n in names)
    assert any(n.startswith(b.params["name"]) for n in names)
    assert a.params["name"] != b.params["name"]


# ---------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits():
    x, _ = binarized_digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:1400]], x[perm[1400:1500]]


@pytest.fixture(scope="module")
def digits_vae(digits):
    train, _ = digits
    with pytest.warns(ConvergenceWarning):
        vae = VAE.mle(train, latent_dim=4, hidden=(32,), likelihood="bernoulli", max_iters=300,
                      batch_size=128, learning_rate=3e-3, seed=0, progress=False)
    return vae


def test_training_records_a_falling_elbo(digits_vae):
    info = digits_vae.info
    assert info["num_steps"] == 300 and not info["converged"]
    trace = torch.tensor(info["loss_trace"])
    assert float(trace[-50:].mean()) < float(trace[:50].mean()) - 5


def test_digits_vae_beats_independent_pixels_on_held_out_log_p(digits, digits_vae):
    train, test = digits
    base = float(independent_bernoulli_log_prob(train, test).sum())
    iw = digits_vae._log_prob_estimate(test, num_samples=200, seed=0)
    per_row = (iw.value - base) / len(test)
    assert per_row > 1.5, (iw, base)  # nats per image; measured about 2.7
    assert iw.value - 4 * iw.stderr > base
    ais = digits_vae._log_prob_estimate(test[:40], method="ais", num_particles=16, num_temps=60)
    iw40 = digits_vae._log_prob_estimate(test[:40], num_samples=200, seed=1)
    # AIS (prior -> posterior) and IWAE (encoder proposal) estimate the same number
    assert abs(ais.value - iw40.value) < 4 * math.hypot(ais.stderr, iw40.stderr) + 1.0


def test_inpainting_beats_mean_imputation(digits, digits_vae):
    train, test = digits
    y = test.clone()
    y[:, 32:] = float("nan")  # hide the bottom half of every 8x8 image
    filled = digits_vae.impute(y, num_samples=500)
    assert torch.equal(filled[:, :32], test[:, :32])
    err_vae = float(((filled[:, 32:] - test[:, 32:]) ** 2).mean())
    err_mean = float(((train.mean(0)[32:] - test[:, 32:]) ** 2).mean())
    assert err_vae < 0.95 * err_mean, (err_vae, err_mean)
    draws = digits_vae.inpaint(y[:5], n=7, num_samples=300)
    assert draws.shape == (7, 5, 64)
    assert torch.equal(draws[:, :, :32], test[:5, :32].expand(7, 5, 32))
    assert bool(((draws == 0) | (draws == 1)).all())
    one = digits_vae.inpaint(y[0], n=3, num_samples=300)
    assert one.shape == (3, 64)


def test_gaussian_vae_trains_with_learned_scale_and_inpaints():
    *_, ppca, _ = _ppca(orthogonal=False)
    Y = ppca.sample(400, seed=4)["y"].float()
    with pytest.warns(ConvergenceWarning):
        vae = VAE.mle(Y, latent_dim=K, hidden=(16,), max_iters=150, batch_size=64, seed=0,
                      progress=False)
    assert isinstance(vae.decoder, MLPDecoder) and isinstance(vae.encoder, GaussianEncoder)
    est = vae._log_prob_estimate(Y[:20], num_samples=100)
    assert math.isfinite(est.value) and est.stderr > 0
    row = Y[0].clone()
    row[2] = float("nan")
    assert torch.isfinite(vae.impute(row)).all()


@pytest.mark.slow
def test_longer_digits_training_gains_more(digits):
    train, test = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # stopping early or not, both fine
        vae = VAE.mle(train, latent_dim=8, hidden=(128,), likelihood="bernoulli",
                      max_iters=6000, batch_size=128, learning_rate=3e-3, seed=0, progress=False)
    base = float(independent_bernoulli_log_prob(train, test).sum())
    with warnings.catch_warnings():
        # after longer training the encoder is too narrow for a few held-out rows (low ESS):
        # the warning is right, and AIS below checks the number independently
        warnings.simplefilter("ignore", EstimatorWarning)
        iw = vae._log_prob_estimate(test, num_samples=1000, seed=0)
    assert (iw.value - base) / len(test) > 4.5, (iw, base)  # measured about 6.0
    ais = vae._log_prob_estimate(test, method="ais", num_particles=64, num_temps=300, seed=1)
    assert abs(ais.value - iw.value) < 4 * math.hypot(ais.stderr, iw.stderr) + 1.0
    y = test.clone()
    y[:, 32:] = float("nan")
    filled = vae.impute(y, num_samples=2000)
    err_vae = float(((filled[:, 32:] - test[:, 32:]) ** 2).mean())
    err_mean = float(((train.mean(0)[32:] - test[:, 32:]) ** 2).mean())
    assert err_vae < 0.85 * err_mean, (err_vae, err_mean)  # measured about 0.77

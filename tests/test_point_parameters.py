"""``pyro.param`` in a model is a point-estimated parameter (issue 13, item 4).

References: the joint maximum of a Normal model with a flat density on the scale and a
Normal prior on the mean has a closed form (``scale^2 = mean((y - mu)^2)``, ``mu`` the
posterior mean given that scale), and given the scale the posterior of ``mu`` is the
conjugate Gaussian. Laplace is exact there (1e-4); MCMC within 4 Monte Carlo standard
errors.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints

import genprog as gp

N = 40
Y = torch.tensor(np.random.default_rng(3).normal(1.0, 2.0, N), dtype=torch.float64)
PRIOR_SD = 10.0


def with_param(n, y=None):
    scale = pyro.param("scale", torch.tensor(1.0), constraint=constraints.positive)
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    with pyro.plate("obs", n):
        pyro.sample("y", dist.Normal(mu, scale), obs=y)


def model():
    return gp.Model(with_param, N).to(dtype=torch.float64).condition(y=Y)


def joint_maximum():
    """Fixed point of mu = posterior mean given scale, scale^2 = mean((y - mu)^2)."""
    y, mu = Y.numpy(), 0.0
    for _ in range(200):
        s2 = float(np.mean((y - mu) ** 2))
        mu = y.sum() / s2 / (N / s2 + 1 / PRIOR_SD**2)
    return mu, math.sqrt(float(np.mean((y - mu) ** 2)))


def conjugate(scale):
    precision = N / scale**2 + 1 / PRIOR_SD**2
    return float(Y.sum()) / scale**2 / precision, precision ** -0.5


def test_param_is_a_latent_site_and_the_param_store_stays_empty():
    m = model()
    assert m.point_parameters() == ["scale"]
    assert m.sample(3)["scale"].tolist() == [1.0, 1.0, 1.0]   # its initial value
    m.fit("map")
    assert list(pyro.get_param_store().keys()) == []


def test_map_estimates_the_param_jointly():
    mu, scale = joint_maximum()
    fit = model().fit("map")
    assert abs(float(fit.draws["mu"]) - mu) < 1e-4
    assert abs(float(fit.draws["scale"]) - scale) < 1e-4


def test_laplace_holds_the_param_at_the_joint_maximum():
    _, scale = joint_maximum()
    fit = model().fit("laplace", draws=100)
    assert fit.info["point_parameters"] == ["scale"]
    assert abs(float(fit.info["point"]["scale"]) - scale) < 1e-4
    mean, sd = conjugate(scale)
    assert abs(float(fit.info["mode"][0]) - mean) < 1e-4
    assert abs(math.sqrt(float(fit.info["covariance"][0, 0])) / sd - 1) < 1e-4


def test_nuts_samples_the_rest_given_the_point_estimate():
    _, scale = joint_maximum()
    fit = model().fit("nuts", chains=4, warmup=300, draws=300, seed=1)
    mean, sd = conjugate(float(fit.info["point"]["scale"]))
    assert abs(float(fit.info["point"]["scale"]) - scale) < 1e-3
    draws = fit.draws["mu"].reshape(-1)
    mcse = sd / math.sqrt(fit.info["diagnostics"]["min_ess_bulk"])
    assert abs(float(draws.mean()) - mean) < 4 * mcse
    assert abs(float(draws.std()) / sd - 1) < 0.1
    assert torch.all(fit.draws["scale"] == fit.info["point"]["scale"])


def test_a_fixed_param_is_not_estimated():
    fit = model().fit("laplace", fixed={"scale": 2.0}, draws=50)
    assert "point_parameters" not in fit.info
    mean, sd = conjugate(2.0)
    assert abs(float(fit.info["mode"][0]) - mean) < 1e-4
    assert abs(math.sqrt(float(fit.info["covariance"][0, 0])) / sd - 1) < 1e-4


def test_module_weights_are_not_parameters_of_the_story():
    net = torch.nn.Linear(1, 1).double()

    def regression(x, y=None):
        f = pyro.module("net", net)
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("obs", x.shape[0]):
            pyro.sample("y", dist.Normal(f(x[:, None])[:, 0], sigma), obs=y)

    x = torch.linspace(0, 1, 10, dtype=torch.float64)
    m = gp.Model(regression, x).to(dtype=torch.float64).condition(y=torch.zeros(10, dtype=torch.float64))
    assert m.point_parameters() == []
    assert [s.name for s in m.structure.latent_continuous] == ["sigma"]


@pytest.mark.parametrize("method", ["vi", "hmc"])
def test_other_bayesian_methods_report_the_point_parameter(method):
    options = {"vi": {"max_iters": 400, "draws": 50}, "hmc": {"chains": 2, "warmup": 50, "draws": 50}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gp.ConvergenceWarning)  # short runs; only the bookkeeping is tested
        fit = model().fit(method, **options[method])
    assert fit.info["point_parameters"] == ["scale"]
    assert "scale" in fit.info["point"]

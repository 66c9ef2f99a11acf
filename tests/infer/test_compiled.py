"""The compiled potential (genprog.infer.compiled) against the model's own potential.

The oracle for every case is ``JointDensity.potential_and_grad``: Pyro's program run
with autograd, an independent path through the same model. In float64 the compiled
value and gradient must match it to 1e-10 at points drawn from the prior (so every
constraint transform and its Jacobian is exercised away from the trace point).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import genprog as gp
from genprog import pk
from genprog.errors import VectorizationWarning
from genprog.infer.compiled import CompiledPotential, compile_potential

# ----------------------------------------------------------------------------- models

SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=torch.float64)
Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=torch.float64)


def eight_schools(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", sigma.shape[0]):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * eta, sigma), obs=y)


def constrained(y=None):
    """Positive, simplex and correlation-Cholesky latents."""
    scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
    w = pyro.sample("w", dist.Dirichlet(torch.ones(3, dtype=torch.float64)))
    L = pyro.sample("L", dist.LKJCholesky(3, 2.0))
    loc = w * torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    with pyro.plate("obs", y.shape[0], dim=-1):
        pyro.sample("y", dist.MultivariateNormal(loc, scale_tril=scale[..., None, None] * L), obs=y)


def regression(x, y=None):
    """A plate model with a masked (padding) observation."""
    a = pyro.sample("a", dist.Normal(0.0, 2.0))
    b = pyro.sample("b", dist.Normal(0.0, 2.0))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        keep = torch.arange(x.shape[0]) < x.shape[0] - 1
        pyro.sample("y", dist.Normal(a + b * x, s).mask(keep), obs=y)


def _theo_sd():
    import os

    data = pk.read_nonmem(os.path.join(os.path.dirname(pk.__file__), "datasets", "theo_sd.csv"))
    pop = pk.PopulationModel(structure=pk.OneCompartment(absorption="first_order"),
                             random_effects=["ka", "cl", "v"], error="additive")
    return pop(data)


def _models():
    g = torch.Generator().manual_seed(3)
    x = torch.linspace(-1, 1, 7, dtype=torch.float64)
    y_mvn = torch.randn(5, 3, generator=g, dtype=torch.float64)
    return {
        "eight_schools": lambda: gp.Model(eight_schools, SIGMA).condition(y=Y),
        "constrained": lambda: gp.Model(constrained, y=y_mvn).condition(y=y_mvn),
        "regression": lambda: gp.Model(regression, x).condition(y=1.0 + 0.5 * x),
    }


MODELS = _models()


def _points(density, n, seed):
    """``n`` prior draws in float64 (unconstrained)."""
    return density.sample_prior(n, torch.Generator().manual_seed(seed)).double()


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_equals_eager_float64(name):
    density = MODELS[name]().density()
    pg = CompiledPotential(density)
    for n, seed in ((3, 0), (5, 1), (3, 2)):  # a new N retraces; the same N reuses
        z = _points(density, n, seed)
        U, g = pg(z)
        U0, g0 = density.potential_and_grad(z)
        assert U.dtype == torch.float64 and U.shape == (n,) and g.shape == (n, density.dim)
        finite = torch.isfinite(U0)
        assert torch.equal(torch.isfinite(U), finite)
        torch.testing.assert_close(U[finite], U0[finite], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(g, g0, rtol=1e-10, atol=1e-10)
    assert sorted(pg.records) == [3, 5]
    assert all(r.mode == "fx" and r.fallback_reason is None for r in pg.records.values())


def test_compiled_equals_eager_population_pk():
    """theo_sd (one-compartment oral PK, 12 subjects, D = 43), in the model's float32: the
    recording replays the eager ops, so agreement is at float32 rounding level."""
    density = _theo_sd().density()
    pg = CompiledPotential(density)
    z = density.sample_prior(4, torch.Generator().manual_seed(0))
    z = 0.3 * z + 0.7 * z.median(0).values  # stay in the bulk of the prior
    U, g = pg(z)
    U0, g0 = density.potential_and_grad(z)
    assert pg.records[4].mode == "fx"
    torch.testing.assert_close(U, U0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_inductor_mode_equals_eager_population_pk():
    """Inductor's fused code for theo_sd's recorded graph (30-95 s to compile on 2 CPU
    cores, hence slow) against the eager potential, at float32 rounding level; and at a
    perturbed point not seen while compiling."""
    density = _theo_sd().density()
    pg = CompiledPotential(density, mode="inductor")
    z = density.sample_prior(4, torch.Generator().manual_seed(0))
    z = 0.3 * z + 0.7 * z.median(0).values  # stay in the bulk of the prior
    for point in (z, z + 0.05 * torch.randn(z.shape, generator=torch.Generator().manual_seed(1))):
        U, g = pg(point)
        U0, g0 = density.potential_and_grad(point)
        torch.testing.assert_close(U, U0, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-4)
    assert pg.records[4].mode == "inductor" and pg.records[4].fallback_reason is None


def test_jit_mode_equals_eager():
    density = MODELS["eight_schools"]().density()
    pg = CompiledPotential(density, mode="jit")
    z = _points(density, 4, 0)
    U, g = pg(z)
    U0, g0 = density.potential_and_grad(z)
    torch.testing.assert_close(U, U0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g, g0, rtol=1e-10, atol=1e-10)
    assert pg.records[4].mode == "jit"


def test_non_finite_is_inf_with_zero_grad():
    density = MODELS["eight_schools"]().density()
    pg = CompiledPotential(density)
    z = _points(density, 3, 0)
    pg(z)  # record at finite points
    z_bad = z.clone()
    z_bad[1, 1] = 1e4  # tau = exp(1e4) = inf: the density is zero (or undefined) there
    U, g = pg(z_bad)
    U0, _g0 = density.potential_and_grad(z_bad)
    assert math.isinf(float(U[1])) and float(U[1]) > 0 and torch.all(g[1] == 0)
    assert torch.equal(torch.isfinite(U), torch.isfinite(U0))
    torch.testing.assert_close(U[[0, 2]], U0[[0, 2]], rtol=1e-10, atol=1e-10)


def branching(y=None):
    """Python control flow on a latent value: what a recording cannot capture."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    scale = 1.0 if bool((mu > 0).all()) else 3.0
    pyro.sample("y", dist.Normal(mu, scale), obs=y)


def test_latent_branch_falls_back_with_one_warning():
    density = gp.Model(branching).condition(y=torch.tensor(0.5, dtype=torch.float64)).density()
    pg = CompiledPotential(density)
    z = torch.full((4, 1), 0.05, dtype=torch.float64)  # all mu > 0: one branch recorded
    # the branch couples particles in a plate and stops vmap: the model runs draw by draw,
    # which is never recorded (genprog.vectorize); the one warning says so
    with pytest.warns(VectorizationWarning, match="once per draw"):
        U, g = pg(z)
    assert pg.records[4].mode == "eager"
    z2 = torch.tensor([[-1.0], [0.3], [2.0], [-0.2]], dtype=torch.float64)
    U0, g0 = density.potential_and_grad(z2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not per call or per new N
        U, g = pg(z2)
        pg(torch.zeros(2, 1, dtype=torch.float64))
    torch.testing.assert_close(U, U0)
    torch.testing.assert_close(g, g0)


def mixture(y=None):
    w = pyro.sample("w", dist.Dirichlet(torch.ones(2)))
    locs = pyro.sample("locs", dist.Normal(torch.tensor([-2.0, 2.0]), 1.0).to_event(1))
    with pyro.plate("data", y.shape[0]):
        k = pyro.sample("k", dist.Categorical(w))
        loc = pyro.ops.indexing.Vindex(locs)[..., k]
        pyro.sample("y", dist.Normal(loc, 1.0), obs=y)


def test_enumerated_model_uses_eager_path_without_warning():
    y = torch.tensor([-2.1, -1.8, 2.2, 1.9, 2.5])
    density = gp.Model(mixture, y=y).condition(y=y).density()
    assert density.has_enumeration
    pg = CompiledPotential(density)
    z = _points(density, 3, 0).float()
    U, g = pg(z)
    U0, g0 = density.potential_and_grad(z)
    torch.testing.assert_close(U, U0)
    torch.testing.assert_close(g, g0)
    assert pg.records[3].mode == "eager" and "enumerated" in pg.records[3].fallback_reason


def test_compile_potential_options():
    density = MODELS["eight_schools"]().density()
    assert compile_potential(density, False) == density.potential_and_grad
    assert isinstance(compile_potential(density, True), CompiledPotential)
    assert compile_potential(density, "jit").mode == "jit"
    with pytest.raises(ValueError, match="compile mode"):
        compile_potential(density, "turbo")  # ("inductor" is a mode since issue 14)
    with pytest.raises(TypeError, match="compile must be"):
        compile_potential(density, 1.5)


def test_fit_compile_option_validated():
    model = MODELS["eight_schools"]()
    with pytest.raises(ValueError, match="compile must be"):
        model.fit("nuts", chains=2, warmup=5, draws=5, compile="fast")
    with pytest.raises(TypeError, match="unknown option"):
        model.fit("nuts", chains=2, warmup=5, draws=5, compiled=True)


@pytest.mark.parametrize("method, options", [("nuts", {"max_tree_depth": 4}),
                                             ("hmc", {"num_steps": 4})])
def test_compiled_fit_reproduces_eager_fit(method, options):
    """Same seed, same arithmetic up to rounding: the float64 chains coincide."""
    model = MODELS["eight_schools"]()
    kw = dict(chains=2, warmup=20, draws=10, seed=4, progress=False, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short runs: low-ESS / R-hat warnings
        a = model.fit(method, compile=True, **kw)
        b = model.fit(method, compile=False, **kw)
    assert a.info["potential"]["mode"] == "fx"
    assert b.info["potential"]["mode"] == "eager"
    for site in ("mu", "tau", "eta"):
        np.testing.assert_allclose(a.draws[site].numpy(), b.draws[site].numpy(), rtol=1e-6,
                                   atol=1e-8)


@pytest.mark.slow
def test_compiled_nuts_agrees_with_eager_nuts_statistically():
    """Different seeds, 4 x 500 draws each: posterior means agree within 4 combined MCSE."""
    import arviz as az

    model = MODELS["eight_schools"]()
    with warnings.catch_warnings():  # NUTS may report a rare divergence on eight schools
        warnings.simplefilter("ignore", gp.ConvergenceWarning)
        a = model.fit("nuts", chains=4, warmup=500, draws=500, seed=1, compile=True)
        b = model.fit("nuts", chains=4, warmup=500, draws=500, seed=2, compile=False)
    for site in ("mu", "tau"):
        xa, xb = a.draws[site].numpy(), b.draws[site].numpy()
        se = math.hypot(float(az.mcse(xa)), float(az.mcse(xb)))
        assert abs(xa.mean() - xb.mean()) < 4 * se, (site, xa.mean(), xb.mean(), se)

"""Bad input to the core API: every case a clear error that names the culprit.

One row per case (and its siblings), grouped by where the input enters: model inputs,
``condition``, ``log_prob``, ``sample`` / ``log_marginal``, ``fit`` arguments,
``fit(fixed=...)``, densities that are zero or NaN everywhere, and saved files. Each row
states the exception type and a regex the message must match; the regex always names the
culprit (site, argument, value or file), so a generic error from deep inside torch fails.
"""

from __future__ import annotations

import math

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import genprog as gp

N = 6
Y = torch.tensor([0.3, -1.2, 0.8, 1.9, 0.1, -0.4])


def normal_scale(n):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("obs", n):
        pyro.sample("y", dist.Normal(mu, sigma))


def waiting_times(n):
    rate = pyro.sample("rate", dist.Gamma(2.0, 2.0))
    with pyro.plate("obs", n):
        pyro.sample("t", dist.Exponential(rate))


def counts(n):
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    with pyro.plate("obs", n):
        pyro.sample("k", dist.Binomial(10, p))


def impossible(n, y=None):
    """A density that is zero everywhere (a factor of -inf)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.factor("never", torch.tensor(-math.inf))
    with pyro.plate("obs", n):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def undefined(n, y=None):
    """A density that is NaN everywhere."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.factor("undefined", torch.tensor(math.nan))
    with pyro.plate("obs", n):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def model():
    return gp.Model(normal_scale, N)


def conditioned():
    return model().condition(y=Y)


# ============================================================================ inputs / condition

CONDITION_CASES = [
    ("inf", lambda: model().condition(y=torch.tensor([0.0, math.inf, 0, 0, 0, 0])),
     ValueError, r"'y'.*infinite.*\[1\]"),
    ("minus-inf", lambda: model().condition(y=torch.tensor([0.0, 0, 0, 0, 0, -math.inf])),
     ValueError, r"'y'.*infinite"),
    ("float32-overflow", lambda: model().condition(y=np.array([0.0, 1e300, 0, 0, 0, 0])),
     ValueError, r"'y'.*1e\+300.*overflows"),
    ("complex", lambda: model().condition(y=np.ones(N) * 1j), TypeError, r"'y'.*complex"),
    ("complex-tensor", lambda: model().condition(y=torch.ones(N, dtype=torch.complex64)),
     TypeError, r"'y'.*complex"),
    ("strings", lambda: model().condition(y=np.array(["a"] * N)), TypeError, r"'y'"),
    ("wrong-shape", lambda: model().condition(y=torch.zeros(N + 1)), ValueError, r"'y'.*shape"),
    ("scalar-for-vector", lambda: model().condition(y=1.0), ValueError, r"'y'.*shape"),
    ("unknown-site", lambda: model().condition(z=Y), ValueError, r"unknown site.*'z'"),
    ("nothing", lambda: model().condition(), ValueError, r"no observations"),
    ("not-a-dict", lambda: model().condition([1, 2]), TypeError, r"dict or DataFrame"),
    ("out-of-support", lambda: gp.Model(waiting_times, 3).condition(t=torch.tensor([1.0, -2.0, 3.0])),
     ValueError, r"'t'.*outside its support"),
    ("non-integer-discrete", lambda: gp.Model(counts, 2).condition(k=torch.tensor([1.5, 2.0])),
     ValueError, r"'k'.*discrete"),
    ("count-above-trials", lambda: gp.Model(counts, 2).condition(k=torch.tensor([11.0, 2.0])),
     ValueError, r"'k'.*support"),
    ("model-not-callable", lambda: gp.Model(3), TypeError, r"callable"),
    ("input-overflow", lambda: gp.Model(lambda x: None, np.array([1e300])), ValueError, r"overflows"),
    ("input-complex", lambda: gp.Model(lambda x: None, np.array([1j])), TypeError, r"complex"),
    ("coords-unknown-plate", lambda: model().with_coords(nope=[1]), ValueError, r"nope"),
    ("coords-wrong-length", lambda: model().with_coords(obs=[1, 2]), ValueError, r"'obs'.*size 6"),
    ("marginalize-nothing", lambda: model().marginalize(), ValueError, r"name at least one"),
    ("marginalize-continuous", lambda: model().marginalize("mu"), ValueError, r"'mu'"),
    ("marginalize-unknown", lambda: model().marginalize("nope"), ValueError, r"nope"),
]


@pytest.mark.parametrize("call, error, match", [pytest.param(*c[1:], id=c[0]) for c in CONDITION_CASES])
def test_condition_and_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ============================================================================ log_prob

LOG_PROB_CASES = [
    ("unknown-site", lambda m: m.log_prob(nope=1.0), ValueError, r"nope"),
    ("scale-negative", lambda m: m.log_prob(mu=0.0, sigma=-1.0), ValueError, r"'sigma'.*support"),
    ("nan-value", lambda m: m.log_prob(mu=math.nan, sigma=1.0), ValueError, r"'mu'.*NaN"),
    ("wrong-shape", lambda m: m.log_prob(mu=torch.zeros(2, 3), sigma=1.0), ValueError, r"'mu'.*shape"),
    ("inconsistent-draws", lambda m: m.log_prob(mu=torch.zeros(3), sigma=torch.ones(4)), ValueError,
     r"inconsistent"),
    ("latent-not-given", lambda m: m.log_prob(mu=0.0), ValueError, r"'sigma'.*not given"),
    ("complex", lambda m: m.log_prob(mu=torch.zeros((), dtype=torch.complex64), sigma=1.0), TypeError,
     r"'mu'.*complex"),
]


@pytest.mark.parametrize("call, error, match", [pytest.param(*c[1:], id=c[0]) for c in LOG_PROB_CASES])
def test_log_prob(call, error, match):
    with pytest.raises(error, match=match):
        call(conditioned())


# ============================================================================ sample / log_marginal

SAMPLE_CASES = [
    ("n-zero", lambda m: m.sample(0), ValueError, r"n must be a positive int"),
    ("n-bool", lambda m: m.sample(True), TypeError, r"n must be a positive int"),
    ("n-float", lambda m: m.sample(2.5), TypeError, r"n must be"),
    ("seed-string", lambda m: m.sample(3, seed="abc"), TypeError, r"seed.*'abc'"),
    ("seed-negative", lambda m: m.sample(3, seed=-1), ValueError, r"seed"),
    ("evidence-unknown-method", lambda m: m.log_marginal("magic"), ValueError, r"magic"),
    ("evidence-unknown-option", lambda m: m.log_marginal("is", bogus=1), TypeError, r"bogus"),
    ("evidence-no-samples", lambda m: m.log_marginal("is", num_samples=0), ValueError, r"num_samples"),
    ("evidence-particles-bool", lambda m: m.log_marginal("ais", num_particles=True), TypeError,
     r"num_particles"),
    ("evidence-unconditioned", lambda m: model().log_marginal("is"), ValueError, r"condition"),
]


@pytest.mark.parametrize("call, error, match", [pytest.param(*c[1:], id=c[0]) for c in SAMPLE_CASES])
def test_sample_and_log_marginal(call, error, match):
    with pytest.raises(error, match=match):
        call(conditioned())


# ============================================================================ fit arguments

FIT_CASES = [
    ("unknown-method", lambda m: m.fit("gibbs"), ValueError, r"gibbs"),
    ("unknown-option", lambda m: m.fit("map", bogus=1), TypeError, r"bogus"),
    ("chains-bool", lambda m: m.fit("nuts", chains=True), TypeError, r"chains"),
    ("chains-zero", lambda m: m.fit("nuts", chains=0), ValueError, r"chains"),
    ("chains-float", lambda m: m.fit("nuts", chains=2.5), TypeError, r"chains"),
    ("warmup-negative", lambda m: m.fit("nuts", warmup=-1), ValueError, r"warmup"),
    ("draws-zero-nuts", lambda m: m.fit("nuts", draws=0), ValueError, r"draws"),
    ("draws-zero-vi", lambda m: m.fit("vi", draws=0), ValueError, r"draws"),
    ("draws-negative-laplace", lambda m: m.fit("laplace", draws=-3), ValueError, r"draws"),
    ("seed-string-map", lambda m: m.fit("map", seed="abc"), TypeError, r"seed.*'abc'"),
    ("seed-string-nuts", lambda m: m.fit("nuts", seed="abc"), TypeError, r"seed"),
    ("seed-string-vi", lambda m: m.fit("vi", seed="abc"), TypeError, r"seed"),
    ("seed-negative", lambda m: m.fit("laplace", seed=-2), ValueError, r"seed"),
    ("max-iters-negative-map", lambda m: m.fit("map", max_iters=-5), ValueError, r"max_iters"),
    ("max-iters-negative-vi", lambda m: m.fit("vi", max_iters=-5), ValueError, r"max_iters"),
    ("max-iters-bool-laplace", lambda m: m.fit("laplace", max_iters=True), TypeError, r"max_iters"),
    ("learning-rate-zero", lambda m: m.fit("vi", learning_rate=0.0), ValueError, r"learning_rate"),
    ("learning-rate-nan", lambda m: m.fit("vi", learning_rate=math.nan), ValueError, r"learning_rate"),
    ("window-one", lambda m: m.fit("vi", window=1), ValueError, r"window"),
    ("particles-zero", lambda m: m.fit("vi", num_particles=0), ValueError, r"num_particles"),
    ("unknown-guide", lambda m: m.fit("vi", guide="spline"), ValueError, r"spline"),
    ("unknown-backend", lambda m: m.fit("nuts", backend="stan"), ValueError, r"stan"),
    ("target-accept-above-one", lambda m: m.fit("nuts", target_accept=1.5), ValueError, r"target_accept"),
    ("target-accept-string", lambda m: m.fit("hmc", target_accept="high"), TypeError, r"target_accept"),
    ("tree-depth-zero", lambda m: m.fit("nuts", max_tree_depth=0), ValueError, r"max_tree_depth"),
    ("hmc-steps-zero", lambda m: m.fit("hmc", num_steps=0), ValueError, r"num_steps"),
    ("point-unknown", lambda m: m.fit("laplace", point=["nope"]), ValueError, r"nope"),
    ("unconditioned", lambda m: model().fit("map"), ValueError, r"condition"),
]


@pytest.mark.parametrize("call, error, match", [pytest.param(*c[1:], id=c[0]) for c in FIT_CASES])
def test_fit_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(conditioned())


FIXED_CASES = [
    ("unknown-site", {"nope": 1.0}, ValueError, r"nope"),
    ("observed-site", {"y": torch.zeros(N)}, ValueError, r"observed"),
    ("wrong-shape", {"mu": torch.zeros(3)}, ValueError, r"'mu'.*shape"),
    ("string", {"sigma": "big"}, TypeError, r"'sigma'.*'big'"),
    ("outside-support", {"sigma": -1.0}, ValueError, r"'sigma'.*support"),
    ("zero-scale", {"sigma": 0.0}, ValueError, r"fixed value.*'sigma'.*scale"),
    ("nan", {"mu": math.nan}, ValueError, r"'mu'.*finite"),
    ("inf", {"mu": math.inf}, ValueError, r"'mu'.*finite"),
    ("overflow", {"mu": np.array(1e300)}, ValueError, r"'mu'.*overflows"),
]


@pytest.mark.parametrize("fixed, error, match", [pytest.param(*c[1:], id=c[0]) for c in FIXED_CASES])
def test_fixed_values(fixed, error, match):
    with pytest.raises(error, match=match):
        conditioned().fit("map", fixed=fixed)


# ============================================================================ densities nowhere finite

NONFINITE_CASES = [
    ("map-zero-density", impossible, "map", ValueError, r"log density is not finite.*'never'"),
    ("laplace-zero-density", impossible, "laplace", ValueError, r"log density is not finite.*'never'"),
    ("nuts-zero-density", impossible, "nuts", ValueError, r"log density is not finite.*'never'"),
    ("map-nan-density", undefined, "map", ValueError, r"log_factor.*nan"),
    ("hmc-nan-density", undefined, "hmc", ValueError, r"log_factor.*nan"),
    ("vi-zero-density", impossible, "vi", ValueError, r"log density is not finite.*'never'"),
]


@pytest.mark.parametrize("fn, method, error, match", [pytest.param(*c[1:], id=c[0]) for c in NONFINITE_CASES])
def test_density_not_finite_is_an_error(fn, method, error, match):
    m = gp.Model(fn, N, y=Y)
    with pytest.raises(error, match=match):
        m.fit(method, **({"draws": 10, "warmup": 10} if method in ("nuts", "hmc") else {}))


# ============================================================================ saved files


@pytest.fixture(scope="module")
def laplace_fit():
    return conditioned().fit("laplace", draws=40, seed=1)


def test_save_refuses_to_overwrite(laplace_fit, tmp_path):
    path = tmp_path / "run.nc"
    laplace_fit.save(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="run.nc.*overwrite=True"):
        laplace_fit.save(path)
    assert path.read_bytes() == before
    laplace_fit.save(path, overwrite=True)
    loaded = gp.load(path, model=conditioned())
    assert torch.allclose(loaded.draws["mu"].float(), laplace_fit.draws["mu"].float())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_save_to_a_folder_is_an_error(laplace_fit, tmp_path):
    with pytest.raises(FileExistsError, match="overwrite"):
        laplace_fit.save(tmp_path)
    with pytest.raises(IsADirectoryError, match="folder"):
        laplace_fit.save(tmp_path, overwrite=True)


def _foreign_file(path, **attrs):
    idata = az.from_dict(posterior={"mu": np.zeros((2, 5)), "sigma": np.ones((2, 5))})
    idata.posterior.attrs.update(attrs)
    idata.to_netcdf(str(path), engine="h5netcdf")
    return path


LOAD_CASES = [
    ("missing-file", lambda d: d / "nope.nc", {}, FileNotFoundError, r"nope.nc"),
    ("a-folder", lambda d: d, {}, IsADirectoryError, r"folder"),
    ("garbage-bytes", lambda d: (d / "junk.nc").write_bytes(b"\x89HDF junk" * 50) and d / "junk.nc", {},
     ValueError, r"junk.nc.*not a readable"),
    ("text-file", lambda d: (d / "notes.nc").write_text("hello") and d / "notes.nc", {},
     ValueError, r"notes.nc.*not a readable"),
    ("bad-info-json", lambda d: _foreign_file(d / "f.nc", genprog_method="map", genprog_info="{bad"),
     {}, ValueError, r"'genprog_info'.*JSON"),
    ("info-not-a-dict", lambda d: _foreign_file(d / "f.nc", genprog_method="map", genprog_info="[1]"),
     {}, ValueError, r"'genprog_info'.*dict"),
    ("deep-json", lambda d: _foreign_file(d / "f.nc", genprog_method="map",
                                          genprog_info="[" * 100000 + "]" * 100000),
     {}, ValueError, r"'genprog_info'"),
    ("seed-not-int", lambda d: _foreign_file(d / "f.nc", genprog_method="map", genprog_seed="x"),
     {}, ValueError, r"'genprog_seed'"),
    ("model-sites-differ", lambda d: _foreign_file(d / "f.nc"), {"model": lambda: gp.Model(
        waiting_times, 3).condition(t=torch.ones(3))}, ValueError, r"do not match.*'rate'"),
    ("model-shapes-differ", lambda d: (az.from_dict(posterior={
        "mu": np.zeros((1, 4, 2)), "sigma": np.ones((1, 4))}).to_netcdf(str(d / "s.nc"), engine="h5netcdf"),
        d / "s.nc")[1], {"model": conditioned}, ValueError, r"'mu'.*shape"),
]


@pytest.mark.parametrize("make, kwargs, error, match", [pytest.param(*c[1:], id=c[0]) for c in LOAD_CASES])
def test_load_checks_what_it_reads(make, kwargs, error, match, tmp_path):
    path = make(tmp_path)
    kwargs = {k: v() for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        gp.load(path, **kwargs)


def test_foreign_file_loads_as_draws_only(tmp_path):
    fit = gp.load(_foreign_file(tmp_path / "other.nc"))
    assert fit.method == "external" and fit.draws["mu"].shape == (2, 5)
    with pytest.raises(ValueError, match="needs the model"):
        fit.predict()
    with_model = gp.load(tmp_path / "other.nc", model=conditioned())
    assert with_model.predict(n=3)["y"].shape == (3, N)

"""Eight schools, end to end: a Pyro model as a distribution in genprog.

Run: ``python tutorials/eight_schools.py`` (set ``CI=1`` for a quick run with small settings).

The eight-schools data (Rubin 1981): estimated coaching effects ``y`` and their standard
errors ``sigma`` in eight schools. The hierarchical model shares strength between schools
through a population mean ``mu`` and spread ``tau``; we write it non-centred.
"""

import os
import tempfile
import warnings

import arviz as az
import pyro
import pyro.distributions as dist
import torch

import genprog as gp

smoke = "CI" in os.environ
chains, warmup, draws = (2, 150, 150) if smoke else (4, 1000, 1000)

y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


# 1. A generative story is a plain Pyro model function; @gp.model makes it a distribution.
@gp.model
def eight_schools(sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * eta)
        pyro.sample("y", dist.Normal(theta, sigma))


model = eight_schools(sigma).with_coords(school=list("ABCDEFGH"))
print(model)

# 2. Sample: ancestral draws of every site at once, vectorized over draws.
prior = model.sample(1000, seed=0)
print("prior draws:", {k: tuple(v.shape) for k, v in prior.items()})

# 3. log p of a full assignment (the joint), batched over a leading draw dim.
print("log p(first 3 prior draws):", model.log_prob(**{k: prior[k][:3] for k in ("mu", "tau", "eta", "y")}))

# 4. Condition on the observed effects: a new Model.
posterior_model = model.condition(y=y)

# 5. The evidence log p(y), estimated with an error bar, three ways.
for method, options in [("is", {"num_samples": 2000 if smoke else 20000}),
                        ("ais", {"num_particles": 64 if smoke else 256, "num_temps": 50 if smoke else 200}),
                        ("laplace", {})]:
    print(f"log p(y) by {method}:", posterior_model.log_marginal(method, **options))

# 6. Fit four ways. MAP and Laplace are quick; VI gives an approximate posterior;
#    NUTS is the reference. Warnings report anything that should not be trusted.
map_fit = posterior_model.fit("map")
print("MAP mu, tau:", float(map_fit.draws["mu"][0, 0]), float(map_fit.draws["tau"][0, 0]))
with warnings.catch_warnings():
    warnings.simplefilter("ignore", gp.ConvergenceWarning)  # short runs in CI
    vi_fit = posterior_model.fit("vi", guide="full_rank", max_iters=500 if smoke else 20000, progress=False)
    nuts_fit = posterior_model.fit("nuts", chains=chains, warmup=warmup, draws=draws, seed=0, progress=False)
print("VI ELBO:", vi_fit.info["final_elbo"], "converged:", vi_fit.info["converged"])
print(nuts_fit.summary(var_names=["mu", "tau"]))
print("divergences:", nuts_fit.info["diagnostics"]["divergences"])

# 7. Hold a site fixed, or point-estimate it, at fit time: no rewriting of the model.
fixed_fit = posterior_model.fit("nuts", fixed={"tau": 1.0}, chains=chains, warmup=warmup, draws=draws,
                                progress=False)
print("mu | tau = 1:", float(fixed_fit.draws["mu"].mean()))

# 8. ArviZ: posterior, sample stats, pointwise log likelihood (LOO), predictive groups.
idata = nuts_fit.to_arviz(prior=True, posterior_predictive=True)
print(idata)
print(az.loo(idata))

# 9. Posterior predictive draws, also under new inputs (here: all schools with sigma = 5).
ppc = nuts_fit.predict(n=200, sigma=torch.full((8,), 5.0))
print("predictive y with sigma=5:", ppc["y"].mean(0))

# 10. Missing data: NaN entries are imputed by inference.
y_missing = y.clone()
y_missing[0] = float("nan")
with warnings.catch_warnings():
    warnings.simplefilter("ignore", gp.ConvergenceWarning)
    missing_fit = model.condition(y=y_missing).fit("nuts", chains=chains, warmup=warmup, draws=draws,
                                                   progress=False)
print("imputed y[A]:", float(missing_fit.draws["y_missing"].mean()), "+/-",
      float(missing_fit.draws["y_missing"].std()))

# 11. Save and load: netCDF, no pickle.
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "eight_schools.nc")
    nuts_fit.save(path)
    loaded = gp.load(path, model=posterior_model)
    assert torch.equal(loaded.draws["mu"], nuts_fit.draws["mu"])
    print("saved and reloaded", path)

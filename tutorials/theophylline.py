"""Population PK of theophylline (theo_sd), end to end: data, NLME model, ML and Bayesian fits.

Run: ``python tutorials/theophylline.py`` (``CI=1`` for a quick run; ``GENPROG_NUTS=1`` adds a
4-chain NUTS fit, minutes on 2 CPU cores). Figures and tables go to ``./theophylline_out/``
(or ``$GENPROG_OUT``).

Data: 12 subjects, one oral dose (~320 mg) at time 0, 11 concentrations each over 24 h
(Boeckmann, Sheiner and Beal; the NONMEM / R ``Theoph`` data set).
"""

import os
import warnings

import arviz as az
import pandas as pd

import genprog as gp
from genprog import pk

smoke = "CI" in os.environ
out = os.environ.get("GENPROG_OUT", "theophylline_out")
os.makedirs(out, exist_ok=True)
pd.set_option("display.width", 160)
pd.set_option("display.max_columns", 12)

# 1. Read the NONMEM-style file: errors name the row and column; nothing is silently dropped.
data = pk.read_nonmem(pk.dataset_path("theo_sd"))
print(pk.describe(data))

# 2. The population model: one compartment with first-order absorption, log-normal IIV on
#    ka, CL and V, combined residual error, an allometric-style power effect of weight on CL.
model = pk.PopulationModel(
    structure=pk.OneCompartment(absorption="first_order"),
    random_effects=["ka", "cl", "v"],
    error="combined",
    covariates={"cl": "WT"},
)

# 3. Population maximum likelihood, etas integrated out per subject (FOCE-I, as NONMEM; "laplace" optional).
mle = model.fit(data, method="mle")
table = mle.summary()
print(table)
print({k: round(v, 3) if isinstance(v, float) else v for k, v in table.attrs.items()})
print(mle.individual_parameters().head())
table.to_csv(os.path.join(out, "mle_summary.csv"))

# 4. Diagnostics: goodness of fit and a visual predictive check.
pk.plot_gof(mle).savefig(os.path.join(out, "gof.png"))
pk.vpc(mle, n_sim=50 if smoke else 500).savefig(os.path.join(out, "vpc.png"))

# 5. Bayesian: the same model through every genprog operation. model(data) is a gp.Model.
m = model(data)
print(m)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", gp.ConvergenceWarning)  # short runs in CI
    vi = model.fit(data, method="vi", max_steps=800 if smoke else 20000, progress=False)
print(vi.summary())
if os.environ.get("GENPROG_NUTS"):  # NUTS on the population: minutes on 2 CPU cores
    nuts = model.fit(data, method="nuts", chains=4, warmup=500, draws=500)
    print(nuts.summary())
    print(az.loo(nuts.to_arviz()))
    nuts.save(os.path.join(out, "posterior.nc"))
print("done: outputs in", out)

"""A latent neural ODE for drug concentration profiles, next to the compartment model.

Run: ``python tutorials/latent_ode_pk.py`` (``CI=1`` for a quick run). Figures go to
``./latent_ode_pk_out/`` (or ``$GENPROG_OUT``).

1. Simulate a population of one-compartment oral profiles (``pk.one_compartment_oral``;
   log-normal variability in ka, CL and V; doses 100/200/300; each subject sampled at its
   own jittered times; 10% proportional error).
2. Train a latent ODE on them (``LatentODE.mle``: amortized VI, a GRU encoder as the guide
   of each subject's ``z0``; linear kinetics: the profile scales with the dose).
3. Embed the profiles: the encoder's posterior means of ``z0``, coloured by the true CL.
4. Predict a new subject's whole profile from its first three samples: the MAP of ``z0``
   and 90% bands from posterior draws (Laplace proposal, importance-reweighted).
5. Compare with the NLME compartment model (``pk.PopulationModel`` fitted by population
   ML): its individual predictions from the same three samples (empirical Bayes
   estimates), on held-out later concentrations of new subjects.
"""

import os
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from genprog import pk
from genprog.errors import ConvergenceWarning
from genprog.models.latent_ode import LatentODE
from genprog.pk.estimation import LaplaceObjective, fit_mle

smoke = "CI" in os.environ
out = os.environ.get("GENPROG_OUT", "latent_ode_pk_out")
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)

NOMINAL = np.array([0.5, 1.5, 3.0, 5.0, 8.0, 12.0, 18.0, 24.0])
FIRST = 3


# 1. A simulated population (the truth is known, so predictions can be scored).
def simulate(n, seed):
    g = np.random.default_rng(seed)
    ka = 1.2 * np.exp(0.4 * g.standard_normal(n))
    cl = 3.0 * np.exp(0.3 * g.standard_normal(n))
    v = 30.0 * np.exp(0.3 * g.standard_normal(n))
    dose = g.choice([100.0, 200.0, 300.0], n)
    t = np.sort(NOMINAL * np.exp(0.15 * g.standard_normal((n, len(NOMINAL)))), 1)
    c = pk.one_compartment_oral(torch.tensor(t), torch.tensor(dose)[:, None],
                                torch.tensor(ka)[:, None], torch.tensor(cl)[:, None],
                                torch.tensor(v)[:, None]).numpy()
    y = c * np.exp(0.1 * g.standard_normal(c.shape))
    return {"times": torch.tensor(t, dtype=torch.float32), "y": torch.tensor(y, dtype=torch.float32),
            "dose": torch.tensor(dose, dtype=torch.float32), "ka": ka, "cl": cl, "v": v}


train = simulate(40 if smoke else 100, seed=0)
test = simulate(15 if smoke else 40, seed=1)
print(f"training subjects {len(train['dose'])}, new subjects {len(test['dose'])}")

# 2. Train the latent ODE (a log-normal likelihood: proportional error on concentrations).
with warnings.catch_warnings():
    if smoke:
        warnings.simplefilter("ignore", ConvergenceWarning)
    model = LatentODE.mle(train["times"], train["y"], dose=train["dose"], likelihood="lognormal",
                          latent_dim=3, hidden=(32,), step_size=0.1, learning_rate=0.03,
                          max_iters=120 if smoke else 2000, window=40 if smoke else 100, seed=0)
print(model, f"trained {model.info['num_steps']} steps in {model.info['wall_time_s']:.1f} s")

# 3. Embedding: posterior means of z0 from the encoder, coloured by the true clearance.
q = model.posterior_estimate(train["y"], train["times"], dose=train["dose"])
z = q.mean.numpy()
fig, axes = plt.subplots(1, 2, figsize=(9, 4))
for ax, (name, values) in zip(axes, [("CL", train["cl"]), ("ka", train["ka"])]):
    sc = ax.scatter(z[:, 0], z[:, 1], c=np.log(values), cmap="viridis", s=18)
    ax.set_xlabel("E[z0_1 | y]")
    ax.set_ylabel("E[z0_2 | y]")
    fig.colorbar(sc, ax=ax, label=f"log {name} (true)")
fig.tight_layout()
fig.savefig(os.path.join(out, "embedding.png"))
corr = [[abs(np.corrcoef(z[:, j], np.log(train[p]))[0, 1]) for j in range(z.shape[1])]
        for p in ("ka", "cl", "v")]
print(pd.DataFrame(corr, index=["log ka", "log CL", "log V"],
                   columns=[f"z0_{j + 1}" for j in range(z.shape[1])]).round(2)
      .to_string(header=True), "\n(|correlation| of the embedding with the true parameters)")


# 5 (first half). The NLME compartment model fitted on the same training subjects.
def nonmem_frame(sim, keep):
    rows = []
    for i in range(len(sim["dose"])):
        rows.append((i + 1, 0.0, 0.0, float(sim["dose"][i]), 1, 1, 1))
        for j in range(sim["times"].shape[1]):
            rows.append((i + 1, float(sim["times"][i, j]), float(sim["y"][i, j]), 0.0, 0,
                         0 if j < keep else 1, 2))
    return pd.DataFrame(rows, columns=["ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT"])


population = pk.PopulationModel(structure=pk.OneCompartment(), random_effects=["ka", "cl", "v"],
                                error="exponential")
with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    nlme = fit_mle(population, pk.read_nonmem(nonmem_frame(train, len(NOMINAL))),
                   standard_errors=False)
print(nlme.summary())


def nlme_predict(sim, first):
    """Individual predictions at every design time from EBEs given the first samples."""
    given = pk.read_nonmem(nonmem_frame(sim, first)).to(dtype=torch.float64)
    obj = LaplaceObjective(population, given, population.priors_for(given))
    values = obj.layout.unpack(nlme.phi)
    eta = obj.ebe(values, torch.zeros(given.n_subjects, obj.P, dtype=torch.float64))
    full = pk.read_nonmem(nonmem_frame(sim, len(NOMINAL))).to(dtype=torch.float64)
    _, pred = LaplaceObjective(population, full, population.priors_for(full)).conditional(values, eta)
    return pred.detach().float()


# 4. A new subject's profile from its first three samples, with bands.
grid = torch.linspace(0.25, 26.0, 80)
i = 0
prof = model.predict_profile(test["times"][i, :FIRST], test["y"][i, :FIRST], grid,
                             dose=test["dose"][i], n=200 if smoke else 2000, method="is", seed=0)
truth = pk.one_compartment_oral(grid.double(), float(test["dose"][i]), test["ka"][i], test["cl"][i],
                                test["v"][i]).numpy()
sim_i = {k: (v[i:i + 1] if torch.is_tensor(v) else v) for k, v in test.items()}
fig, ax = plt.subplots(figsize=(6, 4))
ax.fill_between(grid, prof.lower, prof.upper, alpha=0.3, label="latent ODE 90% band")
ax.plot(grid, prof.map, label="latent ODE (MAP z0)")
ax.plot(grid, truth, "k--", label="true curve")
ax.scatter(test["times"][i, :FIRST], test["y"][i, :FIRST], c="k", zorder=3, label="given samples")
ax.scatter(test["times"][i, FIRST:], test["y"][i, FIRST:], facecolors="none", edgecolors="r",
           zorder=3, label="held-out samples")
nlme_i = nlme_predict(sim_i, FIRST)[0].numpy()
ax.plot(test["times"][i], nlme_i, "g:", marker="x", label="NLME individual (EBE)")
ax.set_xlabel("time (h)")
ax.set_ylabel("concentration")
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(os.path.join(out, "new_subject.png"))
print(f"importance-sampling ESS for the new subject: {float(prof.details['ess'][0]):.0f}")

# 5. Held-out later concentrations of every new subject, from their first three samples.
later = test["y"][:, FIRST:]
mp = model.map_latent(test["times"][:, :FIRST], test["y"][:, :FIRST], dose=test["dose"])
ode_pred = model.predict(test["times"][:, FIRST:], mp.z, dose=test["dose"])
nlme_pred = nlme_predict(test, FIRST)[:, FIRST:]
pop_curve = (train["y"] / train["dose"][:, None]).log().mean(0).exp()[None, FIRST:] * test["dose"][:, None]


def log_rmse(pred):
    return float(((pred.log() - later.log()) ** 2).mean().sqrt())


table = pd.Series({"latent ODE (MAP z0 from 3 samples)": log_rmse(ode_pred),
                   "NLME 1-cmt (EBE from 3 samples)": log_rmse(nlme_pred),
                   "population mean curve": log_rmse(pop_curve)}, name="log-RMSE")
print(table.round(3).to_string())
print("done")

"""Normalizing flows on two moons: train, sample, exact log p, estimated marginals.

Run: ``python tutorials/flows_two_moons.py`` (``CI=1``: a quick run with small settings).
Writes ``flows_two_moons.png`` (density and samples) into the working directory.

1. Two moons (scikit-learn's generator, no download) are fitted by maximum likelihood with a
   neural spline coupling flow (``Flow.mle``) and with a continuous normalizing flow
   (``ContinuousFlow.mle``, torchdiffeq, Hutchinson trace).
2. Held-out log p is exact for both; we compare it with a Gaussian fitted to the same data.
3. The marginal density of one coordinate has no closed form: ``marginalize(dims=[1])``
   estimates it by annealed importance sampling, with an error bar.
4. Conditioning on one coordinate gives a generic model over the other; NUTS samples it.
"""

import os
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import scipy.stats as st
import torch
from sklearn.datasets import make_moons

import genprog as gp
from genprog.models import ContinuousFlow, Flow

smoke = "CI" in os.environ
torch.manual_seed(0)
warnings.simplefilter("ignore", gp.ConvergenceWarning)  # short runs in CI stop early


def moons(n, seed):
    x, _ = make_moons(n, noise=0.08, random_state=seed)
    return torch.tensor(x, dtype=torch.float32)


train, test = moons(2000, 0), moons(1000, 1)

# 1. train -------------------------------------------------------------------------
flow = Flow.mle(train, kind="spline_coupling", layers=2 if smoke else 4, hidden=16 if smoke else 64,
                max_iters=300 if smoke else 4000, learning_rate=1e-2 if smoke else 5e-3)
print(f"spline flow: {flow.info['num_steps']} steps, converged={flow.info['converged']}")
standard = (train - train.mean(0)) / train.std(0)
cnf = ContinuousFlow.mle(standard, hidden=(32, 32), max_iters=60 if smoke else 1500,
                         batch_size=256, learning_rate=1e-2)
print(f"continuous flow: {cnf.info['num_steps']} steps")

# 2. exact held-out log p ------------------------------------------------------------
gauss = st.multivariate_normal(train.mean(0).numpy(), np.cov(train.numpy().T))
with torch.no_grad():
    lp_flow = float(flow.log_prob(y=test)) / len(test)
test_std = (test - train.mean(0)) / train.std(0)
lp_cnf = float(cnf.log_prob(y=test_std[:200]).detach()) / 200 - float(torch.log(train.std(0)).sum())
print(f"held-out log p per point: spline flow {lp_flow:.3f}, continuous flow {lp_cnf:.3f}, "
      f"Gaussian {gauss.logpdf(test.numpy()).mean():.3f}")

# 3. an estimated marginal: p(x0) at three points, with error bars ---------------------
marginal = flow.marginalize(dims=[1])
for x0 in (-1.0, 0.0, 1.5):
    est = marginal.log_prob(torch.tensor([x0]), method="ais",
                            num_particles=64 if smoke else 256, num_temps=30 if smoke else 200)
    kde = st.gaussian_kde(train[:, 0].numpy()).logpdf([x0])[0]
    print(f"log p(x0={x0:+.1f}) = {est.value:.3f} +/- {est.stderr:.3f}   (KDE of the data: {kde:.3f})")

# 4. a conditional: x1 given x0 = 0.5 by NUTS ------------------------------------------
cond = flow.condition(dims={0: 0.5})
post = cond.fit("nuts", chains=2, warmup=100 if smoke else 500, draws=100 if smoke else 1000, seed=0)
x1 = post.draws["y_rest"].reshape(-1).numpy()
print(f"x1 | x0 = 0.5: mean {x1.mean():.3f}, 5-95% [{np.quantile(x1, 0.05):.3f}, "
      f"{np.quantile(x1, 0.95):.3f}]")

# figure -------------------------------------------------------------------------------
grid = torch.linspace(-1.8, 2.8, 120), torch.linspace(-1.2, 1.7, 90)
xx, yy = torch.meshgrid(*grid, indexing="ij")
pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)
with torch.no_grad():
    dens = flow.log_prob(y=pts, pointwise=True).exp().reshape(xx.shape)
samples = flow.sample(1000, seed=1)["y"].detach()
fig, ax = plt.subplots(1, 2, figsize=(10, 4))
ax[0].contourf(xx.numpy(), yy.numpy(), dens.numpy(), levels=30)
ax[0].set_title("spline flow density")
ax[1].scatter(*test.numpy().T, s=2, alpha=0.4, label="held-out data")
ax[1].scatter(*samples.numpy().T, s=2, alpha=0.4, label="flow samples")
ax[1].legend(markerscale=5)
fig.savefig("flows_two_moons.png", dpi=100)
print("done")

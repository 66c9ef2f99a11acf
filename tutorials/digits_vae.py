"""A variational autoencoder on handwritten digits: samples, inpainting, and log p with
error bars.

Run: ``python tutorials/digits_vae.py`` (set ``CI=1`` for a quick run with small settings).
Writes ``digits_vae_samples.png`` and ``digits_vae_inpainting.png`` into the working
directory.

A VAE's ``log p(y)`` has no closed form: genprog reports it as an estimate with a standard
error, by importance sampling with the encoder as proposal (IWAE) and by annealed
importance sampling from the prior to the posterior (AIS) — two independent routes that
should agree. We compare with the simplest baseline, independent pixels.
"""

import math
import os
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from genprog.errors import ConvergenceWarning
from genprog.models.made import binarized_digits
from genprog.models.vae import VAE, independent_bernoulli_log_prob

smoke = "CI" in os.environ
steps, n_test = (300, 60) if smoke else (6000, 397)
latent_dim, hidden = (4, (32,)) if smoke else (8, (128,))

# 1. Data: scikit-learn's 8x8 digits (bundled), binarized; a held-out split.
x, _ = binarized_digits()
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
train, test = x[perm[:1400]], x[perm[1400:1400 + n_test]]
print(f"train {tuple(train.shape)}, test {tuple(test.shape)}")

# 2. Train by the ELBO (SVI, the encoder is the guide).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)  # CI runs stop early on purpose
    vae = VAE.mle(train, latent_dim=latent_dim, hidden=hidden, likelihood="bernoulli",
                  max_iters=steps, seed=0)
trace = vae.info["loss_trace"]
print(f"trained {vae.info['num_steps']} steps (converged: {vae.info['converged']}); "
      f"-ELBO per image {sum(trace[:20]) / 20:.1f} -> {sum(trace[-20:]) / 20:.1f}")

# 3. Samples: pixel probabilities E[y | z] for z from the prior.
z = torch.randn(16, latent_dim, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    probs = vae.decoder_mean(z)
fig, axes = plt.subplots(2, 8, figsize=(8, 2.2))
for ax, img in zip(axes.flat, probs):
    ax.imshow(img.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
    ax.axis("off")
fig.suptitle("VAE samples (pixel probabilities)")
fig.savefig("digits_vae_samples.png", dpi=80)
plt.close(fig)

# 4. Inpainting: hide the bottom half, complete it from p(y_bottom | y_top).
hidden_half = test.clone()
hidden_half[:, 32:] = float("nan")
filled = vae.impute(hidden_half, num_samples=1000)
draws = vae.inpaint(hidden_half[:6], n=3, num_samples=1000)
mse_vae = float(((filled[:, 32:] - test[:, 32:]) ** 2).mean())
mse_mean = float(((train.mean(0)[32:] - test[:, 32:]) ** 2).mean())
print(f"bottom-half squared error: VAE posterior mean {mse_vae:.4f}, pixel means {mse_mean:.4f}")
fig, axes = plt.subplots(6, 5, figsize=(5, 6.2))
for i in range(6):
    row = [test[i], torch.nan_to_num(hidden_half[i], nan=0.5), filled[i], *draws[:2, i]]
    for ax, img in zip(axes[i], row):
        ax.imshow(img.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
        ax.axis("off")
for ax, title in zip(axes[0], ["truth", "observed", "mean", "draw", "draw"]):
    ax.set_title(title, fontsize=8)
fig.savefig("digits_vae_inpainting.png", dpi=80)
plt.close(fig)

# 5. Held-out log p with error bars: IWAE and AIS, against independent pixels.
base = float(independent_bernoulli_log_prob(train, test).sum())
iwae = vae._log_prob_estimate(test, method="iwae", num_samples=200 if smoke else 2000)
ais = vae._log_prob_estimate(test, method="ais", num_particles=16 if smoke else 64,
                             num_temps=60 if smoke else 500, seed=1)
n = len(test)
print(f"held-out log p per image (nats): independent pixels {base / n:.2f}")
print(f"  VAE, IWAE: {iwae.value / n:.2f} +/- {iwae.stderr / n:.3f}   (ELBO {iwae.details['elbo'] / n:.2f})")
print(f"  VAE, AIS:  {ais.value / n:.2f} +/- {ais.stderr / n:.3f}")
gap = abs(iwae.value - ais.value) / math.hypot(iwae.stderr, ais.stderr)
print(f"  IWAE vs AIS: {gap:.1f} standard errors apart")
assert iwae.value > base and ais.value > base
assert mse_vae < mse_mean
print("done")

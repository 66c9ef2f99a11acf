"""Forecasting a seasonal series with gaps: a linear-Gaussian state-space model
(local level + trigonometric seasonal) fit by maximum likelihood on the exact Kalman
likelihood, smoothed over the missing stretches and forecast with 95% intervals, whose
coverage is checked on held-out points; an AR(p) forecast for comparison.

Run: ``python tutorials/forecasting.py`` (``CI=1``: a shorter series).
"""

import math
import os

import numpy as np
import torch

from genprog.models.autoregressive import AR
from genprog.models.state_space import LinearGaussianSSM

smoke = "CI" in os.environ
torch.manual_seed(0)
D = torch.float64
PERIOD = 12
T = 144 if smoke else 360          # observed part
H = 24                              # held-out horizon

# ---------------------------------------------------------------- the model and the data
# state x = (level, s1, s2): a random-walk level and a seasonal rotating with period 12
w = 2 * math.pi / PERIOD
A = torch.tensor([[1.0, 0.0, 0.0],
                  [0.0, math.cos(w), math.sin(w)],
                  [0.0, -math.sin(w), math.cos(w)]], dtype=D)
C = torch.tensor([[1.0, 1.0, 0.0]], dtype=D)
truth = LinearGaussianSSM(A=A, C=C, Q=torch.diag(torch.tensor([0.05, 0.01, 0.01], dtype=D)),
                          R=torch.tensor([[0.25]], dtype=D),
                          m0=torch.tensor([10.0, 2.0, 0.0], dtype=D), P0=torch.eye(3, dtype=D),
                          length=T + H)
y_all = truth.sample(1, seed=1)["y"][0]                       # [T + H, 1]
y, future = y_all[:T].clone(), y_all[T:]
gaps = [(40, 60), (100, 110)]
for a, b in gaps:
    y[a:b] = float("nan")
print(f"series: {T} steps, {int(torch.isnan(y).sum())} missing in {gaps}; {H} held out")

# ---------------------------------------------------------------- fit by maximum likelihood
# A and C fix the structure; the noise covariances Q, R are estimated
m0 = torch.tensor([y[0, 0], 0.0, 0.0], dtype=D)
fit = LinearGaussianSSM.mle(y, state_dim=3, fixed={"A": A, "C": C, "m0": m0, "P0": 10 * torch.eye(3, dtype=D)})
print(f"MLE: log-likelihood {fit.info.log_likelihood:.2f} after {fit.info.num_iters} "
      f"L-BFGS iterations; R = {float(fit.kwargs['R']):.3f} (true 0.25), "
      f"diag Q = {torch.diagonal(fit.kwargs['Q']).numpy().round(3)} (true [0.05 0.01 0.01])")

# ---------------------------------------------------------------- smooth over the gaps
post = fit.posterior(y)                                         # states | all observed data
signal_mean = (post.mean @ C.T)[:, 0]
signal_sd = torch.sqrt(torch.einsum("ph,thk,pk->t", C, post.cov, C))
inside, total = 0, 0
for a, b in gaps:
    sd = torch.sqrt(signal_sd[a:b] ** 2 + fit.kwargs["R"][0, 0])  # predictive sd of y
    inside += int(((y_all[a:b, 0] - signal_mean[a:b]).abs() < 1.96 * sd).sum())
    total += b - a
print(f"smoothed gaps: 95% intervals cover {inside}/{total} hidden observations")

# ---------------------------------------------------------------- forecast the held-out points
fc = fit.forecast(y, steps=H)
lo, hi = fc.interval()
cover = ((future >= lo) & (future <= hi)).to(D).mean()
rmse = torch.sqrt(((fc.mean - future) ** 2).mean())
print(f"state-space forecast: RMSE {float(rmse):.3f}, 95% interval coverage {float(cover):.2f}")

# ---------------------------------------------------------------- AR(p) on the last complete stretch
# (AR.mle needs complete sequences and a stationary least-squares fit: long orders that
# try to copy the seasonal cycle on top of the random-walk level are not)
tail = y[gaps[-1][1]:, 0]
P = 3
ar = AR.mle(tail, order=P)
afc = ar.forecast(tail, steps=H)
alo, ahi = afc.interval()
acover = ((future[:, 0] >= alo) & (future[:, 0] <= ahi)).to(D).mean()
armse = torch.sqrt(((afc.mean - future[:, 0]) ** 2).mean())
print(f"AR({P}) forecast:   RMSE {float(armse):.3f}, 95% interval coverage {float(acover):.2f}")
print(np.array2string(torch.stack([future[:6, 0], fc.mean[:6, 0], afc.mean[:6]]).numpy(), precision=2))
print("done")

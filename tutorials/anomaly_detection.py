"""Anomaly detection with a Gaussian mixture: fit by EM, flag rows of low log density.

Run: ``python tutorials/anomaly_detection.py`` (set ``CI=1`` for a quick run with small settings).

Normal operation produces data from a few clusters; anomalies are rows the fitted model
finds improbable. We fit :class:`genprog.models.mixture.GaussianMixture` by EM (choosing
the number of components by BIC), set a threshold at a low quantile of the training
log densities, and score it on a test set with injected outliers. Sensors sometimes drop
out: the mixture's exact ``log p`` integrates missing (NaN) entries out, so incomplete
rows are scored without imputing them first.
"""

import os

import torch

from genprog.models.mixture import GaussianMixture

smoke = "CI" in os.environ
n_train, n_test, n_outliers = (1000, 400, 20) if smoke else (5000, 2000, 100)
torch.manual_seed(0)
f64 = torch.float64

# 1. "Normal operation": three clusters in 4 dimensions, drawn from a known mixture.
truth = GaussianMixture(
    weights=torch.tensor([0.5, 0.3, 0.2], dtype=f64),
    means=torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 0.0, -2.0], [-4.0, 3.0, 4.0, 1.0]],
                       dtype=f64),
    covariances=torch.stack([torch.eye(4, dtype=f64),
                             torch.eye(4, dtype=f64) * 0.5 + 0.4,
                             torch.diag(torch.tensor([2.0, 0.5, 0.5, 1.0], dtype=f64))]),
)
train = truth.sample(n_train, seed=1)["y"]
normal_test = truth.sample(n_test, seed=2)["y"]

# 2. Outliers: uniform in a wide box, kept only where the true density is low.
box = (torch.rand(20 * n_outliers, 4, dtype=f64) - 0.5) * 24
outliers = box[truth.log_prob(y=box, pointwise=True) < -25][:n_outliers]
test = torch.cat([normal_test, outliers])
is_outlier = torch.cat([torch.zeros(len(normal_test), dtype=torch.bool),
                        torch.ones(len(outliers), dtype=torch.bool)])

# 3. Fit by EM for K = 1..5 and keep the K with the lowest BIC.
def bic(model, data):
    k, d = model.kwargs["k"], model.kwargs["dim"]
    n_params = (k - 1) + k * d + k * d * (d + 1) // 2
    return -2 * float(model.log_prob(y=data)) + n_params * torch.log(torch.tensor(len(data))).item()

fits = {k: GaussianMixture.mle(train, k=k, seed=0) for k in range(1, 6)}
scores = {k: bic(m, train) for k, m in fits.items()}
for k, s in scores.items():
    print(f"K={k}: BIC {s:10.1f}  (EM iterations {fits[k].info.num_iters})")
best_k = min(scores, key=scores.get)
gm = fits[best_k]
print(f"chosen K = {best_k}; weights {gm.kwargs['weights'].numpy().round(3)}")

# 4. Threshold at the 1% quantile of the training log densities.
threshold = torch.quantile(gm.log_prob(y=train, pointwise=True), 0.01)
flagged = gm.log_prob(y=test, pointwise=True) < threshold
tp = int((flagged & is_outlier).sum())
precision = tp / max(int(flagged.sum()), 1)
recall = tp / int(is_outlier.sum())
print(f"threshold log p = {float(threshold):.2f}; flagged {int(flagged.sum())} of {len(test)} rows")
print(f"precision {precision:.3f}, recall {recall:.3f}")
assert recall > 0.9 and precision > 0.5

# 5. Missing sensors: drop a quarter of the entries; log p integrates them out exactly.
holes = test.clone()
holes[torch.rand(holes.shape) < 0.25] = float("nan")
flagged_holes = gm.log_prob(y=holes, pointwise=True) < threshold
print(f"with 25% of the entries missing: recall {float(flagged_holes[is_outlier].float().mean()):.3f}, "
      f"false alarms {int(flagged_holes[~is_outlier].sum())} of {int((~is_outlier).sum())}")

# 6. Which cluster does each flagged normal row resemble most? posterior = responsibilities.
resp = gm.posterior(test[flagged & ~is_outlier])
print("responsibilities of the first false alarms:\n", resp[:3].numpy().round(3))
print("done")

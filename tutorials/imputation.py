"""Imputing missing entries by conditioning a Gaussian model.

Run: ``python tutorials/imputation.py`` (set ``CI=1`` for a quick run with small settings).

For a Gaussian model the best guess of a missing entry given the observed ones (in mean
squared error) is its conditional mean ``E[y_missing | y_observed]`` — an exact operation
of :class:`genprog.models.gaussian.Gaussian` and :class:`~genprog.models.gaussian.PPCA`:
``condition(dims={i: value})`` gives the whole conditional distribution for one pattern,
``impute(Y)`` fills every NaN of a data set at once. We compare with filling in column means.
"""

import os

import torch

from genprog.models.gaussian import PPCA, Gaussian

smoke = "CI" in os.environ
n_train, n_test = (500, 300) if smoke else (5000, 3000)
torch.manual_seed(0)
f64 = torch.float64

# 1. Data with low-rank structure: 10 correlated measurements driven by 3 factors.
d, k = 10, 3
truth = PPCA(W=torch.randn(d, k, dtype=f64), mu=torch.linspace(-2, 2, d, dtype=f64), sigma=0.3)
train = truth.sample(n_train, seed=1)["y"]
test = truth.sample(n_test, seed=2)["y"]
missing = torch.rand(test.shape) < 0.3
missing[0] = True                                # one row with nothing observed
observed = test.masked_fill(missing, float("nan"))
print(f"{int(missing.sum())} of {missing.numel()} test entries missing")

# 2. Fit two models on the complete training rows: PPCA (closed-form ML) and a full Gaussian.
ppca = PPCA.mle(train, k=k)
gauss = Gaussian.mle(train)
print(f"PPCA sigma {float(ppca.kwargs['sigma']):.3f} (true 0.3)")

# 3. The exact log-likelihood of the incomplete test rows (missing entries integrated out).
for name, m in [("PPCA", ppca), ("Gaussian", gauss)]:
    print(f"{name:8s} log p(observed test entries) = {float(m.log_prob(y=observed)):.1f}")

# 4. Conditioning one row by hand: the distribution of its missing coordinates.
row = observed[1]
obs_dims = {i: float(row[i]) for i in range(d) if not torch.isnan(row[i])}
cond = ppca.condition(dims=obs_dims)             # a PPCA over the missing coordinates
print(f"row 1: missing dims {[i for i in range(d) if i not in obs_dims]}, conditional mean "
      f"{cond.loc.numpy().round(2)}, sd {cond.covariance_matrix.diagonal().sqrt().numpy().round(2)}")
assert torch.allclose(cond.loc, ppca.impute(row)[torch.isnan(row)])

# 5. Impute everything and compare RMSE on the missing entries.
def rmse(filled):
    return float(((filled - test)[missing] ** 2).mean().sqrt())

mean_fill = torch.where(missing, train.mean(0).expand_as(test), test)
results = {"column means": rmse(mean_fill), "Gaussian": rmse(gauss.impute(observed)),
           "PPCA": rmse(ppca.impute(observed)), "true parameters": rmse(truth.impute(observed))}
for name, value in results.items():
    print(f"RMSE {name:16s} {value:.3f}")
assert results["PPCA"] < 0.7 * results["column means"]
print("done")

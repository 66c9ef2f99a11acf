"""Any Pyro model, as written: a corpus of models in the idioms Pyro users write.

Each case is a model that does *not* need to broadcast over extra leading dims
(``X @ w``, ``torch.cat``, ``torch.stack``, ``x[:, 0]``, ``w.reshape``, ``L @ L.T``,
``torch.linalg.cholesky`` of a latent kernel, Python loops over ``t``, enumerated
discrete sites indexed as ``mu[z]``, a torchdiffeq ODE, a Python ``if`` on a latent),
with the batching path genprog must take for it (``"plate"``, ``"vmap"`` or ``"loop"``,
:mod:`genprog.vectorize`) and its oracle:

* ``log_joint``: an independent NumPy/SciPy log density of the latents and data (the
  discrete sites summed out by brute-force enumeration);
* ``evidence``: ``log p(data)`` in closed form (linear-Gaussian models: conjugate
  Gaussian evidence, for which the Laplace approximation is exact) or by brute-force
  quadrature over a grid (one or two continuous latents);
* ``twin``: the same model written to broadcast, whose plate path must agree with the
  vmapped path to 1e-6 (float64); models that broadcast themselves are compared with
  their own forced vmap path.

Every case goes through sample / log_prob / log_marginal / fit("nuts", chains=4) /
to_arviz with small settings; long NUTS runs against closed-form posteriors are
``slow``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.ops.indexing import Vindex
from scipy import integrate, stats
from scipy.special import logsumexp

import genprog as gp
from genprog.errors import ConvergenceWarning, EstimatorWarning, VectorizationWarning
from genprog.infer.compiled import CompiledPotential
from genprog.infer.init import finite_prior_draws
from genprog.vectorize import Batching

F64 = torch.float64
RNG = np.random.default_rng(2026)


def t64(x):
    return torch.as_tensor(np.asarray(x), dtype=F64)


@pytest.fixture(autouse=True)
def float64_default():
    """The corpus runs in float64 (1e-6 agreement); densities are also used directly,
    outside ``Model.context()``, so torch's default dtype is float64 throughout."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(old)


# =========================================================================== oracles
def gaussian_linear(A, prior_mean, prior_cov, noise_sd, y):
    """Conjugate linear-Gaussian model ``y = A theta + N(0, noise_sd^2)``,
    ``theta ~ N(prior_mean, prior_cov)``: (log evidence, posterior mean, posterior cov)."""
    A, y = np.asarray(A, float), np.asarray(y, float)
    m0, S0 = np.asarray(prior_mean, float), np.asarray(prior_cov, float)
    C = A @ S0 @ A.T + noise_sd ** 2 * np.eye(len(y))
    log_ev = stats.multivariate_normal(A @ m0, C).logpdf(y)
    P = np.linalg.inv(S0) + A.T @ A / noise_sd ** 2
    cov = np.linalg.inv(P)
    mean = cov @ (np.linalg.solve(S0, m0) + A.T @ y / noise_sd ** 2)
    return float(log_ev), mean, cov


def grid_log_evidence(log_joint_grid, axes):
    """``log ∫ exp(log_joint)`` by the trapezoidal rule on a grid (brute-force quadrature)."""
    lj = np.asarray(log_joint_grid, float)
    shift = lj[np.isfinite(lj)].max()
    val = np.exp(lj - shift)
    for ax in reversed(axes):
        val = integrate.trapezoid(val, ax, axis=-1)
    return float(np.log(val) + shift)


def norm_lp(x, loc, scale):
    return stats.norm(loc, scale).logpdf(x)


# =========================================================================== data
X_BLR = RNG.normal(size=(12, 3))
Y_BLR = X_BLR @ np.array([1.0, -0.5, 0.3]) + 0.7 * RNG.normal(size=12)
Y_BLR_MISSING = Y_BLR.copy()
Y_BLR_MISSING[[2, 7]] = np.nan

X_LOG = RNG.normal(size=(15, 2))
Y_LOG = (RNG.uniform(size=15) < 1 / (1 + np.exp(-(X_LOG @ np.array([1.5, -1.0]))))).astype(float)

G_HIER = np.array([0, 0, 1, 1, 2, 2, 2])
Y_HIER = np.array([0.1, -0.3, 1.2, 0.9, -0.8, -1.1, -0.5])

X_GP = np.linspace(0.0, 3.0, 8)
Y_GP = np.sin(2 * X_GP) + 0.2 * RNG.normal(size=8)

Y_AR = np.zeros(25)
Y_AR[:2] = RNG.normal(size=2)
for _t in range(2, 25):
    Y_AR[_t] = 0.6 * Y_AR[_t - 1] - 0.3 * Y_AR[_t - 2] + 0.5 * RNG.normal()

Y_SV = 0.5 * RNG.normal(size=8) * np.exp(np.linspace(-0.5, 0.5, 8))

Y_CP = np.array([2, 3, 1, 4, 2, 3, 7, 8, 6, 9, 7, 8], dtype=float)

Y_MIX = np.concatenate([RNG.normal(-2.0, 1.0, 4), RNG.normal(2.0, 1.0, 6)])

X_SLICE = RNG.normal(size=(10, 2))
Y_SLICE = X_SLICE[:, 0] * 0.8 - 0.4 * X_SLICE[:, 1] + 0.5 * RNG.normal(size=10)

X_RESHAPE = RNG.normal(size=(9, 2))
Y_RESHAPE = X_RESHAPE @ np.array([[1.0, -1.0], [0.5, 0.2]]) + 0.5 * RNG.normal(size=(9, 2))

Y_LLT = RNG.multivariate_normal([0, 0], [[1.0, 0.6], [0.6, 1.5]], size=10)

T_LV = np.linspace(0.0, 4.0, 5)
Y_LV = np.array([[10.0, 5.0], [6.5, 9.0], [3.2, 8.1], [2.6, 5.6], [3.0, 3.5]])

SIGMA_8 = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
Y_8 = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])

G_STACK = np.array([0, 0, 0, 1, 1, 1, 1])
Y_STACK = np.array([0.3, -0.2, 0.5, 1.4, 0.8, 1.1, 1.9])

Y_BRANCH = np.array([0.4, 1.1, -0.2, 0.8, 0.5])


# =========================================================================== models
def blr(X, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.5).expand([X.shape[1]]).to_event(1))
    with pyro.plate("n", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, 0.7), obs=y)


def blr_twin(X, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.5).expand([X.shape[1]]).to_event(1))
    with pyro.plate("n", X.shape[0]):
        pyro.sample("y", dist.Normal((X * w).sum(-1), 0.7), obs=y)


def blr_lj(v, y=Y_BLR):
    w = v["w"]
    return norm_lp(w, 0, 1.5).sum() + norm_lp(y, X_BLR @ w, 0.7).sum()


def logistic(X, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    with pyro.plate("n", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)


def logistic_twin(X, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    with pyro.plate("n", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=(X * w).sum(-1)), obs=y)


def logistic_lj(v):
    w = v["w"]
    eta = X_LOG @ w
    return norm_lp(w, 0, 1).sum() + (Y_LOG * eta - np.logaddexp(0, eta)).sum()


def logistic_evidence():
    a = np.linspace(-6, 6, 241)
    W = np.stack(np.meshgrid(a, a, indexing="ij"), -1)
    eta = W @ X_LOG.T
    lj = norm_lp(W, 0, 1).sum(-1) + (Y_LOG * eta - np.logaddexp(0, eta)).sum(-1)
    return grid_log_evidence(lj, [a, a])


def hier_cat(g, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    d = pyro.sample("d", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    effects = torch.cat([mu.unsqueeze(0), mu + d])          # one effect per group
    with pyro.plate("n", len(g)):
        pyro.sample("y", dist.Normal(effects[g], 0.5), obs=y)


HIER_B = np.array([[1.0, 0, 0], [1, 1, 0], [1, 0, 1]])


def hier_lj(v):
    theta = np.concatenate([[v["mu"]], v["d"]])
    return norm_lp(theta, 0, 1).sum() + norm_lp(Y_HIER, (HIER_B @ theta)[G_HIER], 0.5).sum()


def gp_regression(x, y=None):
    ls = pyro.sample("ls", dist.LogNormal(0.0, 0.5))
    K = torch.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / ls ** 2) + 0.05 * torch.eye(len(x))
    L = torch.linalg.cholesky(K)
    pyro.sample("y", dist.MultivariateNormal(torch.zeros(len(x)), scale_tril=L), obs=y)


def gp_lj_at(ls, y=Y_GP):
    K = np.exp(-0.5 * (X_GP[:, None] - X_GP[None, :]) ** 2 / ls ** 2) + 0.05 * np.eye(len(X_GP))
    return stats.lognorm(0.5).logpdf(ls) + stats.multivariate_normal(np.zeros(len(X_GP)), K).logpdf(y)


def gp_evidence():
    u = np.linspace(-3.5, 3.5, 701)  # log lengthscale; p(ls) dls = p(u) du
    lj = np.array([gp_lj_at(np.exp(ui)) + ui for ui in u])
    return grid_log_evidence(lj, [u])


def ar2(y):
    a = pyro.sample("a", dist.Normal(0.0, 0.5).expand([2]).to_event(1))
    for t in range(2, len(y)):
        pyro.sample(f"y_{t}", dist.Normal(a[0] * y[t - 1] + a[1] * y[t - 2], 0.5), obs=y[t])


AR_A = np.stack([Y_AR[1:-1], Y_AR[:-2]], -1)


def ar2_lj(v):
    return norm_lp(v["a"], 0, 0.5).sum() + norm_lp(Y_AR[2:], AR_A @ v["a"], 0.5).sum()


def stochvol(T, y=None):
    phi = pyro.sample("phi", dist.Beta(5.0, 2.0))
    h = pyro.sample("h_0", dist.Normal(0.0, 1.0))
    hs = [h]
    for t in range(1, T):
        h = pyro.sample(f"h_{t}", dist.Normal(phi * h, 0.3))
        hs.append(h)
    with pyro.plate("time", T):
        pyro.sample("y", dist.Normal(0.0, torch.exp(torch.stack(hs) / 2)), obs=y)


def stochvol_lj(v):
    h = np.array([v[f"h_{t}"] for t in range(len(Y_SV))])
    lp = stats.beta(5, 2).logpdf(v["phi"]) + norm_lp(h[0], 0, 1)
    lp += norm_lp(h[1:], v["phi"] * h[:-1], 0.3).sum()
    return lp + norm_lp(Y_SV, 0, np.exp(h / 2)).sum()


def changepoint(T, y=None):
    e = pyro.sample("e", dist.Gamma(2.0, 0.4).expand([2]).to_event(1))
    tau = pyro.sample("tau", dist.Categorical(torch.ones(T) / T))
    rate = torch.where(torch.arange(T) < tau, e[0], e[1])
    with pyro.plate("time", T):
        pyro.sample("y", dist.Poisson(rate), obs=y)


def cp_loglik(e, y=Y_CP):
    T = len(y)
    terms = [stats.poisson(np.where(np.arange(T) < tau, e[0], e[1])).logpmf(y).sum() - np.log(T)
             for tau in range(T)]
    return logsumexp(terms)


def cp_lj(v):
    return stats.gamma(2, scale=1 / 0.4).logpdf(v["e"]).sum() + cp_loglik(v["e"])


def cp_evidence():
    a = np.linspace(0.02, 25, 600)
    T = len(Y_CP)
    lpmf = stats.poisson(a[:, None]).logpmf(Y_CP[None, :])             # [rate, t]
    before = np.stack([lpmf[:, :tau].sum(-1) for tau in range(T)])       # [tau, e1]
    after = np.stack([lpmf[:, tau:].sum(-1) for tau in range(T)])        # [tau, e2]
    loglik = logsumexp(before[:, :, None] + after[:, None, :], axis=0) - np.log(T)
    prior = stats.gamma(2, scale=2.5).logpdf(a)
    return grid_log_evidence(prior[:, None] + prior[None, :] + loglik, [a, a])


MIX_W = np.array([0.4, 0.6])


def mixture(n, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
    with pyro.plate("n", n):
        z = pyro.sample("z", dist.Categorical(torch.tensor(MIX_W)))
        pyro.sample("y", dist.Normal(mu[z], 1.0), obs=y)


def mixture_twin(n, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
    with pyro.plate("n", n):
        z = pyro.sample("z", dist.Categorical(torch.tensor(MIX_W)))
        pyro.sample("y", dist.Normal(Vindex(mu)[..., z], 1.0), obs=y)


def mix_loglik(mu, y=Y_MIX):
    return logsumexp(np.log(MIX_W) + norm_lp(y[:, None], np.asarray(mu)[None, :], 1.0), axis=-1).sum()


def mix_lj(v):
    return norm_lp(v["mu"], 0, 3).sum() + mix_loglik(v["mu"])


def mix_evidence():
    a = np.linspace(-8, 8, 321)
    comp = norm_lp(Y_MIX[:, None], a[None, :], 1.0)                     # [n, grid]
    loglik = np.logaddexp(np.log(MIX_W[0]) + comp[:, :, None],
                          np.log(MIX_W[1]) + comp[:, None, :]).sum(0)    # [mu0, mu1]
    prior = norm_lp(a, 0, 3)
    return grid_log_evidence(prior[:, None] + prior[None, :] + loglik, [a, a])


def slicing(X, y=None):
    B = pyro.sample("B", dist.Normal(0.0, 1.0).expand([2, 2]).to_event(2))
    coef = B[:, 0]
    with pyro.plate("n", X.shape[0]):
        pyro.sample("y", dist.Normal(X[:, 0] * coef[0] + X[:, 1] * coef[1], 0.5), obs=y)


def slicing_lj(v):
    B = v["B"]
    return norm_lp(B, 0, 1).sum() + norm_lp(Y_SLICE, X_SLICE @ B[:, 0], 0.5).sum()


def reshape(X, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([4]).to_event(1))
    W = w.reshape(2, 2)
    with pyro.plate("n", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ W, 0.5).to_event(1), obs=y)


def reshape_lj(v):
    W = v["w"].reshape(2, 2)
    return norm_lp(v["w"], 0, 1).sum() + norm_lp(Y_RESHAPE, X_RESHAPE @ W, 0.5).sum()


def reshape_evidence():
    # W[:, j] = (w[j], w[2 + j]): independent columns, each a BLR with a N(0, I) prior
    return sum(gaussian_linear(X_RESHAPE, np.zeros(2), np.eye(2), 0.5, Y_RESHAPE[:, j])[0] for j in range(2))


def llt(n, y=None):
    a = pyro.sample("a", dist.Normal(0.0, 0.5))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    c = pyro.sample("c", dist.Normal(0.0, 0.5))
    zero = torch.zeros(())
    L = torch.stack([torch.stack([a.exp(), zero]), torch.stack([b, c.exp()])])
    cov = L @ L.T + 0.1 * torch.eye(2)
    with pyro.plate("n", n):
        pyro.sample("y", dist.MultivariateNormal(torch.zeros(2), covariance_matrix=cov), obs=y)


def llt_lj(v):
    L = np.array([[np.exp(v["a"]), 0.0], [v["b"], np.exp(v["c"])]])
    cov = L @ L.T + 0.1 * np.eye(2)
    lp = norm_lp(v["a"], 0, 0.5) + norm_lp(v["b"], 0, 1) + norm_lp(v["c"], 0, 0.5)
    return lp + stats.multivariate_normal(np.zeros(2), cov).logpdf(Y_LLT).sum()


LV_PRIOR_LOC = np.log([1.0, 0.1, 1.0, 0.1])


def lotka_volterra(t, y=None):
    from torchdiffeq import odeint

    theta = pyro.sample("theta", dist.LogNormal(torch.tensor(LV_PRIOR_LOC), 0.2).to_event(1))
    alpha, beta, gamma, delta = theta

    def rhs(_, z):
        u, v = z[0], z[1]
        return torch.stack([alpha * u - beta * u * v, delta * u * v - gamma * v])

    sol = odeint(rhs, torch.tensor([10.0, 5.0]), t, method="rk4", options={"step_size": 0.05})
    with pyro.plate("time", len(t)):
        pyro.sample("y", dist.LogNormal(sol.clamp(min=1e-6).log(), 0.1).to_event(1), obs=y)


def lv_lj(v):
    from scipy.integrate import solve_ivp

    a, b, g, d = v["theta"]
    sol = solve_ivp(lambda _, z: [a * z[0] - b * z[0] * z[1], d * z[0] * z[1] - g * z[1]],
                    (0, T_LV[-1]), [10.0, 5.0], t_eval=T_LV, rtol=1e-11, atol=1e-11).y.T
    lp = stats.lognorm(0.2, scale=np.exp(LV_PRIOR_LOC)).logpdf(v["theta"]).sum()
    return lp + stats.lognorm(0.1, scale=sol).logpdf(Y_LV).sum()


def eight_schools(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def eight_lj(v):
    lp = norm_lp(v["mu"], 0, 5) + stats.halfcauchy(scale=5).logpdf(v["tau"])
    return lp + norm_lp(v["theta"], v["mu"], v["tau"]).sum() + norm_lp(Y_8, v["theta"], SIGMA_8).sum()


def stacked(g, y=None):
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.Normal(1.0, 1.0))
    mu = torch.stack([a, b])
    with pyro.plate("n", len(g)):
        pyro.sample("y", dist.Normal(mu[g], 0.8), obs=y)


def stacked_lj(v):
    mu = np.array([v["a"], v["b"]])
    return norm_lp(v["a"], 0, 1) + norm_lp(v["b"], 1, 1) + norm_lp(Y_STACK, mu[G_STACK], 0.8).sum()


def branch(n, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    scale = 0.5 if w > 0 else 1.5            # a Python branch on a latent value
    with pyro.plate("n", n):
        pyro.sample("y", dist.Normal(w, scale), obs=y)


def branch_lj_at(w):
    return norm_lp(w, 0, 1) + norm_lp(Y_BRANCH, w, 0.5 if w > 0 else 1.5).sum()


def branch_evidence():
    u = np.linspace(-8, 8, 16001)
    scale = np.where(u > 0, 0.5, 1.5)
    lj = norm_lp(u, 0, 1) + norm_lp(Y_BRANCH[:, None], u[None, :], scale[None, :]).sum(0)
    return grid_log_evidence(lj, [u])


def blr_missing_lj(v):
    keep = ~np.isnan(Y_BLR_MISSING)
    y = Y_BLR_MISSING.copy()
    y[~keep] = v["y_missing"]
    return blr_lj(v, y)


# =========================================================================== the table
@dataclass(frozen=True)
class Case:
    """A model as users write it, its data and its oracles."""

    name: str
    idiom: str
    fn: object
    inputs: tuple
    data: dict
    path: str                         # expected batching: "plate" | "vmap" | "loop"
    log_joint: object                 # dict of numpy latent values -> float
    evidence: object = None           # () -> float
    evidence_method: str = "is"       # "laplace" where it is exact (linear Gaussian)
    twin: object = None               # a broadcasting version, checked on the plate path
    posterior: object = None          # () -> (mean, cov) of the flat latent, closed form
    tol: float = 1e-6
    options: dict = field(default_factory=dict)  # extra NUTS options for the smoke fit
    pointwise: bool = True            # per-observation log-likelihood defined (no global discrete)
    fit_method: str = "nuts"          # smoke fit in the default run ("laplace" for slow models)

    def model(self, fn=None):
        m = gp.Model(fn or self.fn, *self.inputs).to(dtype=F64)
        return m.condition(**self.data) if self.data else m


def _blr_posterior():
    _, mean, cov = gaussian_linear(X_BLR, np.zeros(3), 1.5 ** 2 * np.eye(3), 0.7, Y_BLR)
    return mean, cov


CASES = [
    Case("blr", "X @ w", blr, (t64(X_BLR),), {"y": t64(Y_BLR)}, "vmap", blr_lj,
         evidence=lambda: gaussian_linear(X_BLR, np.zeros(3), 2.25 * np.eye(3), 0.7, Y_BLR)[0],
         evidence_method="laplace", twin=blr_twin, posterior=_blr_posterior),
    Case("logistic", "X @ w, Bernoulli logits", logistic, (t64(X_LOG),), {"y": t64(Y_LOG)}, "vmap",
         logistic_lj, evidence=logistic_evidence, twin=logistic_twin),
    Case("hier_cat", "torch.cat of group effects", hier_cat, (torch.as_tensor(G_HIER),),
         {"y": t64(Y_HIER)}, "vmap", hier_lj,
         evidence=lambda: gaussian_linear(np.eye(3)[G_HIER] @ HIER_B, np.zeros(3), np.eye(3), 0.5, Y_HIER)[0],
         evidence_method="laplace"),
    Case("gp", "cholesky of a latent kernel", gp_regression, (t64(X_GP),), {"y": t64(Y_GP)}, "vmap",
         lambda v: gp_lj_at(v["ls"]), evidence=gp_evidence),
    Case("ar2", "Python loop over t, y[t - 1]", ar2, (t64(Y_AR),), {}, "vmap", ar2_lj,
         evidence=lambda: gaussian_linear(AR_A, np.zeros(2), 0.25 * np.eye(2), 0.5, Y_AR[2:])[0],
         evidence_method="laplace"),
    Case("stochvol", "loop over t, torch.stack(hs)", stochvol, (len(Y_SV),), {"y": t64(Y_SV)}, "vmap",
         stochvol_lj),
    Case("changepoint", "enumerated tau, e[0]", changepoint, (len(Y_CP),), {"y": t64(Y_CP)}, "vmap",
         cp_lj, evidence=cp_evidence, pointwise=False),
    Case("mixture", "enumerated z, mu[z]", mixture, (len(Y_MIX),), {"y": t64(Y_MIX)}, "vmap", mix_lj,
         evidence=mix_evidence, twin=mixture_twin),
    Case("slicing", "B[:, 0], X[:, 0]", slicing, (t64(X_SLICE),), {"y": t64(Y_SLICE)}, "vmap", slicing_lj,
         evidence=lambda: gaussian_linear(X_SLICE, np.zeros(2), np.eye(2), 0.5, Y_SLICE)[0],
         evidence_method="laplace"),
    Case("reshape", "w.reshape(2, 2)", reshape, (t64(X_RESHAPE),), {"y": t64(Y_RESHAPE)}, "vmap",
         reshape_lj, evidence=reshape_evidence, evidence_method="laplace"),
    Case("llt", "L @ L.T, torch.stack", llt, (len(Y_LLT),), {"y": t64(Y_LLT)}, "vmap", llt_lj),
    Case("lotka_volterra", "torchdiffeq odeint, theta unpacking", lotka_volterra, (t64(T_LV),),
         {"y": t64(Y_LV)}, "vmap", lv_lj, tol=1e-5, fit_method="laplace"),
    Case("eight_schools", "centred, broadcasts", eight_schools, (t64(SIGMA_8),), {"y": t64(Y_8)},
         "plate", eight_lj, options={"max_tree_depth": 5}),
    Case("stack", "torch.stack([a, b])[g]", stacked, (torch.as_tensor(G_STACK),), {"y": t64(Y_STACK)},
         "vmap", stacked_lj,
         evidence=lambda: gaussian_linear(np.eye(2)[G_STACK], [0.0, 1.0], np.eye(2), 0.8, Y_STACK)[0],
         evidence_method="laplace"),
    Case("branch", "Python if on a latent", branch, (len(Y_BRANCH),), {"y": t64(Y_BRANCH)}, "loop",
         lambda v: branch_lj_at(v["w"]), evidence=branch_evidence),
    Case("blr_missing", "X @ w, NaN = missing", blr, (t64(X_BLR),), {"y": t64(Y_BLR_MISSING)}, "vmap",
         blr_missing_lj,
         evidence=lambda: gaussian_linear(X_BLR[~np.isnan(Y_BLR_MISSING)], np.zeros(3), 2.25 * np.eye(3), 0.7,
                                          Y_BLR_MISSING[~np.isnan(Y_BLR_MISSING)])[0],
         evidence_method="laplace"),
]
IDS = [c.name for c in CASES]
BY_NAME = {c.name: c for c in CASES}


def loop_ok(case):
    """A context that expects the one VectorizationWarning of a loop-path case."""
    if case.path == "loop":
        return pytest.warns(VectorizationWarning, match="once per draw")
    return warnings.catch_warnings()


def latent_draws(case, n, seed=0):
    """Prior draws of the conditioned model's continuous latents ``{site: [n, ...]}``."""
    m = case.model()
    density = m.density()
    with loop_ok(case):
        z = density.sample_prior(n, torch.Generator().manual_seed(seed))
    values, _ = density.constrain(z)
    return values


def numpy_row(values, i):
    return {k: v[i].detach().numpy() for k, v in values.items()}


# =========================================================================== the corpus
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_path_taken(case):
    m = case.model()
    with loop_ok(case):
        decision = m.density().batching_decision
    assert decision.mode == case.path, decision
    assert (decision.reason is None) == (case.path == "plate")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sample(case):
    m = gp.Model(case.fn, *case.inputs).to(dtype=F64)
    with loop_ok(case):
        a = m.sample(5, seed=1)
    b = m.sample(5, seed=1)
    for name, info in m.base_structure.sites.items():
        assert a[name].shape == (5, *info.shape), name
        assert torch.equal(a[name], b[name]), name
        if a[name].is_floating_point():
            assert torch.isfinite(a[name]).all(), name
    first = next(iter(a.values()))
    assert not torch.equal(first[0], first[1])  # draws differ


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_log_prob_matches_oracle(case):
    values = latent_draws(case, 3)
    m = case.model()
    with loop_ok(case):
        got = m.density().log_joint(m.density().unconstrain(values), jacobian=False)
    ref = np.array([case.log_joint(numpy_row(values, i)) for i in range(3)])
    np.testing.assert_allclose(got.detach().numpy(), ref, rtol=case.tol, atol=case.tol)
    if "y_missing" not in values:  # Model.log_prob of N assignments at once
        with loop_ok(case):
            lp = m.log_prob(**values)
        np.testing.assert_allclose(lp.detach().numpy(), ref, rtol=case.tol, atol=case.tol)


@pytest.mark.parametrize("case", [c for c in CASES if c.twin is not None or c.path == "plate"],
                         ids=[c.name for c in CASES if c.twin is not None or c.path == "plate"])
def test_vmap_agrees_with_plate(case):
    """The vmapped one-draw program and the plate-batched program: same potential,
    gradient and pointwise log-likelihood to 1e-6 (float64)."""
    vm = case.model().density()
    if case.twin is None:  # the model broadcasts: force its vmap path
        vm.structure.batching["density"] = Batching("vmap", "forced by the test")
    plate = case.model(case.twin).density() if case.twin else case.model().density()
    assert vm.batching == "vmap" and plate.batching == "plate"
    z = 0.7 * torch.randn(6, vm.dim, generator=torch.Generator().manual_seed(3), dtype=F64)
    U1, g1 = vm.potential_and_grad(z)
    U2, g2 = plate.potential_and_grad(z)
    torch.testing.assert_close(U1, U2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-6)
    values, _ = vm.constrain(z)
    p1 = vm.pointwise_log_likelihood(values, 6)
    p2 = plate.pointwise_log_likelihood(values, 6)
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", [c for c in CASES if c.evidence is not None],
                         ids=[c.name for c in CASES if c.evidence is not None])
def test_log_marginal_matches_oracle(case):
    truth = case.evidence()
    m = case.model()
    with loop_ok(case), warnings.catch_warnings():
        warnings.simplefilter("ignore", EstimatorWarning)
        if case.evidence_method == "laplace":  # exact for a Gaussian posterior
            est = m.log_marginal("laplace")
            assert est.value == pytest.approx(truth, abs=1e-5)
        else:
            est = m.log_marginal("is", num_samples=1000 if case.path == "loop" else 4000, seed=0)
            assert abs(est.value - truth) < 4 * est.stderr + 0.02, (est, truth)
    assert est.details["batching"] == case.path


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fit_to_arviz_predict(case):
    """A smoke-size fit ("nuts" with 4 chains; "laplace" for the ODE, whose NUTS run is
    slow) through draws, ArviZ and posterior predictions."""
    m = case.model()
    with loop_ok(case), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # smoke-size chains
        if case.fit_method == "nuts":
            fit = m.fit("nuts", chains=4, warmup=30, draws=25, seed=0, **case.options)
        else:
            fit = m.fit(case.fit_method, draws=25, seed=0)
        ppc = fit.predict(n=6)
        idata = fit.to_arviz(log_likelihood=case.pointwise)
    assert fit.info["batching"] == case.path
    if case.fit_method == "nuts" and case.path == "vmap" and not m.density().has_enumeration:
        assert fit.info["potential"]["mode"] == "fx"  # the vmapped forward+backward is recorded
    chains = 4 if case.fit_method == "nuts" else 1
    for name in m.density().structure.sites:
        info = m.structure.sites[name]
        if info.kind == "latent" and not info.discrete:
            assert fit.draws[name].shape == (chains, 25, *info.shape)
            assert torch.isfinite(fit.draws[name]).all()
            assert idata.posterior[name].shape[:2] == (chains, 25)
    assert ("log_likelihood" in idata.groups()) == case.pointwise
    for site in m.structure.observed:
        assert ppc[site.name].shape == (6, *site.shape)


# =========================================================================== every operation on one model
def blr_model():
    return BY_NAME["blr"].model()


def test_blr_map_laplace_vi_hmc_chees_against_closed_form():
    mean, cov = _blr_posterior()
    m = blr_model()
    fmap = m.fit("map")
    assert fmap.info["batching"] == "vmap"
    np.testing.assert_allclose(fmap.draws["w"][0, 0].numpy(), mean, atol=1e-5)  # Gaussian: mode = mean
    lap = m.fit("laplace", draws=10)
    np.testing.assert_allclose(lap.info["covariance"].numpy(), cov, rtol=1e-4, atol=1e-6)
    vi = m.fit("vi", guide="full_rank", draws=4000, max_steps=3000, learning_rate=0.05)
    assert vi.info["batching"] == "vmap"
    np.testing.assert_allclose(vi.draws["w"][0].mean(0).numpy(), mean, atol=0.08)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for method in ("hmc", "chees"):
            f = m.fit(method, chains=4, warmup=40, draws=30, seed=1)
            assert f.info["batching"] == "vmap" and torch.isfinite(f.draws["w"]).all()


def test_blr_log_marginal_is_and_ais_calibrated():
    truth = BY_NAME["blr"].evidence()
    m = blr_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EstimatorWarning)
        est = m.log_marginal("ais", num_particles=64, num_temps=40, num_runs=4, seed=0)
    assert est.details["batching"] == "vmap"
    assert abs(est.value - truth) < 4 * est.stderr + 0.05, (est, truth)


def test_pointwise_log_prob_on_vmap_path():
    m = blr_model()
    w = torch.tensor([0.5, -0.2, 0.1], dtype=F64)
    lp = m.log_prob(w=w, pointwise=True)
    np.testing.assert_allclose(lp.numpy(), norm_lp(Y_BLR, X_BLR @ w.numpy(), 0.7), rtol=1e-10)
    ws = torch.randn(4, 3, dtype=F64)
    lp4 = m.log_prob(w=ws, pointwise=True)
    assert lp4.shape == (4, 12)
    np.testing.assert_allclose(lp4[2].numpy(), norm_lp(Y_BLR, X_BLR @ ws[2].numpy(), 0.7), rtol=1e-10)


def test_missing_values_fit_and_pointwise_drop_missing():
    m = BY_NAME["blr_missing"].model()
    fit = m.fit("laplace", draws=200)
    assert fit.info["batching"] == "vmap"
    assert fit.draws["y_missing"].shape == (1, 200, 2)
    idata = fit.to_arviz()
    assert idata.log_likelihood["y"].shape[-1] == 10  # the two missing entries dropped


def test_marginalize_and_discrete_posterior_on_vmap_path():
    case = BY_NAME["changepoint"]
    mm = gp.Model(case.fn, *case.inputs).to(dtype=F64).marginalize("tau")
    assert set(mm.sample(4, seed=0)) == {"e", "y"}
    e = torch.tensor([3.0, 7.5], dtype=F64)
    lp = mm.condition(y=t64(Y_CP)).log_prob(e=e)
    assert float(lp) == pytest.approx(cp_lj({"e": e.numpy()}), rel=1e-9)
    fit = case.model().fit("laplace", draws=50)
    # Pyro's infer_discrete reads value.data (refused under vmap): draw by draw, with a warning
    with pytest.warns(VectorizationWarning, match="forward run"):
        post = fit.discrete_posterior(seed=0)
    assert post["tau"].shape == (1, 50) and post["tau"].min() >= 0 and post["tau"].max() < len(Y_CP)
    # the data change at t = 6: the conditional puts the change point there most often
    assert torch.mode(post["tau"].flatten()).values.item() == 6


def test_loop_path_warns_once_per_model_and_is_exact():
    case = BY_NAME["branch"]
    m = case.model()
    d = m.density()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        U, _ = d.potential_and_grad(torch.tensor([[0.3], [-0.4]], dtype=F64))
        d.potential_and_grad(torch.tensor([[0.1], [0.2], [0.5]], dtype=F64))
    loops = [r for r in record if issubclass(r.category, VectorizationWarning)]
    assert len(loops) == 1
    assert "ms per draw" in str(loops[0].message)
    np.testing.assert_allclose(-U.numpy(), [branch_lj_at(0.3), branch_lj_at(-0.4)], rtol=1e-10)


def test_compiled_potential_records_the_vmapped_program():
    density = blr_model().density()
    pg = CompiledPotential(density)
    z = torch.randn(5, 3, dtype=F64)
    U, g = pg(z)
    U0, g0 = density.potential_and_grad(z)
    assert pg.records[5].mode == "fx"
    torch.testing.assert_close(U, U0)
    torch.testing.assert_close(g, g0)


def test_sampling_distributions_without_vmap_samplers():
    """HalfCauchy, StudentT, Beta, Dirichlet, MultivariateNormal, Exponential draws under
    vmap (torch fills unbatched tensors in place): right shapes and moments."""

    def model(X):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
        pyro.sample("hc", dist.HalfCauchy(2.0))
        pyro.sample("st", dist.StudentT(5.0, 1.0, 2.0))
        pyro.sample("be", dist.Beta(2.0, 5.0))
        pyro.sample("di", dist.Dirichlet(torch.tensor([1.0, 2.0, 3.0])))
        pyro.sample("mv", dist.MultivariateNormal(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.5, 2.0]])))
        pyro.sample("ex", dist.Exponential(3.0))
        pyro.sample("y", dist.Normal(X @ w, 1.0))

    m = gp.Model(model, t64(X_BLR)).to(dtype=F64)
    s = m.sample(20000, seed=0)
    assert m.base_structure.batching[next(iter(m.base_structure.batching))].mode == "vmap"
    assert float(s["hc"].median()) == pytest.approx(2.0, rel=0.05)
    assert float(s["st"].mean()) == pytest.approx(1.0, abs=0.05)
    assert float(s["be"].mean()) == pytest.approx(2 / 7, abs=0.01)
    np.testing.assert_allclose(s["di"].mean(0).numpy(), [1 / 6, 2 / 6, 3 / 6], atol=0.01)
    np.testing.assert_allclose(np.cov(s["mv"].numpy().T), [[1.0, 0.5], [0.5, 2.0]], atol=0.08)
    assert float(s["ex"].mean()) == pytest.approx(1 / 3, rel=0.03)


def test_median_init_drops_draws_where_the_model_is_not_finite():
    """A prior draw that makes the model's likelihood invalid (a NaN scale that Pyro's
    validation rejects) is dropped and counted, not fatal."""

    def model(y=None):
        k = pyro.sample("k", dist.Normal(0.0, 1.0))
        scale = torch.where(k < -1.0, torch.full_like(k, float("nan")), k.exp())
        pyro.sample("y", dist.Normal(0.0, scale), obs=y)

    m = gp.Model(model).to(dtype=F64).condition(y=torch.tensor(2.0, dtype=F64))
    density = m.density()
    z, dropped = finite_prior_draws(density, torch.Generator().manual_seed(0), 101)
    assert dropped > 0 and z.shape[0] == 101 - dropped
    assert (density.constrain(z)[0]["k"] >= -1.0).all()
    fit = m.fit("map")
    assert fit.draws["k"][0, 0] >= -1.0


# =========================================================================== slow: NUTS vs closed form
@pytest.mark.slow
def test_lotka_volterra_nuts():
    case = BY_NAME["lotka_volterra"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = case.model().fit("nuts", chains=4, warmup=100, draws=100, seed=0)
    assert fit.info["batching"] == "vmap"
    assert torch.isfinite(fit.draws["theta"]).all()
    assert "log_likelihood" in fit.to_arviz().groups()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["blr", "hier_cat", "ar2", "slicing", "stack"])
def test_nuts_posterior_matches_closed_form(name):
    case = BY_NAME[name]
    m = case.model()
    fit = m.fit("nuts", chains=4, warmup=500, draws=500, seed=0)
    sites = m.density().sites
    flat = torch.cat([fit.draws[s.name].reshape(4, 500, -1) for s in sites], -1).reshape(2000, -1)
    if name == "blr":
        mean, _ = _blr_posterior()
    elif name == "hier_cat":
        mean = gaussian_linear(np.eye(3)[G_HIER] @ HIER_B, np.zeros(3), np.eye(3), 0.5, Y_HIER)[1]
    elif name == "ar2":
        mean = gaussian_linear(AR_A, np.zeros(2), 0.25 * np.eye(2), 0.5, Y_AR[2:])[1]
    elif name == "slicing":
        mean = np.concatenate([gaussian_linear(X_SLICE, np.zeros(2), np.eye(2), 0.5, Y_SLICE)[1], [0.0, 0.0]])
        flat = flat[:, [0, 2, 1, 3]]  # B[:, 0] then B[:, 1]
    else:
        mean = gaussian_linear(np.eye(2)[G_STACK], [0.0, 1.0], np.eye(2), 0.8, Y_STACK)[1]
    sd = flat.std(0).numpy()
    np.testing.assert_array_less(np.abs(flat.mean(0).numpy() - mean), 5 * sd / math.sqrt(400))

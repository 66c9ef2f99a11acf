"""ProbabilisticCircuit against brute-force enumeration (discrete circuits), explicit SciPy
formulas (Gaussian leaves) and scikit-learn's GaussianMixture EM (diagonal mixture circuits)."""

import itertools
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from genprog.model import Model
from genprog.models.circuit import (
    BernoulliLeaf,
    CategoricalLeaf,
    GaussianLeaf,
    ProbabilisticCircuit,
    Product,
    Sum,
)

F64 = torch.float64
NAN = float("nan")


def _discrete_circuit():
    """A DAG over (b0, b1, c2 in {0,1,2}, b3) with a shared sub-circuit."""
    shared = Product([CategoricalLeaf(2, [0.2, 0.3, 0.5]), BernoulliLeaf(3, 0.6)])
    inner = Sum([Product([BernoulliLeaf(1, 0.2), shared]),
                 Product([BernoulliLeaf(1, 0.7), CategoricalLeaf(2, [0.6, 0.3, 0.1]),
                          BernoulliLeaf(3, 0.1)])], weights=[0.4, 0.6])
    root = Sum([Product([BernoulliLeaf(0, 0.9), inner]),
                Product([BernoulliLeaf(0, 0.1), BernoulliLeaf(1, 0.5), shared]),
                Product([BernoulliLeaf(0, 0.5), Sum([Product([BernoulliLeaf(1, 0.3), shared]),
                                                      inner], weights=[0.5, 0.5])])],
               weights=[0.3, 0.5, 0.2])
    return ProbabilisticCircuit(root=root).to(dtype=F64)


GRID = np.array(list(itertools.product([0, 1], [0, 1], [0, 1, 2], [0, 1])), dtype=float)


def _joint_table(pc):
    """The brute-force joint over every assignment, ``[24]``."""
    return pc.log_prob(y=torch.as_tensor(GRID, dtype=F64), pointwise=True).exp().numpy()


def _explicit_joint():
    """The same circuit's joint written out by hand (independent of the bottom-up pass)."""
    b = stats.bernoulli.pmf

    def shared(c, x3):
        return [0.2, 0.3, 0.5][c] * b(x3, 0.6)

    def inner(x1, c, x3):
        return 0.4 * b(x1, 0.2) * shared(c, x3) + 0.6 * b(x1, 0.7) * [0.6, 0.3, 0.1][c] * b(x3, 0.1)

    out = []
    for x0, x1, c, x3 in GRID.astype(int):
        out.append(0.3 * b(x0, 0.9) * inner(x1, c, x3)
                   + 0.5 * b(x0, 0.1) * b(x1, 0.5) * shared(c, x3)
                   + 0.2 * b(x0, 0.5) * (0.5 * b(x1, 0.3) * shared(c, x3) + 0.5 * inner(x1, c, x3)))
    return np.array(out)


@pytest.mark.reference("ProbabilisticCircuit", "log_prob",
                       "brute-force enumeration: hand-written joint, sums to 1, every marginal")
@pytest.mark.reference("ProbabilisticCircuit", "log_marginal", "brute-force enumeration")
def test_discrete_joint_and_every_marginal_by_enumeration():
    pc = _discrete_circuit()
    table = _joint_table(pc)
    np.testing.assert_allclose(table, _explicit_joint(), rtol=1e-12)
    assert table.sum() == pytest.approx(1.0, abs=1e-12)
    # every non-empty subset of variables kept, the rest NaN: one bottom-up pass, all rows
    for r in range(1, 5):
        for keep in itertools.combinations(range(4), r):
            keep = list(keep)
            rows = np.unique(GRID[:, keep], axis=0)
            y = np.full((len(rows), 4), np.nan)
            y[:, keep] = rows
            got = pc.log_prob(y=torch.as_tensor(y, dtype=F64), pointwise=True).exp().numpy()
            ref = [table[(GRID[:, keep] == row).all(1)].sum() for row in rows]
            np.testing.assert_allclose(got, ref, rtol=1e-12)
    data = torch.as_tensor(GRID[[0, 5, 9, 17, 23]], dtype=F64)
    lm = pc.condition(y=data).log_marginal()
    assert lm.method == "exact" and lm.value == pytest.approx(np.log(table[[0, 5, 9, 17, 23]]).sum(),
                                                              rel=1e-12)


@pytest.mark.reference("ProbabilisticCircuit", "marginalize",
                       "brute-force enumeration: explicit sums over the dropped variables")
def test_marginal_circuits_by_enumeration():
    pc = _discrete_circuit()
    table = _joint_table(pc)
    for drop in ([0], [1, 3], [0, 2, 3], [2]):
        keep = [v for v in range(4) if v not in drop]
        mc = pc.marginalize(dims=drop)
        assert mc.event_shape == (len(keep),) and mc.dtype == F64
        rows = np.unique(GRID[:, keep], axis=0)
        got = mc.log_prob(y=torch.as_tensor(rows, dtype=F64), pointwise=True).exp().numpy()
        ref = [table[(GRID[:, keep] == row).all(1)].sum() for row in rows]
        np.testing.assert_allclose(got, ref, rtol=1e-12)
        assert got.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.reference("ProbabilisticCircuit", "condition",
                       "brute-force enumeration: joint / evidence over every completion")
def test_conditional_circuits_by_enumeration():
    pc = _discrete_circuit()
    table = _joint_table(pc)
    for obs in ({0: 1.0}, {2: 2.0, 3: 0.0}, {1: 0.0, 2: 1.0, 0: 0.0}):
        rest = [v for v in range(4) if v not in obs]
        match = np.all([GRID[:, v] == val for v, val in obs.items()], axis=0)
        cond = pc.condition(dims=obs)
        rows = GRID[match][:, rest]
        got = cond.log_prob(y=torch.as_tensor(rows, dtype=F64), pointwise=True).exp().numpy()
        np.testing.assert_allclose(got, table[match] / table[match].sum(), rtol=1e-11)
        full = torch.as_tensor(GRID[match], dtype=F64)
        np.testing.assert_allclose(pc.conditional_log_prob(full, given=list(obs)).exp().numpy(),
                                   got, rtol=1e-11)


def _gaussian_circuit():
    """Sum of two products over (g0, g1, b2): a mixture of products of Gaussians (x Bernoulli)."""
    comps = [(0.3, (-1.0, 0.5), (2.0, 1.5), 0.2), (0.7, (1.5, 1.2), (-0.5, 0.7), 0.8)]
    root = Sum([Product([GaussianLeaf(0, *g0), GaussianLeaf(1, *g1), BernoulliLeaf(2, p)])
                for _, g0, g1, p in comps], weights=[w for w, *_ in comps])
    return ProbabilisticCircuit(root=root).to(dtype=F64), comps


def _gauss_ref(x, comps, dims):
    """log density over ``dims`` of the mixture, explicitly with SciPy."""
    terms = []
    for w, g0, g1, p in comps:
        t = np.log(w)
        if 0 in dims:
            t = t + stats.norm(*g0).logpdf(x[:, 0])
        if 1 in dims:
            t = t + stats.norm(*g1).logpdf(x[:, 1])
        if 2 in dims:
            t = t + stats.bernoulli(p).logpmf(x[:, 2])
        terms.append(t)
    return logsumexp(np.stack(terms), axis=0)


@pytest.mark.reference("ProbabilisticCircuit", "log_prob",
                       "SciPy explicit mixture of products of norm/bernoulli (with NaN marginals)")
@pytest.mark.reference("ProbabilisticCircuit", "marginalize", "SciPy explicit mixture formula")
@pytest.mark.reference("ProbabilisticCircuit", "condition",
                       "SciPy: log p(x) - log p(x_obs) of the explicit mixture")
def test_gaussian_leaves_vs_scipy():
    pc, comps = _gaussian_circuit()
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.normal(size=40), rng.normal(size=40), rng.integers(0, 2, 40)])
    np.testing.assert_allclose(pc.log_prob(y=torch.as_tensor(x), pointwise=True).numpy(),
                               _gauss_ref(x, comps, {0, 1, 2}), rtol=1e-12)
    holes = x.copy()
    holes[:20, 0] = np.nan
    holes[10:30, 2] = np.nan
    got = pc.log_prob(y=torch.as_tensor(holes), pointwise=True).numpy()
    for rows, dims in [(slice(0, 10), {1, 2}), (slice(10, 20), {1}), (slice(20, 30), {0, 1}),
                       (slice(30, 40), {0, 1, 2})]:
        np.testing.assert_allclose(got[rows], _gauss_ref(x[rows], comps, dims), rtol=1e-12)
    mg = pc.marginalize(dims=[1])
    np.testing.assert_allclose(mg.log_prob(y=torch.as_tensor(x[:, [0, 2]]), pointwise=True).numpy(),
                               _gauss_ref(x, comps, {0, 2}), rtol=1e-12)
    cond = pc.condition(dims={0: 0.3})
    xc = x.copy()
    xc[:, 0] = 0.3
    ref = _gauss_ref(xc, comps, {0, 1, 2}) - _gauss_ref(xc[:1], comps, {0})
    np.testing.assert_allclose(cond.log_prob(y=torch.as_tensor(x[:, 1:]), pointwise=True).numpy(),
                               ref, rtol=1e-11)


def test_sampling_matches_the_distribution():
    pc = _discrete_circuit()
    table = _joint_table(pc)
    n = 30000
    y = pc.sample(n, seed=0)["y"].numpy()
    idx = (y[:, 0] * 12 + y[:, 1] * 6 + y[:, 2] * 2 + y[:, 3]).astype(int)
    freq = np.bincount(idx, minlength=24) / n
    chi2 = n * ((freq - table) ** 2 / table).sum()
    assert chi2 < stats.chi2(23).ppf(0.999)
    g, comps = _gaussian_circuit()
    ys = g.sample(n, seed=1)["y"].numpy()
    w = np.array([c[0] for c in comps])
    m0 = np.array([c[1][0] for c in comps])
    s0 = np.array([c[1][1] for c in comps])
    mean0, var0 = w @ m0, w @ (s0 ** 2 + m0 ** 2) - (w @ m0) ** 2
    assert abs(ys[:, 0].mean() - mean0) < 4 * np.sqrt(var0 / n)
    assert abs(ys[:, 0].var() - var0) < 0.05 * var0
    p2 = w @ np.array([c[3] for c in comps])
    assert abs(ys[:, 2].mean() - p2) < 4 * np.sqrt(p2 * (1 - p2) / n)


@pytest.mark.reference("ProbabilisticCircuit", "mle",
                       "sklearn GaussianMixture(covariance_type='diag', reg_covar=0) EM from the "
                       "same initial values")
def test_em_matches_sklearn_diagonal_gmm():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal([-2, 1], [0.7, 1.2], (150, 2)),
                        rng.normal([2, -1], [1.0, 0.5], (250, 2))])
    init_w = np.array([0.5, 0.5])
    init_mu = np.array([[-1.0, 0.0], [1.0, 0.0]])
    init_var = np.ones((2, 2))
    root = Sum([Product([GaussianLeaf(0, init_mu[k, 0], 1.0), GaussianLeaf(1, init_mu[k, 1], 1.0)])
                for k in range(2)], weights=init_w)
    iters = 15
    fit = ProbabilisticCircuit.mle(torch.as_tensor(x), root=root, iters=iters, tol=0.0,
                                   min_scale=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk = GaussianMixture(2, covariance_type="diag", reg_covar=0.0, max_iter=iters, tol=0.0,
                             weights_init=init_w, means_init=init_mu,
                             precisions_init=1 / init_var).fit(x)
    kids = fit.root.children
    np.testing.assert_allclose(fit.root.weights.numpy(), sk.weights_, rtol=1e-9)
    got_mu = np.array([[float(c.children[j].loc) for j in range(2)] for c in kids])
    got_var = np.array([[float(c.children[j].scale) ** 2 for j in range(2)] for c in kids])
    np.testing.assert_allclose(got_mu, sk.means_, rtol=1e-9)
    np.testing.assert_allclose(got_var, sk.covariances_, rtol=1e-9)
    assert len(fit.em_trace) == iters
    # the root was not modified in place
    assert float(root.children[0].children[0].loc) == -1.0


def test_em_with_missing_values_and_discrete_leaves_increases_likelihood():
    pc = _discrete_circuit()
    data = pc.sample(400, seed=2)["y"]
    data[::3, 1] = NAN
    data[1::4, 2] = NAN
    start = _discrete_circuit().root
    fit = ProbabilisticCircuit.mle(data, root=start, iters=20, tol=0.0)
    tr = np.array(fit.em_trace)
    assert np.all(np.diff(tr) > -1e-10)
    final = float(fit.log_prob(y=data, pointwise=True).mean())
    assert final >= tr[-1] - 1e-10
    assert fit.log_prob(y=torch.as_tensor(GRID, dtype=F64), pointwise=True).exp().sum() == \
        pytest.approx(1.0, abs=1e-10)


def test_bad_structures_and_inputs():
    with pytest.raises(ValueError, match="same scope"):
        Sum([BernoulliLeaf(0, 0.5), BernoulliLeaf(1, 0.5)], weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="decomposable"):
        Product([BernoulliLeaf(0, 0.5), GaussianLeaf(0, 0.0, 1.0)])
    with pytest.raises(ValueError, match="sum to 1"):
        Sum([BernoulliLeaf(0, 0.5), BernoulliLeaf(0, 0.2)], weights=[0.5, 0.6])
    with pytest.raises(ValueError, match="scale must be positive"):
        GaussianLeaf(0, 0.0, -1.0)
    with pytest.raises(ValueError, match="root's scope"):
        ProbabilisticCircuit(root=Product([BernoulliLeaf(0, 0.5), BernoulliLeaf(2, 0.5)]))
    with pytest.raises(TypeError, match="root must be a circuit node"):
        ProbabilisticCircuit(root=[1, 2])
    pc = _discrete_circuit()
    with pytest.raises(ValueError, match="values must be 0 or 1"):
        pc.log_prob(y=torch.tensor([2.0, 0.0, 0.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match=r"integers in \[0, 3\)"):
        pc.log_prob(y=torch.tensor([1.0, 0.0, 3.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        pc.log_prob(y=torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="exact only with every parameter"):
        ProbabilisticCircuit(root=Sum([BernoulliLeaf(0, 0.5), BernoulliLeaf(0, 0.2)])).log_prob(
            y=torch.tensor([1.0]))


def test_pyro_story_agrees_with_the_bottom_up_pass():
    """Pyro's enumeration of the sum-node choices in the story gives the same log p."""
    for pc in (_discrete_circuit(), _gaussian_circuit()[0]):
        for row in pc.sample(3, seed=0)["y"]:
            assert float(Model.log_prob(pc, y=row)) == pytest.approx(float(pc.log_prob(y=row)),
                                                                     rel=1e-10)

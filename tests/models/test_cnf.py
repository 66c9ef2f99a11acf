"""Continuous normalizing flows: log p through the ODE against the closed form of a
linear field (a Gaussian), against a tighter solve, normalisation by quadrature, and
Hutchinson's estimator unbiased for the exact trace."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.stats as st
import torch

from genprog.errors import ConvergenceWarning
from genprog.models.cnf import ContinuousFlow, LinearField, VectorField, cnf_log_prob

D64 = torch.float64
A = [[0.3, -0.8], [0.5, -0.2]]


def _linear_flow(**tol):
    field = LinearField(torch.tensor(A, dtype=D64))
    return ContinuousFlow(field=field, dim=2, **tol).to(dtype=D64)


@pytest.mark.reference("ContinuousFlow", "log_prob", "closed form of a linear field: y = expm(A) z0 is N(0, M M^T) (scipy multivariate_normal)")
@pytest.mark.reference("ContinuousFlow", "log_marginal", "closed form of a linear field (sum over rows)")
def test_linear_field_is_a_gaussian():
    flow = _linear_flow(rtol=1e-9, atol=1e-11)
    m = scipy.linalg.expm(np.array(A))
    ref = st.multivariate_normal(np.zeros(2), m @ m.T)
    y = torch.tensor([[0.0, 0.0], [1.0, -0.5], [-2.0, 1.5], [0.3, 2.2]], dtype=D64)
    np.testing.assert_allclose(flow.log_prob(y=y, pointwise=True).detach().numpy(),
                               ref.logpdf(y.numpy()), atol=1e-6)
    est = flow.condition(y=y).log_marginal()
    assert est.method == "exact"
    assert abs(est.value - ref.logpdf(y.numpy()).sum()) < 1e-5
    draws = flow.sample(4000, seed=0)["y"].numpy()
    np.testing.assert_allclose(np.cov(draws.T), m @ m.T, atol=0.15)


def _nonlinear(dim=2, seed=0):
    torch.manual_seed(seed)
    field = VectorField(dim, hidden=(16, 16)).to(D64)
    return field


def test_default_tolerance_agrees_with_a_tighter_solve():
    field = _nonlinear()
    y = torch.randn(8, 2, dtype=D64)
    loose = ContinuousFlow(field=field, dim=2).to(dtype=D64).log_prob(y=y, pointwise=True)
    tight = cnf_log_prob(field, y, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(loose.detach().numpy(), tight.detach().numpy(), atol=1e-4)


def test_one_dimensional_flow_integrates_to_one():
    field = _nonlinear(dim=1, seed=3)
    grid = torch.linspace(-10, 10, 801, dtype=D64).reshape(-1, 1)
    p = cnf_log_prob(field, grid).exp().detach()
    total = float(torch.trapezoid(p, grid[:, 0]))
    assert abs(total - 1.0) < 1e-3


def test_hutchinson_trace_is_unbiased():
    field = _nonlinear(seed=1)
    y = torch.tensor([[0.5, -1.0]], dtype=D64).expand(4000, 2).contiguous()
    exact = float(cnf_log_prob(field, y[:1], method="rk4", options={"step_size": 0.125})[0].detach())
    g = torch.Generator().manual_seed(0)
    eps = torch.randint(0, 2, y.shape, generator=g).to(D64) * 2 - 1
    est = cnf_log_prob(field, y, method="rk4", eps=eps, options={"step_size": 0.125}).detach()
    se = float(est.std()) / np.sqrt(len(est))
    assert abs(float(est.mean()) - exact) < 4 * se + 1e-9


def test_training_lowers_the_loss():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(500, 2, generator=g) * torch.tensor([1.0, 0.3]) + torch.tensor([0.5, 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        flow = ContinuousFlow.mle(y, hidden=(16,), max_iters=120, batch_size=128, window=40,
                                  learning_rate=1e-2)
    trace = flow.info["loss_trace"]
    assert np.mean(trace[-40:]) < np.mean(trace[:40]) - 0.1


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="nn.Module"):
        ContinuousFlow(field=lambda t, z: z, dim=2)
    with pytest.raises(ValueError, match="dim"):
        ContinuousFlow(field=_nonlinear(), dim=0)
    with pytest.raises(ValueError, match="finite"):
        ContinuousFlow.mle(torch.tensor([[float("nan"), 0.0]]))

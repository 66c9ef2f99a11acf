"""Tests for ``genprog.pk.structural``: closed-form compartment models.

References are independent of the closed forms under test:

* ``scipy.integrate.solve_ivp`` (DOP853, rtol 1e-10, atol 1e-12) of the compartment ODE
  system in float64, with bolus doses as impulses and infusions as piecewise-constant
  inputs; the closed forms must agree to ``RTOL = 1e-6`` relative at every time, from
  1e-3 h to 1000 h;
* the disposition eigenvalues from ``numpy.linalg.eigvals`` of the rate matrix;
* the flip-flop limit ``ka == k`` from its analytic limit and from 50-digit ``mpmath``;
* steady state from 200 explicit doses superposed (non-steady-state code path);
* ``torch.autograd.gradcheck`` (float64 finite differences) for gradients.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from genprog.pk import structural
from genprog.pk.dataset import Dataset
from genprog.pk.structural import (
    Compartments,
    OneCompartment,
    ThreeCompartment,
    TwoCompartment,
    concentration,
    disposition,
    one_compartment_bolus,
    one_compartment_infusion,
    one_compartment_oral,
    three_compartment_bolus,
    three_compartment_infusion,
    three_compartment_oral,
    two_compartment_bolus,
    two_compartment_infusion,
    two_compartment_oral,
)

DT = torch.float64
RTOL = 1e-6          # closed form vs ODE / vs superposition, relative
ATOL = 1e-13         # absolute floor (concentration units) for values that are exactly 0
TIMES = [0.0, 1e-3, 0.01, 0.1, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 24.0, 48.0,
         100.0, 250.0, 500.0, 1000.0]

# Slow terminal phases, so that concentrations at 1000 h stay far above the ODE's atol.
SLOW = {
    1: {"cl": 0.2, "v": 20.0},
    2: {"cl": 0.5, "v1": 10.0, "q": 2.0, "v2": 40.0},
    3: {"cl": 0.5, "v1": 10.0, "q": 2.0, "v2": 40.0, "q3": 0.3, "v3": 60.0},
}
# Faster terminal phases (lambda_min >= 0.01/h), so that 200 doses every 12 h reach
# steady state to 1e-10.
FAST = {
    1: {"cl": 2.0, "v": 20.0},
    2: {"cl": 2.0, "v1": 10.0, "q": 2.0, "v2": 20.0},
    3: {"cl": 2.0, "v1": 10.0, "q": 2.0, "v2": 20.0, "q3": 1.0, "v3": 40.0},
}
STRUCT = {1: OneCompartment, 2: TwoCompartment, 3: ThreeCompartment}


# --------------------------------------------------------------------------- references


def rate_matrix(n, p):
    """ODE matrix for the state [depot, central, periph2, periph3] (amounts), and V1."""
    v1 = p["v"] if n == 1 else p["v1"]
    k10 = p["cl"] / v1
    k12 = k21 = k13 = k31 = 0.0
    if n >= 2:
        k12, k21 = p["q"] / v1, p["q"] / p["v2"]
    if n == 3:
        k13, k31 = p["q3"] / v1, p["q3"] / p["v3"]
    ka = p.get("ka", 0.0)
    m = np.array([
        [-ka, 0.0, 0.0, 0.0],
        [ka, -(k10 + k12 + k13), k21, k31],
        [0.0, k12, -k21, 0.0],
        [0.0, k13, 0.0, -k31],
    ])
    return m, v1


def ode_concentration(n, p, events, t_obs):
    """Central concentration at ``t_obs`` by integrating the ODE piecewise.

    ``events``: (time, amt, target, duration) with target "depot" or "central";
    duration 0 is a bolus. The integration stops at every event, infusion end and
    observation time (no dense-output interpolation); an observation at a dose time sees
    the dose.
    """
    m, v1 = rate_matrix(n, p)
    t_obs = np.asarray(t_obs, dtype=float)
    target = {"depot": 0, "central": 1}
    breaks = sorted({e[0] for e in events} | {e[0] + e[3] for e in events if e[3] > 0}
                    | set(t_obs.tolist()))
    out = np.zeros_like(t_obs)
    x = np.zeros(4)
    for i, a in enumerate(breaks):
        for time, amt, cmt, dur in events:
            if dur == 0 and time == a:
                x[target[cmt]] += amt
        out[t_obs == a] = x[1] / v1
        if i + 1 == len(breaks):
            break
        r = np.zeros(4)
        for time, amt, cmt, dur in events:
            if dur > 0 and time <= a < time + dur:
                r[target[cmt]] += amt / dur
        sol = solve_ivp(lambda t, y, r=r: m @ y + r, (a, breaks[i + 1]), x, method="DOP853",
                        rtol=1e-10, atol=1e-12)
        assert sol.success
        x = sol.y[:, -1]
    return out


def tensors(p, dtype=DT):
    return {k: torch.tensor(v, dtype=dtype) for k, v in p.items()}


def dose_table(doses, obs, dtype=DT):
    """One subject: doses as (time, amt, rate, cmt, ss, ii) tuples -> kwargs of
    :func:`concentration` (shapes [1, D] and [1, T])."""
    d = np.array(doses, dtype=float).reshape(-1, 6)
    return {
        "dose_time": torch.tensor(d[None, :, 0], dtype=dtype),
        "dose_amt": torch.tensor(d[None, :, 1], dtype=dtype),
        "dose_rate": torch.tensor(d[None, :, 2], dtype=dtype),
        "dose_cmt": torch.tensor(d[None, :, 3], dtype=torch.long),
        "dose_ss": torch.tensor(d[None, :, 4], dtype=torch.long),
        "dose_ii": torch.tensor(d[None, :, 5], dtype=dtype),
        "dose_mask": torch.ones(1, len(d), dtype=torch.bool),
        "obs_time": torch.tensor(np.asarray(obs, dtype=float)[None], dtype=dtype),
    }


def conc(structure, params, doses, obs, **kw):
    return concentration(structure, params, **dose_table(doses, obs), **kw)[0].numpy()


def assert_close(got, ref, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- disposition


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("params", ["slow", "fast", "separated"])
def test_eigenvalues_match_numpy(n, params):
    p = {"slow": SLOW, "fast": FAST,
         "separated": {1: {"cl": 1e-3, "v": 1.0},
                       2: {"cl": 0.01, "v1": 1.0, "q": 50.0, "v2": 2.0},
                       3: {"cl": 0.01, "v1": 1.0, "q": 50.0, "v2": 2.0, "q3": 0.02, "v3": 300.0}}}[params][n]
    lam, coef = disposition(n, tensors(p))
    ref = np.sort(-np.linalg.eigvals(rate_matrix(n, p)[0][1:n + 1, 1:n + 1]).real)[::-1]
    assert_close(lam.numpy(), ref, rtol=1e-11, atol=0)
    v1 = p.get("v", p.get("v1"))
    assert_close(coef.sum().item(), 1.0 / v1, rtol=1e-12)     # C(0) = 1/V1 after a unit bolus


def test_structure_parameters_and_validation():
    assert OneCompartment("iv").parameters == ("cl", "v")
    assert TwoCompartment().parameters == ("cl", "v1", "q", "v2", "ka")
    assert ThreeCompartment("zero_order").parameters == ("cl", "v1", "q", "v2", "q3", "v3", "d1")
    assert TwoCompartment().central_cmt == 2 and TwoCompartment("iv").central_cmt == 1
    assert OneCompartment("iv") == Compartments(n=1, absorption="iv")
    with pytest.raises(ValueError, match="n must be"):
        Compartments(4)
    with pytest.raises(ValueError, match="absorption"):
        OneCompartment("oral")
    tab = dose_table([(0, 100, 0, 1, 0, 0)], [1.0])
    with pytest.raises(ValueError, match=r"missing \['ka'\]"):
        concentration(OneCompartment(), tensors({"cl": 1.0, "v": 10.0}), **tab)
    with pytest.raises(ValueError, match=r"unknown \['V'\]"):
        concentration(OneCompartment("iv"), tensors({"cl": 1.0, "v": 10.0, "V": 1.0}), **tab)
    p = tensors({"cl": 1.0, "v": 10.0, "ka": 1.0})
    with pytest.raises(ValueError, match="dose compartment"):
        concentration(OneCompartment(), p, **dose_table([(0, 100, 0, 3, 0, 0)], [1.0]))
    with pytest.raises(ValueError, match="RATE 0"):
        concentration(OneCompartment(), p, **dose_table([(0, 100, 10, 1, 0, 0)], [1.0]))
    with pytest.raises(ValueError, match="II > 0"):
        concentration(OneCompartment(), p, **dose_table([(0, 100, 0, 1, 1, 0)], [1.0]))
    with pytest.raises(ValueError, match="negative RATE"):
        concentration(OneCompartment("iv"), tensors({"cl": 1.0, "v": 10.0}),
                      **dose_table([(0, 100, -2, 1, 0, 0)], [1.0]))


# --------------------------------------------------------------------------- single doses vs ODE

# (absorption, dose record (time, amt, rate, cmt, ss, ii), extra params, ODE events)
INPUTS = {
    "oral": ("first_order", (0.0, 100.0, 0.0, 1, 0, 0.0), {"ka": 0.8},
             [(0.0, 100.0, "depot", 0.0)]),
    "oral-flipflop": ("first_order", (0.0, 100.0, 0.0, 1, 0, 0.0), {"ka": 0.004},
                      [(0.0, 100.0, "depot", 0.0)]),
    "bolus": ("iv", (0.0, 100.0, 0.0, 1, 0, 0.0), {}, [(0.0, 100.0, "central", 0.0)]),
    "infusion": ("iv", (0.0, 100.0, 40.0, 1, 0, 0.0), {}, [(0.0, 100.0, "central", 2.5)]),
    "zero_order": ("zero_order", (0.0, 100.0, 0.0, 1, 0, 0.0), {"d1": 7.0},
                   [(0.0, 100.0, "central", 7.0)]),
    "central-of-oral-model": ("first_order", (0.0, 100.0, 25.0, 2, 0, 0.0), {"ka": 0.8},
                              [(0.0, 100.0, "central", 4.0)]),
}


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("route", list(INPUTS))
def test_single_dose_matches_ode(n, route):
    absorption, dose, extra, events = INPUTS[route]
    p = {**SLOW[n], **extra}
    got = conc(Compartments(n, absorption), tensors(p), [dose], TIMES)
    ref = ode_concentration(n, p, events, TIMES)
    assert np.all(ref[1:] > 1e-9)            # the comparison is relative, far above atol
    assert_close(got, ref)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_building_blocks_match_ode(n):
    p = SLOW[n]
    t = torch.tensor(TIMES, dtype=DT)
    disp = [torch.tensor(v, dtype=DT) for v in p.values()]
    bolus, infusion, oral = {1: (one_compartment_bolus, one_compartment_infusion, one_compartment_oral),
                             2: (two_compartment_bolus, two_compartment_infusion, two_compartment_oral),
                             3: (three_compartment_bolus, three_compartment_infusion,
                                 three_compartment_oral)}[n]
    assert_close(bolus(t, 100.0, *disp), ode_concentration(n, p, [(0, 100, "central", 0)], TIMES))
    assert_close(infusion(t, 100.0, 3.0, *disp),
                 ode_concentration(n, p, [(0, 100, "central", 3.0)], TIMES))
    ka = torch.tensor(0.8, dtype=DT)
    assert_close(oral(t + 1.5, 100.0, ka, *disp, tlag=1.5),
                 ode_concentration(n, {**p, "ka": 0.8}, [(0, 100, "depot", 0)], TIMES))
    assert float(oral(torch.tensor(-1.0, dtype=DT), 100.0, ka, *disp)) == 0.0
    assert float(bolus(torch.tensor(-1e-9, dtype=DT), 100.0, *disp)) == 0.0
    # Broadcasting: times [T, 1] x volumes [2] -> [T, 2].
    v_two = torch.tensor([disp[1].item(), 2 * disp[1].item()], dtype=DT)
    out = bolus(t[:, None], 100.0, disp[0], v_two, *disp[2:])
    assert out.shape == (len(TIMES), 2)


# --------------------------------------------------------------------------- flip-flop


def oral_mp(ka, k, v, t, dose=100.0):
    """Naive 1-cmt oral formula in 50-digit arithmetic (the limit when ka == k)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    ka, k, t = mpmath.mpf(ka), mpmath.mpf(k), mpmath.mpf(t)
    if ka == k:
        return float(dose / mpmath.mpf(v) * ka * t * mpmath.exp(-k * t))
    return float(dose / mpmath.mpf(v) * ka * (mpmath.exp(-k * t) - mpmath.exp(-ka * t)) / (ka - k))


@pytest.mark.parametrize("rel", [0.0, 1e-7, -1e-7, 1e-12])
def test_flip_flop_one_compartment(rel):
    cl, v = 2.0, 8.0                        # k = 0.25 exactly
    k = cl / v
    ka = k * (1.0 + rel)
    t = torch.tensor(TIMES, dtype=DT)
    got = one_compartment_oral(t, 100.0, torch.tensor(ka, dtype=DT), torch.tensor(cl, dtype=DT),
                               torch.tensor(v, dtype=DT))
    assert torch.isfinite(got).all()
    assert_close(got, [oral_mp(ka, k, v, x) for x in TIMES], rtol=1e-12, atol=0)
    limit = 100.0 / v * ka * t * torch.exp(-k * t)
    early = t <= 24
    assert_close(got[early], limit[early], rtol=1e-6, atol=0)
    assert_close(got[t > 0], ode_concentration(1, {"cl": cl, "v": v, "ka": ka},
                                               [(0, 100, "depot", 0)], TIMES)[1:], rtol=RTOL)


@pytest.mark.parametrize("rel", [0.0, 1e-7, -1e-7])
def test_flip_flop_gradients(rel):
    t = torch.tensor([1e-3, 0.5, 2.0, 10.0, 50.0], dtype=DT)
    k = 0.25

    def f(ka, cl, v):
        return one_compartment_oral(t, 100.0, ka, cl, v)

    args = [torch.tensor(v, dtype=DT, requires_grad=True) for v in (k * (1 + rel), 2.0, 8.0)]
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-8, rtol=1e-6)
    grads = torch.autograd.grad(f(*args).sum(), args)
    assert all(torch.isfinite(g).all() for g in grads)
    # Second derivatives too (Laplace approximations differentiate twice).
    assert torch.autograd.gradgradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5)
    if rel == 0.0:
        # d/dka of (D/V) ka (e^{-k t} - e^{-ka t})/(ka - k) at ka = k: (D/V) e^{-kt} (t - k t^2/2).
        expected = (100.0 / 8.0 * torch.exp(-k * t) * (t - k * t * t / 2)).sum()
        assert_close(grads[0].item(), expected.item(), rtol=1e-12)


@pytest.mark.parametrize("n", [2, 3])
def test_flip_flop_multi_compartment(n):
    """ka equal (bitwise) to the terminal eigenvalue, and within 1e-7 of it."""
    p = tensors(SLOW[n])
    lam, _ = disposition(n, p)
    for ka in (lam[-1], lam[-1] * (1 + 1e-7), lam[0] * (1 - 1e-7)):
        params = {k: v.detach().clone().requires_grad_(True) for k, v in {**p, "ka": ka}.items()}
        got = concentration(Compartments(n), params, **dose_table([(0, 100, 0, 1, 0, 0)], TIMES))
        assert torch.isfinite(got).all()
        ref = ode_concentration(n, {**SLOW[n], "ka": ka.item()}, [(0, 100, "depot", 0)], TIMES)
        assert_close(got[0].detach(), ref)
        grads = torch.autograd.grad(got.sum(), list(params.values()))
        assert all(torch.isfinite(g) and g != 0 for g in grads)

    def f(ka, cl, v1):
        q = {**p, "ka": ka, "cl": cl, "v1": v1}
        return concentration(Compartments(n), q, **dose_table(
            [(0, 100, 0, 1, 0, 0), (12, 100, 0, 1, 2, 12)], [0.5, 2.0, 10.0, 20.0, 40.0]))

    args = [lam[-1].clone().requires_grad_(True), p["cl"].clone().requires_grad_(True),
            p["v1"].clone().requires_grad_(True)]
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-8, rtol=1e-5)


# --------------------------------------------------------------------------- multiple doses


def test_multiple_doses_two_compartment_oral_model_matches_ode():
    """Depot doses with F and lag, a central infusion overlapping them, a central bolus."""
    p = {**SLOW[2], "ka": 0.8, "f": 0.7, "tlag": 0.5}
    doses = [(0, 100, 0, 1, 0, 0), (12, 100, 0, 1, 0, 0), (24, 50, 25, 2, 0, 0),
             (25, 30, 0, 2, 0, 0), (30, 80, 0, 1, 0, 0)]
    events = [(0.5, 70.0, "depot", 0), (12.5, 70.0, "depot", 0), (24, 50.0, "central", 2.0),
              (25, 30.0, "central", 0), (30.5, 56.0, "depot", 0)]
    obs = [0.0, 0.25, 0.5, 1, 6, 12, 12.4, 12.5, 13, 24, 24.5, 25, 25.5, 26, 30, 30.2, 31,
           48, 100, 500]
    assert_close(conc(TwoCompartment(), tensors(p), doses, obs),
                 ode_concentration(2, p, events, obs))


@pytest.mark.parametrize("n", [1, 3])
def test_multiple_doses_iv_matches_ode(n):
    """Overlapping infusions (F changes the duration, NONMEM style) and boluses."""
    p = {**SLOW[n], "f": 0.8}
    doses = [(0, 100, 10, 1, 0, 0), (5, 20, 0, 1, 0, 0), (8, 50, 100, 1, 0, 0),
             (48, 100, 0, 1, 0, 0)]
    events = [(0, 80.0, "central", 8.0), (5, 16.0, "central", 0), (8, 40.0, "central", 0.4),
              (48, 80.0, "central", 0)]
    obs = [0.0, 1, 5, 6, 8, 8.2, 8.4, 9, 24, 48, 49, 72, 1000]
    assert_close(conc(Compartments(n, "iv"), tensors(p), doses, obs),
                 ode_concentration(n, p, events, obs))


# --------------------------------------------------------------------------- steady state

TAU = 12.0
SS_OBS = [0.0, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 11.9, 12.0, 20.0, 36.0]
# (absorption, dose record with SS=1 at time 0 (time, amt, rate, cmt, ss, ii), extra params)
SS_CASES = {
    "oral": ("first_order", (0, 100, 0, 1, 1, TAU), {"ka": 0.8}),
    "oral-lag-F": ("first_order", (0, 100, 0, 1, 1, TAU), {"ka": 0.8, "tlag": 0.7, "f": 0.6}),
    "oral-lag-longer-than-ii": ("first_order", (0, 100, 0, 1, 1, TAU), {"ka": 0.8, "tlag": 15.0}),
    "oral-flipflop": ("first_order", (0, 100, 0, 1, 1, TAU), {"ka": 0.03}),
    "bolus": ("iv", (0, 100, 0, 1, 1, TAU), {}),
    "infusion-short": ("iv", (0, 100, 50, 1, 1, TAU), {}),           # 2 h
    "infusion-equal-ii": ("iv", (0, 120, 10, 1, 1, TAU), {}),        # 12 h
    "infusion-longer-than-ii": ("iv", (0, 100, 3, 1, 1, TAU), {}),   # 33.3 h, 3 overlapping
    "central-infusion-oral-model": ("first_order", (0, 100, 20, 2, 1, TAU), {"ka": 0.8}),
    "zero_order-lag": ("zero_order", (0, 100, 0, 1, 1, TAU), {"d1": 5.0, "tlag": 1.0}),
}


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("case", list(SS_CASES))
def test_steady_state_equals_200_doses(n, case):
    absorption, dose, extra = SS_CASES[case]
    p = tensors({**FAST[n], **extra})
    structure = Compartments(n, absorption)
    lam, _ = disposition(n, p)
    assert lam.min().item() * 200 * TAU > 25           # 200 doses reach steady state
    got = conc(structure, p, [dose], SS_OBS)
    train = [(-k * TAU, dose[1], dose[2], dose[3], 0, 0) for k in range(199, -1, -1)]
    ref = conc(structure, p, train, SS_OBS)
    assert np.all(ref > 1e-6)
    assert_close(got, ref, rtol=RTOL)


def test_steady_state_matches_ode_train():
    """The SS oral formula against the ODE run over 200 doses."""
    p = {**FAST[2], "ka": 0.8}
    events = [(-k * TAU, 100.0, "depot", 0.0) for k in range(199, -1, -1)]
    got = conc(TwoCompartment(), tensors(p), [(0, 100, 0, 1, 1, TAU)], SS_OBS)
    assert_close(got, ode_concentration(2, p, events, SS_OBS))


def test_steady_state_reset_and_add():
    p = tensors({**FAST[1], "ka": 0.8})
    m = OneCompartment()
    obs = [1.0, 10.0, 24.0, 25.0, 30.0]
    early = [(0, 500, 0, 1, 0, 0)]
    ss = (24, 100, 0, 1, 1, TAU)
    alone = conc(m, p, [(ss[0], *ss[1:])], obs)
    before = conc(m, p, early, obs)
    reset = conc(m, p, early + [ss], obs)
    assert_close(reset[:2], before[:2], rtol=1e-14)      # before the SS dose: unchanged
    assert_close(reset[2:], alone[2:], rtol=1e-14)       # from it on: the earlier dose is gone
    added = conc(m, p, early + [(24, 100, 0, 1, 2, TAU)], obs)
    assert_close(added, before + alone, rtol=1e-14)


def test_constant_infusion_at_steady_state():
    """SS with AMT 0, RATE > 0, II 0: the plateau RATE / CL from the dose time on."""
    for n in (1, 2, 3):
        p = tensors(SLOW[n])
        got = conc(Compartments(n, "iv"), p, [(10, 0, 5.0, 1, 1, 0)], [0.0, 10.0, 11.0, 500.0])
        assert_close(got, [0.0] + [5.0 / SLOW[n]["cl"]] * 3, rtol=1e-12)


# --------------------------------------------------------------------------- lag, F, masks, epochs


def test_lag_shifts_and_f_scales():
    p = {**SLOW[2], "ka": 0.8}
    m = TwoCompartment()
    obs = np.array([0.0, 0.3, 1.0, 2.0, 5.0, 24.0])
    doses = [(0, 100, 0, 1, 0, 0), (2, 40, 0, 2, 0, 0)]          # oral + central bolus
    base = conc(m, tensors(p), doses, obs)
    lagged = conc(m, tensors({**p, "tlag": 0.5}), doses, obs)
    oral_only = conc(m, tensors(p), doses[:1], obs - 0.5)
    iv_only = conc(m, tensors(p), doses[1:], obs)
    assert_close(lagged, oral_only + iv_only, rtol=1e-12)        # lag moves the depot dose only
    assert lagged[1] == iv_only[1] == 0.0
    scaled = conc(m, tensors({**p, "f": 0.25}), doses, obs)
    assert_close(scaled, 0.25 * conc(m, tensors(p), doses[:1], obs) + iv_only, rtol=1e-12)
    assert_close(base, conc(m, tensors(p), doses[:1], obs) + iv_only, rtol=1e-12)


def test_padding_contributes_nothing_even_nan():
    p = {k: v.requires_grad_(True) for k, v in tensors({**SLOW[2], "ka": 0.8, "f": 0.9}).items()}
    obs = [0.5, 3.0, 30.0]
    real = dose_table([(0, 100, 0, 1, 0, 0), (12, 50, 10, 2, 0, 0)], obs)
    padded = dose_table([(0, 100, 0, 1, 0, 0), (12, 50, 10, 2, 0, 0), (1, 1e6, -5, 7, 1, 0)], obs)
    for key in ("dose_time", "dose_amt", "dose_rate", "dose_ii"):
        padded[key][0, 2] = math.nan
    padded["dose_mask"][0, 2] = False
    got, ref = (concentration(TwoCompartment(), p, **tab) for tab in (padded, real))
    assert torch.equal(got, ref)
    grads = torch.autograd.grad(got.sum(), list(p.values()))
    assert all(torch.isfinite(g) for g in grads)


def test_epochs_separate():
    p = tensors({**SLOW[1], "ka": 0.8})
    tab = dose_table([(0, 100, 0, 1, 0, 0), (20, 100, 0, 1, 0, 0)], [1.0, 10.0, 21.0, 30.0])
    ep = {"dose_epoch": torch.tensor([[0, 1]]), "obs_epoch": torch.tensor([[0, 0, 1, 1]])}
    got = concentration(OneCompartment(), p, **tab, **ep)[0]
    first = conc(OneCompartment(), p, [(0, 100, 0, 1, 0, 0)], [1.0, 10.0])
    second = conc(OneCompartment(), p, [(20, 100, 0, 1, 0, 0)], [21.0, 30.0])
    assert_close(got, np.r_[first, second], rtol=1e-14)
    with pytest.raises(ValueError, match="both"):
        concentration(OneCompartment(), p, **tab, dose_epoch=ep["dose_epoch"])


# --------------------------------------------------------------------------- vectorization


def population(dtype=DT):
    """Three subjects with different dose histories, padded to D = 3, T = 4."""
    t = torch.tensor
    return {
        "dose_time": t([[0.0, 12.0, 0.0], [0.0, 0.0, 0.0], [0.0, 6.0, 24.0]], dtype=dtype),
        "dose_amt": t([[100.0, 100.0, 0.0], [300.0, 0.0, 0.0], [50.0, 80.0, 100.0]], dtype=dtype),
        "dose_rate": t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 40.0, 0.0]], dtype=dtype),
        "dose_cmt": t([[1, 1, 1], [1, 1, 1], [1, 2, 1]]),
        "dose_ss": t([[0, 0, 0], [1, 0, 0], [0, 0, 0]]),
        "dose_ii": t([[0.0, 0.0, 0.0], [24.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=dtype),
        "dose_mask": t([[True, True, False], [True, False, False], [True, True, True]]),
        "obs_time": t([[1.0, 6.0, 13.0, 24.0], [0.5, 2.0, 8.0, 0.0], [1.0, 7.0, 25.0, 48.0]],
                   dtype=dtype),
    }


@pytest.mark.parametrize("n", [1, 2, 3])
def test_batched_params_match_loop(n):
    g = torch.Generator().manual_seed(n)
    C, S = 4, 3
    base = {**SLOW[n], "ka": 0.8, "tlag": 0.3, "f": 0.9}
    params = {k: v * torch.exp(0.2 * torch.randn(C, S, generator=g, dtype=DT))
              for k, v in base.items()}
    data = population()
    structure = Compartments(n)
    out = concentration(structure, params, **data)
    assert out.shape == (C, S, 4)
    for c in range(C):
        for s in range(S):
            one = {k: v[s:s + 1] if v.dim() == 2 else v for k, v in data.items()}
            ref = concentration(structure, {k: v[c, s] for k, v in params.items()}, **one)
            assert_close(out[c, s], ref[0], rtol=1e-13)
    # params broadcast from [C, 1] over subjects, and scalars
    mixed = {k: (v[:, :1] if k == "cl" else v[0, 0]) for k, v in params.items()}
    assert concentration(structure, mixed, **data).shape == (C, S, 4)


def test_dataset_entry_point_and_gradients_reach_every_parameter():
    data = population()
    S = 3
    ds = Dataset(
        ids=[1, 2, 3], dose_time=data["dose_time"], dose_amt=data["dose_amt"],
        dose_cmt=data["dose_cmt"], dose_rate=data["dose_rate"], dose_ss=data["dose_ss"],
        dose_ii=data["dose_ii"], dose_epoch=torch.zeros(S, 3, dtype=torch.long),
        dose_mask=data["dose_mask"], obs_time=data["obs_time"], obs_dv=torch.zeros(S, 4),
        obs_cmt=torch.full((S, 4), 2), obs_dvid=torch.zeros(S, 4, dtype=torch.long),
        obs_blq=torch.zeros(S, 4, dtype=torch.bool), obs_lloq=torch.full((S, 4), math.nan),
        obs_epoch=torch.zeros(S, 4, dtype=torch.long), obs_mask=torch.ones(S, 4, dtype=torch.bool))
    structure = ThreeCompartment()
    params = {k: torch.full((S,), v, dtype=DT, requires_grad=True)
              for k, v in {**SLOW[3], "ka": 0.8, "tlag": 0.3, "f": 0.9}.items()}
    got = structure.concentration(params, ds)
    assert torch.equal(got, concentration(structure, params, **data))
    grads = torch.autograd.grad(got.sum(), list(params.values()))
    for name, g in zip(params, grads):
        assert torch.isfinite(g).all() and (g != 0).any(), name

    def f(*values):
        return structure.concentration(dict(zip(params, values)), ds)

    assert torch.autograd.gradcheck(f, [v.detach()[:1].requires_grad_(True) for v in
                                        params.values()], eps=1e-6, atol=1e-8, rtol=1e-5)


def test_zero_order_duration_gradient_and_float32():
    p = {k: v.requires_grad_(True) for k, v in tensors({**FAST[2], "d1": 3.0}).items()}
    obs = [1.0, 3.5, 14.0, 30.0]
    doses = [(0, 100, 0, 1, 0, 0), (24, 100, 0, 1, 1, TAU)]
    got = concentration(TwoCompartment("zero_order"), p, **dose_table(doses, obs))
    grads = torch.autograd.grad(got.sum(), list(p.values()))
    assert all(torch.isfinite(g) and g != 0 for g in grads)
    # float32 parameters and data: relative agreement with float64 at single precision.
    p32 = {k: v.detach().float() for k, v in p.items()}
    got32 = concentration(TwoCompartment("zero_order"), p32, **dose_table(doses, obs, torch.float32))
    assert got32.dtype == torch.float32
    assert_close(got32.double(), got.detach(), rtol=1e-5)


def test_unit_response_steady_state_and_routes():
    p = tensors({**FAST[2], "ka": 0.8})
    m = TwoCompartment()
    t = torch.tensor(SS_OBS, dtype=DT)
    ss = m.unit_response(p, t, ii=torch.tensor(TAU, dtype=DT))
    assert_close(100 * ss, conc(m, p, [(0, 100, 0, 1, 1, TAU)], SS_OBS), rtol=1e-13)
    inf = m.unit_response(p, t, "infusion", duration=torch.tensor(2.0, dtype=DT))
    assert_close(100 * inf, conc(m, p, [(0, 100, 50, 2, 0, 0)], SS_OBS), rtol=1e-13)
    with pytest.raises(ValueError, match="route"):
        TwoCompartment("iv").unit_response({k: p[k] for k in ("cl", "v1", "q", "v2")}, t, "oral")


@pytest.mark.gpu
def test_cuda_matches_cpu():
    params = {k: torch.tensor(v, dtype=DT) for k, v in {**SLOW[3], "ka": 0.8}.items()}
    data = population()
    cpu = concentration(ThreeCompartment(), params, **data)
    cuda = concentration(ThreeCompartment(), {k: v.cuda() for k, v in params.items()},
                         **{k: v.cuda() for k, v in data.items()})
    assert cuda.device.type == "cuda"
    assert_close(cuda.cpu(), cpu, rtol=1e-12)


# --------------------------------------------------------------------------- reference formulas
# The elementwise formulas as they were before the single-branch oral term (every element
# evaluated with both the near-tie series and the direct formula); kept here, not in the
# package, to check that the faster code gives the same values and gradients.


def _ref_phi(x):
    small = x < 1e-3
    x_safe = torch.where(small, torch.ones_like(x), x)
    series = ((((x * (1.0 / 120.0) - 1.0 / 24.0) * x + 1.0 / 6.0) * x - 0.5) * x) + 1.0
    return torch.where(small, series, -torch.expm1(-x_safe) / x_safe)


def _ref_edd(p, q):
    d = q - p
    small = d.abs() < 1e-3
    z = torch.where(small, d, torch.zeros_like(d)) * 0.5
    z2 = z * z
    near = torch.exp(-0.5 * (p + q)) * (1.0 + z2 * (1.0 / 6.0) * (1.0 + z2 * (1.0 / 20.0)))
    far = torch.exp(-torch.minimum(p, q)) * _ref_phi(d.abs())
    return torch.where(small, near, far)


def _ref_oral(lam, ka, s):
    return s * _ref_edd(lam * s, ka * s)


def _ref_oral_ss(lam, ka, s, tau):
    num = s * _ref_edd(lam * s, ka * s) - (s - tau) * _ref_edd(lam * s + ka * tau, ka * s + lam * tau)
    return num / (lam * tau * _ref_phi(lam * tau) * (ka * tau * _ref_phi(ka * tau)))


def _ref_bolus_ss(lam, s, tau):
    return torch.exp(-lam * s) / (lam * tau * _ref_phi(lam * tau))


def _ref_concentration(n, p, doses, obs):
    """One subject, dose by dose and time by time with the reference formulas: doses are
    (time, amt, cmt, ss, ii) with cmt 1 the depot (F, tlag) and 2 a central bolus; SS = 2
    (adds, no reset)."""
    lam, coef = disposition(n, p)
    out = []
    for t in obs:
        total = torch.zeros((), dtype=DT)
        for t_d, amt, cmt, ss, ii in doses:
            elapsed = torch.tensor(t - t_d, dtype=DT)
            s = elapsed - p["tlag"] if cmt == 1 else elapsed
            if ss:
                s = torch.where(s < 0, s + torch.ceil(-s / ii).detach() * ii, s)
                started = bool(elapsed >= 0)
            else:
                started = bool(s >= 0)
            if not started:
                continue
            s = s.clamp_min(0.0)
            tau = torch.tensor(float(ii), dtype=DT)
            if cmt == 1:
                term = p["ka"] * (_ref_oral_ss(lam, p["ka"], s, tau) if ss else _ref_oral(lam, p["ka"], s))
                total = total + amt * p["f"] * (coef * term).sum()
            else:
                term = _ref_bolus_ss(lam, s, tau) if ss else torch.exp(-lam * s)
                total = total + amt * (coef * term).sum()
        out.append(total)
    return torch.stack(out)


def _near_tie_parameters(n, g):
    """Random parameters, with ka at or within 1e-12 .. 1e-3 (relative) of an eigenvalue
    and, for n >= 2, sometimes a small Q (nearly equal eigenvalues)."""
    base = {**SLOW[n]}
    p = {k: torch.tensor(v * math.exp(0.3 * float(torch.randn((), generator=g, dtype=DT))), dtype=DT)
         for k, v in base.items()}
    if n >= 2 and float(torch.rand((), generator=g, dtype=DT)) < 0.3:
        p["q"] = p["q"] * 1e-2
    lam, _ = disposition(n, p)
    j = int(torch.randint(n, (), generator=g))
    rel = [0.0, 1e-12, -1e-9, 1e-7, -1e-5, 1e-4, 3e-3, 0.5][int(torch.randint(8, (), generator=g))]
    p["ka"] = (lam[j] * (1.0 + rel)).detach()
    p["tlag"] = torch.tensor(0.25, dtype=DT)
    p["f"] = torch.tensor(0.8, dtype=DT)
    return p


@pytest.mark.parametrize("n", [1, 2, 3])
def test_matches_reference_formulas_near_ties(n):
    """The single-branch oral term (and the per-dose steady-state bolus denominator) give
    the values and gradients of the two-branch reference formulas to 1e-10 relative, at
    random parameters with ka tied to, or within 1e-12 .. 3e-3 of, an eigenvalue."""
    g = torch.Generator().manual_seed(100 + n)
    doses = [(0.0, 100.0, 1, 0, 0.0), (12.0, 50.0, 1, 0, 0.0), (24.0, 80.0, 1, 2, 12.0),
             (30.0, 40.0, 2, 0, 0.0), (36.0, 60.0, 2, 2, 24.0)]
    obs = [0.0, 1e-4, 0.25, 0.2500001, 0.5, 2.0, 12.0, 12.25, 13.0, 24.0, 24.25, 30.0, 31.0,
           36.0, 36.25, 40.0, 48.0, 60.0, 96.0]
    table = dose_table([(t, a, 0.0, c, s, i) for t, a, c, s, i in doses], obs)
    for _ in range(12):
        p = {k: v.detach().clone().requires_grad_(True) for k, v in _near_tie_parameters(n, g).items()}
        got = concentration(Compartments(n), p, **table)[0]
        ref = _ref_concentration(n, p, doses, obs)
        assert torch.isfinite(got).all()
        assert_close(got.detach(), ref.detach(), rtol=1e-10, atol=1e-300)
        w = torch.linspace(0.5, 1.5, len(obs), dtype=DT)
        names = list(p)
        g_got = torch.autograd.grad((got * w).sum(), [p[k] for k in names])
        g_ref = torch.autograd.grad((ref * w).sum(), [p[k] for k in names])
        for k, a, b in zip(names, g_got, g_ref):
            assert_close(a, b, rtol=1e-10, atol=1e-12 * float(b.abs()) + 1e-300)


@pytest.mark.parametrize("rel", [0.0, 1e-9, -1e-6, 2e-4, 0.3])
def test_oral_terms_match_reference_with_second_derivatives(rel):
    """Elementwise: the oral terms (single dose and steady state) and their first and
    second derivatives in lam, ka and s against the reference, through and near the tie."""
    lam = torch.tensor([0.7, 0.05], dtype=DT, requires_grad=True)
    ka = (0.05 * (1 + rel) * torch.ones((), dtype=DT)).requires_grad_(True)
    s = torch.tensor([0.0, 1e-6, 0.01, 0.5, 3.0, 11.9, 12.0, 40.0, 300.0], dtype=DT)[:, None]
    s = s.clone().requires_grad_(True)
    tau = torch.tensor(12.0, dtype=DT)
    for new, ref in ((lambda: structural._oral_terms(lam, ka, s), lambda: _ref_oral(lam, ka, s)),
                     (lambda: structural._oral_terms_ss(lam, ka, s, tau),
                      lambda: _ref_oral_ss(lam, ka, s, tau))):
        a, b = new(), ref()
        assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-300)
        ga = torch.autograd.grad(a.sum(), [lam, ka, s], create_graph=True)
        gb = torch.autograd.grad(b.sum(), [lam, ka, s], create_graph=True)
        for x, y in zip(ga, gb):
            assert_close(x.detach(), y.detach(), rtol=1e-10, atol=1e-14)
        # Second derivatives: one row of the Hessian per variable.
        for x, y in zip(ga, gb):
            hx = torch.autograd.grad(x.sum(), [lam, ka, s], retain_graph=True)
            hy = torch.autograd.grad(y.sum(), [lam, ka, s], retain_graph=True)
            for u, v in zip(hx, hy):
                assert_close(u, v, rtol=1e-9, atol=1e-12)

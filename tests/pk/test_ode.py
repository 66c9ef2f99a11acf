"""Tests for ``genprog.pk.ode``: ODE structural models.

Oracles, independent of the code under test:

* the closed-form linear models of :mod:`genprog.pk.structural` (themselves checked
  against SciPy in ``test_structural.py``) for :func:`linear_compartments`, to ``RTOL``;
* ``scipy.integrate.solve_ivp`` (DOP853, rtol 1e-11) of the Michaelis-Menten system,
  integrated piecewise between events, to ``RTOL``;
* the linear limit of Michaelis-Menten (``km >> C``: ``CL = vmax / km``), to 1e-3;
* gradients: the closed form's autograd gradients (linear models), central finite
  differences (Michaelis-Menten).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.integrate import solve_ivp

from genprog.pk import PopulationModel, read_nonmem
from genprog.pk.dataset import Dataset
from genprog.pk.ode import ODEModel, linear_compartments, michaelis_menten
from genprog.pk.structural import Compartments

DT = torch.float64
RTOL = 1e-5
ATOL = 1e-9          # concentration units, for values that are exactly 0

PK = {
    1: {"cl": 2.0, "v": 20.0},
    2: {"cl": 2.0, "v1": 10.0, "q": 3.0, "v2": 30.0},
    3: {"cl": 2.0, "v1": 10.0, "q": 3.0, "v2": 30.0, "q3": 0.5, "v3": 50.0},
}
MM = {"vmax": 20.0, "km": 2.0, "v": 15.0, "ka": 1.2}

# Three subjects, different dose histories: (time, amt, rate, cmt) per dose, obs times.
# Doses at 12 h coincide with an observation (which must see the dose); subject 2 has one
# dose and fewer observations (padding); a dose after the last observation is inert.
ORAL = [
    ([(0.0, 100.0, 0.0, 1), (12.0, 100.0, 0.0, 1)], [0.5, 2.0, 12.0, 13.0, 24.0]),
    ([(3.0, 300.0, 0.0, 1)], [4.0, 10.0, 30.0]),
    ([(0.0, 50.0, 0.0, 1), (6.0, 80.0, 0.0, 1), (24.0, 100.0, 0.0, 1), (60.0, 9.0, 0.0, 1)],
     [1.0, 7.0, 25.0, 48.0]),
]
BOLUS = [([(t, a, 0.0, 1) for t, a, _, _ in doses], obs) for doses, obs in ORAL]
INFUSION = [
    ([(0.0, 100.0, 50.0, 1), (12.0, 100.0, 25.0, 1)], [0.5, 2.0, 12.0, 13.0, 24.0]),
    ([(3.0, 300.0, 0.0, 1)], [4.0, 10.0, 30.0]),
    ([(0.0, 50.0, 10.0, 1), (2.0, 80.0, 40.0, 1), (24.0, 100.0, 0.0, 1)], [1.0, 3.0, 7.0, 25.0]),
]
# Oral model with an infusion and a bolus into the central compartment (CMT 2).
ORAL_MIXED = [ORAL[0], ([(0.0, 100.0, 0.0, 1), (1.0, 60.0, 20.0, 2), (8.0, 40.0, 0.0, 2)],
                        [0.5, 2.0, 4.0, 8.0, 9.0, 24.0])]


def make_dataset(subjects, dtype=DT, ss=None, epochs=None):
    """A padded Dataset; padding doses hold NaN (they must be inert)."""
    S = len(subjects)
    D = max(len(d) for d, _ in subjects)
    T = max(len(o) for _, o in subjects)
    dose = np.full((S, D, 4), np.nan)
    obs = np.zeros((S, T))
    dmask = np.zeros((S, D), bool)
    omask = np.zeros((S, T), bool)
    for i, (doses, times) in enumerate(subjects):
        dose[i, :len(doses)] = doses
        dmask[i, :len(doses)] = True
        obs[i, :len(times)] = times
        obs[i, len(times):] = times[-1]
        omask[i, :len(times)] = True
    t = lambda x, d=dtype: torch.tensor(x, dtype=d)
    cmt = np.where(dmask, np.nan_to_num(dose[..., 3]), 0)
    return Dataset(
        ids=list(range(1, S + 1)), dose_time=t(dose[..., 0]), dose_amt=t(dose[..., 1]),
        dose_cmt=t(cmt, torch.long), dose_rate=t(dose[..., 2]),
        dose_ss=t(np.zeros((S, D)) if ss is None else ss, torch.long),
        dose_ii=t(np.zeros((S, D))),
        dose_epoch=t(np.zeros((S, D)) if epochs is None else epochs[0], torch.long),
        dose_mask=torch.tensor(dmask), obs_time=t(obs), obs_dv=t(np.zeros((S, T))),
        obs_cmt=torch.zeros(S, T, dtype=torch.long), obs_dvid=torch.zeros(S, T, dtype=torch.long),
        obs_blq=torch.zeros(S, T, dtype=torch.bool), obs_lloq=t(np.full((S, T), math.nan)),
        obs_epoch=t(np.zeros((S, T)) if epochs is None else epochs[1], torch.long),
        obs_mask=torch.tensor(omask))


def tensors(p, S=None, dtype=DT, grad=False):
    return {k: (torch.tensor(v, dtype=dtype) if S is None else torch.full((S,), v, dtype=dtype))
            .requires_grad_(grad) for k, v in p.items()}


def assert_close(got, ref, mask, rtol=RTOL, atol=ATOL):
    got, ref = got.detach(), ref.detach()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got[..., mask].numpy(), ref[..., mask].numpy(), rtol=rtol, atol=atol)


def mm_reference(p, doses, times, depot=True):
    """Michaelis-Menten by SciPy, piecewise between events (an obs at a dose time sees it)."""
    vmax, km, v, ka = p["vmax"], p["km"], p["v"], p.get("ka", 0.0)
    f, tlag = p.get("f", 1.0), p.get("tlag", 0.0)
    # (start, amount, state, duration): depot doses take F and tlag (oral model numbering).
    events = []
    for t, amt, rate, cmt in doses:
        state = cmt - 1 if depot else 0
        scaled = state == 0
        a = amt * (f if scaled else 1.0)
        events.append((t + (tlag if scaled else 0.0), a, state, a / rate if rate > 0 else 0.0))
    c = 1 if depot else 0

    def rhs(t, y, r):
        dy = np.zeros_like(y) + r
        conc = y[c] / v
        dy[c] -= vmax * conc / (km + conc)
        if depot:
            dy[0] -= ka * y[0]
            dy[1] += ka * y[0]
        return dy

    breaks = sorted({e[0] for e in events} | {e[0] + e[3] for e in events if e[3] > 0} | set(times))
    y = np.zeros(2 if depot else 1)
    out = {}
    for i, a in enumerate(breaks):
        for start, amt, state, dur in events:
            if dur == 0 and start == a:
                y[state] += amt
        out[a] = y[c] / v
        if i + 1 == len(breaks):
            break
        r = np.zeros_like(y)
        for start, amt, state, dur in events:
            if dur > 0 and start <= a < start + dur:
                r[state] += amt / dur
        sol = solve_ivp(rhs, (a, breaks[i + 1]), y, method="DOP853", rtol=1e-11, atol=1e-13, args=(r,))
        assert sol.success
        y = sol.y[:, -1]
    return np.array([out[t] for t in times])


def padded_reference(subjects, fn):
    T = max(len(o) for _, o in subjects)
    return torch.tensor(np.stack([np.pad(fn(doses, obs), (0, T - len(obs))) for doses, obs in subjects]))


# --------------------------------------------------------------------------- linear = closed form


CASES = {
    "1cmt-oral": (1, "first_order", ORAL),
    "1cmt-bolus": (1, "iv", BOLUS),
    "1cmt-infusion": (1, "iv", INFUSION),
    "1cmt-zero-order": (1, "zero_order", BOLUS),
    "2cmt-oral": (2, "first_order", ORAL),
    "2cmt-oral-central-infusion": (2, "first_order", ORAL_MIXED),
    "2cmt-bolus": (2, "iv", BOLUS),
    "2cmt-infusion": (2, "iv", INFUSION),
    "3cmt-oral": (3, "first_order", ORAL),
}


@pytest.mark.parametrize("case", list(CASES))
def test_linear_matches_closed_form(case):
    n, absorption, subjects = CASES[case]
    data = make_dataset(subjects)
    extra = {"first_order": {"ka": 0.9}, "iv": {}, "zero_order": {"d1": 2.5}}[absorption]
    p = tensors({**PK[n], **extra}, S=len(subjects))
    got = linear_compartments(n, absorption).concentration(p, data)
    ref = Compartments(n, absorption).concentration(p, data)
    assert got.shape == ref.shape == data.obs_time.shape and got.dtype == DT
    assert_close(got, ref, data.obs_mask)
    assert (ref[data.obs_mask] > 0).all()


@pytest.mark.parametrize("absorption, subjects", [("first_order", ORAL_MIXED), ("iv", INFUSION),
                                                  ("zero_order", BOLUS)], ids=["oral", "iv", "zero-order"])
def test_bioavailability_and_lag_match_closed_form(absorption, subjects):
    """F scales (IV infusions keep their rate and last F*AMT/RATE), tlag shifts; per
    subject values, and gradients equal the closed form's."""
    data = make_dataset(subjects)
    S = len(subjects)
    extra = {"first_order": {"ka": 0.9}, "iv": {}, "zero_order": {"d1": 2.5}}[absorption]
    p = tensors({**PK[2], **extra}, S=S)
    p["f"] = torch.linspace(0.4, 0.9, S, dtype=DT)
    p["tlag"] = torch.linspace(0.25, 0.75, S, dtype=DT)
    p = {k: v.requires_grad_(True) for k, v in p.items()}
    model = linear_compartments(2, absorption, rtol=1e-9, atol=1e-12)
    got = model.concentration(p, data)
    ref = Compartments(2, absorption).concentration(p, data)
    assert_close(got, ref, data.obs_mask, rtol=1e-7)
    weights = data.obs_mask.to(DT)
    grads = torch.autograd.grad((got * weights).sum(), list(p.values()))
    refs = torch.autograd.grad((ref * weights).sum(), list(p.values()))
    for name, g, r in zip(p, grads, refs):
        assert torch.isfinite(g).all() and (r != 0).any(), name
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-5, atol=1e-7 * r.abs().max().item(),
                                   err_msg=name)


@pytest.mark.parametrize("absorption, subjects", [("first_order", ORAL_MIXED), ("iv", INFUSION)],
                         ids=["oral", "iv"])
def test_second_derivatives_match_closed_form(absorption, subjects):
    """Hessians by double backward (what FOCE-I's EBE curvature and mixed eta-theta terms
    use): every entry of the Hessian of a weighted sum of concentrations in (CL, V, ka or
    F) equals the closed form's autograd Hessian; per-subject parameters, so the Hessian is
    block diagonal over subjects (subjects do not mix)."""
    data = make_dataset(subjects)
    S = len(subjects)
    extra = {"ka": 0.9} if absorption == "first_order" else {"f": 0.8}
    base = {**PK[1], **extra}
    p = {k: torch.linspace(0.8, 1.2, S, dtype=DT) * v for k, v in base.items()}
    p = {k: v.requires_grad_(True) for k, v in p.items()}
    weights = data.obs_mask.to(DT) * torch.linspace(0.5, 1.5, data.obs_time.shape[-1], dtype=DT)
    model = linear_compartments(1, absorption, rtol=1e-10, atol=1e-12)

    def hessian(conc):
        grads = torch.autograd.grad((conc * weights).sum(), list(p.values()), create_graph=True)
        flat = torch.cat(grads)
        rows = [torch.cat(torch.autograd.grad(flat[i], list(p.values()), retain_graph=True))
                for i in range(flat.numel())]
        return flat.detach(), torch.stack(rows)

    g, H = hessian(model.concentration(p, data))
    g_ref, H_ref = hessian(Compartments(1, absorption).concentration(p, data))
    np.testing.assert_allclose(g.numpy(), g_ref.numpy(), rtol=1e-6)
    scale = H_ref.abs().max().item()
    assert scale > 0
    np.testing.assert_allclose(H.numpy(), H_ref.numpy(), rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("absorption, subjects", [("first_order", ORAL), ("iv", BOLUS)])
def test_bioavailability_scales_linear_model(absorption, subjects):
    data = make_dataset(subjects)
    p = tensors({**PK[1], "ka": 0.9} if absorption == "first_order" else PK[1], S=len(subjects))
    model = linear_compartments(1, absorption)
    base = model.concentration(p, data)
    scaled = model.concentration({**p, "f": torch.tensor(0.37, dtype=DT)}, data)
    assert_close(scaled, 0.37 * base, data.obs_mask, rtol=1e-6)


def test_batched_params_match_loop():
    data = make_dataset(ORAL)
    g = torch.Generator().manual_seed(0)
    C, S = 3, len(ORAL)
    params = {k: v * torch.exp(0.3 * torch.randn(C, S, generator=g, dtype=DT))
              for k, v in {**PK[2], "ka": 0.9, "f": 0.8, "tlag": 0.4}.items()}
    model = linear_compartments(2)
    out = model.concentration(params, data)
    assert out.shape == (C, S, data.obs_time.shape[-1])
    for c in range(C):
        for s in range(S):
            one = model.concentration({k: v[c, s:s + 1] for k, v in params.items()}, data.subset([s]))
            assert_close(out[c, s:s + 1], one, data.obs_mask[s:s + 1], rtol=1e-6)
    assert_close(out, Compartments(2).concentration(params, data), data.obs_mask)
    # typical values [C, 1] and scalars broadcast over subjects
    mixed = {k: (v[:, :1] if k == "cl" else v[0, 0]) for k, v in params.items()}
    assert model.concentration(mixed, data).shape == (C, S, data.obs_time.shape[-1])


def test_float32():
    data = make_dataset(INFUSION, dtype=torch.float32)
    p = tensors(PK[2], S=3, dtype=torch.float32)
    got = linear_compartments(2, "iv", rtol=1e-5, atol=1e-6).concentration(p, data)
    assert got.dtype == torch.float32
    ref = Compartments(2, "iv").concentration(tensors(PK[2], S=3), data.to(dtype=DT))
    assert_close(got.double(), ref, data.obs_mask, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- Michaelis-Menten


@pytest.mark.parametrize("absorption", ["first_order", "iv"])
def test_michaelis_menten_matches_solve_ivp(absorption):
    depot = absorption == "first_order"
    subjects = ORAL_MIXED if depot else INFUSION
    data = make_dataset(subjects)
    S = len(subjects)
    p = {**MM} if depot else {k: v for k, v in MM.items() if k != "ka"}
    p["f"] = 0.8
    p["tlag"] = 0.3
    got = michaelis_menten(absorption).concentration(tensors(p, S=S), data)
    ref = padded_reference(subjects, lambda doses, obs: mm_reference(p, doses, obs, depot))
    assert_close(got, ref, data.obs_mask)
    # saturation: doses well above km (C >> km) really are in the nonlinear regime
    assert float(got.max()) > 3 * MM["km"]


@pytest.mark.parametrize("absorption", ["first_order", "iv"])
def test_michaelis_menten_linear_limit(absorption):
    """km >> C: vmax C / (km + C) ~ (vmax / km) C, the linear model with CL = vmax/km."""
    subjects = ORAL if absorption == "first_order" else INFUSION
    data = make_dataset(subjects)
    km, cl = 1e5, PK[1]["cl"]
    p = {"vmax": cl * km, "km": km, "v": PK[1]["v"]}
    lin = {**PK[1]}
    if absorption == "first_order":
        p["ka"] = lin["ka"] = 0.9
    got = michaelis_menten(absorption).concentration(tensors(p, S=3), data)
    ref = Compartments(1, absorption).concentration(tensors(lin, S=3), data)
    assert_close(got, ref, data.obs_mask, rtol=1e-3)


def test_michaelis_menten_gradients_match_finite_differences():
    subjects = [([(0.0, 100.0, 0.0, 1), (4.0, 150.0, 0.0, 1)], [1.0, 4.0, 6.0, 12.0])]
    data = make_dataset(subjects)
    base = {**MM, "f": 0.8, "tlag": 0.3}
    model = michaelis_menten(rtol=1e-9, atol=1e-11)
    p = tensors(base, S=1, grad=True)
    out = model.concentration(p, data)
    grads = torch.autograd.grad(out.sum(), list(p.values()))
    for (name, value), g in zip(base.items(), grads):
        h = 1e-4 * value
        up = model.concentration(tensors({**base, name: value + h}, S=1), data).sum()
        down = model.concentration(tensors({**base, name: value - h}, S=1), data).sum()
        fd = float(up - down) / (2 * h)
        assert math.isfinite(float(g)) and fd != 0, name
        assert float(g) == pytest.approx(fd, rel=1e-3), name


# --------------------------------------------------------------------------- contract, errors


def test_contract_and_validation():
    m = michaelis_menten()
    assert m.parameters == ("vmax", "km", "v", "ka")
    assert m.optional_parameters == ("f", "tlag")
    assert m.central_cmt == 2 and michaelis_menten("iv").central_cmt == 1
    assert linear_compartments(3, "zero_order").parameters == ("cl", "v1", "q", "v2", "q3", "v3", "d1")
    assert linear_compartments(2) == linear_compartments(2)
    m.check_parameters(tensors({**MM, "f": 0.5}))
    with pytest.raises(ValueError, match=r"missing \['ka'\]"):
        m.check_parameters(tensors({k: v for k, v in MM.items() if k != "ka"}))
    with pytest.raises(ValueError, match=r"unknown \['cl'\]"):
        m.check_parameters(tensors({**MM, "cl": 1.0}))
    with pytest.raises(ValueError, match="volume"):
        ODEModel(lambda t, a, p: -a, 1, ("cl",), central_cmt=1)
    with pytest.raises(ValueError, match="central_cmt"):
        ODEModel(lambda t, a, p: -a, 1, ("v",), central_cmt=2)
    with pytest.raises(ValueError, match="adaptive"):
        ODEModel(lambda t, a, p: -a, 1, ("v",), central_cmt=1, method="rk4")
    with pytest.raises(ValueError, match="absorption"):
        michaelis_menten("oral")


def test_custom_rhs_and_dataset_from_reader():
    """A user-written system on a data set from the reader (no CMT column)."""
    def rhs(t, a, p):
        return -(p["cl"] / p["v"]).unsqueeze(-1) * a

    m = ODEModel(rhs, 1, ("cl", "v"), central_cmt=1)
    df = pd.DataFrame({"ID": [1, 1, 1, 1], "TIME": [0.0, 1.0, 2.0, 5.0], "AMT": [100.0, 0, 50.0, 0],
                       "DV": [0, 4.5, 0, 3.0], "EVID": [1, 0, 1, 0]})
    data = read_nonmem(df).to(dtype=DT)
    p = tensors({"cl": 2.0, "v": 20.0}, S=1)
    got = m.concentration(p, data)
    k = 0.1
    ref = torch.tensor([[5 * math.exp(-k), 5 * math.exp(-5 * k) + 2.5 * math.exp(-3 * k)]], dtype=DT)
    assert_close(got, ref, data.obs_mask)


@pytest.mark.parametrize("problem", ["steady_state", "reset", "negative_rate", "bad_cmt"])
def test_unsupported_doses_raise(problem):
    subjects = [ORAL[0], ORAL[1]]
    model = michaelis_menten()
    p = tensors(MM, S=2)
    ss = epochs = None
    if problem == "steady_state":
        ss = [[0, 1], [0, 0]]
    elif problem == "reset":
        epochs = ([[0, 1], [0, 0]], [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    elif problem == "negative_rate":
        subjects = [([(0.0, 100.0, -2.0, 1)], [1.0])]
        p = tensors(MM, S=1)
    else:
        subjects = [([(0.0, 100.0, 0.0, 3)], [1.0])]
        p = tensors(MM, S=1)
    data = make_dataset(subjects, ss=ss, epochs=epochs)
    match = {"steady_state": "steady-state", "reset": "reset", "negative_rate": "negative RATE",
             "bad_cmt": "compartment"}[problem]
    with pytest.raises(ValueError, match=match):
        model.concentration(p, data)
    # SS on a padding dose (mask False) is ignored
    if problem == "steady_state":
        ok = make_dataset([ORAL[0], ORAL[1]], ss=[[0, 0], [0, 1]])
        assert torch.isfinite(model.concentration(p, ok)).all()


def test_population_model_with_michaelis_menten():
    rows = []
    for i, (t0, amt) in enumerate([(0.0, 100.0), (1.0, 200.0), (0.0, 150.0)], 1):
        rows.append({"ID": i, "TIME": t0, "AMT": amt, "DV": 0.0, "EVID": 1, "CMT": 1})
        for dt, dv in [(0.5, 2.0), (1.5, 3.5), (4.0, 3.0), (8.0, 2.0), (12.0, 1.2)]:
            rows.append({"ID": i, "TIME": t0 + dt, "AMT": 0.0, "DV": dv, "EVID": 0, "CMT": 2})
    data = read_nonmem(pd.DataFrame(rows))
    pm = PopulationModel(structure=michaelis_menten(), random_effects=["vmax"], error="proportional")
    model = pm(data)
    draws = model.sample(2, seed=1)
    assert draws["dv"].shape == (2, 3, 5) and torch.isfinite(draws["dv"]).all()
    values = {k: v for k, v in draws.items() if k != "dv"}
    lp = model.log_prob(**values)
    assert lp.shape == (2,) and torch.isfinite(lp).all()
    one = model.log_prob(**{k: v[1] for k, v in values.items()})
    assert float(one) == pytest.approx(float(lp[1]), rel=1e-5)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    data = make_dataset(ORAL_MIXED)
    p = tensors({**MM, "tlag": 0.3}, S=2)
    cpu = michaelis_menten().concentration(p, data)
    cuda = michaelis_menten().concentration({k: v.cuda() for k, v in p.items()}, data.to("cuda"))
    assert cuda.device.type == "cuda"
    assert_close(cuda.cpu(), cpu, data.obs_mask, rtol=1e-8)

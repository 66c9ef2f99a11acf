"""Population-PK validation designs (issue 15): FOCE-I on the classic NLME validation data.

The designs follow the issue (and the nlmixr/Monolix validation studies):

* 120 subjects in four dose groups of 30 (10, 30, 60, 120 mg; amounts in µg, DV in µg/L);
* a single dose at t = 0 with 19 samples (0.25 ... 72 h), then daily doses at 72-192 h
  with a trough just before each, a steady-state dose
  (SS=1, II=24) at 216 h with a rich profile to 288 h (216 h + the same 19 offsets);
* a trough is taken ``TROUGH_OFFSET`` = 0.01 h before its dose (the 72 h sample of the
  single-dose profile too), since genprog counts a dose at an observation's own time as
  given (NONMEM would order the rows); the same design serves simulation and fit;
* truth CL 4 L/h, V (V1) 70 L, ka 1 /h, Q 4 L/h, V2 50 L; log-normal IIV with omega = 0.3
  on every parameter; exponential residual error 0.2.

Designs (closed form): ``oral1`` (1-cmt oral), ``bolus1``, ``infusion1`` (1-h infusions),
``oral2``, ``bolus2``, ``infusion2``. The ``subset="sd"`` data keep the single-dose part
(t <= 72 h, the first dose) only.

Design ``mm_oral`` (ODE, :func:`genprog.pk.michaelis_menten`): 1-cmt oral with
Michaelis-Menten elimination, truth V 70 L, ka 1 /h, Vmax 1000 µg/h, Km 250 µg/L, dose
groups 10, 20, 40, 80 mg, the same sampling. Its 216 h dose is an ordinary dose (SS=0, the
eighth): a steady state at 24-h dosing exists only while the dosing rate is below Vmax
(``AMT / 24 < Vmax_i``), i.e. not for the typical subject at 40 and 80 mg (1,667 and 3,333
µg/h) nor for about a quarter of the 20 mg group, so an SS=1 dose (NONMEM's iteration to
steady state) is undefined there; ODE models do not take SS doses either.

Usage (from the repository root)::

    python bench/pk_validation.py                   # every design, seeds 0, one process
    python bench/pk_validation.py --designs oral1 --seeds 0 1 2
    python bench/pk_validation.py --parallel 2      # also: two processes at once (oral1)

Every row: the estimate of each typical value, omega and the residual SD relative to the
truth and to the realized sample (:func:`realized_truth`), the wall and CPU time, and the fit's per-phase times (``fit.info["timing"]``: inner
EBE solves, outer iterations, standard errors).
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import time
import warnings

import numpy as np
import pandas as pd
import torch

from genprog import pk
from genprog.errors import ConvergenceWarning

SINGLE_DOSE_TIMES = (0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 4, 6, 8, 12, 16, 20, 24, 36, 48, 60, 72)
DAILY_DOSES = (72.0, 96.0, 120.0, 144.0, 168.0, 192.0)
SS_DOSE = 216.0
TROUGH_OFFSET = 0.01  # h before the dose: the trough does not see the dose it precedes
DOSE_GROUPS_MG = (10.0, 30.0, 60.0, 120.0)
SUBJECTS_PER_GROUP = 30

MM_DOSE_GROUPS_MG = (10.0, 20.0, 40.0, 80.0)

TRUTH = {"cl": 4.0, "v": 70.0, "v1": 70.0, "ka": 1.0, "q": 4.0, "v2": 50.0, "vmax": 1000.0, "km": 250.0}
OMEGA = 0.3
SIGMA_EXP = 0.2

DESIGNS = {
    # name: (compartments, absorption, infusion duration in h)
    "oral1": (1, "first_order", 0.0),
    "bolus1": (1, "iv", 0.0),
    "infusion1": (1, "iv", 1.0),
    "oral2": (2, "first_order", 0.0),
    "bolus2": (2, "iv", 0.0),
    "infusion2": (2, "iv", 1.0),
    "mm_oral": ("mm", "first_order", 0.0),   # ODE, Michaelis-Menten elimination
}

TOLERANCE = {"typical": 0.05, "omega": 0.20, "sigma": 0.10}
MM_TYPICAL_TOLERANCE = 0.08  # the band for the Michaelis-Menten design

#: Fit options by design. The ODE objective is smooth only to the solver's tolerance, so
#: L-BFGS's own stopping tests within a round (max |gradient| 1e-6, change 1e-10) are never
#: met and a round would run all 200 iterations at the optimum; 20 iterations per round,
#: then ``fit_mle``'s stationarity test (the same as for every design) ends the fit.
FIT_OPTIONS = {"mm_oral": {"max_iters": 20}}


def design_rows(duration: float = 0.0, subset: str = "full", dose_groups_mg=DOSE_GROUPS_MG,
                steady_state: bool = True) -> pd.DataFrame:
    """The NONMEM data set of the design (DV zero): 120 subjects, four dose groups.

    Parameters
    ----------
    duration : float
        Infusion duration in h (0: bolus or oral dose into compartment 1).
    subset : {"full", "sd"}
        ``"sd"``: the single-dose part only (first dose, samples to 72 h).
    dose_groups_mg : tuple of 4 floats
        Dose of each group in mg (amounts are written in µg).
    steady_state : bool
        Whether the 216 h dose is a steady-state dose (SS=1, II=24); else an ordinary one.
    """
    if subset not in ("full", "sd"):
        raise ValueError(f"subset must be 'full' or 'sd', got {subset!r}")
    if len(dose_groups_mg) != 4:
        raise ValueError(f"dose_groups_mg: four dose groups, got {dose_groups_mg!r}")
    rows = []
    for g, mg in enumerate(dose_groups_mg):
        amt = 1000.0 * mg
        rate = amt / duration if duration > 0 else 0.0
        for j in range(SUBJECTS_PER_GROUP):
            base = {"ID": g * SUBJECTS_PER_GROUP + j + 1, "DV": 0.0, "CMT": 1, "DOSE": mg}
            dose = {**base, "AMT": amt, "RATE": rate, "EVID": 1, "SS": 0, "II": 0.0}
            obs = {**base, "AMT": 0.0, "RATE": 0.0, "EVID": 0, "SS": 0, "II": 0.0}
            rows.append({**dose, "TIME": 0.0})
            rows += [{**obs, "TIME": float(t)} for t in SINGLE_DOSE_TIMES[:-1]]
            rows.append({**obs, "TIME": SINGLE_DOSE_TIMES[-1] - TROUGH_OFFSET})  # the first trough
            if subset == "full":
                for t in DAILY_DOSES:
                    if t > SINGLE_DOSE_TIMES[-1]:
                        rows.append({**obs, "TIME": t - TROUGH_OFFSET})
                    rows.append({**dose, "TIME": t})
                rows.append({**dose, "TIME": SS_DOSE, **({"SS": 1, "II": 24.0} if steady_state else {})})
                rows += [{**obs, "TIME": SS_DOSE + float(t)} for t in SINGLE_DOSE_TIMES]
    return pd.DataFrame(rows)


def model_for(name: str) -> pk.PopulationModel:
    """The population model of a design: IIV on every parameter, exponential error."""
    n, absorption, _ = DESIGNS[name]
    if n == "mm":
        structure = pk.michaelis_menten(absorption)
    else:
        structure = (pk.OneCompartment(absorption=absorption) if n == 1
                     else pk.TwoCompartment(absorption=absorption))
    return pk.PopulationModel(structure, list(structure.parameters), "exponential")


def truth_for(model: pk.PopulationModel) -> dict:
    """Population parameters of the simulation, by site."""
    params = {p: TRUTH[p] for p in model.parameters}
    return {**params, "omega": [OMEGA] * len(model.random_effects), "sigma_exp": SIGMA_EXP}


def simulated(name: str, seed: int = 0, subset: str = "full"):
    """``(model, data, truth)`` of a design simulated with ``pk.simulate_data``."""
    model = model_for(name)
    mm = DESIGNS[name][0] == "mm"
    design = pk.read_nonmem(design_rows(DESIGNS[name][2], subset,
                                        MM_DOSE_GROUPS_MG if mm else DOSE_GROUPS_MG, steady_state=not mm))
    truth = truth_for(model)
    return model, pk.simulate_data(model, design, truth, seed=seed), truth


def realized_truth(model, data, truth: dict, seed: int) -> dict:
    """The population parameters of the 120 subjects actually simulated: each typical value
    times ``exp(mean eta)``, each omega the SD of the simulated etas, the residual SD that of
    the simulated errors. The etas and errors are redrawn as ``pk.simulate_data`` draws them
    (its generator, seeded with ``seed``: ``z [S, P]`` then ``eps [S, T]``).

    With omega 0.3 and 120 subjects a typical value's sampling SD is ``0.3 / sqrt(120)``
    = 2.7%, so "within 5% of the truth" is a 1.8-SD band that an exact estimator misses on
    about one design parameter in fifteen; against the realized values the tolerance
    measures the estimator alone."""
    S, T = data.obs_dv.shape
    gen = torch.Generator().manual_seed(int(seed))
    P = len(model.random_effects)
    z = torch.randn(S, P, generator=gen, dtype=torch.float64)
    eps = torch.randn(S, T, generator=gen, dtype=torch.float64)
    eta = z * torch.tensor(truth["omega"], dtype=torch.float64)
    out = dict(truth)
    for j, p in enumerate(model.random_effects):
        out[p] = truth[p] * float(eta[:, j].mean().exp())
    out["omega"] = [float(eta[:, j].std()) for j in range(P)]
    observed = model.observation_mask(data)
    out["sigma_exp"] = truth["sigma_exp"] * float(eps[observed].std())
    return out


def relative_errors(fit, model, truth) -> dict:
    """``estimate / truth - 1`` by row name (typical values, ``omega_<p>``, ``sigma_exp``)."""
    out = {p: float(fit.estimates[p]) / truth[p] - 1 for p in model.parameters}
    for j, p in enumerate(model.random_effects):
        out[f"omega_{p}"] = float(fit.estimates["omega"][j]) / truth["omega"][j] - 1
    out["sigma_exp"] = float(fit.estimates["sigma_exp"]) / truth["sigma_exp"] - 1
    return out


def failures(errors: dict, model) -> list:
    """Rows outside the issue's tolerances (typical 5%, 8% for the Michaelis-Menten
    design; omega 20%, residual SD 10%)."""
    typical = MM_TYPICAL_TOLERANCE if "vmax" in model.parameters else TOLERANCE["typical"]
    bad = []
    for key, err in errors.items():
        tol = (TOLERANCE["omega"] if key.startswith("omega_") else
               TOLERANCE["sigma"] if key == "sigma_exp" else typical)
        if not abs(err) <= tol:
            bad.append(f"{key} {100 * err:+.1f}% (tolerance {100 * tol:.0f}%)")
    return bad


def run_one(name: str, seed: int = 0, subset: str = "full", threads=None) -> dict:
    """Simulate and fit one design by FOCE-I (with SEs); a result row."""
    model, data, truth = simulated(name, seed, subset)
    realized = realized_truth(model, data, truth, seed)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        fit = model.fit(data, "mle", threads=threads, **FIT_OPTIONS.get(name, {}))
    wall = time.perf_counter() - start
    errors = relative_errors(fit, model, truth)
    versus_sample = relative_errors(fit, model, realized)
    timing = fit.info.get("timing", {})
    return {"design": name, "subset": subset, "seed": seed, "wall_s": wall,
            "inner_s": timing.get("inner_s", float("nan")),
            "outer_s": timing.get("outer_s", float("nan")),
            "se_s": timing.get("standard_errors_s", float("nan")),
            "cpu_s": timing.get("cpu_s", float("nan")),
            "evaluations": fit.info["evaluations"], "threads": fit.info.get("threads"),
            "ofv": fit.ofv, "converged": fit.converged, "se_ok": fit.covariance is not None,
            "flip_flop": len(fit.info.get("flip_flop_subjects", ())),
            "warnings": len(caught), "fail": "; ".join(failures(errors, model)) or "",
            "fail_vs_sample": "; ".join(failures(versus_sample, model)) or "",
            **{f"err_{k}": v for k, v in errors.items()},
            **{f"sample_{k}": v for k, v in versus_sample.items()}}


def _child(args):
    name, seed, threads = args
    return run_one(name, seed, threads=threads)


def parallel_run(name: str, n: int = 2, seed: int = 0) -> list:
    """``n`` fits of a design at once in ``n`` processes (threads chosen per fit)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(n) as pool:
        return pool.map(_child, [(name, seed + k, None) for k in range(n)])


def verdict(fail: str) -> str:
    """``PASS``, or ``FAIL:`` and the rows outside the tolerances."""
    return "PASS" if not fail else "FAIL: " + fail


def add_design_arguments(parser: argparse.ArgumentParser) -> None:
    """``--designs``, ``--seeds`` and ``--subsets`` (shared with ``pk_validation_saem.py``)."""
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--subsets", nargs="+", default=["full"], choices=["full", "sd"])


def format_row(r: dict) -> str:
    errs = " ".join(f"{k[4:]} {100 * v:+.1f}%" for k, v in r.items() if k.startswith("err_"))
    sample = " ".join(f"{k[7:]} {100 * v:+.1f}%" for k, v in r.items() if k.startswith("sample_"))
    return (f"{r['design']:>10} {r['subset']:>4} seed {r['seed']}  wall {r['wall_s']:6.1f} s, cpu {r['cpu_s']:6.1f} s "
            f"(inner {r['inner_s']:5.1f}, outer {r['outer_s']:5.1f}, SE {r['se_s']:5.1f}; "
            f"{r['evaluations']} evals, {r['threads']} thr)  OFV {r['ofv']:.2f}  "
            f"flip-flop {r['flip_flop']}\n    vs truth:  {errs}  {verdict(r['fail'])}"
            f"\n    vs sample: {sample}  {verdict(r['fail_vs_sample'])}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_design_arguments(parser)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--parallel", type=int, default=0,
                        help="also run this many oral1 fits at once in separate processes")
    args = parser.parse_args(argv)
    print(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, cores {os.cpu_count()}, "
          f"affinity {len(os.sched_getaffinity(0))}, load {os.getloadavg()[0]:.2f}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    rows = []
    for name in args.designs:
        for subset in args.subsets:
            for seed in args.seeds:
                r = run_one(name, seed, subset, args.threads)
                rows.append(r)
                print(format_row(r), flush=True)
    if args.parallel:
        start = time.perf_counter()
        par = parallel_run("oral1", args.parallel)
        total = time.perf_counter() - start
        for r in par:
            print("parallel", format_row(r), flush=True)
        print(f"# {args.parallel} processes at once: {total:.1f} s in all; load {os.getloadavg()[0]:.2f}")
    table = pd.DataFrame(rows)
    print(table.drop(columns=["fail", "fail_vs_sample"]).round(3).to_string(index=False))
    return table


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()

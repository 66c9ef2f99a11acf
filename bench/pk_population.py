"""Population PK fit times: genprog.pk's methods on theo_sd and on a simulated population,
with raw Pyro SVI and NUTS on the same model function as peers.

Data sets:

* ``theo_sd``: the bundled theophylline data (12 subjects, 11 observations each);
* ``sim-N``: N subjects (1000; 100 with ``--quick``) with 10 observations each after one
  oral dose, simulated from a one-compartment model (``pk.simulate_data``).

Model: one compartment, first-order absorption, log-normal IIV on ka, cl, v (diagonal
omega), combined (theo_sd) or proportional (simulated) residual error.

Runs, one after another in one process:

==============  ===========================================================================
``mle``         ``model.fit(data, "mle")``: Laplace/FOCE-I population ML with FD-Hessian SEs
``map``         ``model(data).fit("map")``: joint MAP of population parameters and etas
``vi``          ``model(data).fit("vi", ...)``: mean-field normal guide
``nuts``        ``model(data).fit("nuts", ...)``: genprog's batched NUTS (short settings)
``pyro-svi``    raw ``pyro.infer.SVI`` with ``AutoNormal`` and ``Adam`` on the same model
                function, for as many steps as genprog's VI took
``pyro-nuts``   raw ``pyro.infer.MCMC(NUTS(...))``, one chain, same warmup/draws
                (theo_sd only, and not with ``--quick``: minutes even at 30 + 30)
==============  ===========================================================================

Each row reports wall and process-CPU seconds, the machine's 1-minute load average at the
end, and the estimate (or posterior mean) of the typical clearance. Printed as a markdown
table; ``bench/README.md`` keeps measured tables.

Usage (from the repository root)::

    python bench/pk_population.py            # theo_sd + sim-1000, NUTS 2 chains x (200 + 200)
    python bench/pk_population.py --quick    # theo_sd + sim-100, NUTS 1 chain x (30 + 30)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
import traceback
import warnings

import numpy as np
import pandas as pd
import pyro
import torch

from genprog import pk


def _simulated(n_subjects: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    times = (0.25, 0.5, 1, 2, 3, 4, 6, 8, 12, 24)
    rows = []
    for i in range(1, n_subjects + 1):
        rows.append({"ID": i, "TIME": 0.0, "AMT": 320.0, "EVID": 1, "DV": 0.0})
        for t in times:
            rows.append({"ID": i, "TIME": t * float(rng.uniform(0.9, 1.1)), "AMT": 0.0, "EVID": 0,
                         "DV": 0.0})
    design = pk.read_nonmem(pd.DataFrame(rows))
    model = pk.PopulationModel(pk.OneCompartment(), ["ka", "cl", "v"], "proportional")
    truth = {"cl": 2.8, "v": 32.0, "ka": 1.5, "omega": [0.5, 0.25, 0.15], "sigma_prop": 0.12}
    return model, pk.simulate_data(model, design, truth, seed=seed), truth


def _cl(fit) -> float:
    if hasattr(fit, "estimates"):
        return float(fit.estimates["cl"])
    return float(fit.draws["cl"].double().mean())


def _pyro_model(model, data):
    """The PopulationModel's Pyro program with the observations conditioned, as
    ``model(data)`` builds it."""
    priors = model.priors_for(data)
    observed = model.observation_mask(data) & ~data.obs_blq
    dv = torch.where(observed, data.obs_dv, torch.zeros_like(data.obs_dv))

    def program():
        return model.program(data, dv, priors)

    return program


def _pyro_svi(model, data, steps: int, seed: int):
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    program = _pyro_model(model, data)
    guide = AutoNormal(program)
    svi = SVI(program, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    for _ in range(steps):
        svi.step()
    return float(guide.median()["cl"])


def _pyro_nuts(model, data, warmup: int, draws: int, seed: int):
    from pyro.infer import MCMC, NUTS

    pyro.set_rng_seed(seed)
    mcmc = MCMC(NUTS(_pyro_model(model, data), jit_compile=False), warmup_steps=warmup,
                num_samples=draws, num_chains=1, disable_progbar=True)
    mcmc.run()
    return float(mcmc.get_samples()["cl"].mean())


def _timed(rows: list, name: str, data, method: str, fn) -> None:
    """Run ``fn() -> cl`` and append one result row (a failure is recorded, not raised)."""
    t0, c0 = time.perf_counter(), time.process_time()
    note = ""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = fn()
        note = ", ".join(sorted({w.category.__name__ for w in caught
                                 if not issubclass(w.category, (DeprecationWarning, FutureWarning))}))
    except Exception as e:  # noqa: BLE001 -- the table says what failed
        value = float("nan")
        note = f"failed: {type(e).__name__}: {str(e)[:80]}"
        traceback.print_exc()
    rows.append({"data": name, "subjects": data.n_subjects, "obs": data.n_observations,
                 "method": method, "wall_s": time.perf_counter() - t0,
                 "cpu_s": time.process_time() - c0, "load": os.getloadavg()[0],
                 "cl": value, "notes": note})
    print(f"{name:10s} {method:10s} wall {rows[-1]['wall_s']:8.2f} s  cl {value:.4g}  {note}", flush=True)


def _bench_set(rows: list, name: str, model, data, args) -> None:
    vi_steps = {}

    def vi():
        fit = model(data).fit("vi", draws=200, seed=args.seed, max_steps=args.vi_steps, progress=False)
        vi_steps["n"] = int(fit.info.get("num_steps", args.vi_steps))
        return _cl(fit)

    _timed(rows, name, data, "mle", lambda: _cl(model.fit(data, "mle", seed=args.seed)))
    _timed(rows, name, data, "map", lambda: _cl(model(data).fit("map", seed=args.seed)))
    _timed(rows, name, data, "vi", vi)
    _timed(rows, name, data, "nuts", lambda: _cl(model(data).fit(
        "nuts", chains=args.chains, warmup=args.warmup, draws=args.draws, seed=args.seed,
        progress=False)))
    _timed(rows, name, data, "pyro-svi",
           lambda: _pyro_svi(model, data, vi_steps.get("n", args.vi_steps), args.seed))
    if data.n_subjects <= 50 and not args.quick:
        _timed(rows, name, data, "pyro-nuts",
               lambda: _pyro_nuts(model, data, args.warmup, args.draws, args.seed))


def run(args) -> pd.DataFrame:
    theo = pk.read_nonmem(pk.dataset_path("theo_sd"))
    theo_model = pk.PopulationModel(pk.OneCompartment(), ["ka", "cl", "v"], "combined")
    sim_model, sim, truth = _simulated(args.subjects, args.seed)
    rows: list = []
    _bench_set(rows, "theo_sd", theo_model, theo, args)
    _bench_set(rows, f"sim-{args.subjects}", sim_model, sim, args)
    table = pd.DataFrame(rows)
    table.attrs["truth_cl_sim"] = truth["cl"]
    return table


def _markdown(table: pd.DataFrame) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--subjects", type=int, default=None, help="simulated subjects (1000)")
    p.add_argument("--chains", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--draws", type=int, default=None)
    p.add_argument("--vi-steps", type=int, default=None, dest="vi_steps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quick = {"subjects": 100, "chains": 1, "warmup": 30, "draws": 30, "vi_steps": 300}
    full = {"subjects": 1000, "chains": 2, "warmup": 200, "draws": 200, "vi_steps": 5000}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    print(f"# PK population bench, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}, torch {torch.__version__}, pyro {pyro.__version__}, "
          f"{torch.get_num_threads()} torch threads; NUTS {args.chains} chain(s) x "
          f"({args.warmup} + {args.draws}), VI at most {args.vi_steps} steps", flush=True)
    table = run(args)
    print()
    print(_markdown(table))
    print(f"\n(true typical cl of the simulated population: {table.attrs['truth_cl_sim']})")


if __name__ == "__main__":
    main()

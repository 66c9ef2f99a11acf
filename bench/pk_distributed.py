"""Subject-sharded FOCE-I and SAEM (``genprog.pk.distributed``): 1 vs 2 gloo processes on
simulated populations of 10^3 to 10^5 subjects; wall and CPU time per objective evaluation
(FOCE-I) or per iteration (SAEM), peak memory per process, projected cost per subject.

The population: one-compartment oral, IIV on CL, V and ka (omega 0.3), a power effect of
weight on CL, proportional error 0.15; one 100 mg dose and 6 samples (0.5-24 h) per
subject, simulated with ``pk.simulate_data``.

Each case runs in fresh processes (``torch.multiprocessing.spawn``, ``gloo`` rendezvous
through a FileStore in a temporary directory, a barrier before ``destroy_process_group``,
one torch thread per process). Every rank builds the whole design and data set (the same
seed), keeps its block of subjects (``shard_dataset``), and runs ``fit_mle_distributed``
(``--methods mle``) or ``fit_saem_distributed`` (``--methods saem``).

FOCE-I: by default the fit is cut after ``--evals`` objective evaluations (``max_iters``,
one L-BFGS round, no standard errors): the cost of one evaluation (inner EBE solves from
two starts, the Laplace objective, its gradient, the all-gather) times the ~25-40
evaluations a full fit takes is the projected fit time. ``--full`` runs whole fits with
standard errors.

SAEM: a short run of ``--saem-iters`` iterations (half exploration, half averaging, after
SAEM's 5 burn-in sweeps; one chain per subject at these sizes; no standard errors), then
what every SAEM fit does once at the end (50 sweeps for the conditional moments,
``--is-draws`` importance-sampling draws per subject for -2LL, and the EBEs and FOCE-I
objective at the estimate). The per-iteration cost (``timings``: simulation and M-step)
times the 300 + 200 iterations of a default fit, plus the end cost, is the projected fit
time.

Memory: ``peak_fit_MB`` is the process's peak resident set during the fit alone (Linux
``VmHWM`` after resetting it through ``/proc/self/clear_refs``), ``maxrss_MB`` the peak over
the process's life (``resource.getrusage``, data simulation included), ``base_MB`` the
resident set before the fit (interpreter, torch, the rank's data).

Reproduce::

    python bench/pk_distributed.py                       # FOCE-I, 1,000 and 10,000 subjects, 1 and 2 processes
    python bench/pk_distributed.py --methods saem        # SAEM, the same sizes
    python bench/pk_distributed.py --sizes 100000 --worlds 2 --evals 1
    python bench/pk_distributed.py --full --sizes 1000   # whole FOCE-I fits with SEs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import warnings

import numpy as np
import pandas as pd
import torch
import torch.multiprocessing as mp

from genprog import pk
from genprog.pk.distributed import fit_mle_distributed, fit_saem_distributed
from genprog.pk.sharding import shard_dataset

MODEL = pk.PopulationModel(pk.OneCompartment(), ["ka", "cl", "v"], "proportional", covariates={"cl": "WT"})
TRUTH = {"cl": 4.0, "v": 70.0, "ka": 1.0, "omega": [0.3, 0.3, 0.3], "sigma_prop": 0.15, "beta_cl_wt": 0.75}
TIMES = (0.5, 1.0, 2.0, 4.0, 8.0, 24.0)


def design(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    wt = np.round(rng.uniform(50, 100, n), 1)
    ids = np.repeat(np.arange(1, n + 1), 1 + len(TIMES))
    time_ = np.tile(np.array((0.0, *TIMES)), n)
    dose = np.tile(np.array([1] + [0] * len(TIMES)), n)
    return pd.DataFrame({"ID": ids, "TIME": time_, "AMT": 100.0 * dose, "DV": 0.0, "EVID": dose,
                         "MDV": dose, "WT": np.repeat(wt, 1 + len(TIMES))})


def simulated(n: int) -> pk.Dataset:
    d = pk.read_nonmem(design(n)).to(dtype=torch.float64)
    return pk.simulate_data(MODEL, d, TRUTH, seed=1)


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _worker(rank, world, store, method, n, options, out):
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        data = simulated(n)
        shard = shard_dataset(data, rank, world)
        del data
        base = _rss_mb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM: the peak below is the fit's
        except OSError:
            pass
        tdist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a cut fit is unconverged by design
            if method == "mle":
                fit = fit_mle_distributed(MODEL, shard, **options)
            else:
                fit = fit_saem_distributed(MODEL, shard, **options)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        record = {"rank": rank, "world": world, "n": n, "method": method,
                  "subjects_here": shard.n_subjects, "wall_s": wall, "cpu_s": cpu, "base_MB": base,
                  "peak_fit_MB": _rss_mb("VmHWM"),
                  "maxrss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "ofv": fit.ofv, "converged": fit.converged, "load": os.getloadavg()[0]}
        if method == "mle":
            record.update(evaluations=fit.info["distributed"]["evaluations"], inner_s=fit.info["timing"]["inner_s"])
        else:
            iters = sum(fit.info["iterations"])
            record.update(evaluations=iters, timings=fit.info["timings"])
        with open(f"{out}.{rank}", "w") as f:
            json.dump(record, f)
        tdist.barrier()  # nobody tears gloo down while a peer is still in a collective
    finally:
        tdist.destroy_process_group()


def run_case(method: str, n: int, world: int, options: dict) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), method, n, options, out),
                 nprocs=world, join=True)
        records = []
        for r in range(world):
            with open(f"{out}.{r}") as f:
                records.append(json.load(f))
    return records


def saem_row(records: list) -> dict:
    """Per-iteration cost (simulation + M-step, the busiest process) and the once-per-fit
    end cost (conditional moments, importance sampling, EBEs and FOCE-I at the estimate)."""
    r0 = records[0]
    iters = r0["evaluations"] + 5  # the 5 burn-in sweeps are simulation iterations too
    per_iter = max((r["timings"]["simulation"] + r["timings"]["m_step"]) for r in records) / iters
    wall = max(r["wall_s"] for r in records)
    end = wall - per_iter * iters
    projected = per_iter * 505 + end
    return {"method": "saem", "subjects": r0["n"], "processes": r0["world"], "iterations": r0["evaluations"],
            "wall_s": round(wall, 1), "cpu_s_busiest": round(max(r["cpu_s"] for r in records), 1),
            "s_per_iteration": round(per_iter, 3), "end_s": round(end, 1),
            "projected_fit_s": round(projected), "ms_wall_per_subject_fit": round(1e3 * projected / r0["n"], 1),
            "base_MB": round(max(r["base_MB"] for r in records)),
            "peak_fit_MB": round(max(r["peak_fit_MB"] for r in records)),
            "maxrss_MB": round(max(r["maxrss_MB"] for r in records)),
            "load": round(max(r["load"] for r in records), 1), "ofv": round(r0["ofv"], 3)}


def row(records: list) -> dict:
    r0 = records[0]
    wall = max(r["wall_s"] for r in records)
    evals = r0["evaluations"]
    return {"method": "mle", "subjects": r0["n"], "processes": r0["world"], "evaluations": evals,
            "wall_s": round(wall, 1), "wall_s_per_eval": round(wall / evals, 3),
            "cpu_s_per_eval_per_process": round(max(r["cpu_s"] for r in records) / evals, 3),
            "us_cpu_per_subject_eval": round(1e6 * sum(r["cpu_s"] for r in records) / evals / r0["n"], 1),
            "base_MB": round(max(r["base_MB"] for r in records)),
            "peak_fit_MB": round(max(r["peak_fit_MB"] for r in records)),
            "maxrss_MB": round(max(r["maxrss_MB"] for r in records)),
            "load": round(max(r["load"] for r in records), 1),
            "ofv": round(r0["ofv"], 3), "converged": r0["converged"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--evals", type=int, default=3, help="objective evaluations per cut fit")
    parser.add_argument("--full", action="store_true", help="whole FOCE-I fits with standard errors")
    parser.add_argument("--methods", nargs="+", default=["mle"], choices=["mle", "saem"])
    parser.add_argument("--saem-iters", type=int, default=10, help="SAEM iterations of a short run")
    parser.add_argument("--is-draws", type=int, default=100, help="importance-sampling draws per subject")
    parser.add_argument("--json", help="append the rows to this file (JSON lines)")
    args = parser.parse_args(argv)
    rows = []
    mle = {} if args.full else {"max_iters": args.evals, "max_rounds": 1, "standard_errors": False}
    saem = {"exploration": args.saem_iters // 2, "averaging": args.saem_iters - args.saem_iters // 2,
            "importance_draws": args.is_draws, "standard_errors": False}
    for method in args.methods:
        for n in args.sizes:
            for world in args.worlds:
                if method == "mle":
                    r = row(run_case("mle", n, world, mle))
                else:
                    r = saem_row(run_case("saem", n, world, saem))
                rows.append(r)
                print(json.dumps(r), flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(r) + "\n")
    for method in args.methods:
        table = [r for r in rows if r["method"] == method]
        if table:
            keys = list(table[0])
            print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
            for r in table:
                print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)

"""SAEM on the population-PK validation designs (issue 15), beside FOCE-I.

Simulates the designs of :mod:`bench.pk_validation` and fits each by SAEM
(``model.fit(data, "saem")``: the stochastic-approximation phase, the averaging phase,
-2LL by importance sampling with its stderr, SEs), and reports every typical value, omega
and the residual SD against the truth and against the realized sample, with the same
tolerances (typical 5%, omega 20%, residual SD 10%), and the wall/CPU time.

Usage (from the repository root)::

    python bench/pk_validation_saem.py --designs oral1 bolus1 --seeds 0
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
import warnings

import torch

from bench.pk_validation import (
    add_design_arguments,
    failures,
    realized_truth,
    relative_errors,
    simulated,
    verdict,
)
from genprog.errors import ConvergenceWarning


def run_one(name: str, seed: int = 0, subset: str = "full", **saem_options) -> dict:
    """Simulate one design and fit it by SAEM; a result row."""
    model, data, truth = simulated(name, seed, subset)
    realized = realized_truth(model, data, truth, seed)
    start, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        fit = model.fit(data, "saem", seed=seed, **saem_options)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    errors = relative_errors(fit, model, truth)
    versus_sample = relative_errors(fit, model, realized)
    return {"design": name, "subset": subset, "seed": seed, "wall_s": wall, "cpu_s": cpu,
            "minus2ll_is": fit.minus2ll, "minus2ll_focei": fit.info.get("minus2ll_focei", float("nan")),
            "minus2ll_is_stderr": fit.info.get("minus2ll_stderr", float("nan")),
            "se_ok": fit.covariance is not None, "warnings": len(caught),
            "fail": "; ".join(failures(errors, model)),
            "fail_vs_sample": "; ".join(failures(versus_sample, model)),
            "errors": errors, "versus_sample": versus_sample}


def format_row(r: dict) -> str:
    def show(d):
        return " ".join(f"{k} {100 * v:+.1f}%" for k, v in d.items())
    return (f"{r['design']:>10} {r['subset']:>4} seed {r['seed']}  wall {r['wall_s']:6.1f} s, "
            f"cpu {r['cpu_s']:6.1f} s  -2LL(IS) {r['minus2ll_is']:.2f} +- {r['minus2ll_is_stderr']:.2f}"
            f"  (FOCE-I {r['minus2ll_focei']:.2f})  SEs {'ok' if r['se_ok'] else 'none'}  warnings {r['warnings']}\n"
            f"    vs truth:  {show(r['errors'])}  {verdict(r['fail'])}\n"
            f"    vs sample: {show(r['versus_sample'])}  {verdict(r['fail_vs_sample'])}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_design_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# SAEM validation, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    for name in args.designs:
        for subset in args.subsets:
            for seed in args.seeds:
                print(format_row(run_one(name, seed, subset)), flush=True)


if __name__ == "__main__":
    main()

"""theo_sd population PK: genprog NUTS (compiled / uncompiled), genprog ChEES, NumPyro
NUTS and raw Pyro NUTS (jit), side by side.

The model: one-compartment, first-order absorption, log-normal IIV on ka, CL, V
(diagonal omega), additive residual error, 12 subjects (``genprog/pk/datasets/theo_sd.csv``),
built by ``genprog.pk.PopulationModel``; NumPyro gets the same model written by hand
with the same priors (read from ``PopulationModel.priors_for``).

Runs (same machine, one process, one after another):

a. ``genprog NUTS``: ``model(data).fit("nuts")``, compiled potential (the default);
b. ``genprog ChEES``: ``fit("chees")`` with many chains and fewer draws each;
c. ``genprog NUTS, compile=False``;
d. ``NumPyro NUTS``: ``chain_method="parallel"`` over ``numpyro.set_host_device_count``
   CPU devices when the machine has more than one core, else ``"vectorized"``;
e. ``raw Pyro NUTS, jit_compile=True``: one chain after another.

Metrics: wall seconds (compilation included), minimum bulk ESS over the population
parameters (typical values ``cl``, ``v``, ``ka``, the three ``omega`` and
``sigma_add``), ESS per wall second, maximum R-hat over the same, divergences, and the
ratios of each run's ESS/s to raw Pyro's and NumPyro's. NumPyro/JAX are imported only
inside :func:`run_numpyro`.

Usage (from the repository root)::

    python bench/theo_sd.py                    # 4 chains x (1000 warmup + 1000 draws)
    python bench/theo_sd.py --quick            # smoke run (100 + 100)
    python bench/theo_sd.py --per-eval         # ms per potential+grad call only
    python bench/theo_sd.py --per-step         # NUTS ms per leapfrog step, with its breakdown
    python bench/theo_sd.py --chees-threads    # 64-chain ChEES under torch's default threads
    python bench/theo_sd.py --chains 1,16,256,4096 --device cuda   # ChEES chains sweep
"""

from __future__ import annotations

import argparse
import math
import os
import time
import traceback
import warnings
from dataclasses import dataclass

import arviz as az
import numpy as np
import pyro
import torch

from genprog import pk

PARAMS = ("cl", "v", "ka", "omega", "sigma_add")
DATA = os.path.join(os.path.dirname(pk.__file__), "datasets", "theo_sd.csv")


def population():
    data = pk.read_nonmem(DATA)
    pop = pk.PopulationModel(structure=pk.OneCompartment(absorption="first_order"),
                             random_effects=["ka", "cl", "v"], error="additive")
    return pop, data


@dataclass(frozen=True)
class RunResult:
    """One run: ``wall_time_s`` includes compilation; ``min_ess_bulk`` / ``max_rhat`` over
    :data:`PARAMS` (ArviZ); ``means`` maps parameter -> posterior mean (first element)."""

    name: str
    chains: int = 0
    draws: int = 0
    wall_time_s: float = math.nan
    min_ess_bulk: float = math.nan
    max_rhat: float = math.nan
    divergences: int | None = None
    means: dict | None = None
    error: str | None = None

    @property
    def ess_per_s(self) -> float:
        return self.min_ess_bulk / self.wall_time_s


def _diagnose(draws: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = az.convert_to_dataset({k: np.asarray(draws[k], dtype=np.float64) for k in PARAMS})
        ess, rhat = az.ess(ds, method="bulk"), az.rhat(ds)
    min_ess = min(float(np.min(ess[k].values)) for k in PARAMS)
    max_rhat = max(float(np.max(rhat[k].values)) for k in PARAMS)
    means = {k: float(np.asarray(draws[k]).mean(axis=(0, 1)).reshape(-1)[0]) for k in PARAMS}
    return min_ess, max_rhat, means


def run_genprog(method, chains, warmup, draws, seed, device="cpu", **options) -> RunResult:
    compile_opt = options.get("compile", True)
    name = f"genprog {method.upper() if method != 'chees' else 'ChEES'}" + (
        "" if compile_opt is True else f", compile={compile_opt}")
    try:
        pop, data = population()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            model = pop(data)
            if device != "cpu":
                model = model.to(device)
            fit = model.fit(method, chains=chains, warmup=warmup, draws=draws, seed=seed,
                            progress=False, **options)
            wall = time.perf_counter() - t
    except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
        return RunResult(name, chains, draws, error=f"{type(e).__name__}: {e}")
    d = {k: fit.draws[k].detach().cpu().numpy() for k in PARAMS}
    min_ess, max_rhat, means = _diagnose(d)
    return RunResult(name, chains, draws, wall, min_ess, max_rhat,
                     int(np.asarray(fit.sample_stats["diverging"]).sum()), means)


def run_pyro_jit(chains, warmup, draws, seed) -> RunResult:
    from pyro.infer import MCMC, NUTS
    from pyro.infer.autoguide.initialization import init_to_median

    name = "raw Pyro NUTS, jit_compile=True"
    try:
        pop, data = population()
        model = pop(data)
        runs = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            for c in range(chains):
                pyro.set_rng_seed(seed + c)
                kernel = NUTS(model.program, jit_compile=True, ignore_jit_warnings=True,
                              max_plate_nesting=2, init_strategy=init_to_median)
                mcmc = MCMC(kernel, num_samples=draws, warmup_steps=warmup, num_chains=1,
                            disable_progbar=True)
                mcmc.run(*model.args, **model.kwargs)
                runs.append(mcmc)
            wall = time.perf_counter() - t
    except Exception as e:  # noqa: BLE001
        return RunResult(name, chains, draws, error=f"{type(e).__name__}: {e}\n"
                         + traceback.format_exc(limit=-3))
    d = {k: np.stack([m.get_samples()[k].reshape(draws, -1).numpy() for m in runs])
         for k in PARAMS}
    div = sum(len(m.diagnostics()["divergences"]["chain 0"]) for m in runs)
    return RunResult(name, chains, draws, wall, *_diagnose(d)[:2], div, _diagnose(d)[2])


def run_numpyro(chains, warmup, draws, seed) -> RunResult:
    """The same model in NumPyro (``bench/numpyro_models.py``, whose log density equals
    genprog's: checked in ``bench/pk_population.py``), initialised at the prior median as
    genprog is; ``chain_method`` parallel over ``chains`` host devices, and vectorized."""
    name = "NumPyro NUTS"
    try:
        import numpyro

        numpyro.set_host_device_count(max(chains, 1))
        import jax
        from numpyro.infer import MCMC, NUTS, init_to_median

        try:
            from numpyro_models import one_compartment_oral
        except ImportError:
            from bench.numpyro_models import one_compartment_oral

        pop, data = population()
        model = one_compartment_oral(pop, data)

        best = None
        for method in ("parallel", "vectorized"):
            t = time.perf_counter()
            mcmc = MCMC(NUTS(model, init_strategy=init_to_median), num_warmup=warmup,
                        num_samples=draws, num_chains=chains, chain_method=method,
                        progress_bar=False)
            mcmc.run(jax.random.PRNGKey(seed))
            wall = time.perf_counter() - t
            s = mcmc.get_samples(group_by_chain=True)
            d = {k: np.asarray(s[k]) for k in PARAMS}
            div = int(np.asarray(mcmc.get_extra_fields(group_by_chain=True)["diverging"]).sum())
            r = RunResult(f"{name} ({method})", chains, draws, wall, *_diagnose(d)[:2], div,
                          _diagnose(d)[2])
            if best is None or r.ess_per_s > best.ess_per_s:
                best = r
        return best
    except Exception as e:  # noqa: BLE001
        return RunResult(name, chains, draws, error=f"{type(e).__name__}: {e}")


def per_eval(chain_counts=(4, 256), repeats=50, device="cpu"):
    """Milliseconds per potential+gradient call for all chains: eager vs compiled."""
    from genprog.infer.compiled import CompiledPotential

    pop, data = population()
    model = pop(data)
    if device != "cpu":
        model = model.to(device)
    density = model.density()
    rows = []
    for n in chain_counts:
        z = density.sample_prior(101, torch.Generator(device=device).manual_seed(0)).median(0).values
        z = z + 0.1 * torch.randn(n, density.dim, generator=torch.Generator(device=device)
                                  .manual_seed(1), device=z.device, dtype=z.dtype)
        out = {"chains": n}
        for label, fn in (("eager", density.potential_and_grad),
                          ("fx", CompiledPotential(density, "fx")),
                          ("jit", CompiledPotential(density, "jit"))):
            t = time.perf_counter()
            fn(z)
            out[f"{label} first call s"] = time.perf_counter() - t
            for _ in range(3):
                fn(z)
            if device != "cpu":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(repeats):
                fn(z)
            if device != "cpu":
                torch.cuda.synchronize()
            out[f"{label} ms"] = 1e3 * (time.perf_counter() - t) / repeats
        rows.append(out)
    return rows


def per_step(chains=4, warmup=150, draws=150, repeats=3, seed=0, dense_mass=False,
             compile=True):
    """NUTS cost per leapfrog step on theo_sd (compiled potential, float32): wall and CPU
    (``time.process_time``) milliseconds per batched potential call of a whole
    ``sample_nuts`` run, and the potential+gradient call alone, each the median of
    ``repeats`` runs; the difference is the tree building (bookkeeping and host syncs)."""
    import statistics

    from genprog.infer.compiled import compile_potential
    from genprog.infer.init import initial_points
    from genprog.infer.nuts import sample_nuts

    pop, data = population()
    density = pop(data).density()
    g = torch.Generator().manual_seed(seed)
    z0 = initial_points(density, chains, "median", g)
    pg = compile_potential(density, compile)
    pg(z0)  # record once, outside the timings
    opts = {"dense_mass": True} if dense_mass else {}
    walls, cpus, evals = [], [], 0
    for r in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        res = sample_nuts(pg, z0, warmup=warmup, draws=draws,
                          generator=torch.Generator().manual_seed(seed + r), **opts)
        walls.append((time.perf_counter() - t) / res.num_grad_evals)
        cpus.append((time.process_time() - c) / res.num_grad_evals)
        evals = res.num_grad_evals
    calls, ccalls = [], []
    z = res.samples[:, -1].contiguous()
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        for _ in range(200):
            pg(z)
        calls.append((time.perf_counter() - t) / 200)
        ccalls.append((time.process_time() - c) / 200)
    ms = 1e3
    return {"chains": chains, "compile": compile, "grad_evals": evals,
            "wall ms/step": ms * statistics.median(walls),
            "cpu ms/step": ms * statistics.median(cpus),
            "wall ms/potential": ms * statistics.median(calls),
            "cpu ms/potential": ms * statistics.median(ccalls),
            "cpu ms/step outside potential": ms * (statistics.median(cpus)
                                                   - statistics.median(ccalls))}


def chees_threads(chains=64, warmup=100, draws=50, seed=0):
    """Wall and CPU seconds of a short ``sample_chees`` run on theo_sd with torch's thread
    count as the process found it (``torch.get_num_threads()``; the samplers choose their
    own inside the run since issue 14), to run next to competing processes."""
    from genprog.infer.chees import sample_chees
    from genprog.infer.compiled import compile_potential
    from genprog.infer.init import initial_points

    pop, data = population()
    density = pop(data).density()
    z0 = initial_points(density, chains, "median", torch.Generator().manual_seed(seed))
    pg = compile_potential(density, True)
    pg(z0)
    t, c = time.perf_counter(), time.process_time()
    res = sample_chees(pg, z0, warmup=warmup, draws=draws,
                       generator=torch.Generator().manual_seed(seed))
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return {"torch threads outside": torch.get_num_threads(), "chains": chains,
            "grad_evals": res.num_grad_evals, "wall s": wall, "cpu s": cpu,
            "wall ms/step": 1e3 * wall / res.num_grad_evals,
            "load1": os.getloadavg()[0]}


def _fmt(x, spec):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def table(results, refs) -> str:
    head = ("| run | chains x draws | wall (s) | min bulk ESS | ESS/s | max R-hat | divergences "
            "| cl | v | ka | sigma_add | ESS/s vs raw Pyro | ESS/s vs NumPyro |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if r.error:
            lines.append(f"| {r.name} | failed: {r.error.splitlines()[0][:80]} |")
            continue
        ratios = [_fmt(r.ess_per_s / ref.ess_per_s, ".2f") if ref is not None and not ref.error
                  else "n/a" for ref in refs]
        m = r.means
        lines.append(
            f"| {r.name} | {r.chains} x {r.draws} | {_fmt(r.wall_time_s, '.1f')} "
            f"| {_fmt(r.min_ess_bulk, '.0f')} | {_fmt(r.ess_per_s, '.2f')} "
            f"| {_fmt(r.max_rhat, '.3f')} | {r.divergences} | {m['cl']:.3f} | {m['v']:.2f} "
            f"| {m['ka']:.3f} | {m['sigma_add']:.3f} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chains", default="4",
                   help="NUTS chains, or a comma-separated ChEES chain sweep (e.g. 1,16,256)")
    p.add_argument("--chees-chains", type=int, default=64, help="ChEES chains (fit's default 64)")
    p.add_argument("--chees-warmup", type=int, default=500, help="ChEES warmup (fit's default)")
    p.add_argument("--chees-draws", type=int, default=500, help="ChEES draws (fit's default)")
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="100 warmup + 100 draws (smoke run)")
    p.add_argument("--per-eval", action="store_true", help="only time potential+grad calls")
    p.add_argument("--chees-threads", action="store_true",
                   help="only time a short 64-chain ChEES run at the process's thread count")
    p.add_argument("--per-step", action="store_true",
                   help="only time NUTS per leapfrog step (4 chains x (150 + 150), 3 repeats)")
    p.add_argument("--compile", default="True",
                   help="--per-step: the potential's compile mode (True, inductor, fx, jit)")
    p.add_argument("--skip", default="", help="comma-separated runs to skip: "
                   "nuts,chees,nuts-inductor,chees-inductor,eager,numpyro,pyro")
    a = p.parse_args(argv)
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if a.quick:
        a.warmup, a.draws = 100, 100
        a.chees_warmup, a.chees_draws = 200, 100
    if a.chees_threads:
        print(chees_threads(chains=a.chees_chains, seed=a.seed))
        return None
    if a.per_step:
        print(per_step(chains=int(a.chains.split(",")[0]), seed=a.seed,
                       compile=True if a.compile == "True" else a.compile))
        return None
    if a.per_eval:
        for row in per_eval(device=a.device):
            print(row)
        return None
    counts = [int(c) for c in a.chains.split(",")]
    if len(counts) > 1:  # ChEES chain sweep (e.g. on a GPU)
        print("| chains | draws | wall (s) | min bulk ESS | ESS/s | max R-hat |")
        print("|---|---|---|---|---|---|")
        for c in counts:
            r = run_genprog("chees", max(c, 2), a.warmup, a.draws, a.seed, device=a.device)
            print(f"| {c} | {a.draws} | {_fmt(r.wall_time_s, '.1f')} | {_fmt(r.min_ess_bulk, '.0f')}"
                  f" | {_fmt(r.ess_per_s, '.2f')} | {_fmt(r.max_rhat, '.3f')} |"
                  + (f" failed: {r.error}" if r.error else ""), flush=True)
        return None
    chains, skip = counts[0], set(a.skip.split(","))
    print(f"theo_sd: {chains} chains x ({a.warmup} + {a.draws}); ChEES {a.chees_chains} chains "
          f"x ({a.chees_warmup} + {a.chees_draws}); torch threads {torch.get_num_threads()}",
          flush=True)
    plan = [
        ("nuts", lambda: run_genprog("nuts", chains, a.warmup, a.draws, a.seed, device=a.device)),
        ("chees", lambda: run_genprog("chees", a.chees_chains, a.chees_warmup, a.chees_draws,
                                      a.seed, device=a.device)),
        ("nuts-inductor", lambda: run_genprog("nuts", chains, a.warmup, a.draws, a.seed,
                                              device=a.device, compile="inductor")),
        ("chees-inductor", lambda: run_genprog("chees", a.chees_chains, a.chees_warmup,
                                               a.chees_draws, a.seed, device=a.device,
                                               compile="inductor")),
        ("eager", lambda: run_genprog("nuts", chains, a.warmup, a.draws, a.seed,
                                      device=a.device, compile=False)),
        ("numpyro", lambda: run_numpyro(chains, a.warmup, a.draws, a.seed)),
        ("pyro", lambda: run_pyro_jit(chains, a.warmup, a.draws, a.seed)),
    ]
    results = {}
    for key, run in plan:
        if key in skip:
            continue
        r = run()
        results[key] = r
        print(f"  {r.name}: " + (r.error.splitlines()[0] if r.error
                                 else f"{r.wall_time_s:.1f} s, ESS/s {r.ess_per_s:.2f}"),
              flush=True)
    print()
    print(table(list(results.values()), [results.get("pyro"), results.get("numpyro")]))
    return results


if __name__ == "__main__":
    main()

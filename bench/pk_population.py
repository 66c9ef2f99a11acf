"""Population PK fit times: genprog.pk's methods on theo_sd and on a simulated population,
with raw Pyro and NumPyro as peers on the simulated one.

Data sets:

* ``theo_sd``: the bundled theophylline data (12 subjects, 11 observations each);
* ``sim-N``: N subjects (1000; 100 with ``--quick``) with 10 observations each after one
  oral dose of 320, simulated from a one-compartment model with ``pk.simulate_data``
  (truth: cl 2.8, v 32, ka 1.5, omega (ka, cl, v) = (0.5, 0.25, 0.15), proportional
  error 0.12 or, with ``--error additive``, additive error 0.5).

Model: one compartment, first-order absorption, log-normal IIV on ka, cl, v (diagonal
omega), combined (theo_sd) or proportional/additive (simulated) residual error.

Part 1, fit times (``theo_sd``: all rows; ``sim-N``: ``mle`` and ``map``):

==============  ===========================================================================
``mle``         ``model.fit(data, "mle")``: Laplace/FOCE-I population ML with FD-Hessian SEs
``map``         ``model(data).fit("map")``: joint MAP of population parameters and etas
``vi``          ``model(data).fit("vi", ...)``: mean-field normal guide
``nuts``        ``model(data).fit("nuts", ...)``: genprog's batched NUTS (short settings)
``pyro-svi``    raw ``pyro.infer.SVI`` with ``AutoNormal`` and ``Adam`` on the same model
                function, for as many steps as genprog's VI took
``pyro-nuts``   raw ``pyro.infer.MCMC(NUTS(...))``, one chain, same warmup/draws
                (theo_sd only, and not with ``--quick``)
==============  ===========================================================================

Part 2, peers on ``sim-N`` (the issue-5 table). First :func:`check_log_density` asserts
that the NumPyro model (``bench/numpyro_models.py``) and genprog's have the same log
density at one point in float64, so the runs compare equal models. Then, one after
another in one process:

=====================  ======================================================================
``genprog VI``         ``fit("vi", guide="normal", max_steps=...)`` (stops early when converged)
``NumPyro SVI``        ``AutoNormal`` + ``Trace_ELBO`` + ``Adam(0.02)``, as many steps as
                       genprog's VI took, ``svi.run`` (one jitted loop)
``raw Pyro SVI``       ``AutoNormal`` + ``Trace_ELBO`` + ``Adam(0.02)``, same steps
``genprog NUTS``       ``fit("nuts")``, compiled potential (the default)
``genprog ChEES``      ``fit("chees")``, many chains, short
``NumPyro NUTS``       same chains/warmup/draws as genprog NUTS, ``chain_method="parallel"``
                       over the CPU cores (``"vectorized"`` on one core)
``raw Pyro NUTS``      ``NUTS(jit_compile=True)``, chains one after another, stopped (and
                       marked so) when it exceeds ``--pyro-nuts-budget`` seconds
=====================  ======================================================================

VI guides start at the prior median (genprog's default; ``init_to_median`` for the peers),
and so do the peers' NUTS chains (genprog: median with uniform(-0.5, 0.5) jitter).
Everything runs in float32. Wall times include compilation (genprog's recording, JAX's
tracing, TorchScript). MCMC: ArviZ min bulk ESS and max R-hat over the population
parameters (typical values, omega, residual SDs), ESS per wall second, post-warmup
divergences. VI: final ELBO (mean of the last ``min(200, steps)`` single-particle
estimates, as genprog reports it). Every row gives the posterior means of cl, v, ka (VI:
mean of 1000 guide draws) next to the truth. "speed vs" columns: ESS/s ratio for MCMC
rows (row / reference NUTS), wall-time ratio for VI rows (reference SVI wall / row wall),
so > 1 means the row is faster.

Usage (from the repository root)::

    python bench/pk_population.py            # theo_sd + sim-1000 (see bench/README.md)
    python bench/pk_population.py --quick    # theo_sd + sim-100, short settings
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import time
import traceback
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyro
import torch

from genprog import pk

try:  # as part of the bench package, or run as a script from the repository root
    from .numpyro_models import one_compartment_oral
except ImportError:
    from numpyro_models import one_compartment_oral

TRUTH = {"cl": 2.8, "v": 32.0, "ka": 1.5, "omega": [0.5, 0.25, 0.15]}
SIGMA_TRUTH = {"proportional": {"sigma_prop": 0.12}, "additive": {"sigma_add": 0.5}}


def _simulated(n_subjects: int, seed: int = 0, error: str = "proportional"):
    rng = np.random.default_rng(seed)
    times = (0.25, 0.5, 1, 2, 3, 4, 6, 8, 12, 24)
    rows = []
    for i in range(1, n_subjects + 1):
        rows.append({"ID": i, "TIME": 0.0, "AMT": 320.0, "EVID": 1, "DV": 0.0})
        for t in times:
            rows.append({"ID": i, "TIME": t * float(rng.uniform(0.9, 1.1)), "AMT": 0.0, "EVID": 0,
                         "DV": 0.0})
    design = pk.read_nonmem(pd.DataFrame(rows))
    model = pk.PopulationModel(pk.OneCompartment(), ["ka", "cl", "v"], error)
    truth = {**TRUTH, **SIGMA_TRUTH[error]}
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


def _population_sites(model) -> tuple:
    return ("cl", "v", "ka", "omega", *model.sigma_sites())


# ---------------------------------------------------------------------------- equal models


def check_log_density(model, data, seed: int = 0, rtol: float = 1e-4) -> dict:
    """Assert that the NumPyro twin and genprog's model have the same log density, float64.

    At one point (typical values 10% off the truth, omega and residual SD from the truth,
    ``eta_raw`` standard normal) compares (a) the joint log density of the constrained
    values: genprog's ``Model.log_prob``, the raw Pyro trace of the same program and
    NumPyro's ``log_density``; (b) the potential energy (minus log joint with the
    log-Jacobian) at the unconstrained point: genprog's ``JointDensity.log_joint`` and
    NumPyro's ``potential_energy``. Raises ``AssertionError`` when a relative difference
    exceeds ``rtol``; returns the values and relative differences.
    """
    import jax
    from pyro import poutine

    d64 = data.to(dtype=torch.float64)
    rng = np.random.default_rng(seed)
    S, P = data.n_subjects, len(model.random_effects)
    values = {"cl": 1.1 * TRUTH["cl"], "v": 0.9 * TRUTH["v"], "ka": 1.1 * TRUTH["ka"],
              "omega": np.asarray(TRUTH["omega"][:P]),
              **{s: {"sigma_add": 0.5, "sigma_prop": 0.12}[s] for s in model.sigma_sites()},
              "eta_raw": rng.standard_normal((S, 1, P))}
    t64 = {k: torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in values.items()}
    gmodel = model(d64)
    lp_genprog = float(gmodel.log_prob(**t64))
    trace = poutine.trace(poutine.condition(_pyro_model(model, d64), t64)).get_trace()
    lp_pyro = float(trace.log_prob_sum())
    density = gmodel.density()
    z = density.unconstrain({k: v[None] for k, v in t64.items()})
    u_genprog = -float(density.log_joint(z.double(), jacobian=True)[0])
    with jax.enable_x64(True):
        import jax.numpy as jnp
        from numpyro.infer.util import log_density, potential_energy, unconstrain_fn

        nmodel = one_compartment_oral(model, d64)
        j64 = {k: jnp.asarray(np.asarray(v, dtype=np.float64)) for k, v in values.items()}
        lp_numpyro = float(log_density(nmodel, (), {}, j64)[0])
        u_numpyro = float(potential_energy(nmodel, (), {}, unconstrain_fn(nmodel, (), {}, j64)))
    out = {"log_joint genprog": lp_genprog, "log_joint raw Pyro": lp_pyro,
           "log_joint NumPyro": lp_numpyro, "potential genprog": u_genprog,
           "potential NumPyro": u_numpyro}
    rel = {
        "genprog vs NumPyro (log_joint)": abs(lp_genprog - lp_numpyro) / abs(lp_numpyro),
        "raw Pyro vs NumPyro (log_joint)": abs(lp_pyro - lp_numpyro) / abs(lp_numpyro),
        "genprog vs NumPyro (potential)": abs(u_genprog - u_numpyro) / abs(u_numpyro),
    }
    for k, r in rel.items():
        assert r < rtol, f"check_log_density: {k} differ by {r:.3g} relative (> {rtol}): {out}"
    return {**out, **{f"rel. diff {k}": v for k, v in rel.items()}}


# ---------------------------------------------------------------------------- peer runs


@dataclass(frozen=True)
class PeerResult:
    """One run of the peer table.

    Attributes
    ----------
    name, kind : str
        Run label; ``"mcmc"`` or ``"vi"``.
    settings : str
        Chains x (warmup + draws), or VI steps.
    wall_s, cpu_s, load : float
        Wall and process-CPU seconds of the run (compilation included), 1-minute load
        average at its end.
    min_ess, max_rhat : float
        ArviZ bulk ESS minimum and R-hat maximum over the population parameters (MCMC).
    divergences : int or None
        Post-warmup divergent transitions, all chains (MCMC).
    final_elbo : float
        Mean of the last ``min(200, steps)`` single-particle ELBO estimates (VI).
    means : dict
        Posterior means of ``cl``, ``v``, ``ka``.
    note : str
        Failure, time-budget stop, or other remark.
    """

    name: str
    kind: str
    settings: str = ""
    wall_s: float = math.nan
    cpu_s: float = math.nan
    load: float = math.nan
    min_ess: float = math.nan
    max_rhat: float = math.nan
    divergences: int | None = None
    final_elbo: float = math.nan
    means: dict = field(default_factory=dict)
    note: str = ""

    @property
    def ess_per_s(self) -> float:
        return self.min_ess / self.wall_s


def _diagnose(draws: dict, sites) -> tuple[float, float]:
    """ArviZ (min bulk ESS, max R-hat) over ``sites`` of ``{site: [chains, draws, ...]}``."""
    import arviz as az

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = az.convert_to_dataset({k: np.asarray(draws[k], dtype=np.float64) for k in sites})
        ess, rhat = az.ess(ds, method="bulk"), az.rhat(ds)
    return (min(float(np.min(ess[k].values)) for k in sites),
            max(float(np.max(rhat[k].values)) for k in sites))


def _means(draws: dict) -> dict:
    return {k: float(np.asarray(draws[k], dtype=np.float64).mean()) for k in ("cl", "v", "ka")}


def _final_elbo(losses) -> float:
    tail = np.asarray(losses, dtype=np.float64)[-200:]
    return float(-tail.mean())


class _Clock:
    def __enter__(self):
        self.t, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t, time.process_time() - self.c
        return False


def _guarded(name: str, kind: str, settings: str, fn) -> PeerResult:
    """``fn() -> PeerResult``; a failure becomes a row saying so."""
    t = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = fn()
    except Exception as e:  # noqa: BLE001 -- a benchmark records failures and goes on
        traceback.print_exc()
        r = PeerResult(name, kind, settings, wall_s=time.perf_counter() - t,
                       load=os.getloadavg()[0], note=f"failed: {type(e).__name__}: {str(e)[:100]}")
    line = (f"  {r.name:16s} {r.settings:22s} wall {r.wall_s:8.1f} s  "
            + (f"ESS {r.min_ess:7.1f}  ESS/s {r.ess_per_s:7.3f}" if kind == "mcmc"
               else f"ELBO {r.final_elbo:.6g}")
            + "  " + " ".join(f"{k} {v:.4g}" for k, v in r.means.items()) + f"  {r.note}")
    print(line, flush=True)
    return r


def run_genprog_vi(model, data, steps: int, seed: int) -> PeerResult:
    settings = f"<= {steps} steps"
    with _Clock() as clk:
        fit = model(data).fit("vi", guide="normal", draws=1000, seed=seed, max_steps=steps,
                              progress=False)
    n = int(fit.info["num_steps"])
    d = {k: fit.draws[k].detach().cpu().numpy() for k in ("cl", "v", "ka")}
    note = "" if fit.info["converged"] else "not converged at max_steps"
    return PeerResult("genprog VI", "vi", f"{n} steps", clk.wall, clk.cpu, os.getloadavg()[0],
                      final_elbo=float(fit.info["final_elbo"]), means=_means(d),
                      note=note or (f"converged (of {settings})"))


def run_pyro_svi(model, data, steps: int, seed: int) -> PeerResult:
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal, init_to_median

    pyro.clear_param_store()
    with _Clock() as clk:
        pyro.set_rng_seed(seed)
        program = _pyro_model(model, data)
        guide = AutoNormal(program, init_loc_fn=init_to_median)
        svi = SVI(program, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO(max_plate_nesting=2))
        losses = [svi.step() for _ in range(steps)]
    with torch.no_grad():
        draws = [guide() for _ in range(1000)]
    d = {k: np.array([float(x[k]) for x in draws]) for k in ("cl", "v", "ka")}
    pyro.clear_param_store()
    return PeerResult("raw Pyro SVI", "vi", f"{steps} steps", clk.wall, clk.cpu, os.getloadavg()[0],
                      final_elbo=_final_elbo(losses), means=_means(d))


def run_numpyro_svi(model, data, steps: int, seed: int) -> PeerResult:
    import jax
    import numpyro
    from numpyro.infer import SVI, Trace_ELBO, init_to_median
    from numpyro.infer.autoguide import AutoNormal

    with _Clock() as clk:
        nmodel = one_compartment_oral(model, data)
        guide = AutoNormal(nmodel, init_loc_fn=init_to_median)
        svi = SVI(nmodel, guide, numpyro.optim.Adam(0.02), Trace_ELBO())
        res = svi.run(jax.random.PRNGKey(seed), steps, progress_bar=False)
        jax.block_until_ready(res.losses)
    s = guide.sample_posterior(jax.random.PRNGKey(seed + 1), res.params, sample_shape=(1000,))
    return PeerResult("NumPyro SVI", "vi", f"{steps} steps", clk.wall, clk.cpu, os.getloadavg()[0],
                      final_elbo=_final_elbo(np.asarray(res.losses)),
                      means=_means({k: np.asarray(s[k]) for k in ("cl", "v", "ka")}))


def run_genprog_mcmc(method: str, model, data, chains: int, warmup: int, draws: int,
                     seed: int) -> PeerResult:
    name = "genprog NUTS" if method == "nuts" else "genprog ChEES"
    with _Clock() as clk:
        fit = model(data).fit(method, chains=chains, warmup=warmup, draws=draws, seed=seed,
                              progress=False)
    sites = _population_sites(model)
    d = {k: fit.draws[k].detach().cpu().numpy() for k in sites}
    ess, rhat = _diagnose(d, sites)
    return PeerResult(name, "mcmc", f"{chains} x ({warmup} + {draws})", clk.wall, clk.cpu,
                      os.getloadavg()[0], ess, rhat,
                      int(np.asarray(fit.sample_stats["diverging"]).sum()), means=_means(d))


def run_numpyro_nuts(model, data, chains: int, warmup: int, draws: int, seed: int) -> PeerResult:
    import jax
    from numpyro.infer import MCMC, NUTS, init_to_median

    method = "parallel" if chains > 1 and jax.local_device_count() >= chains else "vectorized"
    with _Clock() as clk:
        nmodel = one_compartment_oral(model, data)
        mcmc = MCMC(NUTS(nmodel, init_strategy=init_to_median), num_warmup=warmup,
                    num_samples=draws, num_chains=chains, chain_method=method, progress_bar=False)
        mcmc.run(jax.random.PRNGKey(seed), extra_fields=("diverging",))
        s = mcmc.get_samples(group_by_chain=True)
        jax.block_until_ready(s)
    sites = _population_sites(model)
    d = {k: np.asarray(s[k]) for k in sites}
    ess, rhat = _diagnose(d, sites)
    div = int(np.asarray(mcmc.get_extra_fields(group_by_chain=True)["diverging"]).sum())
    return PeerResult("NumPyro NUTS", "mcmc", f"{chains} x ({warmup} + {draws})", clk.wall,
                      clk.cpu, os.getloadavg()[0], ess, rhat, div, means=_means(d),
                      note=f"chain_method={method}")


class _OutOfTime(Exception):
    pass


def run_pyro_nuts(model, data, chains: int, warmup: int, draws: int, seed: int,
                  budget_s: float) -> PeerResult:
    """Raw Pyro NUTS (jit), chains one after another; stops at ``budget_s`` seconds."""
    from pyro.infer import MCMC, NUTS
    from pyro.infer.autoguide import init_to_median

    settings = f"{chains} x ({warmup} + {draws})"
    program = _pyro_model(model, data)
    runs, done, t0 = [], {"it": 0}, time.perf_counter()

    def hook(kernel, samples, stage, i):
        done["it"] += 1
        if time.perf_counter() - t0 > budget_s:
            raise _OutOfTime

    with _Clock() as clk:
        try:
            for c in range(chains):
                pyro.set_rng_seed(seed + c)
                kernel = NUTS(program, jit_compile=True, ignore_jit_warnings=True,
                              max_plate_nesting=2, init_strategy=init_to_median)
                mcmc = MCMC(kernel, num_samples=draws, warmup_steps=warmup, num_chains=1,
                            disable_progbar=True, hook_fn=hook)
                mcmc.run()
                runs.append(mcmc)
        except _OutOfTime:
            pass
    if len(runs) < chains:
        total = chains * (warmup + draws)
        return PeerResult("raw Pyro NUTS", "mcmc", settings, clk.wall, clk.cpu, os.getloadavg()[0],
                          note=f"stopped at the {budget_s:.0f} s budget after {done['it']} of "
                               f"{total} iterations (warmup included); no ESS")
    sites = _population_sites(model)
    d = {k: np.stack([m.get_samples()[k].reshape(draws, *m.get_samples()[k].shape[1:]).numpy()
                      for m in runs]) for k in sites}
    d = {k: v.reshape(chains, draws, -1) if v.ndim > 2 else v for k, v in d.items()}
    ess, rhat = _diagnose(d, sites)
    div = sum(len(m.diagnostics()["divergences"]["chain 0"]) for m in runs)
    return PeerResult("raw Pyro NUTS", "mcmc", settings, clk.wall, clk.cpu, os.getloadavg()[0],
                      ess, rhat, div, means=_means(d), note="jit_compile=True, chains in turn")


def run_peers(model, data, args) -> list[PeerResult]:
    skip = set(args.skip)
    out: list[PeerResult] = []
    steps = {"n": args.vi_steps}

    def add(key, name, kind, settings, fn):
        if key not in skip:
            out.append(_guarded(name, kind, settings, fn))

    def gvi():
        r = run_genprog_vi(model, data, args.vi_steps, args.seed)
        steps["n"] = int(r.settings.split()[0])
        return r

    add("vi", "genprog VI", "vi", f"<= {args.vi_steps} steps", gvi)
    add("numpyro-svi", "NumPyro SVI", "vi", "", lambda: run_numpyro_svi(model, data, steps["n"], args.seed))
    add("pyro-svi", "raw Pyro SVI", "vi", "", lambda: run_pyro_svi(model, data, steps["n"], args.seed))
    add("nuts", "genprog NUTS", "mcmc", "", lambda: run_genprog_mcmc(
        "nuts", model, data, args.chains, args.warmup, args.draws, args.seed))
    add("chees", "genprog ChEES", "mcmc", "", lambda: run_genprog_mcmc(
        "chees", model, data, args.chees_chains, args.chees_warmup, args.chees_draws, args.seed))
    add("numpyro-nuts", "NumPyro NUTS", "mcmc", "", lambda: run_numpyro_nuts(
        model, data, args.chains, args.warmup, args.draws, args.seed))
    add("pyro-nuts", "raw Pyro NUTS", "mcmc", "", lambda: run_pyro_nuts(
        model, data, args.pyro_nuts_chains, args.warmup, args.draws, args.seed, args.pyro_nuts_budget))
    return out


def _f(x, spec) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


RHAT_MAX = 1.1  # above it an MCMC row's ESS (and its speed ratios) are not reported as comparable


def peer_table(results: list[PeerResult], truth: dict) -> str:
    """Markdown table of the peer runs; speed ratios are n/a when either side failed, was
    stopped, or (MCMC) has max R-hat above :data:`RHAT_MAX` (a 1-chain run has no R-hat)."""
    by = {r.name: r for r in results}

    def unusable(r):
        return r.note.startswith(("failed", "stopped")) or (r.kind == "mcmc" and r.max_rhat > RHAT_MAX)

    def speed(r, ref_name):
        ref = by.get(ref_name)
        if ref is None or unusable(ref) or unusable(r):
            return "n/a"
        if ref is r:
            return "1"
        if r.kind == "mcmc":
            return _f(r.ess_per_s / ref.ess_per_s, ".2f")
        return _f(ref.wall_s / r.wall_s, ".2f")

    head = ("| run | settings | wall (s) | CPU (s) | load | min bulk ESS | ESS/s | max R-hat "
            "| div. | final ELBO | cl | v | ka | speed vs raw Pyro | speed vs NumPyro | notes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        pyro_ref = "raw Pyro NUTS" if r.kind == "mcmc" else "raw Pyro SVI"
        np_ref = "NumPyro NUTS" if r.kind == "mcmc" else "NumPyro SVI"
        m = r.means
        mcmc = r.kind == "mcmc"
        lines.append(
            f"| {r.name} | {r.settings} | {_f(r.wall_s, '.1f')} | {_f(r.cpu_s, '.1f')} "
            f"| {_f(r.load, '.1f')} | {_f(r.min_ess, '.0f') if mcmc else ''} "
            f"| {_f(r.ess_per_s, '.2f') if mcmc else ''} | {_f(r.max_rhat, '.3f') if mcmc else ''} "
            f"| {'' if r.divergences is None else r.divergences} "
            f"| {'' if mcmc else _f(r.final_elbo, '.1f')} "
            f"| {_f(m.get('cl'), '.3f')} | {_f(m.get('v'), '.2f')} | {_f(m.get('ka'), '.3f')} "
            f"| {speed(r, pyro_ref)} | {speed(r, np_ref)} "
            f"| {'; '.join(x for x in (r.note, 'not converged (R-hat > 1.1)' if mcmc and r.max_rhat > RHAT_MAX else '') if x)} |")
    lines.append(f"| truth | | | | | | | | | | {truth['cl']:.3f} | {truth['v']:.2f} "
                 f"| {truth['ka']:.3f} | | | |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- fit times


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
    print(f"  {name:10s} {method:10s} wall {rows[-1]['wall_s']:8.2f} s  cl {value:.4g}  {note}", flush=True)


def _pyro_svi_cl(model, data, steps: int, seed: int) -> float:
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


def _pyro_nuts_cl(model, data, warmup: int, draws: int, seed: int) -> float:
    from pyro.infer import MCMC, NUTS

    pyro.set_rng_seed(seed)
    mcmc = MCMC(NUTS(_pyro_model(model, data), jit_compile=False), warmup_steps=warmup,
                num_samples=draws, num_chains=1, disable_progbar=True)
    mcmc.run()
    return float(mcmc.get_samples()["cl"].mean())


def fit_times(rows: list, name: str, model, data, args, bayes: bool = True) -> None:
    """Part 1: one row per method (``bayes=False``: mle and map only)."""
    vi_steps = {}

    def vi():
        fit = model(data).fit("vi", draws=200, seed=args.seed, max_steps=args.vi_steps, progress=False)
        vi_steps["n"] = int(fit.info.get("num_steps", args.vi_steps))
        return _cl(fit)

    _timed(rows, name, data, "mle", lambda: _cl(model.fit(data, "mle", seed=args.seed)))
    _timed(rows, name, data, "map", lambda: _cl(model(data).fit("map", seed=args.seed)))
    if not bayes:
        return
    _timed(rows, name, data, "vi", vi)
    _timed(rows, name, data, "nuts", lambda: _cl(model(data).fit(
        "nuts", chains=args.chains, warmup=args.warmup, draws=args.draws, seed=args.seed,
        progress=False)))
    _timed(rows, name, data, "pyro-svi",
           lambda: _pyro_svi_cl(model, data, vi_steps.get("n", args.vi_steps), args.seed))
    if data.n_subjects <= 50 and not args.quick:
        _timed(rows, name, data, "pyro-nuts",
               lambda: _pyro_nuts_cl(model, data, args.warmup, args.draws, args.seed))


def _markdown(table: pd.DataFrame) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main

QUICK = {"subjects": 100, "chains": 2, "warmup": 100, "draws": 100, "vi_steps": 500,
         "chees_chains": 16, "chees_warmup": 100, "chees_draws": 50, "pyro_nuts_chains": 1,
         "pyro_nuts_budget": 120.0}
FULL = {"subjects": 1000, "chains": 2, "warmup": 200, "draws": 200, "vi_steps": 5000,
        "chees_chains": 64, "chees_warmup": 200, "chees_draws": 100, "pyro_nuts_chains": 2,
        "pyro_nuts_budget": 1200.0}
RUNS = ("theo_sd", "sim-fit-times", "check", "vi", "numpyro-svi", "pyro-svi", "nuts", "chees",
        "numpyro-nuts", "pyro-nuts")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (see QUICK)")
    p.add_argument("--subjects", type=int, default=None, help="simulated subjects (1000; quick 100)")
    p.add_argument("--error", default="proportional", choices=("proportional", "additive"),
                   help="residual error of the simulated population")
    p.add_argument("--chains", type=int, default=None, help="NUTS chains (genprog and NumPyro)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--draws", type=int, default=None)
    p.add_argument("--vi-steps", type=int, default=None, dest="vi_steps")
    p.add_argument("--chees-chains", type=int, default=None, dest="chees_chains")
    p.add_argument("--chees-warmup", type=int, default=None, dest="chees_warmup")
    p.add_argument("--chees-draws", type=int, default=None, dest="chees_draws")
    p.add_argument("--pyro-nuts-chains", type=int, default=None, dest="pyro_nuts_chains")
    p.add_argument("--pyro-nuts-budget", type=float, default=None, dest="pyro_nuts_budget",
                   help="seconds after which raw Pyro NUTS is stopped (and marked so)")
    p.add_argument("--skip", default="", help=f"comma-separated runs to skip: {','.join(RUNS)}")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.skip = [s for s in args.skip.split(",") if s]
    bad = set(args.skip) - set(RUNS)
    if bad:
        p.error(f"--skip: unknown run(s) {sorted(bad)}; choose from {RUNS}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    # before JAX starts: one CPU device per NumPyro chain (chain_method="parallel")
    import numpyro

    numpyro.set_host_device_count(max(1, min(args.chains, os.cpu_count() or 1)))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    import jax

    print(f"# PK population bench, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}, torch {torch.__version__}, pyro {pyro.__version__}, "
          f"numpyro {numpyro.__version__}, jax {jax.__version__}, {torch.get_num_threads()} torch "
          f"threads, {jax.local_device_count()} JAX CPU devices, load {os.getloadavg()[0]:.1f}",
          flush=True)
    print(f"# NUTS {args.chains} chains x ({args.warmup} + {args.draws}); ChEES {args.chees_chains} "
          f"x ({args.chees_warmup} + {args.chees_draws}); raw Pyro NUTS {args.pyro_nuts_chains} "
          f"chain(s), budget {args.pyro_nuts_budget:.0f} s; VI <= {args.vi_steps} steps", flush=True)
    sim_model, sim, truth = _simulated(args.subjects, args.seed, args.error)
    name = f"sim-{args.subjects}"
    if "check" not in args.skip:
        print(f"\n## log density check ({name}, float64)", flush=True)
        for k, v in check_log_density(sim_model, sim, args.seed).items():
            print(f"  {k}: {v:.10g}", flush=True)
    rows: list = []
    print("\n## fit times", flush=True)
    if "theo_sd" not in args.skip:
        theo = pk.read_nonmem(pk.dataset_path("theo_sd"))
        theo_model = pk.PopulationModel(pk.OneCompartment(), ["ka", "cl", "v"], "combined")
        fit_times(rows, "theo_sd", theo_model, theo, args)
    if "sim-fit-times" not in args.skip:
        fit_times(rows, name, sim_model, sim, args, bayes=False)
    print(f"\n## peers on {name} ({args.error} error, {sim.n_observations} observations)", flush=True)
    results = run_peers(sim_model, sim, args)
    if rows:
        print("\n### fit times\n")
        print(_markdown(pd.DataFrame(rows)))
    print(f"\n### peers on {name}\n")
    print(peer_table(results, truth))


if __name__ == "__main__":
    main()

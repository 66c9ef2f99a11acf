"""Eight schools (non-centred): genprog NUTS against raw Pyro NUTS, side by side.

Four runs of the same model, on the same machine, in one process, with the same
settings (chains, warmup, draws, target acceptance 0.8, maximum tree depth 10):

a. ``genprog``: ``Model.fit("nuts")`` with the default backend (chains as a batch
   dimension, advancing in lockstep);
b. ``raw Pyro``: ``pyro.infer.MCMC(NUTS(model, jit_compile=False), num_chains=1)``, one
   chain after another (Pyro's multiprocessing chains are slow and unreliable here);
c. ``raw Pyro, jit_compile=True``: as (b) with ``jit_compile=True,
   ignore_jit_warnings=True`` (recorded as failed, with the error, if it does not run);
d. ``genprog backend='pyro'``: ``Model.fit("nuts", backend="pyro")``.

Each run reports wall and process-CPU time, potential+gradient evaluations, the minimum
bulk ESS over ``mu``, ``tau`` and every ``eta[i]`` (ArviZ, draws grouped by chain), ESS
per wall and per CPU second, the maximum R-hat, post-warmup divergences and the
posterior means of ``mu`` and ``tau`` with their Monte Carlo standard errors. Results
are printed as a markdown table followed by the ratios of genprog's ESS/s to raw Pyro's
(b and c); ``bench/README.md`` keeps measured tables.

Usage (from the repository root)::

    python bench/eight_schools.py            # 4 chains, 1000 warmup + 1000 draws
    python bench/eight_schools.py --quick    # 200 + 200, a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import subprocess
import time
import traceback
import warnings
from dataclasses import dataclass, field
from unittest import mock

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS

import genprog as gp

Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
SITES = ("mu", "tau", "eta")


def eight_schools(sigma, y=None):
    """Non-centred eight schools: ``theta_j = mu + tau * eta_j``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", sigma.shape[0]):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * eta, sigma), obs=y)


@dataclass(frozen=True)
class Settings:
    """What every run shares."""

    chains: int
    warmup: int
    draws: int
    seed: int
    target_accept: float
    max_tree_depth: int = 10


@dataclass(frozen=True)
class RunResult:
    """One sampler run.

    Attributes
    ----------
    name : str
        Row label.
    wall_time_s : float
        Seconds from the call that starts sampling to its return (all chains, warmup
        and draws; genprog's includes building the density, its initialisation and its
        own convergence check).
    cpu_time_s : float
        Process CPU seconds over the same span (all threads of this process).
    load_avg : float
        1-minute load average of the machine when the run ended.
    grad_evals : int or None
        Potential-and-gradient evaluations per chain summed over chains, warmup
        included. For the batched sampler this is batched calls x chains, so it counts
        the evaluations spent on chains whose trajectory had already finished.
    min_ess_bulk : float
        Minimum bulk ESS over ``mu``, ``tau`` and each ``eta[i]``.
    max_rhat : float
        Maximum rank-normalised split R-hat over the same scalars.
    divergences : int
        Post-warmup divergent transitions, all chains.
    mean : dict[str, tuple[float, float]]
        ``site -> (posterior mean, MCSE of the mean)`` for ``mu`` and ``tau``.
    error : str or None
        Why the run failed (then every number is NaN).
    notes : tuple[str, ...]
        Warnings raised during the run (and, for the batched sampler, how full its
        lockstep batches were).
    """

    name: str
    wall_time_s: float = math.nan
    cpu_time_s: float = math.nan
    load_avg: float = math.nan
    grad_evals: int | None = None
    min_ess_bulk: float = math.nan
    max_rhat: float = math.nan
    divergences: int | None = None
    mean: dict = field(default_factory=dict)
    error: str | None = None
    notes: tuple = ()

    @property
    def ess_per_s(self) -> float:
        """Minimum bulk ESS per wall-clock second."""
        return self.min_ess_bulk / self.wall_time_s

    @property
    def ess_per_cpu_s(self) -> float:
        """Minimum bulk ESS per process-CPU second."""
        return self.min_ess_bulk / self.cpu_time_s


class _Clock:
    """Wall and process-CPU seconds of a block, and the 1-minute load average at its end
    (the CPU time is the steadier number when other processes share the machine)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu
        self.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
        return False


def _diagnose(draws: dict) -> tuple[float, float, dict]:
    """Min bulk ESS, max R-hat and ``{mu, tau}`` mean and MCSE from ``[chain, draw, ...]``
    arrays, all from ArviZ."""
    ds = az.convert_to_dataset({k: np.asarray(draws[k], dtype=np.float64) for k in SITES})
    ess = az.ess(ds, method="bulk")
    rhat = az.rhat(ds)
    mcse = az.mcse(ds, method="mean")
    min_ess = min(float(np.min(ess[k].values)) for k in SITES)
    max_rhat = max(float(np.max(rhat[k].values)) for k in SITES)
    mean = {k: (float(ds[k].mean()), float(mcse[k])) for k in ("mu", "tau")}
    return min_ess, max_rhat, mean


def _notes(caught) -> tuple:
    seen = []
    for w in caught:
        line = f"{w.category.__name__}: {str(w.message).splitlines()[0]}"
        if line not in seen:
            seen.append(line)
    return tuple(seen)


def run_genprog(s: Settings, backend: str = "genprog") -> RunResult:
    """``gp.Model(...).condition(y=...).fit("nuts", backend=backend)``."""
    name = "genprog" if backend == "genprog" else f"genprog backend={backend!r}"
    model = gp.Model(eight_schools, SIGMA).condition(y=Y)
    _CountingNUTS.num_potential_evals = 0
    try:
        # genprog's Pyro backend imports pyro.infer.NUTS when it runs: swap in the
        # counting subclass so its gradient evaluations are counted like raw Pyro's.
        with warnings.catch_warnings(record=True) as caught, \
                mock.patch.object(pyro.infer, "NUTS", _CountingNUTS):
            warnings.simplefilter("always")
            with _Clock() as clock:
                fit = model.fit("nuts", chains=s.chains, warmup=s.warmup, draws=s.draws,
                                seed=s.seed, target_accept=s.target_accept,
                                max_tree_depth=s.max_tree_depth, backend=backend, progress=False)
    except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
        return RunResult(name, error=f"{type(e).__name__}: {e}")
    if backend == "genprog":
        n_grad = int(fit.info["num_grad_evals"]) * s.chains
    else:
        n_grad = _CountingNUTS.num_potential_evals
    draws = {k: fit.draws[k].detach().cpu().numpy() for k in SITES}
    min_ess, max_rhat, mean = _diagnose(draws)
    notes = _notes(caught)
    if "n_steps" in fit.sample_stats:
        notes += (_lockstep_note(np.asarray(fit.sample_stats["n_steps"])),)
    return RunResult(name, clock.wall, clock.cpu, clock.load, n_grad, min_ess,
                     max_rhat, int(np.asarray(fit.sample_stats["diverging"]).sum()), mean,
                     notes=notes)


def _lockstep_note(n_steps: np.ndarray) -> str:
    """How much of the batched sampler's post-warmup work advanced a chain.

    In lockstep every transition costs ``max over chains`` of the chains' leapfrog steps
    (``n_steps [chain, draw]``) batched evaluations, each of which evaluates all chains.
    """
    slots = n_steps.shape[0] * n_steps.max(0).sum()
    return (f"lockstep: after warmup, {int(n_steps.sum())} leapfrog steps of the chains' own "
            f"trajectories filled {int(slots)} chain-evaluation slots "
            f"({100 * n_steps.sum() / slots:.0f}% used); mean steps per draw "
            f"{n_steps.mean():.1f}, mean of the per-draw max over chains "
            f"{n_steps.max(0).mean():.1f}")


class _CountingNUTS(NUTS):
    """Pyro's NUTS, counting calls of its potential function (each is followed by a
    gradient in NUTS)."""

    num_potential_evals = 0

    def _initialize_model_properties(self, model_args, model_kwargs):
        super()._initialize_model_properties(model_args, model_kwargs)
        inner = self.potential_fn

        def counted(params):
            _CountingNUTS.num_potential_evals += 1
            return inner(params)

        self.potential_fn = counted


def run_pyro(s: Settings, jit: bool) -> RunResult:
    """Raw Pyro: one ``MCMC(NUTS(...), num_chains=1)`` per chain, run one after another,
    chain ``c`` seeded ``seed + c``; Pyro's default initialisation (uniform in (-2, 2)
    on the unconstrained space)."""
    name = "raw Pyro, jit_compile=True" if jit else "raw Pyro"
    _CountingNUTS.num_potential_evals = 0
    runs = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _Clock() as clock:
                for c in range(s.chains):
                    pyro.set_rng_seed(s.seed + c)
                    kernel = _CountingNUTS(eight_schools, target_accept_prob=s.target_accept,
                                           max_tree_depth=s.max_tree_depth, jit_compile=jit,
                                           ignore_jit_warnings=jit)
                    mcmc = MCMC(kernel, num_samples=s.draws, warmup_steps=s.warmup,
                                num_chains=1, disable_progbar=True)
                    mcmc.run(SIGMA, Y)
                    runs.append(mcmc)
    except Exception as e:  # noqa: BLE001
        return RunResult(name, error=f"{type(e).__name__}: {str(e).splitlines()[0]}\n"
                         + traceback.format_exc(limit=-3))
    chains = [m.get_samples() for m in runs]
    divergences = sum(len(m.diagnostics()["divergences"]["chain 0"]) for m in runs)
    draws = {k: np.stack([ch[k].detach().cpu().numpy() for ch in chains]) for k in SITES}
    min_ess, max_rhat, mean = _diagnose(draws)
    return RunResult(name, clock.wall, clock.cpu, clock.load, _CountingNUTS.num_potential_evals,
                     min_ess, max_rhat, divergences, mean, notes=_notes(caught))


def _fmt(x, spec):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, spec)


def table(results: list[RunResult]) -> str:
    """Markdown table of the runs."""
    head = ("| run | wall (s) | CPU (s) | load | grad evals | ms / grad eval | min bulk ESS "
            "| ESS/s | ESS/CPU-s | max R-hat | divergences | mean mu (± MCSE) "
            "| mean tau (± MCSE) |")
    ncol = head.count("|") - 1
    lines = [head, "|" + "---|" * ncol]
    for r in results:
        if r.error:
            lines.append(f"| {r.name} | failed: {r.error.splitlines()[0]} |" + " |" * (ncol - 2))
            continue
        ms = None if r.grad_evals is None else 1e3 * r.wall_time_s / r.grad_evals
        mu, tau = r.mean["mu"], r.mean["tau"]
        lines.append(
            f"| {r.name} | {_fmt(r.wall_time_s, '.1f')} | {_fmt(r.cpu_time_s, '.1f')} "
            f"| {_fmt(r.load_avg, '.1f')} | {_fmt(r.grad_evals, 'd')} | {_fmt(ms, '.2f')} "
            f"| {_fmt(r.min_ess_bulk, '.0f')} | {_fmt(r.ess_per_s, '.2f')} "
            f"| {_fmt(r.ess_per_cpu_s, '.2f')} | {_fmt(r.max_rhat, '.3f')} | {r.divergences} "
            f"| {mu[0]:.2f} ± {mu[1]:.2f} | {tau[0]:.2f} ± {tau[1]:.2f} |"
        )
    return "\n".join(lines)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        return f"{names[0]} x {len(names)} logical cores" if names else platform.machine()
    except OSError:
        return platform.machine()


def _genprog_revision() -> str:
    """Where genprog was imported from, and its git commit when that is a checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(gp.__file__)))
    try:
        def git(*args):
            return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()

        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "genprog")
    except (OSError, subprocess.SubprocessError):
        return f"from {root} (not a git checkout)"
    return f"from {root} at {head}" + (" + uncommitted changes in genprog/" if dirty else "")


def environment() -> str:
    return (f"{datetime.date.today().isoformat()}; {_cpu()}, {torch.get_num_threads()} torch "
            f"threads; Python {platform.python_version()}, "
            f"torch {torch.__version__}, pyro-ppl {pyro.__version__}, arviz {az.__version__}, "
            f"numpy {np.__version__}, genprog {gp.__version__} {_genprog_revision()}")


def main(argv=None) -> list[RunResult]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-accept", type=float, default=0.8)
    p.add_argument("--quick", action="store_true", help="200 warmup + 200 draws (smoke run)")
    a = p.parse_args(argv)
    if a.quick:
        a.warmup, a.draws = 200, 200
    s = Settings(a.chains, a.warmup, a.draws, a.seed, a.target_accept)
    print(f"eight schools (non-centred): {s}")
    print(environment(), flush=True)

    runs = [
        lambda: run_genprog(s),
        lambda: run_pyro(s, jit=False),
        lambda: run_pyro(s, jit=True),
        lambda: run_genprog(s, backend="pyro"),
    ]
    results = []
    for run in runs:
        r = run()
        status = r.error.splitlines()[0] if r.error else f"{r.wall_time_s:.1f} s"
        print(f"  {r.name}: {status}", flush=True)
        results.append(r)

    print()
    print(table(results))
    print()
    ours = results[0]
    for ref in results[1:3]:
        if not ref.error and not ours.error:
            print(f"genprog / {ref.name}: ESS/s ratio {ours.ess_per_s / ref.ess_per_s:.2f}, "
                  f"ESS/CPU-s ratio {ours.ess_per_cpu_s / ref.ess_per_cpu_s:.2f}, "
                  f"wall time ratio {ours.wall_time_s / ref.wall_time_s:.2f}")
    for r in results:
        if r.error:
            print(f"\n{r.name} failed:\n{r.error}")
        for n in r.notes:
            print(f"note, {r.name}: {n}")
    return results


if __name__ == "__main__":
    main()

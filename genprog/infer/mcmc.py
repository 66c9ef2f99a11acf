"""MCMC fits: NUTS and HMC, chains as a batch dimension in one process.

The default backend (``backend="genprog"``) runs :mod:`genprog.infer.nuts` — a
vectorized NUTS / HMC whose chains advance in lockstep on the model's batched
:class:`~genprog.density.JointDensity` — or :mod:`genprog.infer.chees` (``"chees"``,
many chains sharing one step size and trajectory length). With ``compile=True`` (the
default) the potential is recorded once into a flat tensor program
(:mod:`genprog.infer.compiled`); ``compile=False`` runs one Pyro trace per leapfrog step
for all chains. ``backend="pyro"`` runs Pyro's own NUTS/HMC kernels chain after chain, kept as
the reference implementation. Both return an :class:`~genprog.infer.record.InferenceRecord`
whose sample stats use ArviZ names; ``Model.fit`` turns it into a Fit and checks the run
(:mod:`genprog.convergence`: divergences, R-hat and bulk ESS, reported with a
:class:`~genprog.errors.ConvergenceWarning` when poor).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from pyro.infer import HMC, MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_value

from ..rng import make_generator, seeded
from ..validation import check_choice, check_float, check_int, check_seed
from . import chees as chees_sampler
from .compiled import MODES, compile_potential
from .hmc import sample_hmc
from .init import initial_points
from .map import check_finite_start, hold_at_map
from .nuts import sample_nuts
from .record import InferenceRecord

BACKENDS = ("genprog", "pyro")


def _check_compile(compile):
    if not (isinstance(compile, bool) or compile in MODES):
        raise ValueError(f"fit: compile must be True, False or one of {MODES}, got {compile!r}")


def _run(model, kernel, *, chains, warmup, draws, seed, init, point, backend, progress, options,
         compile=True) -> InferenceRecord:
    chains = check_int("fit: chains", chains)
    warmup = check_int("fit: warmup", warmup, minimum=0)
    draws = check_int("fit: draws", draws)
    seed = check_seed("fit: seed", seed)
    check_choice("fit: backend", backend, BACKENDS)
    if "target_accept" in options:
        check_float("fit: target_accept", options["target_accept"], 0.0, 1.0, True, True)
    for name in ("max_tree_depth", "num_steps", "max_leapfrog_steps", "threads"):
        if options.get(name) is not None:
            check_int(f"fit: {name}", options[name])
    _check_compile(compile)
    start = time.perf_counter()
    model, held = hold_at_map(model, point, seed)
    density = model.density()
    if density.dim == 0:
        raise ValueError(f"fit({kernel!r}): the model has no continuous latent sites to sample")
    g = make_generator(seed, model.device)
    z0 = initial_points(density, chains, init, g)
    check_finite_start(f"fit({kernel!r})", density, z0)
    if backend == "pyro":
        z, stats, extra = _run_pyro(model, density, kernel, z0, warmup, draws, seed, options)
    else:
        sampler = {"nuts": sample_nuts, "hmc": sample_hmc,
                   "chees": chees_sampler.sample_chees}[kernel]
        potential = compile_potential(density, compile)
        res = sampler(potential, z0, warmup=warmup, draws=draws, generator=g,
                      progress=progress, **options)
        z = res.samples
        stats = {
            "lp": -res.potential_energy,
            "diverging": res.diverging,
            "acceptance_rate": res.acceptance_rate,
            "energy": res.energy,
            "n_steps": res.n_steps,
            "step_size": res.step_size[:, None].expand(chains, draws),
        }
        if kernel == "nuts":
            stats["tree_depth"] = res.tree_depth
        stats = {k: v.detach().cpu().numpy() for k, v in stats.items()}
        extra = {"step_size": res.step_size.cpu().numpy().tolist(),
                 "inverse_mass_matrix": res.inverse_mass_matrix,
                 "warmup_divergences": int(res.warmup_divergences.sum()),
                 "num_grad_evals": res.num_grad_evals}
        if hasattr(potential, "describe"):
            extra["potential"] = potential.describe()
        else:
            extra["potential"] = {"mode": "eager", "compile_time_s": 0.0, "fallback_reason": None}
        if kernel == "chees":
            extra["trajectory_length"] = res.trajectory_length
    info = {"backend": backend, "kernel": kernel, "chains": chains, "warmup": warmup, "draws": draws,
            "wall_time_s": time.perf_counter() - start, **extra}
    return InferenceRecord(kernel, z, held=held, sample_stats=stats, info=info, seed=seed)


def _run_pyro(model, density, kernel, z0, warmup, draws, seed, options):
    """Pyro's NUTS/HMC kernels, one chain after another (the reference implementation)."""
    chains = z0.shape[0]
    samples, diverging, step_sizes = [], [], []
    for c in range(chains):
        init_values = {k: v[0] for k, v in density.constrain(z0[c:c + 1])[0].items()}
        kwargs = {"max_plate_nesting": density.max_plate_nesting, "jit_compile": False,
                      "init_strategy": init_to_value(values=init_values)}
        if "target_accept" in options:
            kwargs["target_accept_prob"] = options["target_accept"]
        if options.get("dense_mass"):
            kwargs["full_mass"] = True
        if kernel == "nuts":
            if "max_tree_depth" in options:
                kwargs["max_tree_depth"] = options["max_tree_depth"]
            k = NUTS(model.program, **kwargs)
        else:
            if options.get("num_steps"):
                kwargs["num_steps"] = options["num_steps"]
            k = HMC(model.program, **kwargs)
        steps = []

        def record(kernel, samples, stage, i, steps=steps):
            if stage == "Sample":
                steps.append(float(kernel.step_size))

        with seeded(seed + c):
            mcmc = MCMC(k, num_samples=draws, warmup_steps=warmup, num_chains=1,
                        disable_progbar=True, hook_fn=record)
            mcmc.run(*model.args, **model.kwargs)
        step_sizes.append(np.asarray(steps[-draws:], dtype=float))
        got = mcmc.get_samples()
        samples.append(density.unconstrain({s.name: got[s.name] for s in density.sites}))
        div = np.zeros(draws, dtype=bool)
        idx = mcmc.diagnostics().get("divergences", {}).get("chain 0", [])
        div[np.asarray(idx, dtype=int)] = True
        diverging.append(div)
    z = torch.stack(samples)
    with torch.no_grad():
        lp = -density.potential_and_grad(z.reshape(-1, z.shape[-1]))[0].reshape(chains, draws)
    # Pyro's kernels do not expose per-transition acceptance, energy or tree depth; those
    # statistics come from the genprog backend only.
    stats = {"diverging": np.stack(diverging), "lp": lp.cpu().numpy(),
             "step_size": np.stack(step_sizes)}
    return z, stats, {"step_size": [float(s[-1]) for s in step_sizes]}


def fit_nuts(model, *, chains: int = 4, warmup: int = 1000, draws: int = 1000, seed: int = 0,
             target_accept: float = 0.8, max_tree_depth: int = 10, dense_mass: bool = False,
             init="median",
             point: list | None = None, backend: str = "genprog", progress: bool | None = None,
             compile: bool | str = True, threads: int | None = None):
    """No-U-Turn sampler.

    Parameters
    ----------
    model : genprog.Model
    chains, warmup, draws : int
        Chains run as one batch; ``warmup`` adaptation iterations (step size by dual
        averaging, diagonal mass matrix in Stan's windows), then ``draws`` kept.
    seed : int
    target_accept : float
        Target mean acceptance probability of the step-size adaptation.
    max_tree_depth : int
    dense_mass : bool
        Adapt a dense mass matrix (the warmup windows' covariance, regularised as in Stan)
        instead of its diagonal: for posteriors with strong linear correlations, at
        ``O(D^2)`` memory per chain.
    init : "median", "prior" or dict
        Chain starting points: prior median with uniform(-0.5, 0.5) jitter in
        unconstrained space (default), independent prior draws, or given site values.
    point : list of str, optional
        Sites held at their joint MAP estimate while the sampler explores the rest.
    backend : {"genprog", "pyro"}
        Batched lockstep sampler, or Pyro's kernels chain by chain (reference).
    progress : bool, optional
        Progress bar (default: when attached to a terminal).
    compile : bool or {"inductor", "fx", "jit", "eager"}
        Record the model's potential once into a flat tensor program and replay it at
        every leapfrog step (:mod:`genprog.infer.compiled`; falls back, with a
        :class:`~genprog.infer.compiled.CompileWarning`, when recording fails). ``False``
        re-runs the Pyro program at every step. Ignored by ``backend="pyro"``.
    threads : int, optional
        Torch's intra-op threads while sampling (restored afterwards); default
        :func:`genprog.threads.threads_for` of ``chains * D`` (one thread for usual sizes).

    Returns
    -------
    InferenceRecord
        ``info``: ``backend``, ``kernel``, ``chains``, ``warmup``, ``draws``, ``wall_time_s``,
        ``step_size`` (per chain), ``inverse_mass_matrix``, ``warmup_divergences``,
        ``num_grad_evals``; ``info["potential"]`` says how the potential was evaluated (mode, compile time,
        why a faster mode was not used).
    """
    return _run(model, "nuts", chains=chains, warmup=warmup, draws=draws, seed=seed, init=init,
                point=point, backend=backend, progress=progress, compile=compile,
                options={"target_accept": target_accept, "max_tree_depth": max_tree_depth,
                         "dense_mass": dense_mass, "threads": threads})


def fit_hmc(model, *, chains: int = 4, warmup: int = 1000, draws: int = 1000, seed: int = 0,
            num_steps: int | None = None, trajectory_length: float | None = None,
            target_accept: float = 0.8, dense_mass: bool = False, init="median",
            point: list | None = None, backend: str = "genprog", progress: bool | None = None,
            compile: bool | str = True, threads: int | None = None):
    """Hamiltonian Monte Carlo with a fixed number of leapfrog steps (default 10) or a
    fixed ``trajectory_length``; otherwise as :func:`fit_nuts`."""
    options = {"target_accept": target_accept, "num_steps": num_steps, "dense_mass": dense_mass,
               "threads": threads}
    if backend == "genprog":
        options["trajectory_length"] = trajectory_length
    return _run(model, "hmc", chains=chains, warmup=warmup, draws=draws, seed=seed, init=init,
                point=point, backend=backend, progress=progress, options=options, compile=compile)


def fit_chees(model, *, chains: int = 64, warmup: int = 500, draws: int = 500, seed: int = 0,
              target_accept: float = 0.651, learning_rate: float = 0.025,
              max_leapfrog_steps: int = 1000, init="median", point: list | None = None,
              progress: bool | None = None, compile: bool | str = True,
              threads: int | None = None):
    """ChEES-HMC: many chains sharing one step size and one jittered trajectory length
    (Hoffman, Radul & Sountsov 2021); see :func:`genprog.infer.chees.sample_chees`.

    Parameters
    ----------
    model : genprog.Model
    chains, warmup, draws : int
        The adaptation learns from cross-chain statistics, so use many chains (dozens to
        thousands) with fewer draws each.
    seed : int
    target_accept : float
        Target harmonic-mean acceptance probability of the step-size dual averaging.
    learning_rate : float
        Adam's learning rate for the log trajectory length.
    max_leapfrog_steps : int
        Cap on the leapfrog steps of one transition.
    init, point, progress, compile, threads
        As in :func:`fit_nuts`.

    Returns
    -------
    InferenceRecord
        Sample stats as for NUTS (``tree_depth`` absent); ``info["trajectory_length"]`` is
        the adapted (unjittered) integration time in the metric of the mass matrix.
    """
    return _run(model, "chees", chains=chains, warmup=warmup, draws=draws, seed=seed,
                init=init, point=point, backend="genprog", progress=progress, compile=compile,
                options={"target_accept": target_accept, "learning_rate": learning_rate,
                         "max_leapfrog_steps": max_leapfrog_steps, "threads": threads})

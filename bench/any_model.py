"""Batching paths for models as users write them: plate vs vmap vs loop.

Two models, each written twice: as Pyro users write it (``X @ w``; a kernel matrix of a
latent lengthscale and ``torch.linalg.cholesky``), which genprog runs under
``torch.func.vmap`` of a one-draw program, and rewritten to broadcast over a leading
draw dim, which genprog runs once in a particle plate. The user's model is also timed
with its batching forced to the draw-by-draw ``loop``. For each, milliseconds per
potential+gradient call (``JointDensity.potential_and_grad``, eager; and the compiled
potential, ``CompiledPotential``, that NUTS uses by default) for 4 and 64 chains:
median over repeats.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python bench/any_model.py           # 4 and 64 chains
    OMP_NUM_THREADS=1 python bench/any_model.py --quick   # fewer repeats
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import pyro
import pyro.distributions as dist
import torch

import genprog as gp
from genprog.infer.compiled import CompiledPotential
from genprog.vectorize import Batching


# --------------------------------------------------------------------------- models
def blr(X, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.5).expand([X.shape[1]]).to_event(1))
    with pyro.plate("n", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, 0.7), obs=y)


def blr_broadcasting(X, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.5).expand([X.shape[1]]).to_event(1))
    with pyro.plate("n", X.shape[0]):
        pyro.sample("y", dist.Normal((X * w).sum(-1), 0.7), obs=y)


def gp_regression(x, y=None):
    ls = pyro.sample("ls", dist.LogNormal(0.0, 0.5))
    K = torch.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / ls ** 2) + 0.05 * torch.eye(len(x))
    L = torch.linalg.cholesky(K)
    pyro.sample("y", dist.MultivariateNormal(torch.zeros(len(x)), scale_tril=L), obs=y)


def gp_broadcasting(x, y=None):
    ls = pyro.sample("ls", dist.LogNormal(0.0, 0.5))
    d2 = (x[:, None] - x[None, :]) ** 2
    K = torch.exp(-0.5 * d2 / ls[..., None, None] ** 2) + 0.05 * torch.eye(len(x))
    L = torch.linalg.cholesky(K)
    pyro.sample("y", dist.MultivariateNormal(torch.zeros(len(x)), scale_tril=L), obs=y)


def problems():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(100, 5, generator=g)
    y = X @ torch.randn(5, generator=g) + 0.7 * torch.randn(100, generator=g)
    x = torch.linspace(0.0, 5.0, 40)
    f = torch.sin(2 * x) + 0.2 * torch.randn(40, generator=g)
    return {
        "BLR (n=100, d=5)": (blr, blr_broadcasting, (X,), {"y": y}),
        "GP (n=40, latent lengthscale)": (gp_regression, gp_broadcasting, (x,), {"y": f}),
    }


# --------------------------------------------------------------------------- timing
def ms_per_call(fn, z, repeats: int, calls: int) -> float:
    """Median over ``repeats`` of the mean milliseconds of ``calls`` calls."""
    fn(z)
    fn(z)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn(z)
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


def densities(user_fn, broadcasting_fn, inputs, data):
    plate = gp.Model(broadcasting_fn, *inputs).condition(**data).density()
    vmap = gp.Model(user_fn, *inputs).condition(**data).density()
    loop = gp.Model(user_fn, *inputs).condition(**data).density()
    loop.structure.batching["density"] = Batching("loop", "forced by the benchmark")
    assert plate.batching == "plate" and vmap.batching == "vmap"
    return {"plate": plate, "vmap": vmap, "loop": loop}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, {platform.processor() or platform.machine()}, "
          f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("\n| model | chains | path | eager ms/call | compiled ms/call | vs plate (eager) | vs plate (compiled) |")
    print("|---|---|---|---|---|---|---|")
    for name, (user_fn, broadcasting_fn, inputs, data) in problems().items():
        dens = densities(user_fn, broadcasting_fn, inputs, data)
        for chains in (4, 64):
            z = 0.3 * torch.randn(chains, dens["plate"].dim, generator=torch.Generator().manual_seed(1))
            U_ref, g_ref = dens["plate"].potential_and_grad(z)
            row = {}
            for path, d in dens.items():
                U, g = d.potential_and_grad(z)
                torch.testing.assert_close(U, U_ref, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-3)
                calls = max(2, 40 // chains) if path == "loop" else 20
                eager = ms_per_call(d.potential_and_grad, z, repeats, calls)
                compiled = None
                if path != "loop":  # the loop path is never recorded (it would burn in branches)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        pg = CompiledPotential(d)
                        pg(z)
                    if pg.records[chains].mode == "fx":
                        compiled = ms_per_call(pg, z, repeats, calls)
                row[path] = (eager, compiled)
            for path, (eager, compiled) in row.items():
                base_e, base_c = row["plate"]
                comp = f"{compiled:.2f}" if compiled is not None else "-"
                ratio_c = f"{compiled / base_c:.2f}x" if compiled is not None and base_c else "-"
                print(f"| {name} | {chains} | {path} | {eager:.2f} | {comp} | {eager / base_e:.2f}x | {ratio_c} |")


if __name__ == "__main__":
    main()

"""Data-parallel VI over 2 processes (gloo): the shards' averaged ELBO gradients give the
posterior of the whole data set — checked against the conjugate closed form and against
single-process VI on all rows."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import genprog as gp

N, SIGMA, PRIOR_SD = 400, 2.0, 10.0


def _data():
    g = torch.Generator().manual_seed(3)
    return 1.5 + SIGMA * torch.randn(N, generator=g, dtype=torch.float64)


@gp.model
def normal_mean(n, y=None):
    import pyro
    import pyro.distributions as dist

    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), PRIOR_SD))
    with pyro.plate("rows", n):
        pyro.sample("y", dist.Normal(mu, SIGMA), obs=y)


def _worker(rank, world, port, out):
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        y = _data()
        shard = y[rank::world]
        m = normal_mean(len(shard)).condition(y=shard)
        fit = m.fit("vi", distributed=True, seed=0, draws=4000, learning_rate=0.05,
                    max_iters=4000, window=100)
        d = fit.draws["mu"].reshape(-1)
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"mean": float(d.mean()), "sd": float(d.std()),
                       "steps": fit.info["num_iters"]}, f)
    finally:
        tdist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_vi_matches_the_full_data_posterior(tmp_path):
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    results = []
    for r in range(2):
        with open(f"{out}.{r}") as f:
            results.append(json.load(f))
    print(results)
    assert results[0] == results[1]  # identical steps on every rank
    y = _data()
    post_var = 1.0 / (1.0 / PRIOR_SD**2 + N / SIGMA**2)
    post_mean = post_var * y.sum().item() / SIGMA**2
    # VI noise: the guide's mean wanders by ~0.1 posterior sd at the end of Adam
    assert abs(results[0]["mean"] - post_mean) < 0.25 * post_var**0.5
    assert abs(results[0]["sd"] / post_var**0.5 - 1) < 0.15


def test_distributed_needs_a_process_group():
    m = normal_mean(10).condition(y=torch.zeros(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="process group"):
        m.fit("vi", distributed=True, max_iters=10)
    with pytest.raises(ValueError, match="only with distributed=True"):
        m.fit("vi", total_size=20, max_iters=10)

"""Subject-sharded FOCE-I over 2 and 3 gloo processes against the single-process fit.

The oracle is :func:`genprog.pk.fit_mle` on the whole data set in this process. A one-rank
process group reproduces it bitwise. With 2 and 3 ranks the ranks' sums of the objective
and gradient round differently from one process's sum (about 1e-13), so L-BFGS's last steps
on the flat top of the objective differ: the OFV and the EBEs still agree to 1e-8, the
unconstrained estimates to about 1e-7 (asserted at 1e-6). Converged tightly (two Newton
steps on the gradient after L-BFGS, ``newton_steps=2``, on both sides), the estimates,
OFV, EBEs and standard errors agree to 1e-8 (measured: 1e-13 to 1e-11).

The data: 18 simulated subjects, one-compartment oral, IIV on CL and V, a power effect of
weight on CL (its reference, the whole data set's median weight, differs from every shard's
median: the sharded model must use the whole data set's).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from genprog import pk
from genprog.dtypes import default_dtype
from genprog.errors import ConvergenceWarning
from genprog.pk.distributed import _split_by_site, fit_mle_distributed, read_nonmem_shard
from genprog.pk.estimation import LaplaceObjective
from genprog.pk.sharding import concat_shards, shard_bounds, shard_dataset

N_SUBJECTS = 18
MODEL = pk.PopulationModel(pk.OneCompartment(), ["cl", "v"], "proportional", covariates={"cl": "WT"})
TRUTH = {"cl": 4.0, "v": 70.0, "ka": 1.0, "omega": [0.3, 0.3], "sigma_prop": 0.15, "beta_cl_wt": 0.75}
NEWTON = 2
INIT = {k: torch.tensor(v, dtype=torch.float64) for k, v in TRUTH.items()}  # the tight fits start here
THEO_MODEL = pk.PopulationModel(pk.OneCompartment(), ["ka", "cl", "v"], "additive")
SAEM = {"exploration": 60, "averaging": 40, "importance_draws": 200, "seed": 3}  # short: a comparison
THEO_SAEM = {"exploration": 20, "averaging": 15, "importance_draws": 100, "seed": 5}
VI = {"max_iters": 400, "window": 50, "draws": 100, "seed": 2}
THEO_VI = {"max_iters": 100, "window": 50, "draws": 50, "seed": 2}


def _design(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(1, n + 1):
        wt = float(np.round(rng.uniform(50, 100), 1))
        rows.append({"ID": i, "TIME": 0.0, "AMT": 100.0, "DV": 0.0, "EVID": 1, "MDV": 1, "WT": wt})
        rows += [{"ID": i, "TIME": t, "AMT": 0.0, "DV": 0.0, "EVID": 0, "MDV": 0, "WT": wt} for t in (0.5, 1, 3, 8, 24)]
    return pd.DataFrame(rows)


def _data() -> pk.Dataset:
    design = pk.read_nonmem(_design(N_SUBJECTS)).to(dtype=torch.float64)
    return pk.simulate_data(MODEL, design, TRUTH, seed=1)


def _vi_record(fit) -> dict:
    d = fit.info["distributed"]
    return {"loc": {k: v.tolist() for k, v in d["guide_loc"].items()},
            "scale": {k: v.tolist() for k, v in d["guide_scale"].items()},
            "elbo_trace": fit.info["elbo_trace"], "num_iters": fit.info["num_iters"],
            "draws": {k: v.tolist() for k, v in fit.draws.items()}}


def _single_vi(model, data, options) -> tuple:
    """The one-process VI fit (float64), and its guide's loc and scale by site."""
    with default_dtype(torch.float64), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = model.fit(data.to(dtype=torch.float64), "vi", **options)
    base = fit.info["proposal"].base.base_dist
    with default_dtype(torch.float64):
        density = model(data.to(dtype=torch.float64)).density()
    return fit, _split_by_site(density, base.loc), _split_by_site(density, base.scale)


def _assert_vi_equal(got: dict, single, loc, scale, tol: float = 1e-8) -> None:
    """Rank 0's sharded VI against the one-process fit with the same seed: the same noise
    for every subject, the same Adam steps, so the guide parameters (global and every
    subject's), the ELBO trace and the draws agree up to the rounding of partial sums
    (measured 1e-13), asserted at ``tol``."""
    print("vi: elbo", _max_diff(got["elbo_trace"], single.info["elbo_trace"]),
          "loc", max(_max_diff(got["loc"][k], loc[k]) for k in loc),
          "scale", max(_max_diff(got["scale"][k], scale[k]) for k in loc))
    assert got["num_iters"] == single.info["num_iters"]
    assert _max_diff(got["elbo_trace"], single.info["elbo_trace"]) < tol * max(1.0, abs(single.info["elbo_trace"][-1]))
    for k in loc:
        assert _max_diff(got["loc"][k], loc[k]) < tol, k
        assert _max_diff(got["scale"][k], scale[k]) < tol, k
    for k, v in single.draws.items():
        assert _max_diff(got["draws"][k], v) < tol * max(1.0, float(v.abs().max())), k


def _saem_record(fit) -> dict:
    return {**_record(fit), "ofv_focei": fit.info["ofv_focei"],
            "minus2ll_stderr": fit.info["minus2ll_stderr"],
            "eta_conditional_mean": fit.info["eta_conditional_mean"].tolist(),
            "trace": {k: v.tolist() for k, v in fit.info["trace"].items()}}


def _record(fit) -> dict:
    return {"phi": fit.phi.tolist(), "ofv": fit.ofv, "eta": fit.eta.tolist(),
            "ids": list(fit.data.ids), "converged": fit.converged,
            "covariance": None if fit.covariance is None else fit.covariance.tolist(),
            "estimates": {k: v.tolist() for k, v in fit.estimates.items()}}


# ---------------------------------------------------------------------- the launcher
# Each rank is a fresh ``python tests/pk/test_distributed.py TASK RANK WORLD STORE OUT``
# process (no pickling, no inherited state), rendezvousing through a FileStore in the test's
# tmp_path (no TCP port to race for, no store server living in rank 0's process). A rank
# writes its result as JSON, then every rank passes a barrier before
# ``destroy_process_group()``: no rank tears down its gloo pairs while a peer is still
# inside a collective (the cause of "terminate called without an active exception" when
# one rank exits, with the TCPStore it hosted, while another is still communicating).
# The launcher waits with a timeout, kills what is left, and shows each rank's stderr.

LAUNCH_TIMEOUT_S = 600


def _launch(task: str, world: int, tmp_path, timeout: float = LAUNCH_TIMEOUT_S) -> list:
    """Run ``task`` on ``world`` gloo processes; every rank's JSON result, by rank."""
    store, out = tmp_path / "store", tmp_path / "result"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(open(tmp_path / f"rank{r}.log", "w+")) for r in range(world)]
        procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), task, str(r), str(world),
                                   str(store), str(out)], stdout=logs[r], stderr=subprocess.STDOUT, env=env)
                 for r in range(world)]
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        tails = []
        for r, f in enumerate(logs):
            f.seek(0)
            tails.append(f"--- rank {r} (exit {procs[r].returncode}) ---\n" + f.read()[-4000:])
    assert all(p.returncode == 0 for p in procs), "\n".join(tails)
    results = []
    for r in range(world):
        with open(f"{out}.{r}") as f:
            results.append(json.load(f))
    return results


def _worker_main(task: str, rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                             timeout=datetime.timedelta(seconds=300))
    try:
        result = TASKS[task](rank, world)
        with open(f"{out}.{rank}.part", "w") as f:  # every rank, to check that all agree
            json.dump(result, f)
        os.replace(f"{out}.{rank}.part", f"{out}.{rank}")
        tdist.barrier()  # nobody tears down while a peer is still in a collective
    finally:
        tdist.destroy_process_group()


def _task_focei(rank: int, world: int) -> dict:
    """The 18-subject set: a refused mismatched shard, a plain and a tight FOCE-I fit."""
    data = _data()
    try:  # rank 1 passes rank 0's shard: every rank raises, none waits forever
        fit_mle_distributed(MODEL, shard_dataset(data, 0 if rank == 1 else rank, world))
        refused = None
    except ValueError as e:
        refused = str(e)
    plain = MODEL.fit(shard_dataset(data, rank, world), "mle", distributed=True, standard_errors=False)
    tight = fit_mle_distributed(MODEL, data, newton_steps=NEWTON, init=INIT)  # whole data on every rank
    return {"plain": _record(plain), "tight": _record(tight), "refused": refused,
            "n_shard": len(plain.data.ids), "shard": plain.info["distributed"]["shard"]}


def _task_theo(rank: int, world: int) -> dict:
    """theo_sd (12 subjects), every rank reading its shard of the file: FOCE-I and a short
    SAEM."""
    shard = read_nonmem_shard(pk.dataset_path("theo_sd"), rank, world)
    fit = THEO_MODEL.fit(shard, "mle", distributed=True, newton_steps=NEWTON)
    saem = THEO_MODEL.fit(shard, "saem", distributed=True, **THEO_SAEM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a short run, compared as it is
        vi = THEO_MODEL.fit(shard, "vi", distributed=True, **THEO_VI)
    return {"focei": _record(fit), "saem": _saem_record(saem), "vi": _vi_record(vi),
            "shard": fit.info["distributed"]["shard"]}


def _task_saem(rank: int, world: int) -> dict:
    """The 18-subject set, the whole data set on every rank: SAEM."""
    fit = MODEL.fit(_data(), "saem", distributed=True, **SAEM)
    return {"saem": _saem_record(fit), "shard": fit.info["distributed"]["shard"]}


def _task_vi(rank: int, world: int) -> dict:
    """The 18-subject set, each rank passing its shard: VI."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = MODEL.fit(shard_dataset(_data(), rank, world), "vi", distributed=True, **VI)
    return {"vi": _vi_record(fit), "shard": fit.info["distributed"]["shard"]}


TASKS = {"focei": _task_focei, "theo": _task_theo, "saem": _task_saem, "vi": _task_vi}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process fit, and the one-rank distributed fits (plain and tight)."""
    import torch.distributed as tdist

    data = _data()
    single = pk.fit_mle(MODEL, data)
    store = tmp_path_factory.mktemp("store") / "rendezvous"
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        one = fit_mle_distributed(MODEL, data)
        tight = fit_mle_distributed(MODEL, data, newton_steps=NEWTON, init=INIT)
    finally:
        tdist.destroy_process_group()
    return {"single": single, "one": one, "tight": tight, "data": data}


def _max_diff(a, b) -> float:
    return float((torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max())


# ---------------------------------------------------------------------- sharding
@pytest.mark.parametrize("world", [1, 2, 3, 5, 12])
def test_shards_are_balanced_contiguous_blocks_that_concatenate_back(world):
    data = pk.read_nonmem(pk.dataset_path("theo_sd"))
    shards = [shard_dataset(data, r, world) for r in range(world)]
    sizes = [s.n_subjects for s in shards]
    assert sum(sizes) == data.n_subjects and max(sizes) - min(sizes) <= 1
    assert [i for s in shards for i in s.ids] == data.ids  # no subject split or reordered
    whole = concat_shards(shards)
    assert whole.ids == data.ids
    for name in ("dose_time", "dose_amt", "obs_time", "obs_dv", "obs_mask", "obs_lloq"):
        assert torch.equal(getattr(whole, name).nan_to_num(-1.0), getattr(data, name).nan_to_num(-1.0)), name
    assert all(torch.equal(whole.covariates[k], data.covariates[k]) for k in data.covariates)
    assert [shard_bounds(12, r, world)[0] for r in range(world)] == [sum(sizes[:r]) for r in range(world)]


def test_read_nonmem_shard_is_the_block_of_the_whole_file():
    path = pk.dataset_path("theo_sd")
    whole = pk.read_nonmem(path)
    shard = read_nonmem_shard(path, 2, 3)
    assert shard.ids == whole.ids[8:12]
    assert torch.equal(shard.obs_dv, whole.obs_dv[8:12])
    assert shard.summary["shard"] == {"rank": 2, "world": 3, "start": 8, "stop": 12, "n_subjects": 12}
    by_keyword = [pk.read_nonmem(path, shard=(r, 3)) for r in range(3)]
    assert by_keyword[2].ids == shard.ids
    assert torch.equal(concat_shards(by_keyword).obs_dv, whole.obs_dv)


@pytest.mark.parametrize("n, rank, world, match", [
    (3, 0, 4, "cannot be split over 4 ranks"),
    (10, 3, 3, "rank must be below"),
])
def test_bad_shards_are_refused(n, rank, world, match):
    with pytest.raises(ValueError, match=match):
        shard_bounds(n, rank, world)


def test_shards_of_two_data_sets_do_not_concatenate():
    data = pk.read_nonmem(pk.dataset_path("theo_sd"))
    with pytest.raises(ValueError, match="not the blocks"):
        concat_shards([shard_dataset(data, 0, 3), shard_dataset(data, 2, 3)])


def test_fit_needs_a_process_group():
    with pytest.raises(ValueError, match="process group"):
        fit_mle_distributed(MODEL, pk.read_nonmem(pk.dataset_path("theo_sd")))
    with pytest.raises(ValueError, match="process group"):
        MODEL.fit(pk.read_nonmem(pk.dataset_path("theo_sd")), "mle", distributed=True)


def test_unsharded_methods_are_refused():
    with pytest.raises(ValueError, match="subject-sharded fits support"):
        MODEL.fit(pk.read_nonmem(pk.dataset_path("theo_sd")), "nuts", distributed=True)


def test_one_rank_saem_is_bitwise_the_single_process_saem(tmp_path):
    import torch.distributed as tdist

    data = pk.read_nonmem(pk.dataset_path("theo_sd"))
    single = pk.fit_saem(THEO_MODEL, data, **THEO_SAEM)
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'one'}", rank=0, world_size=1)
    try:
        one = THEO_MODEL.fit(data, "saem", distributed=True, **THEO_SAEM)
        iov = pk.PopulationModel(pk.OneCompartment(), ["cl"], iov=["cl"], occasion="OCC")
        with pytest.raises(ValueError, match="inter-occasion variability"):
            iov.fit(data, "saem", distributed=True)
        with pytest.raises(ValueError, match="only guide='normal'"):
            THEO_MODEL.fit(data, "vi", distributed=True, guide="full_rank")
    finally:
        tdist.destroy_process_group()
    assert torch.equal(one.phi, single.phi) and one.ofv == single.ofv
    assert torch.equal(one.eta, single.eta)
    assert one.info["ofv_focei"] == single.info["ofv_focei"]
    assert all(torch.equal(one.info["trace"][k], v) for k, v in single.info["trace"].items())


# ---------------------------------------------------------------------- fits
def test_one_rank_is_bitwise_the_single_process_fit(reference):
    single, one = reference["single"], reference["one"]
    assert torch.equal(one.phi, single.phi)
    assert one.ofv == single.ofv
    assert torch.equal(one.eta, single.eta)
    assert torch.equal(one.covariance, single.covariance)
    assert one.info["objective_trace"] == single.info["objective_trace"]
    # the Newton polish moved the optimum by about L-BFGS's precision, not more
    assert reference["tight"].info["newton_steps"]
    assert _max_diff(reference["tight"].phi, single.phi) < 1e-5


def test_two_processes_on_theo_sd_equal_the_single_process_fit(tmp_path):
    """The default-run multi-process case: theo_sd read as two shards of the file by two
    gloo processes, FOCE-I converged tightly (two Newton steps on the summed gradient) on
    both sides: estimates, OFV and EBEs to 1e-8."""
    data = pk.read_nonmem(pk.dataset_path("theo_sd")).to(dtype=torch.float64)
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'one'}", rank=0, world_size=1)
    try:
        single = fit_mle_distributed(THEO_MODEL, data, newton_steps=NEWTON)
    finally:
        tdist.destroy_process_group()
    saem = pk.fit_saem(THEO_MODEL, data, **THEO_SAEM)
    vi = _single_vi(THEO_MODEL, data, THEO_VI)
    results = _launch("theo", 2, tmp_path)
    for kind in ("focei", "saem"):
        for key in ("phi", "ofv", "estimates", "covariance"):
            assert results[1][kind][key] == results[0][kind][key], (kind, key)
    assert [r["shard"] for r in results] == [[0, 6], [6, 12]]
    focei = results[0]["focei"]
    assert focei["ids"] == data.ids and focei["converged"]
    assert abs(focei["ofv"] - single.ofv) < 1e-8
    assert _max_diff(focei["phi"], single.phi) < 1e-8
    assert _max_diff(focei["eta"], single.eta) < 1e-8
    _assert_saem_equal(results[0]["saem"], saem, data)
    for key in ("loc", "scale", "elbo_trace"):
        assert results[1]["vi"][key] == results[0]["vi"][key], key
    _assert_vi_equal(results[0]["vi"], *vi)


@pytest.mark.slow  # VI on 2 and 3 gloo processes
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_vi_equals_the_single_process_vi(world, tmp_path):
    single = _single_vi(MODEL, _data(), VI)
    results = _launch("vi", world, tmp_path)
    for r in results[1:]:  # every rank took the same steps and gathered the same guide
        for key in ("loc", "scale", "elbo_trace", "num_iters"):
            assert r["vi"][key] == results[0]["vi"][key], key
    _assert_vi_equal(results[0]["vi"], *single)


def _assert_saem_equal(got: dict, single, data, tol: float = 1e-8) -> None:
    """Rank 0's sharded SAEM against the single-process one with the same seed: the same
    draws for every subject, so the same estimates up to the rounding of partial sums
    (measured 1e-14 to 1e-11), asserted at ``tol``."""
    assert got["ids"] == data.ids
    print("saem: phi", _max_diff(got["phi"], single.phi), "ofv", got["ofv"] - single.ofv,
          "eta", _max_diff(got["eta"], single.eta))
    for k, v in single.info["trace"].items():  # every iteration, not only the end
        assert _max_diff(got["trace"][k], v) < tol * max(1.0, float(v.abs().max())), k
    assert _max_diff(got["phi"], single.phi) < tol
    assert abs(got["ofv"] - single.ofv) < tol * max(1.0, abs(single.ofv))  # importance sampling
    assert abs(got["ofv_focei"] - single.info["ofv_focei"]) < tol * max(1.0, abs(single.ofv))
    assert abs(got["minus2ll_stderr"] - single.info["minus2ll_stderr"]) < tol
    assert _max_diff(got["eta"], single.eta) < tol
    assert _max_diff(got["eta_conditional_mean"], single.info["eta_conditional_mean"]) < tol
    if single.covariance is None:
        assert got["covariance"] is None
    else:
        assert _max_diff(got["covariance"], single.covariance) < tol * float(single.covariance.abs().max())


@pytest.mark.slow  # SAEM on 2 and 3 gloo processes (about 40 s each)
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_saem_equals_the_single_process_saem(world, tmp_path):
    data = _data()
    single = pk.fit_saem(MODEL, data, **SAEM)
    results = _launch("saem", world, tmp_path)
    for r in results[1:]:  # every rank took the same steps
        for key in ("phi", "ofv", "ofv_focei", "covariance", "estimates", "trace"):
            assert r["saem"][key] == results[0]["saem"][key], key
    assert [r["shard"] for r in results] == [list(shard_bounds(N_SUBJECTS, k, world)) for k in range(world)]
    _assert_saem_equal(results[0]["saem"], single, data)


@pytest.mark.slow  # two fits each on 2 and 3 gloo processes (about a minute each)
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_fit_equals_the_single_process_fit(world, reference, tmp_path):
    results = _launch("focei", world, tmp_path)
    single, tight, data = reference["single"], reference["tight"], reference["data"]
    assert "holds shard 0 of" in results[1]["refused"]
    assert all("rank 1 failed" in r["refused"] for r in results[:1] + results[2:])
    # every rank took the same steps: identical estimates, OFV and covariance, bitwise
    for kind in ("plain", "tight"):
        for r in results[1:]:
            for key in ("phi", "ofv", "covariance", "estimates", "converged"):
                assert r[kind][key] == results[0][kind][key], (kind, key)
    # shards: contiguous balanced blocks; rank 0 holds the whole data set and all EBEs
    assert [r["shard"] for r in results] == [list(shard_bounds(N_SUBJECTS, k, world)) for k in range(world)]
    assert [r["plain"]["ids"] for r in results[1:]] == [data.ids[a:b] for a, b in (r["shard"] for r in results[1:])]
    plain, tight_w = results[0]["plain"], results[0]["tight"]
    assert plain["ids"] == data.ids and plain["converged"] and tight_w["converged"]
    print(world, "plain: ofv", plain["ofv"] - single.ofv, "eta", _max_diff(plain["eta"], single.eta),
          "phi", _max_diff(plain["phi"], single.phi), "| tight: ofv", tight_w["ofv"] - tight.ofv,
          "eta", _max_diff(tight_w["eta"], tight.eta), "phi", _max_diff(tight_w["phi"], tight.phi))
    # L-BFGS alone, as fit_mle: the OFV to 1e-7 (measured 2e-8), EBEs to 1e-8, the
    # estimates to 1e-6 (measured 1e-7)
    assert abs(plain["ofv"] - single.ofv) < 1e-7
    assert _max_diff(plain["eta"], single.eta) < 1e-8
    assert _max_diff(plain["phi"], single.phi) < 1e-6
    # converged tightly on both sides: everything to 1e-8
    assert abs(tight_w["ofv"] - tight.ofv) < 1e-8
    assert _max_diff(tight_w["phi"], tight.phi) < 1e-8
    assert _max_diff(tight_w["eta"], tight.eta) < 1e-8
    for k, v in tight.estimates.items():
        assert _max_diff(tight_w["estimates"][k], v) < 1e-8 * max(1.0, float(v.abs().max())), k
    se_w = torch.tensor(tight_w["covariance"], dtype=torch.float64).diagonal().sqrt()
    se = tight.covariance.diagonal().sqrt()
    assert float(((se_w - se) / se).abs().max()) < 1e-6  # finite-difference Hessians: ~1e-8 relative
    assert math.isfinite(plain["ofv"])


# ---------------------------------------------------------------------- memory
MEMORY_DIMS = (5, 11, 3, 3)  # subjects, observations, doses, random effects


def _records_data():
    """5 subjects with 11 observations and 3 doses each (so T, D and S differ)."""
    S, T, D, _ = MEMORY_DIMS
    rows = []
    for i in range(1, S + 1):
        rows += [{"ID": i, "TIME": t, "AMT": 100.0, "DV": 0.0, "EVID": 1, "MDV": 1, "WT": 60.0 + 5 * i} for t in (0.0, 12.0, 24.0)]
        rows += [{"ID": i, "TIME": 24.5 + 4 * k, "AMT": 0.0, "DV": 0.0, "EVID": 0, "MDV": 0, "WT": 60.0 + 5 * i} for k in range(T)]
    model = pk.PopulationModel(pk.OneCompartment(), ["ka", "cl", "v"], "proportional", covariates={"cl": "WT"})
    truth = {**TRUTH, "omega": [0.3, 0.3, 0.3]}
    data = pk.simulate_data(model, pk.read_nonmem(pd.DataFrame(rows)).to(dtype=torch.float64), truth, seed=2)
    assert tuple(data.obs_dv.shape) == (S, T) and tuple(data.dose_time.shape) == (S, D)
    return model, truth, data


class Shapes(TorchDispatchMode):
    """Records the shape of every tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen.update(tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out


@pytest.mark.slow  # every op of a whole (short) SAEM fit is recorded: ~15-35 s
def test_no_subjects_by_records_by_records_tensor_in_saem():
    """Every tensor a short SAEM run creates (kernels, Newton M-step of the covariate
    effect, Louis' information, conditional moments, importance sampling, the EBEs and
    FOCE-I objective at the estimate): none has two dims of the observation count T."""
    S, T, _, _ = MEMORY_DIMS
    model, _, data = _records_data()
    shapes = Shapes()
    with shapes, warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a 6-iteration run: no SEs
        fit = pk.fit_saem(model, data, exploration=3, averaging=3, importance_draws=20, seed=0)
    assert math.isfinite(fit.ofv)
    twice_t = [s for s in shapes.seen if list(s).count(T) >= 2]
    assert not twice_t, twice_t
    assert any(S in s and T in s for s in shapes.seen)  # the recorder saw the per-observation work


def test_no_subjects_by_records_by_records_tensor_on_the_fit_path():
    """Every tensor one objective evaluation (EBEs from two starts, value and gradient)
    creates is recorded: none has two dims of the observation count T, and the largest
    is the inner iterations' ``[2 starts x (2P + 1) points x S x D x T]`` (D doses), so
    the memory per subject does not grow with T^2."""
    S, T, D, P = MEMORY_DIMS
    model, truth, data = _records_data()

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with pyro.validation_enabled(False):
            obj = LaplaceObjective(model, data, model.priors_for(data))
            values = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in truth.items()}
            phi = obj.layout.pack(values).requires_grad_(True)
            eta0 = 0.1 * torch.ones(S, P, dtype=torch.float64)  # a warm start: two starts solved
            shapes = Shapes()
            with shapes:
                ll, _ = obj.log_likelihood(phi, eta0)
                ll.backward()
    finally:
        torch.set_default_dtype(old)
    assert torch.isfinite(ll)
    twice_t = [s for s in shapes.seen if list(s).count(T) >= 2]
    assert not twice_t, twice_t
    largest = max(math.prod(s) for s in shapes.seen)
    assert largest <= 2 * (2 * P + 1) * S * D * T, sorted(shapes.seen, key=math.prod)[-3:]


if __name__ == "__main__":  # one rank of a multi-process test (see _launch)
    _worker_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])

"""genprog.threads: the intra-op thread count chosen for a piece of work, and its scope.

References: the process's own CPU affinity (``os.sched_getaffinity``) and environment."""

from __future__ import annotations

import os

import pytest
import torch

from genprog.threads import WORK_PER_THREAD, available_cores, threads_for, using_threads


def test_small_work_gets_one_thread_and_large_work_at_most_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert available_cores() == cores
    assert threads_for(0) == 1 and threads_for(WORK_PER_THREAD - 1) == 1
    assert threads_for(10**12) == cores
    assert threads_for(3 * WORK_PER_THREAD) == min(3, cores)


def test_omp_num_threads_caps_the_choice_and_requested_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert available_cores() == 1 and threads_for(10**12) == 1
    assert threads_for(10, requested=3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert available_cores() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match="positive integer"):
        threads_for(10, requested=bad)
    with pytest.raises(ValueError, match="positive integer"), using_threads(bad):
        pass


def test_using_threads_restores_the_previous_count_even_after_an_error():
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with using_threads(other) as n:
        assert n == other and torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), using_threads(other):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before

"""How many intra-op threads torch should use for a piece of work, and a scoped setting.

Small tensor programs (a population fit of 100 subjects: tensors of 10^4-10^5 elements)
run fastest on one thread: torch's intra-op parallelism costs more in synchronisation
than it saves, and on a shared machine extra threads oversubscribe the cores (several
fits at once, each with a thread per core, run many times slower than one thread each).
Large batches (thousands of subjects or draws) gain from a few threads.

>>> from genprog.threads import threads_for, using_threads
>>> threads_for(1_000)
1
>>> with using_threads(threads_for(1_000)) as n:
...     n
1
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

__all__ = ["WORK_PER_THREAD", "available_cores", "threads_for", "using_threads"]

WORK_PER_THREAD = 2_000_000
"""Tensor elements per evaluation that justify one more intra-op thread. Measured on the
oral validation design (``bench/pk_validation.py``, 120 subjects x 43 observations x 8
doses x 3 etas, about 1.2 x 10^5; one batched inner solve from two starts) on the shared
2-core VM at load 5: one thread 2.8 s wall / 0.7 s CPU, two threads 24 s wall / 9.4 s CPU
(the threads spin at barriers while other processes hold the cores). A conservative
threshold: problems of this size and up to ~16x larger stay on one thread."""


def available_cores() -> int:
    """Cores this process may run on: ``OMP_NUM_THREADS`` when set (a positive integer),
    else the CPU affinity mask (``os.sched_getaffinity``; ``os.cpu_count()`` where the
    platform has no affinity)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env.split(",")[0])
        except ValueError:
            n = 0
        if n >= 1:
            return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_for(work: int, requested: int | None = None) -> int:
    """Intra-op thread count for ``work`` tensor elements per evaluation.

    Parameters
    ----------
    work : int
        Size of the typical tensor the computation handles (e.g. subjects x observations
        x doses x random effects), >= 0.
    requested : int, optional
        An explicit choice (``threads=`` of a fit): returned as is (must be >= 1).

    Returns
    -------
    int
        ``requested``, else one thread per ``WORK_PER_THREAD`` elements, at least 1 and at
        most :func:`available_cores`.
    """
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"threads: expected a positive integer or None, got {requested!r}")
        return requested
    if isinstance(work, bool) or not isinstance(work, int) or work < 0:
        raise ValueError(f"threads_for: work must be a non-negative integer, got {work!r}")
    return max(1, min(available_cores(), work // WORK_PER_THREAD))


@contextmanager
def using_threads(n: int):
    """Run the block with ``torch.set_num_threads(n)``; the previous count is restored on
    exit (also after an exception). Yields ``n``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"using_threads: expected a positive integer, got {n!r}")
    previous = torch.get_num_threads()
    if n != previous:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)

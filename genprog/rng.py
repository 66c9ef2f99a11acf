"""Random number generation without global side effects.

Every fit and estimate draws from one ``torch.Generator`` seeded with its explicit
``seed`` (:func:`make_generator`). Where Pyro's samplers draw from torch's global RNG
(ancestral sampling of a program), :func:`seeded` forks torch's global state — the CPU
generator and every CUDA device already initialised — seeds it, and restores it on exit,
so the user's own streams (torch, Python's ``random``, NumPy) are never reseeded.
"""

from __future__ import annotations

import contextlib

import torch


def make_generator(seed: int, device=None) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` (default CPU) seeded with ``seed``."""
    g = torch.Generator(device=device if device is not None else "cpu")
    g.manual_seed(int(seed))
    return g


def derive_seed(generator: torch.Generator) -> int:
    """A fresh seed drawn from ``generator`` (to seed a forked global stream)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


def _cuda_devices() -> list:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return list(range(torch.cuda.device_count()))


@contextlib.contextmanager
def seeded(seed: int | None):
    """Run with torch's global RNG (CPU and initialised CUDA devices) seeded with ``seed``
    and restored afterwards; ``None`` leaves the global RNG alone."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=_cuda_devices()):
        torch.manual_seed(int(seed))
        yield


def seeded_from(generator: torch.Generator | None):
    """:func:`seeded` with a seed drawn from ``generator`` (None: global RNG untouched)."""
    return seeded(None if generator is None else derive_seed(generator))

"""Torch's default floating dtype, switched only for the region that creates tensors.

Model programs, priors and structural functions write literals (``torch.tensor(0.5)``,
``dist.Normal(0.0, 1.0)``) that land in torch's default dtype; a float64 fit runs them
under :func:`default_dtype`, which switches the default only when it differs and restores
it on exit, so torch's process-wide default is never left changed.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["default_dtype"]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | None):
    """Make ``dtype`` torch's default floating dtype inside the block (no-op for None or
    the current default); the previous default is restored on exit, also on error."""
    old = torch.get_default_dtype()
    switch = dtype is not None and dtype != old
    if switch:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        if switch:
            torch.set_default_dtype(old)

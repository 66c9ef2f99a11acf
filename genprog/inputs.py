"""Conversion of user inputs (tensors, NumPy arrays, pandas columns) to tensors."""

from __future__ import annotations

import numbers

import numpy as np
import torch


def as_tensor(x, device=None, dtype=None, name: str = "value"):
    """Convert ``x`` to a tensor on ``device``; floating data take ``dtype``.

    Tensors, NumPy arrays, pandas Series/Index/DataFrames and nested lists of numbers are
    converted; booleans and integers keep an integer dtype. Other objects (None, strings,
    modules, callables, Python scalars) are returned unchanged.

    Raises
    ------
    TypeError
        For arrays of strings, Python objects or complex numbers, naming ``name``.
    ValueError
        For finite values that overflow the target dtype (e.g. 1e300 cast to float32).
    """
    if hasattr(x, "to_numpy") and not torch.is_tensor(x):  # pandas
        x = x.to_numpy()
    if isinstance(x, (list, tuple)) and x and all(isinstance(v, numbers.Number) for v in x):
        x = np.asarray(x)
    if isinstance(x, np.ndarray):
        if x.dtype.kind == "c":
            raise TypeError(f"{name}: expected real numbers, got complex values ({x.dtype})")
        if x.dtype.kind in "OUSV":
            try:
                x = x.astype(np.float64)
            except (TypeError, ValueError):
                raise TypeError(
                    f"{name}: expected numbers, got an array of {x.dtype} "
                    f"(first value {x.reshape(-1)[0]!r})"
                ) from None
        shape = x.shape
        arr = np.ascontiguousarray(x)
        if not arr.flags.writeable:  # pandas 3 hands out read-only views
            arr = arr.copy()
        x = torch.from_numpy(arr).reshape(shape)
    if torch.is_tensor(x):
        if x.is_complex():
            raise TypeError(f"{name}: expected real numbers, got complex values ({x.dtype})")
        if x.is_floating_point():
            target = dtype or torch.get_default_dtype()
            y = x.to(device=device, dtype=target)
            if target != x.dtype:
                _check_no_overflow(x, y, name)
            x = y
        elif device is not None:
            x = x.to(device=device)
    return x


def tensor_device(values) -> torch.device | None:
    """The first CUDA device among tensors in ``values`` (an iterable), else None."""
    for v in values:
        if torch.is_tensor(v) and v.device.type != "cpu":
            return v.device
    return None


def _check_no_overflow(before: torch.Tensor, after: torch.Tensor, name: str) -> None:
    """Finite values that became infinite in the cast to ``after.dtype`` are an error."""
    overflow = torch.isfinite(before) & ~torch.isfinite(after.to(before.device))
    if bool(overflow.any()):
        idx = tuple(int(i) for i in overflow.nonzero()[0])
        value = float(before[idx]) if idx else float(before)
        limit = torch.finfo(after.dtype).max
        raise ValueError(
            f"{name}: value {value:.6g} at index {list(idx)} overflows {after.dtype} "
            f"(largest {limit:.4g}); rescale the data or use model.to(dtype=torch.float64)"
        )

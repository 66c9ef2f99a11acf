"""Pyro's log-space einsum backend, runnable under ``torch.func.vmap``.

Summing enumerated discrete sites out (``pyro.ops.contract.contract_to_tensor``) runs
``opt_einsum`` with the backend ``pyro.ops.einsum.torch_log``, whose ``safe_log`` is an
old-style ``torch.autograd.Function`` that functorch transforms refuse. This module is
the same backend with a ``safe_log`` that defines ``setup_context`` and a generated vmap
rule; :class:`VmapLogRing` selects it. Values and gradients equal Pyro's.
"""

from __future__ import annotations

import torch
from pyro.ops.einsum.util import Tensordot
from pyro.ops.rings import LogRing

__all__ = ["VmapLogRing", "einsum", "tensordot", "transpose"]


class _SafeLog(torch.autograd.Function):
    """``log x`` whose gradient is clamped at ``x = 0`` (as ``pyro.ops.special.safe_log``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.log()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / x.clamp(min=torch.finfo(x.dtype).eps)


def transpose(a, axes):
    return a.permute(axes)


def einsum(equation, *operands):
    """Log-sum-exp einsum (``pyro.ops.einsum.torch_log.einsum``, vmap-safe log)."""
    symbols = sorted(set(equation) - set(",->"))
    rename = dict(zip(symbols, "abcdefghijklmnopqrstuvwxyz"))
    equation = "".join(rename.get(s, s) for s in equation)
    inputs, output = equation.split("->")
    if inputs == output:
        return operands[0].clone()
    inputs = inputs.split(",")
    shifts, exp_operands = [], []
    for dims, operand in zip(inputs, operands):
        shift = operand.detach()
        for i, dim in enumerate(dims):
            if dim not in output:
                shift = shift.max(i, keepdim=True)[0]
        shift = shift.clamp(min=torch.finfo(shift.dtype).min)  # no nan from -inf - -inf
        exp_operands.append((operand - shift).exp())
        shift = shift.reshape(torch.Size(size for size, dim in zip(operand.shape, dims) if dim in output))
        if shift.dim():
            shift = shift.reshape((1,) * (len(output) - shift.dim()) + shift.shape)
            dims = [dim for dim in dims if dim in output]
            dims = [dim for dim in output if dim not in dims] + dims
            shift = shift.permute(*(dims.index(dim) for dim in output))
        shifts.append(shift)
    result = _SafeLog.apply(torch.einsum(equation, exp_operands))
    return sum(shifts + [result])


tensordot = Tensordot(einsum)


class VmapLogRing(LogRing):
    """Pyro's :class:`~pyro.ops.rings.LogRing` on the vmap-safe backend above."""

    _backend = "genprog.vmap_einsum"

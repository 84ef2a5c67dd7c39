"""Small autograd functions of the engine whose backward is laid out for the GEMMs.

:func:`batched_linear` is ``torch.baddbmm(bias, x, weight.transpose(1, 2))`` (one ``nn.Linear``
per region, weights stacked on a leading region axis) with a backward that computes the weight
gradient directly in the weight's own (R, out, in) layout, ``grad^T @ x``. Autograd's baddbmm
backward computes ``x^T @ grad`` in (R, in, out) and transposes it; the accumulation into the
parameter's ``.grad`` then copies it to the parameter's strides: for the 116 first linear layers
(122M values) one 0.83 ms copy per training step of 16 subjects, 17 % of the step on an H200
(``docs/benchmarks.md``, the step profile). Same products, same device, no atomics.
"""

from __future__ import annotations

import torch


class _BatchedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.bmm(grad, weight)  # (R, S, out) @ (R, out, in)
        if ctx.needs_input_grad[1]:
            gw = torch.bmm(grad.transpose(1, 2), x)  # (R, out, S) @ (R, S, in): weight layout
        if ctx.needs_input_grad[2]:
            gb = grad.sum(1)
        return gx, gw, gb


def batched_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(R, S, in) x (R, out, in) + (R, out) -> (R, S, out), one linear layer per region."""
    return _BatchedLinear.apply(x, weight, bias)

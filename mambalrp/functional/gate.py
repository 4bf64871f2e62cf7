"""Multiplicative gate with the half rule: each factor receives half of the output relevance."""

from __future__ import annotations

import torch


class HalfGateFn(torch.autograd.Function):
    """Forward: ``a * b``. Backward: ``da = g * b / 2``, ``db = g * a / 2``."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        a, b = ctx.saved_tensors
        da = 0.5 * grad_out * b if ctx.needs_input_grad[0] else None
        db = 0.5 * grad_out * a if ctx.needs_input_grad[1] else None
        if da is not None and da.shape != a.shape:
            da = _unbroadcast(da, a.shape)
        if db is not None and db.shape != b.shape:
            db = _unbroadcast(db, b.shape)
        return da, db


def _unbroadcast(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    for i, n in enumerate(shape):
        if n == 1 and grad.shape[i] != 1:
            grad = grad.sum(i, keepdim=True)
    return grad


def half_gate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Multiply two tensors, splitting the output relevance equally between the factors.

    Args:
        a: First factor (for Mamba: the SSM output ``y``).
        b: Second factor (for Mamba: the gate ``silu(z)``), broadcastable with ``a``.

    Returns:
        ``a * b``, bit-identical to the plain product.
    """
    return HalfGateFn.apply(a, b)


def half_gate_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`half_gate`: ``0.5 * (a * b.detach()) + 0.5 * (a.detach() * b)``."""
    return 0.5 * (a * b.detach()) + 0.5 * (a.detach() * b)

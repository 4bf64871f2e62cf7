"""SiLU with the identity rule: ``y = x * sigmoid(x)`` with ``sigmoid(x)`` treated as constant."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SiLUIdentityFn(torch.autograd.Function):
    """Forward: ``silu(x)``. Backward: ``dx = g * sigmoid(x)`` (so ``x * dx = y * g``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return F.silu(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad_out * torch.sigmoid(x)


def silu_identity(x: torch.Tensor) -> torch.Tensor:
    """Apply SiLU whose backward passes relevance by the identity rule.

    Args:
        x: Input of any shape.

    Returns:
        ``silu(x)``, bit-identical to :func:`torch.nn.functional.silu`.
    """
    return SiLUIdentityFn.apply(x)


def silu_identity_ref(x: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`silu_identity`: ``x * sigmoid(x).detach()``."""
    return x * torch.sigmoid(x).detach()

"""The identity rule for any element-wise activation ``f`` with ``f(0) = 0`` (SiLU, GELU, ReLU,
squared ReLU, ...): the output relevance passes unchanged to the input, ``R_x = R_y``.

In gradient form ``dx = g * f(x) / x`` (``f(x) / x`` held constant, as the SiLU rule holds
``sigmoid(x)``); where ``x == 0`` both relevances are zero and ``dx = 0``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class IdentityRuleFn(torch.autograd.Function):
    """Forward: ``f(x)``. Backward: ``dx = g * f(x) / x`` (0 where ``x == 0``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        y = fn(x)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, y = ctx.saved_tensors
        ratio = torch.where(x == 0, torch.zeros_like(y), y / torch.where(x == 0, torch.ones_like(x), x))
        return grad_out * ratio, None


def identity_rule(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply the element-wise activation ``fn`` with the identity rule in its backward.

    Args:
        x: Input.
        fn: Element-wise activation with ``fn(0) = 0`` (e.g. an ``ACT2FN`` module).

    Returns:
        ``fn(x)``, bit-identical to calling ``fn``.
    """
    return IdentityRuleFn.apply(x, fn)


def identity_rule_ref(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Reference of :func:`identity_rule`: ``x * (fn(x) / x).detach()`` (for ``x != 0``)."""
    return x * (fn(x) / x).detach()

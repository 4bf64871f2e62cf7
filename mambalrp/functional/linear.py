"""Epsilon and gamma rules for linear maps (``nn.Linear`` and Mamba's depthwise causal conv1d).

LRP-0 on a linear map is its plain gradient, so it needs no operator. The epsilon and gamma rules
are written in gradient form (``x * dx`` is the rule's input relevance when ``y * g`` is the
output relevance) so that they compose with the detach-style Mamba rules. Stock zennit rules
instead hand relevance (not gradients) to the next layer and give wrong numbers when mixed with
gradient-form rules.

Gamma is the generalised rule for signed inputs: for an output with ``z_k >= 0`` the positive
contributions ``(x_j w_jk)^+`` are boosted by ``gamma``; for ``z_k < 0`` the negative ones.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LinearOp = Literal["linear", "conv"]


def _apply_op(op: LinearOp, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if op == "linear":
        return F.linear(x, weight, bias)
    if op == "conv":
        return causal_conv1d(x, weight, bias)
    raise ValueError(f"unknown linear op {op!r}; expected 'linear' or 'conv'")


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal convolution ``(batch, channels, time)`` as in Mamba's mixers.

    Args:
        x: Input ``(b, d, T)``.
        weight: ``(d, 1, k)`` or ``(d, k)``.
        bias: ``(d,)`` or ``None``.

    Returns:
        ``(b, d, T)``: output ``t`` sees inputs ``t-k+1 .. t``.
    """
    if weight.dim() == 2:
        weight = weight.unsqueeze(1)
    width = weight.shape[-1]
    out = F.conv1d(x.to(weight.dtype), weight, bias, padding=width - 1, groups=weight.shape[0])
    return out[..., : x.shape[-1]]


def _vjp(op: LinearOp, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Transpose of the bias-free linear map ``x -> op(x, weight)`` applied to ``grad``."""
    if op == "linear":
        return grad @ weight
    with torch.enable_grad():
        leaf = torch.zeros_like(x, requires_grad=True)
        out = _apply_op(op, leaf, weight, None)
        (dx,) = torch.autograd.grad(out, leaf, grad)
    return dx


def _stabilise(den: torch.Tensor, tiny: float = 1e-12) -> torch.Tensor:
    return den + torch.where(den >= 0, tiny, -tiny)


class EpsilonLinearFn(torch.autograd.Function):
    """Forward: ``op(x, W, b)``. Backward: ``dx = W^T (g * z / (z + eps * sign(z)))``."""

    @staticmethod
    def forward(ctx, x, weight, bias, epsilon: float, op: LinearOp):
        z = _apply_op(op, x, weight, bias)
        ctx.save_for_backward(x, weight, z)
        ctx.epsilon, ctx.op = epsilon, op
        return z

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, z = ctx.saved_tensors
        den = z + ctx.epsilon * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
        s = grad_out * z / _stabilise(den)
        return _vjp(ctx.op, x, weight, s), None, None, None, None


class GammaLinearFn(torch.autograd.Function):
    """Forward: ``op(x, W, b)``. Backward: the generalised gamma rule in gradient form."""

    @staticmethod
    def forward(ctx, x, weight, bias, gamma: float, op: LinearOp):
        z = _apply_op(op, x, weight, bias)
        ctx.save_for_backward(x, weight, z)
        ctx.gamma, ctx.op = gamma, op
        return z

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, z = ctx.saved_tensors
        op, gamma = ctx.op, ctx.gamma
        wp, wn = weight.clamp(min=0), weight.clamp(max=0)
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        z_pos = _apply_op(op, xp, wp, None) + _apply_op(op, xn, wn, None)
        z_neg = _apply_op(op, xp, wn, None) + _apply_op(op, xn, wp, None)
        up = z >= 0
        den = z + gamma * torch.where(up, z_pos, z_neg)
        s = grad_out * z / _stabilise(den)
        s_pos, s_neg = s * up, s * ~up
        boost_pos_x = _vjp(op, x, wp, s_pos) + _vjp(op, x, wn, s_neg)
        boost_neg_x = _vjp(op, x, wn, s_pos) + _vjp(op, x, wp, s_neg)
        dx = _vjp(op, x, weight, s) + gamma * ((x > 0) * boost_pos_x + (x < 0) * boost_neg_x)
        return dx, None, None, None, None


def epsilon_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    epsilon: float,
    op: LinearOp = "linear",
) -> torch.Tensor:
    """Linear map with the epsilon rule.

    Args:
        x: Input.
        weight: Weight of ``op``.
        bias: Bias or ``None``.
        epsilon: Stabiliser added to the magnitude of each pre-activation.
        op: ``"linear"`` (``F.linear``) or ``"conv"`` (depthwise causal conv1d).

    Returns:
        ``op(x, weight, bias)``, bit-identical to the plain map.
    """
    return EpsilonLinearFn.apply(x, weight, bias, float(epsilon), op)


def gamma_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: float,
    op: LinearOp = "linear",
) -> torch.Tensor:
    """Linear map with the generalised gamma rule (signed inputs).

    Args:
        x: Input.
        weight: Weight of ``op``.
        bias: Bias or ``None``.
        gamma: Boost of the contributions that agree in sign with the pre-activation.
        op: ``"linear"`` or ``"conv"``.

    Returns:
        ``op(x, weight, bias)``, bit-identical to the plain map.
    """
    return GammaLinearFn.apply(x, weight, bias, float(gamma), op)


def epsilon_linear_ref(x, weight, bias, epsilon: float, op: LinearOp = "linear") -> torch.Tensor:
    """Reference of :func:`epsilon_linear`: ``den * (z / den).detach()``."""
    z = _apply_op(op, x, weight, bias)
    den = z + epsilon * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
    return den * (z / den).detach()


def gamma_linear_ref(x, weight, bias, gamma: float, op: LinearOp = "linear") -> torch.Tensor:
    """Reference of :func:`gamma_linear`: ``z_gamma * (z / z_gamma).detach()``."""
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    z = _apply_op(op, x, weight, bias)
    z_pos = _apply_op(op, xp, wp, None) + _apply_op(op, xn, wn, None)
    z_neg = _apply_op(op, xp, wn, None) + _apply_op(op, xn, wp, None)
    den = z + gamma * torch.where(z.detach() >= 0, z_pos, z_neg)
    return den * (z / den).detach()

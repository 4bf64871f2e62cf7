"""Epsilon and gamma rules for linear maps (``nn.Linear`` and depthwise conv1d, causal as in
Mamba's mixers or padded on both sides).

LRP-0 on a linear map is its plain gradient, so it needs no operator. The epsilon and gamma rules
are written in gradient form (``x * dx`` is the rule's input relevance when ``y * g`` is the
output relevance) so that they compose with the detach-style Mamba rules. Stock zennit rules
instead hand relevance (not gradients) to the next layer and give wrong numbers when mixed with
gradient-form rules.

Gamma is the generalised rule for signed inputs: for an output with ``z_k >= 0`` the positive
contributions ``(x_j w_jk)^+`` are boosted by ``gamma``; for ``z_k < 0`` the negative ones.
"""

from __future__ import annotations

from typing import Literal, Union

import torch
import torch.nn.functional as F

LinearOp = Literal["linear", "conv"]
ConvPadding = Union[Literal["causal", "same"], tuple[int, int]]
"""How a depthwise conv1d pads time: ``"causal"`` (``kernel - 1`` zeros before, none after),
``"same"`` (``(kernel - 1) // 2`` before, the rest after, as ``nn.Conv1d(padding="same")``), or
``(left, right)`` zeros."""


def _apply_op(
    op: LinearOp, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: ConvPadding = "causal"
) -> torch.Tensor:
    if op == "linear":
        return F.linear(x, weight, bias)
    if op == "conv":
        return depthwise_conv1d(x, weight, bias, padding)
    raise ValueError(f"unknown linear op {op!r}; expected 'linear' or 'conv'")


def conv_padding(padding: ConvPadding, kernel: int) -> tuple[int, int]:
    """The ``(left, right)`` zeros that ``padding`` adds around the time axis for a kernel of
    ``kernel`` taps.

    Raises:
        ValueError: ``padding`` is neither ``"causal"``, ``"same"`` nor two non-negative ints.
    """
    if padding == "causal":
        return kernel - 1, 0
    if padding == "same":
        return (kernel - 1) // 2, kernel - 1 - (kernel - 1) // 2
    if (
        isinstance(padding, (tuple, list)) and len(padding) == 2
        and all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in padding)
    ):
        return int(padding[0]), int(padding[1])
    raise ValueError(f"padding must be 'causal', 'same' or (left, right) non-negative ints; got {padding!r}")


def depthwise_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: ConvPadding = "causal"
) -> torch.Tensor:
    """Depthwise convolution ``(batch, channels, time)`` with causal, "same" or explicit padding.

    A conv is linear in its input: its plain gradient is LRP-0, exact and conserving up to what
    the bias absorbs. Under the epsilon and gamma rules use :func:`epsilon_linear` /
    :func:`gamma_linear` with ``op="conv"`` and the same ``padding`` (or
    :meth:`mambalrp.RuleSet.conv1d`, which picks the rule set's linear rule).

    Args:
        x: Input ``(b, d, T)``.
        weight: ``(d, 1, k)`` or ``(d, k)``; output ``t`` is ``sum_j weight[:, j] * xpad[t + j]``
            where ``xpad`` is ``x`` with ``left`` zeros before and ``right`` after (the
            cross-correlation of ``torch.nn.functional.conv1d``).
        bias: ``(d,)`` or ``None``.
        padding: ``"causal"`` (output ``t`` sees inputs ``t-k+1 .. t``: Mamba's conv),
            ``"same"`` (as ``nn.Conv1d(padding="same")``: output ``t`` also sees ``k - 1 - (k - 1) // 2``
            later inputs), or ``(left, right)``.

    Returns:
        ``(b, d, T + left + right - k + 1)``: ``(b, d, T)`` for ``"causal"`` and ``"same"``.
    """
    if weight.dim() == 2:
        weight = weight.unsqueeze(1)
    left, right = conv_padding(padding, weight.shape[-1])
    if (left, right) == (weight.shape[-1] - 1, 0):
        return causal_conv1d(x, weight, bias)
    x = F.pad(x.to(weight.dtype), (left, right))
    return F.conv1d(x, weight, bias, groups=weight.shape[0])


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


def _vjp(op: LinearOp, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, padding: ConvPadding = "causal") -> torch.Tensor:
    """Transpose of the bias-free linear map ``x -> op(x, weight)`` applied to ``grad``."""
    if op == "linear":
        return grad @ weight
    with torch.enable_grad():
        leaf = torch.zeros_like(x, requires_grad=True)
        out = _apply_op(op, leaf, weight, None, padding)
        (dx,) = torch.autograd.grad(out, leaf, grad)
    return dx


def _stabilise(den: torch.Tensor, tiny: float = 1e-12) -> torch.Tensor:
    return den + torch.where(den >= 0, tiny, -tiny)


class EpsilonLinearFn(torch.autograd.Function):
    """Forward: ``op(x, W, b)``. Backward: ``dx = W^T (g * z / (z + eps * sign(z)))``."""

    @staticmethod
    def forward(ctx, x, weight, bias, epsilon: float, op: LinearOp, padding: ConvPadding = "causal"):
        z = _apply_op(op, x, weight, bias, padding)
        ctx.save_for_backward(x, weight, z)
        ctx.epsilon, ctx.op, ctx.padding = epsilon, op, padding
        return z

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, z = ctx.saved_tensors
        den = z + ctx.epsilon * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
        s = grad_out * z / _stabilise(den)
        return _vjp(ctx.op, x, weight, s, ctx.padding), None, None, None, None, None


class GammaLinearFn(torch.autograd.Function):
    """Forward: ``op(x, W, b)``. Backward: the generalised gamma rule in gradient form."""

    @staticmethod
    def forward(ctx, x, weight, bias, gamma: float, op: LinearOp, padding: ConvPadding = "causal"):
        z = _apply_op(op, x, weight, bias, padding)
        ctx.save_for_backward(x, weight, z)
        ctx.gamma, ctx.op, ctx.padding = gamma, op, padding
        return z

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, z = ctx.saved_tensors
        op, gamma, pad = ctx.op, ctx.gamma, ctx.padding
        wp, wn = weight.clamp(min=0), weight.clamp(max=0)
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        z_pos = _apply_op(op, xp, wp, None, pad) + _apply_op(op, xn, wn, None, pad)
        z_neg = _apply_op(op, xp, wn, None, pad) + _apply_op(op, xn, wp, None, pad)
        up = z >= 0
        den = z + gamma * torch.where(up, z_pos, z_neg)
        s = grad_out * z / _stabilise(den)
        s_pos, s_neg = s * up, s * ~up
        boost_pos_x = _vjp(op, x, wp, s_pos, pad) + _vjp(op, x, wn, s_neg, pad)
        boost_neg_x = _vjp(op, x, wn, s_pos, pad) + _vjp(op, x, wp, s_neg, pad)
        dx = _vjp(op, x, weight, s, pad) + gamma * ((x > 0) * boost_pos_x + (x < 0) * boost_neg_x)
        return dx, None, None, None, None, None


def epsilon_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    epsilon: float,
    op: LinearOp = "linear",
    padding: ConvPadding = "causal",
) -> torch.Tensor:
    """Linear map with the epsilon rule.

    Args:
        x: Input.
        weight: Weight of ``op``.
        bias: Bias or ``None``.
        epsilon: Stabiliser added to the magnitude of each pre-activation.
        op: ``"linear"`` (``F.linear``) or ``"conv"`` (:func:`depthwise_conv1d`).
        padding: The conv's padding (see :func:`depthwise_conv1d`); ignored for ``"linear"``.

    Returns:
        ``op(x, weight, bias)``, bit-identical to the plain map.
    """
    return EpsilonLinearFn.apply(x, weight, bias, float(epsilon), op, padding)


def gamma_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: float,
    op: LinearOp = "linear",
    padding: ConvPadding = "causal",
) -> torch.Tensor:
    """Linear map with the generalised gamma rule (signed inputs).

    Args:
        x: Input.
        weight: Weight of ``op``.
        bias: Bias or ``None``.
        gamma: Boost of the contributions that agree in sign with the pre-activation.
        op: ``"linear"`` or ``"conv"``.
        padding: The conv's padding (see :func:`depthwise_conv1d`); ignored for ``"linear"``.

    Returns:
        ``op(x, weight, bias)``, bit-identical to the plain map.
    """
    return GammaLinearFn.apply(x, weight, bias, float(gamma), op, padding)


def epsilon_linear_ref(x, weight, bias, epsilon: float, op: LinearOp = "linear", padding: ConvPadding = "causal") -> torch.Tensor:
    """Reference of :func:`epsilon_linear`: ``den * (z / den).detach()``."""
    z = _apply_op(op, x, weight, bias, padding)
    den = z + epsilon * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
    return den * (z / den).detach()


def gamma_linear_ref(x, weight, bias, gamma: float, op: LinearOp = "linear", padding: ConvPadding = "causal") -> torch.Tensor:
    """Reference of :func:`gamma_linear`: ``z_gamma * (z / z_gamma).detach()``."""
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    z = _apply_op(op, x, weight, bias, padding)
    z_pos = _apply_op(op, xp, wp, None, padding) + _apply_op(op, xn, wn, None, padding)
    z_neg = _apply_op(op, xp, wn, None, padding) + _apply_op(op, xn, wp, None, padding)
    den = z + gamma * torch.where(z.detach() >= 0, z_pos, z_neg)
    return den * (z / den).detach()

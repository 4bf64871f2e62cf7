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
    if weight.shape[1] != 1 or x.dim() != 3 or x.shape[1] != weight.shape[0]:
        raise ValueError(f"depthwise conv1d needs x (b, d, T) and weight (d, 1, k); got {tuple(x.shape)} and {tuple(weight.shape)}")
    left, right = conv_padding(padding, weight.shape[-1])
    if x.shape[-1] + left + right < weight.shape[-1]:
        raise ValueError(f"a kernel of {weight.shape[-1]} taps does not fit {x.shape[-1]} steps padded by {(left, right)}")
    x = x.to(weight.dtype)
    # Time-major memory (a transposed view, as Mamba's mixers pass the in_proj output) is
    # convolved as it lies, so neither direction transposes anything and the result stays
    # time-major (the mixer's later element-wise steps and the scan then read contiguous rows).
    time_major = x.stride(1) == 1 and x.stride(-1) != 1
    if time_major:
        out = DepthwiseConv1dFn.apply(x.transpose(1, 2), weight, left, right, 1).transpose(1, 2)
    else:
        out = DepthwiseConv1dFn.apply(x, weight, left, right, 2)
    # The bias is added outside the Function: a visible addition, as the conservation checks
    # expect (they find the parameters that absorb relevance by watching additions).
    return out if bias is None else out + bias.to(out.dtype)[:, None]


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal convolution ``(batch, channels, time)`` as in Mamba's mixers.

    Args:
        x: Input ``(b, d, T)``.
        weight: ``(d, 1, k)`` or ``(d, k)``.
        bias: ``(d,)`` or ``None``.

    Returns:
        ``(b, d, T)``: output ``t`` sees inputs ``t-k+1 .. t``.
    """
    return depthwise_conv1d(x, weight, bias, "causal")


class DepthwiseConv1dFn(torch.autograd.Function):
    """Bias-free depthwise conv1d with ``left`` / ``right`` zeros around time, as one shifted
    multiply-add per tap, forward and backward. ``apply(x, weight (d, 1, k), left, right,
    time_dim)``: ``x`` is ``(b, d, T)`` with ``time_dim=2`` or ``(b, T, d)`` with ``time_dim=1``, and
    the result is laid out the same way."""

    @staticmethod
    def forward(ctx, x, weight, left: int, right: int, time_dim: int):
        ctx.save_for_backward(x, weight)
        ctx.left, ctx.time_dim = left, time_dim
        return _shifted_taps(x, weight[:, 0], left, x.shape[time_dim] + left + right - weight.shape[-1] + 1, time_dim)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        left, k, time_dim = ctx.left, weight.shape[-1], ctx.time_dim
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # Output t reads input t + j - left through tap j: input s gets tap j of output s - j + left.
            dx = _shifted_taps(grad, weight[:, 0].flip(-1), k - 1 - left, x.shape[time_dim], time_dim)
        if ctx.needs_input_grad[1]:
            dw = torch.stack([_tap_product(grad, x, j - left, time_dim) for j in range(k)], dim=-1).unsqueeze(1)
        return dx, dw, None, None, None


def _steps(t: torch.Tensor, lo: int, hi: int, time_dim: int) -> torch.Tensor:
    return t.narrow(time_dim, lo, hi - lo)


def _shifted_taps(v: torch.Tensor, taps: torch.Tensor, left: int, length: int, time_dim: int) -> torch.Tensor:
    """``out[t] = sum_j taps[:, j] * v[t + j - left]`` along ``time_dim`` for ``t < length`` (zero
    where ``v`` has no step); ``taps (d, k)``, channels the other non-batch dimension."""
    shape = list(v.shape)
    steps, shape[time_dim] = shape[time_dim], length
    per_channel = taps.t() if time_dim == 1 else taps.t().unsqueeze(-1)  # (k, d) or (k, d, 1)
    spans = [(j, max(0, left - j), min(length, steps + left - j)) for j in range(taps.shape[-1])]
    # A tap that reads a step for every output (the unshifted one of a causal conv) writes first.
    first = next((j for j, lo, hi in spans if lo == 0 and hi == length), None)
    out = v.new_zeros(shape) if first is None else torch.mul(_steps(v, first - left, first - left + length, time_dim), per_channel[first])
    for j, lo, hi in spans:
        if j != first and lo < hi:  # output t reads v[t + j - left]
            _steps(out, lo, hi, time_dim).addcmul_(_steps(v, lo + j - left, hi + j - left, time_dim), per_channel[j])
    return out


def _tap_product(grad: torch.Tensor, x: torch.Tensor, shift: int, time_dim: int) -> torch.Tensor:
    """``sum over batch and t of grad[t] * x[t + shift]`` where both exist: ``(d,)``."""
    lo, hi = max(0, -shift), min(grad.shape[time_dim], x.shape[time_dim] - shift)
    channels = 3 - time_dim
    if lo >= hi:
        return grad.new_zeros(grad.shape[channels])
    product = _steps(grad, lo, hi, time_dim) * _steps(x, lo + shift, hi + shift, time_dim)
    return product.sum((0, time_dim))


class SplitLinearFn(torch.autograd.Function):
    """``x @ weight.T`` split along its last dimension into parts of ``sizes``.

    The backward multiplies only the parts that receive a gradient, each by its own rows of
    ``weight``, accumulating into one input gradient: no concatenation of the parts' gradients,
    and nothing multiplied for a part that is held constant (a Mamba-2 ``in_proj``'s ``B``,
    ``C`` and ``dt`` under the SSM rule).
    """

    @staticmethod
    def forward(ctx, x, weight, sizes: tuple[int, ...]):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight)
        ctx.sizes = sizes
        return tuple(F.linear(x, weight).split(list(sizes), dim=-1))

    @staticmethod
    def backward(ctx, *grads):
        x, weight = ctx.saved_tensors
        bounds = [0]
        for size in ctx.sizes:
            bounds.append(bounds[-1] + size)
        parts = [(g.reshape(-1, g.shape[-1]), bounds[i], bounds[i + 1]) for i, g in enumerate(grads) if g is not None]
        dx = dw = None
        if ctx.needs_input_grad[0] and parts:
            flat = None
            for g, lo, hi in parts:
                flat = torch.mm(g, weight[lo:hi]) if flat is None else flat.addmm_(g, weight[lo:hi])
            dx = flat.view(*x.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1] and parts:
            dw = weight.new_zeros(weight.shape)
            rows = x.reshape(-1, x.shape[-1])
            for g, lo, hi in parts:
                dw[lo:hi] = g.t() @ rows
        return dx, dw, None


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int] | tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """``F.linear(x, weight, bias).split(sizes, dim=-1)`` whose backward multiplies only the parts
    that receive a gradient (:class:`SplitLinearFn`): the plain gradient (LRP-0) of a linear
    map whose output is used in parts.

    Args:
        x: Input ``(..., in)``.
        weight: ``(out, in)`` with ``out == sum(sizes)``.
        bias: ``(out,)`` or ``None`` (added to each part outside the Function, a visible
            addition, as the conservation checks expect).
        sizes: Widths of the parts.

    Returns:
        The parts, ``(..., size)`` each.
    """
    sizes = tuple(int(n) for n in sizes)
    if sum(sizes) != weight.shape[0]:
        raise ValueError(f"parts of widths {list(sizes)} do not split an output of width {weight.shape[0]}")
    parts = SplitLinearFn.apply(x, weight, sizes)
    if bias is None:
        return parts
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return tuple(part + bias[lo:hi] for part, lo, hi in zip(parts, bounds, bounds[1:]))


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

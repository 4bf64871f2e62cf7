"""RMSNorm and LayerNorm with the LN-rule: the normaliser ``1 / rms(x)`` (``1 / std(x)``) is
treated as a constant; LayerNorm's centring ``x - mean(x)`` is linear and stays as it is.

Also covers Mamba-2's grouped, gated RMSNorm ``norm(x * silu(z))`` (or ``norm(x) * silu(z)`` when
the norm comes before the gate): the gate uses the half rule, SiLU the identity rule, and the
normaliser of each group is constant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambalrp.functional.gate import half_gate, half_gate_ref
from mambalrp.functional.silu import silu_identity, silu_identity_ref


def _rstd(x32: torch.Tensor, eps: float, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``x`` viewed as groups (float32) and the reciprocal RMS of each group."""
    if group_size is None:
        group_size = x32.shape[-1]
    if x32.shape[-1] % group_size:
        raise ValueError(f"last dimension {x32.shape[-1]} is not a multiple of group_size {group_size}")
    grouped = x32.view(*x32.shape[:-1], x32.shape[-1] // group_size, group_size)
    rstd = torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return grouped, rstd


class RMSNormLRPFn(torch.autograd.Function):
    """Forward: ``weight * x / rms(x)`` (per group). Backward: ``dx = g * weight / rms(x)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None):
        grouped, rstd = _rstd(x.float(), eps, group_size)
        normed = (grouped * rstd).view(x.shape).to(x.dtype)
        ctx.save_for_backward(weight, rstd)
        ctx.x_dtype = x.dtype
        return weight * normed

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight, rstd = ctx.saved_tensors
        g = (grad_out * weight).float()
        grouped = g.view(*g.shape[:-1], rstd.shape[-2], -1)
        dx = (grouped * rstd).view(g.shape).to(ctx.x_dtype)
        return dx, None, None, None


def rmsnorm_lrp(
    x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None = None
) -> torch.Tensor:
    """RMSNorm whose backward follows the LN-rule.

    Args:
        x: Input ``(..., d)``.
        weight: Scale ``(d,)``.
        eps: Added to the mean square.
        group_size: Normalise groups of this many channels separately (Mamba-2); ``None`` for one
            group.

    Returns:
        ``weight * (x / rms(x)).to(x.dtype)``, computed in float32 like the HF implementation.
    """
    return RMSNormLRPFn.apply(x, weight, eps, group_size)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None = None) -> torch.Tensor:
    """Plain RMSNorm with its true gradient (the same forward as :func:`rmsnorm_lrp`)."""
    grouped, rstd = _rstd(x.float(), eps, group_size)
    return weight * (grouped * rstd).view(x.shape).to(x.dtype)


def rmsnorm_lrp_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None = None
) -> torch.Tensor:
    """Reference of :func:`rmsnorm_lrp`: the normaliser is detached."""
    grouped, rstd = _rstd(x.float(), eps, group_size)
    return weight * (grouped * rstd.detach()).view(x.shape).to(x.dtype)


def gated_rmsnorm(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int | None = None,
    norm_before_gate: bool = False,
    *,
    ln_rule: bool = True,
    half_rule: bool = True,
    identity_rule: bool = True,
) -> torch.Tensor:
    """Mamba-2's gated RMSNorm with each of its three rules switchable.

    Args:
        x: SSM output ``(..., d)``.
        z: Gate pre-activation ``(..., d)``.
        weight: Scale ``(d,)``.
        eps: Added to the mean square.
        group_size: Channels per normalisation group.
        norm_before_gate: ``norm(x) * silu(z)`` if true, else ``norm(x * silu(z))`` (HF default).
        ln_rule: Treat the normaliser as constant.
        half_rule: Split relevance equally between ``x`` and the gate.
        identity_rule: Use the identity rule inside ``silu(z)``.

    Returns:
        The gated, normalised tensor in ``x.dtype``, equal to the HF forward.
    """
    norm = rmsnorm_lrp if ln_rule else rmsnorm
    gate = half_gate if half_rule else torch.mul
    act = silu_identity(z.float()) if identity_rule else F.silu(z.float())
    if norm_before_gate:
        return gate(norm(x, weight, eps, group_size).float(), act).to(x.dtype)
    gated = gate(x.float(), act)
    return norm(gated, weight, eps, group_size).to(x.dtype)


def gated_rmsnorm_ref(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """Reference of :func:`gated_rmsnorm` with all three rules, written with ``detach()``."""
    act = silu_identity_ref(z.float())
    if norm_before_gate:
        return half_gate_ref(rmsnorm_lrp_ref(x, weight, eps, group_size).float(), act).to(x.dtype)
    return rmsnorm_lrp_ref(half_gate_ref(x.float(), act), weight, eps, group_size).to(x.dtype)


# LayerNorm ---------------------------------------------------------------------------------------


def _layer_norm_parts(x32: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The centred input ``x - mean(x)`` and the reciprocal standard deviation (biased variance,
    as ``torch.nn.functional.layer_norm``), over the last dimension."""
    centred = x32 - x32.mean(-1, keepdim=True)
    return centred, torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 if it is float64 (for gradcheck)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _affine(normed: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    if weight is not None:
        normed = normed * _wide(weight)
    if bias is not None:
        normed = normed + _wide(bias)
    return normed


class LayerNormLRPFn(torch.autograd.Function):
    """Forward: ``(x - mean(x)) / std(x) * weight + bias``. Backward (LN-rule): ``1 / std(x)`` is
    constant, the centring is the linear map it is: ``dx = u - mean(u)`` with
    ``u = g * weight / std(x)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
        centred, rstd = _layer_norm_parts(_wide(x), eps)
        ctx.save_for_backward(weight, rstd)
        ctx.x_dtype = x.dtype
        return _affine(centred * rstd, weight, bias).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight, rstd = ctx.saved_tensors
        u = _wide(grad_out) if weight is None else _wide(grad_out) * _wide(weight)
        u = u * rstd
        dx = (u - u.mean(-1, keepdim=True)).to(ctx.x_dtype)
        return dx, None, None, None


def layer_norm_lrp(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """LayerNorm over the last dimension whose backward follows the LN-rule.

    The normaliser ``1 / std(x)`` is held constant; the centring ``x - mean(x)`` is linear in
    ``x`` and passes relevance like any linear map (LRP-0), so ``x * dx`` sums to the output's
    relevance minus what the bias absorbs (``bias * g``). Holding the mean constant too would
    not conserve: the mean would absorb ``mean(x) * sum(weight * g) / std(x)``. Only ``x``
    receives a gradient (the weight and bias are constants of the rule).

    Args:
        x: Input ``(..., d)``.
        weight: Scale ``(d,)``, or ``None`` (``elementwise_affine=False``).
        bias: Shift ``(d,)``, or ``None``.
        eps: Added to the variance.

    Returns:
        ``torch.nn.functional.layer_norm(x, (d,), weight, bias, eps)``, computed in float32
        (float64 stays float64) and cast to ``x.dtype``.
    """
    return LayerNormLRPFn.apply(x, weight, bias, float(eps))


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Plain LayerNorm with its true gradient (the same forward as :func:`layer_norm_lrp`)."""
    centred, rstd = _layer_norm_parts(_wide(x), eps)
    return _affine(centred * rstd, weight, bias).to(x.dtype)


def layer_norm_lrp_ref(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """Reference of :func:`layer_norm_lrp`: the normaliser is detached, the centring is not."""
    centred, rstd = _layer_norm_parts(_wide(x), eps)
    weight = None if weight is None else weight.detach()
    bias = None if bias is None else bias.detach()
    return _affine(centred * rstd.detach(), weight, bias).to(x.dtype)

"""Mamba-1 mixers as in mamba_ssm's ``Mamba`` (``mamba_ssm.modules.mamba_simple``).

Attribute names differ from transformers' mixer (``d_inner``, ``d_state``, ``dt_rank``); the
computation is the same: ``in_proj -> (x, z)``, causal depthwise conv1d and SiLU on ``x``, the
selective scan with ``dt = softplus(dt_proj(x_proj(x)[:rank]))``, the gate ``y * silu(z)``, and
``out_proj``. mamba_ssm's fast path fuses all of it into CUDA kernels with true gradients; the
adapter re-implements it from the weights instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mambalrp.adapters.base import (
    Adapter,
    activation_problem,
    conv_problem,
    direction_problem,
    first_problem,
    has_attrs,
    mamba1_layout_problem,
)
from mambalrp.context import LRPContext
from mambalrp.rules import RuleSet

_MAMBA_SSM_ATTRS = ("in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj", "d_inner", "d_state", "dt_rank")


def mamba1_branch(
    R: RuleSet,
    ctx: LRPContext,
    module: nn.Module,
    xz: torch.Tensor,
    conv1d: nn.Module,
    x_proj: nn.Module,
    dt_proj: nn.Module,
    A_log: torch.Tensor,
    D: torch.Tensor | None,
    d_state: int,
    dt_rank: int,
    tag: str = "",
) -> torch.Tensor:
    """One Mamba-1 scan branch, from the projected ``xz`` to the gated scan output.

    Args:
        R: The active rule set.
        ctx: The LRP context (for taps).
        module: The mixer (for taps).
        xz: ``(b, 2 * d_inner, T)``: ``x`` then ``z``.
        conv1d: Depthwise causal conv of the branch.
        x_proj: Projection to ``(dt, B, C)``.
        dt_proj: Projection of ``dt`` (its bias is the step-size bias).
        A_log: ``(d_inner, d_state)``.
        D: Skip ``(d_inner,)`` or ``None``.
        d_state: State size.
        dt_rank: Rank of ``dt`` before ``dt_proj``.
        tag: Prefix of the tap names.

    Returns:
        ``y * silu(z)`` of shape ``(b, d_inner, T)``, float32.
    """
    x, z = xz.chunk(2, dim=1)
    x = ctx.tap(module, tag + "conv", R.conv1d(x, conv1d.weight, conv1d.bias))
    x = ctx.tap(module, tag + "ssm_input", R.act(x))  # (b, d, T)
    x_dbl = x_proj(R.ssm_coefficient(x).transpose(1, 2))
    dt, B, C = torch.split(x_dbl, [dt_rank, d_state, d_state], dim=-1)
    dt = F.linear(dt, dt_proj.weight).float()
    if dt_proj.bias is not None:
        dt = dt + dt_proj.bias.float()
    dt = ctx.tap(module, tag + "delta", F.softplus(dt))
    A = -torch.exp(A_log.float())
    y = R.selective_scan(
        x, dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), None if D is None else D.float()
    )
    y = ctx.tap(module, tag + "y", y)
    return R.mul(y, ctx.tap(module, tag + "gate", R.act(z.float())))


def mamba1_problem(module: nn.Module, suffix: str = "", *, one_direction: bool = True) -> str | None:
    """Why a mamba_ssm-style Mamba-1 mixer (the branch named with ``suffix``, e.g. ``"_b"``) is
    not a SiLU scan with a causal conv and the standard layout (and, with ``one_direction``, not
    a single forward scan), or ``None``."""
    d, n, rank = module.d_inner, module.d_state, module.dt_rank
    A_log = getattr(module, "A_log" if not suffix else f"A{suffix}_log")
    return first_problem(
        activation_problem(module),
        conv_problem(getattr(module, "conv1d" + suffix), d, "conv1d" + suffix),
        mamba1_layout_problem(
            module.in_proj, getattr(module, "x_proj" + suffix), getattr(module, "dt_proj" + suffix), A_log,
            getattr(module, "D" + suffix), d, n, rank,
        ),
        direction_problem(module) if one_direction else None,
    )


class MambaSSMMixerAdapter(Adapter):
    """mamba_ssm ``Mamba`` (Mamba-1): matched by ``d_inner``/``d_state``/``dt_rank`` naming."""

    name = "mamba-ssm-mamba1"
    family = "mamba_ssm Mamba-1 (MambaLMHeadModel with the Mamba mixer)"
    role = "mixer"
    uses = ("in_proj.*", "conv1d.weight", "conv1d.bias", "x_proj.*", "dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.*")

    def matches(self, module: nn.Module) -> bool:
        if not has_attrs(module, *_MAMBA_SSM_ATTRS) or hasattr(module, "A_b_log"):
            return False
        return isinstance(module.A_log, torch.Tensor) and module.A_log.dim() == 2

    def refuse(self, module: nn.Module) -> str | None:
        return first_problem(super().refuse(module), mamba1_problem(module))

    def forward(
        self, module: nn.Module, ctx: LRPContext, hidden_states: torch.Tensor, inference_params: Any = None, **kwargs: Any
    ) -> torch.Tensor:
        dtype = hidden_states.dtype
        xz = ctx.tap(module, "in_proj", module.in_proj(hidden_states)).transpose(1, 2)
        y = mamba1_branch(
            ctx.rules, ctx, module, xz, module.conv1d, module.x_proj, module.dt_proj, module.A_log, module.D,
            module.d_state, module.dt_rank,
        )
        return ctx.tap(module, "out_proj", module.out_proj(y.transpose(1, 2).to(dtype)))

"""Mamba-1 mixers as in transformers' ``MambaMixer`` and ``FalconMambaMixer``.

FalconMamba normalises ``dt``, ``B`` and ``C`` with weightless RMSNorms; those only shape the SSM
coefficients, which the SSM rule holds constant, so the same adapter covers it. transformers 5.13
and later keep them as submodules (``dt_layernorm``, ...); earlier releases call a function with
the mixer's ``rms_eps``, which the adapter then applies itself.

The forward is re-implemented from the module's weights: HF binds its own forward to mamba_ssm
CUDA kernels when they are importable, and those kernels apply SiLU and the gate with their true
gradients, so the HF forward path is never used.
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
    mask_padding,
)
from mambalrp.context import LRPContext


class HFMambaMixerAdapter(Adapter):
    """``in_proj -> conv1d -> SiLU -> selective scan (x_proj, dt_proj, A_log, D) -> gate -> out_proj``."""

    name = "hf-mamba-mixer"
    family = "Mamba and FalconMamba (transformers MambaModel, MambaForCausalLM, FalconMamba*)"
    role = "mixer"
    uses = (
        "in_proj.*", "conv1d.weight", "conv1d.bias", "x_proj.*", "dt_proj.weight", "dt_proj.bias", "A_log", "D",
        "out_proj.*", "dt_layernorm.*", "b_layernorm.*", "c_layernorm.*", "b_c_rms", "dt_rms",
    )

    def matches(self, module: nn.Module) -> bool:
        if not has_attrs(module, "in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj"):
            return False
        if not has_attrs(module, "intermediate_size", "ssm_state_size", "time_step_rank"):
            return False
        return module.A_log.dim() == 2

    def refuse(self, module: nn.Module) -> str | None:
        d, n, rank = module.intermediate_size, module.ssm_state_size, module.time_step_rank
        return first_problem(
            super().refuse(module),
            activation_problem(module),
            direction_problem(module),
            conv_problem(module.conv1d, d),
            mamba1_layout_problem(module.in_proj, module.x_proj, module.dt_proj, module.A_log, module.D, d, n, rank),
        )

    def forward(
        self,
        module: nn.Module,
        ctx: LRPContext,
        hidden_states: torch.Tensor,
        cache: Any = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        # ``cache`` (any name: ``cache_params`` before transformers 5.24) is refused by lrp() itself.
        R = ctx.rules
        dtype = hidden_states.dtype
        n, rank = module.ssm_state_size, module.time_step_rank

        hidden_states = mask_padding(hidden_states, attention_mask)
        projected = ctx.tap(module, "in_proj", module.in_proj(hidden_states)).transpose(1, 2)
        x, z = projected.chunk(2, dim=1)
        x = ctx.tap(module, "conv", R.conv1d(x, module.conv1d.weight, module.conv1d.bias))
        x = mask_padding(R.act(x).transpose(1, 2), attention_mask)  # (b, T, d)
        x = ctx.tap(module, "ssm_input", x)

        time_step, B, C = torch.split(module.x_proj(R.ssm_coefficient(x)), [rank, n, n], dim=-1)
        if has_attrs(module, "dt_layernorm", "b_layernorm", "c_layernorm"):  # FalconMamba
            time_step = module.dt_layernorm(time_step)
            B, C = module.b_layernorm(B), module.c_layernorm(C)
        elif has_attrs(module, "rms_eps", "b_c_rms", "dt_rms"):
            # FalconMamba before transformers 5.13: weightless RMS norms as plain calls of
            # rms_forward(t, variance_epsilon=self.rms_eps) (b_c_rms and dt_rms are ones).
            time_step, B, C = (_weightless_rms(t, module.rms_eps) for t in (time_step, B, C))
        dt = F.linear(time_step, module.dt_proj.weight).float()
        if module.dt_proj.bias is not None:
            dt = dt + module.dt_proj.bias.float()
        dt = ctx.tap(module, "delta", F.softplus(dt))
        A = -torch.exp(module.A_log.float())
        B, C = ctx.tap(module, "B", B), ctx.tap(module, "C", C)

        y = R.selective_scan(
            x.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), module.D.float()
        )
        y = ctx.tap(module, "y", y)
        gate = ctx.tap(module, "gate", R.act(z.float()))
        y = R.mul(y, gate).to(dtype)
        return ctx.tap(module, "out_proj", module.out_proj(y.transpose(1, 2)))


def _weightless_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``rms_forward``: ``x / rms(x)`` in float32, cast back."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


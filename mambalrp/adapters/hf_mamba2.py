"""Mamba-2 mixers as in transformers' ``Mamba2Mixer`` (SSD scan and grouped gated RMSNorm)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mambalrp.adapters.base import Adapter, has_attrs, mask_padding, refuse_non_silu
from mambalrp.context import LRPContext
from mambalrp.errors import MambaLRPError


class HFMamba2MixerAdapter(Adapter):
    """``in_proj -> (z, xBC, dt); conv1d -> SiLU -> SSD scan -> gated RMSNorm(y, z) -> out_proj``."""

    name = "hf-mamba2-mixer"
    family = "Mamba-2 (transformers Mamba2Model / Mamba2ForCausalLM)"
    role = "mixer"

    def matches(self, module: nn.Module) -> bool:
        if not has_attrs(module, "in_proj", "conv1d", "dt_bias", "A_log", "D", "norm", "out_proj"):
            return False
        if not has_attrs(module, "num_heads", "head_dim", "n_groups", "ssm_state_size", "intermediate_size"):
            return False
        return module.A_log.dim() == 1 and has_attrs(module.norm, "weight")

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
        refuse_non_silu(self.name, module)
        R = ctx.rules
        b, T, _ = hidden_states.shape
        dtype = hidden_states.dtype
        d, h, p = module.intermediate_size, module.num_heads, module.head_dim
        g, n = module.n_groups, module.ssm_state_size
        conv_dim = d + 2 * g * n

        hidden_states = mask_padding(hidden_states, attention_mask)
        projected = ctx.tap(module, "in_proj", module.in_proj(hidden_states))
        d_mlp = (projected.shape[-1] - 2 * d - 2 * g * n - h) // 2
        if d_mlp:
            raise MambaLRPError(f"{self.name}: in_proj has an extra MLP part of width {d_mlp}, which is not supported")
        z, xBC, dt = projected.split([d, conv_dim, h], dim=-1)

        xBC = ctx.tap(module, "conv", R.conv1d(xBC.transpose(1, 2), module.conv1d.weight, module.conv1d.bias))
        xBC = mask_padding(R.act(xBC).transpose(1, 2), attention_mask)
        x, B, C = torch.split(xBC, [d, g * n, g * n], dim=-1)
        x = ctx.tap(module, "ssm_input", x)
        B, C = ctx.tap(module, "B", R.ssm_coefficient(B)), ctx.tap(module, "C", R.ssm_coefficient(C))

        dt = F.softplus(R.ssm_coefficient(dt).float() + module.dt_bias.float())
        lo, hi = getattr(module, "time_step_limit", (0.0, float("inf")))
        dt = ctx.tap(module, "delta", torch.clamp(dt, min=lo, max=hi))
        A = -torch.exp(module.A_log.float())

        y = R.ssd_scan(x.reshape(b, T, h, p), dt, A, B.reshape(b, T, g, n), C.reshape(b, T, g, n), module.D.float())
        y = ctx.tap(module, "y", y.reshape(b, T, d))
        norm = module.norm
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        # Older transformers releases (5.17 and before) normalise over the whole width whatever
        # n_groups is (their MambaRMSNormGated has no group_size); follow the module's own forward.
        group_size = getattr(norm, "group_size", d)
        y = R.gated_rmsnorm(y, z, norm.weight, eps, group_size, getattr(norm, "norm_before_gate", False))
        y = ctx.tap(module, "gate", y)
        return ctx.tap(module, "out_proj", module.out_proj(y.to(dtype)))

"""Kimi Delta Attention (KDA) mixers of transformers' Kimi Linear (``KimiLinearDeltaAttention``).

A gated delta rule with one decay per key channel::

    q, k, v = SiLU(causal depthwise conv(concat(q_proj h, k_proj h, v_proj h)))
    o = delta rule(l2norm(q) / sqrt(d), l2norm(k), v; per-channel log decay forget_gate(h), beta sigmoid(b_proj h))
    out = o_proj(RMSNorm(o) * sigmoid(g_b_proj(g_a_proj h)))          (per head)

Value path: ``v_proj`` -> conv (linear) -> SiLU (identity rule) -> the recurrence with its decays,
write strengths, keys and queries held constant (``RuleSet.delta_rule``) -> RMSNorm (LN-rule) ->
the sigmoid output gate, held constant (``RuleSet.gate_coefficient``: a factor in (0, 1) computed
from the layer's input, like an attention output gate) -> ``o_proj``. The forget gate module only
shapes coefficients: it runs as is, on a detached input under the SSM rule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mambalrp.adapters.base import (
    Adapter,
    activation_problem,
    conv_problem,
    direction_problem,
    first_problem,
    has_attrs,
    mask_padding,
)
from mambalrp.adapters.gated_deltanet import _l2norm, split_conv
from mambalrp.context import LRPContext

_NAMES = ("q_proj", "k_proj", "v_proj", "conv1d", "forget_gate", "b_proj", "g_a_proj", "g_b_proj", "o_norm", "o_proj")


class KimiDeltaAttentionAdapter(Adapter):
    """``conv -> SiLU -> delta rule with per-channel decays -> RMSNorm * sigmoid gate -> o_proj``."""

    name = "kimi-delta-attention"
    family = "Kimi Delta Attention (transformers Kimi Linear)"
    role = "mixer"
    uses = (
        "q_proj.*", "k_proj.*", "v_proj.*", "conv1d.weight", "conv1d.bias", "forget_gate.*", "b_proj.*",
        "g_a_proj.*", "g_b_proj.*", "o_norm.weight", "o_proj.*",
    )

    def matches(self, module: nn.Module) -> bool:
        return has_attrs(module, *_NAMES, "num_heads", "head_dim") and has_attrs(module.forget_gate, "A_log", "dt_bias")

    def refuse(self, module: nn.Module) -> str | None:
        h, d = module.num_heads, module.head_dim
        norm = module.o_norm
        return first_problem(
            super().refuse(module),
            activation_problem(module),
            direction_problem(module),
            conv_problem(module.conv1d, 3 * h * d),
            None if all(getattr(module, n).out_features == h * d for n in ("q_proj", "k_proj", "v_proj", "g_b_proj"))
            else f"its q/k/v/gate projections are not {h} heads of {d}",
            None if module.b_proj.out_features == h else f"its b_proj has width {module.b_proj.out_features}, not {h}",
            None if getattr(norm, "activation", None) == "sigmoid" and tuple(norm.weight.shape) == (d,)
            else "its output norm is not an RMSNorm of one head gated by a sigmoid",
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
        # A cache (under any keyword) is refused by lrp() itself.
        R = ctx.rules
        b, T, _ = hidden_states.shape
        dtype = hidden_states.dtype
        h, d = module.num_heads, module.head_dim
        x = mask_padding(hidden_states, attention_mask)
        qkv = torch.cat([module.q_proj(x), module.k_proj(x), module.v_proj(x)], dim=-1)
        qk, v = split_conv(ctx, module, module.conv1d, qkv, 2 * h * d, dtype)
        q, k = qk.split([h * d, h * d], dim=-1)
        v = ctx.tap(module, "values", v.reshape(b, T, h, d))
        q = _l2norm(q.float().reshape(b, T, h, d)) * d**-0.5
        k = _l2norm(k.float().reshape(b, T, h, d))
        coefficient_input = R.ssm_coefficient(x)
        g = module.forget_gate(coefficient_input).float()  # (b, T, h, d) log decays
        beta = torch.sigmoid(module.b_proj(coefficient_input)).float()
        o = ctx.tap(module, "y", R.delta_rule(q, k, v, g, beta).to(dtype))
        norm = module.o_norm
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        gate = module.g_b_proj(module.g_a_proj(x)).view(b, T, h, d)
        o = R.rmsnorm(o.float(), norm.weight.float(), eps) * R.gate_coefficient(torch.sigmoid(gate.float()))
        o = ctx.tap(module, "gate", o.reshape(b, T, h * d).to(dtype))
        return module.o_proj(o)

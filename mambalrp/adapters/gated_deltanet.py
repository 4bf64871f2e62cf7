"""Gated DeltaNet mixers of transformers' Qwen3-Next, Qwen3.5 and OLMo-hybrid.

All three compute the same layer from differently laid out projections::

    q, k, v = SiLU(causal depthwise conv(concat(q_in, k_in, v_in)))
    o = gated delta rule(l2norm(q) / sqrt(d_k), l2norm(k), v; decay -exp(A_log) softplus(a + dt_bias), beta sigmoid(b))
    out = out_proj(RMSNorm(o) * silu(z))            (per value head, norm before gate)

* Qwen3-Next: one ``in_proj_qkvz`` whose output is grouped by key head (``q, k``, then the value
  and gate channels of the value heads that share that key head) and one ``in_proj_ba``, grouped
  the same way.
* Qwen3.5: ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``, laid out head by head.
* OLMo-hybrid: ``q_proj``, ``k_proj``, ``v_proj``, ``a_proj``, ``b_proj``, the gate ``g_proj``,
  ``o_norm``, ``o_proj``; with ``allow_neg_eigval`` the write strength is ``2 sigmoid(b)``.

The value path is ``v``'s projection -> conv (linear) -> SiLU (identity rule) -> the recurrence
with its decays, write strengths, keys and queries held constant (``RuleSet.delta_rule``) ->
the gated norm (LN-rule, half rule, identity rule) -> the output projection. The query and key
channels of the conv (computed apart: the conv is depthwise), ``a`` and ``b`` only shape
coefficients and are detached under the SSM rule.
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
    mask_padding,
)
from mambalrp.context import LRPContext

_SHAPE = ("conv1d", "A_log", "dt_bias", "num_v_heads", "num_k_heads", "head_k_dim", "head_v_dim")
_LAYOUTS = {
    "qwen3-next": ("in_proj_qkvz", "in_proj_ba", "norm", "out_proj"),
    "qwen3.5": ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "norm", "out_proj"),
    "olmo-hybrid": ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_norm", "o_proj"),
}


def layout(module: nn.Module) -> str | None:
    """Which projection layout ``module`` has (a key of the layouts above), or ``None``."""
    for name, attrs in _LAYOUTS.items():
        if has_attrs(module, *attrs):
            return name
    return None


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


class GatedDeltaNetAdapter(Adapter):
    """``conv -> SiLU -> gated delta rule -> gated RMSNorm -> out`` in the three layouts of
    Qwen3-Next, Qwen3.5 and OLMo-hybrid (see the module docstring)."""

    name = "gated-deltanet"
    family = "Gated DeltaNet (transformers Qwen3-Next, Qwen3.5, OLMo-hybrid)"
    role = "mixer"
    uses = (
        "in_proj_qkvz.*", "in_proj_ba.*", "in_proj_qkv.*", "in_proj_z.*", "in_proj_b.*", "in_proj_a.*",
        "q_proj.*", "k_proj.*", "v_proj.*", "a_proj.*", "b_proj.*", "g_proj.*",
        "conv1d.weight", "conv1d.bias", "A_log", "dt_bias", "norm.weight", "o_norm.weight", "out_proj.*", "o_proj.*",
    )

    def matches(self, module: nn.Module) -> bool:
        return has_attrs(module, *_SHAPE) and layout(module) is not None and module.A_log.dim() == 1

    def refuse(self, module: nn.Module) -> str | None:
        hk, h, dk, dv = module.num_k_heads, module.num_v_heads, module.head_k_dim, module.head_v_dim
        norm = _norm(module)
        widths = _widths(module)
        return first_problem(
            super().refuse(module),
            activation_problem(module),
            direction_problem(module),
            None if h % hk == 0 else f"its {h} value heads are not a multiple of its {hk} key heads",
            conv_problem(module.conv1d, 2 * hk * dk + h * dv),
            None if tuple(module.A_log.shape) == (h,) and tuple(module.dt_bias.shape) == (h,)
            else f"A_log {tuple(module.A_log.shape)} and dt_bias {tuple(module.dt_bias.shape)} are not one per value head ({h})",
            next((f"its {n} has width {got} where the layout needs {want}" for n, got, want in widths if got != want), None),
            None if isinstance(getattr(norm, "weight", None), torch.Tensor) and tuple(norm.weight.shape) == (dv,)
            else f"its gated norm has no weight of shape ({dv},)",
            None if getattr(norm, "bias", None) is None else "its gated norm has a bias",
            None if getattr(norm, "activation", "silu") in ("silu", "swish") else f"its gated norm's gate is {norm.activation!r}, not SiLU",
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
        hk, h, dk, dv = module.num_k_heads, module.num_v_heads, module.head_k_dim, module.head_v_dim
        x = mask_padding(hidden_states, attention_mask)
        qkv, z, beta_in, decay_in = _project(module, x)
        qk, v = split_conv(ctx, module, module.conv1d, qkv, 2 * hk * dk, dtype)
        q, k = qk.split([hk * dk, hk * dk], dim=-1)
        v = ctx.tap(module, "values", v.reshape(b, T, h, dv))
        q = _l2norm(q.float().reshape(b, T, hk, dk)) * dk**-0.5
        k = _l2norm(k.float().reshape(b, T, hk, dk))
        beta = R.ssm_coefficient(beta_in).sigmoid()
        if getattr(module, "allow_neg_eigval", False):
            beta = beta * 2.0
        g = -module.A_log.float().exp() * F.softplus(R.ssm_coefficient(decay_in).float() + module.dt_bias)
        o = R.delta_rule(q, k, v, g, beta)
        o = ctx.tap(module, "y", o.to(dtype))
        norm = _norm(module)
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        o = R.gated_rmsnorm(o, z.reshape(b, T, h, dv), norm.weight, eps, None, norm_before_gate=True)
        o = ctx.tap(module, "gate", o.reshape(b, T, h * dv).to(dtype))
        out = module.out_proj if hasattr(module, "out_proj") else module.o_proj
        return ctx.tap(module, "out_proj", out(o))


def split_conv(
    ctx: LRPContext, module: nn.Module, conv: nn.Conv1d, qkv: torch.Tensor, qk_width: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU of the causal depthwise conv of ``concat(q, k, v)`` ``(b, T, width)``, as ``(qk, v)``
    ``(b, T, .)``. The conv is depthwise, so its query and key channels are computed apart from the
    value channels: on the coefficient path (detached under the SSM rule), tapped as ``"qk_conv"``;
    the value channels on the relevance path, tapped as ``"conv"`` (before SiLU)."""
    R = ctx.rules
    weight, bias = conv.weight, conv.bias
    qk_in, v_in = qkv[..., :qk_width], qkv[..., qk_width:]
    qk_bias, v_bias = (None, None) if bias is None else (bias[:qk_width], bias[qk_width:])
    qk = R.conv1d(R.ssm_coefficient(qk_in).transpose(1, 2), weight[:qk_width], qk_bias)
    qk = ctx.tap(module, "qk_conv", R.act(qk).transpose(1, 2).to(dtype))
    v = ctx.tap(module, "conv", R.conv1d(v_in.transpose(1, 2), weight[qk_width:], v_bias))
    return qk, R.act(v).transpose(1, 2).to(dtype)


def _norm(module: nn.Module) -> nn.Module:
    return module.norm if hasattr(module, "norm") else module.o_norm


def _widths(module: nn.Module) -> list[tuple[str, int | None, int]]:
    """``(projection, its width, the width the layout needs)`` of each input projection."""
    hk, h, dk, dv = module.num_k_heads, module.num_v_heads, module.head_k_dim, module.head_v_dim
    want = {
        "in_proj_qkvz": 2 * hk * dk + 2 * h * dv, "in_proj_ba": 2 * h, "in_proj_qkv": 2 * hk * dk + h * dv,
        "in_proj_z": h * dv, "in_proj_b": h, "in_proj_a": h, "q_proj": hk * dk, "k_proj": hk * dk,
        "v_proj": h * dv, "g_proj": h * dv, "a_proj": h, "b_proj": h,
    }
    return [(n, getattr(getattr(module, n), "out_features", None), w) for n, w in want.items() if n in _LAYOUTS[layout(module)]]


def _project(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(concat(q, k, v) (b, T, conv width), z (b, T, h * d_v), b (b, T, h), a (b, T, h))``."""
    b, T, _ = x.shape
    hk, h, dk, dv = module.num_k_heads, module.num_v_heads, module.head_k_dim, module.head_v_dim
    kind = layout(module)
    if kind == "qwen3-next":
        r = h // hk  # value heads per key head; the projection is grouped by key head
        qkvz = module.in_proj_qkvz(x).view(b, T, hk, 2 * dk + 2 * r * dv)
        q, k, v, z = qkvz.split([dk, dk, r * dv, r * dv], dim=-1)
        ba = module.in_proj_ba(x).view(b, T, hk, 2 * r)
        beta_in, decay_in = ba[..., :r].reshape(b, T, h), ba[..., r:].reshape(b, T, h)
        qkv = torch.cat([q.reshape(b, T, -1), k.reshape(b, T, -1), v.reshape(b, T, -1)], dim=-1)
        return qkv, z.reshape(b, T, h * dv), beta_in, decay_in
    if kind == "qwen3.5":
        return module.in_proj_qkv(x), module.in_proj_z(x), module.in_proj_b(x), module.in_proj_a(x)
    qkv = torch.cat([module.q_proj(x), module.k_proj(x), module.v_proj(x)], dim=-1)
    return qkv, module.g_proj(x), module.b_proj(x), module.a_proj(x)

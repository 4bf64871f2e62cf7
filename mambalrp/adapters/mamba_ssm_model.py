"""The layers around the mixers of mamba_ssm's ``MambaLMHeadModel``: ``Block``, ``MixerModel``,
``GatedMLP`` and ``MHA`` (attention layers placed with ``attn_layer_idx``).

With ``fused_add_norm`` the residual addition and the norm run in one Triton kernel and never
call the norm module, so the adapters re-implement :class:`Block` and :class:`MixerModel` from
their weights (add, then the norm with the LN-rule, ``residual_in_fp32`` casts kept), the same way
whether the flag is on or off. Norms are RMSNorm (``rms_norm=True``) or LayerNorm
(:meth:`mambalrp.RuleSet.layer_norm`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mambalrp.adapters.base import Adapter, conv_problem, first_problem, has_attrs
from mambalrp.context import LRPContext
from mambalrp.rules import RuleSet


def norm_lrp(R: RuleSet, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's RMSNorm or ``nn.LayerNorm`` with the LN-rule, computed like mamba_ssm (float32)."""
    weight, bias = norm.weight, getattr(norm, "bias", None)
    eps = float(norm.eps)
    if isinstance(norm, nn.LayerNorm):
        out = R.layer_norm(x.float(), weight.float(), None if bias is None else bias.float(), eps)
        return out.to(weight.dtype)
    out = R.rmsnorm(x.float(), weight.float(), eps)
    if bias is not None:
        out = out + bias.float()
    return out.to(weight.dtype)


def _is_mamba_ssm_norm(norm: Any) -> bool:
    return isinstance(norm, nn.LayerNorm) or (type(norm).__name__ == "RMSNorm" and has_attrs(norm, "weight", "eps"))


class MambaSSMBlockAdapter(Adapter):
    """mamba_ssm ``Block``: ``residual = h + residual; h = mixer(norm(residual)); [MLP likewise]``.

    Also Vision Mamba's ``Block`` (no MLP, ``drop_path`` on the mixer output before the add)."""

    name = "mamba-ssm-block"
    family = "mamba_ssm Block"
    role = "other"
    uses = ("norm.*", "norm2.*", "mixer.*", "mlp.*", "drop_path.*")

    def matches(self, module: nn.Module) -> bool:
        return has_attrs(module, "norm", "mixer", "fused_add_norm", "residual_in_fp32") and _is_mamba_ssm_norm(
            module.norm
        )

    def forward(
        self,
        module: nn.Module,
        ctx: LRPContext,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None = None,
        inference_params: Any = None,
        **mixer_kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        R = ctx.rules
        if residual is None:
            residual = hidden_states
        else:  # Vision Mamba's blocks drop paths here (the identity in eval mode)
            drop_path = getattr(module, "drop_path", None)
            residual = residual + (drop_path(hidden_states) if drop_path is not None else hidden_states)
        hidden_states = norm_lrp(R, module.norm, residual.to(module.norm.weight.dtype))
        if module.residual_in_fp32:
            residual = residual.to(torch.float32)
        hidden_states = module.mixer(hidden_states, **mixer_kwargs)
        if getattr(module, "mlp", None) is not None:
            residual = hidden_states + residual
            hidden_states = norm_lrp(R, module.norm2, residual.to(module.norm2.weight.dtype))
            if module.residual_in_fp32:
                residual = residual.to(torch.float32)
            hidden_states = module.mlp(hidden_states)
        return hidden_states, residual


class MambaSSMBackboneAdapter(Adapter):
    """mamba_ssm ``MixerModel``: embedding, blocks, final add and norm (fused or not)."""

    name = "mamba-ssm-backbone"
    family = "mamba_ssm MixerModel"
    role = "other"
    uses = ("embedding.*", "layers.*", "norm_f.*")

    def matches(self, module: nn.Module) -> bool:
        return (
            has_attrs(module, "embedding", "layers", "norm_f", "fused_add_norm", "residual_in_fp32")
            and isinstance(module.embedding, nn.Embedding)
            and _is_mamba_ssm_norm(module.norm_f)
        )

    def forward(
        self, module: nn.Module, ctx: LRPContext, input_ids: torch.Tensor, inference_params: Any = None, **mixer_kwargs: Any
    ) -> torch.Tensor:
        hidden_states = module.embedding(input_ids)
        residual = None
        for layer in module.layers:
            hidden_states, residual = layer(hidden_states, residual, **mixer_kwargs)
        residual = hidden_states + residual if residual is not None else hidden_states
        if module.residual_in_fp32:
            residual = residual.to(torch.float32)
        return norm_lrp(ctx.rules, module.norm_f, residual.to(module.norm_f.weight.dtype))


class MambaSSMGatedMLPAdapter(Adapter):
    """mamba_ssm ``GatedMLP``: ``fc2(y * act(gate))`` with ``(y, gate) = fc1(x).chunk(2)``."""

    name = "mamba-ssm-gated-mlp"
    family = "mamba_ssm GatedMLP"
    role = "other"
    uses = ("fc1.*", "fc2.*")

    def matches(self, module: nn.Module) -> bool:
        if not has_attrs(module, "fc1", "fc2", "activation") or not callable(module.activation):
            return False
        return isinstance(module.fc1, nn.Linear) and module.fc1.out_features == 2 * module.fc2.in_features

    def forward(self, module: nn.Module, ctx: LRPContext, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        R = ctx.rules
        y, gate = module.fc1(x).chunk(2, dim=-1)
        act = R.act(gate) if module.activation in (F.silu, torch.nn.functional.silu) else R.activation(gate, module.activation)
        return module.fc2(R.mul(y, act))


class MambaSSMAttentionAdapter(Adapter):
    """mamba_ssm ``MHA`` (fused ``in_proj`` to q, k, v; optional causal conv and gated MLP part)."""

    name = "mamba-ssm-mha"
    family = "mamba_ssm MHA (attention layers of MambaLMHeadModel)"
    role = "attention"
    uses = ("in_proj.*", "out_proj.*", "conv1d.weight", "conv1d.bias")

    def matches(self, module: nn.Module) -> bool:
        return has_attrs(
            module, "in_proj", "out_proj", "num_heads", "num_heads_kv", "head_dim", "rotary_emb_dim", "mlp_dim", "d_conv", "causal"
        )

    def refuse(self, module: nn.Module) -> str | None:
        if module.rotary_emb_dim > 0:
            return "it uses rotary embeddings (flash-attn's kernels), which the adapter does not implement"
        conv = conv_problem(module.conv1d) if module.d_conv > 0 else None
        return first_problem(super().refuse(module), conv)

    def forward(self, module: nn.Module, ctx: LRPContext, x: torch.Tensor, inference_params: Any = None, **kwargs: Any):
        R = ctx.rules
        h, hkv, dh = module.num_heads, module.num_heads_kv, module.head_dim
        qkv = module.in_proj(x)
        x_mlp = None
        if module.mlp_dim > 0:
            qkv, x_mlp = qkv.split([qkv.shape[-1] - module.mlp_dim, module.mlp_dim], dim=-1)
            up, gate = x_mlp.chunk(2, dim=-1)
            x_mlp = R.mul(up, R.act(gate))
        if module.d_conv > 0:
            qkv = R.conv1d(qkv.transpose(1, 2), module.conv1d.weight, module.conv1d.bias).transpose(1, 2)
        b, T, _ = qkv.shape
        q, kv = qkv.split([h * dh, hkv * 2 * dh], dim=-1)
        q = q.reshape(b, T, h, dh).transpose(1, 2)
        kv = kv.reshape(b, T, 2, hkv, dh)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        scale = module.softmax_scale if module.softmax_scale is not None else dh**-0.5
        context, _ = R.attention(q, k, v, None, scale, is_causal=module.causal)
        context = context.transpose(1, 2).reshape(b, T, h * dh)
        if x_mlp is not None:
            context = torch.cat([context, x_mlp], dim=-1)
        return module.out_proj(context)

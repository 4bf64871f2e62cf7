"""Attention layers that compute softmax attention inline, without transformers' attention
interface: Jamba's attention classes in transformers 4.x (``JambaAttention``,
``JambaSdpaAttention``, ``JambaFlashAttention2``, chosen by ``config._attn_implementation``).

:class:`~mambalrp.adapters.hf_attention.HFAttentionAdapter` runs a layer's own forward with
mambalrp's attention function swapped into ``ALL_ATTENTION_FUNCTIONS``; these layers never look
that table up, so the adapter re-implements them from their projections (no rotary embeddings,
grouped key/value heads, the padding mask the decoder passes).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mambalrp.adapters.base import Adapter, code_names, has_attrs
from mambalrp.context import LRPContext


class InlineAttentionAdapter(Adapter):
    """``o_proj(softmax(q k^T / sqrt(d) + mask) v)`` with ``q, k, v`` from ``q_proj`` / ``k_proj`` /
    ``v_proj``, no rotary embeddings, computed by the layer itself (not through the attention
    interface)."""

    name = "hf-attention-inline"
    family = "inline softmax attention without rotary embeddings (Jamba on transformers 4.x)"
    role = "attention"
    uses = ("q_proj.*", "k_proj.*", "v_proj.*", "o_proj.*")

    def matches(self, module: nn.Module) -> bool:
        if not has_attrs(module, "q_proj", "k_proj", "v_proj", "o_proj", "num_heads", "head_dim", "num_key_value_heads"):
            return False
        names = code_names(module)
        if "ALL_ATTENTION_FUNCTIONS" in names or "apply_rotary_pos_emb" in names or "position_embeddings" in names:
            return False
        return any(n in names for n in ("scaled_dot_product_attention", "softmax", "_flash_attention_forward"))

    def refuse(self, module: nn.Module) -> str | None:
        config = getattr(module, "config", None)
        if getattr(module, "sliding_window", None) or getattr(config, "sliding_window", None):
            return "it uses a sliding window, which the adapter does not implement"
        if module.num_heads * module.head_dim != module.q_proj.out_features:
            return f"q_proj's width {module.q_proj.out_features} is not {module.num_heads} heads of {module.head_dim}"
        return super().refuse(module)

    def forward(
        self,
        module: nn.Module,
        ctx: LRPContext,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: Any = None,
        past_key_value: Any = None,
        output_attentions: bool = False,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        b, T, _ = hidden_states.shape
        h, hkv, d = module.num_heads, module.num_key_value_heads, module.head_dim
        q = module.q_proj(hidden_states).view(b, T, h, d).transpose(1, 2)
        k = module.k_proj(hidden_states).view(b, T, hkv, d).transpose(1, 2)
        v = module.v_proj(hidden_states).view(b, T, hkv, d).transpose(1, 2)
        mask = attention_mask
        if mask is not None and mask.dim() == 2:  # flash-attention-2 layout: a (b, T) padding mask
            mask = mask[:, None, None, :].bool() & torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
        out, weights = ctx.rules.attention(q, k, v, mask, d**-0.5, is_causal=getattr(module, "is_causal", True))
        out = module.o_proj(out.transpose(1, 2).reshape(b, T, h * d))
        return out, (weights if output_attentions else None), past_key_value

"""Softmax attention with a sigmoid output gate (Qwen3-Next, Qwen3.5).

``q_proj`` gives each head's query and a gate; the attention output is multiplied by
``sigmoid(gate)`` before ``o_proj``; queries and keys pass a per-head RMSNorm and rotary
embeddings. The gate is a factor computed from the layer's input that scales the values' path:
it is held constant (``RuleSet.gate_coefficient``), like the routing weights of a mixture of
experts, so relevance flows through the values and, under CP attention, is conserved exactly. The
core uses :meth:`mambalrp.rules.RuleSet.attention`; the rotary embedding is the function of the
layer's own module (so partial rotary and multimodal positions are applied as the model does).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from mambalrp.adapters.base import Adapter, code_names, has_attrs
from mambalrp.context import LRPContext
from mambalrp.errors import MambaLRPError


class GatedAttentionAdapter(Adapter):
    """``o_proj(attention(q, k, v) * sigmoid(gate))`` with ``(q, gate)`` from ``q_proj`` per head."""

    name = "hf-gated-attention"
    family = "softmax attention with a sigmoid output gate (Qwen3-Next, Qwen3.5)"
    role = "attention"
    uses = ("q_proj.*", "k_proj.*", "v_proj.*", "o_proj.*", "q_norm.*", "k_norm.*")

    def matches(self, module: nn.Module) -> bool:
        if not has_attrs(module, "q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "head_dim", "config"):
            return False
        names = code_names(module)
        return "sigmoid" in names and "apply_rotary_pos_emb" in names and isinstance(module.q_proj, nn.Linear)

    def refuse(self, module: nn.Module) -> str | None:
        config = module.config
        heads, d = getattr(config, "num_attention_heads", None), module.head_dim
        if heads is None or module.q_proj.out_features != 2 * heads * d:
            return f"its q_proj's width {module.q_proj.out_features} is not a query and a gate for {heads} heads of {d}"
        if getattr(config, "sliding_window", None) and "sliding_attention" in (getattr(config, "layer_types", None) or ()):
            return "it uses a sliding window, which the adapter does not implement"
        if not callable(getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)):
            return "its module has no apply_rotary_pos_emb function"
        return super().refuse(module)

    def forward(
        self,
        module: nn.Module,
        ctx: LRPContext,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if module.training and getattr(module, "attention_dropout", 0.0):
            raise MambaLRPError("attention dropout in training mode is not supported; call model.eval()")
        R = ctx.rules
        shape = hidden_states.shape[:-1]
        d = module.head_dim
        query, gate = module.q_proj(hidden_states).view(*shape, -1, 2 * d).chunk(2, dim=-1)
        gate = gate.reshape(*shape, -1)
        query = module.q_norm(query).transpose(1, 2)
        key = module.k_norm(module.k_proj(hidden_states).view(*shape, -1, d)).transpose(1, 2)
        value = module.v_proj(hidden_states).view(*shape, -1, d).transpose(1, 2)
        if position_embeddings is None:
            raise MambaLRPError(f"{type(module).__name__} was called without position_embeddings")
        cos, sin = position_embeddings
        rotary = sys.modules[type(module).__module__].apply_rotary_pos_emb
        query, key = rotary(query, key, cos, sin)
        scaling = getattr(module, "scaling", d**-0.5)
        out, weights = R.attention(query, key, value, attention_mask, scaling, is_causal=getattr(module, "is_causal", True))
        out = out.transpose(1, 2).reshape(*shape, -1)
        out = ctx.tap(module, "gate", out * R.gate_coefficient(torch.sigmoid(gate)))
        return module.o_proj(out), weights

"""Multi-head latent attention (MLA, DeepSeek-V2 style) as in transformers' Kimi Linear: keys and
values expand from a compressed latent (``kv_a_proj_with_mqa`` -> RMSNorm -> ``kv_b_proj``), the
queries come from ``q_proj`` or a low-rank pair. Everything but the attention core is linear or an
RMSNorm (patched by its own adapter), so the treatment is that of
:class:`~mambalrp.adapters.hf_attention.HFAttentionAdapter`: the layer's own forward runs with
mambalrp's attention function as its implementation."""

from __future__ import annotations

from torch import nn

from mambalrp.adapters.base import code_names, has_attrs
from mambalrp.adapters.hf_attention import HFAttentionAdapter


class LatentAttentionAdapter(HFAttentionAdapter):
    """``kv_a_proj_with_mqa`` / ``kv_b_proj`` / ``o_proj`` through ``ALL_ATTENTION_FUNCTIONS``."""

    name = "hf-latent-attention"
    family = "multi-head latent attention in transformers models (Kimi Linear; AttnLRP)"
    role = "attention"

    def matches(self, module: nn.Module) -> bool:
        if not has_attrs(module, "kv_a_proj_with_mqa", "kv_b_proj", "kv_a_layernorm", "o_proj", "config"):
            return False
        names = code_names(module)
        return "ALL_ATTENTION_FUNCTIONS" in names and "sigmoid" not in names

    def refuse(self, module: nn.Module) -> str | None:
        if "apply_rotary_pos_emb" in code_names(module) or "position_embeddings" in code_names(module):
            return "it applies rotary embeddings in its forward, which this adapter has not been checked against"
        return super().refuse(module)

"""Attention layers that dispatch through transformers' attention interface and call their output
projection ``out_proj`` instead of ``o_proj`` (LFM2). Same treatment as
:class:`~mambalrp.adapters.hf_attention.HFAttentionAdapter`: the layer's own forward runs with
mambalrp's attention function as its implementation; its q/k norms are patched by their own
adapters."""

from __future__ import annotations

from torch import nn

from mambalrp.adapters.base import code_names, has_attrs
from mambalrp.adapters.hf_attention import HFAttentionAdapter


class HFAttentionOutProjAdapter(HFAttentionAdapter):
    """``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` through ``ALL_ATTENTION_FUNCTIONS``."""

    name = "hf-attention-out-proj"
    family = "softmax attention in transformers models with out_proj (LFM2; AttnLRP)"
    role = "attention"

    def matches(self, module: nn.Module) -> bool:
        if not has_attrs(module, "q_proj", "k_proj", "v_proj", "out_proj", "head_dim", "config"):
            return False
        names = code_names(module)
        return "ALL_ATTENTION_FUNCTIONS" in names and "sigmoid" not in names

"""Softmax attention layers of transformers hybrids (Jamba, Bamba, NemotronH, Zamba2,
GraniteMoeHybrid, ...), under the AttnLRP rules.

These layers compute their projections, rotary embeddings and low-rank adapters themselves (all
linear in the signal) and hand ``q, k, v`` to an *attention interface* looked up by name from
``config._attn_implementation``. The adapter runs the layer's own forward with a read-only view of
its config whose ``_attn_implementation`` names mambalrp's attention function, so only the
non-linear core (``q @ k^T``, softmax, ``p @ v``) is replaced by
:meth:`mambalrp.rules.RuleSet.attention`. The module's ``config`` attribute is restored right after
the call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mambalrp.adapters.base import Adapter, code_names, has_attrs
from mambalrp.context import LRPContext
from mambalrp.errors import MambaLRPError

IMPLEMENTATION = "mambalrp"
_CTX_ATTR = "_mambalrp_ctx"


class _ConfigView:
    """The module's config with ``_attn_implementation`` replaced; every other attribute is read
    through to the real config."""

    _attn_implementation = IMPLEMENTATION

    def __init__(self, config: Any, ctx: LRPContext):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, _CTX_ATTR, ctx)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_config"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the config is read-only while mambalrp runs the layer")


def lrp_attention_interface(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers attention-interface function that applies the active rule set."""
    ctx = getattr(module.config, _CTX_ATTR, None)
    if ctx is None:
        raise MambaLRPError("the 'mambalrp' attention implementation only runs inside mambalrp.lrp()")
    for unsupported in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise MambaLRPError(f"attention with {unsupported} is not supported")
    if dropout and module.training:
        raise MambaLRPError("attention dropout in training mode is not supported; call model.eval()")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out, weights = ctx.rules.attention(
        query, key, value, attention_mask, scaling, is_causal=getattr(module, "is_causal", True)
    )
    return out.transpose(1, 2).contiguous(), weights


def _install() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ALL_ATTENTION_FUNCTIONS.get(IMPLEMENTATION) is not lrp_attention_interface:
        ALL_ATTENTION_FUNCTIONS[IMPLEMENTATION] = lrp_attention_interface


class HFAttentionAdapter(Adapter):
    """Layers with ``q_proj``/``k_proj``/``v_proj``/``o_proj`` whose forward dispatches through
    transformers' ``ALL_ATTENTION_FUNCTIONS``."""

    name = "hf-attention"
    family = "softmax attention in transformers models (AttnLRP)"
    role = "attention"

    def matches(self, module: nn.Module) -> bool:
        if not has_attrs(module, "q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "config"):
            return False
        return "ALL_ATTENTION_FUNCTIONS" in code_names(module)

    def forward(self, module: nn.Module, ctx: LRPContext, *args: Any, **kwargs: Any) -> Any:
        _install()
        config = module.__dict__.get("config")
        if config is None:
            raise MambaLRPError(f"{self.name}: {type(module).__name__} keeps no config attribute")
        module.__dict__["config"] = _ConfigView(config, ctx)
        try:
            return type(module).forward(module, *args, **kwargs)
        finally:
            module.__dict__["config"] = config

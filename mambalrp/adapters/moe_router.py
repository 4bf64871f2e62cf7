"""Mixture-of-experts blocks with a linear router and a ``ModuleList`` of expert MLPs:
``sum_k softmax(router(x))_k * expert_k(x)`` over the top-k experts, without renormalising the
selected weights (Jamba's ``JambaSparseMoeBlock`` in transformers 4.x).

Routing weights are constants under the rules (no relevance flows into the router); each expert
is called as its own module, so the gated-MLP adapter patches it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mambalrp.adapters.base import Adapter, has_attrs
from mambalrp.context import LRPContext


class RouterExpertListAdapter(Adapter):
    """``router`` (``nn.Linear``), ``experts`` (``nn.ModuleList``), ``top_k``, ``num_experts``."""

    name = "moe-router-expert-list"
    family = "mixture of experts with a ModuleList of experts (Jamba on transformers 4.x)"
    role = "other"
    uses = ("router.*", "experts.*")

    def matches(self, module: nn.Module) -> bool:
        if not has_attrs(module, "router", "experts", "top_k", "num_experts"):
            return False
        return isinstance(module.router, nn.Linear) and isinstance(module.experts, nn.ModuleList)

    def refuse(self, module: nn.Module) -> str | None:
        # Mixtral-style blocks renormalise the top-k weights or add jitter: another formula.
        if has_attrs(module, "jitter_noise") or getattr(module, "norm_topk_prob", False):
            return "it renormalises the selected routing weights or adds jitter"
        if len(module.experts) != module.num_experts:
            return f"it has {len(module.experts)} experts but num_experts = {module.num_experts}"
        return super().refuse(module)

    def forward(self, module: nn.Module, ctx: LRPContext, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        b, T, d = hidden_states.shape
        x = hidden_states.view(-1, d)
        router_logits = module.router(x)
        routing = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing, selected = torch.topk(routing, module.top_k, dim=-1)
        routing = ctx.rules.routing_weights(routing.to(x.dtype))
        out = torch.zeros_like(x)
        with torch.no_grad():
            expert_mask = F.one_hot(selected, num_classes=module.num_experts).permute(2, 1, 0)
        for e in range(module.num_experts):
            idx, rows = torch.where(expert_mask[e])
            if rows.shape[0] == 0:
                continue
            expert_out = module.experts[e](x[rows]) * routing[rows, idx, None]
            out = out.index_add(0, rows, expert_out.to(x.dtype))
        return out.reshape(b, T, d), router_logits

"""Mixture-of-experts expert banks (3-D weight tensors), as in Jamba, GraniteMoeHybrid, NemotronH.

The routing weights are held constant (no relevance flows into the router), so each token's
output is a fixed combination of its experts' outputs; inside a gated expert the product
``act(gate) * up`` takes the half rule. The router itself needs no adapter: its weights are
detached here, which removes it from the relevance path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mambalrp.adapters.base import Adapter, has_attrs
from mambalrp.context import LRPContext


def _is_bank(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 3


class ExpertsAdapter(Adapter):
    """Experts with ``gate_up_proj`` (gated) or ``up_proj`` (plain) and ``down_proj`` banks."""

    name = "moe-experts"
    family = "mixture-of-experts expert banks"
    role = "other"
    uses = ("gate_up_proj", "up_proj", "down_proj", "act_fn.*")

    def matches(self, module: nn.Module) -> bool:
        if not has_attrs(module, "down_proj", "act_fn", "num_experts") or not _is_bank(module.down_proj):
            return False
        return _is_bank(getattr(module, "gate_up_proj", None)) or _is_bank(getattr(module, "up_proj", None))

    def forward(
        self,
        module: nn.Module,
        ctx: LRPContext,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        R = ctx.rules
        weights = R.routing_weights(top_k_weights)
        gated = _is_bank(getattr(module, "gate_up_proj", None))
        out = torch.zeros_like(hidden_states, dtype=weights.dtype if not gated else hidden_states.dtype)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=module.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == module.num_experts:
                continue
            pos, token = torch.where(mask[e])
            x = hidden_states[token]
            if gated:
                gate, up = F.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
                h = R.mul(module.act_fn(gate), up)
            else:
                h = module.act_fn(F.linear(x, module.up_proj[e]))
            h = F.linear(h, module.down_proj[e]) * weights[token, pos, None]
            out = out.index_add(0, token, h.to(out.dtype))
        return out.to(hidden_states.dtype)

"""GraniteMoe-style mixtures of experts: ``input_linear`` and ``output_linear`` are banks of
expert weights (``ParallelExperts``, a 3-D ``weight`` applied per expert to its share of the
tokens), the router returns ``(index, batch_index, batch_gates, expert_size, logits)``
(GraniteMoeHybrid's ``GraniteMoeHybridMoE`` up to transformers 5.12).

The gates are constants under the rules; ``act(gate) * up`` inside the experts takes the half
rule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mambalrp.adapters.base import Adapter, code_names, has_attrs
from mambalrp.context import LRPContext


def _bank(module: Any) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 3


class ParallelExpertsAdapter(Adapter):
    """``input_linear`` / ``output_linear`` expert banks, ``activation``, ``router``, ``input_size``."""

    name = "moe-parallel-experts"
    family = "GraniteMoe-style parallel-experts MoE (GraniteMoeHybrid on transformers 5.12 and before)"
    role = "other"
    uses = ("input_linear.*", "output_linear.*", "router.*")

    def matches(self, module: nn.Module) -> bool:
        if not has_attrs(module, "input_linear", "output_linear", "activation", "router", "input_size"):
            return False
        return _bank(module.input_linear) and _bank(module.output_linear)

    def forward(self, module: nn.Module, ctx: LRPContext, layer_input: torch.Tensor, *args: Any, **kwargs: Any):
        R = ctx.rules
        b, T, d = layer_input.shape
        x = layer_input.reshape(-1, d)
        _, batch_index, batch_gates, expert_size, router_logits = module.router(x)
        gates = R.routing_weights(batch_gates)
        gate, up = module.input_linear(x[batch_index], expert_size).chunk(2, dim=-1)
        expert_out = module.output_linear(R.mul(module.activation(gate), up), expert_size) * gates[:, None]
        out = torch.zeros((b * T, module.input_size), dtype=expert_out.dtype, device=expert_out.device)
        out = out.index_add(0, batch_index, expert_out).view(b, T, module.input_size)
        # transformers 4.x returns (output, router_logits); 5.x only the output.
        return (out, router_logits) if "router_logits" in code_names(module) else out

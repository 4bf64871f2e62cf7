"""Sparse MoE blocks with a sigmoid-gated shared expert (Qwen3-Next)::

    out = experts(x; router) + sigmoid(shared_expert_gate(x)) * shared_expert(x)

The routed experts and the shared expert are patched by their own adapters (``moe-experts``,
``gated-mlp``); the router's weights are constants there. The shared expert's gate is a factor
computed from the input that scales the shared expert's output: it is held constant too
(``RuleSet.gate_coefficient``), so relevance flows through the experts only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mambalrp.adapters.base import Adapter, has_attrs
from mambalrp.context import LRPContext


class SharedGateMoEAdapter(Adapter):
    """``gate`` (router), ``experts``, ``shared_expert`` and a one-output ``shared_expert_gate``."""

    name = "moe-shared-gate"
    family = "sparse MoE with a sigmoid-gated shared expert (Qwen3-Next)"
    role = "other"
    uses = ("gate.*", "experts.*", "shared_expert.*", "shared_expert_gate.*")

    def matches(self, module: nn.Module) -> bool:
        if not has_attrs(module, "gate", "experts", "shared_expert", "shared_expert_gate"):
            return False
        gate = module.shared_expert_gate
        return isinstance(gate, nn.Linear) and gate.out_features == 1

    def forward(self, module: nn.Module, ctx: LRPContext, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        b, T, d = hidden_states.shape
        flat = hidden_states.reshape(-1, d)
        shared = module.shared_expert(flat)
        _, weights, selected = module.gate(flat)
        routed = module.experts(flat, selected, weights)
        scale = ctx.rules.gate_coefficient(torch.sigmoid(module.shared_expert_gate(flat)))
        return (routed + scale * shared).reshape(b, T, d)

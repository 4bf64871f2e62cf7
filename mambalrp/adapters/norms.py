"""RMSNorm modules (transformers' ``MambaRMSNorm`` / ``Mamba2RMSNorm`` and look-alikes)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mambalrp.adapters.base import Adapter
from mambalrp.context import LRPContext


class RMSNormAdapter(Adapter):
    """``weight * x / rms(x)`` with the LN-rule; matched by a 1-D weight parameter and an epsilon."""

    name = "rmsnorm"
    family = "RMSNorm"
    role = "norm"

    def matches(self, module: nn.Module) -> bool:
        if "RMSNorm" not in type(module).__name__ or hasattr(module, "group_size"):
            return False
        weight = getattr(module, "weight", None)
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        return isinstance(weight, nn.Parameter) and weight.dim() == 1 and isinstance(eps, float)

    def forward(self, module: nn.Module, ctx: LRPContext, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        return ctx.rules.rmsnorm(hidden_states, module.weight, eps)


class LinearAdapter(Adapter):
    """``nn.Linear`` under the epsilon or gamma rule (patched only when the rule set asks for it)."""

    name = "linear"
    family = "nn.Linear"
    role = "linear"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def forward(self, module: nn.Module, ctx: LRPContext, x: torch.Tensor, *args: Any, **kwargs: Any):
        return ctx.rules.linear_map(x, module.weight, module.bias)

"""Element-wise activation modules outside Mamba mixers (MLPs, experts): the identity rule."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mambalrp.adapters.base import Adapter
from mambalrp.context import LRPContext

# Element-wise activations with f(0) = 0, by class name (torch's and transformers' ACT2FN classes).
ZERO_AT_ZERO = frozenset(
    """SiLU SiLUActivation GELU GELUActivation NewGELUActivation GELUTanh FastGELUActivation
    AccurateGELUActivation QuickGELUActivation ReLU ReLUSquaredActivation Mish MishActivation""".split()
)


class ActivationAdapter(Adapter):
    """SiLU, GELU, ReLU, squared ReLU, Mish modules: relevance passes unchanged (identity rule)."""

    name = "activation"
    family = "element-wise activations (SiLU, GELU, ReLU, ReLU^2, Mish)"
    role = "other"

    def matches(self, module: nn.Module) -> bool:
        return type(module).__name__ in ZERO_AT_ZERO and next(module.parameters(), None) is None

    def forward(self, module: nn.Module, ctx: LRPContext, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        original = type(module).forward
        return ctx.rules.activation(x, lambda t: original(module, t))

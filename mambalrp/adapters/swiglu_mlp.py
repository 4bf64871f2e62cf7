"""SwiGLU MLPs named ``w1`` / ``w3`` / ``w2`` (LFM2): ``w2(silu(w1(x)) * w3(x))``.

The activation is called inline (no ``act_fn`` submodule), so the adapter applies the identity
rule to SiLU and the half rule to the product itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mambalrp.adapters.base import Adapter, code_names, has_attrs
from mambalrp.context import LRPContext


class SwiGLUMLPAdapter(Adapter):
    """``w2(silu(w1(x)) * w3(x))`` with three ``nn.Linear`` layers and an inline SiLU."""

    name = "swiglu-mlp-w123"
    family = "SwiGLU MLP (w1 / w3 / w2: LFM2)"
    role = "other"
    uses = ("w1.*", "w2.*", "w3.*")

    def matches(self, module: nn.Module) -> bool:
        if not has_attrs(module, "w1", "w2", "w3"):
            return False
        if not all(isinstance(getattr(module, n), nn.Linear) for n in ("w1", "w2", "w3")):
            return False
        return "silu" in code_names(module)

    def refuse(self, module: nn.Module) -> str | None:
        names = set(code_names(module))
        other = sorted(names & {"gelu", "relu", "sigmoid", "tanh", "act_fn", "activation"})
        if other:
            return f"its forward also refers to {', '.join(other)} (not only SiLU)"
        return super().refuse(module)

    def forward(self, module: nn.Module, ctx: LRPContext, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        R = ctx.rules
        return module.w2(R.mul(R.act(module.w1(x)), module.w3(x)))

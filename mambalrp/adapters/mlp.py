"""MLPs of hybrid models: ``down(act(gate(x)) * up(x))`` with the half rule on the product.

The activation itself is a submodule (``act_fn`` / ``activation``) that the activation adapter
patches, so it is called as is. Non-gated MLPs (``down(act(up(x)))``, e.g. NemotronH) need no
adapter: their activation module is patched and everything else is linear.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mambalrp.adapters.base import Adapter, has_attrs
from mambalrp.context import LRPContext


class GatedMLPAdapter(Adapter):
    """``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn`` (Llama-style; Jamba, Bamba).

    Scalar ``gate_multiplier`` (applied before the activation) and ``down_multiplier`` (applied
    after ``down_proj``) are taken from the module when present (Falcon-H1's muP multipliers).
    """

    name = "gated-mlp"
    family = "gated MLP (gate_proj / up_proj / down_proj)"
    role = "other"
    uses = ("gate_proj.*", "up_proj.*", "down_proj.*", "act_fn.*")

    def matches(self, module: nn.Module) -> bool:
        return has_attrs(module, "gate_proj", "up_proj", "down_proj", "act_fn") and all(
            isinstance(getattr(module, n), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")
        )

    def refuse(self, module: nn.Module) -> str | None:
        for name in ("gate_multiplier", "down_multiplier"):
            value = module.__dict__.get(name, None)
            if value is not None and not isinstance(value, (int, float)):
                return f"its {name} is a {type(value).__name__}, not a number"
        return super().refuse(module)

    def forward(self, module: nn.Module, ctx: LRPContext, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        gate = module.gate_proj(x)
        gate_multiplier = module.__dict__.get("gate_multiplier", None)
        if gate_multiplier is not None:
            gate = gate * gate_multiplier
        out = module.down_proj(ctx.rules.mul(module.act_fn(gate), module.up_proj(x)))
        down_multiplier = module.__dict__.get("down_multiplier", None)
        return out if down_multiplier is None else out * down_multiplier


class FusedGatedMLPAdapter(Adapter):
    """One projection to ``(gate, up)`` then ``act(gate) * up``: GraniteMoeHybrid's shared MLP
    (``input_linear`` / ``output_linear`` / ``activation``) and Zamba2's MLP (``gate_up_proj`` /
    ``down_proj`` / ``act_fn`` plus per-layer low-rank adapters ``gate_up_proj_adapter_list``)."""

    name = "fused-gated-mlp"
    family = "fused gated MLP (GraniteMoeHybrid shared MLP, Zamba2 MLP)"
    role = "other"
    uses = (
        "input_linear.*", "output_linear.*", "activation.*",
        "gate_up_proj.*", "down_proj.*", "act_fn.*", "gate_up_proj_adapter_list.*",
    )

    def matches(self, module: nn.Module) -> bool:
        granite = has_attrs(module, "input_linear", "output_linear", "activation") and isinstance(
            module.input_linear, nn.Linear
        )
        zamba = has_attrs(module, "gate_up_proj", "down_proj", "act_fn") and isinstance(module.gate_up_proj, nn.Linear)
        return granite or zamba

    def forward(
        self, module: nn.Module, ctx: LRPContext, x: torch.Tensor, layer_idx: int | None = None, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        if hasattr(module, "input_linear"):
            gate, up = module.input_linear(x).chunk(2, dim=-1)
            return module.output_linear(ctx.rules.mul(module.activation(gate), up))
        gate_up = module.gate_up_proj(x)
        adapters = getattr(module, "gate_up_proj_adapter_list", None)
        if adapters is not None and hasattr(module, "layer_dic"):
            gate_up = gate_up + adapters[module.layer_dic[layer_idx]](x)
        gate, up = torch.chunk(gate_up, 2, dim=-1)
        return module.down_proj(ctx.rules.mul(module.act_fn(gate), up))

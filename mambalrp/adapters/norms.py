"""RMSNorm modules (transformers' ``MambaRMSNorm`` / ``Mamba2RMSNorm`` and look-alikes) and
``torch.nn.LayerNorm``."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from mambalrp.adapters.base import Adapter
from mambalrp.context import LRPContext


class RMSNormAdapter(Adapter):
    """``weight * x / rms(x)`` with the LN-rule; matched by a 1-D weight parameter and an epsilon.

    Also ``torch.nn.RMSNorm`` over one dimension, with ``eps=None`` (the input dtype's machine
    epsilon, as torch uses) and without a weight (``elementwise_affine=False``).
    """

    name = "rmsnorm"
    family = "RMSNorm"
    role = "norm"
    uses = ("weight",)

    def matches(self, module: nn.Module) -> bool:
        if "RMSNorm" not in type(module).__name__ or hasattr(module, "group_size"):
            return False
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.RMSNorm):
            return len(module.normalized_shape) == 1 and (weight is None or weight.dim() == 1)
        return isinstance(weight, nn.Parameter) and weight.dim() == 1 and isinstance(_eps(module), float)

    def refuse(self, module: nn.Module) -> str | None:
        inputs = [n for n in inspect.signature(type(module).forward).parameters if n != "self"]
        if len(inputs) > 1 and not all(n in ("args", "kwargs") for n in inputs[1:]):
            return f"its forward takes more than the input ({', '.join(inputs)}): a gated norm"
        return super().refuse(module)

    def forward(self, module: nn.Module, ctx: LRPContext, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        eps = _eps(module)
        if eps is None:  # torch.nn.RMSNorm(eps=None)
            eps = torch.finfo(hidden_states.dtype).eps
        weight = module.weight
        if weight is None:  # torch.nn.RMSNorm(elementwise_affine=False): a weight of ones is exact
            weight = torch.ones(hidden_states.shape[-1], dtype=hidden_states.dtype, device=hidden_states.device)
        return ctx.rules.rmsnorm(hidden_states, weight, eps)


class LayerNormAdapter(Adapter):
    """``torch.nn.LayerNorm`` over the last dimension with the LN-rule (``1 / std`` constant,
    the centring linear; see :meth:`mambalrp.RuleSet.layer_norm`). With or without weight and
    bias; the bias absorbs relevance."""

    name = "layernorm"
    family = "LayerNorm"
    role = "norm"
    uses = ("weight", "bias")

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.LayerNorm)

    def refuse(self, module: nn.Module) -> str | None:
        if len(module.normalized_shape) != 1:
            return f"it normalises over {len(module.normalized_shape)} dimensions, not the last one"
        return super().refuse(module)

    def forward(self, module: nn.Module, ctx: LRPContext, x: torch.Tensor, *args: Any, **kwargs: Any):
        return ctx.rules.layer_norm(x, module.weight, module.bias, module.eps)


def _eps(module: nn.Module) -> float | None:
    return getattr(module, "variance_epsilon", getattr(module, "eps", None))


class LinearAdapter(Adapter):
    """``nn.Linear`` under the epsilon or gamma rule (patched only when the rule set asks for it)."""

    name = "linear"
    family = "nn.Linear"
    role = "linear"
    uses = ("weight", "bias")

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def forward(self, module: nn.Module, ctx: LRPContext, x: torch.Tensor, *args: Any, **kwargs: Any):
        return ctx.rules.linear_map(x, module.weight, module.bias)

"""Zero-centred RMSNorms: ``x / rms(x) * (1 + weight)`` (Qwen3-Next, Qwen3.5, Gemma-style).

Named and shaped like an RMSNorm, such a norm computes another function than the plain adapter's
``weight * x / rms(x)``. This adapter recognises it by what it computes: a norm-shaped module
whose own forward, on a small fixed probe, gives ``(1 + weight) * x / rms(x)``. The LN-rule then
applies with the scale ``1 + weight``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from mambalrp.adapters.base import Adapter
from mambalrp.context import LRPContext


def _eps(module: nn.Module) -> Any:
    return getattr(module, "variance_epsilon", getattr(module, "eps", None))


def computes_zero_centred(module: nn.Module) -> bool:
    """Whether ``module``'s own forward computes ``(1 + weight) * x / rms(x)`` on a fixed probe
    (a ``(3, d)`` float input drawn from a seeded generator; compared to 1e-5 relative)."""
    weight = module.weight
    if weight.device.type == "meta" or not weight.dtype.is_floating_point:
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, weight.shape[0], generator=gen).to(device=weight.device, dtype=weight.dtype)
    eps = float(_eps(module))
    try:
        with torch.no_grad():
            got = type(module).forward(module, x)
    except Exception:  # noqa: BLE001 - a forward that cannot run on the probe is not this norm
        return False
    if not isinstance(got, torch.Tensor) or got.shape != x.shape:
        return False
    x32 = x.float()
    want = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())
    tol = 1e-5 if weight.dtype in (torch.float32, torch.float64) else 2e-2
    return bool((got.float() - want).abs().max() <= tol * want.abs().max().clamp_min(1.0))


class ZeroCentredRMSNormAdapter(Adapter):
    """``(1 + weight) * x / rms(x)`` with the LN-rule; matched by an RMSNorm's shape and by what
    its own forward computes on a probe."""

    name = "rmsnorm-zero-centred"
    family = "zero-centred RMSNorm ((1 + weight) scale: Qwen3-Next, Qwen3.5)"
    role = "norm"
    uses = ("weight",)

    def matches(self, module: nn.Module) -> bool:
        if "RMSNorm" not in type(module).__name__ or isinstance(module, nn.RMSNorm):
            return False
        weight = module.__dict__.get("_parameters", {}).get("weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or not isinstance(_eps(module), float):
            return False
        inputs = [n for n in inspect.signature(type(module).forward).parameters if n != "self"]
        if len(inputs) != 1:
            return False
        return computes_zero_centred(module)

    def forward(self, module: nn.Module, ctx: LRPContext, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        scale = 1.0 + module.weight.float()
        return ctx.rules.rmsnorm(hidden_states.float(), scale, _eps(module)).to(hidden_states.dtype)

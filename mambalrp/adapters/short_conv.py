"""LFM2's gated short convolution (transformers ``Lfm2ShortConv``)::

    B, C, x = in_proj(h)        y = out_proj(C * conv(B * x))

with ``conv`` a causal depthwise convolution over time. It is no state space model: the two
products are multiplicative gates of two signals (half rule each) around a linear map, and
nothing is held constant but what the half rule holds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mambalrp.adapters.base import Adapter, conv_problem, first_problem, has_attrs, mask_padding
from mambalrp.context import LRPContext


class ShortConvAdapter(Adapter):
    """``out_proj(C * conv(B * x))`` with ``(B, C, x)`` from one ``in_proj`` of three equal parts."""

    name = "lfm2-short-conv"
    family = "gated short convolution (transformers LFM2)"
    role = "mixer"
    uses = ("in_proj.*", "conv.weight", "conv.bias", "out_proj.*")

    def matches(self, module: nn.Module) -> bool:
        if not has_attrs(module, "in_proj", "conv", "out_proj", "conv_kernel_size"):
            return False
        return isinstance(module.in_proj, nn.Linear) and isinstance(module.conv, nn.Conv1d)

    def refuse(self, module: nn.Module) -> str | None:
        width = module.conv.in_channels
        return first_problem(
            super().refuse(module),
            conv_problem(module.conv, width, "conv"),
            None if module.in_proj.out_features == 3 * width
            else f"its in_proj has width {module.in_proj.out_features} where B, C and x need {3 * width}",
        )

    def forward(
        self,
        module: nn.Module,
        ctx: LRPContext,
        hidden_states: torch.Tensor,
        cache: Any = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        # A cache (under any keyword) is refused by lrp() itself.
        R = ctx.rules
        x = mask_padding(hidden_states, attention_mask)
        B, C, x = module.in_proj(x).transpose(-1, -2).chunk(3, dim=-2)  # each (b, d, T)
        bx = ctx.tap(module, "input_gate", R.mul(B, x))
        conv = ctx.tap(module, "conv", R.conv1d(bx, module.conv.weight, module.conv.bias).to(bx.dtype))
        y = ctx.tap(module, "output_gate", R.mul(C, conv))
        return module.out_proj(y.transpose(-1, -2).contiguous())

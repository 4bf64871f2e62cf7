"""Bidirectional Mamba-1 mixers as in Vision Mamba (Vim, ``bimamba_type="v2"``).

A forward scan over the sequence and a second scan, with its own conv1d, ``x_proj``, ``dt_proj``,
``A_b_log`` and ``D_b``, over the reversed sequence; both are gated by the same ``silu(z)``, the
backward branch is flipped back, the two are summed (and halved when ``if_devide_out``), and one
``out_proj`` follows. Each branch carries the MambaLRP rules; the sum and the flips are linear.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mambalrp.adapters.base import Adapter, first_problem, has_attrs
from mambalrp.adapters.mamba_ssm_mamba1 import _MAMBA_SSM_ATTRS, mamba1_branch, mamba1_problem
from mambalrp.context import LRPContext


class VimBiMambaAdapter(Adapter):
    """Vim's bidirectional mixer: matched by the ``*_b`` parameters of the reverse branch."""

    name = "vim-bimamba-v2"
    family = "Vision Mamba bidirectional mixer (Vim, bimamba v2)"
    role = "mixer"
    uses = (
        "in_proj.*", "out_proj.*", "A_log", "D", "A_b_log", "D_b",
        "conv1d.weight", "conv1d.bias", "x_proj.*", "dt_proj.weight", "dt_proj.bias",
        "conv1d_b.weight", "conv1d_b.bias", "x_proj_b.*", "dt_proj_b.weight", "dt_proj_b.bias",
    )

    def matches(self, module: nn.Module) -> bool:
        if not has_attrs(module, *_MAMBA_SSM_ATTRS, "A_b_log", "D_b", "conv1d_b", "x_proj_b", "dt_proj_b"):
            return False
        return getattr(module, "bimamba_type", "v2") == "v2" and module.A_b_log.dim() == 2

    def refuse(self, module: nn.Module) -> str | None:
        return first_problem(
            super().refuse(module),
            mamba1_problem(module, one_direction=False),
            mamba1_problem(module, "_b", one_direction=False),
        )

    def forward(
        self, module: nn.Module, ctx: LRPContext, hidden_states: torch.Tensor, inference_params: Any = None, **kwargs: Any
    ) -> torch.Tensor:
        R = ctx.rules
        dtype = hidden_states.dtype
        xz = ctx.tap(module, "in_proj", module.in_proj(hidden_states)).transpose(1, 2)  # (b, 2d, T)
        common = (module.d_state, module.dt_rank)
        y_fwd = mamba1_branch(
            R, ctx, module, xz, module.conv1d, module.x_proj, module.dt_proj, module.A_log, module.D, *common
        )
        y_bwd = mamba1_branch(
            R, ctx, module, xz.flip(-1), module.conv1d_b, module.x_proj_b, module.dt_proj_b, module.A_b_log,
            module.D_b, *common, tag="reverse_",
        ).flip(-1)
        y = y_fwd + y_bwd
        if getattr(module, "if_devide_out", False):
            y = y / 2
        return ctx.tap(module, "out_proj", module.out_proj(y.transpose(1, 2).to(dtype)))

"""Zamba (v1) mixers as in transformers' ``ZambaMambaMixer``: Mamba-1 split into independent heads.

The ``in_proj`` output is interleaved: channel ``2c`` is the scan input ``x_c``, channel
``2c + 1`` the gate ``z_c``. One causal depthwise conv and SiLU run over the whole width; then
the width is cut into ``n_mamba_heads`` heads of ``mamba_head_dim`` channels, and each head is a
Mamba-1 scan of its own: its own ``x_proj_weight`` (``(heads, rank + 2 n, head_dim)``, no bias),
``dt_proj_weight`` and ``dt_proj_bias``, ``A_log`` (``(heads, head_dim, n)``) and ``D``, and its
own ``B`` and ``C``. The heads' gated outputs are concatenated and projected by ``out_proj``.

Under the rules every head is the project's Mamba-1 scan (the SSM rule), SiLU takes the
identity rule and each head's gate ``y * silu(z)`` the half rule.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mambalrp.adapters.base import (
    Adapter,
    activation_problem,
    conv_problem,
    direction_problem,
    first_problem,
    has_attrs,
    mask_padding,
)
from mambalrp.context import LRPContext


class ZambaMambaMixerAdapter(Adapter):
    """``in_proj -> interleaved (x, z); conv1d -> SiLU -> per head: selective scan -> gate -> concat -> out_proj``."""

    name = "zamba-mamba-mixer"
    family = "Zamba (transformers ZambaModel / ZambaForCausalLM: multi-head Mamba-1 mixers)"
    role = "mixer"
    uses = (
        "in_proj.*", "conv1d.weight", "conv1d.bias", "x_proj_weight", "dt_proj_weight", "dt_proj_bias",
        "A_log", "D", "out_proj.*",
    )

    def matches(self, module: nn.Module) -> bool:
        if not has_attrs(module, "in_proj", "conv1d", "x_proj_weight", "dt_proj_weight", "A_log", "D", "out_proj"):
            return False
        if not has_attrs(module, "n_mamba_heads", "mamba_head_dim", "ssm_state_size", "time_step_rank", "intermediate_size"):
            return False
        return isinstance(module.A_log, torch.Tensor) and module.A_log.dim() == 3

    def refuse(self, module: nn.Module) -> str | None:
        return first_problem(
            super().refuse(module),
            activation_problem(module),
            direction_problem(module),
            conv_problem(module.conv1d, module.intermediate_size),
            _layout_problem(module),
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
        # ``cache`` (any name: ``cache_params`` before transformers 5.24) is refused by lrp() itself.
        R = ctx.rules
        b, T, _ = hidden_states.shape
        dtype = hidden_states.dtype
        d, h, p = module.intermediate_size, module.n_mamba_heads, module.mamba_head_dim
        n, rank = module.ssm_state_size, module.time_step_rank

        hidden_states = mask_padding(hidden_states, attention_mask)
        projected = ctx.tap(module, "in_proj", module.in_proj(hidden_states))
        interleaved = projected.view(b, T, d, 2)  # channel 2c is x_c, channel 2c + 1 is z_c
        x, z = interleaved[..., 0].transpose(1, 2), interleaved[..., 1].transpose(1, 2)  # (b, d, T)

        x = ctx.tap(module, "conv", R.conv1d(x, module.conv1d.weight, module.conv1d.bias))
        x = mask_padding(R.act(x).transpose(1, 2), attention_mask).transpose(1, 2)
        x = ctx.tap(module, "ssm_input", x)
        A = -torch.exp(module.A_log.float())  # (h, p, n)
        bias = module.dt_proj_bias

        heads = []
        for i in range(h):
            xi = x[:, i * p : (i + 1) * p]  # (b, p, T)
            params = torch.einsum("kp,bpt->btk", module.x_proj_weight[i], R.ssm_coefficient(xi))
            time_step, B, C = torch.split(params, [rank, n, n], dim=-1)
            dt = torch.einsum("pr,btr->bpt", module.dt_proj_weight[i], time_step).float()
            if bias is not None:
                dt = dt + bias[i].float()[:, None]
            dt = F.softplus(dt)
            y = R.selective_scan(
                xi, dt, A[i], B.transpose(1, 2).float(), C.transpose(1, 2).float(), module.D[i].float()
            )
            heads.append(R.mul(y, R.act(z[:, i * p : (i + 1) * p].float())))
        y = ctx.tap(module, "gate", torch.cat(heads, dim=1))
        return ctx.tap(module, "out_proj", module.out_proj(y.transpose(1, 2).to(dtype)))


def _layout_problem(module: nn.Module) -> str | None:
    """Why the mixer's projections and SSM parameters do not have the per-head shapes the adapter
    splits them into, or ``None``."""
    d, h, p = module.intermediate_size, module.n_mamba_heads, module.mamba_head_dim
    n, rank = module.ssm_state_size, module.time_step_rank
    if h * p != d:
        return f"{h} heads of {p} channels do not make its width {d}"
    width = getattr(module.in_proj, "out_features", None)
    if width is not None and width != 2 * d:
        return f"its in_proj has width {width} where the interleaved (x, z) layout needs {2 * d}"
    shapes = {
        "x_proj_weight": (module.x_proj_weight, (h, rank + 2 * n, p)),
        "dt_proj_weight": (module.dt_proj_weight, (h, p, rank)),
        "dt_proj_bias": (getattr(module, "dt_proj_bias", None), (h, p)),
        "A_log": (module.A_log, (h, p, n)),
        "D": (module.D, (h, p)),
    }
    for name, (tensor, want) in shapes.items():
        if name == "dt_proj_bias" and tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != want:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            return f"its {name} is {got} where the per-head layout needs {want}"
    return None

"""Mamba-2 mixers as in mamba_ssm's ``Mamba2`` (``mamba_ssm.modules.mamba2``).

Same computation as transformers' Mamba-2 mixer under mamba_ssm's names (``nheads``,
``headdim``, ``ngroups``, ``d_ssm``, ``dt_limit``), plus two options transformers lacks: an extra
gated-MLP part of ``in_proj`` (``d_mlp > 0``: ``silu(z0) * x0`` concatenated before
``out_proj``), and ``rmsnorm=False`` (the gate ``silu(z)`` is applied to the scan output without a
norm). mamba_ssm's forward calls fused Triton/CUDA kernels, so the adapter re-implements it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mambalrp.adapters.base import Adapter, activation_problem, conv_problem, direction_problem, first_problem, has_attrs
from mambalrp.context import LRPContext
from mambalrp.errors import MambaLRPError


class MambaSSMMamba2Adapter(Adapter):
    """mamba_ssm ``Mamba2``: matched by ``nheads``/``headdim``/``ngroups``/``d_ssm`` naming."""

    name = "mamba-ssm-mamba2"
    family = "mamba_ssm Mamba-2 (MambaLMHeadModel with the Mamba2 mixer)"
    role = "mixer"
    uses = ("in_proj.*", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight", "out_proj.*")

    def matches(self, module: nn.Module) -> bool:
        if not has_attrs(module, "in_proj", "conv1d", "dt_bias", "A_log", "D", "out_proj"):
            return False
        if not has_attrs(module, "nheads", "headdim", "ngroups", "d_ssm", "d_state", "rmsnorm"):
            return False
        return module.A_log.dim() == 1

    def refuse(self, module: nn.Module) -> str | None:
        d, h, g, n = module.d_ssm, module.nheads, module.ngroups, module.d_state
        norm = getattr(module, "norm", None) if module.rmsnorm else None
        return first_problem(
            super().refuse(module),
            activation_problem(module),
            direction_problem(module),
            "it is tensor-parallel (process_group is set)" if getattr(module, "process_group", None) is not None else None,
            conv_problem(module.conv1d, d + 2 * g * n),
            None if h * module.headdim == d else f"{h} heads of {module.headdim} do not make its width {d}",
            None if norm is None or isinstance(getattr(norm, "group_size", None), int) else "its gated norm has no group_size",
        )

    def forward(
        self,
        module: nn.Module,
        ctx: LRPContext,
        u: torch.Tensor,
        seqlen: int | None = None,
        seq_idx: Any = None,
        cu_seqlens: Any = None,
        inference_params: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if seqlen is not None or seq_idx is not None or cu_seqlens is not None:
            raise MambaLRPError(f"{self.name}: only full (batch, seqlen, dim) inputs without a cache are supported")
        R = ctx.rules
        b, T, _ = u.shape
        dtype = u.dtype
        d, h, p = module.d_ssm, module.nheads, module.headdim
        g, n = module.ngroups, module.d_state

        zxbcdt = ctx.tap(module, "in_proj", module.in_proj(u))
        d_mlp = (zxbcdt.shape[-1] - 2 * d - 2 * g * n - h) // 2
        z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, d, d + 2 * g * n, h], dim=-1)

        xBC = ctx.tap(module, "conv", R.conv1d(xBC.transpose(1, 2), module.conv1d.weight, module.conv1d.bias))
        xBC = R.act(xBC).transpose(1, 2)
        x, B, C = torch.split(xBC, [d, g * n, g * n], dim=-1)
        x = ctx.tap(module, "ssm_input", x)
        B, C = ctx.tap(module, "B", R.ssm_coefficient(B)), ctx.tap(module, "C", R.ssm_coefficient(C))

        dt = F.softplus(R.ssm_coefficient(dt).float() + module.dt_bias.float())
        lo, hi = module.dt_limit
        dt = ctx.tap(module, "delta", torch.clamp(dt, min=lo, max=hi))
        A = -torch.exp(module.A_log.float())
        D = module.D.float()
        if getattr(module, "D_has_hdim", False):
            D = D.reshape(h, p)

        y = R.ssd_scan(x.reshape(b, T, h, p), dt, A, B.reshape(b, T, g, n), C.reshape(b, T, g, n), D)
        y = ctx.tap(module, "y", y.reshape(b, T, d))
        if module.rmsnorm:
            norm = module.norm
            y = R.gated_rmsnorm(y, z, norm.weight, norm.eps, norm.group_size, getattr(norm, "norm_before_gate", False))
        else:
            y = R.mul(y, R.act(z.float()))
        y = ctx.tap(module, "gate", y)
        if d_mlp > 0:
            y = torch.cat([R.mul(R.act(z0), x0).to(y.dtype), y], dim=-1)
        return ctx.tap(module, "out_proj", module.out_proj(y.to(dtype)))

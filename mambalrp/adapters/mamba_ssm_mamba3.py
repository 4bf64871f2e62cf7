"""Mamba-3 mixers as in mamba_ssm's ``Mamba3`` (``mamba_ssm.modules.mamba3``, mamba_ssm >= 2.3.2).

One input projection gives ``z, x, B, C, dd_dt, dd_A, trap`` and the rotation angles; there is no
conv1d and no activation on ``x``. The coefficients (all frozen under the SSM rule):

* ``A_t = min(-softplus(dd_A_t), -A_floor)`` and ``dt_t = softplus(dd_dt_t + dt_bias)`` per head
  and token, decay ``exp(dt_t A_t)``; ``trap_t = sigmoid(trap)``;
* ``B`` and ``C``: learned RMSNorms over the state (``B_norm``, ``C_norm``), plus ``B_bias`` /
  ``C_bias`` per head and rank, then rotated by the angles
  ``theta_t = sum_{s<=t} pi * tanh(angle_s) * dt_s`` (mod 2 pi, per head) on the first
  ``num_rope_angles`` pairs of state dimensions: adjacent pairs ``(2i, 2i + 1)`` for SISO, pairs
  ``(i, i + d_state / 2)`` for MIMO (as the official kernels pair them).

The value ``x`` (scaled per rank by ``mimo_x`` for MIMO) goes through the trapezoidal scan
(:func:`mambalrp.functional.mamba3_scan`). The output is gated: ``y * silu(z)`` (SISO), or per
rank ``y_r * silu(z * mimo_z_r)`` combined by ``mimo_o`` (MIMO), with the half rule; or, with
``is_outproj_norm``, the gated RMSNorm ``norm(y) * silu(z)`` per head (group = head dim, norm
before gate) with the LN-rule, per rank before ``mimo_o`` for MIMO. Then ``out_proj``.

mamba_ssm's forward runs only on a GPU (Triton with TMA descriptors, TileLang), so the adapter's
forward is a pure-torch re-implementation; :func:`mamba3_forward` with the ``"gradient"`` rules is
the plain reference forward (it runs on a CPU).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mambalrp.adapters.base import Adapter, direction_problem, first_problem, has_attrs
from mambalrp.context import LRPContext
from mambalrp.errors import MambaLRPError
from mambalrp.rules import GRADIENT, RuleSet

_ATTRS = (
    "d_inner", "nheads", "headdim", "d_state", "num_bc_heads", "mimo_rank", "is_mimo",
    "is_outproj_norm", "A_floor", "num_rope_angles", "rotary_dim_divisor",
)


def rotate(v: torch.Tensor, theta: torch.Tensor, pairwise: bool) -> torch.Tensor:
    """Rotate pairs of state dimensions of ``v (b, T, R, h, n)`` by ``theta (b, T, h, S)``.

    Args:
        v: B or C per head and rank.
        theta: Angles; pair ``i < S`` is rotated by ``theta[..., i]``, the other dimensions stay.
        pairwise: Pairs ``(2i, 2i + 1)`` if true (SISO kernels), else ``(i, i + n / 2)`` (MIMO).

    Returns:
        The rotated tensor, same shape.
    """
    S, n = theta.shape[-1], v.shape[-1]
    cos, sin = theta.cos()[:, :, None], theta.sin()[:, :, None]
    if pairwise:
        first, second = v[..., 0 : 2 * S : 2], v[..., 1 : 2 * S : 2]
        turned = torch.stack([first * cos - second * sin, first * sin + second * cos], dim=-1).flatten(-2)
        return torch.cat([turned, v[..., 2 * S :]], dim=-1)
    half = n // 2
    first, second = v[..., :S], v[..., half : half + S]
    return torch.cat(
        [first * cos - second * sin, v[..., S:half], first * sin + second * cos, v[..., half + S :]], dim=-1
    )


def _state_norm(norm: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's gated-norm module without a gate: RMSNorm over the state dimension (float32)."""
    v = v.float()
    return v * torch.rsqrt(v.square().mean(-1, keepdim=True) + float(norm.eps)) * norm.weight.float()


def mamba3_forward(module: nn.Module, u: torch.Tensor, rules: RuleSet = GRADIENT, ctx: LRPContext | None = None):
    """The output of a mamba_ssm ``Mamba3`` module on ``u (b, T, d_model)``, in pure torch.

    Args:
        module: The ``Mamba3`` module (or one with its attributes and parameters).
        u: Input hidden states.
        rules: The rule set; the default ``"gradient"`` rules make this the plain forward.
        ctx: The LRP context (taps); ``None`` for none.

    Returns:
        ``(b, T, d_model)`` in ``u``'s dtype, equal to the module's own forward (which needs a GPU).
    """
    R = rules
    ctx = ctx if ctx is not None else LRPContext(rules)
    b, T, _ = u.shape
    dtype = u.dtype
    d, h, p, n = module.d_inner, module.nheads, module.headdim, module.d_state
    g, r, S = module.num_bc_heads, module.mimo_rank, module.num_rope_angles
    mimo = bool(module.is_mimo)

    zx = ctx.tap(module, "in_proj", module.in_proj(u))
    z, x, B, C, dd_dt, dd_A, trap, angles = torch.split(zx, [d, d, r * g * n, r * g * n, h, h, h, S], dim=-1)
    x = ctx.tap(module, "ssm_input", x.reshape(b, T, h, p))
    z = z.reshape(b, T, h, p)

    # Coefficients: frozen under the SSM rule.
    dd_dt, dd_A, trap, angles = (R.ssm_coefficient(t).float() for t in (dd_dt, dd_A, trap, angles))
    A = torch.clamp(-F.softplus(dd_A), max=-float(module.A_floor))
    dt = ctx.tap(module, "delta", F.softplus(dd_dt + module.dt_bias.float()))
    lam = torch.sigmoid(trap)
    theta = torch.cumsum(math.pi * torch.tanh(angles)[:, :, None, :] * dt[..., None], dim=1)
    theta = torch.remainder(theta, 2 * math.pi)
    heads_per_group = h // g
    coefficients = []
    for name, v, norm, bias in (("B", B, module.B_norm, module.B_bias), ("C", C, module.C_norm, module.C_bias)):
        v = _state_norm(norm, R.ssm_coefficient(v).reshape(b, T, r, g, n))
        v = v.repeat_interleave(heads_per_group, dim=3) + bias.float().transpose(0, 1)
        coefficients.append(ctx.tap(module, name, rotate(v, theta, pairwise=not mimo)))
    B, C = coefficients

    if mimo:
        xr = x.float()[:, :, None] * module.mimo_x.float().transpose(0, 1)
        y = R.mamba3_scan(xr, dt, A, lam, B, C, module.D.float())
    else:
        y = R.mamba3_scan(x.float(), dt, A, lam, B[:, :, 0], C[:, :, 0], module.D.float())
    y = ctx.tap(module, "y", y)

    if mimo:
        zr = z.float()[:, :, None] * module.mimo_z.float().transpose(0, 1)
        if module.is_outproj_norm:
            y = _gated_norm(R, module.norm, y.reshape(b, T, r, d), zr.reshape(b, T, r, d)).reshape(b, T, r, h, p)
        else:
            y = R.mul(y, R.act(zr))
        y = (y * module.mimo_o.float().transpose(0, 1)).sum(2).reshape(b, T, d)
    elif module.is_outproj_norm:
        y = _gated_norm(R, module.norm, y.reshape(b, T, d), z.reshape(b, T, d).float())
    else:
        y = R.mul(y, R.act(z.float())).reshape(b, T, d)
    y = ctx.tap(module, "gate", y)
    return ctx.tap(module, "out_proj", module.out_proj(y.to(dtype)))


def _gated_norm(R: RuleSet, norm: nn.Module, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return R.gated_rmsnorm(
        y, z, norm.weight.float(), float(norm.eps), norm.group_size, bool(getattr(norm, "norm_before_gate", True))
    )


class MambaSSMMamba3Adapter(Adapter):
    """mamba_ssm ``Mamba3`` (SISO and MIMO, with or without the gated output norm): matched by
    ``B_bias``/``C_bias``/``B_norm``/``C_norm`` beside ``dt_bias`` and its configuration
    attributes (``mimo_rank``, ``num_rope_angles``, ``A_floor``, ...)."""

    name = "mamba-ssm-mamba3"
    family = "mamba_ssm Mamba-3 (Mamba3 mixers, SISO and MIMO)"
    role = "mixer"
    uses = (
        "in_proj.*", "out_proj.*", "dt_bias", "D", "B_bias", "C_bias", "B_norm.weight", "C_norm.weight",
        "mimo_x", "mimo_z", "mimo_o", "norm.weight",
    )

    def matches(self, module: nn.Module) -> bool:
        return has_attrs(
            module, "in_proj", "out_proj", "dt_bias", "D", "B_bias", "C_bias", "B_norm", "C_norm", *_ATTRS
        )

    def refuse(self, module: nn.Module) -> str | None:
        return first_problem(super().refuse(module), direction_problem(module), _layout_problem(module))

    def forward(
        self,
        module: nn.Module,
        ctx: LRPContext,
        u: torch.Tensor,
        seq_idx: Any = None,
        cu_seqlens: Any = None,
        inference_params: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if seq_idx is not None or cu_seqlens is not None:
            raise MambaLRPError(
                f"{self.name}: only full (batch, seqlen, dim) inputs are supported (no seq_idx or cu_seqlens)"
            )
        return mamba3_forward(module, u, ctx.rules, ctx)


def _layout_problem(module: nn.Module) -> str | None:
    d, h, p, n = module.d_inner, module.nheads, module.headdim, module.d_state
    g, r, S = module.num_bc_heads, module.mimo_rank, module.num_rope_angles
    mimo = bool(module.is_mimo)
    if not mimo and r != 1:
        return f"it is not MIMO (is_mimo=False) but has mimo_rank={r}"
    if h * p != d:
        return f"{h} heads of {p} do not make its width d_inner={d}"
    if g < 1 or h % g:
        return f"its {h} heads are not a multiple of its num_bc_heads={g}"
    if n % 2:
        return f"its d_state={n} is odd (the rotary pairs need an even state)"
    if S < 0 or (2 * S > n):
        return f"its num_rope_angles={S} does not fit d_state={n}"
    if mimo and S != n // int(module.rotary_dim_divisor):
        return (
            f"its num_rope_angles={S} differ from d_state // rotary_dim_divisor = {n // int(module.rotary_dim_divisor)}, "
            "which the MIMO kernels rotate"
        )
    width = getattr(module.in_proj, "out_features", None)
    if width != 2 * d + 2 * r * g * n + 3 * h + S:
        return f"its in_proj has width {width} where the Mamba-3 layout needs {2 * d + 2 * r * g * n + 3 * h + S}"
    if tuple(module.D.shape) != (h,) or tuple(module.dt_bias.shape) != (h,):
        return f"D {tuple(module.D.shape)} and dt_bias {tuple(module.dt_bias.shape)} are not ({h},)"
    for name in ("B_bias", "C_bias") + (("mimo_x", "mimo_z", "mimo_o") if mimo else ()):
        t = getattr(module, name, None)
        want = (h, r, n) if name.endswith("bias") else (h, r, p)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else None
            return f"its {name} has shape {shape} where is_mimo={mimo}, mimo_rank={r} needs {want}"
    for name in ("B_norm", "C_norm"):
        norm = getattr(module, name)
        if not has_attrs(norm, "weight", "eps") or tuple(norm.weight.shape) != (n,):
            return f"its {name} is not an RMSNorm over d_state={n}"
        if getattr(norm, "group_size", None) not in (None, n):
            return f"its {name} normalises groups of {norm.group_size}, not the whole state"
    if module.is_outproj_norm:
        norm = getattr(module, "norm", None)
        if norm is None or not has_attrs(norm, "weight", "eps", "group_size") or tuple(norm.weight.shape) != (d,):
            return f"is_outproj_norm=True but its norm is not a gated RMSNorm over d_inner={d}"
    elif getattr(module, "norm", None) is not None:
        return "it has a norm but is_outproj_norm=False (the forward would not use it)"
    return None

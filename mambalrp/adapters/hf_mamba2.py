"""Mamba-2 mixers as in transformers' ``Mamba2Mixer`` (SSD scan and grouped gated RMSNorm).

Also the same mixer with the extras Falcon-H1's ``FalconH1Mixer`` holds, read from the module:
an input scale ``ssm_in_multiplier``, a per-channel ``mup_vector`` buffer on the ``in_proj``
output, a gated norm with ``n_groups`` instead of ``group_size``, or no norm (``nn.Identity`` in
a module whose ``mamba_rms_norm`` is false: ``y * silu(z)``).
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
    whole_output_needed,
)
from mambalrp.context import LRPContext
from mambalrp.functional.linear import split_linear


class HFMamba2MixerAdapter(Adapter):
    """``in_proj -> (z, xBC, dt); conv1d -> SiLU -> SSD scan -> gated RMSNorm(y, z) -> out_proj``.

    Optional parts, used when the module has them: ``ssm_in_multiplier`` (scalar input scale),
    ``mup_vector`` (per-channel scale of the ``in_proj`` output), and an ``nn.Identity`` norm in a
    module whose ``mamba_rms_norm`` is false, for which the gate is ``y * silu(z)``.
    """

    name = "hf-mamba2-mixer"
    family = "Mamba-2 (transformers Mamba2Model / Mamba2ForCausalLM; the Mamba-2 mixers of Bamba, NemotronH, Zamba2, GraniteMoeHybrid, Falcon-H1)"
    role = "mixer"
    uses = ("in_proj.*", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight", "out_proj.*", "mup_vector")

    def matches(self, module: nn.Module) -> bool:
        if not has_attrs(module, "in_proj", "conv1d", "dt_bias", "A_log", "D", "out_proj"):
            return False
        if not has_attrs(module, "num_heads", "head_dim", "n_groups", "ssm_state_size", "intermediate_size"):
            return False
        return module.A_log.dim() == 1 and (_ungated(module) or (has_attrs(module, "norm") and has_attrs(module.norm, "weight")))

    def refuse(self, module: nn.Module) -> str | None:
        d, h, g, n = module.intermediate_size, module.num_heads, module.n_groups, module.ssm_state_size
        width = getattr(module.in_proj, "out_features", None)
        return first_problem(
            super().refuse(module),
            activation_problem(module),
            direction_problem(module),
            conv_problem(module.conv1d, d + 2 * g * n),
            None if width in (None, 2 * d + 2 * g * n + h) else
            f"its in_proj has width {width} where the Mamba-2 layout needs {2 * d + 2 * g * n + h} (an extra MLP part?)",
            None if h * module.head_dim == d else f"{h} heads of {module.head_dim} do not make its width {d}",
            None if _ungated(module) else _norm_problem(module.norm, d),
            _multiplier_problem(module, 2 * d + 2 * g * n + h),
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
        d, h, p = module.intermediate_size, module.num_heads, module.head_dim
        g, n = module.n_groups, module.ssm_state_size
        conv_dim = d + 2 * g * n

        hidden_states = mask_padding(hidden_states, attention_mask)
        scale = getattr(module, "ssm_in_multiplier", None)
        if scale is not None:  # Falcon-H1: scalar input scale
            hidden_states = hidden_states * scale
        mup = getattr(module, "mup_vector", None)  # Falcon-H1: per-channel muP scale of (z, x, B, C, dt)
        conv = module.conv1d
        if whole_output_needed(ctx, module.in_proj):
            projected = module.in_proj(hidden_states)
            if mup is not None:
                projected = projected * mup
            projected = ctx.tap(module, "in_proj", projected)
            z, xBC, dt = projected.split([d, conv_dim, h], dim=-1)
            xBC = ctx.tap(module, "conv", R.conv1d(xBC.transpose(1, 2), conv.weight, conv.bias))
            xBC = mask_padding(R.act(xBC).transpose(1, 2), attention_mask)
            x, B, C = torch.split(xBC, [d, g * n, g * n], dim=-1)
        else:
            # In parts: the backward then multiplies only what gets a gradient (z and x under the
            # SSM rule), with no concatenation of the parts' gradients; the conv is depthwise,
            # so x and (B, C) are convolved apart.
            widths = [d, d, 2 * g * n, h]
            z, x, BC, dt = split_linear(hidden_states, module.in_proj.weight, module.in_proj.bias, widths)
            if mup is not None:
                z, x, BC, dt = (part * scale_ for part, scale_ in zip((z, x, BC, dt), mup.split(widths, dim=-1)))
            bias = (None, None) if conv.bias is None else (conv.bias[:d], conv.bias[d:])
            x = mask_padding(R.act(R.conv1d(x.transpose(1, 2), conv.weight[:d], bias[0])).transpose(1, 2), attention_mask)
            BC = mask_padding(R.act(R.conv1d(BC.transpose(1, 2), conv.weight[d:], bias[1])).transpose(1, 2), attention_mask)
            B, C = BC.split([g * n, g * n], dim=-1)
        x = ctx.tap(module, "ssm_input", x)
        B, C = ctx.tap(module, "B", R.ssm_coefficient(B)), ctx.tap(module, "C", R.ssm_coefficient(C))

        dt = F.softplus(R.ssm_coefficient(dt).float() + module.dt_bias.float())
        lo, hi = _dt_limit(module)
        dt = ctx.tap(module, "delta", torch.clamp(dt, min=lo, max=hi))
        A = -torch.exp(module.A_log.float())

        y = R.ssd_scan(x.reshape(b, T, h, p), dt, A, B.reshape(b, T, g, n), C.reshape(b, T, g, n), module.D.float())
        y = ctx.tap(module, "y", y.reshape(b, T, d))
        if _ungated(module):  # no gated norm (Falcon-H1 with mamba_rms_norm=False): y * silu(z)
            y = R.mul(y, R.act(z).to(y.dtype))
        else:
            norm = module.norm
            y = R.gated_rmsnorm(y, z, norm.weight, _norm_eps(norm), _group_size(norm, d), getattr(norm, "norm_before_gate", False))
        y = ctx.tap(module, "gate", y)
        return ctx.tap(module, "out_proj", module.out_proj(y.to(dtype)))


def _dt_limit(module: nn.Module) -> tuple[float, float]:
    """The clamp the module's own torch path applies to ``dt``.

    Zamba2 and NemotronH up to transformers 5.12 keep ``time_step_limit`` (Zamba2's default is
    ``None``) but their ``torch_forward`` ignores it and clamps at ``time_step_min`` instead; 5.17
    and later set ``time_step_limit = (time_step_min, inf)`` and use it.
    """
    torch_forward = getattr(type(module), "torch_forward", None)
    names = getattr(getattr(torch_forward, "__code__", None), "co_names", ())
    if "time_step_min" in names and "time_step_limit" not in names:
        return float(module.time_step_min), float("inf")
    limit = getattr(module, "time_step_limit", None)
    return (0.0, float("inf")) if limit is None else (float(limit[0]), float(limit[1]))


def _ungated(module: nn.Module) -> bool:
    """The mixer has no gated norm and says so: ``mamba_rms_norm`` false and ``norm`` an
    ``nn.Identity`` (transformers 5.x) or absent (4.x)."""
    norm = module._modules.get("norm", None)
    return module.__dict__.get("mamba_rms_norm", None) is False and (norm is None or isinstance(norm, nn.Identity))


def _multiplier_problem(module: nn.Module, width: int) -> str | None:
    """Why the optional Falcon-H1 multipliers are not a scalar and a ``(width,)`` vector, or ``None``."""
    scale = module.__dict__.get("ssm_in_multiplier", None)
    if scale is not None and not isinstance(scale, (int, float)):
        return f"its ssm_in_multiplier is a {type(scale).__name__}, not a number"
    mup = getattr(module, "mup_vector", None)
    if mup is not None and (not isinstance(mup, torch.Tensor) or mup.numel() != width or mup.shape[-1] != width):
        return f"its mup_vector does not scale the {width} channels of in_proj one by one"
    return None


def _norm_eps(norm: nn.Module) -> float:
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))


def _group_size(norm: nn.Module, width: int) -> int:
    """Channels per group of the gated RMSNorm: ``group_size``, else ``width / n_groups``
    (Falcon-H1), else the whole width (transformers 5.17 and before normalise over the whole
    width whatever ``n_groups`` the mixer has: the adapter follows the module)."""
    size = getattr(norm, "group_size", None)
    if isinstance(size, int):
        return size
    groups = getattr(norm, "n_groups", None)
    return width // groups if isinstance(groups, int) and groups > 0 else width


def _norm_problem(norm: nn.Module, width: int) -> str | None:
    """Why ``norm`` is not the gated RMSNorm the adapter computes, or ``None``."""
    if not isinstance(getattr(norm, "weight", None), torch.Tensor) or tuple(norm.weight.shape) != (width,):
        return f"its norm has no weight of shape ({width},)"
    if getattr(norm, "bias", None) is not None:
        return "its norm has a bias (a gated LayerNorm, not an RMSNorm)"
    if not isinstance(_norm_eps(norm), float):
        return "its norm has no float epsilon"
    size = _group_size(norm, width)
    if size <= 0 or width % size:
        return f"its norm's groups of {size} channels do not divide its width {width}"
    return None

"""Tiny pure-torch language models built from Mamba look-alike components.

Every component is a plain ``nn.Module`` whose forward is written here, loop by loop, from the
equations (no mambalrp code runs in it). Components carry the attribute names that mambalrp's
adapters match (mamba_ssm's and transformers' Mamba-1 names, transformers' Mamba-2 names,
``*RMSNorm`` classes with ``weight`` and ``eps``), but a :class:`MixerSpec` or a norm name can make
them compute something else than the computation the names suggest: a non-causal conv, a second
scan direction with the same weights, another gate or activation, a multiplier, another grouping
of the gated norm, a hidden step-size clamp. (``(1 + weight)`` scaling, once a look-alike, is
now computed by the zero-centred norm adapter: a standard norm.)

:func:`expected_verdict` says what a faithful library must do with a model:

* ``"standard"``: it computes exactly the standard Mamba computation: it must be explained.
* ``"lookalike"``: it computes something the adapters do not: it must be refused (raise).
* ``"either"``: refusing is acceptable (an extra parameter nobody uses, a LayerNorm no rule
  covers), but an explanation, if returned, must still be faithful.

:func:`lookalike_models` is a hypothesis strategy of ``(model, ids, description)``; the model
carries its :class:`ModelSpec` as ``model.spec``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

VOCAB = 32
D_STATE = 4
EXPAND = 2

# ---------------------------------------------------------------------------------------------
# Specifications


@dataclass(frozen=True)
class MixerSpec:
    """What one mixer is called and what it computes.

    Attributes:
        kind: ``"ssm1"`` (mamba_ssm Mamba-1 names), ``"hf1"`` (transformers Mamba-1 names) or
            ``"hf2"`` (transformers Mamba-2 names).
        padding: ``"causal"`` (pad kernel - 1, keep the first T outputs), ``"same"`` (pad
            ``(k - 1) // 2`` left, the rest right: ``padding="same"`` for even kernels, the number
            for odd ones) or ``"cut_end"`` (a causally padded ``nn.Conv1d`` whose forward keeps the
            LAST T outputs: anti-causal, with the causal configuration).
        kernel: Conv kernel size.
        direction: ``"forward"``, ``"bi"`` (the same weights scan the flipped input too, the
            flipped-back result is added; a subclass whose ``forward`` calls ``.flip``) or
            ``"bi_index"`` (the same, reversing with an index tensor instead of ``.flip``: nothing
            in the code names a flip). The forward-only classes contain no reversal code at all.
        flag: Name of an attribute announcing the direction (``"bidirectional"`` or
            ``"bimamba_type"``), or ``None``. With ``direction="forward"`` it is set to ``False`` /
            ``"none"``.
        gate: ``"silu"`` (``y * silu(z)``), ``"none"`` (``y``, z computed and ignored) or ``"gelu"``.
        extra: ``"none"``, ``"out_scale"`` (a parameter multiplying the output),
            ``"out_scale_buffer"`` (the same as a buffer), ``"out_multiplier_float"`` (a plain float
            attribute multiplying the output) or ``"unused"`` (a parameter the forward ignores).
        act_attr: The ``activation`` attribute.
        act_used: The activation the forward applies to the conv output.
        groups: Mamba-2: ``n_groups``.
        head_dim: Mamba-2: channels per head.
        norm_group_declared: Mamba-2 gated norm: ``"groups"`` (``group_size = d / n_groups``),
            ``"whole"`` (``group_size = d``) or ``"absent"`` (no ``group_size`` attribute).
        norm_group_used: Mamba-2 gated norm: ``"groups"`` or ``"whole"``, what its forward uses.
        before_gate_declared: Mamba-2: the norm's ``norm_before_gate`` attribute (``None``: absent).
        before_gate_used: Mamba-2: whether the norm's forward normalises before gating.
        dt_limit: Mamba-2: ``"none"``, ``"declared"`` (``time_step_limit = (0, 0.1)``, applied) or
            ``"hidden"`` (the forward clamps dt at 0.1 and declares nothing).
    """

    kind: str = "ssm1"
    padding: str = "causal"
    kernel: int = 4
    direction: str = "forward"
    flag: str | None = None
    gate: str = "silu"
    extra: str = "none"
    act_attr: str = "silu"
    act_used: str = "silu"
    groups: int = 1
    head_dim: int = 4
    norm_group_declared: str = "groups"
    norm_group_used: str = "groups"
    before_gate_declared: bool | None = None
    before_gate_used: bool = False
    dt_limit: str = "none"


@dataclass(frozen=True)
class ModelSpec:
    """A whole model: embedding, residual blocks ``x + mixer(norm(x))``, final norm, head.

    Norm names: ``"rms"`` (``nn.RMSNorm(eps=1e-5)``), ``"rms_default_eps"`` (``nn.RMSNorm`` with
    its default ``eps=None``), ``"my_rms"`` (:class:`MyRMSNorm`), ``"gemma"``
    (:class:`GemmaStyleRMSNorm`, ``x / rms(x) * (1 + weight)``), ``"layernorm"`` (``nn.LayerNorm``).
    """

    seed: int = 0
    d_model: int = 8
    layers: tuple[tuple[str, MixerSpec], ...] = (("rms", MixerSpec()),)
    final_norm: str = "rms"
    T: int = 6
    batch: int = 1


# Gemma-style (1 + weight) norms are a standard computation: the zero-centred RMSNorm adapter
# recognises them by what they compute.
STANDARD_NORMS = ("rms", "my_rms", "gemma")
LOOKALIKE_NORMS: tuple[str, ...] = ()
EITHER_NORMS = ("layernorm",)


def mixer_verdict(spec: MixerSpec, d_model: int) -> str:
    """``"standard"``, ``"lookalike"`` or ``"either"`` for one mixer (see the module docstring)."""
    lookalike = (
        spec.padding != "causal"
        or spec.direction != "forward"
        or spec.gate != "silu"
        or spec.extra in ("out_scale", "out_scale_buffer", "out_multiplier_float")
        or spec.act_attr not in ("silu", "swish")
        or spec.act_used != "silu"
    )
    if spec.kind == "hf2":
        d = EXPAND * d_model
        size = {"groups": d // spec.groups, "whole": d}
        declared = size["whole"] if spec.norm_group_declared == "absent" else size[spec.norm_group_declared]
        lookalike = (
            lookalike
            or declared != size[spec.norm_group_used]
            or bool(spec.before_gate_declared) != spec.before_gate_used
            or spec.dt_limit == "hidden"
        )
    if lookalike:
        return "lookalike"
    return "either" if spec.extra == "unused" else "standard"


def norm_verdict(name: str) -> str:
    if name in LOOKALIKE_NORMS:
        return "lookalike"
    if name in EITHER_NORMS:
        return "either"
    return "standard"


def expected_verdict(spec: ModelSpec) -> str:
    """What the library must do with the model (see the module docstring)."""
    verdicts = [norm_verdict(spec.final_norm)]
    for norm, mixer in spec.layers:
        verdicts += [norm_verdict(norm), mixer_verdict(mixer, spec.d_model)]
    if "lookalike" in verdicts:
        return "lookalike"
    return "either" if "either" in verdicts else "standard"


def describe(spec: ModelSpec) -> str:
    default = MixerSpec()
    parts = [f"seed={spec.seed} d_model={spec.d_model} T={spec.T} batch={spec.batch} -> {expected_verdict(spec)}"]
    for i, (norm, mixer) in enumerate(spec.layers):
        diff = {
            k: v for k, v in vars(mixer).items()
            if k != "kind" and v != getattr(default, k)
            and (mixer.kind == "hf2" or k not in ("groups", "head_dim", "norm_group_declared", "norm_group_used",
                                                  "before_gate_declared", "before_gate_used", "dt_limit"))
        }
        parts.append(f"layer {i}: {norm} + {mixer.kind}{diff or ''}")
    parts.append(f"final: {spec.final_norm}")
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------
# Reference computations, written from the equations


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name in ("silu", "swish"):
        return x * torch.sigmoid(x)
    if name == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    raise ValueError(name)


def depthwise_conv(x: torch.Tensor, conv: nn.Conv1d, left: int, right: int, keep_from: int, T: int) -> torch.Tensor:
    """``out[c, t] = bias[c] + sum_j w[c, j] * xpad[c, t + keep_from + j]`` with ``x`` padded by
    ``left`` zeros before and ``right`` after; ``x`` is ``(b, c, T)``, the result ``(b, c, T)``."""
    b, c, _ = x.shape
    k = conv.weight.shape[-1]
    xpad = torch.cat([x.new_zeros(b, c, left), x, x.new_zeros(b, c, right)], dim=-1)
    outs = []
    for t in range(T):
        s = t + keep_from
        acc = x.new_zeros(b, c)
        for j in range(k):
            acc = acc + conv.weight[:, 0, j] * xpad[:, :, s + j]
        if conv.bias is not None:
            acc = acc + conv.bias
        outs.append(acc)
    return torch.stack(outs, dim=-1)


def conv_layout(padding: str, kernel: int) -> tuple[object, int, int, int]:
    """``(nn.Conv1d padding argument, left, right, keep_from)`` of a conv variant."""
    if padding == "causal":
        return kernel - 1, kernel - 1, kernel - 1, 0
    if padding == "cut_end":  # configured causally, but the forward keeps the last T outputs
        return kernel - 1, kernel - 1, kernel - 1, kernel - 1
    if padding == "same":
        left = (kernel - 1) // 2
        arg: object = "same" if kernel % 2 == 0 else left
        return arg, left, kernel - 1 - left, 0
    raise ValueError(padding)


def selective_scan_loop(x, dt, A, B, C, D):
    """Mamba-1: ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t h_t + D x_t``.

    x, dt: (b, d, T); A: (d, n); B, C: (b, n, T); D: (d,)."""
    h = x.new_zeros(x.shape[0], x.shape[1], A.shape[1])
    ys = []
    for t in range(x.shape[-1]):
        h = torch.exp(dt[:, :, t, None] * A) * h + dt[:, :, t, None] * B[:, None, :, t] * x[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * x[:, :, t])
    return torch.stack(ys, dim=-1)


def ssd_scan_loop(x, dt, A, B, C, D):
    """Mamba-2, per head ``i`` of group ``g(i) = i // (heads / groups)``:
    ``h_t = exp(dt_t A_i) h_{t-1} + dt_t x_t B_t^T``, ``y_t = h_t C_t + D_i x_t``.

    x: (b, T, h, p); dt: (b, T, h); A, D: (h,); B, C: (b, T, g, n)."""
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    per = H // G
    state = x.new_zeros(b, H, P, N)
    ys = []
    for t in range(T):
        Bt = B[:, t].repeat_interleave(per, dim=1)  # (b, h, n)
        Ct = C[:, t].repeat_interleave(per, dim=1)
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        state = decay[:, :, None, None] * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None, :]
        ys.append((state * Ct[:, :, None, :]).sum(-1) + D[:, None] * x[:, t])
    return torch.stack(ys, dim=1)


# ---------------------------------------------------------------------------------------------
# Mixers


class LookalikeMamba1Mixer(nn.Module):
    """Mamba-1 mixer under mamba_ssm's (``kind="ssm1"``) or transformers' (``"hf1"``) names."""

    def __init__(self, spec: MixerSpec, d_model: int):
        super().__init__()
        d, n = EXPAND * d_model, D_STATE
        rank = math.ceil(d_model / 16)
        self._spec = spec
        self._d, self._n, self._rank = d, n, rank
        if spec.kind == "ssm1":
            self.d_model, self.d_inner, self.d_state, self.dt_rank, self.d_conv = d_model, d, n, rank, spec.kernel
        else:
            self.hidden_size, self.intermediate_size, self.ssm_state_size = d_model, d, n
            self.time_step_rank, self.conv_kernel_size = rank, spec.kernel
        self.activation = spec.act_attr
        if spec.flag == "bidirectional":
            self.bidirectional = spec.direction != "forward"
        elif spec.flag == "bimamba_type":
            self.bimamba_type = "v1" if spec.direction != "forward" else "none"
        arg, self._left, self._right, self._keep = conv_layout(spec.padding, spec.kernel)
        self.in_proj = nn.Linear(d_model, 2 * d, bias=False)
        self.conv1d = nn.Conv1d(d, d, spec.kernel, groups=d, padding=arg, bias=True)
        self.x_proj = nn.Linear(d, rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(rank, d, bias=True)
        self.A_log = nn.Parameter(torch.zeros(d, n))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = nn.Linear(d, d_model, bias=False)
        _add_extra(self, spec.extra, d_model)

    def _branch(self, xz: torch.Tensor) -> torch.Tensor:
        T = xz.shape[-1]
        x, z = xz.chunk(2, dim=1)
        x = _act(self._spec.act_used, depthwise_conv(x, self.conv1d, self._left, self._right, self._keep, T))
        dt, B, C = torch.split(self.x_proj(x.transpose(1, 2)), [self._rank, self._n, self._n], dim=-1)
        dt = F.softplus(self.dt_proj(dt)).transpose(1, 2)
        y = selective_scan_loop(x, dt, -torch.exp(self.A_log), B.transpose(1, 2), C.transpose(1, 2), self.D)
        return y if self._spec.gate == "none" else y * _act(self._spec.gate, z)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (b, 2d, T)
        return _apply_extra(self, self.out_proj(self._branch(xz).transpose(1, 2)))


class BiLookalikeMamba1Mixer(LookalikeMamba1Mixer):
    """:class:`LookalikeMamba1Mixer` that also scans the flipped sequence with the same weights."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(hidden_states).transpose(1, 2)
        y = self._branch(xz) + self._branch(xz.flip(-1)).flip(-1)
        return _apply_extra(self, self.out_proj(y.transpose(1, 2)))


class IndexReversedBiLookalikeMamba1Mixer(LookalikeMamba1Mixer):
    """The same as :class:`BiLookalikeMamba1Mixer`, reversing time with an index tensor."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(hidden_states).transpose(1, 2)
        y = self._branch(xz) + _reversed(self._branch(_reversed(xz, -1)), -1)
        return _apply_extra(self, self.out_proj(y.transpose(1, 2)))


class GatedGroupRMSNorm(nn.Module):
    """transformers-style gated RMSNorm ``weight * rmsnorm_groups(y * silu(z))`` whose declared
    ``group_size`` / ``norm_before_gate`` and computed grouping / order may differ."""

    def __init__(self, d: int, used_group: int, declared_group: int | None, before_used: bool,
                 before_declared: bool | None, gate: str, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps
        if declared_group is not None:
            self.group_size = declared_group
        if before_declared is not None:
            self.norm_before_gate = before_declared
        self._used_group, self._before, self._gate = used_group, before_used, gate

    def _norm(self, h: torch.Tensor) -> torch.Tensor:
        *prefix, d = h.shape
        g = h.view(*prefix, d // self._used_group, self._used_group)
        g = g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * g.reshape(*prefix, d)

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if gate is None:
            return self._norm(hidden_states)
        if self._before:
            return self._norm(hidden_states) * _act(self._gate, gate)
        return self._norm(hidden_states * _act(self._gate, gate))


class LookalikeMamba2Mixer(nn.Module):
    """Mamba-2 mixer under transformers' names (``Mamba2Mixer``)."""

    def __init__(self, spec: MixerSpec, d_model: int):
        super().__init__()
        d, n, g, p = EXPAND * d_model, D_STATE, spec.groups, spec.head_dim
        h = d // p
        self._spec = spec
        self.hidden_size, self.intermediate_size, self.ssm_state_size = d_model, d, n
        self.num_heads, self.head_dim, self.n_groups = h, p, g
        self.conv_kernel_size = spec.kernel
        self.conv_dim = d + 2 * g * n
        self.activation = spec.act_attr
        if spec.dt_limit == "declared":
            self.time_step_limit = (0.0, 0.1)
        if spec.flag == "bidirectional":
            self.bidirectional = spec.direction != "forward"
        elif spec.flag == "bimamba_type":
            self.bimamba_type = "v1" if spec.direction != "forward" else "none"
        arg, self._left, self._right, self._keep = conv_layout(spec.padding, spec.kernel)
        self.in_proj = nn.Linear(d_model, 2 * d + 2 * g * n + h, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, spec.kernel, groups=self.conv_dim, padding=arg, bias=True)
        self.dt_bias = nn.Parameter(torch.zeros(h))
        self.A_log = nn.Parameter(torch.zeros(h))
        self.D = nn.Parameter(torch.ones(h))
        size = {"groups": d // g, "whole": d}
        declared = None if spec.norm_group_declared == "absent" else size[spec.norm_group_declared]
        self.norm = GatedGroupRMSNorm(
            d, size[spec.norm_group_used], declared, spec.before_gate_used, spec.before_gate_declared, spec.gate
        )
        self.out_proj = nn.Linear(d, d_model, bias=False)
        _add_extra(self, spec.extra, d_model)

    def _scan(self, xBC: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        b, T, _ = xBC.shape
        d, g, n, h, p = self.intermediate_size, self.n_groups, self.ssm_state_size, self.num_heads, self.head_dim
        xBC = _act(self._spec.act_used, depthwise_conv(xBC.transpose(1, 2), self.conv1d, self._left, self._right,
                                                       self._keep, T)).transpose(1, 2)
        x, B, C = torch.split(xBC, [d, g * n, g * n], dim=-1)
        dt = F.softplus(dt + self.dt_bias)
        if self._spec.dt_limit != "none":  # declared (time_step_limit) or hidden
            dt = torch.clamp(dt, 0.0, 0.1)
        y = ssd_scan_loop(x.reshape(b, T, h, p), dt, -torch.exp(self.A_log), B.reshape(b, T, g, n),
                          C.reshape(b, T, g, n), self.D)
        return y.reshape(b, T, d)

    def _project(self, hidden_states: torch.Tensor):
        d, h = self.intermediate_size, self.num_heads
        return self.in_proj(hidden_states).split([d, self.conv_dim, h], dim=-1)

    def _finish(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = self.norm(y, None if self._spec.gate == "none" else z)
        return _apply_extra(self, self.out_proj(y))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        z, xBC, dt = self._project(hidden_states)
        return self._finish(self._scan(xBC, dt), z)


class BiLookalikeMamba2Mixer(LookalikeMamba2Mixer):
    """:class:`LookalikeMamba2Mixer` that also scans the flipped sequence with the same weights."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        z, xBC, dt = self._project(hidden_states)
        return self._finish(self._scan(xBC, dt) + self._scan(xBC.flip(1), dt.flip(1)).flip(1), z)


class IndexReversedBiLookalikeMamba2Mixer(LookalikeMamba2Mixer):
    """The same as :class:`BiLookalikeMamba2Mixer`, reversing time with an index tensor."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        z, xBC, dt = self._project(hidden_states)
        y = self._scan(xBC, dt) + _reversed(self._scan(_reversed(xBC, 1), _reversed(dt, 1)), 1)
        return self._finish(y, z)


def _reversed(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` reversed along ``dim`` by gathering with a descending index."""
    n = x.shape[dim]
    return x.index_select(dim, torch.arange(n - 1, -1, -1, device=x.device))


def _add_extra(module: nn.Module, extra: str, d_model: int) -> None:
    if extra == "out_scale":
        module.out_scale = nn.Parameter(torch.ones(d_model))
    elif extra == "out_scale_buffer":
        module.register_buffer("out_scale", torch.ones(d_model))
    elif extra == "out_multiplier_float":
        module.output_multiplier = 0.5
    elif extra == "unused":
        module.unused_scale = nn.Parameter(torch.ones(d_model))
    elif extra != "none":
        raise ValueError(extra)


def _apply_extra(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    extra = module._spec.extra
    if extra in ("out_scale", "out_scale_buffer"):
        return out * module.out_scale
    if extra == "out_multiplier_float":
        return out * module.output_multiplier
    return out


# ---------------------------------------------------------------------------------------------
# Norms


class MyRMSNorm(nn.Module):
    """A custom RMSNorm: ``weight * x / sqrt(mean(x^2) + eps)``."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class GemmaStyleRMSNorm(nn.Module):
    """An RMSNorm look-alike that scales by ``(1 + weight)``, as Gemma's does."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)) * (1.0 + self.weight)


def make_norm(name: str, d: int) -> nn.Module:
    if name == "rms":
        return nn.RMSNorm(d, eps=1e-5)
    if name == "rms_default_eps":
        return nn.RMSNorm(d)
    if name == "my_rms":
        return MyRMSNorm(d)
    if name == "gemma":
        return GemmaStyleRMSNorm(d)
    if name == "layernorm":
        return nn.LayerNorm(d, eps=1e-5)
    raise ValueError(name)


# ---------------------------------------------------------------------------------------------
# Model


_MIXERS = {
    (False, "forward"): LookalikeMamba1Mixer,
    (False, "bi"): BiLookalikeMamba1Mixer,
    (False, "bi_index"): IndexReversedBiLookalikeMamba1Mixer,
    (True, "forward"): LookalikeMamba2Mixer,
    (True, "bi"): BiLookalikeMamba2Mixer,
    (True, "bi_index"): IndexReversedBiLookalikeMamba2Mixer,
}


class Block(nn.Module):
    def __init__(self, norm: str, mixer: MixerSpec, d_model: int):
        super().__init__()
        self.norm = make_norm(norm, d_model)
        self.mixer = _MIXERS[mixer.kind == "hf2", mixer.direction](mixer, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))


class LookalikeLM(nn.Module):
    """``embedding -> blocks -> final norm -> head``; returns ``(batch, T, VOCAB)`` logits."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embedding = nn.Embedding(VOCAB, spec.d_model)
        self.layers = nn.ModuleList(Block(norm, mixer, spec.d_model) for norm, mixer in spec.layers)
        self.norm_f = make_norm(spec.final_norm, spec.d_model)
        self.lm_head = nn.Linear(spec.d_model, VOCAB, bias=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm_f(x))


def _initialise(model: nn.Module, gen: torch.Generator) -> None:
    """Biases zero, weights ``N(0, 1/fan_in)``, ``A_log ~ U[-1, 1]``, dt biases ``~ U[-3, -1]``,
    norm weights ``1 + N(0, 0.01)`` (``N(0, 0.01)`` for the ``(1 + weight)`` norm), multipliers
    ``~ U[0.5, 1]``."""
    norms = {n for n, m in model.named_modules() if isinstance(m, (nn.RMSNorm, nn.LayerNorm, MyRMSNorm, GatedGroupRMSNorm))}
    gemma = {n for n, m in model.named_modules() if isinstance(m, GemmaStyleRMSNorm)}

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            owner, _, leaf = name.rpartition(".")
            if leaf == "A_log":
                value = uniform(p.shape, -1.0, 1.0)
            elif name.endswith("dt_proj.bias") or leaf == "dt_bias":
                value = uniform(p.shape, -3.0, -1.0)
            elif leaf == "bias":
                value = torch.zeros(p.shape)
            elif leaf == "weight" and owner in gemma:
                value = 0.1 * torch.randn(p.shape, generator=gen)
            elif leaf == "weight" and owner in norms:
                value = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            elif leaf in ("out_scale", "unused_scale"):
                value = uniform(p.shape, 0.5, 1.0)
            elif leaf == "D":
                value = uniform(p.shape, 0.5, 1.5)
            else:
                fan_in = max(1, math.prod(p.shape[1:])) if p.dim() > 1 else 1
                value = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
            p.copy_(value)


def build(spec: ModelSpec) -> tuple[nn.Module, torch.Tensor, str]:
    """``(model, ids, description)`` of ``spec``: the model in eval mode, ``(batch, T)`` ids."""
    gen = torch.Generator().manual_seed(spec.seed)
    model = LookalikeLM(spec)
    _initialise(model, gen)
    model.eval()
    ids = torch.randint(0, VOCAB, (spec.batch, spec.T), generator=gen)
    return model, ids, describe(spec)


def standard(kind: str = "ssm1", **changes) -> MixerSpec:
    """The standard mixer of ``kind`` (``groups=2`` for Mamba-2), with ``changes``."""
    base = MixerSpec(kind=kind, groups=2 if kind == "hf2" else 1)
    return replace(base, **changes)


def one_layer(mixer: MixerSpec, norm: str = "rms", final: str = "rms", **model) -> ModelSpec:
    return ModelSpec(layers=((norm, mixer),), final_norm=final, **model)


# ---------------------------------------------------------------------------------------------
# The hypothesis strategy

# Changes that keep the computation standard (names and options the adapters handle).
_HARMLESS = {
    "kernel": [3, 4],
    "flag": [None, None, "bidirectional", "bimamba_type"],  # with direction "forward": False / "none"
    "act_attr": ["silu", "silu", "swish"],
}
# Changes that make a mixer compute something else than its names suggest.
_LOOKALIKE_MIXER = [
    {"padding": "same"},
    {"padding": "cut_end"},
    {"direction": "bi", "flag": None},
    {"direction": "bi_index", "flag": None},
    {"direction": "bi", "flag": "bidirectional"},
    {"direction": "bi", "flag": "bimamba_type"},
    {"gate": "none"},
    {"gate": "gelu"},
    {"extra": "out_scale"},
    {"extra": "out_scale_buffer"},
    {"extra": "out_multiplier_float"},
    {"extra": "unused"},
    {"act_attr": "gelu", "act_used": "gelu"},
    {"act_used": "gelu"},
]
_LOOKALIKE_MAMBA2 = [
    {"norm_group_declared": "whole", "norm_group_used": "groups"},
    {"norm_group_declared": "groups", "norm_group_used": "whole"},
    {"norm_group_declared": "absent", "norm_group_used": "groups"},
    {"before_gate_declared": None, "before_gate_used": True},
    {"before_gate_declared": True, "before_gate_used": False},
    {"dt_limit": "hidden"},
]
# Mamba-2 options that stay standard: declared and used agree.
_HARMLESS_MAMBA2 = [
    {},
    {"norm_group_declared": "whole", "norm_group_used": "whole"},
    {"norm_group_declared": "absent", "norm_group_used": "whole"},
    {"before_gate_declared": True, "before_gate_used": True},
    {"before_gate_declared": False, "before_gate_used": False},
    {"dt_limit": "declared"},
]


@st.composite
def mixer_specs(draw, d_model: int) -> MixerSpec:
    kind = draw(st.sampled_from(["ssm1", "hf1", "hf2"]))
    changes = {k: draw(st.sampled_from(v)) for k, v in _HARMLESS.items()}
    if kind == "hf2":
        changes["head_dim"] = draw(st.sampled_from([4, 8]))
        heads = EXPAND * d_model // changes["head_dim"]
        changes["groups"] = draw(st.sampled_from([1, 2])) if heads % 2 == 0 else 1
        changes.update(draw(st.sampled_from(_HARMLESS_MAMBA2)))
    pool = _LOOKALIKE_MIXER + (_LOOKALIKE_MAMBA2 if kind == "hf2" else [])
    # Mostly standard mixers, so that a model with several components is often explainable.
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        changes.update(draw(st.sampled_from(pool)))
    return MixerSpec(kind=kind, **changes)


_NORMS = ["rms", "rms", "my_rms", "my_rms", "gemma", "layernorm"]


@st.composite
def model_specs(draw) -> ModelSpec:
    d_model = draw(st.sampled_from([8, 12, 16]))
    n_layers = draw(st.integers(1, 2))
    layers = tuple((draw(st.sampled_from(_NORMS)), draw(mixer_specs(d_model))) for _ in range(n_layers))
    return ModelSpec(
        seed=draw(st.integers(0, 2**16)),
        d_model=d_model,
        layers=layers,
        final_norm=draw(st.sampled_from(_NORMS)),
        T=draw(st.integers(5, 9)),
        batch=draw(st.integers(1, 2)),
    )


def lookalike_models() -> st.SearchStrategy[tuple[nn.Module, torch.Tensor, str]]:
    """``(model, ids, description)`` of random look-alike models (``model.spec`` is the spec)."""
    return model_specs().map(build)


__all__ = [
    "BiLookalikeMamba1Mixer",
    "BiLookalikeMamba2Mixer",
    "GemmaStyleRMSNorm",
    "IndexReversedBiLookalikeMamba1Mixer",
    "IndexReversedBiLookalikeMamba2Mixer",
    "LookalikeLM",
    "LookalikeMamba1Mixer",
    "LookalikeMamba2Mixer",
    "MixerSpec",
    "ModelSpec",
    "MyRMSNorm",
    "build",
    "expected_verdict",
    "lookalike_models",
    "model_specs",
    "one_layer",
    "standard",
]

"""Tap layouts: how the taps of a mixer adapter become named hook points.

An adapter calls ``ctx.tap(mixer, tap_name, tensor)`` on its intermediates (see
:mod:`mambalrp.adapters`). A :class:`TapLayout` turns those calls into hook points with the
``(batch, seq, ...)`` layout users expect, fires the registered hook functions, and hands the
(possibly replaced) tensor back to the adapter in the adapter's own layout.

Hook points that the adapter does not compute itself (per-offset conv slices, ``A_bar``,
``B_bar`` and the SSM states ``h``) are computed by the layout only when a hook or cache asks
for them; the scan output ``y`` is then recomputed from them by a sequential reference scan
with true gradients (so these hooks are for analysis and patching, not for LRP rules).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

ON_REQUEST = ("hook_conv_slice", "hook_A_bar", "hook_B_bar", "hook_h")


class Dispatcher(Protocol):
    """What a layout needs from the running hook set."""

    def wants(self, layer: int, kind: str) -> bool: ...

    def fire(self, layer: int, kind: str, tensor: torch.Tensor) -> torch.Tensor: ...

    def scratch(self, layer: int) -> dict[str, torch.Tensor]: ...


class TapLayout:
    """Base class: maps taps of one adapter to hook points.

    Attributes:
        kinds: Mixer-internal hook kinds (``"hook_..."``) this layout exposes.
    """

    kinds: tuple[str, ...] = ()

    def tap(self, run: Dispatcher, layer: int, mixer: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
        """Handle one tap call; return the tensor the adapter continues with."""
        raise NotImplementedError

    def shapes(self, mixer: nn.Module, batch: int, seq: int) -> dict[str, tuple[int, ...]]:
        """Shape of every hook kind of this layout for a ``(batch, seq)`` input."""
        raise NotImplementedError


def conv_slices(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-offset terms of a depthwise causal conv.

    Args:
        x: Conv input ``(b, T, c)``.
        weight: ``(c, 1, K)`` or ``(c, K)``.

    Returns:
        ``(b, T, K, c)``: entry ``k`` at time ``t`` is ``weight[:, k] * x[t + k - (K - 1)]``
        (zero before the sequence starts), i.e. offset ``k - (K - 1)`` in ``-(K-1) .. 0``. The
        conv output is ``slices.sum(2) + bias``.
    """
    w = weight.reshape(weight.shape[0], -1)
    K = w.shape[1]
    T = x.shape[1]
    padded = F.pad(x, (0, 0, K - 1, 0))
    return torch.stack([padded[:, k : k + T] * w[:, k].to(x.dtype) for k in range(K)], dim=2)


def _conv(run: Dispatcher, layer: int, mixer: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``t``: the adapter's conv output ``(b, c, T)``."""
    if run.wants(layer, "hook_conv_slice"):
        slices = conv_slices(run.scratch(layer)["conv_in"], mixer.conv1d.weight)
        new = run.fire(layer, "hook_conv_slice", slices)
        if new is not slices and not torch.equal(new, slices):
            out = new.sum(2)
            if mixer.conv1d.bias is not None:
                out = out + mixer.conv1d.bias
            t = out.transpose(1, 2).to(t.dtype)
    if run.wants(layer, "hook_conv"):
        t = run.fire(layer, "hook_conv", t.transpose(1, 2)).transpose(1, 2)
    return t


def _wants_scan(run: Dispatcher, layer: int) -> bool:
    return any(run.wants(layer, k) for k in ("hook_A_bar", "hook_B_bar", "hook_h"))


def _scan(run: Dispatcher, layer: int, a_bar, b_bar_x, c, einsum: str) -> torch.Tensor:
    """Sequential scan ``h_t = a_bar_t * h_{t-1} + b_bar_x_t``; fires ``hook_h``; returns ``C . h``."""
    h = torch.zeros_like(b_bar_x[:, 0])
    states = []
    for t in range(b_bar_x.shape[1]):
        h = a_bar[:, t] * h + b_bar_x[:, t]
        states.append(h)
    hs = run.fire(layer, "hook_h", torch.stack(states, dim=1))
    return torch.einsum(einsum, hs, c)


class Mamba1Layout(TapLayout):
    """Taps of :class:`~mambalrp.adapters.hf_mamba.HFMambaMixerAdapter` (Mamba-1, FalconMamba)."""

    kinds = (
        "hook_in_proj_x", "hook_in_proj_z", "hook_conv", "hook_conv_slice", "hook_ssm_input", "hook_delta",
        "hook_A_bar", "hook_B_bar", "hook_B", "hook_C", "hook_h", "hook_y", "hook_gate",
    )

    def shapes(self, mixer: nn.Module, batch: int, seq: int) -> dict[str, tuple[int, ...]]:
        d, n, K = mixer.intermediate_size, mixer.ssm_state_size, mixer.conv1d.weight.shape[-1]
        bt = (batch, seq)
        return {
            "hook_in_proj_x": (*bt, d), "hook_in_proj_z": (*bt, d), "hook_conv": (*bt, d),
            "hook_conv_slice": (*bt, K, d), "hook_ssm_input": (*bt, d), "hook_delta": (*bt, d),
            "hook_A_bar": (*bt, d, n), "hook_B_bar": (*bt, d, n), "hook_B": (*bt, n), "hook_C": (*bt, n),
            "hook_h": (*bt, d, n), "hook_y": (*bt, d), "hook_gate": (*bt, d),
        }

    def tap(self, run, layer, mixer, name, t):
        s = run.scratch(layer)
        if name == "in_proj":  # (b, T, 2d)
            if not any(run.wants(layer, k) for k in ("hook_in_proj_x", "hook_in_proj_z", "hook_conv_slice")):
                return t
            x, z = t.chunk(2, dim=-1)
            x = run.fire(layer, "hook_in_proj_x", x)
            z = run.fire(layer, "hook_in_proj_z", z)
            s["conv_in"] = x
            return torch.cat([x, z], dim=-1)
        if name == "conv":  # (b, d, T)
            return _conv(run, layer, mixer, t)
        if name in ("ssm_input", "delta", "B", "C"):  # (b, T, .)
            s[name] = t = run.fire(layer, "hook_" + name, t)
            return t
        if name == "y":  # (b, d, T), float32
            if _wants_scan(run, layer):
                x, dt, B, C = (s[k].float() for k in ("ssm_input", "delta", "B", "C"))
                A = -torch.exp(mixer.A_log.float())
                a_bar = run.fire(layer, "hook_A_bar", torch.exp(dt[..., None] * A))
                b_bar = run.fire(layer, "hook_B_bar", dt[..., None] * B[:, :, None, :])
                y = _scan(run, layer, a_bar, b_bar * x[..., None], C, "btdn,btn->btd")
                t = (y + mixer.D.float() * x).transpose(1, 2)
            if run.wants(layer, "hook_y"):
                t = run.fire(layer, "hook_y", t.transpose(1, 2)).transpose(1, 2)
            return t
        if name == "gate":  # (b, d, T)
            return run.fire(layer, "hook_gate", t.transpose(1, 2)).transpose(1, 2)
        return t


class Mamba2Layout(TapLayout):
    """Taps of :class:`~mambalrp.adapters.hf_mamba2.HFMamba2MixerAdapter` (Mamba-2 / SSD)."""

    kinds = (
        "hook_in_proj_x", "hook_in_proj_z", "hook_in_proj_dt", "hook_conv", "hook_conv_slice", "hook_ssm_input",
        "hook_delta", "hook_A_bar", "hook_B_bar", "hook_B", "hook_C", "hook_h", "hook_y", "hook_gate",
    )

    @staticmethod
    def _dims(mixer):
        d, h, p = mixer.intermediate_size, mixer.num_heads, mixer.head_dim
        g, n = mixer.n_groups, mixer.ssm_state_size
        return d, h, p, g, n, d + 2 * g * n

    def shapes(self, mixer: nn.Module, batch: int, seq: int) -> dict[str, tuple[int, ...]]:
        d, h, p, g, n, conv_dim = self._dims(mixer)
        K = mixer.conv1d.weight.shape[-1]
        bt = (batch, seq)
        return {
            "hook_in_proj_x": (*bt, conv_dim), "hook_in_proj_z": (*bt, d), "hook_in_proj_dt": (*bt, h),
            "hook_conv": (*bt, conv_dim), "hook_conv_slice": (*bt, K, conv_dim), "hook_ssm_input": (*bt, d),
            "hook_delta": (*bt, h), "hook_A_bar": (*bt, h), "hook_B_bar": (*bt, h, n), "hook_B": (*bt, g * n),
            "hook_C": (*bt, g * n), "hook_h": (*bt, h, p, n), "hook_y": (*bt, d), "hook_gate": (*bt, d),
        }

    def tap(self, run, layer, mixer, name, t):
        s = run.scratch(layer)
        d, h, p, g, n, conv_dim = self._dims(mixer)
        if name == "in_proj":  # (b, T, d + conv_dim + h)
            kinds = ("hook_in_proj_x", "hook_in_proj_z", "hook_in_proj_dt", "hook_conv_slice")
            if not any(run.wants(layer, k) for k in kinds):
                return t
            z, xbc, dt = t.split([d, conv_dim, h], dim=-1)
            z = run.fire(layer, "hook_in_proj_z", z)
            xbc = run.fire(layer, "hook_in_proj_x", xbc)
            dt = run.fire(layer, "hook_in_proj_dt", dt)
            s["conv_in"] = xbc
            return torch.cat([z, xbc, dt], dim=-1)
        if name == "conv":  # (b, conv_dim, T)
            return _conv(run, layer, mixer, t)
        if name in ("ssm_input", "delta", "B", "C"):
            s[name] = t = run.fire(layer, "hook_" + name, t)
            return t
        if name == "y":  # (b, T, d), float32
            if _wants_scan(run, layer):
                b, T = t.shape[:2]
                x = s["ssm_input"].float().reshape(b, T, h, p)
                dt = s["delta"].float()
                reps = h // g
                B = s["B"].float().reshape(b, T, g, n).repeat_interleave(reps, dim=2)
                C = s["C"].float().reshape(b, T, g, n).repeat_interleave(reps, dim=2)
                A = -torch.exp(mixer.A_log.float())
                a_bar = run.fire(layer, "hook_A_bar", torch.exp(dt * A))
                b_bar = run.fire(layer, "hook_B_bar", dt[..., None] * B)
                y = _scan(run, layer, a_bar[..., None, None], b_bar[:, :, :, None, :] * x[..., None], C,
                          "bthpn,bthn->bthp")
                t = (y + mixer.D.float()[:, None] * x).reshape(b, T, d)
            return run.fire(layer, "hook_y", t)
        if name == "gate":
            return run.fire(layer, "hook_gate", t)
        return t


_LAYOUTS: dict[str, TapLayout] = {"hf-mamba-mixer": Mamba1Layout(), "hf-mamba2-mixer": Mamba2Layout()}


def register_tap_layout(adapter_name: str, layout: TapLayout) -> None:
    """Use ``layout`` for the mixers that the adapter called ``adapter_name`` runs."""
    _LAYOUTS[adapter_name] = layout


def tap_layout(adapter_name: str) -> TapLayout | None:
    """The layout registered for an adapter, or ``None`` (then only block-level hooks exist)."""
    return _LAYOUTS.get(adapter_name)

"""Linear recurrences ``h_t = a_t * h_{t-1} + u_t`` evaluated in parallel over a time chunk.

The doubling (Hillis-Steele) scan needs ``log2(L)`` tensor operations for a chunk of ``L`` steps
instead of ``L`` Python iterations, and only multiplies decays (never divides by them), so it is
stable for any decay. Time is dimension 2 of ``(batch, channels, L, state)`` tensors.
"""

from __future__ import annotations

import torch

# Elements of one (batch, d_inner, chunk, d_state) working tensor; bounds per-chunk memory.
CHUNK_ELEMENTS = 1 << 22


def chunk_length(batch: int, channels: int, state: int, max_len: int = 256, min_len: int = 16) -> int:
    """Chunk length so that one ``(batch, channels, chunk, state)`` tensor stays near CHUNK_ELEMENTS."""
    length = CHUNK_ELEMENTS // max(1, batch * channels * state)
    length = max(min_len, min(max_len, length))
    return 1 << (length.bit_length() - 1)


def scan_forward(a: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan along dim 2.

    Returns:
        ``(P, H)`` with ``H_t = a_t H_{t-1} + u_t`` (``H_{-1} = 0``) and ``P_t = prod_{r<=t} a_r``.
        Out of place, so autograd can differentiate through it.
    """
    length, k = a.shape[2], 1
    while k < length:
        u = torch.cat([u[:, :, :k], torch.addcmul(u[:, :, k:], a[:, :, k:], u[:, :, :-k])], dim=2)
        a = torch.cat([a[:, :, :k], a[:, :, k:] * a[:, :, :-k]], dim=2)
        k *= 2
    return a, u


def scan_reverse(a: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan backwards in time along dim 2.

    Returns:
        ``(P, S)`` with ``S_t = a_t S_{t+1} + u_t`` (``S_L = 0``) and ``P_t = prod_{r>=t} a_r``.
    """
    length, k = a.shape[2], 1
    while k < length:
        u = torch.cat([torch.addcmul(u[:, :, :-k], a[:, :, :-k], u[:, :, k:]), u[:, :, -k:]], dim=2)
        a = torch.cat([a[:, :, :-k] * a[:, :, k:], a[:, :, -k:]], dim=2)
        k *= 2
    return a, u


def acc(t: torch.Tensor | None) -> torch.Tensor | None:
    """Cast to the accumulation dtype: float32 for half types, float64 kept as it is."""
    if t is None:
        return None
    return t.to(torch.promote_types(t.dtype, torch.float32))

"""Triton kernels for the Mamba-1 selective scan and its MambaLRP reverse scan.

Both kernels run one program per ``(batch, block of BLOCK_D channels)`` and walk the sequence
one step at a time, carrying the ``(BLOCK_D, d_state)`` state in registers. The discretisation
``Abar = exp(dt * A)``, ``Bbar = dt * B`` is computed in the kernel, so no ``(b, d, T, n)``
tensor is ever written to memory: the forward reads ``x, dt, B, C`` once and writes ``y``, the
reverse scan reads ``g, dt, B, C`` once and writes ``dx``.

Forward::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t        y_t = C_t . h_t + D * x_t

Reverse scan of the SSM rule (``dt``, ``Abar``, ``Bbar``, ``C`` held constant)::

    s_t = Abar_{t+1} * s_{t+1} + C_t * g_t                  dx_t = Bbar_t . s_t + D * g_t

``Abar_{t+1}`` is the decay computed at the previous (later) step of the reverse loop, so it is
carried along with ``s`` instead of being reloaded.

Inputs of any floating dtype are loaded and cast to float32; accumulation and the output are
float32. Float64 inputs are routed to the torch implementation, which keeps float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambalrp.functional.selective_scan import selective_scan_fwd_torch, selective_scan_lrp_bwd_torch

# Upper bound on BLOCK_D * BLOCK_N, the state elements one program holds in registers.
MAX_STATE_ELEMENTS = 2048


@triton.jit
def _selective_scan_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr,
    T, d, n,
    s_xb, s_xd, s_xt,
    s_dtb, s_dtd, s_dtt,
    s_ad, s_an,
    s_bb, s_bn, s_bt,
    s_cb, s_cn, s_ct,
    s_dd,
    s_yb, s_yd, s_yt,
    HAS_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d
    mask_n = offs_n < n

    # Padded states get A = 0 and B = 0, so they stay exactly zero.
    A = tl.load(
        A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an,
        mask=mask_d[:, None] & mask_n[None, :],
        other=0.0,
    ).to(tl.float32)
    if HAS_D:
        skip = tl.load(D_ptr + offs_d * s_dd, mask=mask_d, other=0.0).to(tl.float32)

    x_ptrs = x_ptr + pid_b * s_xb + offs_d * s_xd
    dt_ptrs = dt_ptr + pid_b * s_dtb + offs_d * s_dtd
    b_ptrs = B_ptr + pid_b * s_bb + offs_n * s_bn
    c_ptrs = C_ptr + pid_b * s_cb + offs_n * s_cn
    y_ptrs = y_ptr + pid_b * s_yb + offs_d * s_yd

    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for t in range(T):
        x_t = tl.load(x_ptrs + t * s_xt, mask=mask_d, other=0.0).to(tl.float32)
        dt_t = tl.load(dt_ptrs + t * s_dtt, mask=mask_d, other=0.0).to(tl.float32)
        b_t = tl.load(b_ptrs + t * s_bt, mask=mask_n, other=0.0).to(tl.float32)
        c_t = tl.load(c_ptrs + t * s_ct, mask=mask_n, other=0.0).to(tl.float32)
        abar = tl.exp(dt_t[:, None] * A)
        h = abar * h + (dt_t * x_t)[:, None] * b_t[None, :]
        y_t = tl.sum(h * c_t[None, :], axis=1)
        if HAS_D:
            y_t += skip * x_t
        tl.store(y_ptrs + t * s_yt, y_t, mask=mask_d)


@triton.jit
def _selective_scan_lrp_bwd_kernel(
    g_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dx_ptr,
    T, d, n,
    s_gb, s_gd, s_gt,
    s_dtb, s_dtd, s_dtt,
    s_ad, s_an,
    s_bb, s_bn, s_bt,
    s_cb, s_cn, s_ct,
    s_dd,
    s_xb, s_xd, s_xt,
    HAS_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d
    mask_n = offs_n < n

    A = tl.load(
        A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an,
        mask=mask_d[:, None] & mask_n[None, :],
        other=0.0,
    ).to(tl.float32)
    if HAS_D:
        skip = tl.load(D_ptr + offs_d * s_dd, mask=mask_d, other=0.0).to(tl.float32)

    g_ptrs = g_ptr + pid_b * s_gb + offs_d * s_gd
    dt_ptrs = dt_ptr + pid_b * s_dtb + offs_d * s_dtd
    b_ptrs = B_ptr + pid_b * s_bb + offs_n * s_bn
    c_ptrs = C_ptr + pid_b * s_cb + offs_n * s_cn
    dx_ptrs = dx_ptr + pid_b * s_xb + offs_d * s_xd

    s = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    # Decay of the step after the current one; its value at t = T - 1 multiplies s = 0.
    abar_next = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for i in range(T):
        t = T - 1 - i
        g_t = tl.load(g_ptrs + t * s_gt, mask=mask_d, other=0.0).to(tl.float32)
        dt_t = tl.load(dt_ptrs + t * s_dtt, mask=mask_d, other=0.0).to(tl.float32)
        b_t = tl.load(b_ptrs + t * s_bt, mask=mask_n, other=0.0).to(tl.float32)
        c_t = tl.load(c_ptrs + t * s_ct, mask=mask_n, other=0.0).to(tl.float32)
        s = abar_next * s + g_t[:, None] * c_t[None, :]
        dx_t = tl.sum(s * b_t[None, :], axis=1) * dt_t
        if HAS_D:
            dx_t += skip * g_t
        tl.store(dx_ptrs + t * s_xt, dx_t, mask=mask_d)
        abar_next = tl.exp(dt_t[:, None] * A)


def _blocks(d: int, n: int, block_d: int | None) -> tuple[int, int]:
    block_n = triton.next_power_of_2(max(1, n))
    if block_d is None:
        block_d = min(triton.next_power_of_2(max(1, d)), max(1, MAX_STATE_ELEMENTS // block_n))
    elif block_d < 1 or block_d & (block_d - 1):
        raise ValueError(f"block_d must be a positive power of two; got {block_d}")
    return block_d, block_n


def _check(x, dt, A, B, C, D) -> None:
    if x.dim() != 3 or dt.shape != x.shape:
        raise ValueError(f"x and dt must both be (batch, d_inner, T); got {tuple(x.shape)} and {tuple(dt.shape)}")
    b, d, T = x.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (d_inner={d}, d_state); got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (b, n, T):
            raise ValueError(f"{name} must be (batch, d_state, T) = {(b, n, T)}; got {tuple(t.shape)}")
    if D is not None and tuple(D.shape) != (d,):
        raise ValueError(f"D must be (d_inner,) = ({d},); got {tuple(D.shape)}")


def _is_float64(*tensors: torch.Tensor | None) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def _float64(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(torch.float64) for t in tensors]


def _launch(kernel, v, dt, A, B, C, D, block_d: int | None) -> torch.Tensor:
    _check(v, dt, A, B, C, D)
    b, d, T = v.shape
    n = A.shape[1]
    out = torch.empty((b, d, T), dtype=torch.float32, device=v.device)
    if out.numel() == 0:
        return out
    block_d, block_n = _blocks(d, n, block_d)
    grid = (b, triton.cdiv(d, block_d))
    d_arg = D if D is not None else A  # never read when HAS_D is False
    kernel[grid](
        v, dt, A, B, C, d_arg, out,
        T, d, n,
        *v.stride(),
        *dt.stride(),
        *A.stride(),
        *B.stride(),
        *C.stride(),
        D.stride(0) if D is not None else 0,
        *out.stride(),
        HAS_D=D is not None,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
    )
    return out


def selective_scan_fwd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    *,
    block_d: int | None = None,
) -> torch.Tensor:
    """Selective-scan forward with the discretisation fused into the kernel.

    Args:
        x: SSM input ``(b, d, T)``.
        dt: Step size after softplus ``(b, d, T)``.
        A: State matrix ``(d, n)``.
        B: Input matrix ``(b, n, T)``.
        C: Output matrix ``(b, n, T)``.
        D: Skip ``(d,)`` or ``None``.
        block_d: Channels per program (a power of two); chosen from ``d`` and ``n`` if ``None``.

    Returns:
        ``y`` ``(b, d, T)`` in float32 (float64 if any input is float64, via the torch path).
    """
    if _is_float64(x, dt, A, B, C, D):
        return selective_scan_fwd_torch(*_float64(x, dt, A, B, C, D))
    return _launch(_selective_scan_fwd_kernel, x, dt, A, B, C, D, block_d)


def selective_scan_lrp_bwd(
    g: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    *,
    block_d: int | None = None,
) -> torch.Tensor:
    """Reverse scan of the MambaLRP SSM rule; needs no forward states.

    Args:
        g: Gradient of the output ``y`` ``(b, d, T)``.
        dt: Step size after softplus ``(b, d, T)``.
        A: State matrix ``(d, n)``.
        B: Input matrix ``(b, n, T)``.
        C: Output matrix ``(b, n, T)``.
        D: Skip ``(d,)`` or ``None``.
        block_d: Channels per program (a power of two); chosen from ``d`` and ``n`` if ``None``.

    Returns:
        ``dx`` ``(b, d, T)`` in float32 (float64 if any input is float64, via the torch path).
    """
    if _is_float64(g, dt, A, B, C, D):
        return selective_scan_lrp_bwd_torch(*_float64(g, dt, A, B, C, D))
    return _launch(_selective_scan_lrp_bwd_kernel, g, dt, A, B, C, D, block_d)

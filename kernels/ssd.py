"""Triton kernels for the Mamba-2 SSD scan (scalar decay per head) and its MambaLRP adjoint scan.

One program per ``(batch, head, block of BLOCK_P head channels)`` walks the sequence step by step
with the ``(BLOCK_P, d_state)`` state in registers; the decay ``exp(dt_t * A_h)`` is computed in
the kernel. Head ``i`` reads ``B`` and ``C`` of group ``i // (heads // groups)`` directly, so the
groups are never expanded to heads in memory.

Forward::

    H_t = exp(dt_t * A_h) * H_{t-1} + (dt_t * x_t) outer B_t      y_t = H_t C_t + D_h * x_t

Adjoint scan of the SSM rule (``dt``, decays, ``B``, ``C`` held constant)::

    S_t = exp(dt_{t+1} * A_h) * S_{t+1} + g_t outer C_t          dx_t = dt_t * S_t B_t + D_h * g_t

Inputs of any floating dtype are loaded and cast to float32; accumulation and the output are
float32. Float64 inputs are routed to the torch implementation, which keeps float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambalrp.functional.ssd import ssd_scan_fwd_torch, ssd_scan_lrp_bwd_torch

# Upper bound on BLOCK_P * BLOCK_N, the state elements one program holds in registers.
MAX_STATE_ELEMENTS = 4096


@triton.jit
def _ssd_scan_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr,
    T, p, n, heads_per_group,
    s_xb, s_xt, s_xh, s_xp,
    s_dtb, s_dtt, s_dth,
    s_ah,
    s_bb, s_bt, s_bg, s_bn,
    s_cb, s_ct, s_cg, s_cn,
    s_dh, s_dp,
    s_yb, s_yt, s_yh, s_yp,
    HAS_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2)
    group = pid_h // heads_per_group
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < p
    mask_n = offs_n < n

    a_h = tl.load(A_ptr + pid_h * s_ah).to(tl.float32)
    if HAS_D:
        skip = tl.load(D_ptr + pid_h * s_dh + offs_p * s_dp, mask=mask_p, other=0.0).to(tl.float32)

    x_ptrs = x_ptr + pid_b * s_xb + pid_h * s_xh + offs_p * s_xp
    dt_base = dt_ptr + pid_b * s_dtb + pid_h * s_dth
    b_ptrs = B_ptr + pid_b * s_bb + group * s_bg + offs_n * s_bn
    c_ptrs = C_ptr + pid_b * s_cb + group * s_cg + offs_n * s_cn
    y_ptrs = y_ptr + pid_b * s_yb + pid_h * s_yh + offs_p * s_yp

    state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for t in range(T):
        x_t = tl.load(x_ptrs + t * s_xt, mask=mask_p, other=0.0).to(tl.float32)
        dt_t = tl.load(dt_base + t * s_dtt).to(tl.float32)
        b_t = tl.load(b_ptrs + t * s_bt, mask=mask_n, other=0.0).to(tl.float32)
        c_t = tl.load(c_ptrs + t * s_ct, mask=mask_n, other=0.0).to(tl.float32)
        decay = tl.exp(dt_t * a_h)
        state = decay * state + (dt_t * x_t)[:, None] * b_t[None, :]
        y_t = tl.sum(state * c_t[None, :], axis=1)
        if HAS_D:
            y_t += skip * x_t
        tl.store(y_ptrs + t * s_yt, y_t, mask=mask_p)


@triton.jit
def _ssd_scan_lrp_bwd_kernel(
    g_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dx_ptr,
    T, p, n, heads_per_group,
    s_gb, s_gt, s_gh, s_gp,
    s_dtb, s_dtt, s_dth,
    s_ah,
    s_bb, s_bt, s_bg, s_bn,
    s_cb, s_ct, s_cg, s_cn,
    s_dh, s_dp,
    s_xb, s_xt, s_xh, s_xp,
    HAS_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2)
    group = pid_h // heads_per_group
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < p
    mask_n = offs_n < n

    a_h = tl.load(A_ptr + pid_h * s_ah).to(tl.float32)
    if HAS_D:
        skip = tl.load(D_ptr + pid_h * s_dh + offs_p * s_dp, mask=mask_p, other=0.0).to(tl.float32)

    g_ptrs = g_ptr + pid_b * s_gb + pid_h * s_gh + offs_p * s_gp
    dt_base = dt_ptr + pid_b * s_dtb + pid_h * s_dth
    b_ptrs = B_ptr + pid_b * s_bb + group * s_bg + offs_n * s_bn
    c_ptrs = C_ptr + pid_b * s_cb + group * s_cg + offs_n * s_cn
    dx_ptrs = dx_ptr + pid_b * s_xb + pid_h * s_xh + offs_p * s_xp

    state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    # Decay of the step after the current one; its value at t = T - 1 multiplies a zero state.
    decay_next = a_h * 0.0
    for i in range(T):
        t = T - 1 - i
        g_t = tl.load(g_ptrs + t * s_gt, mask=mask_p, other=0.0).to(tl.float32)
        dt_t = tl.load(dt_base + t * s_dtt).to(tl.float32)
        b_t = tl.load(b_ptrs + t * s_bt, mask=mask_n, other=0.0).to(tl.float32)
        c_t = tl.load(c_ptrs + t * s_ct, mask=mask_n, other=0.0).to(tl.float32)
        state = decay_next * state + g_t[:, None] * c_t[None, :]
        dx_t = tl.sum(state * b_t[None, :], axis=1) * dt_t
        if HAS_D:
            dx_t += skip * g_t
        tl.store(dx_ptrs + t * s_xt, dx_t, mask=mask_p)
        decay_next = tl.exp(dt_t * a_h)


def _check(x, dt, A, B, C, D) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, T, heads, head_dim); got {tuple(x.shape)}")
    b, T, h, _ = x.shape
    if tuple(dt.shape) != (b, T, h):
        raise ValueError(f"dt must be (batch, T, heads) = {(b, T, h)}; got {tuple(dt.shape)}")
    if tuple(A.shape) != (h,):
        raise ValueError(f"A must be (heads,) = ({h},); got {tuple(A.shape)}")
    if B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape; got {tuple(B.shape)} and {tuple(C.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, T) or B.shape[2] == 0 or h % B.shape[2]:
        raise ValueError(f"B and C must be (batch, T, groups, d_state) with heads % groups == 0; got {tuple(B.shape)}")
    if D is not None and D.shape not in ((h,), (h, x.shape[-1])):
        raise ValueError(f"D must be (heads,) or (heads, head_dim); got {tuple(D.shape)}")


def _blocks(p: int, n: int, block_p: int | None) -> tuple[int, int]:
    block_n = triton.next_power_of_2(max(1, n))
    if block_p is None:
        block_p = min(triton.next_power_of_2(max(1, p)), max(1, MAX_STATE_ELEMENTS // block_n))
    elif block_p < 1 or block_p & (block_p - 1):
        raise ValueError(f"block_p must be a positive power of two; got {block_p}")
    return block_p, block_n


def _is_float64(*tensors: torch.Tensor | None) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def _float64(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(torch.float64) for t in tensors]


def _launch(kernel, v, dt, A, B, C, D, block_p: int | None) -> torch.Tensor:
    _check(v, dt, A, B, C, D)
    b, T, h, p = v.shape
    n = B.shape[-1]
    out = torch.empty((b, T, h, p), dtype=torch.float32, device=v.device)
    if out.numel() == 0:
        return out
    block_p, block_n = _blocks(p, n, block_p)
    if D is None:
        d_arg, d_strides = A, (0, 0)  # never read when HAS_D is False
    elif D.dim() == 1:
        d_arg, d_strides = D, (D.stride(0), 0)
    else:
        d_arg, d_strides = D, tuple(D.stride())
    grid = (b, h, triton.cdiv(p, block_p))
    kernel[grid](
        v, dt, A, B, C, d_arg, out,
        T, p, n, h // B.shape[2],
        *v.stride(),
        *dt.stride(),
        A.stride(0),
        *B.stride(),
        *C.stride(),
        *d_strides,
        *out.stride(),
        HAS_D=D is not None,
        BLOCK_P=block_p,
        BLOCK_N=block_n,
    )
    return out


def ssd_scan_fwd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    *,
    block_p: int | None = None,
) -> torch.Tensor:
    """SSD scan forward, sequential over time with the state in registers.

    Args:
        x: SSM input ``(b, T, h, p)``.
        dt: Step size after softplus ``(b, T, h)``.
        A: Scalar decay rate per head ``(h,)``.
        B: Input matrix ``(b, T, g, n)``, ``h`` a multiple of ``g``.
        C: Output matrix ``(b, T, g, n)``.
        D: Skip ``(h,)``, ``(h, p)`` or ``None``.
        block_p: Head channels per program (a power of two); chosen from ``p`` and ``n`` if ``None``.

    Returns:
        ``y`` ``(b, T, h, p)`` in float32 (float64 if any input is float64, via the torch path).
    """
    if _is_float64(x, dt, A, B, C, D):
        return ssd_scan_fwd_torch(*_float64(x, dt, A, B, C, D))
    return _launch(_ssd_scan_fwd_kernel, x, dt, A, B, C, D, block_p)


def ssd_scan_lrp_bwd(
    g: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    *,
    block_p: int | None = None,
) -> torch.Tensor:
    """Adjoint scan of the MambaLRP SSM rule for SSD; needs no forward states.

    Args:
        g: Gradient of the output ``y`` ``(b, T, h, p)``.
        dt: Step size after softplus ``(b, T, h)``.
        A: Scalar decay rate per head ``(h,)``.
        B: Input matrix ``(b, T, g, n)``.
        C: Output matrix ``(b, T, g, n)``.
        D: Skip ``(h,)``, ``(h, p)`` or ``None``.
        block_p: Head channels per program (a power of two); chosen from ``p`` and ``n`` if ``None``.

    Returns:
        ``dx`` ``(b, T, h, p)`` in float32 (float64 if any input is float64, via the torch path).
    """
    if _is_float64(g, dt, A, B, C, D):
        return ssd_scan_lrp_bwd_torch(*_float64(g, dt, A, B, C, D))
    return _launch(_ssd_scan_lrp_bwd_kernel, g, dt, A, B, C, D, block_p)

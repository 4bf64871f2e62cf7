"""Triton kernels for the Mamba-2 SSD scan (scalar decay per head) and its MambaLRP adjoint scan.

One program per ``(batch, head, block of BLOCK_P head channels)`` carries the
``(BLOCK_P, d_state)`` state in registers along the sequence; the decays ``exp(dt_t * A_h)`` are
computed in the kernel. Head ``i`` reads ``B`` and ``C`` of group ``i // (heads // groups)``
directly, so the groups are never expanded to heads in memory.

Forward::

    H_t = exp(dt_t * A_h) * H_{t-1} + (dt_t * x_t) outer B_t      y_t = H_t C_t + D_h * x_t

Adjoint scan of the SSM rule (``dt``, decays, ``B``, ``C`` held constant)::

    S_t = exp(dt_{t+1} * A_h) * S_{t+1} + g_t outer C_t          dx_t = dt_t * S_t B_t + D_h * g_t

Two variants compute the same thing:

* ``"chunked"`` (default): the SSD block form. Per chunk of ``BLOCK_T`` steps, with ``la`` the
  cumulative log decay inside the chunk, the output is
  ``y = ((C B^T) * exp(la_l - la_s) [l >= s]) (dt x) + exp(la) C H^T`` and the state moves on as
  ``H <- exp(la_end) H + (dt x exp(la_end - la))^T B``, all with ``tl.dot`` (full float32
  precision). The adjoint scan walks the chunks from the end with the transposed products and
  carries the gradient of the state instead of the state.
* ``"sequential"``: one step per loop iteration; the adjoint scan carries the decay of the
  step after the current one along with ``S``.

Inputs of any floating dtype are loaded and cast to float32; accumulation and the output are
float32. Float64 inputs are routed to the torch implementation, which keeps float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambalrp.functional.ssd import check_shapes, ssd_scan_fwd_torch, ssd_scan_lrp_bwd_torch

VARIANTS = ("chunked", "sequential")
# Sequential kernels: upper bound on BLOCK_P * BLOCK_N, the state one program holds in registers
# (16 x 128 for head_dim 64, d_state 128: 4 programs per head and batch item).
MAX_STATE_ELEMENTS = 2048
# Chunked kernels: steps per chunk, block of head channels (16 from d_state 64 on), warps.
# At these sizes ptxas (sm_90) reports no register spills for head_dim 64, d_state 16 to 128.
DEFAULT_BLOCK_T = 16
DEFAULT_CHUNK_BLOCK_P = 32
CHUNK_NUM_WARPS = 8


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
    for t32 in range(T):
        t = tl.cast(t32, tl.int64)  # T * heads * head_dim can exceed 2**31
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
        t = tl.cast(T - 1 - i, tl.int64)  # T * heads * head_dim can exceed 2**31
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


@triton.jit
def _ssd_scan_fwd_chunked_kernel(
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
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2)
    group = pid_h // heads_per_group
    offs_j = tl.arange(0, BLOCK_T)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < p
    mask_n = offs_n < n
    causal = offs_j[:, None] >= offs_j[None, :]

    a_h = tl.load(A_ptr + pid_h * s_ah).to(tl.float32)
    if HAS_D:
        skip = tl.load(D_ptr + pid_h * s_dh + offs_p * s_dp, mask=mask_p, other=0.0).to(tl.float32)

    x_cols = x_ptr + pid_b * s_xb + pid_h * s_xh + offs_p[None, :] * s_xp
    dt_base = dt_ptr + pid_b * s_dtb + pid_h * s_dth
    b_cols = B_ptr + pid_b * s_bb + group * s_bg + offs_n[None, :] * s_bn
    c_cols = C_ptr + pid_b * s_cb + group * s_cg + offs_n[None, :] * s_cn
    y_cols = y_ptr + pid_b * s_yb + pid_h * s_yh + offs_p[None, :] * s_yp

    state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + offs_j).to(tl.int64)
        mask_t = offs_t < T
        mask_tp = mask_t[:, None] & mask_p[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        x = tl.load(x_cols + offs_t[:, None] * s_xt, mask=mask_tp, other=0.0).to(tl.float32)
        dt = tl.load(dt_base + offs_t * s_dtt, mask=mask_t, other=0.0).to(tl.float32)
        b = tl.load(b_cols + offs_t[:, None] * s_bt, mask=mask_tn, other=0.0).to(tl.float32)
        c = tl.load(c_cols + offs_t[:, None] * s_ct, mask=mask_tn, other=0.0).to(tl.float32)
        # Log decay from the chunk start through step j; steps past T have dt = 0 (decay 1).
        la = tl.cumsum(dt * a_h, axis=0)
        la_end = tl.sum(dt * a_h, axis=0)
        seg = tl.exp(tl.where(causal, la[:, None] - la[None, :], float("-inf")))
        xd = x * dt[:, None]
        scores = tl.dot(c, tl.trans(b), input_precision="ieee") * seg
        y = tl.dot(scores, xd, input_precision="ieee")
        y += tl.exp(la)[:, None] * tl.dot(c, tl.trans(state), input_precision="ieee")
        if HAS_D:
            y += skip[None, :] * x
        tl.store(y_cols + offs_t[:, None] * s_yt, y, mask=mask_tp)
        to_end = tl.exp(la_end - la)
        state = tl.exp(la_end) * state + tl.dot(tl.trans(xd * to_end[:, None]), b, input_precision="ieee")


@triton.jit
def _ssd_scan_lrp_bwd_chunked_kernel(
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
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2)
    group = pid_h // heads_per_group
    offs_j = tl.arange(0, BLOCK_T)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < p
    mask_n = offs_n < n
    causal = offs_j[:, None] >= offs_j[None, :]

    a_h = tl.load(A_ptr + pid_h * s_ah).to(tl.float32)
    if HAS_D:
        skip = tl.load(D_ptr + pid_h * s_dh + offs_p * s_dp, mask=mask_p, other=0.0).to(tl.float32)

    g_cols = g_ptr + pid_b * s_gb + pid_h * s_gh + offs_p[None, :] * s_gp
    dt_base = dt_ptr + pid_b * s_dtb + pid_h * s_dth
    b_cols = B_ptr + pid_b * s_bb + group * s_bg + offs_n[None, :] * s_bn
    c_cols = C_ptr + pid_b * s_cb + group * s_cg + offs_n[None, :] * s_cn
    dx_cols = dx_ptr + pid_b * s_xb + pid_h * s_xh + offs_p[None, :] * s_xp

    # Gradient of the state at the end of the current chunk, from the chunks after it.
    grad_state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    last = (T - 1) // BLOCK_T * BLOCK_T
    for i in range(0, T, BLOCK_T):
        offs_t = ((last - i) + offs_j).to(tl.int64)
        mask_t = offs_t < T
        mask_tp = mask_t[:, None] & mask_p[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        g = tl.load(g_cols + offs_t[:, None] * s_gt, mask=mask_tp, other=0.0).to(tl.float32)
        dt = tl.load(dt_base + offs_t * s_dtt, mask=mask_t, other=0.0).to(tl.float32)
        b = tl.load(b_cols + offs_t[:, None] * s_bt, mask=mask_tn, other=0.0).to(tl.float32)
        c = tl.load(c_cols + offs_t[:, None] * s_ct, mask=mask_tn, other=0.0).to(tl.float32)
        la = tl.cumsum(dt * a_h, axis=0)
        la_end = tl.sum(dt * a_h, axis=0)
        seg = tl.exp(tl.where(causal, la[:, None] - la[None, :], float("-inf")))
        scores = tl.dot(c, tl.trans(b), input_precision="ieee") * seg  # (l, s)
        # d y_l / d (dt_s x_s) inside the chunk, then through the state carried past its end.
        gxd = tl.dot(tl.trans(scores), g, input_precision="ieee")
        to_end = tl.exp(la_end - la)
        gxd += to_end[:, None] * tl.dot(b, tl.trans(grad_state), input_precision="ieee")
        dx = gxd * dt[:, None]
        if HAS_D:
            dx += skip[None, :] * g
        tl.store(dx_cols + offs_t[:, None] * s_xt, dx, mask=mask_tp)
        grad_state = tl.exp(la_end) * grad_state + tl.dot(
            tl.trans(g), c * tl.exp(la)[:, None], input_precision="ieee"
        )


def _check(x, dt, A, B, C, D) -> None:
    check_shapes(x, dt, A, B, C, D)
    if B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape; got {tuple(B.shape)} and {tuple(C.shape)}")


def _power_of_two(value: int, name: str) -> int:
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a positive power of two; got {value}")
    return value


def _blocks(
    p: int, n: int, variant: str = "sequential", block_p: int | None = None, block_t: int | None = None
) -> tuple[int, int, int]:
    """``(BLOCK_P, BLOCK_T, BLOCK_N)`` for a launch; ``BLOCK_T`` is 1 for the sequential kernels.

    ``tl.dot`` needs every dimension of the chunked kernels to be at least 16.
    """
    block_n = triton.next_power_of_2(max(1, n))
    if variant == "sequential":
        if block_t not in (None, 1):
            raise ValueError("block_t applies to the chunked kernels only")
        block_t = 1
        if block_p is None:
            block_p = min(triton.next_power_of_2(max(1, p)), max(1, MAX_STATE_ELEMENTS // block_n))
        return _power_of_two(block_p, "block_p"), block_t, block_n
    block_n = max(16, block_n)
    block_t = _power_of_two(DEFAULT_BLOCK_T if block_t is None else block_t, "block_t")
    if block_p is None:
        widest = DEFAULT_CHUNK_BLOCK_P if block_n < 64 else 16
        block_p = min(max(16, triton.next_power_of_2(max(1, p))), widest)
    block_p = _power_of_two(block_p, "block_p")
    if min(block_t, block_p) < 16:
        raise ValueError(f"the chunked SSD kernels need block_t and block_p >= 16; got {block_t} and {block_p}")
    return block_p, block_t, block_n


def _is_float64(*tensors: torch.Tensor | None) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def _float64(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(torch.float64) for t in tensors]


_KERNELS = {
    ("fwd", "sequential"): _ssd_scan_fwd_kernel,
    ("fwd", "chunked"): _ssd_scan_fwd_chunked_kernel,
    ("bwd", "sequential"): _ssd_scan_lrp_bwd_kernel,
    ("bwd", "chunked"): _ssd_scan_lrp_bwd_chunked_kernel,
}


def _launch(direction: str, v, dt, A, B, C, D, variant: str, block_p: int | None, block_t: int | None) -> torch.Tensor:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    _check(v, dt, A, B, C, D)
    b, T, h, p = v.shape
    n = B.shape[-1]
    out = torch.empty((b, T, h, p), dtype=torch.float32, device=v.device)
    if out.numel() == 0:
        return out
    block_p, block_t, block_n = _blocks(p, n, variant, block_p, block_t)
    if D is None:
        d_arg, d_strides = A, (0, 0)  # never read when HAS_D is False
    elif D.dim() == 1:
        d_arg, d_strides = D, (D.stride(0), 0)
    else:
        d_arg, d_strides = D, tuple(D.stride())
    grid = (b, h, triton.cdiv(p, block_p))
    extra = {} if variant == "sequential" else {"BLOCK_T": block_t, "num_warps": CHUNK_NUM_WARPS}
    _KERNELS[direction, variant][grid](
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
        **extra,
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
    variant: str = "chunked",
    block_p: int | None = None,
    block_t: int | None = None,
) -> torch.Tensor:
    """SSD scan forward.

    Args:
        x: SSM input ``(b, T, h, p)``.
        dt: Step size after softplus ``(b, T, h)``.
        A: Scalar decay rate per head ``(h,)``.
        B: Input matrix ``(b, T, g, n)``, ``h`` a multiple of ``g``.
        C: Output matrix ``(b, T, g, n)``.
        D: Skip ``(h,)``, ``(h, p)`` or ``None``.
        variant: ``"chunked"`` (the SSD block form with ``tl.dot`` over chunks of ``block_t``
            steps) or ``"sequential"`` (one step per loop iteration).
        block_p: Head channels per program (a power of two); chosen from the shapes if ``None``.
        block_t: Steps per chunk of the chunked kernel (a power of two, at least 16).

    Returns:
        ``y`` ``(b, T, h, p)`` in float32 (float64 if any input is float64, via the torch path).
    """
    if _is_float64(x, dt, A, B, C, D):
        return ssd_scan_fwd_torch(*_float64(x, dt, A, B, C, D))
    return _launch("fwd", x, dt, A, B, C, D, variant, block_p, block_t)


def ssd_scan_lrp_bwd(
    g: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    *,
    variant: str = "chunked",
    block_p: int | None = None,
    block_t: int | None = None,
) -> torch.Tensor:
    """Adjoint scan of the MambaLRP SSM rule for SSD; needs no forward states.

    Args:
        g: Gradient of the output ``y`` ``(b, T, h, p)``.
        dt: Step size after softplus ``(b, T, h)``.
        A: Scalar decay rate per head ``(h,)``.
        B: Input matrix ``(b, T, g, n)``.
        C: Output matrix ``(b, T, g, n)``.
        D: Skip ``(h,)``, ``(h, p)`` or ``None``.
        variant: ``"chunked"`` or ``"sequential"`` (see :func:`ssd_scan_fwd`).
        block_p: Head channels per program (a power of two); chosen from the shapes if ``None``.
        block_t: Steps per chunk of the chunked kernel (a power of two, at least 16).

    Returns:
        ``dx`` ``(b, T, h, p)`` in float32 (float64 if any input is float64, via the torch path).
    """
    if _is_float64(g, dt, A, B, C, D):
        return ssd_scan_lrp_bwd_torch(*_float64(g, dt, A, B, C, D))
    return _launch("bwd", g, dt, A, B, C, D, variant, block_p, block_t)

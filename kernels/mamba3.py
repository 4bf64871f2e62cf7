"""Triton kernels for the Mamba-3 scan (per-token decays, trapezoid term, MIMO ranks) and its
MambaLRP adjoint scan.

One program per ``(batch, head, block of BLOCK_P head channels)`` carries a ``(BLOCK_P, d_state)``
state in registers along the sequence; the ``R`` ranks of a step are handled together (``R``
padded to a power of two). Head ``i`` reads ``B`` and ``C`` of group ``i // (heads // groups)``.

With ``a_t = exp(dt_t A_t)``, the token weights ``c_t = trap_t dt_t`` (in its own output) and
``w_t = trap_t dt_t + (1 - trap_{t+1}) dt_{t+1}`` (in later states, computed by the wrapper),
and ``X_t B_t = sum_r x_{t,r} outer B_{t,r}``, the forward carries ``S``::

    y_{t,r} = a_t S_{t-1} C_{t,r} + c_t sum_q (C_{t,r} . B_{t,q}) x_{t,q} + D_h x_{t,r}
    S_t     = a_t S_{t-1} + w_t X_t B_t

which is the exponential-trapezoidal recurrence of :mod:`mambalrp.functional.mamba3` written with
the previous-token term folded into ``w``. The adjoint scan (``dt``, ``A``, ``trap``, ``B``,
``C`` held constant) carries ``G``, the gradient of ``S_t``::

    dx_{t,q} = w_t G_t B_{t,q} + c_t sum_r (C_{t,r} . B_{t,q}) g_{t,r} + D_h g_{t,q}
    G_{t-1}  = a_t (G_t + sum_r g_{t,r} outer C_{t,r})

Inputs of any floating dtype are loaded and cast to float32; accumulation and the output are
float32. Float64 inputs are routed to the torch implementation, which keeps float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambalrp.functional.mamba3 import (
    check_shapes,
    mamba3_scan_fwd_torch,
    mamba3_scan_lrp_bwd_torch,
    token_weights,
)

# Upper bound on BLOCK_P * BLOCK_N, the state one program holds in registers.
MAX_STATE_ELEMENTS = 2048


@triton.jit
def _mamba3_scan_kernel(
    v_ptr, la_ptr, cur_ptr, later_ptr, B_ptr, C_ptr, D_ptr, out_ptr,
    T, R, p, n, heads_per_group,
    s_vb, s_vt, s_vr, s_vh, s_vp,
    s_cb, s_ct, s_ch,
    s_bb, s_bt, s_br, s_bg, s_bn,
    s_qb, s_qt, s_qr, s_qg, s_qn,
    s_dh,
    s_ob, s_ot, s_or, s_oh, s_op,
    REVERSE: tl.constexpr,
    HAS_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2)
    group = pid_h // heads_per_group
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_rp = (offs_r[:, None] < R) & (offs_p[None, :] < p)
    mask_rn = (offs_r[:, None] < R) & (offs_n[None, :] < n)

    if HAS_D:
        skip = tl.load(D_ptr + pid_h * s_dh).to(tl.float32)

    v_ptrs = v_ptr + pid_b * s_vb + pid_h * s_vh + offs_r[:, None] * s_vr + offs_p[None, :] * s_vp
    o_ptrs = out_ptr + pid_b * s_ob + pid_h * s_oh + offs_r[:, None] * s_or + offs_p[None, :] * s_op
    b_ptrs = B_ptr + pid_b * s_bb + group * s_bg + offs_r[:, None] * s_br + offs_n[None, :] * s_bn
    c_ptrs = C_ptr + pid_b * s_qb + group * s_qg + offs_r[:, None] * s_qr + offs_n[None, :] * s_qn
    coef = pid_b * s_cb + pid_h * s_ch

    state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for i in range(T):
        if REVERSE:
            t = tl.cast(T - 1 - i, tl.int64)
        else:
            t = tl.cast(i, tl.int64)  # T * heads * head_dim can exceed 2**31
        v_t = tl.load(v_ptrs + t * s_vt, mask=mask_rp, other=0.0).to(tl.float32)  # (R, P)
        b_t = tl.load(b_ptrs + t * s_bt, mask=mask_rn, other=0.0).to(tl.float32)  # (R, N)
        c_t = tl.load(c_ptrs + t * s_qt, mask=mask_rn, other=0.0).to(tl.float32)  # (R, N)
        decay = tl.exp(tl.load(la_ptr + coef + t * s_ct))
        current = tl.load(cur_ptr + coef + t * s_ct)
        later = tl.load(later_ptr + coef + t * s_ct)
        cb = tl.sum(c_t[:, None, :] * b_t[None, :, :], axis=2)  # (R out, R in)
        if REVERSE:
            # v is the output gradient g; state is G_t, the gradient of S_t
            out = later * tl.sum(state[None, :, :] * b_t[:, None, :], axis=2)
            out += current * tl.sum(cb[:, :, None] * v_t[:, None, :], axis=0)
            if HAS_D:
                out += skip * v_t
            tl.store(o_ptrs + t * s_ot, out, mask=mask_rp)
            state = decay * (state + tl.sum(v_t[:, :, None] * c_t[:, None, :], axis=0))
        else:
            state = decay * state
            out = tl.sum(state[None, :, :] * c_t[:, None, :], axis=2)
            out += current * tl.sum(cb[:, :, None] * v_t[None, :, :], axis=1)
            if HAS_D:
                out += skip * v_t
            tl.store(o_ptrs + t * s_ot, out, mask=mask_rp)
            state += later * tl.sum(v_t[:, :, None] * b_t[:, None, :], axis=0)


def _blocks(R: int, p: int, n: int, block_p: int | None) -> tuple[int, int, int]:
    block_r = triton.next_power_of_2(max(1, R))
    block_n = triton.next_power_of_2(max(1, n))
    if block_p is None:
        block_p = min(triton.next_power_of_2(max(1, p)), max(1, MAX_STATE_ELEMENTS // (block_n * block_r)))
    if block_p < 1 or block_p & (block_p - 1):
        raise ValueError(f"block_p must be a positive power of two; got {block_p}")
    return block_r, block_p, block_n


def _launch(reverse: bool, v, dt, A, trap, B, C, D, block_p: int | None) -> torch.Tensor:
    check_shapes(v, dt, A, trap, B, C, D)
    if D is not None and D.dim() != 1:
        raise ValueError("the Triton Mamba-3 kernels take D of shape (heads,)")
    mimo = v.dim() == 5
    vr = v if mimo else v.unsqueeze(2)
    Br, Cr = (B, C) if mimo else (B.unsqueeze(2), C.unsqueeze(2))
    b, T, R, h, p = vr.shape
    n = Br.shape[-1]
    out = torch.empty((b, T, R, h, p), dtype=torch.float32, device=v.device)
    if out.numel() == 0:
        return out if mimo else out.squeeze(2)
    dt32, A32, trap32 = (t.float() for t in (dt, A, trap))
    current, later = token_weights(dt32, trap32)
    la = (dt32 * A32).contiguous()
    current, later = current.contiguous(), later.contiguous()
    block_r, block_p, block_n = _blocks(R, p, n, block_p)
    d_arg, d_stride = (la, 0) if D is None else (D, D.stride(0))  # never read without D
    grid = (b, h, triton.cdiv(p, block_p))
    _mamba3_scan_kernel[grid](
        vr, la, current, later, Br, Cr, d_arg, out,
        T, R, p, n, h // Br.shape[3],
        *vr.stride(),
        *la.stride(),
        *Br.stride(),
        *Cr.stride(),
        d_stride,
        *out.stride(),
        REVERSE=reverse,
        HAS_D=D is not None,
        BLOCK_R=block_r,
        BLOCK_P=block_p,
        BLOCK_N=block_n,
    )
    return out if mimo else out.squeeze(2)


def _is_float64(*tensors: torch.Tensor | None) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def _float64(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(torch.float64) for t in tensors]


def mamba3_scan_fwd(x, dt, A, trap, B, C, D, *, block_p: int | None = None) -> torch.Tensor:
    """Mamba-3 scan forward (layout and arguments of :func:`mambalrp.functional.mamba3_scan`).

    Args:
        x: Value ``(b, T, h, p)`` or ``(b, T, R, h, p)``.
        dt: Step size after softplus ``(b, T, h)``.
        A: Per-token decay rate ``(b, T, h)``.
        trap: Trapezoid factor after the sigmoid ``(b, T, h)``.
        B: Input matrix ``(b, T, g, n)`` / ``(b, T, R, g, n)``, prepared (normed, biased, rotated).
        C: Output matrix, same layout as ``B``.
        D: Skip ``(h,)`` or ``None``.
        block_p: Head channels per program (a power of two); chosen from the shapes if ``None``.

    Returns:
        ``y`` shaped like ``x`` in float32 (float64 if any input is float64, via the torch path).
    """
    if _is_float64(x, dt, A, trap, B, C, D):
        return mamba3_scan_fwd_torch(*_float64(x, dt, A, trap, B, C, D))
    return _launch(False, x, dt, A, trap, B, C, D, block_p)


def mamba3_scan_lrp_bwd(g, dt, A, trap, B, C, D, *, block_p: int | None = None) -> torch.Tensor:
    """Adjoint scan of the MambaLRP SSM rule for the Mamba-3 scan; needs no forward states.

    Arguments as in :func:`mamba3_scan_fwd`, with ``g`` the gradient of ``y`` in place of ``x``.

    Returns:
        ``dx`` shaped like ``g`` in float32 (float64 if any input is float64, via the torch path).
    """
    if _is_float64(g, dt, A, trap, B, C, D):
        return mamba3_scan_lrp_bwd_torch(*_float64(g, dt, A, trap, B, C, D))
    return _launch(True, g, dt, A, trap, B, C, D, block_p)

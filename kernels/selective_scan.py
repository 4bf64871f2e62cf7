"""Triton kernels for the Mamba-1 selective scan and its MambaLRP reverse scan.

Every kernel runs one program per ``(batch, block of BLOCK_D channels)`` that carries the
``(BLOCK_D, d_state)`` state in registers along the sequence. The discretisation
``Abar = exp(dt * A)``, ``Bbar = dt * B`` is computed in the kernel, so no ``(b, d, T, n)``
tensor is ever written to memory: the forward reads ``x, dt, B, C`` once and writes ``y``, the
reverse scan reads ``g, dt, B, C`` once and writes ``dx``.

Forward::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t        y_t = C_t . h_t + D * x_t

Reverse scan of the SSM rule (``dt``, ``Abar``, ``Bbar``, ``C`` held constant)::

    s_t = Abar_{t+1} * s_{t+1} + C_t * g_t                  dx_t = Bbar_t . s_t + D * g_t

Three variants compute the same thing (``DEFAULT_VARIANT`` is used when a call names none):

* ``"chunked"``: the program loads tiles of ``BLOCK_T`` steps (coalesced along time),
  forms the ``(BLOCK_D, BLOCK_T, d_state)`` decays and inputs of the tile in registers, and
  scans them with ``tl.associative_scan``; the state at the tile's end is carried to the next
  tile. The reverse scan walks the tiles from the end and loads each in reversed time order, so
  its recurrence is a forward scan along the tile; ``Abar_{t+1}`` comes from ``dt`` loaded one
  step ahead.
* ``"tiled"``: the program loads ``(BLOCK_D, BLOCK_T)`` tiles of ``x`` (or ``g``) and ``dt`` once
  per tile and loops over the states (unrolled): for state ``i`` it loads the rows ``B[i]`` and
  ``C[i]`` of the tile (shared by the program's channels), forms the ``(BLOCK_D, BLOCK_T)`` decays
  and inputs and scans them along time with one 2-D ``tl.associative_scan``, adds the state carried
  from the previous tile and accumulates ``C_i * h`` (forward) or ``B_i * s`` (reverse) elementwise,
  so no reduction over the states and no 3-D tile: long tiles fit in registers. The states at the
  tile's end are carried in a ``(BLOCK_D, BLOCK_N)`` tensor. The reverse scan walks the tiles from
  the end but loads each in time order (contiguous, vectorisable loads) and scans it from its end
  (``reverse=True``); ``Abar_{t+1}`` comes from ``dt`` loaded one step ahead.
* ``"sequential"``: one step per loop iteration; the reverse scan carries ``Abar_{t+1}``, computed
  one iteration earlier, along with ``s``.

Inputs of any floating dtype are loaded and cast to float32; accumulation and the output are
float32. Float64 inputs are routed to the torch implementation, which keeps float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambalrp.functional.selective_scan import check_shapes, selective_scan_fwd_torch, selective_scan_lrp_bwd_torch

VARIANTS = ("chunked", "sequential", "tiled")
# The variant used when a call names none (benchmarks may set it to compare variants end to end).
DEFAULT_VARIANT = "chunked"
# Sequential kernels: upper bound on BLOCK_D * BLOCK_N, the state one program holds in registers.
# Small, so that batch 1 still gives many programs (96 for d_inner 1536, d_state 16); each step
# costs a full load latency, so more programs in flight is what makes these kernels faster.
MAX_STATE_ELEMENTS = 256
# Chunked kernels: upper bound on BLOCK_D * BLOCK_T * BLOCK_N, the size of one scanned tile.
# The defaults (2 x 64 x 16 for d_state 16, two warps: 768 programs for d_inner 1536) were the
# fastest of a sweep on an H100 (benchmarks/scan_kernel_sweep.py; 1.25 / 1.11 ms for the reverse /
# forward scan at T = 16k against 1.69 / 1.57 ms for 4 x 32 x 16 with four warps).
MAX_CHUNK_ELEMENTS = 2048
DEFAULT_BLOCK_T = 64
CHUNKED_NUM_WARPS = 2
# Tiled kernels: the scanned tile is (BLOCK_D, BLOCK_T), one state at a time, so it can be long.
# 4 x 128 with 4 warps gives one channel per warp (128 steps = 32 lanes x 4-wide loads): the scans
# and the carry extraction stay within a warp (no shared memory, no barriers), ~100 registers on
# sm_90 and no spills. Bounded by MAX_TILE_ELEMENTS (BLOCK_D * BLOCK_T) unless block_d is given.
TILED_BLOCK_D = 4
TILED_BLOCK_T = 128
MAX_TILE_ELEMENTS = 4096


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
    rows = offs_d.to(tl.int64)  # d * T can exceed 2**31
    mask_n = offs_n < n

    # Padded states get A = 0 and B = 0, so they stay exactly zero.
    A = tl.load(
        A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an,
        mask=mask_d[:, None] & mask_n[None, :],
        other=0.0,
    ).to(tl.float32)
    if HAS_D:
        skip = tl.load(D_ptr + offs_d * s_dd, mask=mask_d, other=0.0).to(tl.float32)

    x_ptrs = x_ptr + pid_b * s_xb + rows * s_xd
    dt_ptrs = dt_ptr + pid_b * s_dtb + rows * s_dtd
    b_ptrs = B_ptr + pid_b * s_bb + offs_n * s_bn
    c_ptrs = C_ptr + pid_b * s_cb + offs_n * s_cn
    y_ptrs = y_ptr + pid_b * s_yb + rows * s_yd

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
    rows = offs_d.to(tl.int64)  # d * T can exceed 2**31
    mask_n = offs_n < n

    A = tl.load(
        A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an,
        mask=mask_d[:, None] & mask_n[None, :],
        other=0.0,
    ).to(tl.float32)
    if HAS_D:
        skip = tl.load(D_ptr + offs_d * s_dd, mask=mask_d, other=0.0).to(tl.float32)

    g_ptrs = g_ptr + pid_b * s_gb + rows * s_gd
    dt_ptrs = dt_ptr + pid_b * s_dtb + rows * s_dtd
    b_ptrs = B_ptr + pid_b * s_bb + offs_n * s_bn
    c_ptrs = C_ptr + pid_b * s_cb + offs_n * s_cn
    dx_ptrs = dx_ptr + pid_b * s_xb + rows * s_xd

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


@triton.jit
def _first_order_combine(a_left, u_left, a_right, u_right):
    """Compose two steps of ``h -> a * h + u`` (left first): the associative operator of the scan."""
    return a_left * a_right, a_right * u_left + u_right


@triton.jit
def _selective_scan_fwd_chunked_kernel(
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
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d
    rows = offs_d.to(tl.int64)  # d * T can exceed 2**31
    mask_n = offs_n < n

    A = tl.load(
        A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an,
        mask=mask_d[:, None] & mask_n[None, :],
        other=0.0,
    ).to(tl.float32)
    if HAS_D:
        skip = tl.load(D_ptr + offs_d * s_dd, mask=mask_d, other=0.0).to(tl.float32)

    x_rows = x_ptr + pid_b * s_xb + rows[:, None] * s_xd
    dt_rows = dt_ptr + pid_b * s_dtb + rows[:, None] * s_dtd
    b_cols = B_ptr + pid_b * s_bb + offs_n[None, :] * s_bn
    c_cols = C_ptr + pid_b * s_cb + offs_n[None, :] * s_cn
    y_rows = y_ptr + pid_b * s_yb + rows[:, None] * s_yd
    is_last = (offs_j == BLOCK_T - 1)[None, :, None]

    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + offs_j
        mask_t = offs_t < T
        mask_dt = mask_d[:, None] & mask_t[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        x = tl.load(x_rows + offs_t[None, :] * s_xt, mask=mask_dt, other=0.0).to(tl.float32)
        dt = tl.load(dt_rows + offs_t[None, :] * s_dtt, mask=mask_dt, other=0.0).to(tl.float32)
        b = tl.load(b_cols + offs_t[:, None] * s_bt, mask=mask_tn, other=0.0).to(tl.float32)
        c = tl.load(c_cols + offs_t[:, None] * s_ct, mask=mask_tn, other=0.0).to(tl.float32)
        # (BLOCK_D, BLOCK_T, BLOCK_N); steps past T have dt = 0: decay 1, input 0.
        abar = tl.exp(dt[:, :, None] * A[:, None, :])
        u = (dt * x)[:, :, None] * b[None, :, :]
        decay, hs = tl.associative_scan((abar, u), axis=1, combine_fn=_first_order_combine)
        hs += decay * h[:, None, :]
        y = tl.sum(hs * c[None, :, :], axis=2)
        if HAS_D:
            y += skip[:, None] * x
        tl.store(y_rows + offs_t[None, :] * s_yt, y, mask=mask_dt)
        h = tl.sum(tl.where(is_last, hs, 0.0), axis=1)


@triton.jit
def _selective_scan_lrp_bwd_chunked_kernel(
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
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d
    rows = offs_d.to(tl.int64)  # d * T can exceed 2**31
    mask_n = offs_n < n

    A = tl.load(
        A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an,
        mask=mask_d[:, None] & mask_n[None, :],
        other=0.0,
    ).to(tl.float32)
    if HAS_D:
        skip = tl.load(D_ptr + offs_d * s_dd, mask=mask_d, other=0.0).to(tl.float32)

    g_rows = g_ptr + pid_b * s_gb + rows[:, None] * s_gd
    dt_rows = dt_ptr + pid_b * s_dtb + rows[:, None] * s_dtd
    b_cols = B_ptr + pid_b * s_bb + offs_n[None, :] * s_bn
    c_cols = C_ptr + pid_b * s_cb + offs_n[None, :] * s_cn
    dx_rows = dx_ptr + pid_b * s_xb + rows[:, None] * s_xd
    is_last = (offs_j == BLOCK_T - 1)[None, :, None]

    # Chunks are walked from the end, each loaded in reversed time order (position j holds step
    # t_hi - j), so the reverse recurrence becomes a forward scan along the tile.
    s = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = (T - 1 - t0) - offs_j
        mask_t = offs_t >= 0
        mask_next = mask_t & (offs_t + 1 < T)
        mask_dt = mask_d[:, None] & mask_t[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        g = tl.load(g_rows + offs_t[None, :] * s_gt, mask=mask_dt, other=0.0).to(tl.float32)
        dt = tl.load(dt_rows + offs_t[None, :] * s_dtt, mask=mask_dt, other=0.0).to(tl.float32)
        dt_next = tl.load(
            dt_rows + (offs_t + 1)[None, :] * s_dtt, mask=mask_d[:, None] & mask_next[None, :], other=0.0
        ).to(tl.float32)
        b = tl.load(b_cols + offs_t[:, None] * s_bt, mask=mask_tn, other=0.0).to(tl.float32)
        c = tl.load(c_cols + offs_t[:, None] * s_ct, mask=mask_tn, other=0.0).to(tl.float32)
        # s_t = Abar_{t+1} s_{t+1} + C_t g_t; Abar_T multiplies s_T = 0, any value works.
        abar_next = tl.exp(dt_next[:, :, None] * A[:, None, :])
        u = g[:, :, None] * c[None, :, :]
        decay, ss = tl.associative_scan((abar_next, u), axis=1, combine_fn=_first_order_combine)
        ss += decay * s[:, None, :]
        dx = tl.sum(ss * b[None, :, :], axis=2) * dt
        if HAS_D:
            dx += skip[:, None] * g
        tl.store(dx_rows + offs_t[None, :] * s_xt, dx, mask=mask_dt)
        s = tl.sum(tl.where(is_last, ss, 0.0), axis=1)


@triton.jit
def _selective_scan_fwd_tiled_kernel(
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
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    N_STATE: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d
    rows = offs_d.to(tl.int64)  # d * T can exceed 2**31
    if HAS_D:
        skip = tl.load(D_ptr + offs_d * s_dd, mask=mask_d, other=0.0).to(tl.float32)

    x_rows = x_ptr + pid_b * s_xb + rows[:, None] * s_xd
    dt_rows = dt_ptr + pid_b * s_dtb + rows[:, None] * s_dtd
    y_rows = y_ptr + pid_b * s_yb + rows[:, None] * s_yd
    a_col = A_ptr + offs_d * s_ad
    b_row = B_ptr + pid_b * s_bb
    c_row = C_ptr + pid_b * s_cb
    is_last = (offs_j == BLOCK_T - 1)[None, :]
    zero_d = tl.zeros((BLOCK_D,), dtype=tl.int32)

    # Column i holds the state i of every channel at the end of the previous tile.
    carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + offs_j
        mask_t = offs_t < T
        mask_dt = mask_d[:, None] & mask_t[None, :]
        x = tl.load(x_rows + offs_t[None, :] * s_xt, mask=mask_dt, other=0.0).to(tl.float32)
        # Steps past T have dt = 0: decay 1, input 0.
        dt = tl.load(dt_rows + offs_t[None, :] * s_dtt, mask=mask_dt, other=0.0).to(tl.float32)
        dtx = dt * x
        # B and C rows are loaded as (BLOCK_D, BLOCK_T) tiles, every row from the same addresses
        # (served by L1): a (BLOCK_T,) load gets a layout of its own and its broadcast a
        # shared-memory layout conversion per state.
        b_tile = b_row + (offs_t * s_bt)[None, :] + zero_d[:, None]
        c_tile = c_row + (offs_t * s_ct)[None, :] + zero_d[:, None]
        if HAS_D:
            y = skip[:, None] * x
        else:
            y = tl.zeros((BLOCK_D, BLOCK_T), dtype=tl.float32)
        for i in tl.static_range(N_STATE):
            # log2(e) folded into A: exp(dt * A) = exp2(dt * A * log2(e)).
            a = tl.load(a_col + i * s_an, mask=mask_d, other=0.0).to(tl.float32) * 1.4426950408889634
            b = tl.load(b_tile + i * s_bn, mask=mask_dt, other=0.0).to(tl.float32)
            c = tl.load(c_tile + i * s_cn, mask=mask_dt, other=0.0).to(tl.float32)
            abar = tl.exp2(dt * a[:, None])
            decay, h = tl.associative_scan((abar, dtx * b), axis=1, combine_fn=_first_order_combine)
            column = offs_n[None, :] == i
            h += decay * tl.sum(tl.where(column, carry, 0.0), axis=1)[:, None]
            y += c * h
            carry = tl.where(column, tl.sum(tl.where(is_last, h, 0.0), axis=1)[:, None], carry)
        tl.store(y_rows + offs_t[None, :] * s_yt, y, mask=mask_dt)


@triton.jit
def _selective_scan_lrp_bwd_tiled_kernel(
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
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    N_STATE: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d
    rows = offs_d.to(tl.int64)  # d * T can exceed 2**31
    if HAS_D:
        skip = tl.load(D_ptr + offs_d * s_dd, mask=mask_d, other=0.0).to(tl.float32)

    g_rows = g_ptr + pid_b * s_gb + rows[:, None] * s_gd
    dt_rows = dt_ptr + pid_b * s_dtb + rows[:, None] * s_dtd
    dx_rows = dx_ptr + pid_b * s_xb + rows[:, None] * s_xd
    a_col = A_ptr + offs_d * s_ad
    b_row = B_ptr + pid_b * s_bb
    c_row = C_ptr + pid_b * s_cb
    is_first = (offs_j == 0)[None, :]
    zero_d = tl.zeros((BLOCK_D,), dtype=tl.int32)

    # Tiles are walked from the end, each loaded in time order and scanned from its end
    # (reverse=True), so the loads stay contiguous. Column i of carry holds s of state i at the
    # first step of the previous (later) tile. Steps past T (in the first tile walked only) have
    # g = 0 and a decay of 1 and are scanned first, so s stays 0 until T - 1.
    carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    num_tiles = tl.cdiv(T, BLOCK_T)
    for k in range(num_tiles):
        offs_t = (num_tiles - 1 - k) * BLOCK_T + offs_j
        mask_t = offs_t < T
        mask_dt = mask_d[:, None] & mask_t[None, :]
        g = tl.load(g_rows + offs_t[None, :] * s_gt, mask=mask_dt, other=0.0).to(tl.float32)
        dt = tl.load(dt_rows + offs_t[None, :] * s_dtt, mask=mask_dt, other=0.0).to(tl.float32)
        # s_t = Abar_{t+1} s_{t+1} + C_t g_t; Abar_T multiplies s_T = 0, any value works.
        mask_next = mask_d[:, None] & (offs_t + 1 < T)[None, :]
        dt_next = tl.load(dt_rows + (offs_t + 1)[None, :] * s_dtt, mask=mask_next, other=0.0).to(tl.float32)
        b_tile = b_row + (offs_t * s_bt)[None, :] + zero_d[:, None]
        c_tile = c_row + (offs_t * s_ct)[None, :] + zero_d[:, None]
        acc = tl.zeros((BLOCK_D, BLOCK_T), dtype=tl.float32)
        for i in tl.static_range(N_STATE):
            a = tl.load(a_col + i * s_an, mask=mask_d, other=0.0).to(tl.float32) * 1.4426950408889634
            b = tl.load(b_tile + i * s_bn, mask=mask_dt, other=0.0).to(tl.float32)
            c = tl.load(c_tile + i * s_cn, mask=mask_dt, other=0.0).to(tl.float32)
            abar_next = tl.exp2(dt_next * a[:, None])
            decay, s = tl.associative_scan(
                (abar_next, g * c), axis=1, combine_fn=_first_order_combine, reverse=True
            )
            column = offs_n[None, :] == i
            s += decay * tl.sum(tl.where(column, carry, 0.0), axis=1)[:, None]
            acc += b * s
            carry = tl.where(column, tl.sum(tl.where(is_first, s, 0.0), axis=1)[:, None], carry)
        dx = acc * dt
        if HAS_D:
            dx += skip[:, None] * g
        tl.store(dx_rows + offs_t[None, :] * s_xt, dx, mask=mask_dt)


def _power_of_two(value: int, name: str) -> int:
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a positive power of two; got {value}")
    return value


def _blocks(
    d: int, n: int, T: int, variant: str, block_d: int | None, block_t: int | None
) -> tuple[int, int, int]:
    """``(BLOCK_D, BLOCK_T, BLOCK_N)`` for a launch; ``BLOCK_T`` is 1 for the sequential kernels."""
    block_n = triton.next_power_of_2(max(1, n))
    if variant == "sequential":
        if block_t not in (None, 1):
            raise ValueError("block_t applies to the chunked and tiled kernels only")
        block_t = 1
        budget = MAX_STATE_ELEMENTS
    elif variant == "tiled":
        if block_t is None:
            block_t = min(TILED_BLOCK_T, triton.next_power_of_2(max(1, T)))
        block_t = _power_of_two(block_t, "block_t")
        if block_d is None:
            block_d = min(TILED_BLOCK_D, triton.next_power_of_2(max(1, d)), max(1, MAX_TILE_ELEMENTS // block_t))
        return _power_of_two(block_d, "block_d"), block_t, block_n
    else:
        if block_t is None:
            block_t = min(DEFAULT_BLOCK_T, max(1, MAX_CHUNK_ELEMENTS // block_n), triton.next_power_of_2(max(1, T)))
        block_t = _power_of_two(block_t, "block_t")
        budget = MAX_CHUNK_ELEMENTS // block_t
    if block_d is None:
        block_d = min(triton.next_power_of_2(max(1, d)), max(1, budget // block_n))
    return _power_of_two(block_d, "block_d"), block_t, block_n


def _is_float64(*tensors: torch.Tensor | None) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def _float64(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(torch.float64) for t in tensors]


_KERNELS = {
    ("fwd", "sequential"): _selective_scan_fwd_kernel,
    ("fwd", "chunked"): _selective_scan_fwd_chunked_kernel,
    ("bwd", "sequential"): _selective_scan_lrp_bwd_kernel,
    ("bwd", "chunked"): _selective_scan_lrp_bwd_chunked_kernel,
    ("fwd", "tiled"): _selective_scan_fwd_tiled_kernel,
    ("bwd", "tiled"): _selective_scan_lrp_bwd_tiled_kernel,
}


def _launch(
    direction: str, v, dt, A, B, C, D, variant: str, block_d: int | None, block_t: int | None, num_warps: int | None
) -> torch.Tensor:
    variant = DEFAULT_VARIANT if variant is None else variant
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    check_shapes(v, dt, A, B, C, D)
    b, d, T = v.shape
    n = A.shape[1]
    out = torch.empty((b, d, T), dtype=torch.float32, device=v.device)
    if out.numel() == 0:
        return out
    block_d, block_t, block_n = _blocks(d, n, T, variant, block_d, block_t)
    grid = (b, triton.cdiv(d, block_d))
    d_arg = D if D is not None else A  # never read when HAS_D is False
    extra = {} if variant == "sequential" else {"BLOCK_T": block_t}
    if variant == "tiled":
        extra["N_STATE"] = n
    if num_warps is None and variant == "chunked":
        num_warps = CHUNKED_NUM_WARPS
    if num_warps is not None:
        extra["num_warps"] = _power_of_two(num_warps, "num_warps")
    _KERNELS[direction, variant][grid](
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
        **extra,
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
    variant: str | None = None,
    block_d: int | None = None,
    block_t: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Selective-scan forward with the discretisation fused into the kernel.

    Args:
        x: SSM input ``(b, d, T)``.
        dt: Step size after softplus ``(b, d, T)``.
        A: State matrix ``(d, n)``.
        B: Input matrix ``(b, n, T)``.
        C: Output matrix ``(b, n, T)``.
        D: Skip ``(d,)`` or ``None``.
        variant: ``"chunked"`` (a parallel scan over tiles of ``block_t`` steps, all states at
            once), ``"tiled"`` (a parallel scan over tiles of ``block_t`` steps, one state at a
            time) or ``"sequential"`` (one step per loop iteration); ``None`` for
            ``DEFAULT_VARIANT``.
        block_d: Channels per program (a power of two); chosen from the shapes if ``None``.
        block_t: Steps per tile of the chunked and tiled kernels (a power of two); chosen if ``None``.
        num_warps: Warps per program (a power of two); if ``None``, ``CHUNKED_NUM_WARPS`` for the
            chunked kernels and Triton's default for the others.

    Returns:
        ``y`` ``(b, d, T)`` in float32 (float64 if any input is float64, via the torch path).
    """
    if _is_float64(x, dt, A, B, C, D):
        return selective_scan_fwd_torch(*_float64(x, dt, A, B, C, D))
    return _launch("fwd", x, dt, A, B, C, D, variant, block_d, block_t, num_warps)


def selective_scan_lrp_bwd(
    g: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    *,
    variant: str | None = None,
    block_d: int | None = None,
    block_t: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Reverse scan of the MambaLRP SSM rule; needs no forward states.

    Args:
        g: Gradient of the output ``y`` ``(b, d, T)``.
        dt: Step size after softplus ``(b, d, T)``.
        A: State matrix ``(d, n)``.
        B: Input matrix ``(b, n, T)``.
        C: Output matrix ``(b, n, T)``.
        D: Skip ``(d,)`` or ``None``.
        variant: ``"chunked"`` (a parallel scan over tiles of ``block_t`` steps, all states at
            once), ``"tiled"`` (a parallel scan over tiles of ``block_t`` steps, one state at a
            time) or ``"sequential"`` (one step per loop iteration); ``None`` for
            ``DEFAULT_VARIANT``.
        block_d: Channels per program (a power of two); chosen from the shapes if ``None``.
        block_t: Steps per tile of the chunked and tiled kernels (a power of two); chosen if ``None``.
        num_warps: Warps per program (a power of two); if ``None``, ``CHUNKED_NUM_WARPS`` for the
            chunked kernels and Triton's default for the others.

    Returns:
        ``dx`` ``(b, d, T)`` in float32 (float64 if any input is float64, via the torch path).
    """
    if _is_float64(g, dt, A, B, C, D):
        return selective_scan_lrp_bwd_torch(*_float64(g, dt, A, B, C, D))
    return _launch("bwd", g, dt, A, B, C, D, variant, block_d, block_t, num_warps)

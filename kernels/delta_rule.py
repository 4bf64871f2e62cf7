"""Triton kernels for the gated delta rule and its MambaLRP adjoint recurrence.

One program per ``(batch, value head, block of BLOCK_V value channels)`` carries a
``(d_k, BLOCK_V)`` block of the state in registers along the sequence: the columns of the state
evolve independently (each reads only its own value channel), so the value channels split across
programs with no communication. Value head ``i`` reads key head ``i // (heads / key_heads)``.

Forward, one step per iteration (``a_t = exp(g_t)``, a scalar or one per key channel)::

    S <- diag(a_t) S;   u = beta_t (v_t - S^T k_t);   S <- S + k_t u^T;   o_t = S^T q_t

Adjoint of the map ``v -> o`` with ``q, k, g, beta`` held constant, walking back in time and
carrying the next step's key, write strength and decay::

    P <- diag(a_{t+1}) (P - beta_{t+1} k_{t+1} (k_{t+1}^T P));   P <- P + q_t dO_t^T;   dv_t = beta_t P^T k_t

Inputs of any floating dtype are loaded and cast to float32; accumulation and outputs are
float32. Float64 inputs are routed to the torch implementation, which keeps float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambalrp.functional.delta_rule import (
    check_shapes,
    gated_delta_rule_fwd_torch,
    gated_delta_rule_lrp_bwd_torch,
)

# Upper bound on BLOCK_K * BLOCK_V, the state block one program holds in registers.
MAX_STATE_ELEMENTS = 8192


@triton.jit
def _delta_rule_fwd_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr,
    T, dk, dv, heads_per_key_head,
    s_qb, s_qt, s_qh, s_qd,
    s_vb, s_vt, s_vh, s_vd,
    s_gb, s_gt, s_gh, s_gd,
    s_bb, s_bt, s_bh,
    s_ob, s_ot, s_oh, s_od,
    PER_CHANNEL: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_v = tl.program_id(2)
    key_head = pid_h // heads_per_key_head
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_k = offs_k < dk
    mask_v = offs_v < dv

    qk_base = pid_b * s_qb + key_head * s_qh + offs_k * s_qd
    v_base = v_ptr + pid_b * s_vb + pid_h * s_vh + offs_v * s_vd
    g_base = g_ptr + pid_b * s_gb + pid_h * s_gh
    beta_base = beta_ptr + pid_b * s_bb + pid_h * s_bh
    o_base = o_ptr + pid_b * s_ob + pid_h * s_oh + offs_v * s_od

    state = tl.zeros((BLOCK_K, BLOCK_V), dtype=tl.float32)
    zero = pid_b * 0  # int64: step offsets times strides never overflow
    for t in range(T):
        tt = zero + t
        q = tl.load(q_ptr + qk_base + tt * s_qt, mask=mask_k, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + qk_base + tt * s_qt, mask=mask_k, other=0.0).to(tl.float32)
        v = tl.load(v_base + tt * s_vt, mask=mask_v, other=0.0).to(tl.float32)
        beta = tl.load(beta_base + tt * s_bt).to(tl.float32)
        if PER_CHANNEL:
            decay = tl.exp(tl.load(g_base + tt * s_gt + offs_k * s_gd, mask=mask_k, other=0.0).to(tl.float32))
            state = state * decay[:, None]
        else:
            state = state * tl.exp(tl.load(g_base + tt * s_gt).to(tl.float32))
        u = beta * (v - tl.sum(state * k[:, None], axis=0))
        state = state + k[:, None] * u[None, :]
        tl.store(o_base + tt * s_ot, tl.sum(state * q[:, None], axis=0), mask=mask_v)


@triton.jit
def _delta_rule_lrp_bwd_kernel(
    q_ptr, k_ptr, do_ptr, g_ptr, beta_ptr, dv_ptr,
    T, dk, dv, heads_per_key_head,
    s_qb, s_qt, s_qh, s_qd,
    s_ob, s_ot, s_oh, s_od,
    s_gb, s_gt, s_gh, s_gd,
    s_bb, s_bt, s_bh,
    s_vb, s_vt, s_vh, s_vd,
    PER_CHANNEL: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_v = tl.program_id(2)
    key_head = pid_h // heads_per_key_head
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_k = offs_k < dk
    mask_v = offs_v < dv

    qk_base = pid_b * s_qb + key_head * s_qh + offs_k * s_qd
    do_base = do_ptr + pid_b * s_ob + pid_h * s_oh + offs_v * s_od
    g_base = g_ptr + pid_b * s_gb + pid_h * s_gh
    beta_base = beta_ptr + pid_b * s_bb + pid_h * s_bh
    dv_base = dv_ptr + pid_b * s_vb + pid_h * s_vh + offs_v * s_vd

    grad_state = tl.zeros((BLOCK_K, BLOCK_V), dtype=tl.float32)
    # The step after the current one; past the end: no projection (beta 0), no decay (1).
    k_next = tl.zeros((BLOCK_K,), dtype=tl.float32)
    beta_next = 0.0
    if PER_CHANNEL:
        decay_next = tl.full((BLOCK_K,), 1.0, dtype=tl.float32)
    else:
        decay_next = 1.0
    zero = pid_b * 0  # int64: step offsets times strides never overflow
    for i in range(T):
        tt = zero + (T - 1 - i)
        kp = tl.sum(grad_state * k_next[:, None], axis=0)
        grad_state = grad_state - beta_next * k_next[:, None] * kp[None, :]
        if PER_CHANNEL:
            grad_state = grad_state * decay_next[:, None]
        else:
            grad_state = grad_state * decay_next
        q = tl.load(q_ptr + qk_base + tt * s_qt, mask=mask_k, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + qk_base + tt * s_qt, mask=mask_k, other=0.0).to(tl.float32)
        do = tl.load(do_base + tt * s_ot, mask=mask_v, other=0.0).to(tl.float32)
        beta = tl.load(beta_base + tt * s_bt).to(tl.float32)
        grad_state = grad_state + q[:, None] * do[None, :]
        tl.store(dv_base + tt * s_vt, beta * tl.sum(grad_state * k[:, None], axis=0), mask=mask_v)
        k_next = k
        beta_next = beta
        if PER_CHANNEL:
            decay_next = tl.exp(tl.load(g_base + tt * s_gt + offs_k * s_gd, mask=mask_k, other=0.0).to(tl.float32))
        else:
            decay_next = tl.exp(tl.load(g_base + tt * s_gt).to(tl.float32))


def _blocks(dk: int, dv: int, block_v: int | None) -> tuple[int, int]:
    block_k = triton.next_power_of_2(max(1, dk))
    if block_v is None:
        block_v = min(triton.next_power_of_2(max(1, dv)), max(1, MAX_STATE_ELEMENTS // block_k))
    if block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a positive power of two; got {block_v}")
    return block_k, block_v


def _g_strides(g: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(g.stride()) if g.dim() == 4 else (*g.stride(), 0)


def _launch(kernel, q, k, x, g, beta, out, block_v):
    """Run ``kernel`` on ``(q, k, x, g, beta) -> out``; ``x`` is ``v`` (forward) or ``dO`` (adjoint)."""
    b, T, h, dv = out.shape
    dk = q.shape[-1]
    block_k, block_v = _blocks(dk, dv, block_v)
    if q.stride() != k.stride():
        q, k = q.contiguous(), k.contiguous()
    kernel[(b, h, triton.cdiv(dv, block_v))](
        q, k, x, g, beta, out,
        T, dk, dv, h // q.shape[2],
        *q.stride(), *x.stride(), *_g_strides(g), *beta.stride(), *out.stride(),
        PER_CHANNEL=g.dim() == 4, BLOCK_K=block_k, BLOCK_V=block_v,
    )
    return out


def gated_delta_rule_fwd(q, k, v, g, beta, block_v: int | None = None) -> torch.Tensor:
    """Forward on the GPU (or the Triton interpreter). Same contract as
    :func:`mambalrp.functional.delta_rule.gated_delta_rule_fwd_torch`; float32 output."""
    check_shapes(q, k, v, g, beta)
    if any(t.dtype == torch.float64 for t in (q, k, v, g, beta)):
        return gated_delta_rule_fwd_torch(*(t.to(torch.float64) for t in (q, k, v, g, beta)))
    o = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    return _launch(_delta_rule_fwd_kernel, q, k, v, g, beta, o, block_v)


def gated_delta_rule_lrp_bwd(grad_o, q, k, g, beta, block_v: int | None = None) -> torch.Tensor:
    """Adjoint recurrence on the GPU (or the Triton interpreter). Same contract as
    :func:`mambalrp.functional.delta_rule.gated_delta_rule_lrp_bwd_torch`; float32 output."""
    check_shapes(q, k, grad_o, g, beta)
    if any(t.dtype == torch.float64 for t in (grad_o, q, k, g, beta)):
        return gated_delta_rule_lrp_bwd_torch(*(t.to(torch.float64) for t in (grad_o, q, k, g, beta)))
    dv = torch.empty(grad_o.shape, dtype=torch.float32, device=grad_o.device)
    return _launch(_delta_rule_lrp_bwd_kernel, q, k, grad_o, g, beta, dv, block_v)

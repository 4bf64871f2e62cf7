"""Mamba-3 scan: per-token scalar decays, a two-term (trapezoidal) input, optional MIMO ranks.

Forward, per head ``h`` with state ``(p, n)`` and ranks ``r = 1..R`` (``R = 1``: SISO)::

    alpha_t = exp(dt_t * A_t)
    H_t = alpha_t * H_{t-1}
          + (1 - trap_t) * dt_t * alpha_t * sum_r x_{t-1,r} outer B_{t-1,r}     (previous token)
          + trap_t * dt_t * sum_r x_{t,r} outer B_{t,r}                          (current token)
    y_{t,r} = H_t C_{t,r} + D_h * x_{t,r}

This is the exponential-trapezoidal recurrence of mamba_ssm's ``Mamba3`` once its coefficients are
computed: ``A_t`` depends on the token, ``trap_t`` is the mixing factor after the sigmoid, and
``B`` and ``C`` are the normed, biased and rotated matrices (the rotation and the biases are the
caller's business: they only shape coefficients). ``x`` is the value; for MIMO it is already
scaled per rank.

The rule holds ``dt``, ``A``, ``trap``, ``B`` and ``C`` constant; ``y`` is then linear in ``x`` and
the rule's backward is the adjoint (reverse) scan, so ``sum(x * dx) == sum(y * g)``: relevance is
conserved through the scan, the skip ``D`` included (it is part of the same linear map).

Both directions run chunk by chunk (the SSD form): inside a chunk of ``L`` steps one
``(L R, L R)`` matrix of decay-weighted ``C . B`` products per head, between chunks one ``(n, p)``
state per head; the work is done in a head-major layout with batched matrix products. The previous-
token term folds into per-token weights: a token ``s`` enters later outputs with weight
``w_s = trap_s dt_s + (1 - trap_{s+1}) dt_{s+1}`` and its own output with ``trap_s dt_s``. Nothing
of size ``(batch, d, T, n)`` is formed.

Layout: ``x: (b, T, h, p)`` (SISO) or ``(b, T, R, h, p)`` (MIMO); ``dt, A, trap: (b, T, h)``;
``B, C: (b, T, g, n)`` or ``(b, T, R, g, n)`` with ``h`` a multiple of ``g``; ``D: (h,)``,
``(h, p)`` or ``None``. Computation in float32 (float64 stays float64); output shaped like ``x``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from mambalrp.functional import dispatch
from mambalrp.functional.scan_core import acc

DEFAULT_CHUNK = 64


def check_shapes(x, dt, A, trap, B, C, D) -> None:
    """Raise ``ValueError`` naming the first argument whose shape does not fit the layout."""
    if x.dim() not in (4, 5):
        raise ValueError(f"x must be (batch, T, heads, head_dim) or (batch, T, rank, heads, head_dim); got {tuple(x.shape)}")
    b, T = x.shape[:2]
    h = x.shape[-2]
    for name, t in (("dt", dt), ("A", A), ("trap", trap)):
        if tuple(t.shape) != (b, T, h):
            raise ValueError(f"{name} must be (batch, T, heads) = {(b, T, h)}; got {tuple(t.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.dim() != x.dim() or t.shape[:-2] != x.shape[:-2] or h % t.shape[-2]:
            lead = "(batch, T, groups, d_state)" if x.dim() == 4 else "(batch, T, rank, groups, d_state)"
            raise ValueError(f"{name} must be {lead} like x, with heads % groups == 0; got {tuple(t.shape)}")
    if B.shape[-1] != C.shape[-1]:
        raise ValueError(f"B and C must have the same d_state; got {B.shape[-1]} and {C.shape[-1]}")
    if D is not None and D.shape not in ((h,), (h, x.shape[-1])):
        raise ValueError(f"D must be (heads,) or (heads, head_dim); got {tuple(D.shape)}")


def _ranked(t: torch.Tensor | None, mimo: bool) -> torch.Tensor | None:
    return t if t is None or mimo else t.unsqueeze(2)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    groups = t.shape[-2]
    return t if groups == heads else t.repeat_interleave(heads // groups, dim=-2)


def token_weights(dt: torch.Tensor, trap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of a token's input ``(b, T, h)``: in its own output (``trap_t * dt_t``) and in
    every later state (``trap_t * dt_t + (1 - trap_{t+1}) * dt_{t+1}``, the second term 0 at the
    end of the sequence)."""
    current = dt * trap
    previous = dt * (1 - trap)  # the weight of token t - 1 entering at step t
    later = current + torch.cat([previous[:, 1:], torch.zeros_like(previous[:, :1])], dim=1)
    return current, later


def _skip(D: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor | None:
    if D is None:
        return None
    return (D[:, None] if D.dim() == 1 else D) * v


def _chunk_length(rank: int) -> int:
    """Steps per chunk: ``DEFAULT_CHUNK / R`` (at least 16), so a chunk's ``(L R, L R)`` score
    matrix per head stays the size of the SISO one."""
    return max(16, DEFAULT_CHUNK // max(1, rank))


def _chunk_scores(la_step, current, later, B, C):
    """Cumulative log decay ``(b, h, L)`` and the output scores ``(b, h, L R, L R)`` of a chunk.

    Head-major layout: ``la_step, current, later: (b, h, L)``, ``B, C: (b, h, L, R, n)``."""
    la = torch.cumsum(la_step, dim=-1)
    b, h, L, R, n = B.shape
    seg = la[..., :, None] - la[..., None, :]
    strict = torch.ones(L, L, dtype=torch.bool, device=la.device).tril(-1)
    weight = torch.exp(seg.masked_fill(~strict, float("-inf"))) * later[..., None, :]
    weight = weight + torch.diag_embed(current)
    weight = weight[:, :, :, None, :, None].expand(b, h, L, R, L, R).reshape(b, h, L * R, L * R)
    scores = torch.matmul(C.reshape(b, h, L * R, n), B.reshape(b, h, L * R, n).transpose(-1, -2)) * weight
    return la, scores


def _chunk(x, la_step, current, later, B, C, h0):
    """One chunk, differentiable, head-major (``x: (b, h, L, R, p)``, state ``(b, h, n, p)``).
    Returns ``(y (b, h, L, R, p), h_last)``."""
    la, scores = _chunk_scores(la_step, current, later, B, C)
    b, h, L, R, p = x.shape
    n = B.shape[-1]
    xf = x.reshape(b, h, L * R, p)
    y = torch.matmul(scores, xf)
    to_end = torch.exp(la[..., -1:] - la) * later
    Bw = (B * to_end[..., None, None]).reshape(b, h, L * R, n)
    h_last = torch.matmul(Bw.transpose(-1, -2), xf)
    if h0 is not None:
        decay = torch.exp(la)[..., None, None].expand(b, h, L, R, 1).reshape(b, h, L * R, 1)
        y = y + torch.matmul(C.reshape(b, h, L * R, n), h0) * decay
        h_last = h_last + torch.exp(la[..., -1])[..., None, None] * h0
    return y.reshape(b, h, L, R, p), h_last


def _prepare(x, dt, A, trap, B, C):
    """Head-major views: ``x (b, h, T, R, p)``, ``B, C (b, h, T, R, n)`` per head, the log decays
    and token weights ``(b, h, T)``."""
    mimo = x.dim() == 5
    heads = x.shape[-2]
    current, later = token_weights(dt, trap)
    B, C = _heads(_ranked(B, mimo), heads), _heads(_ranked(C, mimo), heads)

    def major(t):
        return t.permute(0, 3, 1, 2, 4).contiguous()

    def per_head(t):
        return t.transpose(1, 2).contiguous()

    return mimo, major(_ranked(x, mimo)), per_head(dt * A), per_head(current), per_head(later), major(B), major(C)


def _back(y: torch.Tensor, mimo: bool) -> torch.Tensor:
    """``(b, h, T, R, p)`` back to the caller's layout."""
    y = y.permute(0, 2, 3, 1, 4)
    return y if mimo else y.squeeze(2)


def mamba3_scan_fwd_torch(x, dt, A, trap, B, C, D, chunk: int | None = None) -> torch.Tensor:
    """Chunked forward without autograd on accumulation-dtype tensors. Returns ``y`` like ``x``."""
    mimo, xr, la_step, current, later, B, C = _prepare(x, dt, A, trap, B, C)
    chunk = chunk or _chunk_length(xr.shape[3])
    y = torch.empty_like(xr)
    h = None
    for t0 in range(0, xr.shape[2], chunk):
        sl = slice(t0, t0 + chunk)
        y[:, :, sl], h = _chunk(xr[:, :, sl], la_step[..., sl], current[..., sl], later[..., sl], B[:, :, sl], C[:, :, sl], h)
    y = _back(y, mimo)
    skip = _skip(D, x)
    return y if skip is None else y + skip


def mamba3_scan_lrp_bwd_torch(g, dt, A, trap, B, C, D, chunk: int | None = None) -> torch.Tensor:
    """Adjoint scan of the rule on accumulation-dtype tensors. Returns ``dx`` like ``g``."""
    mimo, gr, la_step, current, later, B, C = _prepare(g, dt, A, trap, B, C)
    b, h, T, R, p = gr.shape
    n = B.shape[-1]
    chunk = chunk or _chunk_length(R)
    dx = torch.empty_like(gr)
    gh = None  # gradient of the state carried out of the current chunk, from later chunks
    for t0 in reversed(range(0, T, chunk)):
        sl = slice(t0, t0 + chunk)
        g_c, B_c, C_c = gr[:, :, sl], B[:, :, sl], C[:, :, sl]
        L = g_c.shape[2]
        la, scores = _chunk_scores(la_step[..., sl], current[..., sl], later[..., sl], B_c, C_c)
        gf = g_c.reshape(b, h, L * R, p)
        dx_c = torch.matmul(scores.transpose(-1, -2), gf)
        if gh is not None:
            to_end = torch.exp(la[..., -1:] - la) * later[..., sl]
            dx_c = dx_c + torch.matmul((B_c * to_end[..., None, None]).reshape(b, h, L * R, n), gh)
        dx[:, :, sl] = dx_c.reshape(b, h, L, R, p)
        decay = torch.exp(la)[..., None, None].expand(b, h, L, R, 1).reshape(b, h, L * R, 1)
        gh_new = torch.matmul(C_c.reshape(b, h, L * R, n).transpose(-1, -2), gf * decay)
        gh = gh_new if gh is None else gh_new + torch.exp(la[..., -1])[..., None, None] * gh
    dx = _back(dx, mimo)
    skip = _skip(D, g)
    return dx if skip is None else dx + skip


def _implementations(x: torch.Tensor):
    if x.dtype == torch.float32 and dispatch.resolve(x, "mamba3_scan") == "triton":
        kernels = dispatch.triton_kernels()
        return kernels.mamba3_scan_fwd, kernels.mamba3_scan_lrp_bwd
    return mamba3_scan_fwd_torch, mamba3_scan_lrp_bwd_torch


class Mamba3ScanLRPFn(torch.autograd.Function):
    """Forward: the Mamba-3 scan. Backward: the SSM rule (``dx`` only, by the adjoint scan)."""

    @staticmethod
    def forward(ctx, x, dt, A, trap, B, C, D):
        coefficients = [acc(t) for t in (dt, A, trap, B, C, D)]
        fwd, _ = _implementations(acc(x))
        ctx.save_for_backward(*[t for t in coefficients if t is not None])
        ctx.has_d = D is not None
        ctx.x_dtype = x.dtype
        return fwd(acc(x), *coefficients)

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        D = saved.pop() if ctx.has_d else None
        dt, A, trap, B, C = saved
        g = acc(grad_out).contiguous()
        _, bwd = _implementations(g)
        dx = bwd(g, dt, A, trap, B, C, D)
        return dx.to(ctx.x_dtype), None, None, None, None, None, None


def mamba3_scan_lrp(x, dt, A, trap, B, C, D=None) -> torch.Tensor:
    """Mamba-3 scan whose backward is the MambaLRP SSM rule.

    Args:
        x: The value ``(b, T, h, p)``, or ``(b, T, R, h, p)`` for MIMO rank ``R`` (already scaled
            per rank, as mamba_ssm's ``mimo_x`` does).
        dt: Step size after softplus (and after any bias) ``(b, T, h)``.
        A: Per-token decay rate, negative, ``(b, T, h)``: the decay of step ``t`` is
            ``exp(dt_t * A_t)``. (mamba_ssm: ``-softplus(dd_A)`` capped at ``-A_floor``.)
        trap: Trapezoid mixing factor in ``[0, 1]`` after the sigmoid ``(b, T, h)``: weight of the
            current token's input; ``1 - trap_t`` weighs the previous token's input at step ``t``.
        B: Input matrix ``(b, T, g, n)`` / ``(b, T, R, g, n)``, already normed, biased and rotated.
        C: Output matrix, same layout and preparation as ``B``.
        D: Skip ``(h,)``, ``(h, p)`` or ``None``; added inside (``y += D * x``, per rank).

    Returns:
        ``y`` shaped like ``x``, in float32 (float64 for float64 inputs). Only ``x`` receives a
        gradient.
    """
    check_shapes(x, dt, A, trap, B, C, D)
    return Mamba3ScanLRPFn.apply(x, dt, A, trap, B, C, D)


def mamba3_scan_grad(x, dt, A, trap, B, C, D=None, chunk: int | None = None) -> torch.Tensor:
    """Mamba-3 scan with its true gradient in every argument; each chunk checkpointed.

    Arguments as in :func:`mamba3_scan_lrp`.
    """
    check_shapes(x, dt, A, trap, B, C, D)
    x, dt, A, trap, B, C, D = (acc(t) for t in (x, dt, A, trap, B, C, D))
    mimo, xr, la_step, current, later, B, C = _prepare(x, dt, A, trap, B, C)
    chunk = chunk or _chunk_length(xr.shape[3])
    outs, h = [], None
    for t0 in range(0, xr.shape[2], chunk):
        sl = slice(t0, t0 + chunk)
        y, h = checkpoint(
            _chunk, xr[:, :, sl], la_step[..., sl], current[..., sl], later[..., sl], B[:, :, sl], C[:, :, sl], h,
            use_reentrant=False,
        )
        outs.append(y)
    y = _back(torch.cat(outs, dim=2), mimo)
    skip = _skip(D, x)
    return y if skip is None else y + skip


def mamba3_scan(x, dt, A, trap, B, C, D=None, rule: Literal["lrp", "gradient"] = "lrp") -> torch.Tensor:
    """The Mamba-3 scan with the SSM rule (``"lrp"``) or its true gradient (``"gradient"``).

    The public per-token-decay scan primitive. Arguments as in :func:`mamba3_scan_lrp`: ``dt``
    is given after softplus, ``A`` per token and negative, ``trap`` after the sigmoid, ``B`` and
    ``C`` prepared (normed, biased, rotated), and ``D`` is added inside.
    """
    if rule == "lrp":
        return mamba3_scan_lrp(x, dt, A, trap, B, C, D)
    if rule == "gradient":
        return mamba3_scan_grad(x, dt, A, trap, B, C, D)
    raise ValueError(f"unknown SSM rule {rule!r}; expected 'lrp' or 'gradient'")


def mamba3_scan_ref(x, dt, A, trap, B, C, D=None, detach: bool = True) -> torch.Tensor:
    """Sequential reference, a Python loop over time written from the recurrence in the module
    docstring (coefficients detached if ``detach``). Arguments as in :func:`mamba3_scan_lrp`."""
    x, dt, A, trap, B, C = (acc(t) for t in (x, dt, A, trap, B, C))
    if detach:
        dt, A, trap, B, C = dt.detach(), A.detach(), trap.detach(), B.detach(), C.detach()
    mimo = x.dim() == 5
    heads = x.shape[-2]
    xr, B, C = _ranked(x, mimo), _heads(_ranked(B, mimo), heads), _heads(_ranked(C, mimo), heads)
    b, T, _, h, p = xr.shape
    state = xr.new_zeros(b, h, p, B.shape[-1])
    previous = torch.zeros_like(state)
    ys = []
    for t in range(T):
        alpha = torch.exp(dt[:, t] * A[:, t])[:, :, None, None]
        current = torch.einsum("brhp,brhn->bhpn", xr[:, t], B[:, t])
        lam, step = trap[:, t][:, :, None, None], dt[:, t][:, :, None, None]
        state = alpha * state + (1 - lam) * step * alpha * previous + lam * step * current
        ys.append(torch.einsum("bhpn,brhn->brhp", state, C[:, t]))
        previous = current
    y = torch.stack(ys, dim=1)
    y = y if mimo else y.squeeze(2)
    skip = _skip(acc(D), x)
    return y if skip is None else y + skip

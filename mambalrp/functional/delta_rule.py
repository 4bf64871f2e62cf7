"""Gated delta rule (Gated DeltaNet; KDA with per-channel decays) and its MambaLRP rule.

Forward, per value head with a ``(d_k, d_v)`` state ``S``::

    S_t = (I - beta_t k_t k_t^T) diag(a_t) S_{t-1} + beta_t k_t v_t^T        o_t = S_t^T q_t

with ``a_t = exp(g_t)``: one decay per head and step (Gated DeltaNet: Qwen3-Next, Qwen3.5,
OLMo-hybrid) or one per key channel (KDA: Kimi Linear). With ``a``, ``beta``, ``k`` and ``q``
held constant the map ``v -> o`` is linear, so the rule of the SSM carries over: only ``v``
receives a gradient, and it is the transpose map, a reverse recurrence::

    P_t = diag(a_{t+1}) (I - beta_{t+1} k_{t+1} k_{t+1}^T) P_{t+1} + q_t g_t^T     dv_t = beta_t P_t^T k_t

Both directions run in the chunked (WY / UT-transform) form. Inside a chunk of ``L`` steps with
``G`` the cumulative log decay, the delta-rule updates are written as pseudo-values
``u = (I + A)^{-1} (beta v - beta (k e^G) S_0)`` with ``A_ij = beta_i sum_d k_id k_jd e^{G_id - G_jd}``
(``i > j``), so that ``o = (q e^G) S_0 + (Q K^T decayed, causal) u`` and the state moves on as
``S_L = e^{G_L} S_0 + (k e^{G_L - G})^T u``. The adjoint walks the chunks from the end, carrying
the gradient of the state instead of the state, and applies ``(I + A)^{-T}`` (the inverse comes
from one triangular solve per chunk). Memory is ``O(batch * T * heads * (d_k + d_v + L))`` plus one chunk's work.

Layout (as in transformers and fla): ``q, k: (b, T, h_k, d_k)``, ``v: (b, T, h, d_v)`` with ``h``
a multiple of ``h_k`` (value head ``i`` reads key head ``i // (h / h_k)``), ``g: (b, T, h)`` or
``(b, T, h, d_k)`` log decays (``<= 0``), ``beta: (b, T, h)``. ``q`` is used as given: L2
normalisation and the ``d_k ** -0.5`` scale are the caller's. Computation in float32 (float64 kept);
output ``(b, T, h, d_v)``.
"""

from __future__ import annotations

from typing import Literal

import torch

from mambalrp.functional import dispatch
from mambalrp.functional.scan_core import acc

DEFAULT_CHUNK = 64
# Per-channel decays need an (L, L, d_k) tensor per chunk: shorter chunks bound it.
PER_CHANNEL_CHUNK = 16
# The LRP function keeps the forward's chunk quantities for the backward up to this size per call.
KEEP_CHUNKS_BYTES = 64 << 20


def check_shapes(q, k, v, g, beta) -> None:
    """Raise ``ValueError`` naming the first argument whose shape does not fit the layout."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (batch, T, key_heads, d_k); got {tuple(q.shape)} and {tuple(k.shape)}")
    b, T, hk, dk = q.shape
    if v.dim() != 4 or v.shape[:2] != (b, T) or v.shape[2] % hk:
        raise ValueError(f"v must be (batch, T, heads, d_v) with heads a multiple of {hk}; got {tuple(v.shape)}")
    h = v.shape[2]
    if tuple(beta.shape) != (b, T, h):
        raise ValueError(f"beta must be (batch, T, heads) = {(b, T, h)}; got {tuple(beta.shape)}")
    if tuple(g.shape) not in ((b, T, h), (b, T, h, dk)):
        raise ValueError(f"g must be (batch, T, heads) = {(b, T, h)} or (batch, T, heads, d_k); got {tuple(g.shape)}")


def _heads_first(t: torch.Tensor, heads: int | None = None) -> torch.Tensor:
    """``(b, T, h', ...)`` -> ``(b, h, T, ...)`` with key heads repeated up to ``heads``."""
    if heads is not None and t.shape[2] != heads:
        t = t.repeat_interleave(heads // t.shape[2], dim=2)
    return t.transpose(1, 2)


def _chunked(t: torch.Tensor, L: int) -> torch.Tensor:
    """``(b, h, T, ...)`` -> ``(b, h, n, L, ...)``, zero-padded at the end of time."""
    T = t.shape[2]
    pad = (-T) % L
    if pad:
        shape = list(t.shape)
        shape[2] = pad
        t = torch.cat([t, t.new_zeros(shape)], dim=2)
    return t.reshape(*t.shape[:2], -1, L, *t.shape[3:])


class _Chunks:
    """What both directions need of each chunk, computed in bulk (all chunks at once).

    Attributes (shapes ``(b, h, n, L, ...)``): ``inv`` the inverse of the unit lower-triangular
    ``I + A``; ``qk`` the decayed causal ``Q K^T``; ``kend = k e^{G_L - G}``; with
    ``W = (I + A)^{-1} beta k e^G``: ``q_state = q e^G - (Q K^T) W`` (how each output reads the
    chunk's start state) and ``kw = kend^T W`` (``(b, h, n, d_k, d_k)``, how the start state is
    overwritten by the end); ``gend = e^{G_L}`` (``(b, h, n)`` or ``(b, h, n, d_k)``); ``beta``.
    """

    def __init__(self, q, k, g, beta, L: int):
        q, k, g, beta = (_chunked(t, L) for t in (q, k, g, beta))
        per_channel = g.dim() == 5
        G = g.cumsum(dim=3)
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        if per_channel:
            # e^{G_id - G_jd} for i >= j (<= 1: decays are <= 0), 0 above the diagonal.
            seg = (G.unsqueeze(4) - G.unsqueeze(3)).masked_fill(~causal[:, :, None], float("-inf")).exp()
            kk = torch.einsum("bhnid,bhnjd,bhnijd->bhnij", k, k, seg)
            qk = torch.einsum("bhnid,bhnjd,bhnijd->bhnij", q, k, seg)
            eG = G.exp()
            self.gend = eG[:, :, :, -1]
            self.kend = k * (G[:, :, :, -1:] - G).exp()
        else:
            seg = (G.unsqueeze(4) - G.unsqueeze(3)).masked_fill(~causal, float("-inf")).exp()
            kk = (k @ k.transpose(-1, -2)) * seg
            qk = (q @ k.transpose(-1, -2)) * seg
            eG = G.exp().unsqueeze(-1)
            self.gend = eG[:, :, :, -1, 0]
            self.kend = k * (G[:, :, :, -1:] - G).exp().unsqueeze(-1)
        strict = torch.ones(L, L, dtype=torch.bool, device=q.device).tril(-1)
        eye = torch.eye(L, dtype=q.dtype, device=q.device)
        tri = (kk * beta.unsqueeze(-1)).masked_fill(~strict, 0.0) + eye
        # (I + A)^{-1} once per chunk (one triangular solve against the identity); the pseudo-values
        # and their adjoint are then batched matmuls.
        self.inv = torch.linalg.solve_triangular(tri, eye.expand_as(tri), upper=False, unitriangular=True)
        w = self.inv @ (k * eG * beta.unsqueeze(-1))
        self.qk = qk
        self.q_state = q * eG - qk @ w
        self.kw = self.kend.transpose(-1, -2) @ w
        self.beta = beta
        self.per_channel = per_channel
        self.length = L

    def nbytes(self) -> int:
        """Memory held by the quantities."""
        tensors = (self.inv, self.qk, self.q_state, self.kw, self.kend, self.gend, self.beta)
        return sum(t.numel() * t.element_size() for t in tensors)

    def decay_state(self, S: torch.Tensor, c: int) -> torch.Tensor:
        """``diag(e^{G_L}) S`` of chunk ``c`` for states ``(b, h, d_k, d_v)``."""
        gend = self.gend[:, :, c]
        return S * (gend.unsqueeze(-1) if self.per_channel else gend[:, :, None, None])


def chunk_quantities(q, k, g, beta, heads: int, chunk: int | None = None) -> _Chunks:
    """The chunk quantities of both directions, for inputs in the module's layout."""
    L = chunk if chunk is not None else PER_CHANNEL_CHUNK if g.dim() == 4 else DEFAULT_CHUNK
    return _Chunks(*(_heads_first(t, heads) for t in (q, k, g, beta)), L)


def gated_delta_rule_fwd_torch(q, k, v, g, beta, chunk: int | None = None, chunks: _Chunks | None = None) -> torch.Tensor:
    """Chunked forward; differentiable in every input (no in-place writes). Returns ``o`` ``(b, T, h, d_v)``.

    Only the states at the chunk starts are sequential (``S <- e^{G_L} S + K^T U - (K^T W) S``, one
    ``(d_k, d_k) @ (d_k, d_v)`` product per chunk); the outputs ``Q K^T U + (q e^G - Q K^T W) S``
    are computed for all chunks at once. ``chunks``: the chunk quantities, if already computed.
    """
    h, T = v.shape[2], v.shape[1]
    ch = chunk_quantities(q, k, g, beta, h, chunk) if chunks is None else chunks
    L = ch.length
    v = _heads_first(v)
    U = ch.inv @ (_chunked(v, L) * ch.beta.unsqueeze(-1))
    written = ch.kend.transpose(-1, -2) @ U  # (b, h, n, d_k, d_v): what each chunk adds to the state
    S = v.new_zeros(v.shape[0], h, ch.kw.shape[-1], v.shape[-1])
    starts = []
    for c in range(U.shape[2]):
        starts.append(S)
        S = ch.decay_state(S, c) + written[:, :, c] - ch.kw[:, :, c] @ S
    o = ch.qk @ U + ch.q_state @ torch.stack(starts, dim=2)
    return o.reshape(v.shape[0], h, -1, v.shape[-1])[:, :, :T].transpose(1, 2)


def gated_delta_rule_lrp_bwd_torch(
    grad_o, q, k, g, beta, chunk: int | None = None, chunks: _Chunks | None = None
) -> torch.Tensor:
    """Adjoint of the map ``v -> o`` with ``q, k, g, beta`` held constant. Returns ``dv`` ``(b, T, h, d_v)``.

    The gradients of the states at the chunk ends are the sequential part
    (``P <- (q e^G - Q K^T W)^T dO + e^{G_L} P - (K^T W)^T P``, walking back); the gradients of the
    pseudo-values and of the values are then computed for all chunks at once. ``chunks``: the chunk
    quantities, if kept from the forward.
    """
    h, T, dv_width = grad_o.shape[2], grad_o.shape[1], grad_o.shape[-1]
    ch = chunk_quantities(q, k, g, beta, h, chunk) if chunks is None else chunks
    grad_o = _heads_first(grad_o)
    dO = _chunked(grad_o, ch.length)
    read = ch.q_state.transpose(-1, -2) @ dO  # (b, h, n, d_k, d_v): each chunk's read of its start state
    dS = grad_o.new_zeros(grad_o.shape[0], h, ch.kw.shape[-1], dv_width)
    ends = [dS] * dO.shape[2]
    for c in reversed(range(1, dO.shape[2])):
        dS = read[:, :, c] + ch.decay_state(dS, c) - ch.kw[:, :, c].transpose(-1, -2) @ dS
        ends[c - 1] = dS
    du = ch.qk.transpose(-1, -2) @ dO + ch.kend @ torch.stack(ends, dim=2)
    dv = (ch.inv.transpose(-1, -2) @ du) * ch.beta.unsqueeze(-1)
    return dv.reshape(grad_o.shape[0], h, -1, dv_width)[:, :, :T].transpose(1, 2)


def _implementations(v: torch.Tensor):
    if dispatch.resolve(v, "gated_delta_rule") == "triton":
        kernels = dispatch.triton_kernels()
        return kernels.gated_delta_rule_fwd, kernels.gated_delta_rule_lrp_bwd
    return gated_delta_rule_fwd_torch, gated_delta_rule_lrp_bwd_torch


class GatedDeltaRuleFn(torch.autograd.Function):
    """Forward: the gated delta rule. Backward: only ``v`` gets a gradient, by the adjoint
    (reverse) recurrence with ``q``, ``k``, the decays and ``beta`` held constant.

    On the torch path the chunk quantities (the inverted triangular systems, ``Q K^T``, ...) are
    kept from the forward for the backward when they take at most :data:`KEEP_CHUNKS_BYTES`;
    longer inputs recompute them, so memory stays that of the coefficients."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta):
        fwd, _ = _implementations(v)
        coefficients = [acc(t).contiguous() for t in (q, k, g, beta)]
        ctx.save_for_backward(*coefficients)
        ctx.v_dtype = v.dtype
        ctx.chunks = None
        q32, k32, g32, b32 = coefficients
        if fwd is not gated_delta_rule_fwd_torch:
            return fwd(q32, k32, acc(v), g32, b32)
        chunks = chunk_quantities(q32, k32, g32, b32, v.shape[2])
        if chunks.nbytes() <= KEEP_CHUNKS_BYTES:
            ctx.chunks = chunks
        return fwd(q32, k32, acc(v), g32, b32, chunks=chunks)

    @staticmethod
    def backward(ctx, grad_o):
        q, k, g, beta = ctx.saved_tensors
        _, bwd = _implementations(grad_o)
        if bwd is gated_delta_rule_lrp_bwd_torch:
            dv = bwd(acc(grad_o).contiguous(), q, k, g, beta, chunks=ctx.chunks)
        else:
            dv = bwd(acc(grad_o).contiguous(), q, k, g, beta)
        ctx.chunks = None
        return None, None, dv.to(ctx.v_dtype), None, None


def gated_delta_rule_lrp(q, k, v, g, beta) -> torch.Tensor:
    """Gated delta rule whose backward is the MambaLRP rule (values only).

    Args:
        q: Queries ``(b, T, h_k, d_k)`` (normalised and scaled by the caller).
        k: Keys ``(b, T, h_k, d_k)``.
        v: Values ``(b, T, h, d_v)``, ``h`` a multiple of ``h_k``.
        g: Log decays ``(b, T, h)`` (one per head) or ``(b, T, h, d_k)`` (per key channel).
        beta: Write strengths ``(b, T, h)``.

    Returns:
        ``o`` ``(b, T, h, d_v)`` in float32 (float64 kept). Only ``v`` receives a gradient.
    """
    check_shapes(q, k, v, g, beta)
    return GatedDeltaRuleFn.apply(q, k, v, g, beta)


def gated_delta_rule_grad(q, k, v, g, beta) -> torch.Tensor:
    """Gated delta rule with its true gradient in every input (chunked, differentiable)."""
    check_shapes(q, k, v, g, beta)
    return gated_delta_rule_fwd_torch(*(acc(t) for t in (q, k, v, g, beta)))


def gated_delta_rule(q, k, v, g, beta, rule: Literal["lrp", "gradient"] = "lrp") -> torch.Tensor:
    """Gated delta rule with the MambaLRP rule (``"lrp"``) or its true gradient (``"gradient"``)."""
    if rule == "lrp":
        return gated_delta_rule_lrp(q, k, v, g, beta)
    if rule == "gradient":
        return gated_delta_rule_grad(q, k, v, g, beta)
    raise ValueError(f"unknown delta-rule rule {rule!r}; expected 'lrp' or 'gradient'")


def gated_delta_rule_ref(q, k, v, g, beta, detach: bool = True) -> torch.Tensor:
    """Sequential reference from the equations, one step per loop iteration (coefficients
    detached if ``detach``, so autograd's gradient of ``v`` is the rule's)."""
    check_shapes(q, k, v, g, beta)
    h = v.shape[2]
    q, k, v, g, beta = (_heads_first(acc(t), h) for t in (q, k, v, g, beta))
    if detach:
        q, k, g, beta = q.detach(), k.detach(), g.detach(), beta.detach()
    b, _, T, dv = v.shape
    S = v.new_zeros(b, h, q.shape[-1], dv)
    eye = torch.eye(q.shape[-1], dtype=v.dtype, device=v.device)
    outs = []
    for t in range(T):
        a = g[:, :, t].exp()
        decay = torch.diag_embed(a) if g.dim() == 4 else a[:, :, None, None] * eye
        kt, bt = k[:, :, t], beta[:, :, t, None, None]
        project = eye - bt * kt.unsqueeze(-1) * kt.unsqueeze(-2)
        S = project @ decay @ S + bt * kt.unsqueeze(-1) * v[:, :, t].unsqueeze(-2)
        outs.append((S * q[:, :, t].unsqueeze(-1)).sum(-2))
    return torch.stack(outs, dim=2).transpose(1, 2)

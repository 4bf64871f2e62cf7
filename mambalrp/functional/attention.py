"""Attention operators for hybrid models: the AttnLRP rules (Achtibat et al., ICML 2024).

Attention ``o = softmax(q k^T * scale + mask) v`` has three non-linear parts:

* the two matrix products ``q @ k^T`` and ``p @ v`` are bilinear: the **uniform rule** gives each
  factor half of the product's relevance (:class:`UniformMatmulFn`, the matrix analogue of the
  half rule of the Mamba gate);
* the softmax ``p = softmax(s)``: AttnLRP linearises it at ``s`` and keeps the part of the
  Taylor expansion that is proportional to the input, ``R_s_i = s_i (R_p_i - p_i * sum_j R_p_j)``
  (with ``R_p_j = p_j g_j`` in gradient form). Dividing by ``s_i`` gives the gradient that realises
  it: ``ds_i = p_i (g_i - sum_j p_j g_j)``, which is exactly the softmax's own vector-Jacobian
  product, so :class:`SoftmaxLRPFn` returns the true softmax gradient (written out explicitly,
  with masked entries handled, so that coverage checks recognise it as a rule). The constant term
  of the linearisation is dropped: **the softmax does not conserve relevance**; what it loses (or
  creates) is ``sum_i R_p_i - sum_i R_s_i``. AttnLRP accepts this; it is measured and reported.

An exactly conserving alternative is **CP-LRP** (Ali et al., ICML 2022): the attention weights
``p`` are held constant, so all relevance flows through the values (``rule="cp"``).

Layouts follow transformers' eager attention: ``q: (b, h, Tq, d)``, ``k, v: (b, h_kv, Tk, d)``
(grouped-query heads are repeated), ``mask``: ``None``, a boolean mask (``True`` = attend) or an
additive float mask broadcastable to ``(b, h, Tq, Tk)``.
"""

from __future__ import annotations

from typing import Literal

import torch

AttentionRule = Literal["attnlrp", "cp", "gradient"]


class UniformMatmulFn(torch.autograd.Function):
    """Forward: ``a @ b``. Backward: ``da = g @ b^T / 2``, ``db = a^T @ g / 2``."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        a, b = ctx.saved_tensors
        da = 0.5 * (grad_out @ b.transpose(-1, -2)) if ctx.needs_input_grad[0] else None
        db = 0.5 * (a.transpose(-1, -2) @ grad_out) if ctx.needs_input_grad[1] else None
        return da, db


def uniform_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Matrix product whose relevance is split equally between the two factors (uniform rule).

    Args:
        a: ``(..., n, k)``.
        b: ``(..., k, m)`` with the same batch dimensions.

    Returns:
        ``a @ b``, bit-identical to the plain product.
    """
    return UniformMatmulFn.apply(a, b)


def uniform_matmul_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`uniform_matmul`: ``0.5 * (a @ b.detach()) + 0.5 * (a.detach() @ b)``."""
    return 0.5 * (a @ b.detach()) + 0.5 * (a.detach() @ b)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (as transformers' eager softmax), float64 kept."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _masked(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        # The most negative finite value, as transformers' eager masks: a fully masked row (a
        # padded query) then gets uniform weights instead of NaNs that would reach real tokens.
        return scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores + mask[..., : scores.shape[-1]]


class SoftmaxLRPFn(torch.autograd.Function):
    """Forward: ``softmax(s + mask)`` in (at least) float32. Backward: the AttnLRP softmax rule in gradient
    form, ``ds = p * (g - sum(p * g))`` (zero at masked entries)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, mask: torch.Tensor | None):
        p = torch.softmax(_masked(_wide(scores), mask), dim=-1)
        ctx.save_for_backward(p)
        ctx.dtype = scores.dtype
        return p.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (p,) = ctx.saved_tensors
        g = grad_out.to(p.dtype)
        ds = p * (g - (p * g).sum(-1, keepdim=True))
        return ds.to(ctx.dtype), None


def softmax_lrp(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last dimension with the AttnLRP softmax rule.

    Args:
        scores: Attention scores (already scaled), e.g. ``(b, h, Tq, Tk)``.
        mask: ``None``, boolean (``True`` = keep) or additive float mask.

    Returns:
        ``softmax(scores + mask)`` in ``scores.dtype``, computed in float32.
    """
    return SoftmaxLRPFn.apply(scores, mask)


def softmax_lrp_ref(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of :func:`softmax_lrp` (the rule's gradient is the softmax's own)."""
    return torch.softmax(_masked(_wide(scores), mask), dim=-1).to(scores.dtype)


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean ``(q_len, k_len)`` mask, ``True`` where query ``i`` may attend key ``j``."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Repeat ``(b, h_kv, T, d)`` key/value heads ``groups`` times to ``(b, h_kv * groups, T, d)``."""
    if groups == 1:
        return t
    b, h, T, d = t.shape
    return t[:, :, None].expand(b, h, groups, T, d).reshape(b, h * groups, T, d)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    *,
    is_causal: bool = False,
    rule: AttentionRule = "attnlrp",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention with a choice of relevance rule.

    Args:
        query: ``(b, h, Tq, d)``.
        key: ``(b, h_kv, Tk, d)``; heads are repeated to ``h``.
        value: ``(b, h_kv, Tk, d)``.
        mask: ``None``, boolean (``True`` = attend) or additive float mask.
        scaling: Factor applied to ``q @ k^T``.
        is_causal: Apply a causal mask when ``mask`` is ``None`` and ``Tq > 1``.
        rule: ``"attnlrp"`` (uniform rule on both products, softmax rule), ``"cp"`` (attention
            weights constant: exact conservation through the values) or ``"gradient"``.

    Returns:
        ``(output (b, h, Tq, d), weights (b, h, Tq, Tk))``.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if mask is None and is_causal and query.shape[-2] > 1:
        mask = causal_mask(query.shape[-2], key.shape[-2], query.device)
    if rule == "gradient":
        scores = (query @ key.transpose(-1, -2)) * scaling
        weights = torch.softmax(_masked(_wide(scores), mask), dim=-1).to(query.dtype)
        return weights @ value, weights
    if rule == "cp":
        with torch.no_grad():
            scores = (query @ key.transpose(-1, -2)) * scaling
            weights = torch.softmax(_masked(_wide(scores), mask), dim=-1).to(query.dtype)
        return weights @ value, weights
    if rule != "attnlrp":
        raise ValueError(f"unknown attention rule {rule!r}; expected 'attnlrp', 'cp' or 'gradient'")
    scores = uniform_matmul(query, key.transpose(-1, -2)) * scaling
    weights = softmax_lrp(scores, mask)
    return uniform_matmul(weights, value), weights

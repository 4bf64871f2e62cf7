"""Mamba-2 SSD scan (scalar decay per head) and its MambaLRP rule.

Forward, per head ``h`` with state ``(p, n)``::

    H_t = exp(dt_t * A_h) * H_{t-1} + (dt_t * x_t) outer B_t      y_t = H_t C_t + D_h * x_t

As for Mamba-1, the rule holds ``dt``, the decays, ``B`` and ``C`` constant and returns only
``dx`` through the adjoint (reverse) scan. Both directions use the chunked (SSD) form: inside a
chunk of ``L`` steps the decays form an ``(L, L)`` lower-triangular matrix per head; between
chunks one ``(p, n)`` state per head is carried.

Layout (as in mamba_ssm and HF): ``x: (b, T, h, p)``, ``dt: (b, T, h)`` after softplus and
clamping, ``A: (h,)``, ``B, C: (b, T, g, n)`` with ``h`` a multiple of ``g``, ``D: (h,)`` or
``(h, p)``. Computation in float32; output ``(b, T, h, p)`` float32.
"""

from __future__ import annotations

from typing import Literal

import torch

from mambalrp.functional.scan_fn import scan_grad_function, scan_lrp_function
from mambalrp.functional import scan_core
from mambalrp.functional.scan_core import acc

DEFAULT_CHUNK = 32
# Elements of one span's (steps, heads * head_dim) working tensors (see _span_length).
SPAN_ELEMENTS = 1 << 22
# Largest decay of one chunk, -log(exp(la_end)), for which the decays are factored per step.
FACTOR_RANGE = 40.0


def check_shapes(x, dt, A, B, C, D) -> None:
    """Raise ``ValueError`` naming the first argument whose shape does not fit the layout."""
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, T, heads, head_dim); got {tuple(x.shape)}")
    b, T, h, _ = x.shape
    if tuple(dt.shape) != (b, T, h):
        raise ValueError(f"dt must be (batch, T, heads) = {(b, T, h)}; got {tuple(dt.shape)}")
    if tuple(A.shape) != (h,):
        raise ValueError(f"A must be (heads,) = ({h},); got {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 4 or t.shape[:2] != (b, T) or h % t.shape[2]:
            raise ValueError(f"{name} must be (batch, T, groups, d_state) with heads % groups == 0; got {tuple(t.shape)}")
    if D is not None and D.shape not in ((h,), (h, x.shape[-1])):
        raise ValueError(f"D must be (heads,) or (heads, head_dim); got {tuple(D.shape)}")


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    groups = t.shape[2]
    return t if groups == heads else t.repeat_interleave(heads // groups, dim=2)


def _skip(D: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor | None:
    if D is None:
        return None
    return (D[:, None] if D.dim() == 1 else D) * v


def _add_skip(out: torch.Tensor, D: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    """``out += D * v`` in place (nothing if ``D`` is ``None``); returns ``out``."""
    if D is not None:
        out.addcmul_(D[:, None] if D.dim() == 1 else D, v)
    return out


def _chunks_per_block(b: int, h: int, p: int, n: int, chunk: int) -> int:
    """How many chunks one block handles at once: its largest working tensors (the ``(L, L)``
    decays and the states, per chunk) stay near ``CHUNK_ELEMENTS``."""
    per_chunk = b * max(chunk * chunk * h, h * p * n, chunk * h * max(p, n))
    return max(1, scan_core.CHUNK_ELEMENTS // per_chunk)


def _split(t: torch.Tensor, t0: int, t1: int, chunk: int) -> torch.Tensor:
    """Steps ``t0..t1`` of a ``(b, T, ...)`` tensor as ``(b, k, chunk, ...)``, zero-padded to whole
    chunks (a padded step has ``dt = 0``: no decay and no input, so it changes nothing). A view
    when the steps are whole chunks."""
    part = t[:, t0:t1]
    pad = (-part.shape[1]) % chunk
    if pad:
        part = torch.cat([part, part.new_zeros(part.shape[0], pad, *part.shape[2:])], dim=1)
    return part.unflatten(1, (-1, chunk))


def _out(dest: torch.Tensor, t0: int, t1: int, chunk: int) -> torch.Tensor:
    """Where a block's ``(b, k, chunk, ...)`` result for steps ``t0..t1`` of ``dest`` (contiguous,
    ``(b, T, ...)``) is written: a view of ``dest`` when the steps are whole chunks, else a new
    padded tensor that :func:`_store` copies back."""
    if (t1 - t0) % chunk == 0:
        return dest[:, t0:t1].unflatten(1, (-1, chunk))
    return dest.new_empty(dest.shape[0], -(-(t1 - t0) // chunk), chunk, *dest.shape[2:])


def _store(dest: torch.Tensor, t0: int, t1: int, block: torch.Tensor) -> None:
    """Copy a block's ``(b, k, L, ...)`` result into steps ``t0..t1`` of ``dest``, unless it was
    computed there (:func:`_out`)."""
    if (t1 - t0) % block.shape[2] or block.data_ptr() != dest[:, t0:t1].data_ptr():
        dest[:, t0:t1] = block.flatten(1, 2)[:, : t1 - t0]


def _by_group(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``(b, k, L, h, p)`` -> ``(b, k, groups, L, (h / groups) * p)``: the heads sharing a group's
    ``B`` and ``C`` side by side, so one matrix product per group serves them all."""
    return t.flatten(3).unflatten(3, (groups, -1)).transpose(2, 3)


def _from_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`_by_group`: ``(b, k, g, L, (h / g) * p)`` -> ``(b, k, L, h, p)``."""
    return t.transpose(2, 3).flatten(3).unflatten(3, (heads, -1))


def _log_decays(dt: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The cumulative log decay within each chunk, ``la (b, k, h, L)``, of ``dt (b, k, L, h)``."""
    dtype = torch.promote_types(torch.promote_types(dt.dtype, A.dtype), dtype)
    return torch.cumsum((dt * A).transpose(2, 3).to(dtype, memory_format=torch.contiguous_format), dim=-1)


def _above(L: int, device: torch.device) -> torch.Tensor:
    """The ``(L, L)`` mask of the pairs ``s > l`` (a step never reads a later one)."""
    return torch.ones(L, L, dtype=torch.bool, device=device).triu(1)


def _scores_cb(B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``C_l . B_s`` for ``s <= l`` (zero above the diagonal), once per group: ``B, C (b, k, L, g,
    n)`` -> ``(b, k, g, L, L)``."""
    cb = torch.matmul(C.transpose(2, 3), B.permute(0, 1, 3, 4, 2))
    return cb.masked_fill_(_above(cb.shape[-1], cb.device), 0)


def _factored(la: torch.Tensor) -> bool:
    """Whether every chunk's decay ``exp(la_l - la_s)`` may be computed as ``exp(c_l) exp(-c_s)``
    with ``c = la - la_end / 2``: both factors stay within ``exp(+-FACTOR_RANGE / 2)``, far from
    overflow and underflow, and the products are as accurate as the exponentials of the
    differences."""
    return bool((la[..., -1] >= -FACTOR_RANGE).all())


def _factors(la: torch.Tensor):
    """The factored decays of a block (:func:`_factored`): ``exp(c)`` and ``exp(-c)`` seen as
    ``(b, k, L, h)``, ``exp(la_end / 2)`` and the decay of each whole chunk ``exp(la_end)``,
    both ``(b, k, h)``."""
    half = la[..., -1:] * 0.5
    c = la - half
    return c.exp().transpose(2, 3), c.neg_().exp_().transpose(2, 3), half.exp().squeeze(-1), la[..., -1].exp()


def _segment_terms(la: torch.Tensor, cb: torch.Tensor, keep_decay: bool = False):
    """The within-chunk terms in segment form, for any decay: ``decay[l, s] = exp(la_l - la_s)``
    (``s <= l``, else 0) and the scores ``cb * decay``, both ``(b, k, h, L, L)``. ``decay`` is
    ``None`` unless ``keep_decay`` (the scores are then computed in its place)."""
    b, k, h, L = la.shape
    groups = cb.shape[2]
    decay = (la.unsqueeze(-1) - la.unsqueeze(-2)).masked_fill_(_above(L, la.device), float("-inf")).exp_()
    grouped = decay.view(b, k, groups, h // groups, L, L)
    scores = grouped * cb.unsqueeze(3) if keep_decay else grouped.mul_(cb.unsqueeze(3))
    return (decay if keep_decay else None), scores.view(b, k, h, L, L)


def _decays(la: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From ``la (b, k, h, L)``: ``exp(la)`` and the decay from each step to its chunk's end
    ``exp(la_end - la)``, both seen as ``(b, k, L, h)``, and the decay of each whole chunk
    ``(b, k, h)``."""
    grow = la.exp()
    to_end = torch.exp(la[..., -1:] - la)
    return grow.transpose(2, 3), to_end.transpose(2, 3), grow[..., -1]


def _pass_states(local: torch.Tensor, decay_end: torch.Tensor, h: torch.Tensor | None):
    """States entering each chunk of a block: ``H_0 = h`` (zero if ``None``),
    ``H_{j+1} = decay_end_j H_j + local_j``; ``local (b, k, ...)``, ``decay_end (b, k, ...)``
    broadcasting against one chunk's state. Returns ``(entering (b, k, ...), H_k)``."""
    entering = torch.empty_like(local)
    if h is None:
        entering[:, 0].zero_()
    else:
        entering[:, 0].copy_(h)
    for j in range(local.shape[1] - 1):
        torch.addcmul(local[:, j], decay_end[:, j], entering[:, j], out=entering[:, j + 1])
    return entering, torch.addcmul(local[:, -1], decay_end[:, -1], entering[:, -1])


def _pass_gradients(local: torch.Tensor, decay_end: torch.Tensor, g: torch.Tensor | None):
    """The adjoint of :func:`_pass_states`: ``g`` is the gradient of the state after the block
    (zero if ``None``), ``local`` the gradient each chunk's outputs send to the state entering
    it. Returns ``(ends (b, k, ...), entering)``: the gradient of the state at the end of each
    chunk, and that of the state entering the block."""
    ends = torch.empty_like(local)
    last = local.shape[1] - 1
    if g is None:
        ends[:, last].zero_()
    else:
        ends[:, last].copy_(g)
    for j in range(last, 0, -1):
        torch.addcmul(local[:, j], decay_end[:, j], ends[:, j], out=ends[:, j - 1])
    return ends, torch.addcmul(local[:, 0], decay_end[:, 0], ends[:, 0])


def _layout(x: torch.Tensor, B: torch.Tensor, chunk: int) -> tuple[int, int]:
    """``(chunk, span)``: the chunk length used for ``x`` and the steps of one block."""
    b, T, h, p = x.shape
    chunk = max(1, min(chunk, T))
    return chunk, chunk * _chunks_per_block(b, h, p, B.shape[-1], chunk)


def _state_views(b: int, k: int, groups: int, n: int, h: int, p: int):
    """Shapes of the states passed between chunks: ``(b, k, g, n, h / g, p)`` (a group's heads
    side by side, so that ``B`` and ``C`` multiply them once per group) and of the per-head
    chunk decays broadcast against them."""
    return (b, k, groups, n, h // groups, p), (b, k, groups, 1, h // groups, 1)


def _grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``(b, k, L, h, ...)`` -> ``(k, b, g, L, h / g, ...)``: a view with the chunks first and the
    heads of a group side by side (how the span's matrix products take them)."""
    return t.unflatten(3, (groups, -1)).permute(1, 0, 3, 2, 4, *range(5, t.dim() + 1))


def _grouped_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-step, per-head values ``(b, k, L, h)`` as ``(k, b, g, L, h / g, 1)`` (a view)."""
    return _grouped(t, groups).unsqueeze(-1)


class _Span:
    """The coefficient terms of one span of chunks (steps ``t0..t1``), shared by the forward and
    the reverse scan.

    A head is *fast* in the span when one of its chunks decays by more than ``exp(-FACTOR_RANGE)``.
    The within-chunk terms of the other heads are factored per step, ``exp(la_l - la_s) =
    exp(la_l - la_end) exp(la_end - la_s)``, so every head of a group shares one matrix product
    with ``C . B``; a fast head gets its ``(L, L)`` decays instead (the factors would overflow).
    """

    def __init__(self, dt, A, B, C, t0: int, t1: int, chunk: int, dtype: torch.dtype):
        self.dt = _split(dt, t0, t1, chunk)  # (b, k, L, h)
        groups = B.shape[2]
        b, k, L, h = self.dt.shape
        self.groups, self.grouped_shape = groups, (k, b, groups, L, h // groups)
        self.la = _log_decays(self.dt, A, dtype).transpose(2, 3)  # (b, k, L, h), cumulative in each chunk
        la_end = self.la[:, :, -1:]
        self.to_end = torch.exp(la_end - self.la)  # decay from each step to its chunk's end (<= 1)
        self.decay_end = _grouped_heads(la_end.exp(), groups).reshape(k, b * groups, 1, h // groups, 1)
        fast = (la_end < -FACTOR_RANGE).flatten(0, 2).any(0)
        self.fast = fast.nonzero().flatten() if bool(fast.any()) else None
        Bs, Cs = (_split(t, t0, t1, chunk).permute(1, 0, 3, 2, 4).contiguous() for t in (B, C))  # (k, b, g, L, n)
        self.B, self.C = Bs, Cs
        self.cb = torch.matmul(Cs, Bs.transpose(-1, -2)).masked_fill_(_above(L, Bs.device), 0)  # (k, b, g, L, L)

    def chunk_views(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """``(k, b, g, L, ...)`` tensors as ``(k, b * g, L, -1)``: one chunk's batched matrices."""
        k, b, g, L, _ = self.grouped_shape
        return [t.reshape(k, b * g, L, -1) for t in tensors]

    def fast_terms(self, v: torch.Tensor, reverse: bool) -> torch.Tensor:
        """The within-chunk terms of the fast heads, ``(k, b, f, L, p)``, from ``v (b, k, L, f, p)``
        (their ``dt x`` in the forward, their gradient in the reverse scan)."""
        la = self.la[..., self.fast].transpose(2, 3)  # (b, k, f, L)
        decay = (la.unsqueeze(-1) - la.unsqueeze(-2)).masked_fill_(_above(la.shape[-1], la.device), float("-inf")).exp_()
        scores = decay.transpose(0, 1).mul_(self.cb.index_select(2, self.fast // self.grouped_shape[-1]))
        return torch.matmul(scores.transpose(-1, -2) if reverse else scores, v.permute(1, 0, 3, 2, 4))

    def put_fast(self, inner: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values (k, b, f, L, p)`` into the fast heads of ``inner (k, b, g, L, h / g, p)``."""
        per_group = self.grouped_shape[-1]
        inner[:, :, self.fast // per_group, :, self.fast % per_group, :] = values.permute(2, 0, 1, 3, 4)


def _span_length(b: int, h: int, p: int, chunk: int) -> int:
    """Steps per span: a whole number of chunks whose ``(steps, heads * head_dim)`` working
    tensors stay near ``SPAN_ELEMENTS``."""
    return chunk * max(1, SPAN_ELEMENTS // (b * chunk * h * p))


def ssd_scan_fwd_torch(x, dt, A, B, C, D, chunk: int = DEFAULT_CHUNK, starts: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Chunked forward without autograd; float32 inputs. Returns ``y`` (b, T, h, p).

    The steps are taken a span of chunks at a time. Within a span, every term that does not
    depend on the state carried between chunks is a batched tensor operation over all its chunks:
    the inputs weighted by their decay to the chunk's end, ``C . B`` once per group, the
    within-chunk outputs. Only the state, ``(n, (h / g) p)`` per group, is carried from chunk to
    chunk, by two matrix products per chunk (the state read by the chunk's outputs, and the
    chunk's inputs added to it), so it stays in cache. With ``starts`` (a list), one tensor
    ``(b, chunks, g, n, h / g, p)`` holding the state entering every chunk is appended to it
    (what the true gradient's backward restarts from)."""
    b, T, h, p = x.shape
    groups, n = B.shape[2], B.shape[3]
    per_group = h // groups
    chunk = max(1, min(chunk, T))
    span = _span_length(b, h, p, chunk)
    y = x.new_empty(b, T, h, p)
    state = x.new_zeros(b * groups, n, per_group * p)
    entering = None
    if starts is not None:
        entering = x.new_empty(b, -(-T // chunk), groups, n, per_group, p)
        starts.append(entering)
    for t0 in range(0, T, span):
        t1 = min(T, t0 + span)
        s = _Span(dt, A, B, C, t0, t1, chunk, x.dtype)
        k, _, _, L, _ = s.grouped_shape
        xs = _split(x, t0, t1, chunk)  # (b, k, L, h, p)
        weighted = x.new_empty(k, b, groups, L, per_group, p)  # dt x decayed to the chunk's end
        torch.mul(_grouped(xs, groups), _grouped_heads(s.dt * s.to_end, groups), out=weighted)
        inner = torch.matmul(s.cb, weighted.view(k, b, groups, L, per_group * p))
        up = torch.exp(s.la - s.la[:, :, -1:])  # inner * up: the within-chunk outputs
        if s.fast is not None:
            s.put_fast(inner.view(weighted.shape), s.fast_terms(xs[..., s.fast, :] * s.dt[..., s.fast, None], reverse=False))
            up[..., s.fast] = 1
        read = x.new_empty(k, b, groups, L, per_group * p)  # C_l . state entering the chunk
        Ck, Bk, wk, rk = s.chunk_views(s.C, s.B, weighted, read)
        for j in range(k):
            if entering is not None:
                entering[:, t0 // chunk + j].copy_(state.view(b, groups, n, per_group, p))
            torch.bmm(Ck[j], state, out=rk[j])
            state.view(b * groups, n, per_group, p).mul_(s.decay_end[j])
            state.baddbmm_(Bk[j].transpose(-1, -2), wk[j])
        out = _out(y, t0, t1, chunk)
        grouped = _grouped(out, groups)
        torch.mul(inner.view(weighted.shape), _grouped_heads(up, groups), out=grouped)
        grouped.addcmul_(read.view(weighted.shape), _grouped_heads(s.la.exp(), groups))
        _store(y, t0, t1, out)
    return _add_skip(y, D, x)


def ssd_scan_lrp_bwd_torch(g, dt, A, B, C, D, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Adjoint scan of the SSM rule; float32 inputs. Returns ``dx`` (b, T, h, p).

    The mirror of :func:`ssd_scan_fwd_torch`, spans and chunks taken last to first: the gradient
    of the state is carried backwards, ``G <- decay_end G + C^T (exp(la) g)``, and each step's
    input reads it through ``B``."""
    b, T, h, p = g.shape
    groups, n = B.shape[2], B.shape[3]
    per_group = h // groups
    chunk = max(1, min(chunk, T))
    span = _span_length(b, h, p, chunk)
    dx = g.new_empty(b, T, h, p)
    state = g.new_zeros(b * groups, n, per_group * p)  # gradient of the state after the span
    for t0 in reversed(range(0, T, span)):
        t1 = min(T, t0 + span)
        s = _Span(dt, A, B, C, t0, t1, chunk, g.dtype)
        k, _, _, L, _ = s.grouped_shape
        gs = _split(g, t0, t1, chunk)
        grown = g.new_empty(k, b, groups, L, per_group, p)  # g decayed back to the chunk's start
        torch.mul(_grouped(gs, groups), _grouped_heads(s.la.exp(), groups), out=grown)
        inner = torch.matmul(s.cb.transpose(-1, -2), grown.view(k, b, groups, L, per_group * p))
        down = s.dt * torch.exp(-s.la)  # inner * down: the within-chunk terms of dx
        if s.fast is not None:
            s.put_fast(inner.view(grown.shape), s.fast_terms(gs[..., s.fast, :], reverse=True))
            down[..., s.fast] = s.dt[..., s.fast]
        read = g.new_empty(k, b, groups, L, per_group * p)  # B_s . gradient of the chunk's end state
        Ck, Bk, gk, rk = s.chunk_views(s.C, s.B, grown, read)
        for j in reversed(range(k)):
            torch.bmm(Bk[j], state, out=rk[j])
            state.view(b * groups, n, per_group, p).mul_(s.decay_end[j])
            state.baddbmm_(Ck[j].transpose(-1, -2), gk[j])
        out = _out(dx, t0, t1, chunk)
        grouped = _grouped(out, groups)
        torch.mul(inner.view(grown.shape), _grouped_heads(down, groups), out=grouped)
        grouped.addcmul_(read.view(grown.shape), _grouped_heads(s.dt * s.to_end, groups))
        _store(dx, t0, t1, out)
    return _add_skip(dx, D, g)


SSDScanLRPFn = scan_lrp_function(
    "ssd_scan",
    ssd_scan_fwd_torch,
    ssd_scan_lrp_bwd_torch,
    "Forward: the SSD scan. Backward: the SSM rule (``dx`` only, by the adjoint scan).",
)


def ssd_scan_lrp(x, dt, A, B, C, D=None) -> torch.Tensor:
    """SSD scan whose backward is the MambaLRP SSM rule.

    Args:
        x: SSM input ``(b, T, h, p)``.
        dt: Step size after softplus ``(b, T, h)``.
        A: Scalar decay rate per head (negative) ``(h,)``.
        B: Input matrix ``(b, T, g, n)``.
        C: Output matrix ``(b, T, g, n)``.
        D: Skip ``(h,)``, ``(h, p)`` or ``None``.

    Returns:
        ``y`` ``(b, T, h, p)`` in float32. Only ``x`` receives a gradient.
    """
    check_shapes(x, dt, A, B, C, D)
    return SSDScanLRPFn.apply(x, dt, A, B, C, D)


def _block_grad(g, x, dt, A, B, C, entering, gh):
    """Gradients of one block of chunks (``g, x (b, k, L, h, p)``, ``dt (b, k, L, h)``,
    ``B, C (b, k, L, g, n)``), from the states entering its chunks (as :func:`ssd_scan_fwd_torch`
    saves them) and the gradient ``gh`` of the state after it (``None``: zero).

    Returns:
        ``(dx, ddt, dA, dB, dC, g_entering)`` in the block's layout, the last the gradient of the
        state entering the block.
    """
    b, k, L, h, p = x.shape
    groups, n = B.shape[3], B.shape[4]
    la = _log_decays(dt, A, B.dtype)
    cb = _scores_cb(B, C)
    if _factored(la):
        return _block_grad_factored(g, x, dt, A, B, C, la, cb, entering, gh)
    decay, scores = _segment_terms(la, cb, keep_decay=True)
    grow, to_end, decay_end = _decays(la)
    Bg, Cg = B.transpose(2, 3), C.transpose(2, 3)  # (b, k, g, L, n)
    xd = x * dt.unsqueeze(-1)
    grown = _by_group(g * grow.unsqueeze(-1), groups)  # (b, k, g, L, (h / g) * p)
    shape, decay_shape = _state_views(b, k, groups, n, h, p)
    ends, g_entering = _pass_gradients(torch.matmul(Cg.transpose(-1, -2), grown).view(shape), decay_end.reshape(decay_shape), gh)
    ends_m, entering_m = ends.flatten(4), entering.flatten(4)  # (b, k, g, n, (h / g) * p)
    gT, xdT = g.transpose(2, 3), xd.transpose(2, 3)  # (b, k, h, L, p)
    dxd = torch.matmul(scores.transpose(-1, -2), gT).transpose(2, 3)
    dscores = torch.matmul(gT, xdT.transpose(-1, -2))  # g_l . xd_s per head
    dseg = dscores * scores  # gradient of the log segment decays (zero above the diagonal)
    dcb = dscores.mul_(decay).view(b, k, groups, h // groups, L, L).sum(3)  # gradient of C_l . B_s
    dC = torch.matmul(dcb, Bg)
    dB = torch.matmul(dcb.transpose(-1, -2), Cg)
    dla = dseg.sum(-1) - dseg.sum(-2)  # la_l enters as +la_l in row l and as -la_s in column s
    # The state entering each chunk, read by its outputs: y_l += exp(la_l) C_l H.
    dC += torch.matmul(grown, entering_m.transpose(-1, -2))
    dla += (grown * torch.matmul(Cg, entering_m)).unflatten(-1, (h // groups, p)).sum(-1).transpose(-1, -2).reshape(b, k, h, L)
    # Each step's input carried to the chunk's end: H_end += exp(la_end - la_s) B_s xd_s.
    ghB = _from_groups(torch.matmul(Bg, ends_m), h)  # (b, k, L, h, p)
    dxd.addcmul_(ghB, to_end.unsqueeze(-1))
    dw = (xd * ghB).sum(-1).mul_(to_end)  # (b, k, L, h)
    dB += torch.matmul(_by_group(xd.mul_(to_end.unsqueeze(-1)), groups), ends_m.transpose(-1, -2))
    dw = dw.transpose(2, 3)
    dla -= dw
    dla[..., -1] += dw.sum(-1) + decay_end * (ends * entering).sum((3, 5)).view(b, k, h)
    da = dla.flip(-1).cumsum(-1).flip(-1)  # la = cumsum(dt * A) within each chunk
    dtT = dt.transpose(2, 3)
    ddt = (dxd * x).sum(-1).addcmul_(da.transpose(2, 3), A)
    dA = (da * dtT).sum((0, 1, 3))
    dx = dxd.mul_(dt.unsqueeze(-1))
    return dx, ddt, dA, dB.transpose(2, 3), dC.transpose(2, 3), g_entering


def _block_grad_factored(g, x, dt, A, B, C, la, cb, entering, gh):
    """:func:`_block_grad` with the decays factored (:func:`_factored`): with ``g' = exp(c) g``,
    ``x' = exp(-c) dt x`` and the states scaled by ``exp(la_end / 2)``, every within-chunk term is
    one matrix product per group, and the gradient of the log decays is read off the forward's
    and the adjoint's outputs (``P``, ``Q``) instead of the ``(L, L)`` decays of each head."""
    b, k, L, h, p = x.shape
    groups, n = B.shape[3], B.shape[4]
    up, down, half, decay_end = _factors(la)
    shape, decay_shape = _state_views(b, k, groups, n, h, p)
    half_s = half.reshape(decay_shape)
    Bg, Cg = B.transpose(2, 3), C.transpose(2, 3)  # (b, k, g, L, n)
    w = dt * down
    xg = _by_group(x * w.unsqueeze(-1), groups)  # x' by group: (b, k, g, L, (h / g) * p)
    gp = g * up.unsqueeze(-1)
    gg = _by_group(gp, groups)
    ends, g_entering = _pass_gradients(torch.matmul(Cg.transpose(-1, -2), gg).view(shape).mul_(half_s), decay_end.reshape(decay_shape), gh)
    ends_s, entering_s = (ends * half_s).flatten(4), (entering * half_s).flatten(4)
    dcb = torch.matmul(gg, xg.transpose(-1, -2)).masked_fill_(_above(L, x.device), 0)
    P = _from_groups(torch.matmul(cb, xg).add_(torch.matmul(Cg, entering_s)), h)  # y = exp(c) P
    Q = _from_groups(torch.matmul(cb.transpose(-1, -2), gg).add_(torch.matmul(Bg, ends_s)), h)  # dx = w Q
    dC = torch.matmul(dcb, Bg).add_(torch.matmul(gg, entering_s.transpose(-1, -2)))
    dB = torch.matmul(dcb.transpose(-1, -2), Cg).add_(torch.matmul(xg, ends_s.transpose(-1, -2)))
    qx = (Q * x).sum(-1)  # (b, k, L, h)
    dla = ((gp * P).sum(-1) - qx * w).transpose(2, 3).contiguous()
    # The inputs carried to each chunk's end, and the state entering it, through exp(la_end).
    carried = (torch.matmul(Bg.transpose(-1, -2), xg) * ends_s).view(shape).sum((3, 5)).view(b, k, h)
    dla[..., -1] += carried + decay_end * (ends * entering).sum((3, 5)).view(b, k, h)
    da = dla.flip(-1).cumsum(-1).flip(-1)  # la = cumsum(dt * A) within each chunk
    ddt = (qx * down).addcmul_(da.transpose(2, 3), A)
    dA = (da * dt.transpose(2, 3)).sum((0, 1, 3))
    dx = Q.mul_(w.unsqueeze(-1))
    return dx, ddt, dA, dB.transpose(2, 3), dC.transpose(2, 3), g_entering


def ssd_scan_grad_bwd_torch(g, x, dt, A, B, C, D, starts: list[torch.Tensor], chunk: int, needs: tuple[bool, ...]):
    """The true gradient of the SSD scan; float32 inputs.

    Walks the blocks of chunks backwards from the states the forward saved entering each chunk
    (``starts``, one tensor),
    carrying the gradient of the state between blocks, with each block's gradients in closed
    form (:func:`_block_grad`).

    Returns:
        ``(dx, ddt, dA, dB, dC, dD)``; an entry is ``None`` where ``needs`` says it is not wanted.
    """
    b, T, h, p = x.shape
    chunk, span = _layout(x, B, chunk)
    dx, ddt = x.new_empty(b, T, h, p), dt.new_empty(b, T, h)
    dB, dC = B.new_empty(B.shape), C.new_empty(C.shape)
    dA = torch.zeros_like(A)
    gh = None
    for t0 in reversed(range(0, T, span)):
        t1 = min(T, t0 + span)
        gs, xs, dts, Bs, Cs = (_split(t, t0, t1, chunk) for t in (g, x, dt, B, C))
        entering = starts[0][:, t0 // chunk : t0 // chunk + gs.shape[1]]
        dx_b, ddt_b, dA_b, dB_b, dC_b, gh = _block_grad(gs, xs, dts, A, Bs, Cs, entering, gh)
        dA += dA_b
        for dest, block in ((dx, dx_b), (ddt, ddt_b), (dB, dB_b), (dC, dC_b)):
            dest[:, t0:t1] = block.flatten(1, 2)[:, : t1 - t0]
    dD = None
    if D is not None:
        _add_skip(dx, D, g)
        if needs[5]:
            gx = g * x
            dD = gx.sum((0, 1, 3)) if D.dim() == 1 else gx.sum((0, 1))
    return tuple(t if need else None for t, need in zip((dx, ddt, dA, dB, dC, dD), needs))


SSDScanGradFn = scan_grad_function(
    ssd_scan_fwd_torch,
    ssd_scan_grad_bwd_torch,
    'Forward: the chunked SSD scan. Backward: its true gradient in every input, chunk by chunk from the states saved at the chunk borders.',
)


def ssd_scan_grad(x, dt, A, B, C, D=None, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """SSD scan with its true gradient (:class:`SSDScanGradFn`). Arguments as in :func:`ssd_scan_lrp`."""
    check_shapes(x, dt, A, B, C, D)
    return SSDScanGradFn.apply(x, dt, A, B, C, D, chunk)


def ssd_scan(x, dt, A, B, C, D=None, rule: Literal["lrp", "gradient"] = "lrp") -> torch.Tensor:
    """SSD scan with the SSM rule (``"lrp"``) or its true gradient (``"gradient"``)."""
    if rule == "lrp":
        return ssd_scan_lrp(x, dt, A, B, C, D)
    if rule == "gradient":
        return ssd_scan_grad(x, dt, A, B, C, D)
    raise ValueError(f"unknown SSM rule {rule!r}; expected 'lrp' or 'gradient'")


def ssd_scan_ref(x, dt, A, B, C, D=None, detach: bool = True) -> torch.Tensor:
    """Sequential reference with a Python loop over time (coefficients detached if ``detach``)."""
    x, dt, A, B, C = (acc(t) for t in (x, dt, A, B, C))
    if detach:
        dt, A, B, C = dt.detach(), A.detach(), B.detach(), C.detach()
    heads = x.shape[2]
    B, C = _heads(B, heads), _heads(C, heads)
    b, T, h, p = x.shape
    state = torch.zeros(b, h, p, B.shape[-1], dtype=x.dtype, device=x.device)
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t]).unsqueeze(-1) * B[:, t].unsqueeze(2)
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(ys, dim=1)
    skip = _skip(acc(D), x)
    return y if skip is None else y + skip

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
from mambalrp.functional.scan_core import acc

DEFAULT_CHUNK = 32
# Elements of one span's (steps, heads * head_dim) working tensors (see _span_length): 4 MiB in
# float32, which the last-level cache holds. At mamba-130m's width and T = 4096 the rule's forward
# and backward took 0.69x (fastest) to 0.91x (median) the time they took with 1 << 22 (8
# interleaved rounds).
SPAN_ELEMENTS = 1 << 20
# Elements of the states the true gradient keeps for one span (see _span_length).
STATE_ELEMENTS = 1 << 21
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


def _log_decays(dt: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The cumulative log decay within each chunk, ``la (b, k, h, L)``, of ``dt (b, k, L, h)``."""
    dtype = torch.promote_types(torch.promote_types(dt.dtype, A.dtype), dtype)
    return torch.cumsum((dt * A).transpose(2, 3).to(dtype, memory_format=torch.contiguous_format), dim=-1)


def _above(L: int, device: torch.device) -> torch.Tensor:
    """The ``(L, L)`` mask of the pairs ``s > l`` (a step never reads a later one)."""
    return torch.ones(L, L, dtype=torch.bool, device=device).triu(1)


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
        self._fast_decays: torch.Tensor | None = None

    def chunk_views(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """``(k, b, g, L, ...)`` tensors as ``(k, b * g, L, -1)``: one chunk's batched matrices."""
        k, b, g, L, _ = self.grouped_shape
        return [t.reshape(k, b * g, L, -1) for t in tensors]

    def take_fast(self, t: torch.Tensor) -> torch.Tensor:
        """The fast heads of a span's ``(b, k, L, h, p)`` steps as ``(k, b, f, L, p)`` (one copy)."""
        return t.permute(1, 0, 3, 2, 4).index_select(2, self.fast)

    @property
    def fast_decays(self) -> torch.Tensor:
        """``exp(la_l - la_s)`` of the fast heads (zero for ``s > l``), ``(k, b, f, L, L)``; computed once."""
        if self._fast_decays is None:
            la = self.la[..., self.fast].permute(1, 0, 3, 2)  # (k, b, f, L)
            decay = (la.unsqueeze(-1) - la.unsqueeze(-2)).masked_fill_(_above(la.shape[-1], la.device), float("-inf"))
            self._fast_decays = decay.exp_()
        return self._fast_decays

    def fast_dt(self) -> torch.Tensor:
        """``dt`` of the fast heads as ``(k, b, f, 1, L)``: a factor on the columns ``s``."""
        return self.dt[..., self.fast].permute(1, 0, 3, 2).unsqueeze(-2)

    def fast_terms(self, v: torch.Tensor, reverse: bool) -> torch.Tensor:
        """The within-chunk terms of the fast heads, ``(k, b, f, L, p)``, from ``v (k, b, f, L, p)``
        (their ``x`` in the forward, times ``dt``; their gradient in the reverse scan)."""
        scores = self.fast_decays * self.cb.index_select(2, self.fast // self.grouped_shape[-1])
        if reverse:
            return torch.matmul(scores.transpose(-1, -2), v)
        return torch.matmul(scores.mul_(self.fast_dt()), v)

    def put_fast(self, inner: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values (k, b, f, L, p)`` into the fast heads of ``inner (k, b, g, L, h / g, p)``."""
        per_group = self.grouped_shape[-1]
        inner[:, :, self.fast // per_group, :, self.fast % per_group, :] = values.permute(2, 0, 1, 3, 4)


def _span_length(b: int, h: int, p: int, n: int, chunk: int, states: bool = False) -> int:
    """Steps per span: a whole number of chunks whose ``(steps, heads * head_dim)`` working
    tensors stay near ``SPAN_ELEMENTS``; with ``states`` (the true gradient, which keeps the
    state entering every chunk of a span, and its gradient), also whose states stay near
    ``STATE_ELEMENTS``."""
    chunks = SPAN_ELEMENTS // (b * chunk * h * p)
    if states:
        chunks = min(chunks, STATE_ELEMENTS // (b * n * h * p))
    return chunk * max(1, chunks)


def ssd_scan_fwd_torch(x, dt, A, B, C, D, chunk: int = DEFAULT_CHUNK, starts: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Chunked forward without autograd; float32 inputs. Returns ``y`` (b, T, h, p).

    The steps are taken a span of chunks at a time. Within a span, every term that does not
    depend on the state carried between chunks is a batched tensor operation over all its chunks:
    the inputs weighted by their decay to the chunk's end, ``C . B`` once per group, the
    within-chunk outputs. Only the state, ``(n, (h / g) p)`` per group, is carried from chunk to
    chunk, by two matrix products per chunk (the state read by the chunk's outputs, and the
    chunk's inputs added to it), so it stays in cache. With ``starts`` (a list; for the true
    gradient), the spans are sized for its backward, and appended to ``starts`` are the state
    entering each span, ``(b * g, n, (h / g) p)``, then ``y`` without its skip term ``D x``."""
    b, T, h, p = x.shape
    groups, n = B.shape[2], B.shape[3]
    per_group = h // groups
    chunk = max(1, min(chunk, T))
    span = _span_length(b, h, p, n, chunk, states=starts is not None)
    y = x.new_empty(b, T, h, p)
    state = x.new_zeros(b * groups, n, per_group * p)
    for t0 in range(0, T, span):
        if starts is not None:
            starts.append(state.clone())
        t1 = min(T, t0 + span)
        s = _Span(dt, A, B, C, t0, t1, chunk, x.dtype)
        k, _, _, L, _ = s.grouped_shape
        xs = _split(x, t0, t1, chunk)  # (b, k, L, h, p)
        weighted = x.new_empty(k, b, groups, L, per_group, p)  # dt x decayed to the chunk's end
        torch.mul(_grouped(xs, groups), _grouped_heads(s.dt * s.to_end, groups), out=weighted)
        inner = torch.matmul(s.cb, weighted.view(k, b, groups, L, per_group * p))
        up = torch.exp(s.la - s.la[:, :, -1:])  # inner * up: the within-chunk outputs
        if s.fast is not None:
            s.put_fast(inner.view(weighted.shape), s.fast_terms(s.take_fast(xs), reverse=False))
            up[..., s.fast] = 1
        read = x.new_empty(k, b, groups, L, per_group * p)  # C_l . state entering the chunk
        Ck, Bk, wk, rk = s.chunk_views(s.C, s.B, weighted, read)
        for j in range(k):
            torch.bmm(Ck[j], state, out=rk[j])
            state.view(b * groups, n, per_group, p).mul_(s.decay_end[j])
            state.baddbmm_(Bk[j].transpose(-1, -2), wk[j])
        out = _out(y, t0, t1, chunk)
        grouped = _grouped(out, groups)
        torch.mul(inner.view(weighted.shape), _grouped_heads(up, groups), out=grouped)
        grouped.addcmul_(read.view(weighted.shape), _grouped_heads(s.la.exp(), groups))
        _store(y, t0, t1, out)
    if starts is not None:
        starts.append(y.clone())
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
    span = _span_length(b, h, p, n, chunk)
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
            s.put_fast(inner.view(grown.shape), s.fast_terms(s.take_fast(gs), reverse=True))
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


def _span_grad(s: _Span, gs, xs, y_core, A, start, G, dx_out):
    """The true gradient over one span of chunks: ``gs``, ``xs``, ``y_core`` (``y - D x``) the
    span's ``(b, k, L, h, p)`` steps, ``start`` the state entering it, ``G`` the gradient of the
    state after it (updated in place to that of the state entering it), ``dx_out`` where ``dx``
    (without the skip term) is written, ``(b, k, L, h, p)``.

    Besides what the SSM rule's adjoint computes, the gradient of the log decays is read off the
    outputs and the inputs: every term of ``y_l - D x_l`` carries ``+la_l`` once and every term an
    input ``x_s`` feeds carries ``-la_s`` once, so ``dla_l = g_l . (y_l - D x_l) - x_l . (dx_l - D
    g_l)``, plus ``<G_out, H_out>`` at each chunk's last step (the state's decay and inputs).

    Returns:
        ``(ddt, dA, dB, dC)`` in the span's ``(b, k, L, ...)`` layout.
    """
    k, b, groups, L, per_group = s.grouped_shape
    p, n = gs.shape[-1], s.B.shape[-1]
    shape = (k, b, groups, L, per_group, p)
    weighted = gs.new_empty(shape)  # xs: dt x decayed to the chunk's end, as the forward has it
    torch.mul(_grouped(xs, groups), _grouped_heads(s.dt * s.to_end, groups), out=weighted)
    grown = gs.new_empty(shape)  # exp(la) g
    torch.mul(_grouped(gs, groups), _grouped_heads(s.la.exp(), groups), out=grown)
    Ck, Bk, wk, gk = s.chunk_views(s.C, s.B, weighted, grown)
    # The states entering each chunk and the one after the last, recomputed from the span's start.
    states = gs.new_empty(k + 1, *start.shape)
    states[0].copy_(start)
    for j in range(k):
        torch.mul(states[j].view(b * groups, n, per_group, p), s.decay_end[j], out=states[j + 1].view(b * groups, n, per_group, p))
        states[j + 1].baddbmm_(Bk[j].transpose(-1, -2), wk[j])
    # The gradients of the states after each chunk, carried backwards.
    ends = gs.new_empty(k, *start.shape)
    ends[k - 1].copy_(G)
    for j in range(k - 1, -1, -1):
        before = ends[j - 1] if j else G
        torch.mul(ends[j].view(b * groups, n, per_group, p), s.decay_end[j], out=before.view(b * groups, n, per_group, p))
        before.baddbmm_(Ck[j].transpose(-1, -2), gk[j])
    inner = torch.matmul(s.cb.transpose(-1, -2), grown.view(k, b, groups, L, per_group * p)).view(shape)
    down = torch.exp(-s.la)
    up = torch.exp(s.la - s.la[:, :, -1:])  # the within-chunk outputs' factor (zero for fast heads)
    if s.fast is not None:
        g_fast = s.take_fast(gs)
        s.put_fast(inner, s.fast_terms(g_fast, reverse=True))
        down[..., s.fast] = 1
        up[..., s.fast] = 0
    # The bracket of dx = dt * bracket: the within-chunk terms and B_s . G_out.
    bracket = torch.matmul(Bk, ends).view(shape).mul_(_grouped_heads(s.to_end, groups))
    bracket.addcmul_(inner, _grouped_heads(down, groups))
    torch.mul(bracket, _grouped_heads(s.dt, groups), out=_grouped(dx_out, groups))
    ddt = (bracket * _grouped(xs, groups)).sum(-1).permute(1, 0, 3, 2, 4).flatten(3)  # (b, k, L, h)
    # d(C_l . B_s) within chunks: (exp(la_l - la_end) g_l) . xs_s, and each fast head's own terms.
    g_up = _grouped(gs, groups) * _grouped_heads(up, groups)
    dcb = torch.matmul(g_up.view(k, b, groups, L, per_group * p), weighted.view(k, b, groups, L, per_group * p).transpose(-1, -2))
    if s.fast is not None:
        products = torch.matmul(g_fast, s.take_fast(xs).transpose(-1, -2)).mul_(s.fast_decays).mul_(s.fast_dt())
        dcb.index_add_(2, s.fast // per_group, products)
    dcb.masked_fill_(_above(L, dcb.device), 0)
    dC = torch.matmul(dcb, s.B).add_(torch.matmul(gk, states[:k].transpose(-1, -2)).view(k, b, groups, L, n))
    dB = torch.matmul(dcb.transpose(-1, -2), s.C).add_(torch.matmul(wk, ends.transpose(-1, -2)).view(k, b, groups, L, n))
    # Gradient of the log decays, then of dt and A through their cumulative sums.
    dla = (_grouped(gs, groups) * _grouped(y_core, groups)).sum(-1).permute(1, 0, 3, 2, 4).flatten(3) - s.dt * ddt
    through_end = (ends * states[1:]).view(k, b, groups, n, per_group, p).sum((3, 5))  # <G_out, H_out>
    dla[:, :, -1] += through_end.transpose(0, 1).flatten(2)
    da = dla.flip(2).cumsum(2).flip(2)
    ddt.addcmul_(da, A)
    dA = (da * s.dt).sum((0, 1, 2))
    return ddt, dA, dB.permute(1, 0, 3, 2, 4), dC.permute(1, 0, 3, 2, 4)


def ssd_scan_grad_bwd_torch(g, x, dt, A, B, C, D, starts: list[torch.Tensor], chunk: int, needs: tuple[bool, ...]):
    """The true gradient of the SSD scan; float32 inputs.

    Walks the spans backwards from what the forward saved (``starts``: the state entering each
    span, then ``y - D x``), carrying the gradient of the state between spans; within a span,
    the states entering its chunks are recomputed, and each gradient is in closed form
    (:func:`_span_grad`).

    Returns:
        ``(dx, ddt, dA, dB, dC, dD)``; an entry is ``None`` where ``needs`` says it is not wanted.
    """
    b, T, h, p = x.shape
    groups, n = B.shape[2], B.shape[3]
    chunk = max(1, min(chunk, T))
    span = _span_length(b, h, p, n, chunk, states=True)
    *entering, y_core = starts
    dx, ddt = x.new_empty(b, T, h, p), dt.new_empty(b, T, h)
    dB, dC = B.new_empty(B.shape), C.new_empty(C.shape)
    dA = torch.zeros_like(A)
    G = x.new_zeros(b * groups, n, (h // groups) * p)
    for index, t0 in reversed(list(enumerate(range(0, T, span)))):
        t1 = min(T, t0 + span)
        s = _Span(dt, A, B, C, t0, t1, chunk, x.dtype)
        gs, xs, ys = (_split(t, t0, t1, chunk) for t in (g, x, y_core))
        out = _out(dx, t0, t1, chunk)
        ddt_s, dA_s, dB_s, dC_s = _span_grad(s, gs, xs, ys, A, entering[index], G, out)
        _store(dx, t0, t1, out)
        dA += dA_s
        for dest, block in ((ddt, ddt_s), (dB, dB_s), (dC, dC_s)):
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
    'Forward: the chunked SSD scan. Backward: its true gradient in every input, span by span from the states saved at the span borders.',
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

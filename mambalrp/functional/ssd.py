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


def _chunks_per_block(b: int, h: int, p: int, n: int, chunk: int) -> int:
    """How many chunks one block handles at once: its largest working tensors (the ``(L, L)``
    decays and the states, per chunk) stay near ``CHUNK_ELEMENTS``."""
    per_chunk = b * max(chunk * chunk * h, h * p * n, chunk * h * max(p, n))
    return max(1, scan_core.CHUNK_ELEMENTS // per_chunk)


def _split(t: torch.Tensor, t0: int, t1: int, chunk: int) -> torch.Tensor:
    """Steps ``t0..t1`` of a ``(b, T, ...)`` tensor as ``(b, k, chunk, ...)``, zero-padded to whole
    chunks (a padded step has ``dt = 0``: no decay and no input, so it changes nothing)."""
    part = t[:, t0:t1]
    pad = (-part.shape[1]) % chunk
    if pad:
        part = torch.cat([part, part.new_zeros(part.shape[0], pad, *part.shape[2:])], dim=1)
    return part.reshape(part.shape[0], -1, chunk, *part.shape[2:])


def _unsplit(t: torch.Tensor, length: int) -> torch.Tensor:
    """``(b, k, L, ...)`` back to the first ``length`` steps of ``(b, k * L, ...)``."""
    return t.reshape(t.shape[0], -1, *t.shape[3:])[:, :length]


def _block_terms(dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor):
    """Per-chunk terms of a block of chunks ``(b, k, L, ...)``: the cumulative log decay
    ``la (b, k, L, h)``, the masked segment decays ``(b, k, l, s, h)`` and the scores
    ``(C_l . B_s) * decay``."""
    la = torch.cumsum(dt * A, dim=2)
    L = dt.shape[2]
    above = torch.ones(L, L, dtype=torch.bool, device=dt.device).triu(1)[:, :, None]
    seg = (la[:, :, :, None, :] - la[:, :, None, :, :]).masked_fill_(above, float("-inf"))
    decay = seg.exp_()
    scores = torch.einsum("bclhn,bcshn->bclsh", C, B).mul_(decay)
    return la, decay, scores


def _pass_states(local: torch.Tensor, decay_end: torch.Tensor, h: torch.Tensor | None):
    """States entering each chunk of a block: ``H_0 = h`` (zero if ``None``),
    ``H_{j+1} = decay_end_j H_j + local_j``. Returns ``(entering (b, k, h, p, n), H_k)``."""
    entering = torch.empty_like(local)
    h = torch.zeros_like(local[:, 0]) if h is None else h
    for j in range(local.shape[1]):
        entering[:, j] = h
        h = torch.addcmul(local[:, j], decay_end[:, j, :, None, None], h)
    return entering, h


def _pass_gradients(local: torch.Tensor, decay_end: torch.Tensor, g: torch.Tensor | None):
    """The adjoint of :func:`_pass_states`: ``g`` is the gradient of the state after the block
    (zero if ``None``), ``local`` the gradient each chunk's outputs send to the state entering
    it. Returns ``(ends (b, k, h, p, n), entering)``: the gradient of the state at the end of
    each chunk, and that of the state entering the block."""
    ends = torch.empty_like(local)
    g = torch.zeros_like(local[:, 0]) if g is None else g
    for j in reversed(range(local.shape[1])):
        ends[:, j] = g
        g = torch.addcmul(local[:, j], decay_end[:, j, :, None, None], g)
    return ends, g


def _layout(x: torch.Tensor, B: torch.Tensor, chunk: int) -> tuple[int, int]:
    """``(chunk, span)``: the chunk length used for ``x`` and the steps of one block."""
    b, T, h, p = x.shape
    chunk = max(1, min(chunk, T))
    return chunk, chunk * _chunks_per_block(b, h, p, B.shape[-1], chunk)


def ssd_scan_fwd_torch(x, dt, A, B, C, D, chunk: int = DEFAULT_CHUNK, starts: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Chunked forward without autograd; float32 inputs. Returns ``y`` (b, T, h, p).

    Chunks are handled a block at a time: the terms inside every chunk of a block are batched
    tensor operations, and only the ``(b, h, p, n)`` state passed from chunk to chunk is a loop.
    With ``starts`` (a list), the states entering the chunks of each block, ``(b, k, h, p, n)``,
    are appended to it (what the true gradient's backward restarts from)."""
    T, heads = x.shape[1], x.shape[2]
    B, C = _heads(B, heads), _heads(C, heads)
    chunk, span = _layout(x, B, chunk)
    y = torch.empty_like(x)
    h = None
    for t0 in range(0, T, span):
        t1 = min(T, t0 + span)
        xs, dts, Bs, Cs = (_split(t, t0, t1, chunk) for t in (x, dt, B, C))
        la, _, scores = _block_terms(dts, A, Bs, Cs)
        xd = xs * dts.unsqueeze(-1)
        out = torch.einsum("bclsh,bcshp->bclhp", scores, xd)
        to_end = torch.exp(la[:, :, -1:] - la).unsqueeze(-1)
        local = torch.einsum("bclhn,bclhp->bchpn", Bs * to_end, xd)
        entering, h = _pass_states(local, torch.exp(la[:, :, -1]), h)
        if starts is not None:
            starts.append(entering)
        out += torch.einsum("bclhn,bchpn->bclhp", Cs, entering) * torch.exp(la).unsqueeze(-1)
        y[:, t0:t1] = _unsplit(out, t1 - t0)
    skip = _skip(D, x)
    return y if skip is None else y + skip


def ssd_scan_lrp_bwd_torch(g, dt, A, B, C, D, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Adjoint scan of the SSM rule; float32 inputs. Returns ``dx`` (b, T, h, p)."""
    T, heads = g.shape[1], g.shape[2]
    B, C = _heads(B, heads), _heads(C, heads)
    chunk, span = _layout(g, B, chunk)
    dx = torch.empty_like(g)
    gh = None  # gradient of the state after the current block, from later blocks
    for t0 in reversed(range(0, T, span)):
        t1 = min(T, t0 + span)
        gs, dts, Bs, Cs = (_split(t, t0, t1, chunk) for t in (g, dt, B, C))
        la, _, scores = _block_terms(dts, A, Bs, Cs)
        dxd = torch.einsum("bclsh,bclhp->bcshp", scores, gs)
        local = torch.einsum("bclhn,bclhp->bchpn", Cs * torch.exp(la).unsqueeze(-1), gs)
        ends, gh = _pass_gradients(local, torch.exp(la[:, :, -1]), gh)
        to_end = torch.exp(la[:, :, -1:] - la).unsqueeze(-1)
        dxd += torch.einsum("bcshn,bchpn->bcshp", Bs * to_end, ends)
        dx[:, t0:t1] = _unsplit(dxd * dts.unsqueeze(-1), t1 - t0)
    skip = _skip(D, g)
    return dx if skip is None else dx + skip


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
    """Gradients of one block of chunks ``(b, k, L, ...)`` (B, C per head), from the states
    entering its chunks and the gradient ``gh`` of the state after it (``None``: zero).

    Returns:
        ``(dx, ddt, dA, dB, dC, g_entering)``, the last the gradient of the state entering the
        block.
    """
    la, decay, scores = _block_terms(dt, A, B, C)
    xd = x * dt.unsqueeze(-1)
    grown = g * torch.exp(la).unsqueeze(-1)
    decay_end = torch.exp(la[:, :, -1])
    ends, g_entering = _pass_gradients(torch.einsum("bclhp,bclhn->bchpn", grown, C), decay_end, gh)
    dxd = torch.einsum("bclsh,bclhp->bcshp", scores, g)
    dscores = torch.einsum("bclhp,bcshp->bclsh", g, xd)
    dseg = dscores * scores  # gradient of the log segment decays (zero above the diagonal)
    dscores.mul_(decay)  # now the gradient of C_l . B_s
    dC = torch.einsum("bclsh,bcshn->bclhn", dscores, B)
    dB = torch.einsum("bclsh,bclhn->bcshn", dscores, C)
    dla = dseg.sum(3) - dseg.sum(2)  # la_l enters as +la_l in row l and as -la_s in column s
    # The state entering each chunk, read by its outputs: y_l += exp(la_l) C_l H.
    dC += torch.einsum("bclhp,bchpn->bclhn", grown, entering)
    dla += (grown * torch.einsum("bclhn,bchpn->bclhp", C, entering)).sum(-1)
    # Each step's input carried to the chunk's end: H_end += exp(la_end - la_s) B_s xd_s.
    to_end = torch.exp(la[:, :, -1:] - la)
    ghB = torch.einsum("bcshn,bchpn->bcshp", B, ends)
    dxd += ghB * to_end.unsqueeze(-1)
    dB += torch.einsum("bcshp,bchpn->bcshn", xd * to_end.unsqueeze(-1), ends)
    dw = (xd * ghB).sum(-1) * to_end
    dla -= dw
    dla[:, :, -1] += dw.sum(2) + decay_end * (ends * entering).sum((-1, -2))
    da = dla.flip(2).cumsum(2).flip(2)  # la = cumsum(dt * A) within each chunk
    dx = dxd * dt.unsqueeze(-1)
    ddt = (dxd * x).sum(-1) + da * A
    dA = (da * dt).sum((0, 1, 2))
    return dx, ddt, dA, dB, dC, g_entering


def _group_sum(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-head ``(b, T, h, n)`` gradients summed back onto ``groups`` shared groups."""
    b, T, h, n = t.shape
    return t if groups == h else t.reshape(b, T, groups, h // groups, n).sum(3)


def ssd_scan_grad_bwd_torch(g, x, dt, A, B, C, D, starts: list[torch.Tensor], chunk: int, needs: tuple[bool, ...]):
    """The true gradient of the SSD scan; float32 inputs.

    Walks the blocks of chunks backwards from the states saved by the forward (``starts``),
    carrying the gradient of the state between blocks, with each block's gradients in closed
    form (:func:`_block_grad`).

    Returns:
        ``(dx, ddt, dA, dB, dC, dD)``; an entry is ``None`` where ``needs`` says it is not wanted.
    """
    heads, groups, T = x.shape[2], B.shape[2], x.shape[1]
    Bh, Ch = _heads(B, heads), _heads(C, heads)
    chunk, span = _layout(x, Bh, chunk)
    dx, ddt = torch.empty_like(x), torch.empty_like(dt)
    dB, dC = torch.empty_like(B), torch.empty_like(C)
    dA = torch.zeros_like(A)
    gh = None
    for index, t0 in reversed(list(enumerate(range(0, T, span)))):
        t1 = min(T, t0 + span)
        gs, xs, dts, Bs, Cs = (_split(t, t0, t1, chunk) for t in (g, x, dt, Bh, Ch))
        dx_b, ddt_b, dA_b, dB_b, dC_b, gh = _block_grad(gs, xs, dts, A, Bs, Cs, starts[index], gh)
        dA += dA_b
        dx[:, t0:t1], ddt[:, t0:t1] = _unsplit(dx_b, t1 - t0), _unsplit(ddt_b, t1 - t0)
        dB[:, t0:t1] = _group_sum(_unsplit(dB_b, t1 - t0), groups)
        dC[:, t0:t1] = _group_sum(_unsplit(dC_b, t1 - t0), groups)
    dD = None
    if D is not None:
        dx += _skip(D, g)
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

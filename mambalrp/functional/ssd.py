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

from mambalrp.functional.scan_fn import scan_lrp_function
from mambalrp.functional.scan_core import acc

DEFAULT_CHUNK = 64


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


def _chunk_decays(dt_c: torch.Tensor, A: torch.Tensor):
    """Cumulative log decay ``la (b, L, h)`` and the masked segment decays ``(b, l, s, h)``."""
    la = torch.cumsum(dt_c * A, dim=1)
    seg = la[:, :, None, :] - la[:, None, :, :]
    L = dt_c.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=dt_c.device).tril()
    return la, torch.exp(seg.masked_fill(~causal[None, :, :, None], float("-inf")))


def _ssd_chunk(x, dt, A, B, C, h0):
    """One chunk, differentiable. B, C already per head. Returns ``(y, h_last)``."""
    la, decay = _chunk_decays(dt, A)
    xd = x * dt.unsqueeze(-1)
    scores = torch.einsum("blhn,bshn->blsh", C, B) * decay
    y = torch.einsum("blsh,bshp->blhp", scores, xd)
    to_end = torch.exp(la[:, -1:, :] - la)
    h_last = torch.einsum("blhn,blhp->bhpn", B * to_end.unsqueeze(-1), xd)
    if h0 is not None:
        y = y + torch.einsum("blhn,bhpn->blhp", C, h0) * torch.exp(la).unsqueeze(-1)
        h_last = h_last + torch.exp(la[:, -1])[:, :, None, None] * h0
    return y, h_last


def ssd_scan_fwd_torch(x, dt, A, B, C, D, chunk: int = DEFAULT_CHUNK, starts: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Chunked forward without autograd; float32 inputs. Returns ``y`` (b, T, h, p).

    With ``starts`` (a list), the state ``(b, h, p, n)`` entering every chunk after the first is
    appended to it (what the true gradient's backward restarts the chunks from)."""
    heads = x.shape[2]
    B, C = _heads(B, heads), _heads(C, heads)
    y = torch.empty_like(x)
    h = None
    for t0 in range(0, x.shape[1], chunk):
        sl = slice(t0, t0 + chunk)
        y[:, sl], h = _ssd_chunk(x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], h)
        if starts is not None and t0 + chunk < x.shape[1]:
            starts.append(h)
    skip = _skip(D, x)
    return y if skip is None else y + skip


def ssd_scan_lrp_bwd_torch(g, dt, A, B, C, D, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Adjoint scan of the SSM rule; float32 inputs. Returns ``dx`` (b, T, h, p)."""
    heads = g.shape[2]
    B, C = _heads(B, heads), _heads(C, heads)
    dx = torch.empty_like(g)
    gh = None  # gradient of the state at the end of the current chunk, from later chunks
    T = g.shape[1]
    for t0 in reversed(range(0, T, chunk)):
        sl = slice(t0, t0 + chunk)
        g_c, dt_c, B_c, C_c = g[:, sl], dt[:, sl], B[:, sl], C[:, sl]
        la, decay = _chunk_decays(dt_c, A)
        scores = torch.einsum("blhn,bshn->blsh", C_c, B_c) * decay
        gxd = torch.einsum("blsh,blhp->bshp", scores, g_c)
        if gh is not None:
            to_end = torch.exp(la[:, -1:, :] - la)
            gxd = gxd + torch.einsum("bshn,bhpn->bshp", B_c * to_end.unsqueeze(-1), gh)
        dx[:, sl] = gxd * dt_c.unsqueeze(-1)
        gh_new = torch.einsum("blhn,blhp->bhpn", C_c * torch.exp(la).unsqueeze(-1), g_c)
        if gh is not None:
            gh_new = gh_new + torch.exp(la[:, -1])[:, :, None, None] * gh
        gh = gh_new
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


def _ssd_chunk_grad(g, x, dt, A, B, C, h0, gh):
    """Gradients of one chunk of :func:`_ssd_chunk` (B, C per head).

    ``g`` is the gradient of the chunk's output, ``gh`` that of the state it hands on (``None``
    for the last chunk), ``h0`` the state it starts from (``None`` for the first).

    Returns:
        ``(dx, ddt, dA, dB, dC, dh0)``; ``dh0`` is ``None`` when ``h0`` is.
    """
    la, decay = _chunk_decays(dt, A)
    xd = x * dt.unsqueeze(-1)
    scores = torch.einsum("blhn,bshn->blsh", C, B) * decay
    dxd = torch.einsum("blsh,blhp->bshp", scores, g)
    dscores = torch.einsum("blhp,bshp->blsh", g, xd)
    dseg = dscores * scores  # gradient of the log segment decays (zero above the diagonal)
    dscores.mul_(decay)  # now the gradient of C_l . B_s
    dC = torch.einsum("blsh,bshn->blhn", dscores, B)
    dB = torch.einsum("blsh,blhn->bshn", dscores, C)
    dla = dseg.sum(2) - dseg.sum(1)  # la_l enters as +la_l in row l and as -la_s in column s
    dh0 = None
    if h0 is not None:
        grown = g * torch.exp(la).unsqueeze(-1)
        dC = dC + torch.einsum("blhp,bhpn->blhn", grown, h0)
        dla = dla + (grown * torch.einsum("blhn,bhpn->blhp", C, h0)).sum(-1)
        dh0 = torch.einsum("blhp,blhn->bhpn", grown, C)
    if gh is not None:
        to_end = torch.exp(la[:, -1:, :] - la).unsqueeze(-1)
        ghB = torch.einsum("bshn,bhpn->bshp", B, gh)
        dxd = dxd + ghB * to_end
        dB = dB + torch.einsum("bshp,bhpn->bshn", xd * to_end, gh)
        dw = (xd * ghB * to_end).sum(-1)  # gradient of the log decay to the chunk's end, per step
        dla = dla - dw
        dla[:, -1] += dw.sum(1)
        if h0 is not None:
            decay_all = torch.exp(la[:, -1])
            dh0 = dh0 + decay_all[:, :, None, None] * gh
            dla[:, -1] += decay_all * (gh * h0).sum((-1, -2))
    da = dla.flip(1).cumsum(1).flip(1)  # la = cumsum(dt * A)
    dx = dxd * dt.unsqueeze(-1)
    ddt = (dxd * x).sum(-1) + da * A
    dA = (da * dt).sum((0, 1))
    return dx, ddt, dA, dB, dC, dh0


def _group_sum(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-head ``(b, T, h, n)`` gradients summed back onto ``groups`` shared groups."""
    b, T, h, n = t.shape
    return t if groups == h else t.reshape(b, T, groups, h // groups, n).sum(3)


def ssd_scan_grad_bwd_torch(g, x, dt, A, B, C, D, starts: list[torch.Tensor], chunk: int, needs: tuple[bool, ...]):
    """The true gradient of the SSD scan; float32 inputs.

    Walks the chunks backwards from the states saved at their borders (``starts``), carrying the
    gradient of the state between chunks, with each chunk's gradients in closed form
    (:func:`_ssd_chunk_grad`).

    Returns:
        ``(dx, ddt, dA, dB, dC, dD)``; an entry is ``None`` where ``needs`` says it is not wanted.
    """
    heads, groups, T = x.shape[2], B.shape[2], x.shape[1]
    Bh, Ch = _heads(B, heads), _heads(C, heads)
    dx, ddt = torch.empty_like(x), torch.empty_like(dt)
    dB, dC = torch.empty_like(B), torch.empty_like(C)
    dA = torch.zeros_like(A)
    gh = None
    for index, t0 in reversed(list(enumerate(range(0, T, chunk)))):
        sl = slice(t0, t0 + chunk)
        h0 = starts[index - 1] if index else None
        dx[:, sl], ddt[:, sl], dA_c, dB_c, dC_c, gh = _ssd_chunk_grad(
            g[:, sl], x[:, sl], dt[:, sl], A, Bh[:, sl], Ch[:, sl], h0, gh
        )
        dA += dA_c
        dB[:, sl], dC[:, sl] = _group_sum(dB_c, groups), _group_sum(dC_c, groups)
    dD = None
    if D is not None:
        dx += _skip(D, g)
        if needs[5]:
            gx = g * x
            dD = gx.sum((0, 1, 3)) if D.dim() == 1 else gx.sum((0, 1))
    return tuple(t if need else None for t, need in zip((dx, ddt, dA, dB, dC, dD), needs))


class SSDScanGradFn(torch.autograd.Function):
    """Forward: the chunked SSD scan. Backward: its true gradient in every input, chunk by chunk
    from the states saved at the chunk borders."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, chunk):
        inputs = [acc(t) for t in (x, dt, A, B, C, D)]
        starts: list[torch.Tensor] = []
        y = ssd_scan_fwd_torch(*inputs, chunk=chunk, starts=starts)
        ctx.save_for_backward(*[t for t in inputs if t is not None], *starts)
        ctx.has_d, ctx.chunk, ctx.starts = D is not None, chunk, len(starts)
        ctx.dtypes = [None if t is None else t.dtype for t in (x, dt, A, B, C, D)]
        return y

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        starts = saved[len(saved) - ctx.starts:]
        x, dt, A, B, C, *rest = saved[: len(saved) - ctx.starts]
        D = rest[0] if ctx.has_d else None
        grads = ssd_scan_grad_bwd_torch(acc(grad_out), x, dt, A, B, C, D, starts, ctx.chunk, tuple(ctx.needs_input_grad[:6]))
        out = [None if gr is None else gr.to(dtype) for gr, dtype in zip(grads, ctx.dtypes)]
        return (*out, None)


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

"""Mamba-1 selective scan and its MambaLRP rule.

Forward (per channel ``d`` and state ``n``)::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t        y_t = C_t . h_t + D * x_t

The SSM rule treats ``dt``, ``Abar = exp(dt * A)``, ``Bbar = dt * B`` and ``C`` as constants: only
``x`` receives a gradient, and it comes from the reverse linear scan::

    s_t = Abar_{t+1} * s_{t+1} + C_t * g_t                  dx_t = Bbar_t . s_t + D * g_t

which never needs the forward states. Both directions run chunk by chunk, so memory is ``O(batch * T * (d_inner + d_state))`` plus one chunk.

Layout (as in mamba_ssm): ``x, dt: (b, d, T)``, ``A: (d, n)``, ``B, C: (b, n, T)``, ``D: (d,)``;
``dt`` is the final step size (softplus and bias already applied). Computation is in float32;
the output is float32.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from mambalrp.functional.scan_fn import scan_lrp_function
from mambalrp.functional.scan_core import acc, chunk_length, scan_forward


def check_shapes(x, dt, A, B, C, D) -> None:
    """Raise ``ValueError`` naming the first argument whose shape does not fit the layout."""
    if x.dim() != 3 or dt.shape != x.shape:
        raise ValueError(f"x and dt must both be (batch, d_inner, T); got {tuple(x.shape)} and {tuple(dt.shape)}")
    b, d, T = x.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (d_inner={d}, d_state); got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (b, n, T):
            raise ValueError(f"{name} must be (batch, d_state, T) = {(b, n, T)}; got {tuple(t.shape)}")
    if D is not None and tuple(D.shape) != (d,):
        raise ValueError(f"D must be (d_inner,) = ({d},); got {tuple(D.shape)}")


def _time_major(t: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
    """``(b, c, T)`` -> a ``(L, b, c)`` view of steps ``t0..t1``."""
    return t[:, :, t0:t1].permute(2, 0, 1)


def _decays(dtc: torch.Tensor, A: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``Abar = exp(dt * A)`` of one chunk, ``(L, b, d, n)``, written into ``out``."""
    return torch.mul(dtc.unsqueeze(-1), A, out=out).exp_()


def selective_scan_fwd_torch(x, dt, A, B, C, D, chunk: int | None = None) -> torch.Tensor:
    """Chunked forward without autograd; float32 inputs. Returns ``y`` (b, d, T).

    Per chunk, the decays and inputs are computed in bulk into two reused ``(L, b, d, n)``
    buffers; the recurrence is one fused multiply-add per step, in place, on a ``(b, d, n)``
    state (this beats a log-depth parallel scan on CPU); ``C . h`` is one batched matmul.
    """
    b, d, T = x.shape
    n = A.shape[1]
    chunk = min(T, chunk or chunk_length(b, d, n))
    y = x.new_empty(b, d, T)
    abar_buf, h_buf = x.new_empty(chunk, b, d, n), x.new_empty(chunk, b, d, n)
    h = None
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        dtc = _time_major(dt, t0, t1)
        abar = _decays(dtc, A, abar_buf[: t1 - t0])
        hs = h_buf[: t1 - t0]
        torch.mul((dtc * _time_major(x, t0, t1)).unsqueeze(-1), _time_major(B, t0, t1).unsqueeze(2), out=hs)
        if h is not None:
            hs[0].addcmul_(abar[0], h)
        for i in range(1, t1 - t0):
            hs[i].addcmul_(abar[i], hs[i - 1])
        h = hs[-1].clone()
        y[:, :, t0:t1] = torch.matmul(hs, _time_major(C, t0, t1).unsqueeze(-1)).squeeze(-1).permute(1, 2, 0)
    if D is not None:
        y = torch.addcmul(y, D[:, None], x)
    return y


def selective_scan_lrp_bwd_torch(g, dt, A, B, C, D, chunk: int | None = None) -> torch.Tensor:
    """Reverse scan of the SSM rule; float32 inputs. Returns ``dx`` (b, d, T)."""
    b, d, T = g.shape
    n = A.shape[1]
    chunk = min(T, chunk or chunk_length(b, d, n))
    dx = g.new_empty(b, d, T)
    abar_buf, s_buf = g.new_empty(chunk, b, d, n), g.new_empty(chunk, b, d, n)
    carry = None  # Abar_{t1} * s_{t1}: what the chunk after this one sends back
    for t0 in reversed(range(0, T, chunk)):
        t1 = min(T, t0 + chunk)
        dtc = _time_major(dt, t0, t1)
        abar = _decays(dtc, A, abar_buf[: t1 - t0])
        s = s_buf[: t1 - t0]
        torch.mul(_time_major(g, t0, t1).unsqueeze(-1), _time_major(C, t0, t1).unsqueeze(2), out=s)
        # s_t = Abar_{t+1} * s_{t+1} + C_t * g_t, walking backwards through the chunk.
        last = t1 - t0 - 1
        if carry is not None:
            s[last] += carry
        for i in range(last - 1, -1, -1):
            s[i].addcmul_(abar[i + 1], s[i + 1])
        dx[:, :, t0:t1] = (dtc * torch.matmul(s, _time_major(B, t0, t1).unsqueeze(-1)).squeeze(-1)).permute(1, 2, 0)
        carry = abar[0] * s[0]
    if D is not None:
        dx = torch.addcmul(dx, D[:, None], g)
    return dx


SelectiveScanLRPFn = scan_lrp_function(
    "selective_scan",
    selective_scan_fwd_torch,
    selective_scan_lrp_bwd_torch,
    "Forward: the selective scan. Backward: the SSM rule (``dx`` only, by a reverse scan).",
)


def selective_scan_lrp(x, dt, A, B, C, D=None) -> torch.Tensor:
    """Selective scan whose backward is the MambaLRP SSM rule.

    Args:
        x: SSM input ``(b, d, T)``.
        dt: Step size after softplus ``(b, d, T)``.
        A: State matrix (negative) ``(d, n)``.
        B: Input matrix ``(b, n, T)``.
        C: Output matrix ``(b, n, T)``.
        D: Skip ``(d,)`` or ``None``.

    Returns:
        ``y`` ``(b, d, T)`` in float32. Only ``x`` receives a gradient.
    """
    check_shapes(x, dt, A, B, C, D)
    return SelectiveScanLRPFn.apply(x, dt, A, B, C, D)


def _differentiable_chunk(x, dt, A, B, C, h0):
    abar = torch.exp(dt.unsqueeze(-1) * A[:, None, :])  # (b, d, L, n)
    bbar = dt.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)
    prod, hs = scan_forward(abar, bbar * x.unsqueeze(-1))
    if h0 is not None:
        hs = hs + prod * h0.unsqueeze(2)
    return torch.einsum("bdln,bnl->bdl", hs, C), hs[:, :, -1]


def selective_scan_grad(x, dt, A, B, C, D=None, chunk: int | None = None) -> torch.Tensor:
    """Selective scan with its true gradient (for gradient x input and rule ablations).

    Each chunk is checkpointed, so memory stays linear in T; the backward recomputes one chunk
    at a time. Arguments as in :func:`selective_scan_lrp`.
    """
    check_shapes(x, dt, A, B, C, D)
    x32, dt32, A32, B32, C32 = (acc(t) for t in (x, dt, A, B, C))
    b, d, T = x.shape
    chunk = chunk or chunk_length(b, d, A.shape[1])
    outs, h = [], None
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        args = (x32[:, :, t0:t1], dt32[:, :, t0:t1], A32, B32[:, :, t0:t1], C32[:, :, t0:t1], h)
        y, h = checkpoint(_differentiable_chunk, *args, use_reentrant=False)
        outs.append(y)
    y = torch.cat(outs, dim=-1)
    if D is not None:
        y = y + acc(D)[:, None] * x32
    return y


def selective_scan(x, dt, A, B, C, D=None, rule: Literal["lrp", "gradient"] = "lrp") -> torch.Tensor:
    """Selective scan with the SSM rule (``"lrp"``) or its true gradient (``"gradient"``)."""
    if rule == "lrp":
        return selective_scan_lrp(x, dt, A, B, C, D)
    if rule == "gradient":
        return selective_scan_grad(x, dt, A, B, C, D)
    raise ValueError(f"unknown SSM rule {rule!r}; expected 'lrp' or 'gradient'")


def selective_scan_ref(x, dt, A, B, C, D=None, detach: bool = True) -> torch.Tensor:
    """Sequential reference: materialised discretisation and a Python loop over time.

    With ``detach=True`` the coefficients ``dt``, ``Abar``, ``Bbar``, ``C`` are detached, so
    autograd through this function is the SSM rule; with ``detach=False`` it is the true gradient.
    This is the formulation of the original MambaLRP code (memory ``O(b * d * T * n)``).
    """
    x, dt, A, B, C = (acc(t) for t in (x, dt, A, B, C))
    if detach:
        dt, A, B, C = dt.detach(), A.detach(), B.detach(), C.detach()
    abar = torch.exp(dt.unsqueeze(-1) * A[:, None, :])  # b d T n
    bbar = dt.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # b d T n
    h = torch.zeros(x.shape[0], x.shape[1], A.shape[1], dtype=x.dtype, device=x.device)
    ys = []
    for t in range(x.shape[-1]):
        h = abar[:, :, t] * h + bbar[:, :, t] * x[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + acc(D)[:, None] * x
    return y

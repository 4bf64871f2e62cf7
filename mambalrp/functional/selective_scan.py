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
from mambalrp.functional.scan_fn import scan_grad_function, scan_lrp_function
from mambalrp.functional.scan_core import acc, chunk_length


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


def _stored_time_major(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The same ``(b, c, T)`` tensors, stored time-major (a ``(T, b, c)`` contiguous tensor seen
    as ``(b, c, T)``; no copy for those already stored so): every chunk's steps are then one
    contiguous block, which the bulk operations per chunk read several times faster."""
    return [None if t is None else t.permute(2, 0, 1).contiguous().permute(1, 2, 0) for t in ts]


def _time_major_inputs(x, dt, A, B, C, D) -> list[torch.Tensor | None]:
    """The scan's inputs with ``x``, ``dt``, ``B`` and ``C`` stored time-major: copied once, read
    so by the forward and saved so for the true gradient's backward."""
    x, dt, B, C = _stored_time_major(x, dt, B, C)
    return [x, dt, A, B, C, D]


def _decays(dtc: torch.Tensor, A: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``Abar = exp(dt * A)`` of one chunk, ``(L, b, d, n)``, written into ``out``."""
    return torch.mul(dtc.unsqueeze(-1), A, out=out).exp_()


def _contract_state(states: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``states . v`` over the state dimension: ``(L, b, d, n)`` and ``(L, b, n)`` -> ``(L, b, d)``,
    written into ``out``. As one row vector times the transposed states per step, which BLAS
    runs several times faster than the states times a column vector."""
    return torch.matmul(v.unsqueeze(2), states.transpose(-1, -2), out=out.unsqueeze(2)).squeeze(2)


def _chunk_states(x, dt, A, B, t0: int, t1: int, h0, abar_buf, h_buf) -> tuple[torch.Tensor, torch.Tensor]:
    """Decays and states of steps ``t0..t1`` entering from state ``h0`` (``None``: zero), written
    into the buffers. Returns ``(abar, hs)``, both ``(L, b, d, n)``."""
    dtc = _time_major(dt, t0, t1)
    abar = _decays(dtc, A, abar_buf[: t1 - t0])
    hs = h_buf[: t1 - t0]
    torch.mul((dtc * _time_major(x, t0, t1)).unsqueeze(-1), _time_major(B, t0, t1).unsqueeze(2), out=hs)
    if h0 is not None:
        hs[0].addcmul_(abar[0], h0)
    for i in range(1, t1 - t0):
        hs[i].addcmul_(abar[i], hs[i - 1])
    return abar, hs


def selective_scan_fwd_torch(
    x, dt, A, B, C, D, chunk: int | None = None, starts: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """Chunked forward without autograd; float32 inputs. Returns ``y`` (b, d, T).

    Per chunk, the decays and inputs are computed in bulk into two reused ``(L, b, d, n)``
    buffers; the recurrence is one fused multiply-add per step, in place, on a ``(b, d, n)``
    state (this beats a log-depth parallel scan on CPU); ``C . h`` is one batched matmul.
    With ``starts`` (a list), the state entering every chunk after the first is appended to it
    (what the true gradient's backward recomputes the chunks from).
    """
    b, d, T = x.shape
    n = A.shape[1]
    chunk = min(T, chunk or chunk_length(b, d, n))
    x, dt, B, C = _stored_time_major(x, dt, B, C)
    y = x.new_empty(T, b, d)  # time-major; returned as (b, d, T)
    abar_buf, h_buf = x.new_empty(chunk, b, d, n), x.new_empty(chunk, b, d, n)
    # The state leaving each chunk but the last: all kept for ``starts``, else one reused buffer.
    borders = x.new_empty(max(0, -(-T // chunk) - 1) if starts is not None else 1, b, d, n)
    h = None
    for index, t0 in enumerate(range(0, T, chunk)):
        t1 = min(T, t0 + chunk)
        _, hs = _chunk_states(x, dt, A, B, t0, t1, h, abar_buf, h_buf)
        if t1 < T:
            h = borders[index if starts is not None else 0].copy_(hs[-1])
        _contract_state(hs, _time_major(C, t0, t1), y[t0:t1])
    if starts is not None:
        starts.extend(borders.unbind(0))
    y = y.permute(1, 2, 0)
    if D is not None:
        y = torch.addcmul(y, D[:, None], x)
    return y


def selective_scan_lrp_bwd_torch(g, dt, A, B, C, D, chunk: int | None = None) -> torch.Tensor:
    """Reverse scan of the SSM rule; float32 inputs. Returns ``dx`` (b, d, T).

    ``dt``, ``B`` and ``C`` of batch 1 broadcast against a ``g`` of larger batch (a batch of
    cotangents of one sequence, :func:`mambalrp.functional.scan_fn.batchable_backward`): the decays
    are then computed once for all of them.
    """
    b, d, T = g.shape
    n = A.shape[1]
    chunk = min(T, chunk or chunk_length(b, d, n))
    g, dt, B, C = _stored_time_major(g, dt, B, C)
    dx = g.new_empty(T, b, d)  # time-major; returned as (b, d, T)
    abar_buf, s_buf = dt.new_empty(chunk, dt.shape[0], d, n), g.new_empty(chunk, b, d, n)
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
        _contract_state(s, _time_major(B, t0, t1), dx[t0:t1]).mul_(dtc)
        carry = abar[0] * s[0]
    dx = dx.permute(1, 2, 0)
    if D is not None:
        dx = torch.addcmul(dx, D[:, None], g)
    return dx


SelectiveScanLRPFn = scan_lrp_function(
    "selective_scan",
    selective_scan_fwd_torch,
    selective_scan_lrp_bwd_torch,
    "Forward: the selective scan. Backward: the SSM rule (``dx`` only, by a reverse scan).",
    broadcasts=True,
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


def selective_scan_grad_bwd_torch(
    g, x, dt, A, B, C, D, starts: list[torch.Tensor], chunk: int, needs: tuple[bool, ...]
) -> tuple[torch.Tensor | None, ...]:
    """The true gradient of the selective scan; float32 inputs.

    Walks the chunks backwards: recomputes each chunk's decays and states from the state that
    entered it (``starts``, saved by the forward), runs the adjoint scan ``s_t = Abar_{t+1} s_{t+1}
    + C_t g_t`` over it, and reads every gradient off ``s`` and the states::

        dx_t = dt_t (s_t . B_t) + D g_t          dC_t = sum_d g_t h_t
        dB_t = sum_d dt_t x_t s_t                 q_t = s_t * Abar_t * h_{t-1}
        ddt_t = x_t (s_t . B_t) + sum_n A q_t     dA = sum_{b,t} dt_t q_t          dD = sum g x

    Returns:
        ``(dx, ddt, dA, dB, dC, dD)``; an entry is ``None`` where ``needs`` (one flag per input)
        says its gradient is not wanted.
    """
    b, d, T = g.shape
    n = A.shape[1]
    chunk = min(T, chunk)
    g, x, dt, B, C = _stored_time_major(g, x, dt, B, C)
    # Time-major (T, b, .) outputs, written chunk by chunk in place; returned as (b, ., T).
    dx, ddt = g.new_empty(T, b, d), g.new_empty(T, b, d)
    dB, dC = g.new_empty(T, b, n), g.new_empty(T, b, n)
    dA = torch.zeros_like(A) if needs[2] else None
    abar_buf, h_buf, s_buf = (g.new_empty(chunk, b, d, n) for _ in range(3))
    ones = g.new_ones(n)
    carry = None  # Abar_{t1} * s_{t1}: what the chunk after this one sends back
    for index, t0 in reversed(list(enumerate(range(0, T, chunk)))):
        t1 = min(T, t0 + chunk)
        last = t1 - t0 - 1
        h0 = starts[index - 1] if index else None
        abar, hs = _chunk_states(x, dt, A, B, t0, t1, h0, abar_buf, h_buf)
        gc, xc, dtc = _time_major(g, t0, t1), _time_major(x, t0, t1), _time_major(dt, t0, t1)
        Bc, Cc = _time_major(B, t0, t1), _time_major(C, t0, t1)
        torch.matmul(gc.unsqueeze(2), hs, out=dC[t0:t1].unsqueeze(2))
        s = s_buf[: last + 1]
        torch.mul(gc.unsqueeze(-1), Cc.unsqueeze(2), out=s)
        if carry is not None:
            s[last] += carry
        for i in range(last - 1, -1, -1):
            s[i].addcmul_(abar[i + 1], s[i + 1])
        carry = abar[0] * s[0]
        sB = _contract_state(s, Bc, ddt[t0:t1])  # (L, b, d), in ddt's place until the end of the chunk
        torch.mul(dtc, sB, out=dx[t0:t1])
        torch.matmul((dtc * xc).unsqueeze(2), s, out=dB[t0:t1].unsqueeze(2))
        # q_t = s_t * Abar_t * h_{t-1}, built in the decay buffer (h_{-1} of the first chunk is 0).
        q = abar
        q[1:].mul_(hs[:-1])
        if h0 is None:
            q[0].zero_()
        else:
            q[0].mul_(h0)
        q.mul_(s)
        if dA is not None:
            dA += torch.einsum("lbdn,lbd->dn", q, dtc)
        # ddt_t = x_t (s_t . B_t) + sum_n A q_t (the sum over n as one matrix-vector product).
        sB.mul_(xc).view(-1).addmv_(q.mul_(A).view(-1, n), ones)
    dx, ddt, dB, dC = (t.permute(1, 2, 0) for t in (dx, ddt, dB, dC))
    dD = None
    if D is not None:
        dx = torch.addcmul(dx, D[:, None], g)
        if needs[5]:
            dD = (g * x).sum((0, 2))
    return tuple(t if need else None for t, need in zip((dx, ddt, dA, dB, dC, dD), needs))


SelectiveScanGradFn = scan_grad_function(
    selective_scan_fwd_torch,
    selective_scan_grad_bwd_torch,
    "Forward: the chunked selective scan. Backward: its true gradient in every input, by recomputing one chunk's states at a time (memory stays linear in ``T``).",
    stored=_time_major_inputs,
)


def selective_scan_grad(x, dt, A, B, C, D=None, chunk: int | None = None) -> torch.Tensor:
    """Selective scan with its true gradient (for gradient x input and rule ablations).

    The same chunked forward as :func:`selective_scan_lrp`; the backward
    (:class:`SelectiveScanGradFn`) recomputes one chunk's states at a time from the states saved
    at the chunk borders, so memory stays linear in T. Arguments as in
    :func:`selective_scan_lrp`; every input that requires a gradient gets its true gradient.
    """
    check_shapes(x, dt, A, B, C, D)
    b, d, _ = x.shape
    return SelectiveScanGradFn.apply(x, dt, A, B, C, D, chunk or chunk_length(b, d, A.shape[1]))


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

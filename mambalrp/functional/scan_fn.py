"""The autograd Functions shared by the scans: the SSM rule, and the true gradient.

Both scans are linear in ``x`` once ``dt``, the decays, ``B`` and ``C`` are held constant, so the
SSM rule's backward is the adjoint scan applied to the incoming gradient, and only ``x`` gets a
gradient. The implementations (chunked torch or Triton) are chosen per call by
:mod:`mambalrp.functional.dispatch`; accumulation is in float32 (float64 stays float64).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

from mambalrp.functional import dispatch
from mambalrp.functional.scan_core import acc

ScanImpl = Callable[..., torch.Tensor]

_BATCHABLE: dict[str, ScanImpl] = {}


def batchable_backward(op: str, torch_bwd: ScanImpl, broadcasts: bool) -> ScanImpl:
    """``torch_bwd`` as an operator that also takes a batch of cotangents under ``torch.func.vmap``.

    The reverse scan is linear in its cotangent ``g``, so ``k`` cotangents of a ``(b, ...)`` scan
    are one reverse scan of a ``(k * b, ...)`` cotangent against the same coefficients (what
    :mod:`mambalrp.shared_forward` uses to explain many outputs of one sequence in one backward
    pass). The returned callable is ``torch_bwd`` registered as the operator
    ``mambalrp::<op>_lrp_bwd``, whose batching rule does that fold: with ``broadcasts`` (the
    implementation broadcasts coefficients of batch 1 against a larger ``g``) and coefficients of
    batch 1, they are passed as they are and read once; else they are repeated ``k`` times.

    Args:
        op: Name of the scan (``"selective_scan"``, ``"ssd_scan"``).
        torch_bwd: ``(g, dt, A, B, C, D) -> dx``; ``A`` has no batch dimension, the others have
            it first.
        broadcasts: Whether ``torch_bwd`` accepts ``dt``, ``B`` and ``C`` of batch 1 with a ``g`` of
            larger batch.

    Returns:
        A callable with ``torch_bwd``'s signature (without further keywords).
    """
    if op in _BATCHABLE:
        return _BATCHABLE[op]
    name = f"mambalrp::{op}_lrp_bwd"

    @torch.library.custom_op(name, mutates_args=())
    def reverse(g: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor]) -> Tensor:  # noqa: UP045
        return torch_bwd(g, dt, A, B, C, D)

    @torch.library.register_vmap(name)
    def reverse_batched(info: Any, in_dims: tuple[Any, ...], g, dt, A, B, C, D) -> tuple[Tensor, int]:
        if any(dim is not None for dim in in_dims[1:]):  # batched coefficients: one scan per item
            out = torch.stack([reverse(*_item(i, in_dims, (g, dt, A, B, C, D))) for i in range(info.batch_size)])
            return out, 0
        g = g.movedim(in_dims[0], 0)
        k, b = g.shape[0], g.shape[1]
        folded = g.reshape(k * b, *g.shape[2:])
        coefficients = [dt, B, C]
        if not (broadcasts and b == 1):
            coefficients = [t.repeat(k, *([1] * (t.dim() - 1))) for t in coefficients]
        dt_, B_, C_ = coefficients
        out = reverse(folded, dt_, A, B_, C_, D)
        return out.reshape(k, b, *out.shape[1:]), 0

    _BATCHABLE[op] = reverse
    return reverse


def _item(i: int, in_dims: tuple[Any, ...], args: tuple[Any, ...]) -> list[Any]:
    return [a if dim is None or a is None else a.select(dim, i) for a, dim in zip(args, in_dims)]


def scan_lrp_function(
    op: str, torch_fwd: ScanImpl, torch_bwd: ScanImpl, doc: str, broadcasts: bool = False
) -> type[torch.autograd.Function]:
    """Build the ``torch.autograd.Function`` of a scan rule.

    Args:
        op: Dispatch name; Triton kernels are looked up as ``op + "_fwd"`` / ``op + "_lrp_bwd"``.
        torch_fwd: ``(x, dt, A, B, C, D) -> y`` on accumulation-dtype tensors.
        torch_bwd: ``(g, dt, A, B, C, D) -> dx``, the adjoint of ``torch_fwd`` in ``x``.
        doc: Docstring of the class.
        broadcasts: ``torch_bwd`` broadcasts coefficients of batch 1 against a larger cotangent
            (see :func:`batchable_backward`; the torch backward then also runs with a batch of
            cotangents under ``torch.func.vmap`` without repeating the coefficients).

    Returns:
        A Function whose ``apply(x, dt, A, B, C, D)`` returns ``y`` in the accumulation dtype.
    """
    torch_bwd = batchable_backward(op, torch_bwd, broadcasts)

    def implementations(x: torch.Tensor) -> tuple[ScanImpl, ScanImpl, bool]:
        if dispatch.resolve(x, op) == "triton":
            kernels = dispatch.triton_kernels()
            return getattr(kernels, op + "_fwd"), getattr(kernels, op + "_lrp_bwd"), True
        return torch_fwd, torch_bwd, False

    class ScanLRPFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, dt, A, B, C, D):
            fwd, _, kernel = implementations(x)
            coefficients = [acc(t) for t in (dt, A, B, C, D)]
            if kernel:
                # The kernels walk time within each channel: a contiguous time axis makes their
                # loads coalesced. One copy here serves both the forward and the reverse scan
                # (adapters often pass dt, B and C as transposed views of a projection).
                coefficients = [None if t is None else t.contiguous() for t in coefficients]
            ctx.save_for_backward(*[t for t in coefficients if t is not None])
            ctx.has_d = D is not None
            ctx.x_dtype = x.dtype
            return fwd(acc(x), *coefficients)

        @staticmethod
        def backward(ctx, grad_out):
            saved = list(ctx.saved_tensors)
            D = saved.pop() if ctx.has_d else None
            dt, A, B, C = saved
            _, bwd, kernel = implementations(grad_out)
            # The kernels want a contiguous gradient; the torch paths read any layout (the
            # chunked ones copy it into their own, once).
            g = acc(grad_out)
            dx = bwd(g.contiguous() if kernel else g, dt, A, B, C, D)
            return dx.to(ctx.x_dtype), None, None, None, None, None

    ScanLRPFn.__doc__ = doc
    return ScanLRPFn


def scan_grad_function(
    torch_fwd: ScanImpl,
    torch_grad_bwd: ScanImpl,
    doc: str,
    stored: Callable[..., list[torch.Tensor | None]] | None = None,
) -> type[torch.autograd.Function]:
    """Build the ``torch.autograd.Function`` of a scan with its true gradient (Gradient x Input,
    rule ablations).

    Args:
        torch_fwd: ``(x, dt, A, B, C, D, chunk=, starts=) -> y`` on accumulation-dtype tensors;
            appends to ``starts`` the states the backward restarts from.
        torch_grad_bwd: ``(g, x, dt, A, B, C, D, starts, chunk, needs) -> (dx, ddt, dA, dB, dC,
            dD)``, each ``None`` where ``needs`` says so.
        doc: Docstring of the class.
        stored: ``(x, dt, A, B, C, D) -> [x, dt, A, B, C, D]``, the same values in the layout the
            forward reads and the backward gets saved (``None``: as they come).

    Returns:
        A Function whose ``apply(x, dt, A, B, C, D, chunk)`` returns ``y`` in the accumulation
        dtype; memory stays linear in ``T`` (only the saved states, not every step's).
    """

    class ScanGradFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, dt, A, B, C, D, chunk):
            inputs = [acc(t) for t in (x, dt, A, B, C, D)]
            if stored is not None:
                inputs = stored(*inputs)
            starts: list[torch.Tensor] = []
            y = torch_fwd(*inputs, chunk=chunk, starts=starts)
            ctx.save_for_backward(*[t for t in inputs if t is not None], *starts)
            ctx.has_d, ctx.chunk, ctx.starts = D is not None, chunk, len(starts)
            ctx.dtypes = [None if t is None else t.dtype for t in (x, dt, A, B, C, D)]
            return y

        @staticmethod
        def backward(ctx, grad_out):
            saved = list(ctx.saved_tensors)
            starts = saved[len(saved) - ctx.starts :]
            x, dt, A, B, C, *rest = saved[: len(saved) - ctx.starts]
            D = rest[0] if ctx.has_d else None
            grads = torch_grad_bwd(acc(grad_out), x, dt, A, B, C, D, starts, ctx.chunk, tuple(ctx.needs_input_grad[:6]))
            out = [None if gr is None else gr.to(dtype) for gr, dtype in zip(grads, ctx.dtypes)]
            return (*out, None)

    ScanGradFn.__doc__ = doc
    return ScanGradFn

"""Choice of the implementation behind the scan operators: chunked torch or Triton kernels.

``"auto"`` uses the Triton kernels for CUDA tensors when :mod:`mambalrp.kernels` provides them,
and the chunked torch path otherwise. ``"torch"`` and ``"triton"`` force one path; forcing Triton
where it cannot run raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType
from typing import Literal

import torch

Backend = Literal["auto", "torch", "triton"]
_BACKENDS = ("auto", "torch", "triton")
_current: Backend = "auto"


def get_backend() -> Backend:
    """Return the backend currently selected for the scan operators."""
    return _current


def set_backend(backend: Backend) -> None:
    """Select the backend for the scan operators process-wide.

    Args:
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
    """
    global _current
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {_BACKENDS}")
    _current = backend


@contextlib.contextmanager
def use_backend(backend: Backend) -> Iterator[None]:
    """Select a backend inside a ``with`` block and restore the previous one on exit."""
    previous = get_backend()
    set_backend(backend)
    try:
        yield
    finally:
        set_backend(previous)


def triton_kernels() -> ModuleType | None:
    """Return the kernels module if Triton kernels are importable, else ``None``."""
    try:
        from mambalrp import kernels
    except ImportError:
        return None
    return kernels if getattr(kernels, "AVAILABLE", False) else None


def resolve(x: torch.Tensor, op: str) -> str:
    """Decide which implementation runs the operator ``op`` on tensors like ``x``.

    Args:
        x: A tensor of the call (its device decides under ``"auto"``).
        op: Name of the operator, e.g. ``"selective_scan"`` or ``"ssd_scan"``.

    Returns:
        ``"torch"`` or ``"triton"``.
    """
    backend = _current
    if backend == "torch":
        return "torch"
    kernels = triton_kernels()
    has_op = kernels is not None and hasattr(kernels, op + "_fwd")
    if backend == "triton":
        if not has_op:
            raise RuntimeError(
                f"backend 'triton' was forced but no Triton kernel for {op!r} is available "
                "(install the 'triton' extra; on CPU set TRITON_INTERPRET=1)"
            )
        return "triton"
    return "triton" if has_op and x.is_cuda else "torch"

"""Triton kernels for the scans (installed as ``mambalrp.kernels``).

A kernel module exposes ``AVAILABLE`` and, per operator ``op``, functions ``op_fwd`` and
``op_lrp_bwd`` with the signatures of the torch implementations in
``mambalrp.functional.selective_scan`` / ``mambalrp.functional.ssd`` /
``mambalrp.functional.delta_rule`` / ``mambalrp.functional.mamba3``;
``mambalrp.functional.dispatch`` routes CUDA tensors to them.

``AVAILABLE`` is ``True`` when Triton imports. On a machine without a GPU the kernels run under
the Triton interpreter if ``TRITON_INTERPRET=1`` is set before Triton is first imported.
"""

try:
    import triton  # noqa: F401
except ImportError:
    AVAILABLE = False
    __all__ = ["AVAILABLE"]
else:
    from .delta_rule import gated_delta_rule_fwd, gated_delta_rule_lrp_bwd
    from .mamba3 import mamba3_scan_fwd, mamba3_scan_lrp_bwd
    from .selective_scan import selective_scan_fwd, selective_scan_lrp_bwd
    from .ssd import ssd_scan_fwd, ssd_scan_lrp_bwd

    AVAILABLE = True
    __all__ = [
        "AVAILABLE",
        "gated_delta_rule_fwd",
        "gated_delta_rule_lrp_bwd",
        "mamba3_scan_fwd",
        "mamba3_scan_lrp_bwd",
        "selective_scan_fwd",
        "selective_scan_lrp_bwd",
        "ssd_scan_fwd",
        "ssd_scan_lrp_bwd",
    ]

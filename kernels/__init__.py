"""Triton kernels for the scans (installed as ``mambalrp.kernels``).

A kernel module exposes ``AVAILABLE`` and, per operator ``op``, functions ``op_fwd`` and
``op_lrp_bwd`` with the signatures of the torch implementations in
``mambalrp.functional.selective_scan`` / ``mambalrp.functional.ssd``;
``mambalrp.functional.dispatch`` routes CUDA tensors to them.
"""

AVAILABLE = False

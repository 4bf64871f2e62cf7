"""Triton kernels of the Mamba-3 scan against the chunked torch implementation and the sequential
reference.

Without CUDA the kernels run on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set
before the kernels are defined, as in ``test_kernels.py``); the shapes are tiny because the
interpreter is slow. With CUDA the same tests run on the GPU, plus a ``gpu``-marked larger one.
The kernel is also compiled ahead of time to ``cubin`` for sm_80 and sm_90 (no GPU needed).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(
            "triton was imported before TRITON_INTERPRET=1 was set; run: TRITON_INTERPRET=1 python -m pytest ...",
            allow_module_level=True,
        )
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from mambalrp import kernels  # noqa: E402
from mambalrp.functional import dispatch  # noqa: E402
from mambalrp.functional.mamba3 import (  # noqa: E402
    mamba3_scan_lrp,
    mamba3_scan_lrp_bwd_torch,
    mamba3_scan_ref,
)

if not kernels.AVAILABLE:
    pytest.skip("mambalrp.kernels reports no Triton kernels", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {"rtol": 1e-5, "atol": 1e-4}


def inputs(b=1, T=6, R=None, h=2, p=3, g=1, n=4, with_d=True, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    lead = (b, T) if R is None else (b, T, R)
    x, B, C = rand(*lead, h, p), rand(*lead, g, n), rand(*lead, g, n)
    dt, A, trap = F.softplus(rand(b, T, h) - 1), -F.softplus(rand(b, T, h)), torch.sigmoid(rand(b, T, h))
    D = rand(h) if with_d else None
    return [None if t is None else t.to(device) for t in (x, dt, A, trap, B, C, D)]


@pytest.mark.parametrize(
    "case", [dict(), dict(R=3, g=1, h=2, with_d=False), dict(R=2, g=1, h=2, p=5, n=6)], ids=["siso", "mimo3", "mimo2"]
)
def test_kernels_match_reference_and_torch_adjoint(case):
    args = inputs(**case)
    y = kernels.mamba3_scan_fwd(*args)
    torch.testing.assert_close(y, mamba3_scan_ref(*args), **TOL)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    dx = kernels.mamba3_scan_lrp_bwd(g, *args[1:])
    torch.testing.assert_close(dx, mamba3_scan_lrp_bwd_torch(g, *args[1:]), **TOL)
    # conservation through the kernels' pair: sum x dx = sum y g
    lhs, rhs = (args[0] * dx).sum().item(), (y * g).sum().item()
    assert abs(lhs - rhs) <= 1e-4 * (abs(rhs) + 1)


def test_forced_triton_backend_runs_the_kernels_in_the_rule():
    args = inputs(R=2, h=2, g=1)
    x = args[0].clone().requires_grad_()
    with dispatch.use_backend("triton"):
        y = mamba3_scan_lrp(x, *args[1:])
        y.sum().backward()
    xr = args[0].clone().requires_grad_()
    mamba3_scan_ref(xr, *args[1:]).sum().backward()
    torch.testing.assert_close(y, mamba3_scan_ref(*args), **TOL)
    torch.testing.assert_close(x.grad, xr.grad, **TOL)


def test_float64_goes_to_torch_and_bad_d():
    args = [None if t is None else t.double() for t in inputs()]
    y = kernels.mamba3_scan_fwd(*args)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, mamba3_scan_ref(*args), rtol=1e-12, atol=1e-12)
    x, dt, A, trap, B, C, _ = inputs()
    with pytest.raises(ValueError, match="D of shape"):
        kernels.mamba3_scan_fwd(x, dt, A, trap, B, C, torch.ones(x.shape[2], x.shape[3], device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernels_larger_shapes_on_gpu():  # pragma: no cover - GPU only
    for R in (None, 4):
        args = inputs(b=2, T=300, R=R, h=8, p=64, g=1, n=64)
        y = kernels.mamba3_scan_fwd(*args)
        torch.testing.assert_close(y, mamba3_scan_lrp(*[t.cpu() if t is not None else None for t in args]).to(DEVICE),
                                   rtol=1e-4, atol=1e-3)


# Run in a fresh interpreter without TRITON_INTERPRET (as in test_kernels.py): the interpreter
# accepts code that the compiler rejects.
COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile
    except ImportError as err:
        print("no ahead-of-time compile API:", err)
        sys.exit(3)
    from mambalrp.kernels import mamba3

    kernel = mamba3._mamba3_scan_kernel
    count = 0
    # Blocks as the wrapper chooses them for the 130m shape (head dim 64, d_state 128): SISO and rank 4.
    for rank, reverse, has_d, v_type, arch in ((1, False, True, "bf16", 90), (4, True, False, "fp32", 80),
                                                (4, False, True, "fp32", 90), (1, True, True, "bf16", 80)):
        block_r, block_p, block_n = mamba3._blocks(rank, 64, 128, None)
        constexprs = dict(REVERSE=reverse, HAS_D=has_d, BLOCK_R=block_r, BLOCK_P=block_p, BLOCK_N=block_n)
        signature = {
            a: "constexpr" if a in constexprs else (("*" + v_type) if a == "v_ptr" else "*fp32")
            if a.endswith("_ptr") else "i32"
            for a in kernel.arg_names
        }
        compiled = compile(ASTSource(kernel, signature, constexprs=constexprs),
                           target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
        assert compiled.asm["cubin"]
        count += 1
    print("compiled", count)
    """
)


def test_kernel_compiles_for_gpu_targets():
    """Compile the Mamba-3 kernel to cubin for sm_80 and sm_90 (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
        done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("compiling the kernel took longer than 300 s")
    if done.returncode == 3:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "compiled 4" in done.stdout

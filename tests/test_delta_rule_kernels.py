"""Triton kernels of the gated delta rule against the torch primitive and the sequential
reference, under the Triton interpreter on the CPU (small shapes)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import mambalrp  # noqa: E402
from mambalrp.functional.delta_rule import (  # noqa: E402
    gated_delta_rule,
    gated_delta_rule_fwd_torch,
    gated_delta_rule_lrp_bwd_torch,
    gated_delta_rule_ref,
)

kernels = pytest.importorskip("mambalrp.kernels")
if not kernels.AVAILABLE:
    pytest.skip("Triton kernels are not available", allow_module_level=True)


def _inputs(b=1, T=11, hk=1, h=2, dk=6, dv=5, per_channel=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, T, hk, dk, generator=gen), dim=-1)
    k = F.normalize(torch.randn(b, T, hk, dk, generator=gen), dim=-1)
    v = torch.randn(b, T, h, dv, generator=gen)
    g = -torch.rand((b, T, h, dk) if per_channel else (b, T, h), generator=gen)
    beta = torch.rand(b, T, h, generator=gen) * 2.0
    return q, k, v, g, beta


@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar-decay", "per-channel-decay"])
@pytest.mark.parametrize("block_v", [None, 2])
def test_kernels_match_torch_and_reference(per_channel, block_v):
    q, k, v, g, beta = _inputs(per_channel=per_channel)
    out = kernels.gated_delta_rule_fwd(q, k, v, g, beta, block_v=block_v)
    torch.testing.assert_close(out, gated_delta_rule_fwd_torch(q, k, v, g, beta), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, gated_delta_rule_ref(q, k, v, g, beta), rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    dv = kernels.gated_delta_rule_lrp_bwd(grad, q, k, g, beta, block_v=block_v)
    torch.testing.assert_close(dv, gated_delta_rule_lrp_bwd_torch(grad, q, k, g, beta), rtol=1e-5, atol=1e-5)


def test_kernels_take_strided_and_half_inputs():
    q, k, v, g, beta = _inputs(T=7)
    wide = torch.randn(1, 7, 2, 10)
    v_strided = wide[..., ::2]  # non-contiguous values
    out = kernels.gated_delta_rule_fwd(q, k, v_strided, g, beta)
    torch.testing.assert_close(out, gated_delta_rule_ref(q, k, v_strided, g, beta), rtol=1e-5, atol=1e-5)
    out16 = kernels.gated_delta_rule_fwd(q, k, v.to(torch.bfloat16), g, beta)
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, gated_delta_rule_ref(q, k, v.to(torch.bfloat16).float(), g, beta), rtol=1e-5, atol=1e-5)


def test_float64_falls_back_to_torch():
    q, k, v, g, beta = (t.double() for t in _inputs(T=5))
    out = kernels.gated_delta_rule_fwd(q, k, v, g, beta)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, gated_delta_rule_ref(q, k, v, g, beta), rtol=1e-12, atol=1e-12)


def test_the_function_runs_on_the_triton_backend():
    q, k, v, g, beta = _inputs(T=9, per_channel=True)
    grad = torch.randn(1, 9, 2, 5)
    results = {}
    for backend in ("torch", "triton"):
        vv = v.clone().requires_grad_()
        with mambalrp.use_backend(backend):
            out = gated_delta_rule(q, k, vv, g, beta)
            (out * grad).sum().backward()
        results[backend] = (out.detach(), vv.grad)
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["triton"][1], results["torch"][1], rtol=1e-5, atol=1e-5)


def test_kernels_reject_bad_shapes():
    q, k, v, g, beta = _inputs(T=5)
    with pytest.raises(ValueError, match="beta must be"):
        kernels.gated_delta_rule_fwd(q, k, v, g, beta[:, :3])
    with pytest.raises(ValueError, match="power of two"):
        kernels.gated_delta_rule_fwd(q, k, v, g, beta, block_v=3)


# Run in a fresh interpreter: under TRITON_INTERPRET the kernels are not compiled.
COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile
    except ImportError as err:
        print("no ahead-of-time compile API:", err)
        sys.exit(3)
    from mambalrp.kernels import delta_rule

    def build(kernel, constexprs, x_type, arch):
        signature = {
            a: "constexpr" if a in constexprs else (("*" + x_type) if a in ("v_ptr", "do_ptr") else "*fp32")
            if a.endswith("_ptr") else "i32"
            for a in kernel.arg_names
        }
        compiled = compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32))
        assert compiled.asm["cubin"], kernel.fn.__name__

    block_k, block_v = delta_rule._blocks(128, 128, None)  # Qwen3-Next's head sizes
    n = 0
    for kernel in (delta_rule._delta_rule_fwd_kernel, delta_rule._delta_rule_lrp_bwd_kernel):
        for per_channel, x_type, arch in ((False, "bf16", 90), (True, "fp32", 80)):
            build(kernel, dict(PER_CHANNEL=per_channel, BLOCK_K=block_k, BLOCK_V=block_v), x_type, arch)
            n += 1
    print("compiled", n)
    """
)


@pytest.mark.slow
def test_kernels_compile_for_gpu_targets():
    """The interpreter does not type-check like the compiler: compile to cubin for sm_80 and sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode == 3:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "compiled 4" in done.stdout

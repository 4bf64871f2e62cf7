"""Triton kernels against the torch implementations and the sequential references.

Without CUDA the kernels run on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``,
set here before the kernels are defined); shapes are kept small because the interpreter is slow.
With CUDA the same tests run on the GPU, plus the ``gpu``-marked ones on larger shapes.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads TRITON_INTERPRET when its own library functions are defined, at import time.
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(
            "triton was imported before TRITON_INTERPRET=1 was set; run: TRITON_INTERPRET=1 python -m pytest ...",
            allow_module_level=True,
        )
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from mambalrp import kernels  # noqa: E402
from mambalrp.functional import dispatch  # noqa: E402
from mambalrp.functional.selective_scan import (  # noqa: E402
    SelectiveScanLRPFn,
    selective_scan_fwd_torch,
    selective_scan_lrp_bwd_torch,
    selective_scan_ref,
)
from mambalrp.functional.ssd import (  # noqa: E402
    SSDScanLRPFn,
    ssd_scan_fwd_torch,
    ssd_scan_lrp_bwd_torch,
    ssd_scan_ref,
)

if not kernels.AVAILABLE:
    pytest.skip("mambalrp.kernels reports no Triton kernels", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {"rtol": 1e-5, "atol": 1e-4}
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def mamba1_inputs(b, d, T, n, has_d=True, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    x = rand(b, d, T)
    dt = torch.nn.functional.softplus(rand(b, d, T) - 1.0)
    A = -torch.exp(rand(d, n) * 0.5)
    B, C = rand(b, n, T), rand(b, n, T)
    D = rand(d) if has_d else None
    g = rand(b, d, T)
    out = [t if t is None else t.to(device) for t in (x, dt, A, B, C, D, g)]
    return out[:6], out[6]


def ssd_inputs(b, T, h, p, groups, n, d_shape="h", seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    x = rand(b, T, h, p)
    dt = torch.nn.functional.softplus(rand(b, T, h) - 1.0)
    A = -torch.exp(rand(h) * 0.5)
    B, C = rand(b, T, groups, n), rand(b, T, groups, n)
    D = {"none": None, "h": rand(h), "hp": rand(h, p)}[d_shape]
    g = rand(b, T, h, p)
    out = [t if t is None else t.to(device) for t in (x, dt, A, B, C, D, g)]
    return out[:6], out[6]


def ref_grad(ref, args, g):
    """``y`` and the gradient of ``<y, g>`` w.r.t. ``x`` by autograd through a sequential reference."""
    x = args[0].clone().requires_grad_(True)
    y = ref(x, *args[1:], detach=True)
    y.backward(g)
    return y.detach(), x.grad


# --------------------------------------------------------------------------------------------
# Mamba-1 selective scan
# --------------------------------------------------------------------------------------------

MAMBA1_CASES = [
    # variant, b, d, T, n, block_d, block_t, has_d
    ("sequential", 2, 5, 37, 3, None, None, True),
    ("sequential", 2, 5, 37, 3, 2, None, False),  # several channel blocks, the last one masked
    ("sequential", 1, 3, 1, 16, None, None, True),  # a single step
    ("sequential", 3, 6, 7, 5, 4, None, True),
    ("chunked", 2, 5, 37, 3, None, None, True),  # two tiles of 32 steps, the second partial
    ("chunked", 2, 5, 37, 3, 2, 8, False),  # 5 tiles (the last partial), several channel blocks
    ("chunked", 1, 3, 1, 16, None, None, True),
    ("chunked", 3, 6, 16, 5, 4, 4, True),  # tiles that divide T exactly
    ("tiled", 2, 5, 37, 3, None, None, True),  # one tile of 64 steps, 27 of them past T
    ("tiled", 2, 5, 37, 3, 2, 8, False),  # 5 tiles (the last partial), several channel blocks
    ("tiled", 1, 3, 1, 16, None, None, True),
    ("tiled", 3, 6, 16, 5, 4, 4, True),  # tiles that divide T exactly
    ("tiled", 2, 7, 45, 6, 4, 16, True),  # 3 tiles (the last partial), 2 channel blocks, n not a power of two
]

# Tiled kernels with small explicit blocks: (block_d, block_t) over d = 7, T = 29 (not a multiple
# of any block_t), from one step per tile to a single tile.
TILED_BLOCKS = [*(pytest.param(*b, marks=pytest.mark.slow) for b in [(1, 1), (2, 2), (1, 4), (8, 8)]), (2, 32), (4, 64)]


@pytest.mark.parametrize("variant,b,d,T,n,block_d,block_t,has_d", MAMBA1_CASES)
def test_selective_scan_kernels_match_torch_and_reference(variant, b, d, T, n, block_d, block_t, has_d):
    args, g = mamba1_inputs(b, d, T, n, has_d)
    opts = {"variant": variant, "block_d": block_d, "block_t": block_t}
    y = kernels.selective_scan_fwd(*args, **opts)
    dx = kernels.selective_scan_lrp_bwd(g, *args[1:], **opts)
    assert y.shape == dx.shape == (b, d, T) and y.dtype == dx.dtype == torch.float32
    torch.testing.assert_close(y, selective_scan_fwd_torch(*args), **TOL)
    torch.testing.assert_close(dx, selective_scan_lrp_bwd_torch(g, *args[1:]), **TOL)
    y_ref, dx_ref = ref_grad(selective_scan_ref, args, g)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(dx, dx_ref, **TOL)


@pytest.mark.parametrize("block_d,block_t", TILED_BLOCKS)
def test_selective_scan_tiled_kernels_with_small_blocks(block_d, block_t):
    b, d, T, n = 2, 7, 29, 3
    args, g = mamba1_inputs(b, d, T, n, seed=5)
    opts = {"variant": "tiled", "block_d": block_d, "block_t": block_t}
    y = kernels.selective_scan_fwd(*args, **opts)
    dx = kernels.selective_scan_lrp_bwd(g, *args[1:], **opts)
    torch.testing.assert_close(y, selective_scan_fwd_torch(*args), **TOL)
    torch.testing.assert_close(dx, selective_scan_lrp_bwd_torch(g, *args[1:]), **TOL)
    # The tiled, chunked and sequential kernels agree.
    for variant in ("chunked", "sequential"):
        torch.testing.assert_close(y, kernels.selective_scan_fwd(*args, variant=variant), **TOL)
        torch.testing.assert_close(dx, kernels.selective_scan_lrp_bwd(g, *args[1:], variant=variant), **TOL)


@pytest.mark.parametrize("variant", ["chunked", "sequential", "tiled"])
def test_selective_scan_kernels_accept_strided_inputs(variant):
    # Time-major storage viewed as (b, d, T), and a transposed A: the kernels read by strides.
    b, d, T, n = 2, 3, 9, 4
    (x, dt, A, B, C, D), g = mamba1_inputs(b, d, T, n)
    strided = [
        x.transpose(1, 2).contiguous().transpose(1, 2),
        dt.transpose(1, 2).contiguous().transpose(1, 2),
        A.t().contiguous().t(),
        B.transpose(1, 2).contiguous().transpose(1, 2),
        C.transpose(1, 2).contiguous().transpose(1, 2),
        D,
    ]
    assert not strided[0].is_contiguous() and not strided[2].is_contiguous()
    g_strided = g.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(
        kernels.selective_scan_fwd(*strided, variant=variant), selective_scan_fwd_torch(x, dt, A, B, C, D), **TOL
    )
    torch.testing.assert_close(
        kernels.selective_scan_lrp_bwd(g_strided, *strided[1:], variant=variant),
        selective_scan_lrp_bwd_torch(g, dt, A, B, C, D),
        **TOL,
    )


@pytest.mark.parametrize("has_d", [True, False])
def test_selective_scan_fn_with_triton_backend(has_d):
    args, g = mamba1_inputs(2, 5, 11, 3, has_d, seed=1)
    outs = {}
    for backend in ("torch", "triton"):
        x = args[0].clone().requires_grad_(True)
        with dispatch.use_backend(backend):
            assert dispatch.resolve(x, "selective_scan") == backend
            y = SelectiveScanLRPFn.apply(x, *args[1:])
            y.backward(g)
        outs[backend] = (y.detach(), x.grad)
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], **TOL)
    torch.testing.assert_close(outs["triton"][1], outs["torch"][1], **TOL)
    y_ref, dx_ref = ref_grad(selective_scan_ref, args, g)
    torch.testing.assert_close(outs["triton"][0], y_ref, **TOL)
    torch.testing.assert_close(outs["triton"][1], dx_ref, **TOL)


@pytest.mark.parametrize("variant", ["chunked", "sequential", "tiled"])
def test_selective_scan_kernel_variants_take_bf16_inputs(variant):
    args, g = mamba1_inputs(2, 5, 13, 3, seed=2)
    args16 = [t.to(torch.bfloat16) for t in args]
    g16 = g.to(torch.bfloat16)
    up = [t.float() for t in args16]
    y = kernels.selective_scan_fwd(*args16, variant=variant)
    dx = kernels.selective_scan_lrp_bwd(g16, *args16[1:], variant=variant)
    assert y.dtype == dx.dtype == torch.float32
    torch.testing.assert_close(y, selective_scan_fwd_torch(*up), **TOL)
    torch.testing.assert_close(dx, selective_scan_lrp_bwd_torch(g16.float(), *up[1:]), **TOL)


def test_selective_scan_bf16_inputs_accumulate_in_fp32():
    args, g = mamba1_inputs(2, 5, 13, 3, seed=2)
    args16 = [t.to(torch.bfloat16) for t in args]
    g16 = g.to(torch.bfloat16)
    up = [t.float() for t in args16]
    y = kernels.selective_scan_fwd(*args16)
    dx = kernels.selective_scan_lrp_bwd(g16, *args16[1:])
    assert y.dtype == dx.dtype == torch.float32
    torch.testing.assert_close(y, selective_scan_fwd_torch(*up), **TOL)
    torch.testing.assert_close(dx, selective_scan_lrp_bwd_torch(g16.float(), *up[1:]), **TOL)
    # Through the autograd function: float32 output, gradient in the dtype of x.
    x = args16[0].clone().requires_grad_(True)
    with dispatch.use_backend("triton"):
        y_fn = SelectiveScanLRPFn.apply(x, *args16[1:])
        y_fn.backward(g16.float())
    assert y_fn.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(y_fn, selective_scan_fwd_torch(*up), **TOL)
    torch.testing.assert_close(x.grad, dx.to(torch.bfloat16))


def test_selective_scan_float64_falls_back_to_torch():
    args, g = mamba1_inputs(1, 3, 5, 2, seed=3)
    args64 = [t.double() for t in args]
    y = kernels.selective_scan_fwd(*args64)
    dx = kernels.selective_scan_lrp_bwd(g.double(), *args64[1:])
    assert y.dtype == dx.dtype == torch.float64
    torch.testing.assert_close(y, selective_scan_ref(*args64))
    torch.testing.assert_close(dx, selective_scan_lrp_bwd_torch(g.double(), *args64[1:]))


def test_selective_scan_kernels_reject_bad_shapes():
    (x, dt, A, B, C, D), _ = mamba1_inputs(1, 3, 4, 2)
    with pytest.raises(ValueError):
        kernels.selective_scan_fwd(x, dt, A, B[:, :1], C, D)
    with pytest.raises(ValueError):
        kernels.selective_scan_lrp_bwd(x, dt, A[:2], B, C, D)
    with pytest.raises(ValueError):
        kernels.selective_scan_fwd(x, dt, A, B, C, D, block_d=3)
    with pytest.raises(ValueError):
        kernels.selective_scan_lrp_bwd(x, dt, A, B, C, D, block_t=6)
    with pytest.raises(ValueError):
        kernels.selective_scan_fwd(x, dt, A, B, C, D, variant="unrolled")
    with pytest.raises(ValueError):
        kernels.selective_scan_fwd(x, dt, A, B, C, D, variant="tiled", block_t=3)
    with pytest.raises(ValueError):
        kernels.selective_scan_lrp_bwd(x, dt, A, B, C, D, variant="sequential", block_t=8)


# --------------------------------------------------------------------------------------------
# Mamba-2 SSD scan
# --------------------------------------------------------------------------------------------

SSD_CASES = [
    # variant, b, T, h, p, groups, n, D, block_p
    ("sequential", 2, 37, 4, 3, 2, 5, "h", None),
    ("sequential", 2, 7, 3, 5, 1, 6, "hp", 2),  # several channel blocks, the last one masked
    ("sequential", 1, 1, 2, 3, 2, 4, "none", None),  # a single step, one group per head
    ("sequential", 2, 7, 2, 3, 1, 3, "none", None),
    ("chunked", 2, 37, 4, 3, 2, 5, "h", None),  # chunks of 16: the last one partial
    ("chunked", 1, 32, 2, 20, 1, 17, "hp", 16),  # chunks dividing T, 2 channel blocks, n padded to 32
    ("chunked", 1, 1, 2, 3, 2, 4, "none", None),
]


@pytest.mark.parametrize("variant,b,T,h,p,groups,n,d_shape,block_p", SSD_CASES)
def test_ssd_kernels_match_torch_and_reference(variant, b, T, h, p, groups, n, d_shape, block_p):
    args, g = ssd_inputs(b, T, h, p, groups, n, d_shape)
    y = kernels.ssd_scan_fwd(*args, variant=variant, block_p=block_p)
    dx = kernels.ssd_scan_lrp_bwd(g, *args[1:], variant=variant, block_p=block_p)
    assert y.shape == dx.shape == (b, T, h, p) and y.dtype == dx.dtype == torch.float32
    torch.testing.assert_close(y, ssd_scan_fwd_torch(*args), **TOL)
    torch.testing.assert_close(dx, ssd_scan_lrp_bwd_torch(g, *args[1:]), **TOL)
    y_ref, dx_ref = ref_grad(ssd_scan_ref, args, g)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(dx, dx_ref, **TOL)


@pytest.mark.parametrize("variant", ["chunked", "sequential"])
def test_ssd_kernels_accept_strided_inputs(variant):
    # x and g as views of a (b, T, h, 2p) buffer; B and C as views of one packed (b, T, g, 2n).
    b, T, h, p, groups, n = 1, 6, 2, 3, 1, 4
    (x, dt, A, B, C, D), g = ssd_inputs(b, T, h, p, groups, n)
    xbuf = torch.zeros(b, T, h, 2 * p, device=DEVICE)
    xbuf[..., :p] = x
    gbuf = torch.zeros_like(xbuf)
    gbuf[..., p:] = g
    bc = torch.cat([B, C], dim=-1)
    strided = (xbuf[..., :p], dt, A, bc[..., :n], bc[..., n:], D)
    assert not strided[0].is_contiguous() and not strided[3].is_contiguous()
    torch.testing.assert_close(
        kernels.ssd_scan_fwd(*strided, variant=variant), ssd_scan_fwd_torch(x, dt, A, B, C, D), **TOL
    )
    torch.testing.assert_close(
        kernels.ssd_scan_lrp_bwd(gbuf[..., p:], *strided[1:], variant=variant),
        ssd_scan_lrp_bwd_torch(g, dt, A, B, C, D),
        **TOL,
    )


@pytest.mark.parametrize("d_shape", ["h", "none"])
def test_ssd_fn_with_triton_backend(d_shape):
    args, g = ssd_inputs(2, 9, 4, 3, 2, 5, d_shape, seed=1)
    outs = {}
    for backend in ("torch", "triton"):
        x = args[0].clone().requires_grad_(True)
        with dispatch.use_backend(backend):
            assert dispatch.resolve(x, "ssd_scan") == backend
            y = SSDScanLRPFn.apply(x, *args[1:])
            y.backward(g)
        outs[backend] = (y.detach(), x.grad)
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], **TOL)
    torch.testing.assert_close(outs["triton"][1], outs["torch"][1], **TOL)
    y_ref, dx_ref = ref_grad(ssd_scan_ref, args, g)
    torch.testing.assert_close(outs["triton"][0], y_ref, **TOL)
    torch.testing.assert_close(outs["triton"][1], dx_ref, **TOL)


def test_ssd_bf16_inputs_accumulate_in_fp32():
    args, g = ssd_inputs(1, 11, 2, 3, 1, 5, "hp", seed=2)
    args16 = [t.to(torch.bfloat16) for t in args]
    g16 = g.to(torch.bfloat16)
    up = [t.float() for t in args16]
    y = kernels.ssd_scan_fwd(*args16)
    dx = kernels.ssd_scan_lrp_bwd(g16, *args16[1:])
    assert y.dtype == dx.dtype == torch.float32
    torch.testing.assert_close(y, ssd_scan_fwd_torch(*up), **TOL)
    torch.testing.assert_close(dx, ssd_scan_lrp_bwd_torch(g16.float(), *up[1:]), **TOL)


def test_ssd_float64_falls_back_to_torch():
    args, g = ssd_inputs(1, 5, 2, 2, 1, 3, seed=3)
    args64 = [t.double() for t in args]
    y = kernels.ssd_scan_fwd(*args64)
    dx = kernels.ssd_scan_lrp_bwd(g.double(), *args64[1:])
    assert y.dtype == dx.dtype == torch.float64
    torch.testing.assert_close(y, ssd_scan_ref(*args64))
    torch.testing.assert_close(dx, ssd_scan_lrp_bwd_torch(g.double(), *args64[1:]))


def test_ssd_kernels_reject_bad_shapes():
    (x, dt, A, B, C, D), _ = ssd_inputs(1, 4, 4, 2, 2, 3)
    with pytest.raises(ValueError):
        bad = B[:, :, :1].expand(1, 4, 3, 3)  # 4 heads, 3 groups
        kernels.ssd_scan_fwd(x, dt, A, bad, bad, D)
    with pytest.raises(ValueError):
        kernels.ssd_scan_lrp_bwd(x, dt[:, :2], A, B, C, D)
    with pytest.raises(ValueError):
        kernels.ssd_scan_fwd(x, dt, A, B, C, D, variant="sequential", block_p=6)
    with pytest.raises(ValueError):
        kernels.ssd_scan_lrp_bwd(x, dt, A, B, C, D, block_t=8)  # tl.dot needs 16
    with pytest.raises(ValueError):
        kernels.ssd_scan_fwd(x, dt, A, B, C, D, variant="unrolled")


def _explain_or_skip():
    import mambalrp

    if not hasattr(mambalrp, "explain"):
        pytest.skip("mambalrp.explain is not available")
    return mambalrp.explain


def _relevance_per_backend(model, ids, op, monkeypatch):
    """Explanations with the torch and the Triton backend; checks that the kernels ran once per layer."""
    explain = _explain_or_skip()
    calls = []
    for name in (op + "_fwd", op + "_lrp_bwd"):
        original = getattr(kernels, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    out = {}
    for backend in ("torch", "triton"):
        with dispatch.use_backend(backend):
            out[backend] = explain(model, ids)
    layers = model.config.num_hidden_layers
    assert sorted(calls) == sorted([op + "_fwd"] * layers + [op + "_lrp_bwd"] * layers)
    return out["torch"], out["triton"]


def test_explain_mamba_with_triton_backend_matches_torch(monkeypatch):
    transformers = pytest.importorskip("transformers")
    config = transformers.MambaConfig(
        vocab_size=40, hidden_size=8, num_hidden_layers=2, state_size=5, conv_kernel=3, use_cache=False
    )
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(config).to(DEVICE).eval()
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    ref, tri = _relevance_per_backend(model, ids, "selective_scan", monkeypatch)
    torch.testing.assert_close(tri.logit, ref.logit, **TOL)
    torch.testing.assert_close(tri.relevance, ref.relevance, **TOL)
    assert float(ref.relevance.abs().max()) > 0


def test_explain_mamba2_with_triton_backend_matches_torch(monkeypatch):
    transformers = pytest.importorskip("transformers")
    config = transformers.Mamba2Config(
        vocab_size=40, hidden_size=8, num_hidden_layers=2, state_size=5, expand=2, num_heads=4, head_dim=4,
        n_groups=2, conv_kernel=3, chunk_size=8, use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.Mamba2ForCausalLM(config).to(DEVICE).eval()
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    ref, tri = _relevance_per_backend(model, ids, "ssd_scan", monkeypatch)
    torch.testing.assert_close(tri.logit, ref.logit, **TOL)
    torch.testing.assert_close(tri.relevance, ref.relevance, **TOL)
    assert float(ref.relevance.abs().max()) > 0


def test_auto_backend_routes_by_device():
    x_cpu = torch.zeros(1, 1, 1)
    with dispatch.use_backend("auto"):
        assert dispatch.resolve(x_cpu, "selective_scan") == "torch"
        assert dispatch.resolve(x_cpu, "ssd_scan") == "torch"
        if torch.cuda.is_available():
            assert dispatch.resolve(x_cpu.cuda(), "selective_scan") == "triton"
            assert dispatch.resolve(x_cpu.cuda(), "ssd_scan") == "triton"


# --------------------------------------------------------------------------------------------
# Compilation for a GPU target (no GPU needed)
# --------------------------------------------------------------------------------------------

# Run in a fresh interpreter: under TRITON_INTERPRET the kernels are not compiled, and the
# interpreter's patches of triton.language stay active in this process.
COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile
    except ImportError as err:
        print("no ahead-of-time compile API:", err)
        sys.exit(3)
    from mambalrp.kernels import selective_scan, ssd

    def build(kernel, constexprs, x_type, arch, num_warps=4):
        signature = {
            a: "constexpr" if a in constexprs else (("*" + x_type) if a in ("x_ptr", "g_ptr") else "*fp32")
            if a.endswith("_ptr") else "i32"
            for a in kernel.arg_names
        }
        source = ASTSource(kernel, signature, constexprs=constexprs)
        compiled = compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        assert compiled.asm["cubin"], kernel.fn.__name__

    # Block sizes as the wrappers choose them for mamba-130m / mamba2-130m layers at T = 4096.
    block_d, _, block_n = selective_scan._blocks(1536, 16, 4096, "sequential", None, None)
    chunk_d, chunk_t, _ = selective_scan._blocks(1536, 16, 4096, "chunked", None, None)
    chunked = dict(BLOCK_D=chunk_d, BLOCK_T=chunk_t, BLOCK_N=block_n)
    tile_d, tile_t, _ = selective_scan._blocks(1536, 16, 4096, "tiled", None, None)
    tiled = dict(BLOCK_D=tile_d, BLOCK_T=tile_t, BLOCK_N=block_n, N_STATE=16)
    # A d_state that is not a power of two (the carried state is padded), small blocks.
    tiled_small = dict(BLOCK_D=2, BLOCK_T=64, BLOCK_N=8, N_STATE=5)
    block_p, _, block_ns = ssd._blocks(64, 128, "sequential")
    ssd_p, ssd_t, ssd_n = ssd._blocks(64, 128, "chunked")
    ssd_chunked = dict(BLOCK_P=ssd_p, BLOCK_T=ssd_t, BLOCK_N=ssd_n)
    cases = [
        (selective_scan._selective_scan_fwd_kernel, dict(HAS_D=True, BLOCK_D=block_d, BLOCK_N=block_n), "bf16", 90),
        (selective_scan._selective_scan_lrp_bwd_kernel, dict(HAS_D=False, BLOCK_D=block_d, BLOCK_N=block_n), "fp32", 80),
        (selective_scan._selective_scan_fwd_chunked_kernel, dict(HAS_D=False, **chunked), "fp32", 80),
        (selective_scan._selective_scan_lrp_bwd_chunked_kernel, dict(HAS_D=True, **chunked), "bf16", 90),
        (selective_scan._selective_scan_fwd_tiled_kernel, dict(HAS_D=True, **tiled), "bf16", 90),
        (selective_scan._selective_scan_lrp_bwd_tiled_kernel, dict(HAS_D=False, **tiled), "fp32", 80),
        (selective_scan._selective_scan_fwd_tiled_kernel, dict(HAS_D=False, **tiled_small), "fp32", 80),
        (selective_scan._selective_scan_lrp_bwd_tiled_kernel, dict(HAS_D=True, **tiled_small), "bf16", 90),
        (ssd._ssd_scan_fwd_kernel, dict(HAS_D=False, BLOCK_P=block_p, BLOCK_N=block_ns), "fp32", 80),
        (ssd._ssd_scan_lrp_bwd_kernel, dict(HAS_D=True, BLOCK_P=block_p, BLOCK_N=block_ns), "bf16", 90),
    ]
    if sys.argv[1:] == ["smoke"]:  # one kernel of each scan
        build(*cases[0])
        build(*cases[-1])
        print("compiled", 2)
        sys.exit(0)
    missing = set(selective_scan._KERNELS.values()) - {case[0] for case in cases}
    assert not missing, sorted(k.fn.__name__ for k in missing)
    for kernel, constexprs, x_type, arch in cases:
        build(kernel, constexprs, x_type, arch)
    build(ssd._ssd_scan_fwd_chunked_kernel, dict(HAS_D=True, **ssd_chunked), "bf16", 90, ssd.CHUNK_NUM_WARPS)
    build(ssd._ssd_scan_lrp_bwd_chunked_kernel, dict(HAS_D=False, **ssd_chunked), "fp32", 80, ssd.CHUNK_NUM_WARPS)
    print("compiled", len(cases) + 2)
    """
)


def _compile_for_gpu_targets(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
        done = subprocess.run(
            [sys.executable, "-c", COMPILE_SCRIPT, *args], env=env, capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        pytest.fail("compiling the kernels took longer than 300 s")
    if done.returncode == 3:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "compiled" in done.stdout


@pytest.mark.slow
def test_kernels_compile_for_gpu_targets():
    """The interpreter does not type-check like the compiler: compile to cubin for sm_80 and sm_90."""
    _compile_for_gpu_targets()


def test_kernels_compile_for_gpu_targets_smoke():
    """One kernel of each scan (the Mamba-1 forward and the SSD reverse scan) compiled to cubin."""
    _compile_for_gpu_targets("smoke")


# --------------------------------------------------------------------------------------------
# GPU only: realistic sizes
# --------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("variant", ["chunked", "sequential", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_scan_kernels_gpu_sizes(dtype, variant):
    # mamba-130m: d_inner 1536, d_state 16; a T that is not a multiple of any block size.
    args, g = mamba1_inputs(2, 1536, 1000, 16, seed=4, device="cuda")
    args = [t.to(dtype) for t in args]
    g = g.to(dtype)
    up = [t.float() for t in args]
    torch.testing.assert_close(
        kernels.selective_scan_fwd(*args, variant=variant), selective_scan_fwd_torch(*up), rtol=1e-4, atol=1e-3
    )
    torch.testing.assert_close(
        kernels.selective_scan_lrp_bwd(g, *args[1:], variant=variant),
        selective_scan_lrp_bwd_torch(g.float(), *up[1:]),
        rtol=1e-4,
        atol=1e-3,
    )


@gpu
@needs_cuda
@pytest.mark.parametrize("variant", ["chunked", "sequential"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_kernels_gpu_sizes(dtype, variant):
    # mamba2-130m-like: 24 heads of 64 channels, one group, d_state 128.
    args, g = ssd_inputs(2, 1000, 24, 64, 1, 128, "h", seed=5, device="cuda")
    args = [t.to(dtype) for t in args]
    g = g.to(dtype)
    up = [t.float() for t in args]
    torch.testing.assert_close(
        kernels.ssd_scan_fwd(*args, variant=variant), ssd_scan_fwd_torch(*up), rtol=1e-4, atol=1e-3
    )
    torch.testing.assert_close(
        kernels.ssd_scan_lrp_bwd(g, *args[1:], variant=variant),
        ssd_scan_lrp_bwd_torch(g.float(), *up[1:]),
        rtol=1e-4,
        atol=1e-3,
    )

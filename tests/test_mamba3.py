"""Mamba-3: the trapezoidal scan primitive, the adapter for mamba_ssm's ``Mamba3`` (SISO, MIMO,
gated output norm, grouped B/C, full and half rotary) and a ``MambaLMHeadModel`` with Mamba-3
layers.

mamba_ssm's Mamba-3 forward runs only on a GPU (Triton kernels with TMA descriptors, TileLang).
To run the official module's own forward on a CPU, these tests put stand-ins in place of the
kernels it calls, written here from the equations of the recurrence as a Python loop over time
(the sequential reference): ``mamba3_siso_combined``, ``mamba3_mimo_combined`` and the Triton
gated RMSNorm (replaced by mamba_ssm's own ``rms_norm_ref``). The stand-ins exist only here;
mambalrp never calls them. Importing mamba_ssm without its CUDA extension also needs the
``selective_scan_cuda`` stand-in of ``test_mamba_ssm.py`` (empty here: no Mamba-1 runs), and
the TileLang MIMO module is replaced by a stub (its import alone takes ~10 s).

On a GPU with mamba_ssm's kernels, ``test_gpu_official_kernels`` compares the adapter's forward
with the official kernels themselves (skipped otherwise).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import mambalrp
from mambalrp.adapters.mamba_ssm_mamba3 import mamba3_forward
from mambalrp.errors import MambaLRPError, UnsupportedModelError
from mambalrp.functional.mamba3 import (
    mamba3_scan,
    mamba3_scan_fwd_torch,
    mamba3_scan_lrp,
    mamba3_scan_lrp_bwd_torch,
    mamba3_scan_ref,
)

from conftest import assert_same_state, snapshot

# --------------------------------------------------------------------------------------------
# The scan primitive
# --------------------------------------------------------------------------------------------


def scan_inputs(b=2, T=21, R=None, h=4, p=3, g=2, n=6, dtype=torch.float64, seed=0, with_d=True):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    lead = (b, T) if R is None else (b, T, R)
    x, B, C = rand(*lead, h, p), rand(*lead, g, n), rand(*lead, g, n)
    dt = F.softplus(rand(b, T, h) - 1)
    A = -F.softplus(rand(b, T, h))
    trap = torch.sigmoid(rand(b, T, h))
    D = rand(h) if with_d else None
    return x, dt, A, trap, B, C, D


@pytest.mark.parametrize("rank", [None, 1, 3])
@pytest.mark.parametrize("chunk", [4, 64])
def test_scan_chunked_equals_sequential(rank, chunk):
    args = scan_inputs(R=rank)
    y = mamba3_scan_fwd_torch(*args, chunk=chunk)
    assert y.shape == args[0].shape
    torch.testing.assert_close(y, mamba3_scan_ref(*args), rtol=1e-10, atol=1e-10)
    args = scan_inputs(R=rank, dtype=torch.float32, with_d=False, seed=1)
    torch.testing.assert_close(mamba3_scan_fwd_torch(*args, chunk=chunk), mamba3_scan_ref(*args), rtol=1e-5, atol=1e-5)


def test_scan_first_step_has_no_previous_token_term():
    """At t = 0 only ``trap_0 dt_0 B_0 x_0`` enters; the previous-token term starts at t = 1 with
    the decay alpha_1 on it (the exponential-trapezoidal rule), checked on one head by hand."""
    x, dt, A, trap, B, C, _ = scan_inputs(b=1, T=2, h=1, p=1, g=1, n=2)
    y = mamba3_scan_ref(x, dt, A, trap, B, C)
    bx0, bx1 = B[0, 0, 0] * x[0, 0, 0, 0], B[0, 1, 0] * x[0, 1, 0, 0]
    h0 = trap[0, 0, 0] * dt[0, 0, 0] * bx0
    a1 = torch.exp(dt[0, 1, 0] * A[0, 1, 0])
    h1 = a1 * h0 + (1 - trap[0, 1, 0]) * dt[0, 1, 0] * a1 * bx0 + trap[0, 1, 0] * dt[0, 1, 0] * bx1
    torch.testing.assert_close(y[0, 0, 0, 0], h0 @ C[0, 0, 0])
    torch.testing.assert_close(y[0, 1, 0, 0], h1 @ C[0, 1, 0])


@pytest.mark.parametrize("rank", [None, 2])
def test_scan_rule_is_the_adjoint_and_conserves(rank):
    x, *coefficients = scan_inputs(R=rank, T=19)
    g = torch.randn_like(x)
    xr = x.clone().requires_grad_()
    mamba3_scan_ref(xr, *coefficients).backward(g)
    for chunk in (4, 64):
        dx = mamba3_scan_lrp_bwd_torch(g, *coefficients, chunk=chunk)
        torch.testing.assert_close(dx, xr.grad, rtol=1e-10, atol=1e-10)
    xl = x.clone().requires_grad_()
    y = mamba3_scan_lrp(xl, *coefficients)
    y.backward(g)
    torch.testing.assert_close(xl.grad, xr.grad, rtol=1e-10, atol=1e-10)
    # conservation through the scan, the D skip included: sum_x R(x) = sum_y R(y)
    assert abs((x * xl.grad).sum().item() - (y * g).sum().item()) <= 1e-9 * (y * g).abs().sum().item()
    # no relevance into the coefficients
    coeffs = [t.clone().requires_grad_() for t in coefficients]
    mamba3_scan_lrp(x, *coeffs).sum().backward()
    assert all(t.grad is None for t in coeffs)


def test_scan_gradient_mode_is_the_true_gradient():
    args = scan_inputs(R=2, T=11)
    ours = [t.clone().requires_grad_() for t in args]
    theirs = [t.clone().requires_grad_() for t in args]
    g = torch.randn_like(args[0])
    mamba3_scan(*ours, rule="gradient").backward(g)
    mamba3_scan_ref(*theirs, detach=False).backward(g)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)


def test_scan_bad_shapes_and_rule():
    x, dt, A, trap, B, C, D = scan_inputs()
    with pytest.raises(ValueError, match="trap"):
        mamba3_scan(x, dt, A, trap[:, :-1], B, C, D)
    with pytest.raises(ValueError, match="B must be"):
        mamba3_scan(x, dt, A, trap, B[:, :, :, None], C, D)
    with pytest.raises(ValueError, match="D must be"):
        mamba3_scan(x, dt, A, trap, B, C, D[:2])
    with pytest.raises(ValueError, match="unknown SSM rule"):
        mamba3_scan(x, dt, A, trap, B, C, D, rule="exact")


# --------------------------------------------------------------------------------------------
# Sequential references of the official kernels, from the equations (the CPU stand-ins)
# --------------------------------------------------------------------------------------------


def _angles(Angles, DT):
    """theta_t = sum_{s <= t} pi tanh(angle_s) dt_s per head; Angles (b, T, h, S), DT (b, h, T)."""
    return torch.cumsum(math.pi * torch.tanh(Angles.float()) * DT.transpose(1, 2)[..., None], dim=1)


def _turn(v, theta, pairwise):
    """Rotate v (..., n) by theta (..., S): pairs (2i, 2i+1) or (i, i + n/2), loop over pairs."""
    v = v.clone()
    half = v.shape[-1] // 2
    for i in range(theta.shape[-1]):
        a, b = (2 * i, 2 * i + 1) if pairwise else (i, half + i)
        c, s = theta[..., i].cos(), theta[..., i].sin()
        va, vb = v[..., a].clone(), v[..., b].clone()
        v[..., a], v[..., b] = va * c - vb * s, va * s + vb * c
    return v


def _sequential(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, pairwise):
    """Per-rank outputs (b, T, R, h, p) of the exponential-trapezoidal recurrence, loop over time.

    Q, K: (b, T, R, g, n); V: (b, T, R, h, p) (already scaled per rank); ADT, DT, Trap: (b, h, T)
    (Trap before the sigmoid); biases (h, R, n); Angles (b, T, h, S)."""
    b, T, R, h, p = V.shape
    rep = h // Q.shape[3]
    theta = _angles(Angles, DT)
    state = V.new_zeros(b, h, p, Q.shape[-1]).float()
    prev = torch.zeros_like(state)
    out = []
    for t in range(T):
        q = Q[:, t].float().repeat_interleave(rep, dim=2) + Q_bias.transpose(0, 1)
        k = K[:, t].float().repeat_interleave(rep, dim=2) + K_bias.transpose(0, 1)
        q, k = _turn(q, theta[:, t, None], pairwise), _turn(k, theta[:, t, None], pairwise)
        alpha = torch.exp(ADT[:, :, t])[..., None, None]
        lam = torch.sigmoid(Trap[:, :, t].float())[..., None, None]
        dt = DT[:, :, t][..., None, None]
        cur = torch.einsum("brhp,brhn->bhpn", V[:, t].float(), k)
        state = alpha * state + (1 - lam) * dt * alpha * prev + lam * dt * cur
        prev = cur
        y = torch.einsum("bhpn,brhn->brhp", state, q)
        if D is not None:
            y = y + D[:, None] * V[:, t].float()
        out.append(y)
    return torch.stack(out, dim=1)


def siso_standin(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, **kwargs):
    y = _sequential(Q[:, :, None], K[:, :, None], V[:, :, None], ADT, DT, Trap, Q_bias[:, None], K_bias[:, None],
                    Angles, D, pairwise=True)[:, :, 0]
    return y if Z is None else y * F.silu(Z.float())


def mimo_standin(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z, *args, **kwargs):
    y = _sequential(Q, K, V[:, :, None] * MIMO_V.transpose(0, 1), ADT, DT, Trap, Q_bias, K_bias, Angles, D,
                    pairwise=False)
    if Z is not None:
        y = y * F.silu(Z[:, :, None].float() * MIMO_Z.transpose(0, 1))
    if MIMO_Out is not None:
        y = (y * MIMO_Out.transpose(0, 1)).sum(2)
    return y


_HF_FAMILIES_WITH_MAMBA_SSM_PATHS = (
    "mamba", "falcon_mamba", "mamba2", "jamba", "bamba", "nemotron_h", "zamba2", "granitemoehybrid", "falcon_h1",
)
Mamba3 = MambaConfig = MambaLMHeadModel = None  # set by the fixture


@pytest.fixture(scope="module", autouse=True)
def official_classes():
    """Import mamba_ssm's Mamba3 with the CPU stand-ins for this module only, then remove mamba_ssm
    (and the stand-ins) from ``sys.modules`` again, as ``test_mamba_ssm.py`` does. The real kernel
    functions are kept in ``REAL`` (the GPU test puts them back)."""
    global Mamba3, MambaConfig, MambaLMHeadModel
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba_ssm is not installed")
    for family in _HF_FAMILIES_WITH_MAMBA_SSM_PATHS:
        with contextlib.suppress(ImportError):
            importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    before = set(sys.modules)
    if importlib.util.find_spec("selective_scan_cuda") is None:
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    if not torch.cuda.is_available():
        stub = types.ModuleType("mamba_ssm.ops.tilelang.mamba3.mamba3_mimo")
        stub.mamba3_mimo = mimo_standin
        sys.modules[stub.__name__] = stub
    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
        from mamba_ssm.modules import mamba3 as official
        from mamba_ssm.ops.triton import layernorm_gated

        REAL.update(module=official, norms=layernorm_gated, siso=official.mamba3_siso_combined,
                    mimo=official.mamba3_mimo_combined, norm=layernorm_gated.rmsnorm_fn)
        official.mamba3_siso_combined = siso_standin
        official.mamba3_mimo_combined = mimo_standin
        layernorm_gated.rmsnorm_fn = layernorm_gated.rms_norm_ref
        Mamba3 = official.Mamba3
        yield
    finally:
        REAL.clear()
        for name in set(sys.modules) - before:
            if name == "selective_scan_cuda" or name.split(".")[0] == "mamba_ssm":
                del sys.modules[name]


REAL: dict = {}


# --------------------------------------------------------------------------------------------
# The adapter on the official module
# --------------------------------------------------------------------------------------------

CONFIGS = {
    "siso": dict(),
    "siso-norm": dict(is_outproj_norm=True),
    "siso-groups-fullrope": dict(ngroups=2, rope_fraction=1.0),
    "mimo": dict(is_mimo=True, mimo_rank=2),
    "mimo-norm": dict(is_mimo=True, mimo_rank=3, is_outproj_norm=True),
    "mimo-groups-fullrope": dict(is_mimo=True, mimo_rank=2, ngroups=2, rope_fraction=1.0),
}


def randomise(module, seed, zero_biases=False):
    """Random values for every parameter (B/C norms and biases away from their init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("_norm.weight", "norm.weight")) or name in ("B_bias", "C_bias"):
                p.copy_(1 + 0.3 * noise)
            elif name in ("dt_bias",):
                p.copy_(noise - 2)
            elif name.endswith("weight"):
                p.copy_(noise / math.sqrt(p.shape[-1]))
            elif name.endswith("bias") and zero_biases:
                p.zero_()
            else:
                p.copy_(0.5 * noise)
    return module


def mixer(config, seed=0, d_model=32, d_state=8):
    torch.manual_seed(seed)
    kw = dict(d_state=d_state, headdim=8, chunk_size=8, layer_idx=0)
    return randomise(Mamba3(d_model, **kw, **CONFIGS[config]), seed).eval()


U = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_reference_forward_equals_the_module(config):
    """Our pure-torch forward, plain and under the rules, equals the official module's forward
    (its own code around the kernels, the kernels replaced by the sequential references)."""
    m = mixer(config)
    with torch.no_grad():
        official = m(U)
        ours = mamba3_forward(m, U)
        with mambalrp.lrp(m):
            ruled = m(U)
    assert (ours - official).abs().max().item() <= 1e-5
    assert (ruled - official).abs().max().item() <= 1e-5
    assert "forward" not in m.__dict__


@pytest.mark.parametrize("config", ["siso", "mimo-norm"])
def test_rules_on_the_mixer_conserve(config):
    """Relevance of the mixer's input equals the relevance of its output (no biases in Mamba-3's
    value path; B/C biases only shape coefficients)."""
    m = mixer(config, seed=1)
    u = U.clone().requires_grad_()
    with mambalrp.lrp(m):
        out = m(u)
    g = torch.randn_like(out)
    out.backward(g)
    total = (out * g).sum().item()
    assert abs((u * u.grad).sum().item() - total) <= 1e-4 * abs(total) + 1e-6
    # the plain gradient does not conserve: the rules changed the backward
    u2 = U.clone().requires_grad_()
    with mambalrp.lrp(m, rules="gradient"):
        m(u2).backward(g)
    assert abs((u2 * u2.grad).sum().item() - total) > 1e-3 * abs(total)


def test_refusals_name_the_flag():
    m = mixer("siso")
    m.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(UnsupportedModelError, match="extra"):
        with mambalrp.lrp(m):
            pass
    assert "forward" not in m.__dict__
    odd = Mamba3(32, d_state=7, headdim=8)
    with pytest.raises(UnsupportedModelError, match="d_state=7 is odd"):
        with mambalrp.lrp(odd):
            pass
    flipped = mixer("mimo")
    flipped.num_rope_angles = 1
    with pytest.raises(UnsupportedModelError, match="num_rope_angles"):
        with mambalrp.lrp(flipped):
            pass
    m = mixer("siso")
    with mambalrp.lrp(m), pytest.raises(MambaLRPError, match="cu_seqlens"):
        m(U[:1], cu_seqlens=torch.tensor([0, 5, 11]))
    assert "forward" not in m.__dict__


# --------------------------------------------------------------------------------------------
# A MambaLMHeadModel with Mamba-3 layers
# --------------------------------------------------------------------------------------------


def mamba3_lm(mamba3_cfg, seed=0, n_layer=2, d_model=32, vocab=64, **cfg):
    """MambaLMHeadModel whose mixers are Mamba3 modules (parameter names
    ``backbone.layers.i.mixer.*``), as docs/mamba3.md builds it for mamba_ssm 2.3.2."""
    torch.manual_seed(seed)
    config = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab, ssm_cfg=dict(layer="Mamba1", d_state=4),
                         pad_vocab_size_multiple=1, **cfg)
    model = MambaLMHeadModel(config)
    for i, block in enumerate(model.backbone.layers):
        block.mixer = randomise(Mamba3(d_model, layer_idx=i, d_state=8, headdim=8, chunk_size=8, **mamba3_cfg), seed + i)
    return model.eval()


IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("config", ["siso", "mimo"])
def test_lm_explain_verified_conserving_and_restored(config):
    # LayerNorm blocks: mamba_ssm's RMSNorm is a Triton kernel that cannot run on a CPU (the model's
    # own forward must run for the verification to compare with it)
    model = mamba3_lm(CONFIGS[config], rms_norm=False, fused_add_norm=False, residual_in_fp32=True)
    before = snapshot(model)
    exp = mambalrp.explain(model, IDS)
    assert exp.verified  # forward equality with the module's own forward and the leak probe
    assert (exp.conservation_delta.abs() / exp.logit.abs()).max().item() <= 1e-4
    assert_same_state(model, before)
    with torch.no_grad(), mambalrp.lrp(model):
        ruled = model(IDS).logits
    with torch.no_grad():
        assert (ruled - model(IDS).logits).abs().max().item() <= 1e-5
    names = {a.name for _, _, a in mambalrp.context.plan(model, mambalrp.MAMBALRP)}
    assert {"mamba-ssm-mamba3", "mamba-ssm-block", "mamba-ssm-backbone"} <= names


def test_lm_restored_after_an_error():
    model = mamba3_lm(CONFIGS["siso"], n_layer=1, rms_norm=False)
    before = snapshot(model)
    with pytest.raises(Exception):
        mambalrp.explain(model, IDS, target=10_000)
    assert_same_state(model, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and mamba_ssm's Mamba-3 kernels")
def test_gpu_official_kernels():  # pragma: no cover - GPU only
    """On a GPU, the adapter's forward against the official Triton/TileLang kernels (bfloat16
    inside the kernels, hence the tolerance relative to the output's scale)."""
    official, norms = REAL["module"], REAL["norms"]
    standins = (official.mamba3_siso_combined, official.mamba3_mimo_combined, norms.rmsnorm_fn)
    official.mamba3_siso_combined, official.mamba3_mimo_combined = REAL["siso"], REAL["mimo"]
    norms.rmsnorm_fn = REAL["norm"]
    try:
        configs = [dict(), dict(is_outproj_norm=True)]
        if REAL["mimo"] is not None:
            configs += [dict(is_mimo=True, mimo_rank=4, chunk_size=16),
                        dict(is_mimo=True, mimo_rank=4, chunk_size=16, is_outproj_norm=True)]
        for kw in configs:
            torch.manual_seed(0)
            m = randomise(Mamba3(256, d_state=64, headdim=64, layer_idx=0, **kw), 0).cuda().eval()
            u = torch.randn(2, 128, 256, device="cuda")
            with torch.no_grad():
                reference = m(u).float()
                ours = mamba3_forward(m, u).float()
                with mambalrp.lrp(m):
                    ruled = m(u).float()
            for got in (ours, ruled):
                err = (got - reference).abs().max().item() / reference.abs().max().item()
                assert err <= 3e-2, (kw, err)
    finally:
        official.mamba3_siso_combined, official.mamba3_mimo_combined, norms.rmsnorm_fn = standins


@pytest.mark.slow
def test_measured_errors_table(capsys, request):
    """The numbers of docs/support.md's Mamba-3 table, one row per configuration
    (``pytest -s -m slow tests/test_mamba3.py -k table`` prints them). Runs only when slow tests
    are selected with ``-m``."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow: select with -m slow")
    rows = []
    for config in sorted(CONFIGS):
        m = mixer(config)
        with torch.no_grad():
            official = m(U)
            plain = mamba3_forward(m, U)
            with mambalrp.lrp(m):
                ruled = m(U)
        mixer_diff = max((plain - official).abs().max().item(), (ruled - official).abs().max().item())
        model = mamba3_lm(CONFIGS[config], rms_norm=False, fused_add_norm=False, residual_in_fp32=True)
        exp = mambalrp.explain(model, IDS)
        gi = mambalrp.explain(model, IDS, rules="gradient")
        with torch.no_grad():
            logits = model(IDS).logits
            with mambalrp.lrp(model):
                lm_diff = (model(IDS).logits - logits).abs().max().item()
        rel = (exp.conservation_delta.abs() / exp.logit.abs()).max().item()
        gi_rel = (gi.conservation_delta.abs() / gi.logit.abs()).max().item()
        rows.append(f"| {config} | {mixer_diff:.1e} | {lm_diff:.1e} | {rel:.1e} | {gi_rel:.2f} |")
        assert exp.verified and mixer_diff <= 1e-5 and lm_diff <= 1e-5 and rel <= 1e-4 and gi_rel > 1e-2
    with capsys.disabled():
        print("\n" + "\n".join(rows))

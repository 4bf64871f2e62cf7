"""mamba_ssm's MambaLMHeadModel: Mamba-1 and Mamba-2 mixers, fused add-norm and residual_in_fp32
on and off, GatedMLP (d_intermediate > 0), attention layers (attn_layer_idx), RMSNorm and LayerNorm.

Skipped unless ``mamba_ssm`` is installed. On a machine without CUDA, install it without its CUDA
build (``MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE pip install --no-build-isolation
mamba-ssm``); importing it then fails on the missing ``selective_scan_cuda`` extension, so these
tests install a CPU stand-in for that extension (built on mamba_ssm's own pure-torch
``selective_scan_ref``). The stand-in exists only here, to let mamba_ssm import and let its
unfused Mamba-1 forward run as the reference; mambalrp never calls it.

Checks: the forward under lrp() equals mamba_ssm's own forward where that runs on CPU (unfused,
LayerNorm, Mamba-1 with GatedMLP and attention); the same weights loaded into transformers'
MambaForCausalLM / Mamba2ForCausalLM give the same logits and the same relevance (fused add-norm,
RMSNorm, both mixers); conservation and rule coverage with biases zeroed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types

import pytest
import torch

import mambalrp
from mambalrp.testing import tiny_mamba, tiny_mamba2


def _cpu_standin() -> types.ModuleType:
    standin = types.ModuleType("selective_scan_cuda")

    def fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

        out = selective_scan_ref(u, delta, A, B, C, D, None, delta_bias, delta_softplus)
        x = u.new_zeros(u.shape[0], u.shape[1], 1, 2 * A.shape[1])
        return (out, x) if z is None else (out, x, out * torch.nn.functional.silu(z))

    standin.fwd = fwd
    return standin


if importlib.util.find_spec("mamba_ssm") is None:
    pytest.skip("mamba_ssm is not installed", allow_module_level=True)


_HF_FAMILIES_WITH_MAMBA_SSM_PATHS = (
    "mamba", "falcon_mamba", "mamba2", "jamba", "bamba", "nemotron_h", "zamba", "zamba2", "granitemoehybrid", "falcon_h1",
)


@pytest.fixture(scope="module", autouse=True)
def mamba_ssm_classes():
    """Import mamba_ssm with the stand-in for the duration of this module only, then remove both
    from ``sys.modules``: while mamba_ssm imports, transformers routes its own Mamba forwards to
    mamba_ssm's GPU kernels, which other test modules must not see."""
    global MambaConfig, MambaLMHeadModel
    has_extension = importlib.util.find_spec("selective_scan_cuda") is not None
    if not has_extension:
        # transformers binds each modeling module to mamba_ssm's kernels or to its torch path when
        # the module is first imported: import them now, while mamba_ssm cannot import, so that
        # they keep the torch path after the stand-in is gone (whatever the order of test modules).
        for family in _HF_FAMILIES_WITH_MAMBA_SSM_PATHS:
            with contextlib.suppress(ImportError):
                importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    before = set(sys.modules)
    if not has_extension:
        sys.modules["selective_scan_cuda"] = _cpu_standin()
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    try:
        yield
    finally:
        if not has_extension:
            for name in set(sys.modules) - before:
                if name == "selective_scan_cuda" or name.split(".")[0] == "mamba_ssm":
                    del sys.modules[name]


MambaConfig = MambaLMHeadModel = None  # set by the fixture

IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
CP = mambalrp.MAMBALRP.with_attention("cp")


def _zero_biases(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "dt" not in name:
                p.zero_()
    return model


def _from_hf(hf, **cfg):
    """The HF model's weights in a mamba_ssm model (same parameter names but the embedding)."""
    model = MambaLMHeadModel(MambaConfig(pad_vocab_size_multiple=1, tie_embeddings=False, **cfg)).eval()
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


MAMBA1 = dict(d_model=16, n_layer=2, d_intermediate=0, vocab_size=64, rms_norm=True,
              ssm_cfg=dict(layer="Mamba1", d_state=4, d_conv=4, expand=2))
MAMBA2 = dict(d_model=32, n_layer=2, d_intermediate=0, vocab_size=64, rms_norm=True,
              ssm_cfg=dict(layer="Mamba2", d_state=8, d_conv=4, expand=2, headdim=8, ngroups=2, chunk_size=8))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("fp32", [False, True])
@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_same_weights_as_transformers_same_logits_and_relevance(layer, fused, fp32):
    hf = tiny_mamba(0, zero_biases=True) if layer == "Mamba1" else tiny_mamba2(0, zero_biases=True)
    model = _from_hf(hf, **(MAMBA1 if layer == "Mamba1" else MAMBA2), fused_add_norm=fused, residual_in_fp32=fp32)
    with torch.no_grad(), mambalrp.lrp(hf), mambalrp.lrp(model):
        assert (model(IDS).logits - hf(IDS, use_cache=False).logits).abs().max().item() <= 1e-5
    # mamba_ssm's own forward needs its GPU kernels (the CPU stand-in covers only the unfused
    # Mamba-1 scan), so the verification's forward comparison runs on GPU only; here the same
    # weights in transformers are the reference, and that model is verified.
    ours = mambalrp.explain(model, IDS, verify=torch.cuda.is_available())
    theirs = mambalrp.explain(hf, IDS)
    assert theirs.verified
    torch.testing.assert_close(ours.logit, theirs.logit, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.relevance, theirs.relevance, rtol=1e-4, atol=1e-5)
    assert (ours.conservation_delta.abs() / ours.logit.abs()).max().item() <= 1e-4


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_mlp_attention_layernorm_variants(layer):
    """GatedMLP, an attention layer and LayerNorm: forward equal to mamba_ssm's (where it runs on
    CPU), every op covered, per-block conservation with the CP attention rule."""
    ssm = dict(layer="Mamba1", d_state=4) if layer == "Mamba1" else dict(
        layer="Mamba2", d_state=8, headdim=8, ngroups=2, chunk_size=8)
    cfg = MambaConfig(
        d_model=32, n_layer=3, d_intermediate=48, vocab_size=64, ssm_cfg=ssm, attn_layer_idx=[1],
        attn_cfg=dict(num_heads=4, causal=True), rms_norm=False, fused_add_norm=False, residual_in_fp32=True,
        pad_vocab_size_multiple=1,
    )
    torch.manual_seed(0)
    model = _zero_biases(MambaLMHeadModel(cfg).eval())
    with torch.no_grad(), mambalrp.lrp(model):
        patched = model(IDS).logits
    if layer == "Mamba1":  # mamba_ssm's Mamba-2 forward needs its Triton kernels (GPU)
        with torch.no_grad():
            assert (patched - model(IDS).logits).abs().max().item() <= 1e-5
    names = {a.name for _, _, a in mambalrp.context.plan(model, CP)}
    assert {"mamba-ssm-block", "mamba-ssm-backbone", "mamba-ssm-gated-mlp", "mamba-ssm-mha"} <= names
    report = mambalrp.check_rules(model, IDS, rules=CP)
    if layer == "Mamba1":
        assert report.ok, str(report)
        assert report.forward_difference <= 1e-5
    else:  # the model's own forward could not run here: everything else is checked
        assert report.forward_error and not report.ok
        assert not report.uncovered and not report.leaking_blocks and report.total_relative_error <= 1e-4, str(report)
    assert [b.name for b in report.blocks] == ["backbone.layers.0", "backbone.layers.1", "backbone.layers.2"]

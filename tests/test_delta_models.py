"""Models with gated delta rules from transformers (Qwen3-Next, Qwen3.5, OLMo-hybrid: Gated DeltaNet;
Kimi Linear: KDA) and LFM2's gated short convolution.

Per family: the forward under lrp() equals the original (<= 1e-5 of the logit scale, float32), the
model is restored exactly, every operation on the relevance path is covered by a rule, and
relevance is conserved with biases zeroed (<= 1e-4 relative) under the exact (CP) attention
rule; under AttnLRP only approximately (measured).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mambalrp
from delta_models import DELTA_MODELS, make
from tests_support import assert_same_state_simple, relative_conservation_error

IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
CP = mambalrp.MAMBALRP.with_attention("cp")


@pytest.fixture(scope="module", params=sorted(DELTA_MODELS))
def delta_model(request):
    return request.param, make(request.param, zero_biases=True)


def test_forward_equal_and_restored(delta_model):
    _, model = delta_model
    before = assert_same_state_simple(model)
    with torch.no_grad():
        ref = model(IDS, use_cache=False).logits
        with mambalrp.lrp(model):
            patched = model(IDS, use_cache=False).logits
        after = model(IDS, use_cache=False).logits
    assert (patched - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    assert torch.equal(after, ref)
    before.check()


def test_every_layer_kind_is_matched(delta_model):
    family, model = delta_model
    names = {adapter.name for _, _, adapter in mambalrp.context.plan(model, mambalrp.MAMBALRP)}
    if family == "lfm2":  # short convs, attention with out_proj, w1/w3/w2 MLPs, plain RMSNorms
        assert names == {"lfm2-short-conv", "hf-attention-out-proj", "swiglu-mlp-w123", "rmsnorm"}
        return
    if family == "kimi_linear":  # KDA, latent attention, MoE with a shared expert, plain RMSNorms
        assert {"kimi-delta-attention", "hf-latent-attention", "moe-experts", "gated-mlp", "rmsnorm"} <= names
        return
    assert "gated-deltanet" in names and "gated-mlp" in names
    if family == "olmo_hybrid":  # plain RMSNorms, ungated attention
        assert {"hf-attention", "rmsnorm"} <= names and "rmsnorm-zero-centred" not in names
    else:  # (1 + weight) norms, attention with a sigmoid output gate
        assert {"hf-gated-attention", "rmsnorm-zero-centred"} <= names and "rmsnorm" not in names
    if family == "qwen3_next":
        assert {"moe-shared-gate", "moe-experts"} <= names


@pytest.mark.parametrize(
    "family",
    [f if f == "qwen3_next" else pytest.param(f, marks=pytest.mark.slow) for f in sorted(DELTA_MODELS)],
)
def test_rules_cover_the_graph_and_conserve(family):
    """CP attention: every block and the whole model conserve; AttnLRP: only the softmax leaks
    (measured 0.015-0.2); Gradient x Input does not conserve. (Conservation under CP attention is
    checked for every family by the padding test in the default run.)"""
    model = make(family, zero_biases=True)
    before = assert_same_state_simple(model)
    report = mambalrp.check_rules(model, IDS, rules=CP)
    before.check()
    assert report.ok, str(report)
    assert len(report.blocks) == len(model.model.layers)
    assert report.total_relative_error <= 1e-4
    attn = mambalrp.explain(model, IDS, verify=False)  # default: AttnLRP on attention (verified below)
    torch.testing.assert_close(attn.logit, report.logit)
    assert 1e-4 < relative_conservation_error(attn) < 1.0
    gi = mambalrp.explain(model, IDS, rules="gradient", verify=False)
    assert relative_conservation_error(gi) > 100 * max(report.total_relative_error, 1e-7)


def test_left_padding(delta_model):
    _, model = delta_model
    mask = torch.ones_like(IDS)
    mask[0, :3] = 0
    with torch.no_grad():
        ref = model(IDS, attention_mask=mask, use_cache=False).logits
        with mambalrp.lrp(model):
            patched = model(IDS, attention_mask=mask, use_cache=False).logits
    assert (patched - ref)[mask.bool()].abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    exp = mambalrp.explain(model, IDS, attention_mask=mask, rules=CP)
    assert exp.verified and torch.isfinite(exp.relevance).all()
    assert torch.all(exp.relevance[0, :3] == 0)
    assert relative_conservation_error(exp) <= 1e-4


@pytest.mark.slow
def test_longer_than_a_chunk_is_verified_and_conserves(delta_model):
    """Past the first 64-step chunk of the recurrence (transformers' and ours)."""
    _, model = delta_model
    ids = torch.randint(0, 64, (1, 150), generator=torch.Generator().manual_seed(4))
    exp = mambalrp.explain(model, ids, rules=CP)
    assert exp.verified and relative_conservation_error(exp) <= 1e-4


def test_value_path_only_under_the_rules():
    """Under the rules the queries and keys (and the decays and write strengths) are off the
    relevance path; Gradient x Input keeps them on it."""
    model = make("qwen3_5", zero_biases=True).requires_grad_(False)  # only the input needs a gradient
    mixer = model.model.layers[0].linear_attn
    for rules, on_path in (("mambalrp", False), ("gradient", True)):
        seen = {}

        def tap(module, name, tensor):
            if module is mixer:
                seen[name] = tensor.requires_grad
            return tensor

        with mambalrp.lrp(model, rules=rules, tap_fn=tap):
            embeds = model.model.embed_tokens(IDS).detach().requires_grad_()
            model(inputs_embeds=embeds, use_cache=False)
        assert seen["conv"] and seen["values"] and seen["y"]
        assert seen["qk_conv"] is on_path


def test_look_alikes_are_refused_or_left_to_the_plain_norm():
    model = make("qwen3_next")
    mixer = model.model.layers[0].linear_attn
    adapter = mambalrp.adapters.GatedDeltaNetAdapter()
    assert adapter.matches(mixer) and adapter.refuse(mixer) is None
    mixer.conv1d.padding = (1,)
    try:
        assert "not causal" in adapter.refuse(mixer)
        with pytest.raises(mambalrp.UnsupportedModelError, match=r"'model\.layers\.0\.linear_attn'.*not causal"):
            mambalrp.explain(model, IDS)
    finally:
        mixer.conv1d.padding = (3,)
    mixer.activation = "gelu"
    try:
        assert "not SiLU" in adapter.refuse(mixer)
    finally:
        mixer.activation = "silu"

    zero_centred = mambalrp.adapters.ZeroCentredRMSNormAdapter()
    assert zero_centred.matches(model.model.norm)

    class PlainRMSNorm(nn.Module):  # same names and shapes, weight * x / rms(x)
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(d))
            self.eps = 1e-6

        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    assert not zero_centred.matches(PlainRMSNorm(8))
    assert mambalrp.adapters.find_adapter(PlainRMSNorm(8)).name == "rmsnorm"

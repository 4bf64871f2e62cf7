"""Hybrid models from transformers: Jamba, Bamba, NemotronH, Zamba, Zamba2, GraniteMoeHybrid, Falcon-H1
(the tiny, 0.5B and 7B config shapes).

Per family: the forward under lrp() equals the original (<= 1e-5 of the logit scale, float32), the model is restored
exactly, every operation on the relevance path is covered by a rule, and relevance is conserved
with biases zeroed: exactly (<= 1e-4 relative) with the CP attention rule, approximately with
AttnLRP, whose softmax rule drops the constant term of its linearisation (error measured).
"""

from __future__ import annotations

import pytest
import torch

import mambalrp
from hybrid_models import HYBRIDS, make, own_forward_is_wrong
from mambalrp.fingerprint import fingerprint
from tests_support import assert_same_state_simple, relative_conservation_error

IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
CP = mambalrp.MAMBALRP.with_attention("cp")


def _forward_tolerance(reference: torch.Tensor) -> float:
    """1e-5 of the logit scale: transformers' own chunked SSD scan (5.24) sums in another order
    than ours, and the float32 rounding (~5e-7 per mixer) grows through the layers."""
    return 1e-5 * max(1.0, reference.abs().max().item())


@pytest.fixture(scope="module", params=sorted(HYBRIDS))
def hybrid(request):
    return request.param, make(request.param, zero_biases=True)


def test_forward_equal_and_restored(hybrid):
    _, model = hybrid
    before = assert_same_state_simple(model)
    with torch.no_grad():
        ref = model(IDS, use_cache=False).logits
        with mambalrp.lrp(model):
            patched = model(IDS, use_cache=False).logits
        after = model(IDS, use_cache=False).logits
    assert (patched - ref).abs().max().item() <= _forward_tolerance(ref)
    assert torch.equal(after, ref)
    before.check()


def test_every_layer_kind_is_matched(hybrid):
    family, model = hybrid
    names = {adapter.name for _, _, adapter in mambalrp.context.plan(model, mambalrp.MAMBALRP)}
    assert names & {"hf-attention", "hf-attention-inline"}  # inline: Jamba on transformers 4.x
    assert names & {"hf-mamba-mixer", "hf-mamba2-mixer", "zamba-mamba-mixer"}
    assert "rmsnorm" in names


def _skip_if_refused_here(family: str) -> None:
    if own_forward_is_wrong(family):
        pytest.skip(f"{family}'s own forward is wrong in this transformers release: see test_longer_than_a_chunk_...")


def test_rules_cover_the_graph_and_conserve(hybrid):
    """CP attention: every block and the whole model conserve; AttnLRP: only the softmax leaks."""
    family, model = hybrid
    _skip_if_refused_here(family)
    before = assert_same_state_simple(model)
    report = mambalrp.check_rules(model, IDS, rules=CP)
    before.check()
    assert report.ok, str(report)
    assert len(report.blocks) == len(model.model.layers)
    assert report.total_relative_error <= 1e-4
    attn = mambalrp.explain(model, IDS)  # default: AttnLRP on attention
    torch.testing.assert_close(attn.logit, report.logit)
    assert 1e-4 < relative_conservation_error(attn) < 1.0  # measured 0.09-0.55 across families and transformers releases


def test_left_padding(hybrid):
    """A padded row: real tokens unchanged under lrp(), no NaN from fully masked query rows,
    padding gets no relevance, conservation holds (CP attention)."""
    family, model = hybrid
    _skip_if_refused_here(family)
    mask = torch.ones_like(IDS)
    mask[0, :3] = 0
    with torch.no_grad():
        ref = model(IDS, attention_mask=mask, use_cache=False).logits
        with mambalrp.lrp(model):
            patched = model(IDS, attention_mask=mask, use_cache=False).logits
    assert (patched - ref)[mask.bool()].abs().max().item() <= _forward_tolerance(ref)
    exp = mambalrp.explain(model, IDS, attention_mask=mask, rules=CP)
    assert torch.isfinite(exp.relevance).all()
    assert torch.all(exp.relevance[0, :3] == 0)
    assert relative_conservation_error(exp) <= 1e-4


def test_longer_than_a_chunk_is_verified_or_refused(hybrid):
    """Past the first chunk of the mixers' scans: explained and verified, or, where this
    transformers release's own forward is wrong there (Zamba2 and NemotronH before 5.17), refused
    with the module and the difference named."""
    family, model = hybrid
    ids = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(4))
    if own_forward_is_wrong(family):
        with pytest.raises(mambalrp.VerificationError, match=r"different function.*'model\.layers\.0\.m"):
            mambalrp.explain(model, ids, rules=CP)
        return
    exp = mambalrp.explain(model, ids, rules=CP)
    assert exp.verified and relative_conservation_error(exp) <= 1e-4


def test_the_fingerprint_is_stable_so_the_verdict_is_reused(hybrid):
    """Nothing an explanation does (eval mode and back, patching and restoring, the probe)
    changes what the fingerprint covers: later calls reuse the plan and the verdict."""
    family, model = hybrid
    _skip_if_refused_here(family)
    mambalrp.explain(model, IDS, rules=CP)
    stamp = fingerprint(model)
    model.train()
    mambalrp.explain(model, IDS, rules=CP)
    model.eval()
    assert fingerprint(model) == stamp


@pytest.mark.skipif("falcon_h1_7b" not in HYBRIDS, reason="Falcon-H1 arrives in transformers 4.57")
def test_falcon_h1_shapes_carry_their_published_flags():
    """The three Falcon-H1 models are the shapes they are named after: these are the flags that
    change the computation, so each test above runs on each of them."""
    tiny, small, large = (make(f) for f in ("falcon_h1_tiny", "falcon_h1_0_5b", "falcon_h1_7b"))
    for model in (tiny, small):
        mixer = model.model.layers[0].mamba
        assert mixer.mamba_rms_norm is False and isinstance(mixer.norm, torch.nn.Identity)
    mixer = large.model.layers[0].mamba
    assert mixer.mamba_rms_norm is True and mixer.norm.n_groups == 2 and mixer.n_groups == 2
    assert mixer.norm.norm_before_gate is False
    # The 0.5B and 7B shapes: attention narrower than the model, Mamba width set by mamba_d_ssm.
    for model, width in ((small, 24), (large, 32)):
        assert model.model.layers[0].self_attn.o_proj.in_features == 8 < model.config.hidden_size
        assert model.model.layers[0].mamba.intermediate_size == width
        assert len(set(model.model.layers[0].mamba.mup_vector.flatten().tolist())) > 1
        assert model.config.mamba_use_mlp is True
    # The tiny shape switches every bias on.
    layer = tiny.model.layers[0]
    assert layer.mamba.in_proj.bias is not None and layer.mamba.out_proj.bias is not None
    assert layer.self_attn.q_proj.bias is not None and layer.feed_forward.up_proj.bias is not None


@pytest.mark.skipif("falcon_h1_tiny" not in HYBRIDS, reason="Falcon-H1 arrives in transformers 4.57")
def test_falcon_h1_with_its_biases_is_explained_and_they_absorb_relevance():
    """With the tiny shape's biases non-zero the forward still matches and the explanation is
    verified; the biases absorb part of the logit (conservation is exact only without them)."""
    model = make("falcon_h1_tiny", zero_biases=False)
    with torch.no_grad():
        ref = model(IDS, use_cache=False).logits
        with mambalrp.lrp(model):
            patched = model(IDS, use_cache=False).logits
    assert (patched - ref).abs().max().item() <= _forward_tolerance(ref)
    report = mambalrp.check_rules(model, IDS, rules=CP)
    assert report.ok and report.absorbed.abs().min().item() > 0, str(report)


def test_zamba_mixer_is_the_zamba_adapter_and_refused_without_it():
    """Zamba's multi-head mixer (3-D A_log) is run by its own adapter; without it the mixer is
    refused as an unmatched sequence mixer, not explained as a Mamba-1 mixer."""
    model = make("zamba", zero_biases=True)
    adapters = {name: adapter.name for name, _, adapter in mambalrp.context.plan(model, mambalrp.MAMBALRP)}
    assert adapters["model.layers.0.mamba"] == "zamba-mamba-mixer"
    assert adapters["model.layers.1.shared_transf.self_attn"] == "hf-attention"
    assert adapters["model.layers.1.shared_transf.feed_forward"] == "gated-mlp"
    from mambalrp.adapters import ZambaMambaMixerAdapter

    # What the adapter assumes is checked: another activation or a non-causal conv is refused.
    mixer = model.model.layers[2].mamba
    mixer.activation = "gelu"
    with pytest.raises(mambalrp.UnsupportedModelError, match=r"'model\.layers\.2\.mamba'.*activation is 'gelu'"):
        mambalrp.explain(model, IDS)
    mixer.activation = "silu"
    mixer.conv1d.padding = (1,)
    with pytest.raises(mambalrp.UnsupportedModelError, match=r"'model\.layers\.2\.mamba'.*conv1d is not causal"):
        mambalrp.explain(model, IDS)
    mixer.conv1d.padding = (3,)
    mambalrp.unregister_adapter("zamba-mamba-mixer")
    try:
        with pytest.raises(mambalrp.UnsupportedModelError, match=r"'model\.layers\.0\.mamba'.*A_log"):
            mambalrp.explain(model, IDS)
    finally:
        mambalrp.register_adapter(ZambaMambaMixerAdapter())


def test_zamba_lookalike_with_split_halves_is_not_explained():
    """A Zamba mixer whose in_proj is split in halves instead of interleaved computes another
    function: verification names the mixer."""
    model = make("zamba", zero_biases=True)
    mixer_cls = type(model.model.layers[0].mamba)

    class Halves(mixer_cls):
        def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
            w = self.in_proj.weight
            order = torch.cat([torch.arange(0, w.shape[0], 2), torch.arange(1, w.shape[0], 2)])
            inverse = torch.argsort(order)
            saved = self.in_proj.weight
            self.in_proj._parameters["weight"] = torch.nn.Parameter(w[inverse], requires_grad=False)
            try:
                return super().forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
            finally:
                self.in_proj._parameters["weight"] = saved

    model.model.layers[0].mamba.__class__ = Halves
    with pytest.raises(mambalrp.VerificationError, match=r"different function.*'model\.layers\.0\.mamba'"):
        mambalrp.explain(model, IDS, rules=CP)


@pytest.mark.parametrize("family", ["mamba2", "falcon_h1_tiny", "falcon_h1_0_5b", "bamba"])
def test_mamba2_mixer_in_parts_equals_the_whole_projection(family, monkeypatch):
    """Without taps or hooks the Mamba-2 adapter computes ``in_proj`` in parts and convolves x
    apart from (B, C); the relevance (left-padded batch, Falcon-H1's muP vector and biases) equals
    that of the whole projection, which taps and patched linear rules still use."""
    from mambalrp.adapters import hf_mamba2
    from mambalrp.testing import tiny_mamba2

    model = tiny_mamba2(0) if family == "mamba2" else make(family)
    ids = torch.randint(1, 60, (2, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    parts = mambalrp.explain(model, ids, attention_mask=mask, verify=False).relevance
    monkeypatch.setattr(hf_mamba2, "whole_output_needed", lambda ctx, linear: True)
    whole = mambalrp.explain(model, ids, attention_mask=mask, verify=False).relevance
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)

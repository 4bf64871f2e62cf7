"""Hybrid models from transformers: Jamba, Bamba, NemotronH, Zamba2, GraniteMoeHybrid.

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
from tests_support import assert_same_state_simple

IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
CP = mambalrp.MAMBALRP.with_attention("cp")


def _forward_tolerance(reference: torch.Tensor) -> float:
    """1e-5 of the logit scale: transformers' own chunked SSD scan (5.24) sums in another order
    than ours, and the float32 rounding (~5e-7 per mixer) grows through the layers."""
    return 1e-5 * max(1.0, reference.abs().max().item())


def _relative(exp: mambalrp.Explanation) -> float:
    return (exp.conservation_delta.abs() / exp.logit.abs()).max().item()


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
    assert names & {"hf-mamba-mixer", "hf-mamba2-mixer"}
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
    assert 1e-4 < _relative(attn) < 1.0  # measured 0.09-0.55 across families and transformers releases


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
    assert _relative(exp) <= 1e-4


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
    assert exp.verified and _relative(exp) <= 1e-4


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

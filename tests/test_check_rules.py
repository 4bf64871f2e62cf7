"""check_rules(): coverage of the backward graph and per-block conservation."""

from __future__ import annotations

import pytest
import torch

import mambalrp
from tests_support import SquashedHead
from mambalrp.testing import tiny_mamba, tiny_mamba2

FAMILIES = {
    "mamba": lambda seed, **kw: tiny_mamba(seed, **kw),
    "falcon_mamba": lambda seed, **kw: tiny_mamba(seed, falcon=True, **kw),
    "mamba2": lambda seed, **kw: tiny_mamba2(seed, **kw),
}


@pytest.fixture
def ids():
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def test_clean_on_supported_families(family, ids):
    model = FAMILIES[family](0, zero_biases=True)
    report = mambalrp.check_rules(model, ids)
    assert report.ok, str(report)
    assert report.uncovered == []
    assert [b.name for b in report.blocks] == ["backbone.layers.0", "backbone.layers.1"]
    for block in report.blocks:
        assert block.relative_error < 1e-5
    assert report.total_relative_error < 1e-5
    assert "OK" in str(report)
    # The per-block relevances chain: what leaves layer 0 enters layer 1.
    torch.testing.assert_close(report.blocks[0].relevance_out, report.blocks[1].relevance_in, rtol=1e-5, atol=1e-6)
    # Equals explain()'s numbers.
    exp = mambalrp.explain(model, ids)
    torch.testing.assert_close(report.input_relevance, exp.relevance.sum(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("component, op", [("silu", "SiluBackward0"), ("gate", "MulBackward0")])
def test_flags_a_rule_swapped_for_the_gradient(component, op, ids):
    model = FAMILIES["mamba"](0, zero_biases=True)
    report = mambalrp.check_rules(model, ids, rules=mambalrp.MAMBALRP.without(component))
    assert not report.ok
    flagged = {(u.op, u.module) for u in report.uncovered}
    assert (op, "backbone.layers.0.mixer") in flagged
    assert (op, "backbone.layers.1.mixer") in flagged
    assert report.leaking_blocks
    assert "LEAK" in str(report) and op in str(report)


def test_flags_the_norm_without_ln_rule(ids):
    model = FAMILIES["mamba2"](0, zero_biases=True)
    report = mambalrp.check_rules(model, ids, rules=mambalrp.MAMBALRP.without("norm"))
    modules = {u.module for u in report.uncovered if u.op.startswith("Rsqrt")}
    assert {"backbone.layers.0.norm", "backbone.norm_f", "backbone.layers.0.mixer"} <= modules


def test_flags_a_custom_nonlinearity(ids):
    report = mambalrp.check_rules(SquashedHead(), ids)
    assert not report.ok
    assert [(u.op, u.module) for u in report.uncovered] == [("TanhBackward0", "squash")]
    # The blocks themselves still conserve; the leak is in the head.
    assert not report.leaking_blocks
    assert report.total_relative_error > 1e-3


def test_reports_biases(ids):
    report = mambalrp.check_rules(FAMILIES["mamba"](0), ids)
    assert report.uncovered == []
    assert any("bias" in n for n in report.notes)


def test_explicit_blocks_and_errors(ids):
    model = FAMILIES["mamba"](0, zero_biases=True)
    report = mambalrp.check_rules(model, ids, blocks=["backbone.layers.1.mixer"])
    assert [b.name for b in report.blocks] == ["backbone.layers.1.mixer"]
    assert report.blocks[0].relative_error < 1e-5
    with pytest.raises(ValueError, match="no module"):
        mambalrp.check_rules(model, ids, blocks=["nope"])


def test_a_trained_model_with_biases_is_ok_and_its_bias_share_is_reported():
    """Biases absorb relevance by design: reported as absorbed, not as a problem."""
    from mambalrp.models.zoo import available_models, load_model

    if "sst-mamba1" not in available_models():
        pytest.skip("zoo model not shipped")
    model, tok = load_model("sst-mamba1")
    ids = torch.tensor([tok.encode("an honest, moving and beautifully acted film").ids])
    report = mambalrp.check_rules(model, ids)
    assert report.ok, str(report)
    assert "PROBLEMS" not in str(report) and "absorbed by biases" in str(report)
    assert report.absorbed.abs().max().item() > 1e-3  # the biases do take a share
    torch.testing.assert_close(report.logit, report.input_relevance + report.absorbed, rtol=1e-4, atol=1e-5)
    exp = mambalrp.explain(model, ids)
    torch.testing.assert_close(exp.conservation_delta, report.absorbed, rtol=1e-4, atol=1e-5)


def test_a_score_near_zero_is_not_a_division_by_zero(ids):
    """A logit difference of a logit with itself: the score and every relevance are zero; the
    reported error is 0, not inf or nan (no division by the score alone)."""
    model = FAMILIES["mamba"](0, zero_biases=True)
    report = mambalrp.check_rules(model, ids, target=lambda lg: lg[:, 3] - lg[:, 3])
    assert report.logit.abs().max().item() == 0.0
    assert report.total_relative_error == 0.0 and report.ok, str(report)
    # A tiny score with relevance of normal size around it: judged against that size.
    from mambalrp.conservation import relative_gap

    assert relative_gap(torch.tensor([1e-9]), torch.tensor([1e-9 + 1e-12]), torch.tensor([2.0])) < 1e-11

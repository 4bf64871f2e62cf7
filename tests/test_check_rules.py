"""check_rules(): coverage of the backward graph and per-block conservation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mambalrp
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


class _Squash(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        return torch.tanh(self.proj(x))


class _WithCustomHead(nn.Module):
    """A Mamba backbone followed by an unsupported non-linearity."""

    def __init__(self):
        super().__init__()
        self.inner = FAMILIES["mamba"](0, zero_biases=True)
        self.squash = _Squash(16)

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, **kwargs):
        hidden = self.inner.backbone(input_ids, **kwargs).last_hidden_state
        return self.inner.lm_head(self.squash(hidden))


def test_flags_a_custom_nonlinearity(ids):
    report = mambalrp.check_rules(_WithCustomHead(), ids)
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

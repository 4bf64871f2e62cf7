"""Forward under the rules equals the original HF forward; conservation on every family."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES
from hypothesis import given, settings
from hypothesis import strategies as st

import mambalrp
from mambalrp.testing import zero_biases


def _left_padded(ids: torch.Tensor, pads: list[int]) -> torch.Tensor:
    mask = torch.ones_like(ids)
    for row, k in enumerate(pads):
        mask[row, :k] = 0
    return mask


@pytest.mark.parametrize("padded", [False, True])
def test_forward_under_rules_equals_original(family, padded):
    model = FAMILIES[family](3, use_conv_bias=True)
    ids = torch.randint(0, 64, (3, 19), generator=torch.Generator().manual_seed(1))
    kwargs = {"use_cache": False}
    if padded:
        kwargs["attention_mask"] = _left_padded(ids, [0, 4, 11])
    with torch.no_grad():
        ref = model(ids, **kwargs).logits
        for rules in ("mambalrp", "gradient", "ln-only", mambalrp.MAMBALRP.with_linear(mambalrp.Gamma(0.25))):
            with mambalrp.lrp(model, rules):
                out = model(ids, **kwargs).logits
            assert (out - ref).abs().max().item() <= 1e-5, rules


def test_padding_does_not_change_explanation(family):
    model = zero_biases(FAMILIES[family](4))
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)
    plain = mambalrp.explain(model, ids)
    pad = mambalrp.explain(model, padded, attention_mask=mask)
    assert torch.equal(pad.target, plain.target)
    assert torch.allclose(pad.relevance[:, 5:], plain.relevance, atol=1e-5, rtol=1e-4)
    assert torch.all(pad.relevance[:, :5] == 0)


def _relative_delta(exp) -> float:
    return (exp.conservation_delta.abs() / exp.logit.abs().clamp_min(1e-3)).max().item()


_CONSERVATION_CASES = dict(
    family=st.sampled_from(sorted(FAMILIES)),
    seed=st.integers(0, 10_000),
    batch=st.integers(2, 3),
    seq=st.integers(1, 40),
    layers=st.integers(1, 3),
)


def _conserves(family, seed, batch, seq, layers):
    model = zero_biases(FAMILIES[family](seed, num_hidden_layers=layers, use_conv_bias=True))
    ids = torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))
    exp = mambalrp.explain(model, ids)
    assert _relative_delta(exp) <= 1e-4


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(**_CONSERVATION_CASES)
def test_conservation_property(family, seed, batch, seq, layers):
    _conserves(family, seed, batch, seq, layers)


@settings(max_examples=3, deadline=None)
@given(**_CONSERVATION_CASES)
def test_conservation_property_smoke(family, seed, batch, seq, layers):
    _conserves(family, seed, batch, seq, layers)


@pytest.mark.parametrize("shape", [(2, 5, 8, 4), (3, 33, 16, 8), pytest.param((2, 70, 24, 16), marks=pytest.mark.slow)])
def test_conservation_grid(family, shape):
    batch, seq, hidden, state = shape
    model = zero_biases(FAMILIES[family](seq, hidden_size=hidden, state_size=state))
    ids = torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seq))
    mask = _left_padded(ids, [0] + [i + 1 for i in range(batch - 1)])
    for kwargs in ({}, {"attention_mask": mask}, {"position": seq // 2}):
        exp = mambalrp.explain(model, ids, **kwargs)
        assert _relative_delta(exp) <= 1e-4, kwargs


def test_gradient_x_input_does_not_conserve(family):
    """The rules matter: plain Gradient x Input leaks relevance on the same model."""
    model = zero_biases(FAMILIES[family](7))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    assert _relative_delta(mambalrp.explain(model, ids, rules="gradient")) > 1e-2
    assert _relative_delta(mambalrp.explain(model, ids)) <= 1e-4


def test_biases_absorb_relevance(family):
    model = FAMILIES[family](5, use_conv_bias=True)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    assert _relative_delta(mambalrp.explain(model, ids)) > 1e-4
    assert _relative_delta(mambalrp.explain(zero_biases(model), ids)) <= 1e-4


def test_each_rule_is_needed_for_conservation():
    model = zero_biases(FAMILIES["mamba2"](9))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for component in ("silu", "gate", "norm", "ssm"):
        exp = mambalrp.explain(model, ids, rules=mambalrp.MAMBALRP.without(component))
        assert _relative_delta(exp) > 1e-4, component
        assert exp.rules == f"mambalrp-no-{component}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model(dtype):
    model = zero_biases(FAMILIES["mamba"](2)).to(dtype)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    exp = mambalrp.explain(model, ids)
    assert exp.relevance.dtype == torch.float32 and torch.isfinite(exp.relevance).all()
    assert next(model.parameters()).dtype == dtype
    assert _relative_delta(exp) <= 5e-2  # half-precision forward, float32 scans


def test_linear_rules_on_model():
    model = zero_biases(FAMILIES["mamba"](2))
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    base = mambalrp.explain(model, ids)
    eps = mambalrp.explain(model, ids, rules=mambalrp.MAMBALRP.with_linear(mambalrp.Epsilon(1e-9)))
    assert torch.allclose(eps.relevance, base.relevance, rtol=1e-4, atol=1e-5)
    gam = mambalrp.explain(model, ids, rules=mambalrp.MAMBALRP.with_linear(mambalrp.Gamma(0.25)))
    assert _relative_delta(gam) <= 1e-4  # gamma conserves without biases
    assert not torch.allclose(gam.relevance, base.relevance, rtol=1e-3)

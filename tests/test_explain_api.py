"""explain(): targets, positions, heads, hidden relevance, custom rule sets, rendering."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES
from torch import nn

import mambalrp
from mambalrp.testing import tiny_mamba, zero_biases


@pytest.fixture(scope="module")
def model():
    return zero_biases(tiny_mamba(11))


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_default_target_is_argmax_at_last_position(model, ids):
    exp = mambalrp.explain(model, ids)
    logits = _logits(model, ids)[:, -1]
    assert torch.equal(exp.target, logits.argmax(-1))
    assert torch.allclose(exp.logit, logits.max(-1).values, atol=1e-5)
    assert exp.position.tolist() == [8, 8]
    assert exp.relevance.shape == (2, 9) and exp.relevance.dtype == torch.float32


def test_int_tensor_and_callable_targets(model, ids):
    logits = _logits(model, ids)[:, -1]
    by_int = mambalrp.explain(model, ids, 7)
    assert by_int.target.tolist() == [7, 7] and torch.allclose(by_int.logit, logits[:, 7], atol=1e-5)
    by_tensor = mambalrp.explain(model, ids, torch.tensor([3, 7]))
    assert torch.allclose(by_tensor.relevance[1], by_int.relevance[1], atol=1e-6)
    diff = mambalrp.explain(model, ids, lambda lg: lg[:, 3] - lg[:, 7])
    assert diff.target is None
    assert torch.allclose(diff.logit, logits[:, 3] - logits[:, 7], atol=1e-5)
    # Relevance is linear in the explained score: R(a - b) = R(a) - R(b).
    by_3 = mambalrp.explain(model, ids, 3)
    assert torch.allclose(diff.relevance, by_3.relevance - by_int.relevance, atol=1e-5)


def test_positions(model, ids):
    middle = mambalrp.explain(model, ids, position=4)
    assert middle.position.tolist() == [4, 4]
    assert torch.all(middle.relevance[:, 5:] == 0)  # causal: later tokens get nothing
    neg = mambalrp.explain(model, ids, position=-5)
    assert torch.equal(neg.relevance, middle.relevance)
    per_row = mambalrp.explain(model, ids, position=torch.tensor([4, 8]))
    assert torch.equal(per_row.relevance[0], middle.relevance[0])
    assert per_row.position.tolist() == [4, 8]


def test_default_position_with_right_padding(model, ids):
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    exp = mambalrp.explain(model, ids, attention_mask=mask)
    assert exp.position.tolist() == [8, 5]
    assert torch.all(exp.relevance[1, 6:] == 0)
    alone = mambalrp.explain(model, ids[1:, :6])
    assert torch.allclose(exp.relevance[1, :6], alone.relevance[0], atol=1e-5)


def test_one_dimensional_ids(model, ids):
    exp = mambalrp.explain(model, ids[0])
    assert exp.relevance.shape == (1, 9)
    assert torch.allclose(exp.relevance[0], mambalrp.explain(model, ids).relevance[0], atol=1e-6)


def test_return_hidden(model, ids):
    exp = mambalrp.explain(model, ids, return_hidden=True)
    assert exp.hidden_relevance.shape == (2, 9, 16)
    assert torch.allclose(exp.hidden_relevance.sum(-1), exp.relevance)
    assert mambalrp.explain(model, ids).hidden_relevance is None


def test_works_under_no_grad_and_computes_no_parameter_gradients(model, ids):
    with torch.no_grad():
        exp = mambalrp.explain(model, ids)
    assert torch.isfinite(exp.relevance).all()
    assert all(p.grad is None for p in model.parameters())


class Classifier(nn.Module):
    """A user's own head on top of the backbone: mean-pool then linear."""

    def __init__(self, backbone: nn.Module, classes: int = 3):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, classes, bias=False)

    def forward(self, input_ids, attention_mask=None):
        hidden = self.backbone(input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.head(hidden.mean(1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_custom_head_on_backbone(family):
    torch.manual_seed(0)
    clf = Classifier(zero_biases(FAMILIES[family](1)).backbone).eval()
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(3))
    exp = mambalrp.explain(clf, ids, target=torch.tensor([0, 1, 2]))
    assert exp.position is None
    with torch.no_grad():
        logits = clf(ids)
    assert torch.allclose(exp.logit, logits[torch.arange(3), torch.tensor([0, 1, 2])], atol=1e-5)
    assert (exp.conservation_delta.abs() / exp.logit.abs()).max() <= 1e-4
    with pytest.raises(mambalrp.InputError, match="no sequence dimension"):
        mambalrp.explain(clf, ids, position=3)


def test_backbone_alone_explains_a_hidden_unit():
    backbone = zero_biases(tiny_mamba(2)).backbone
    ids = torch.randint(0, 64, (1, 6))
    exp = mambalrp.explain(backbone, ids, target=5)
    with torch.no_grad():
        value = backbone(ids, use_cache=False).last_hidden_state[0, -1, 5]
    assert torch.allclose(exp.logit[0], value, atol=1e-5)


def test_custom_rule_set_subclass(model, ids):
    calls = []

    class CountingRules(mambalrp.RuleSet):
        def selective_scan(self, *args, **kwargs):
            calls.append(1)
            return super().selective_scan(*args, **kwargs)

    exp = mambalrp.explain(model, ids, rules=CountingRules(name="counting"))
    assert len(calls) == 2  # one per layer
    assert exp.rules == "counting"
    assert torch.allclose(exp.relevance, mambalrp.explain(model, ids).relevance)


def test_gradient_rules_equal_gradient_times_input(model, ids):
    exp = mambalrp.explain(model, ids, rules="gradient")
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    logit = model(inputs_embeds=emb, use_cache=False).logits[:, -1].gather(1, exp.target[:, None]).sum()
    (grad,) = torch.autograd.grad(logit, emb)
    assert torch.allclose(exp.relevance, (emb * grad).sum(-1), atol=1e-5)


def test_render(model, ids):
    exp = mambalrp.explain(model, ids[:1])
    tokens = [f"t{i}" for i in range(9)]
    text = exp.render(tokens=tokens, color=False)
    assert text.splitlines()[0].startswith(f"target {int(exp.target[0])} | position 8")
    assert "t8[+1.00]" in text or "t8[-1.00]" in text or "[+1.00]" in text or "[-1.00]" in text
    assert all(t in text for t in tokens)
    colored = exp.render(tokens=tokens)
    assert "\033[48;2;" in colored
    with pytest.raises(ValueError, match="tokens"):
        exp.render(tokens=tokens[:3])
    assert "rules='mambalrp'" in repr(exp)


def test_numpy_and_unsigned_integers_are_accepted(model, ids):
    np = pytest.importorskip("numpy")
    reference = mambalrp.explain(model, ids, 7, position=-2)
    by_numpy = mambalrp.explain(model, ids, np.int64(7), position=np.int32(-2))
    assert torch.equal(by_numpy.relevance, reference.relevance)
    for dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int32):
        same = mambalrp.explain(model, ids.to(dtype), 7, position=-2)
        assert torch.equal(same.relevance, reference.relevance), dtype
        assert same.input_ids.dtype == torch.long


def test_the_explanation_does_not_alias_the_callers_tensors(model, ids):
    ids = ids.clone()  # the fixture is shared: change a copy
    mask = torch.ones_like(ids)
    exp = mambalrp.explain(model, ids, attention_mask=mask)
    ids_before, mask_before = ids.clone(), mask.clone()
    ids.zero_()
    mask[:, 0] = 0
    assert torch.equal(exp.input_ids, ids_before) and torch.equal(exp.attention_mask, mask_before)


def test_a_dict_output_is_read_like_a_model_output(model, ids):
    class DictOut(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, **kwargs):
            return {"logits": self.inner(input_ids, **kwargs).logits}

    wrapped = mambalrp.explain(DictOut(model), ids)
    assert torch.equal(wrapped.relevance, mambalrp.explain(model, ids).relevance)


def test_rule_set_names_follow_the_linear_rule():
    assert mambalrp.MAMBALRP.with_linear(mambalrp.Gamma(0.25)).name == "mambalrp-gamma0.25"
    assert mambalrp.MAMBALRP.with_linear(mambalrp.Epsilon(1e-3)).name == "mambalrp-epsilon0.001"
    assert mambalrp.MAMBALRP.with_linear(mambalrp.LRP0()).name == "mambalrp"

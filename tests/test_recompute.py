"""explain(recompute=True): same relevance, layers recomputed, intermediates not kept, model restored."""

from __future__ import annotations

import hybrid_models
import pytest
import torch
from conftest import FAMILIES, assert_same_state, snapshot

import mambalrp
import mambalrp.testing
from mambalrp.context import plan
from mambalrp.errors import InputError
from mambalrp.recompute import layers_to_recompute, recompute_layers, spread
from mambalrp.rules import get_rules


def _ids(seed: int = 0, b: int = 2, t: int = 37) -> torch.Tensor:
    return torch.randint(0, 50, (b, t), generator=torch.Generator().manual_seed(seed))


def test_recompute_gives_bitwise_equal_relevance(family):
    model = FAMILIES[family](0)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    plain = mambalrp.explain(model, ids, attention_mask=mask, return_hidden=True)
    again = mambalrp.explain(model, ids, attention_mask=mask, return_hidden=True, recompute=True)
    assert torch.equal(plain.relevance, again.relevance)
    assert torch.equal(plain.hidden_relevance, again.hidden_relevance)
    assert torch.equal(plain.logit, again.logit)


@pytest.mark.parametrize("name", ["jamba", "zamba2"])
def test_recompute_on_hybrids(name):
    model = hybrid_models.make(name)
    ids = torch.randint(0, 64, (1, 19), generator=torch.Generator().manual_seed(1))
    if hybrid_models.own_forward_is_wrong(name):
        with pytest.raises(mambalrp.VerificationError, match="different function"):
            mambalrp.explain(model, ids)
        return
    plain = mambalrp.explain(model, ids)
    again = mambalrp.explain(model, ids, recompute=True)
    torch.testing.assert_close(plain.relevance, again.relevance, rtol=0, atol=1e-6)


def test_layers_are_the_residual_blocks(family):
    model = FAMILIES[family](0)
    names = [n for n, _ in layers_to_recompute(model, plan(model, get_rules("mambalrp")))]
    assert names == [f"backbone.layers.{i}" for i in range(len(model.backbone.layers))]


def test_each_mixer_runs_twice_and_its_intermediates_are_not_kept(family):
    """The backward recomputes every layer; the forward keeps far fewer bytes for the backward."""
    model = FAMILIES[family](0)
    ids = _ids(t=64)
    calls = {"n": 0}

    def count(module, args):
        calls["n"] += 1

    # A pre-hook: the recomputation stops as soon as the last kept tensor is rebuilt, before a
    # forward hook of the mixer would run.
    handles = [layer.mixer.register_forward_pre_hook(count) for layer in model.backbone.layers]

    def saved_bytes(recompute: bool) -> int:
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mambalrp.explain(model, ids, recompute=recompute)
        return total[0]

    try:
        assert mambalrp.verify(model, ids).ok  # verified once, up front: later calls reuse the verdict
        calls["n"] = 0
        plain = saved_bytes(False)
        assert calls["n"] == len(model.backbone.layers)
        calls["n"] = 0
        kept = saved_bytes(True)
        assert calls["n"] == 2 * len(model.backbone.layers)
    finally:
        for h in handles:
            h.remove()
    # What stays is outside the recomputed blocks (final norm, head); the layers' own
    # intermediates are held by the checkpoint and rebuilt in the backward.
    assert kept < 0.2 * plain, (kept, plain)


def test_model_restored_after_recompute_and_after_an_error(family):
    model = FAMILIES[family](0)
    before = snapshot(model)
    mambalrp.explain(model, _ids(), recompute=True)
    assert_same_state(model, before)

    def boom(logits):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        mambalrp.explain(model, _ids(), target=boom, recompute=True)
    assert_same_state(model, before)


def test_recompute_layers_restores_existing_instance_forward():
    model = FAMILIES["mamba"](0)
    block = model.backbone.layers[0]
    own = block.forward
    block.forward = own  # an instance attribute the user set
    with recompute_layers(model, plan(model, get_rules("mambalrp"))) as names:
        assert "backbone.layers.0" in names
        assert block.__dict__["forward"] is not own
    assert block.__dict__["forward"] is own


@pytest.mark.parametrize("bad", ["yes", 0.0, 1.5, -1, None])
def test_recompute_must_be_a_bool_or_a_share(bad):
    model = FAMILIES["mamba"](0)
    with pytest.raises(InputError, match="recompute must be True, False or a share"):
        mambalrp.explain(model, _ids(), recompute=bad)


def test_spread_picks_evenly_spaced_items():
    assert spread(list(range(8)), 0.5) == [1, 3, 5, 7]
    assert spread(list(range(8)), 1.0) == list(range(8))
    assert spread(list(range(8)), 0.01) == [7]
    assert len(spread(list(range(24)), 0.25)) == 6
    with pytest.raises(ValueError):
        spread([1, 2], 0.0)


def test_a_share_of_the_layers_is_recomputed():
    model = mambalrp.testing.tiny_mamba(0, num_hidden_layers=4)
    ids = _ids(t=40)
    calls = {name: 0 for name in range(4)}
    handles = [
        layer.mixer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(model.backbone.layers)
    ]
    try:
        plain = mambalrp.explain(model, ids)
        for i in calls:
            calls[i] = 0
        half = mambalrp.explain(model, ids, recompute=0.5)
    finally:
        for h in handles:
            h.remove()
    assert calls == {0: 1, 1: 2, 2: 1, 3: 2}
    assert torch.equal(plain.relevance, half.relevance)

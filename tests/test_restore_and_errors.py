"""The model is left exactly as it was, after success and after every kind of failure."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, assert_same_state, snapshot
from torch import nn

import mambalrp
from mambalrp.testing import tiny_mamba


def _prepare(model: nn.Module) -> nn.Module:
    """A model in a non-default state: training mode, a hook, one frozen parameter, a grad."""
    model.train()
    model.backbone.layers[0].eval()
    model.lm_head.register_forward_hook(lambda m, a, o: None)
    next(model.parameters()).requires_grad_(False)
    params = list(model.parameters())
    params[-1].grad = torch.ones_like(params[-1])
    return model


def _outputs(model, ids):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    with torch.no_grad():
        out = model(ids, use_cache=False).logits.clone()
    for m, mode in modes:
        m.training = mode
    return out


def test_model_restored_after_explain(family):
    model = _prepare(FAMILIES[family](0))
    ids = torch.randint(0, 64, (2, 8))
    before, out_before = snapshot(model), _outputs(model, ids)
    assert model.training
    mambalrp.explain(model, ids)
    assert_same_state(model, before)
    assert torch.equal(_outputs(model, ids), out_before)


BAD_CALLS = {
    "ids out of vocabulary": (lambda ids: {"input_ids": ids + 1000}, "outside the model's vocabulary"),
    "negative id": (lambda ids: {"input_ids": ids - 1000}, "outside the model's vocabulary"),
    "empty": (lambda ids: {"input_ids": ids[:, :0]}, "empty"),
    "float ids": (lambda ids: {"input_ids": ids.float()}, "integer token ids"),
    "rank 3": (lambda ids: {"input_ids": ids[None]}, r"\(batch, seq\)"),
    "not a tensor": (lambda ids: {"input_ids": ids.tolist()}, "torch.Tensor"),
    "position out of range": (lambda ids: {"position": 8}, "out of range"),
    "position too negative": (lambda ids: {"position": -9}, "out of range"),
    "target out of range": (lambda ids: {"target": 64}, "out of range"),
    "bad target type": (lambda ids: {"target": "cat"}, "target must be"),
    "mask shape": (lambda ids: {"attention_mask": torch.ones(2, 7)}, "does not match"),
    "mask values": (lambda ids: {"attention_mask": torch.full((2, 8), 2)}, "only 0"),
    "mask all padding": (lambda ids: {"attention_mask": torch.zeros(2, 8)}, "every token"),
    "position on padding": (
        lambda ids: {"attention_mask": torch.tensor([[0] * 4 + [1] * 4] * 2), "position": 1},
        "padding token",
    ),
    "callable returns wrong shape": (lambda ids: {"target": lambda lg: lg}, "callable target"),
    "unknown rules": (lambda ids: {"rules": "magic"}, "unknown rules"),
    "bool position tensor": (lambda ids: {"position": torch.tensor([True, False])}, "position tensor must hold"),
    "complex position tensor": (lambda ids: {"position": torch.tensor([1 + 0j, 2 + 0j])}, "position tensor must hold"),
    "bool target tensor": (lambda ids: {"target": torch.tensor([True, True])}, "target tensor must hold"),
    "complex target tensor": (lambda ids: {"target": torch.tensor([1 + 0j])}, "target tensor must hold"),
    "position beyond int64": (lambda ids: {"position": 2**70}, "out of range"),
    "target beyond int64": (lambda ids: {"target": 2**70}, "out of range"),
    "meta ids": (lambda ids: {"input_ids": ids.to("meta")}, "meta"),
    "uint64 id beyond int64": (lambda ids: {"input_ids": torch.full((2, 8), 2**63 + 5, dtype=torch.uint64)}, "2\\*\\*63"),
    "target a type": (lambda ids: {"target": int}, "the type int"),
    "callable target ignoring the logits": (lambda ids: {"target": lambda lg: torch.zeros(lg.shape[0])}, "do not depend"),
    "complex mask": (lambda ids: {"attention_mask": torch.ones(2, 8, dtype=torch.complex64)}, "real tensor"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_raises_clear_error_and_leaves_model_untouched(case):
    model = _prepare(tiny_mamba(0))
    ids = torch.randint(0, 64, (2, 8))
    before, out_before = snapshot(model), _outputs(model, ids)
    make, message = BAD_CALLS[case]
    kwargs = {"input_ids": ids, **make(ids)}
    with pytest.raises((mambalrp.MambaLRPError, ValueError)) as info:
        mambalrp.explain(model, **kwargs)
    assert info.match(message)
    assert_same_state(model, before)
    assert torch.equal(_outputs(model, ids), out_before)


def test_exception_inside_forward_restores_model():
    model = _prepare(tiny_mamba(0))
    ids = torch.randint(0, 64, (2, 8))
    before = snapshot(model)

    def boom(logits):
        assert "forward" in model.backbone.layers[0].mixer.__dict__  # patched while running
        assert not model.training
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        mambalrp.explain(model, ids, target=boom)
    assert_same_state(model, before)


def test_lrp_context_restores_on_error_and_keeps_existing_instance_forward():
    model = tiny_mamba(0)
    norm = model.backbone.norm_f
    custom = norm.forward
    norm.forward = custom  # an instance attribute the user set themselves
    before = snapshot(model)
    with pytest.raises(KeyError):
        with mambalrp.lrp(model):
            assert norm.forward is not custom
            raise KeyError("inside")
    assert norm.__dict__["forward"] is custom
    assert_same_state(model, before)


class NotMamba(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 10)

    def forward(self, ids):
        return self.proj(self.embed(ids))


class UnknownSSM(nn.Module):
    """An SSM-like layer (it has A_log) that no adapter knows."""

    def __init__(self):
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(4, 2))
        self.mix = nn.Linear(4, 4)

    def forward(self, x):
        return self.mix(x)


def test_unsupported_model_error_lists_families_and_howto():
    model = NotMamba()
    before = snapshot(model)
    with pytest.raises(mambalrp.UnsupportedModelError) as info:
        mambalrp.explain(model, torch.tensor([[1, 2, 3]]))
    text = str(info.value)
    assert "NotMamba" in text and "Mamba-2" in text and "docs/adapters.md" in text
    assert "register_adapter" in text
    assert_same_state(model, before)


def test_unmatched_ssm_layer_is_named():
    model = tiny_mamba(0)
    model.backbone.layers[1].extra = UnknownSSM()
    with pytest.raises(mambalrp.UnsupportedModelError, match=r"backbone\.layers\.1\.extra.*UnknownSSM"):
        with mambalrp.lrp(model):
            pass
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_recurrent_cache_is_refused():
    model = tiny_mamba(0)
    with mambalrp.lrp(model), pytest.raises(mambalrp.MambaLRPError, match="use_cache=False"):
        model(torch.tensor([[1, 2, 3]]), use_cache=True)


def test_adapter_registry_precedence():
    from mambalrp.adapters import HFMambaMixerAdapter, find_adapter

    mixer = tiny_mamba(0).backbone.layers[0].mixer

    class Mine(HFMambaMixerAdapter):
        name = "mine"

    mine = mambalrp.register_adapter(Mine())
    try:
        assert find_adapter(mixer) is mine
    finally:
        assert mambalrp.unregister_adapter("mine")
    assert type(find_adapter(mixer)) is HFMambaMixerAdapter
    with pytest.raises(TypeError):
        mambalrp.register_adapter(object())


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_generate_inside_lrp_is_refused_whatever_the_cache_keyword(family):
    """transformers 5.24 passes the cache as ``cache=``, older releases as ``cache_params=``: the
    refusal recognises the cache object itself, so generation under lrp() never runs silently."""
    model = FAMILIES[family](0)
    before = snapshot(model)
    with mambalrp.lrp(model), pytest.raises(mambalrp.MambaLRPError, match="recurrent cache"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert_same_state(model, before)


@pytest.mark.parametrize("keyword", ["cache", "cache_params", "state", None])
def test_cache_refused_under_any_keyword_or_position(keyword):
    model = tiny_mamba(0)
    mixer = model.backbone.layers[0].mixer
    hidden = torch.randn(1, 3, 16)
    with torch.no_grad():  # the cache the model itself builds, whatever its class in this release
        out = model(torch.tensor([[1, 2, 3]]), use_cache=True)
    cache = getattr(out, "cache", None) or out.cache_params
    with mambalrp.lrp(model), pytest.raises(mambalrp.MambaLRPError, match=type(cache).__name__):
        if keyword is None:
            mixer(hidden, cache)
        else:
            mixer(hidden, **{keyword: cache})


def test_input_layer_must_be_a_proper_submodule():
    model = tiny_mamba(0)
    with pytest.raises(mambalrp.InputError, match="not the model itself"):
        mambalrp.explain(model, torch.randint(0, 64, (1, 4)), input_layer=model)


def test_a_non_module_is_a_type_error_before_the_inputs_are_looked_at():
    with pytest.raises(TypeError, match="torch.nn.Module, got str"):
        mambalrp.explain("not a model", "not ids")


def test_a_model_on_the_meta_device_is_refused():
    from transformers import MambaConfig, MambaForCausalLM

    with torch.device("meta"):
        model = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1))
    with pytest.raises(mambalrp.UnsupportedModelError, match="meta device"):
        mambalrp.explain(model, torch.tensor([[1, 2, 3]]))

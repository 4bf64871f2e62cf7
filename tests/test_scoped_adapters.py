"""Adapters registered for one model instance (``register_adapter(adapter, model=model)``).

* They explain that model (forward equal, conservation with zero biases, restored bitwise) and
  never leak to another model, even of the same class.
* They are tried before the process-wide registry, apply to the model's submodules, and are
  forgotten with the model.
* Verification still applies to them; registering or removing one invalidates the cached plan.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_state, snapshot
from torch import nn

import mambalrp
from mambalrp.adapters import HFMambaMixerAdapter, registered_adapters
from mambalrp.adapters.registry import _SCOPED
from mambalrp.testing import tiny_mamba


class ShortConvMixer(nn.Module):
    """in_proj -> (u, z); u -> "same"-padded depthwise conv -> LayerNorm -> y * silu(z) -> out_proj."""

    def __init__(self, d: int = 8, kernel: int = 3):
        super().__init__()
        self.in_proj = nn.Linear(d, 2 * d, bias=False)
        self.conv = nn.Conv1d(d, d, kernel, groups=d, padding="same", bias=False)
        self.norm = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = self.norm(self.conv(u.transpose(1, 2)).transpose(1, 2))
        return self.out_proj(u * F.silu(z))


class ConvLM(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 8, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mixers = nn.ModuleList(ShortConvMixer(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for mixer in self.mixers:
            h = h + mixer(h)
        return self.head(h)


class ShortConvAdapter(mambalrp.Adapter):
    name = "short-conv"
    family = "ShortConvMixer (tests)"
    role = "mixer"
    uses = ("in_proj.*", "conv.weight", "norm.*", "out_proj.*")

    def matches(self, module):
        return isinstance(module, ShortConvMixer)

    def forward(self, module, ctx, x):
        R = ctx.rules
        u, z = module.in_proj(x).chunk(2, dim=-1)
        u = R.conv1d(u.transpose(1, 2), module.conv.weight, module.conv.bias, padding="same").transpose(1, 2)
        u = R.layer_norm(u, module.norm.weight, module.norm.bias, module.norm.eps)
        return module.out_proj(R.mul(u, R.act(z)))


def _model(seed: int) -> ConvLM:
    torch.manual_seed(seed)
    model = ConvLM().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.zero_()
    return model


IDS = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(0))


def test_a_scoped_adapter_explains_its_model_and_no_other():
    mine, other = _model(0), _model(1)
    mambalrp.register_adapter(ShortConvAdapter(), model=mine)
    assert registered_adapters(mine)[0].name == "short-conv"
    assert all(a.name != "short-conv" for a in registered_adapters())
    assert all(a.name != "short-conv" for a in registered_adapters(other))

    before = snapshot(mine)
    with torch.no_grad():
        reference = mine(IDS)
        with mambalrp.lrp(mine):
            patched = mine(IDS)
    assert (patched - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()
    exp = mambalrp.explain(mine, IDS)
    assert_same_state(mine, before)
    assert exp.verified
    assert (exp.conservation_delta.abs() / exp.logit.abs()).max().item() <= 1e-4
    gi = mambalrp.explain(mine, IDS, rules="gradient")
    assert (gi.conservation_delta.abs() / gi.logit.abs()).max().item() > 1e-2

    other_before = snapshot(other)
    with pytest.raises(mambalrp.UnsupportedModelError, match="contains no Mamba layer"):
        mambalrp.explain(other, IDS)
    with pytest.raises(mambalrp.UnsupportedModelError):
        with mambalrp.lrp(other):
            pass
    assert_same_state(other, other_before)


def test_verification_applies_to_scoped_adapters():
    class Forgetful(ShortConvAdapter):
        def forward(self, module, ctx, x):  # drops the norm: another function
            R = ctx.rules
            u, z = module.in_proj(x).chunk(2, dim=-1)
            u = R.conv1d(u.transpose(1, 2), module.conv.weight, None, padding="same").transpose(1, 2)
            return module.out_proj(R.mul(u, R.act(z)))

    model = _model(0)
    mambalrp.register_adapter(Forgetful(), model=model)
    with pytest.raises(mambalrp.VerificationError, match=r"different function.*'mixers\.0' \(ShortConvMixer\) under adapter 'short-conv'"):
        mambalrp.explain(model, IDS)
    # Replacing it (same name, same scope) and the cached verdict is not reused.
    mambalrp.register_adapter(ShortConvAdapter(), model=model)
    assert mambalrp.explain(model, IDS).verified
    assert mambalrp.unregister_adapter("short-conv", model=model)
    assert not mambalrp.unregister_adapter("short-conv", model=model)
    with pytest.raises(mambalrp.UnsupportedModelError):
        mambalrp.explain(model, IDS)


def test_scoped_adapters_come_before_the_registry_and_cover_submodules():
    calls = []

    class Counting(HFMambaMixerAdapter):
        name = "counting-mamba-mixer"

        def forward(self, module, ctx, *args, **kwargs):
            calls.append(module)
            return super().forward(module, ctx, *args, **kwargs)

    mine, other = tiny_mamba(0), tiny_mamba(0)
    mambalrp.register_adapter(Counting(), model=mine.backbone.layers[1])  # one block only
    plan = {name: adapter.name for name, _, adapter in mambalrp.context.plan(mine, mambalrp.MAMBALRP)}
    assert plan["backbone.layers.1.mixer"] == "counting-mamba-mixer"
    assert plan["backbone.layers.0.mixer"] == "hf-mamba-mixer"
    exp = mambalrp.explain(mine, IDS)
    assert calls and all(m is mine.backbone.layers[1].mixer for m in calls)
    calls.clear()
    torch.testing.assert_close(mambalrp.explain(other, IDS).relevance, exp.relevance)
    assert not calls


def test_scoped_adapters_are_forgotten_with_the_model():
    model = _model(0)
    adapter = weakref.ref(mambalrp.register_adapter(ShortConvAdapter(), model=model))
    assert model in _SCOPED and adapter() is not None
    del model
    gc.collect()
    assert adapter() is None  # the registry held it only through the model


def test_register_adapter_checks_its_arguments():
    with pytest.raises(TypeError, match="Adapter instance"):
        mambalrp.register_adapter(object(), model=_model(0))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        mambalrp.register_adapter(ShortConvAdapter(), model="not a model")

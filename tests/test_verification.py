"""Every explanation is verified against the model it explains, or refused with a clear error.

* A look-alike (a bidirectional mixer sharing one set of weights, a "same"-padded conv,
  LayerNorm) is refused, not explained.
* A model whose computation the adapters do not reproduce (a user's hook on a submodule the
  adapter bypasses) or through which relevance leaks (an unruled non-linearity) raises
  VerificationError naming the module and the measured difference.
* The verdict is cached per model state: later calls run no probe, and changes to parameters,
  dtype, structure, hooks, attributes or the adapter registry invalidate it.
* Concurrent calls on one model are serialised, correct, and leave the model bitwise restored.
* Inference mode: left for the call; a model created under it is refused before anything is
  touched. Restoring continues past a failing step and the original error wins.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_state, snapshot
from torch import nn

import mambalrp
from mambalrp.testing import tiny_mamba, tiny_mamba2
from tests_support import SquashedHead, loop_selective_scan

IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------------------------------------
# A bidirectional look-alike under mamba_ssm's attribute names


class BiMambaShared(nn.Module):
    """Both scan directions with ONE set of weights; conv padded "same" (non-causal) or causally."""

    def __init__(self, d_model=16, d_state=4, d_conv=4, same_padding=True, announce=False):
        super().__init__()
        self.d_inner, self.d_state, self.dt_rank, self.activation = 2 * d_model, d_state, 2, "silu"
        if announce:
            self.bidirectional = True
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        pad = (d_conv - 1) // 2 if same_padding else d_conv - 1
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=pad, bias=False)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner)
        self.A_log = nn.Parameter(torch.rand(self.d_inner, d_state) * 2 - 1)
        self.D = nn.Parameter(torch.randn(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def _direction(self, x):  # (b, d, T)
        T = x.shape[-1]
        x = F.silu(self.conv1d(x)[..., :T])
        dt, B, C = torch.split(self.x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt)).transpose(1, 2)
        return loop_selective_scan(x, dt, -torch.exp(self.A_log), B.transpose(1, 2), C.transpose(1, 2), self.D)

    def forward(self, hidden_states, inference_params=None):
        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
        y = self._direction(x) + self._direction(x.flip(-1)).flip(-1)
        return self.out_proj((y * F.silu(z)).transpose(1, 2))


class LookalikeLM(nn.Module):
    def __init__(self, mixer: nn.Module, d_model=16, vocab=64, layers=2):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(layers))
        self.mixers = nn.ModuleList([mixer] + [type(mixer)(**mixer.init) for _ in range(layers - 1)])
        self.norm_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, input_ids):
        h = self.embedding(input_ids)
        for norm, mixer in zip(self.norms, self.mixers):
            h = h + mixer(norm(h))
        return self.head(self.norm_f(h))


def _lookalike(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    mixer = BiMambaShared(**kwargs)
    mixer.init = kwargs
    return LookalikeLM(mixer).eval()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"same_padding": True}, mambalrp.UnsupportedModelError, r"'mixers\.0'.*conv1d is not causal \(padding \(1,\)"),
        ({"same_padding": False, "announce": True}, mambalrp.UnsupportedModelError, "bidirectional=True"),
        ({"same_padding": False}, mambalrp.UnsupportedModelError, r"BiMambaShared\._direction|forward flips|flips tensors"),
    ],
    ids=["same-padded conv", "announced bidirectional", "unannounced shared-weight bidirectional"],
)
def test_bidirectional_lookalike_is_refused_not_explained(kwargs, error, message):
    model = _lookalike(**kwargs)
    before = snapshot(model)
    with pytest.raises(error, match=message) as info:
        mambalrp.explain(model, IDS)
    assert "mamba-ssm-mamba1" in str(info.value) and "register_adapter" in str(info.value)
    assert_same_state(model, before)


def test_lookalike_that_passes_structural_checks_fails_verification(monkeypatch):
    """Without the structural refusal (here: switched off), the forward comparison still
    catches the look-alike and names the module and the difference."""
    from mambalrp.adapters import base

    monkeypatch.setattr(base, "_flipping_methods", lambda cls: [])
    model = _lookalike(same_padding=False)
    before = snapshot(model)
    with pytest.raises(mambalrp.VerificationError) as info:
        mambalrp.explain(model, IDS)
    text = str(info.value)
    assert "different function" in text and "'mixers.0' (BiMambaShared) under adapter 'mamba-ssm-mamba1'" in text
    v = info.value.verification
    assert not v.forward_ok and v.forward_difference > 10 * v.tolerance * v.forward_scale
    assert {m.module for m in v.mismatches} == {"mixers.0", "mixers.1"}
    assert_same_state(model, before)
    # check_rules reports the same mismatch instead of raising.
    report = mambalrp.check_rules(model, IDS)
    assert not report.forward_ok and not report.ok and "DIFFERENT FUNCTION" in str(report)


# ---------------------------------------------------------------------------------------------
# Mismatches and leaks on real models


def test_a_hook_the_adapter_bypasses_is_a_verified_mismatch():
    """A steering hook on the gated norm inside a Mamba-2 mixer: the model calls the norm module,
    the adapter computes from its weight and would ignore the hook, so explain refuses and names
    the mixer."""
    model = tiny_mamba2(0)
    model.backbone.layers[1].mixer.norm.register_forward_hook(lambda m, a, out: 3 * out)
    with pytest.raises(mambalrp.VerificationError, match=r"'backbone\.layers\.1\.mixer' \(Mamba2Mixer\) under adapter 'hf-mamba2-mixer'"):
        mambalrp.explain(model, IDS)
    exp = mambalrp.explain(model, IDS, verify=False)  # the explicit opt-out
    assert not exp.verified


def test_a_leak_through_an_unruled_module_is_refused_and_named():
    model = SquashedHead(zero_biases=False).eval()
    before = snapshot(model)
    with pytest.raises(mambalrp.VerificationError) as info:
        mambalrp.explain(model, IDS)
    text = str(info.value)
    assert "relevance leaks" in text and "TanhBackward0 x1 in 'squash'" in text
    assert info.value.verification.forward_ok  # the same function, but not conserving
    assert_same_state(model, before)
    # Gradient x Input does not claim conservation: only the forward is verified.
    assert mambalrp.explain(model, IDS, rules="gradient").verified


class _DtMixer(nn.Module):
    """Not a Mamba layer by name, but it has SSM parameters."""

    def __init__(self):
        super().__init__()
        self.dt_bias = nn.Parameter(torch.zeros(4))
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(x)


class _ScanCaller(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return selective_scan_fn(self.proj(x))  # noqa: F821 - never called: refused before


@pytest.mark.parametrize("extra, evidence", [(_DtMixer, "SSM parameters dt_bias"), (_ScanCaller, "calls selective_scan_fn")])
def test_an_unmatched_sequence_mixer_is_refused(extra, evidence):
    model = tiny_mamba(0)
    model.backbone.layers[0].extra = extra()
    with pytest.raises(mambalrp.UnsupportedModelError, match=rf"backbone\.layers\.0\.extra.*{evidence}"):
        mambalrp.explain(model, IDS)


# ---------------------------------------------------------------------------------------------
# The cached verdict


def _counting(model):
    calls = {"n": 0}

    def count(module, args):
        calls["n"] += 1

    model.backbone.layers[0].mixer.register_forward_pre_hook(count)
    return calls


def test_verified_once_then_cached_and_invalidated_by_changes():
    model = tiny_mamba(0)
    calls = _counting(model)
    first = mambalrp.explain(model, IDS)
    assert first.verified and calls["n"] > 1  # probe forwards ran
    calls["n"] = 0
    again = mambalrp.explain(model, IDS)
    assert calls["n"] == 1 and torch.equal(again.relevance, first.relevance)  # no probe: one forward

    def probes_after(change) -> int:
        change()
        calls["n"] = 0
        mambalrp.explain(model, IDS)
        return calls["n"]

    with torch.no_grad():
        assert probes_after(lambda: model.backbone.layers[1].mixer.D.mul_(1.0)) > 1  # in-place write
    assert probes_after(lambda: None) == 1
    assert probes_after(lambda: model.backbone.layers[1].mixer.register_forward_hook(lambda *a: None)) > 1
    mixer = model.backbone.layers[1].mixer
    assert probes_after(lambda: setattr(mixer, "use_conv_bias", not mixer.use_conv_bias)) > 1  # a plain attribute
    assert probes_after(lambda: mambalrp.forget(model)) > 1

    class Copy(type(mambalrp.adapters.find_adapter(model.backbone.layers[0].mixer))):
        name = "copy-of-hf-mamba-mixer"

    mambalrp.register_adapter(Copy())
    try:
        assert probes_after(lambda: None) > 1  # another adapter now claims the mixers
    finally:
        mambalrp.unregister_adapter("copy-of-hf-mamba-mixer")
    assert probes_after(lambda: model.double()) > 1
    calls["n"] = 0
    assert not mambalrp.explain(model, IDS, verify=False).verified and calls["n"] == 1


def test_data_writes_that_bypass_version_counters_are_seen_by_the_sampled_values():
    model = tiny_mamba(0)
    calls = _counting(model)
    mambalrp.explain(model, IDS)
    model.backbone.layers[0].mixer.in_proj.weight.data.mul_(2.0)
    calls["n"] = 0
    mambalrp.explain(model, IDS)
    assert calls["n"] > 1


def test_verify_reports_without_raising():
    good = mambalrp.verify(tiny_mamba2(0))
    assert good.ok and good.forward_difference <= 1e-5 * good.forward_scale and good.leak <= 1e-5
    assert "OK" in str(good) and good.zeroed  # conv and dt biases were found additive
    bad = mambalrp.verify(SquashedHead(zero_biases=False).eval())
    assert not bad.ok and bad.forward_ok and bad.leak > 1e-2 and "FAILED" in str(bad)


# ---------------------------------------------------------------------------------------------
# Threads, inference mode, robust restore


def _prepared(model):
    model.train()
    model.backbone.layers[0].eval()
    next(model.parameters()).requires_grad_(False)
    return model


def test_two_threads_on_one_model_are_correct_and_restore_it_bitwise():
    model = _prepared(tiny_mamba(0))
    inputs = [IDS, torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(9))]
    expected = [mambalrp.explain(model, ids).relevance for ids in inputs]
    before = snapshot(model)
    wrong, errors = [], []

    def worker(k: int) -> None:
        try:
            for round_ in range(20):
                which = (k + round_) % 2
                if not torch.equal(mambalrp.explain(model, inputs[which]).relevance, expected[which]):
                    wrong.append((k, round_))
        except Exception as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong
    assert_same_state(model, before)


def test_explain_inside_inference_mode():
    model = tiny_mamba(0)
    expected = mambalrp.explain(model, IDS)
    with torch.inference_mode():
        ids = IDS.clone()  # an inference tensor
        exp = mambalrp.explain(model, ids)
    assert torch.equal(exp.relevance, expected.relevance) and exp.verified
    assert not exp.relevance.is_inference()


def test_a_model_created_in_inference_mode_is_refused_untouched():
    with torch.inference_mode():
        model = tiny_mamba(0).train()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(mambalrp.UnsupportedModelError, match="inference_mode"):
        mambalrp.explain(model, IDS)
    assert [p.requires_grad for p in model.parameters()] == flags and model.training


class _Stubborn(nn.Module):
    """Keeps a flag of its own in train() (restored through it), and can refuse to train."""

    def __init__(self):
        super().__init__()
        self.dropout_on = True
        self.refuse = False

    def train(self, mode: bool = True):
        if mode and self.refuse:
            raise RuntimeError("stubborn refuses to train")
        self.dropout_on = mode
        return super().train(mode)

    def forward(self, x):
        return x


def _with_stubborn():
    model = tiny_mamba(0)
    model.backbone.layers[1].stubborn = _Stubborn()
    model.train()
    return model


def test_train_overrides_are_restored_through_train():
    model = _with_stubborn()
    mambalrp.explain(model, IDS)
    assert model.backbone.layers[1].stubborn.dropout_on and model.training


def test_restore_continues_past_a_failing_step_and_the_original_error_wins():
    model = _with_stubborn()
    stubborn = model.backbone.layers[1].stubborn
    stubborn.refuse = True
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules() if m is not stubborn}

    with pytest.raises(RuntimeError, match="stubborn refuses"):  # no other error: the restore's own
        mambalrp.explain(model, IDS)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules() if m is not stubborn} == modes

    def boom(logits):
        raise ValueError("the call's own error")

    with pytest.raises(ValueError, match="the call's own error"):
        mambalrp.explain(model, IDS, target=boom)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all("forward" not in m.__dict__ for m in model.modules())

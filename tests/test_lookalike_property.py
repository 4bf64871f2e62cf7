"""Look-alike models are explained faithfully or refused, never explained silently wrong.

The models (``tests/lookalikes.py``) are built from components that carry the attribute names
mambalrp's adapters match but may compute something else: a "same"-padded or anti-causal conv,
a second scan direction with the same weights (announced by a flag or not), a GELU gate or
activation, an output multiplier, a Mamba-2 norm grouped otherwise than it declares, a hidden
step-size clamp, a LayerNorm; and a Gemma-style ``(1 + weight)`` RMSNorm, which the zero-centred
norm adapter computes. The property: for each
model, :func:`mambalrp.explain` either raises :class:`mambalrp.MambaLRPError` or returns a verified
explanation whose patched forward equals the model's and whose relevance sums to the logit;
in both cases the model is left bitwise as it was. On top, models that compute something the
adapters do not compute must be refused, and standard models must be explained.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state, snapshot
from hypothesis import HealthCheck, event, example, given, note, settings
from lookalikes import (
    MixerSpec,
    ModelSpec,
    build,
    expected_verdict,
    lookalike_models,
    one_layer,
    standard,
)

import mambalrp

FORWARD_TOL = 1e-4
CONSERVATION_TOL = 1e-4


def explain_or_refuse(model, ids, description: str) -> tuple[str, BaseException | None]:
    """Run explain; check the property; return ``("explained" | "refused", error)``."""
    before = snapshot(model)
    try:
        exp = mambalrp.explain(model, ids)
    except mambalrp.MambaLRPError as err:
        assert_same_state(model, before)
        return "refused", err
    assert_same_state(model, before)

    assert exp.verified is True, description
    assert exp.relevance.shape == ids.shape, description

    # The patched forward is the model's own forward on the explained ids.
    with torch.no_grad():
        reference = model(ids)
        with mambalrp.lrp(model):
            patched = model(ids)
    assert_same_state(model, before)
    scale = reference.abs().max().item()
    difference = (patched - reference).abs().max().item()
    assert difference <= FORWARD_TOL * scale, (
        f"silent mismatch: explained, but the patched forward differs by {difference:.3g} "
        f"(output scale {scale:.3g}): {description}"
    )

    # All biases are zero: the relevance sums to the explained logit.
    gap = (exp.logit - exp.relevance.sum(-1)).abs()
    bound = CONSERVATION_TOL * torch.maximum(exp.logit.abs(), exp.relevance.abs().sum(-1))
    assert bool((gap <= bound).all()), (
        f"silent leak: explained, but |logit - sum R| = {gap.tolist()} > {bound.tolist()}: {description}"
    )
    return "explained", None


def check_verdict(model, ids, description: str) -> tuple[str, BaseException | None]:
    outcome, err = explain_or_refuse(model, ids, description)
    verdict = expected_verdict(model.spec)
    if verdict == "lookalike":
        assert outcome == "refused", f"a look-alike was explained (faithfully, but it must be refused): {description}"
    elif verdict == "standard":
        assert outcome == "explained", f"a standard model was refused: {description}\n{err}"
    return outcome, err


# ---------------------------------------------------------------------------------------------
# The property


def _case(mixer: MixerSpec, **model) -> tuple:
    return build(one_layer(mixer, **model))


@pytest.mark.slow
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=lookalike_models())
@example(case=_case(standard("ssm1", padding="same")))
@example(case=_case(standard("hf1", direction="bi")))  # the same weights scan both ways, no flag
@example(case=_case(standard("ssm1", direction="bi_index")))  # the same, no .flip in the code
@example(case=_case(standard("ssm1", act_used="gelu")))
@example(case=_case(standard("ssm1"), norm="gemma"))
@example(case=_case(standard("hf2", extra="out_scale")))
@example(case=_case(standard("hf2", norm_group_declared="whole")))
@example(case=_case(standard("ssm1"), norm="my_rms", final="my_rms", batch=2))
def test_explained_faithfully_or_refused(case):
    _faithful_or_refused(case)


@settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=lookalike_models())
@example(case=_case(standard("hf1", direction="bi")))
def test_explained_faithfully_or_refused_smoke(case):
    _faithful_or_refused(case)


def _faithful_or_refused(case):
    model, ids, description = case
    note(description)
    outcome, err = check_verdict(model, ids, description)
    event(f"{expected_verdict(model.spec)} -> {outcome}" + (f" ({type(err).__name__})" if err is not None else ""))


# ---------------------------------------------------------------------------------------------
# Pinned look-alikes and standard models

# (id, spec, the error the brief's design names for it: adapters refuse what they recognise but
# cannot run; what they miss, verification refuses; MambaLRPError where either is fine).
REFUSED = [
    ("same-padded conv ssm1", one_layer(standard("ssm1", padding="same")), mambalrp.UnsupportedModelError),
    ("same-padded conv hf1 odd kernel", one_layer(standard("hf1", padding="same", kernel=3)), mambalrp.UnsupportedModelError),
    ("same-padded conv hf2", one_layer(standard("hf2", padding="same")), mambalrp.UnsupportedModelError),
    ("anti-causal conv with causal padding", one_layer(standard("ssm1", padding="cut_end")), mambalrp.MambaLRPError),
    ("shared-weight bidirectional ssm1, no flag", one_layer(standard("ssm1", direction="bi")), mambalrp.MambaLRPError),
    ("shared-weight bidirectional hf1, no flag", one_layer(standard("hf1", direction="bi")), mambalrp.MambaLRPError),
    ("shared-weight bidirectional hf2, no flag", one_layer(standard("hf2", direction="bi")), mambalrp.MambaLRPError),
    ("index-reversed bidirectional ssm1, no flag", one_layer(standard("ssm1", direction="bi_index")), mambalrp.MambaLRPError),
    ("index-reversed bidirectional hf2, no flag", one_layer(standard("hf2", direction="bi_index")), mambalrp.MambaLRPError),
    ("bidirectional=True", one_layer(standard("ssm1", direction="bi", flag="bidirectional")), mambalrp.UnsupportedModelError),
    ("bimamba_type='v1'", one_layer(standard("hf1", direction="bi", flag="bimamba_type")), mambalrp.UnsupportedModelError),
    ("gelu on x, activation='silu'", one_layer(standard("ssm1", act_used="gelu")), mambalrp.MambaLRPError),
    ("gelu on x, hf2", one_layer(standard("hf2", act_used="gelu")), mambalrp.MambaLRPError),
    ("activation='gelu'", one_layer(standard("hf1", act_attr="gelu", act_used="gelu")), mambalrp.UnsupportedModelError),
    ("gelu gate", one_layer(standard("hf1", gate="gelu")), mambalrp.MambaLRPError),
    ("no gate", one_layer(standard("ssm1", gate="none")), mambalrp.MambaLRPError),
    ("out_scale parameter", one_layer(standard("ssm1", extra="out_scale")), mambalrp.UnsupportedModelError),
    ("out_scale buffer", one_layer(standard("hf1", extra="out_scale_buffer")), mambalrp.UnsupportedModelError),
    ("out_scale parameter hf2", one_layer(standard("hf2", extra="out_scale")), mambalrp.UnsupportedModelError),
    ("float output multiplier", one_layer(standard("ssm1", extra="out_multiplier_float")), mambalrp.MambaLRPError),
    ("hf2 norm declares whole width, groups", one_layer(standard("hf2", norm_group_declared="whole")), mambalrp.MambaLRPError),
    ("hf2 norm declares groups, whole width", one_layer(standard("hf2", norm_group_used="whole")), mambalrp.MambaLRPError),
    ("hf2 norm without group_size, groups", one_layer(standard("hf2", norm_group_declared="absent")), mambalrp.MambaLRPError),
    ("hf2 norm before gate, undeclared", one_layer(standard("hf2", before_gate_used=True)), mambalrp.MambaLRPError),
    ("hf2 norm_before_gate=True, not done", one_layer(standard("hf2", before_gate_declared=True)), mambalrp.MambaLRPError),
    ("hf2 hidden dt clamp", one_layer(standard("hf2", dt_limit="hidden")), mambalrp.MambaLRPError),
    (
        "standard layer 0, look-alike layer 1",
        ModelSpec(layers=(("rms", standard("ssm1")), ("rms", standard("ssm1", direction="bi")))),
        mambalrp.MambaLRPError,
    ),
]


@pytest.mark.parametrize("spec, error", [(s, e) for _, s, e in REFUSED], ids=[i for i, _, _ in REFUSED])
def test_lookalike_refused(spec, error):
    model, ids, description = build(spec)
    assert expected_verdict(spec) == "lookalike"
    outcome, err = check_verdict(model, ids, description)
    assert outcome == "refused"
    assert isinstance(err, error), f"{type(err).__name__} where {error.__name__} was expected: {err}"


STANDARD = [
    ("ssm1", one_layer(standard("ssm1"))),
    ("hf1", one_layer(standard("hf1"))),
    ("hf2", one_layer(standard("hf2"))),
    ("hf2 one group", one_layer(standard("hf2", groups=1))),
    ("hf2 norm before gate, declared", one_layer(standard("hf2", before_gate_declared=True, before_gate_used=True))),
    ("hf2 declared dt limit", one_layer(standard("hf2", dt_limit="declared"))),
    ("hf2 norm without group_size, whole width", one_layer(standard("hf2", norm_group_declared="absent", norm_group_used="whole"))),
    ("kernel 3", one_layer(standard("hf1", kernel=3))),
    ("bidirectional=False", one_layer(standard("ssm1", flag="bidirectional"))),
    ("activation='swish'", one_layer(standard("hf1", act_attr="swish"))),
    ("MyRMSNorm", one_layer(standard("ssm1"), norm="my_rms", final="my_rms")),
    ("Gemma-style block norm", one_layer(standard("ssm1"), norm="gemma")),
    ("Gemma-style final norm", one_layer(standard("hf2"), final="gemma")),
    (
        "two layers, batch 2, T 9",
        ModelSpec(d_model=16, layers=(("rms", standard("hf1")), ("my_rms", standard("hf2"))), T=9, batch=2),
    ),
]


@pytest.mark.parametrize("spec", [s for _, s in STANDARD], ids=[i for i, _ in STANDARD])
def test_standard_explained(spec):
    model, ids, description = build(spec)
    assert expected_verdict(spec) == "standard"
    outcome, err = check_verdict(model, ids, description)
    assert outcome == "explained", err


# torch's own nn.RMSNorm with its default eps=None (torch.finfo(dtype).eps): a standard norm.
def test_torch_rmsnorm_with_default_eps_is_explained():
    spec = one_layer(standard("ssm1"), norm="rms_default_eps", final="rms_default_eps")
    model, ids, description = build(spec)
    outcome, err = explain_or_refuse(model, ids, description)
    assert outcome == "explained", f"nn.RMSNorm(d) (eps=None) wrongly refused: {err}"


def test_unused_parameter_refused_or_faithful():
    """A parameter the forward ignores leaves the computation standard: refusing is acceptable."""
    model, ids, description = build(one_layer(standard("hf2", extra="unused")))
    assert expected_verdict(model.spec) == "either"
    explain_or_refuse(model, ids, description)


# ---------------------------------------------------------------------------------------------
# The standard look-alikes are the standard computation


@pytest.mark.parametrize("kernel", [3, 4])
def test_reference_mixers_match_transformers(kernel):
    """The loop-based standard mixers compute what transformers' mixers compute."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba.modeling_mamba import MambaMixer

    x = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(1))
    mine, _, _ = build(one_layer(standard("hf1", kernel=kernel), d_model=12))
    cfg = transformers.MambaConfig(hidden_size=12, state_size=4, expand=2, conv_kernel=kernel, use_bias=False, use_conv_bias=True)
    theirs = MambaMixer(cfg, 0)
    theirs.load_state_dict(mine.layers[0].mixer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(mine.layers[0].mixer(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", [3, 4])
def test_reference_mamba2_mixers_match_transformers(kernel):
    """The loop-based standard Mamba-2 mixer (gated norm per group) computes what transformers'
    Mamba2Mixer computes, where that normalises per group (transformers 5.18 and later)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    x = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(1))
    mine, _, _ = build(one_layer(standard("hf2", kernel=kernel, groups=2, head_dim=4), d_model=12))
    cfg = transformers.Mamba2Config(
        hidden_size=12, state_size=4, expand=2, conv_kernel=kernel, use_bias=False, use_conv_bias=True, head_dim=4,
        num_heads=6, n_groups=2, layer_norm_epsilon=1e-6, chunk_size=4,
    )
    theirs = Mamba2Mixer(cfg, 0)
    if not hasattr(theirs.norm, "group_size"):
        pytest.skip("this transformers release normalises Mamba-2's gated norm over the whole width")
    theirs.load_state_dict(mine.layers[0].mixer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(mine.layers[0].mixer(x), theirs(x), atol=1e-5, rtol=1e-5)

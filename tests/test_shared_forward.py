"""Several outputs of one sequence from one forward and one batched backward pass
(mambalrp.shared_forward), the scans' batchable reverse operators, and explain_generation's use of
both (with its fallback to copies of the sequence)."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import FAMILIES, assert_same_state, snapshot

import mambalrp
from mambalrp.errors import InputError
from mambalrp.shared_forward import BatchedBackwardError, explain_outputs, supports_batched_backward

generation = importlib.import_module("mambalrp.generation")
selective = importlib.import_module("mambalrp.functional.selective_scan")
ssd = importlib.import_module("mambalrp.functional.ssd")

POSITIONS = torch.tensor([4, 7, 10])
TARGETS = torch.tensor([1, 2, 3])


def _ids(model: torch.nn.Module, length: int = 11, seed: int = 0) -> torch.Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def _assert_rows_equal_explain(model, ids, out, rules="mambalrp", target=TARGETS) -> None:
    """Row i equals explain() of the prefix ending at position i; later tokens get exactly 0."""
    for i, p in enumerate(POSITIONS.tolist()):
        tgt = target if callable(target) else int(target[i])
        ref = mambalrp.explain(model, ids[:, : p + 1], tgt, rules=rules)
        scale = ref.logit.abs().max().clamp_min(1.0)
        assert ((out.relevance[i, : p + 1] - ref.relevance[0]).abs().max() / scale).item() <= 1e-5, i
        assert torch.allclose(out.scores[i], ref.logit[0], atol=1e-5)
        assert torch.all(out.relevance[i, p + 1 :] == 0), "a token after the explained position got relevance"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_equals_one_explain_per_position(family):
    model = FAMILIES[family](5)
    ids = _ids(model)
    before = snapshot(model)
    out = explain_outputs(model, ids, POSITIONS, TARGETS)
    assert_same_state(model, before)
    assert out.relevance.shape == (3, 11) and out.relevance.dtype == torch.float32
    assert torch.equal(out.targets, TARGETS)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0, POSITIONS]
    assert torch.allclose(out.outputs, logits, atol=1e-5)  # the explained forward's outputs
    _assert_rows_equal_explain(model, ids, out)


def test_hybrid_and_delta_rule_models():
    """Attention, MoE and delta-rule layers run their rules under batched cotangents too."""
    hybrid_models = pytest.importorskip("hybrid_models")
    delta_models = pytest.importorskip("delta_models")
    models = []
    if "jamba" in hybrid_models.HYBRIDS:
        models.append(hybrid_models.make("jamba"))
    if "qwen3_next" in delta_models.DELTA_MODELS:
        models.append(delta_models.make("qwen3_next"))
    if not models:
        pytest.skip("this transformers release has neither Jamba nor Qwen3-Next")
    for model in models:
        ids = _ids(model)
        _assert_rows_equal_explain(model, ids, explain_outputs(model, ids, POSITIONS, TARGETS))


def test_callable_target_scores_each_row():
    model = FAMILIES["mamba"](6)
    ids = _ids(model)

    def margin(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 5] - logits[:, 9]

    out = explain_outputs(model, ids, POSITIONS, margin)
    assert out.targets is None
    _assert_rows_equal_explain(model, ids, out, target=margin)


def test_backward_that_cannot_batch_raises_and_restores():
    """The true-gradient scans take one cotangent at a time: a clear error, the model untouched."""
    model = FAMILIES["mamba"](7)
    before = snapshot(model)
    with pytest.raises(BatchedBackwardError, match="batched cotangents"):
        explain_outputs(model, _ids(model), POSITIONS, TARGETS, rules="gradient")
    assert_same_state(model, before)


def test_input_errors():
    model = FAMILIES["mamba"](8)
    ids = _ids(model)
    with pytest.raises(InputError, match="one sequence"):
        explain_outputs(model, ids.expand(2, -1), POSITIONS, TARGETS)
    with pytest.raises(InputError, match="out of range"):
        explain_outputs(model, ids, torch.tensor([3, 11]), TARGETS[:2])
    with pytest.raises(InputError, match="integers"):
        explain_outputs(model, ids, torch.tensor([3.0]), TARGETS[:1])
    with pytest.raises(InputError, match="non-empty"):
        explain_outputs(model, ids, [3, 4], TARGETS[:2])
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with pytest.raises(InputError, match="padding"):
        explain_outputs(model, ids, POSITIONS, TARGETS, attention_mask=mask)
    assert supports_batched_backward(ids)


def _scan_inputs(kind: str, b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "selective":
        d, T, n = 6, 13, 4
        coeffs = (torch.rand(b, d, T, generator=g) * 0.5, -torch.rand(d, n, generator=g), torch.randn(b, n, T, generator=g),
                  torch.randn(b, n, T, generator=g), torch.randn(d, generator=g))  # fmt: skip
        return (b, d, T), coeffs, selective.SelectiveScanLRPFn
    h, p, T, groups, n = 4, 3, 13, 2, 5
    coeffs = (torch.rand(b, T, h, generator=g) * 0.5, -torch.rand(h, generator=g), torch.randn(b, T, groups, n, generator=g),
              torch.randn(b, T, groups, n, generator=g), torch.randn(h, generator=g))  # fmt: skip
    return (b, T, h, p), coeffs, ssd.SSDScanLRPFn


@pytest.mark.parametrize("kind", ["selective", "ssd"])
def test_reverse_scan_takes_a_batch_of_cotangents(kind):
    """vmap over the cotangent of the SSM rule's backward equals one backward per cotangent, with
    coefficients of batch 1 (broadcast) or of the cotangent's batch."""
    for b in (1, 2):
        shape, (dt, A, B, C, D), fn = _scan_inputs(kind, b)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(3), requires_grad=True)
        y = fn.apply(x, dt, A, B, C, D)
        cotangents = torch.randn(5, *y.shape, generator=torch.Generator().manual_seed(4))
        (batched,) = torch.func.vmap(lambda v: torch.autograd.grad(y, x, v, retain_graph=True))(cotangents)
        one_by_one = torch.stack([torch.autograd.grad(y, x, v, retain_graph=True)[0] for v in cotangents])
        assert torch.allclose(batched, one_by_one, atol=1e-5, rtol=1e-5)


def test_reverse_scan_with_batched_coefficients():
    """vmap over the coefficients too (not what the library does): one reverse scan per item."""
    shape, (dt, A, B, C, D), _ = _scan_inputs("selective", 1)
    op = selective.SelectiveScanLRPFn  # noqa: F841 - registers the operator
    reverse = torch.ops.mambalrp.selective_scan_lrp_bwd
    g = torch.randn(3, *shape)
    dts = torch.rand(3, *dt.shape) * 0.5
    batched = torch.func.vmap(lambda gi, dti: reverse(gi, dti, A, B, C, D))(g, dts)
    loop = torch.stack([selective.selective_scan_lrp_bwd_torch(g[i], dts[i], A, B, C, D) for i in range(3)])
    assert torch.allclose(batched, loop, atol=1e-6)


def test_generation_uses_one_forward_per_group(monkeypatch):
    """On the CPU no copies of the sequence are made (explain is never called) and the result
    equals the copies' (the path taken where the backward cannot batch)."""
    model = FAMILIES["mamba"](9)
    prompt = _ids(model, 6, seed=1)
    given = _ids(model, 7, seed=2)[0]

    def no_copies(*args, **kwargs):
        raise AssertionError("explain_generation made copies of the sequence")

    with monkeypatch.context() as patch:
        patch.setattr(generation, "explain", no_copies)
        shared = mambalrp.explain_generation(model, prompt, continuation=given, steps_per_backward=3)

    def cannot_batch(*args, **kwargs):
        raise BatchedBackwardError("test")

    monkeypatch.setattr(generation, "explain_outputs", cannot_batch)
    copies = mambalrp.explain_generation(model, prompt, continuation=given, steps_per_backward=3)
    assert torch.allclose(shared.relevance, copies.relevance, atol=1e-6)
    assert torch.allclose(shared.logit, copies.logit, atol=1e-6)
    for name in ("probability", "entropy"):
        assert torch.allclose(shared.step_scores[name], copies.step_scores[name], atol=1e-5)


def test_generation_with_rules_that_cannot_batch():
    """rules="gradient": the first group finds out, the rest go through copies; same numbers."""
    model = FAMILIES["mamba2"](10)
    prompt = _ids(model, 5, seed=3)
    exp = mambalrp.explain_generation(model, prompt, max_new_tokens=4, steps_per_backward=2, rules="gradient")
    seq = exp.input_ids
    for i in range(4):
        ref = mambalrp.explain(model, seq[:, : 5 + i], int(exp.generated_ids[i]), rules="gradient")
        assert torch.allclose(exp.relevance[i, : 5 + i], ref.relevance[0], atol=1e-5)


def test_callable_target_that_mixes_rows_is_refused():
    """One backward pass carries every row's score: a target reading other rows would be
    explained wrongly, so it is refused (explain_outputs and explain alike), the model restored."""
    model = FAMILIES["mamba"](11)
    ids = _ids(model)
    before = snapshot(model)

    def centred(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 5] - logits[:, 5].mean()

    with pytest.raises(InputError, match="mixes rows"):
        explain_outputs(model, ids, POSITIONS, centred)
    with pytest.raises(InputError, match="mixes rows"):
        mambalrp.explain(model, ids.expand(2, -1), centred)
    assert_same_state(model, before)
    # A row-wise, non-linear target passes and equals explain per position.
    out = explain_outputs(model, ids, POSITIONS, lambda lg: torch.logsumexp(lg, -1) * lg[:, 2])
    assert out.relevance.shape == (3, 11)

"""explain_generation(): equality with one explain call per step, greedy / sampled / teacher-forced
continuations, contrastive targets, step scores, restoration and errors."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, assert_same_state, snapshot

import mambalrp
from mambalrp.generation import default_steps_per_backward
from mambalrp.testing import tiny_mamba

P, N = 6, 5


class Vocab:
    """A stand-in tokenizer with ``id_to_token`` (as ``tokenizers.Tokenizer`` has)."""

    def id_to_token(self, i: int) -> str:
        return f"\u0120w{i}" if i % 3 else f"x{i}"


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 64, (P,), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits[0].float()


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    return ((a - b).abs().max() / scale.abs().max().clamp_min(1.0)).item()


@pytest.mark.parametrize(("family", "mode"), [("mamba", "greedy"), ("mamba2", "continuation")])
def test_equals_one_explain_per_step(family, mode, prompt):
    """Row i equals explain(model, sequence[:, :P + i], target=token_i); unseen entries are exactly 0."""
    model = FAMILIES[family](3)
    if mode == "greedy":
        exp = mambalrp.explain_generation(model, prompt, max_new_tokens=N, steps_per_backward=2)
    else:
        given = torch.randint(0, 64, (N,), generator=torch.Generator().manual_seed(2))
        exp = mambalrp.explain_generation(model, prompt[None], continuation=given, steps_per_backward=2)
        assert torch.equal(exp.generated_ids, given)
    assert exp.kind == "generation" and exp.verified and exp.prompt_length == P
    assert exp.relevance.shape == (N, P + N) and len(exp) == N
    assert exp.generation["mode"] == ("greedy" if mode == "greedy" else "teacher-forced")
    seq = exp.input_ids
    assert torch.equal(seq[0, :P], prompt) and torch.equal(seq[0, P:], exp.generated_ids)
    assert exp.position.tolist() == list(range(P - 1, P - 1 + N))
    for i in range(N):
        ref = mambalrp.explain(model, seq[:, : P + i], target=int(exp.generated_ids[i]))
        assert _max_rel_diff(exp.relevance[i, : P + i], ref.relevance[0], ref.logit) <= 1e-5, i
        assert _max_rel_diff(exp.logit[i], ref.logit[0], ref.logit) <= 1e-5
        assert torch.all(exp.relevance[i, P + i :] == 0)
    logits = _logits(model, seq)[P - 1 : P - 1 + N]
    if mode == "greedy":
        assert torch.equal(exp.generated_ids, logits.argmax(-1))
    probs = torch.softmax(logits, -1)
    assert torch.allclose(exp.step_scores["probability"], probs.gather(1, exp.generated_ids[:, None])[:, 0], atol=1e-5)
    entropy = -(probs * probs.log()).sum(-1)
    assert torch.allclose(exp.step_scores["entropy"], entropy, atol=1e-4)


def test_steps_per_backward_does_not_change_the_result(prompt):
    model = tiny_mamba(4)
    one = mambalrp.explain_generation(model, prompt, max_new_tokens=4, steps_per_backward=1)
    default = mambalrp.explain_generation(model, prompt, max_new_tokens=4)
    assert torch.equal(one.generated_ids, default.generated_ids)
    assert (one.relevance - default.relevance).abs().max() <= 1e-5 * one.logit.abs().max()
    assert default_steps_per_backward(P + N) == 16 and default_steps_per_backward(4096) == 1
    assert default_steps_per_backward(256) == 8


def test_contrast_is_a_logit_difference(prompt):
    model = tiny_mamba(5)
    alts = torch.tensor([3, 9, 27, 1])
    exp = mambalrp.explain_generation(model, prompt, max_new_tokens=4, contrast=alts, steps_per_backward=3)
    assert torch.equal(exp.contrast, alts)
    seq, tokens = exp.input_ids, exp.generated_ids
    logits = _logits(model, seq)[P - 1 : P - 1 + 4]
    expected = logits.gather(1, tokens[:, None])[:, 0] - logits.gather(1, alts[:, None])[:, 0]
    assert torch.allclose(exp.logit, expected, atol=1e-5)
    for i in range(4):
        t, a = int(tokens[i]), int(alts[i])
        ref = mambalrp.explain(model, seq[:, : P + i], lambda lg, t=t, a=a: lg[:, t] - lg[:, a])
        assert _max_rel_diff(exp.relevance[i, : P + i], ref.relevance[0], ref.logit) <= 1e-5
    one = mambalrp.explain_generation(model, prompt, max_new_tokens=2, contrast=7)
    assert one.contrast.tolist() == [7, 7]
    assert torch.allclose(one.logit, logits[:2].gather(1, tokens[:2, None])[:, 0] - logits[:2, 7], atol=1e-5)


def test_sampling_is_seeded_and_top_k_one_is_greedy(prompt):
    model = tiny_mamba(6)

    def sample(**kw):
        return mambalrp.explain_generation(model, prompt, max_new_tokens=3, do_sample=True, verify=False, **kw)

    a, b = sample(seed=11, temperature=2.0), sample(seed=11, temperature=2.0)
    assert torch.equal(a.generated_ids, b.generated_ids) and torch.equal(a.relevance, b.relevance)
    assert a.generation == {"mode": "sampled", "temperature": 2.0, "top_k": None, "seed": 11}
    draws = {tuple(sample(seed=s, temperature=5.0).generated_ids.tolist()) for s in range(3)}
    assert len(draws) > 1  # at temperature 5 over 64 tokens, 3 seeds do not all agree
    greedy = mambalrp.explain_generation(model, prompt, max_new_tokens=3, verify=False)
    assert torch.equal(sample(top_k=1, seed=3).generated_ids, greedy.generated_ids)
    torch.manual_seed(0)
    c = sample()
    torch.manual_seed(0)
    d = sample()
    assert c.generation["seed"] == d.generation["seed"] and torch.equal(c.generated_ids, d.generated_ids)


def test_model_restored_and_tokens_kept(prompt):
    model = tiny_mamba(7)
    model.train()
    before = snapshot(model)
    exp = mambalrp.explain_generation(model, prompt, max_new_tokens=3, tokenizer=Vocab())
    assert_same_state(model, before)
    assert exp.tokens == [[Vocab().id_to_token(int(i)) for i in exp.input_ids[0]]]
    with pytest.raises(mambalrp.InputError, match="contrast"):
        mambalrp.explain_generation(model, prompt, max_new_tokens=3, contrast=64)
    assert_same_state(model, before)


def test_attention_mask_of_a_left_padded_prompt(prompt):
    model = tiny_mamba(8)
    mask = torch.tensor([0, 0, 1, 1, 1, 1])
    exp = mambalrp.explain_generation(model, prompt, max_new_tokens=3, attention_mask=mask)
    assert exp.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1, 1, 1]]
    assert torch.all(exp.relevance[:, :2] == 0)
    ref = mambalrp.explain(model, exp.input_ids[:, : P + 1], int(exp.generated_ids[1]),
                           attention_mask=exp.attention_mask[:, : P + 1])
    assert _max_rel_diff(exp.relevance[1, : P + 1], ref.relevance[0], ref.logit) <= 1e-5


def test_errors(prompt):
    model = tiny_mamba(9)
    bad = [
        (dict(input_ids=torch.zeros(2, 4, dtype=torch.long)), "one prompt"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=0.0, do_sample=True), "temperature"),
        (dict(top_k=0, do_sample=True), "top_k"),
        (dict(steps_per_backward=0), "steps_per_backward"),
        (dict(contrast=torch.tensor([1, 2])), "contrast"),
        (dict(contrast=1.5), "contrast"),
        (dict(continuation=torch.tensor([1, 2]), do_sample=True), "do_sample"),
        (dict(continuation=torch.tensor([1, 99])), "vocabulary"),
        (dict(attention_mask=torch.tensor([1, 1, 1, 1, 1, 0])), "last token is padding"),
    ]
    for kwargs, match in bad:
        args = {"input_ids": prompt, **kwargs}
        with pytest.raises(mambalrp.InputError, match=match):
            mambalrp.explain_generation(model, **args)

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = tiny_mamba(9)

        def forward(self, ids, **kw):
            return self.lm(ids, **kw).logits[:, -1]

    with pytest.raises(mambalrp.InputError, match="causal language model"):
        mambalrp.explain_generation(Classifier(), prompt, max_new_tokens=2)


def test_zoo_language_model_with_its_tokenizer():
    from mambalrp.models.zoo import available_models, load_model

    if "lm-mamba1" not in available_models():
        pytest.skip("zoo model lm-mamba1 not present")
    model, tok = load_model("lm-mamba1")
    ids = torch.tensor(tok.encode("the film was").ids)
    exp = mambalrp.explain_generation(model, ids, max_new_tokens=4, tokenizer=tok, progress=False)
    assert exp.tokens == [[tok.id_to_token(int(i)) for i in exp.input_ids[0]]]
    words = exp.aggregate("words")
    assert torch.allclose(words.relevance.sum(-1), exp.relevance.sum(-1), atol=1e-5)
    text = exp.render(color=False)
    assert text.count("step ") == 4 and "film" in text


def test_hugging_face_models_generate_with_their_cache(prompt, monkeypatch):
    """Greedy generation of an HF model goes through generate() (one token per step), with the
    same tokens as recomputing the prefix."""
    import mambalrp.generation as generation

    model = tiny_mamba(10)
    recomputed = mambalrp.explain_generation(model, prompt, max_new_tokens=4, verify=False)

    def refuse(*args, **kwargs):  # the recomputing path calls this; generate() does not
        raise AssertionError("the prefix was recomputed")

    monkeypatch.setattr(generation, "_last_logits", refuse)
    cached = mambalrp.explain_generation(model, prompt, max_new_tokens=4, verify=False)
    assert torch.equal(cached.generated_ids, recomputed.generated_ids)
    assert torch.allclose(cached.step_scores["probability"], recomputed.step_scores["probability"], atol=1e-5)


def test_head_runs_on_each_rows_position_only():
    """Rows explaining different positions: the head sees one position per row, results unchanged."""
    model = tiny_mamba(12)
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(4)).expand(3, 9)
    pos = torch.tensor([3, 8, 5])
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: shapes.append(tuple(a[0].shape)))
    try:
        exp = mambalrp.explain(model, ids, torch.tensor([1, 2, 3]), position=pos, verify=False)
    finally:
        handle.remove()
    assert shapes == [(3, 1, 16)]
    assert not model.lm_head._forward_pre_hooks  # the gathering hook is gone
    for r in range(3):
        ref = mambalrp.explain(model, ids[r : r + 1], r + 1, position=int(pos[r]), verify=False)
        assert _max_rel_diff(exp.relevance[r], ref.relevance[0], ref.logit) <= 1e-6
        assert torch.allclose(exp.logit[r], ref.logit[0], atol=1e-6)


@pytest.mark.slow
def test_benchmark_script_quick(tmp_path):
    """benchmarks/generation.py --quick writes its JSON and table, with equal numbers."""
    import json

    from benchmarks.generation import main

    payload = main(["--quick", "--name", str(tmp_path / "generation_quick")])
    saved = json.loads((tmp_path / "generation_quick.json").read_text())
    assert saved["config"]["seed"] == 0 and "torch" in saved["machine"]
    assert (tmp_path / "generation_quick.md").read_text().startswith("| model |")
    for result in payload["results"]:
        assert result["max_rel_diff"] <= 1e-5

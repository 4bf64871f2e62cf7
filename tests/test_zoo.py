"""Tests of the model zoo: loader, classifier padding, synthetic generator and corpus parser.

Nothing here downloads: the corpus parser runs on a CSV written by the test, the synthetic data
comes from the seeded generator, and the models are the checkpoints shipped in the package.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``benchmarks`` is not an installed package
    sys.path.insert(0, str(ROOT))

pytest.importorskip("transformers")

from benchmarks.zoo import data  # noqa: E402
from mambalrp.models import synthetic  # noqa: E402
from mambalrp.models.classifier import MambaSequenceClassifier, last_token_index  # noqa: E402
from mambalrp.models.zoo import available_models, build_backbone, load_model, model_info  # noqa: E402

KV_MODELS = [m for m in ("kv-mamba1", "kv-mamba2", "kv1-mamba1") if m in available_models()]
SST_MODELS = [m for m in ("sst-mamba1", "sst-mamba2") if m in available_models()]


def test_zoo_ships_models() -> None:
    assert KV_MODELS, "no key-value retrieval model in the zoo"
    assert SST_MODELS, "no sentiment model in the zoo"


# ----------------------------------------------------------------------------- synthetic task


def test_generator_is_seeded_and_marks_evidence() -> None:
    spec = synthetic.TaskSpec()
    a = synthetic.generate(spec, 50, seed=3)
    b = synthetic.generate(spec, 50, seed=3)
    c = synthetic.generate(spec, 50, seed=4)
    assert [e.input_ids for e in a] == [e.input_ids for e in b]
    assert [e.input_ids for e in a] != [e.input_ids for e in c]
    tok = synthetic.build_tokenizer(spec)
    for e in a:
        words = [tok.id_to_token(i) for i in e.input_ids]
        assert len(words) == spec.seq_len
        assert words[-3:] == ["KEY", words[e.key_position], "?"]
        assert e.query_key_position == spec.seq_len - 2
        assert words[e.value_position] == f"v{e.label}"
        assert words[e.value_position - 1] == "VALUE"
        assert words[e.key_position - 1] == "KEY"
        assert e.value_position == e.key_position + 2
        assert e.evidence_positions == (e.value_position, e.key_position)
        # exactly n_pairs planted values, distinct, and the distractor ones carry other labels
        values = [i for i, w in enumerate(words) if w.startswith("v")]
        assert sorted(values) == sorted([e.value_position, *e.distractor_value_positions])
        assert len({words[i] for i in values}) == spec.n_pairs
        # the queried key appears exactly twice: in its pair and in the query
        assert words.count(words[e.key_position]) == 2


@pytest.mark.parametrize("name", KV_MODELS)
def test_kv_model_is_accurate_and_deterministic(name: str) -> None:
    model, tok = load_model(name)
    info = model_info(name)
    spec = synthetic.TaskSpec(**info["task_spec"])
    examples = synthetic.generate(spec, 64, seed=20240)  # a seed the training never used
    ids, labels = synthetic.to_tensors(examples)
    with torch.no_grad():
        first = model(ids)
        second = model(ids)
    assert torch.equal(first, second)
    accuracy = (first.argmax(-1) == labels).float().mean().item()
    # chance is 1/16; picking one of the planted values at random would give 1/n_pairs
    assert accuracy >= 0.8, accuracy
    assert info["metrics"]["test_accuracy"] >= 0.85
    # the tokenizer and the generator agree on the vocabulary
    words = " ".join(tok.id_to_token(i) for i in examples[0].input_ids)
    assert tok.encode(words).ids == examples[0].input_ids


# ----------------------------------------------------------------------------- classifier


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_classifier_left_and_right_padding_match_unpadded(arch: str) -> None:
    torch.manual_seed(0)
    extra = dict(head_dim=16, num_heads=4, n_groups=1, chunk_size=8) if arch == "mamba2" else {}
    backbone = build_backbone(arch, vocab_size=50, hidden_size=32, state_size=8, num_hidden_layers=2,
                              pad_token_id=0, **extra)
    model = MambaSequenceClassifier(backbone, num_labels=3).eval()
    seq = torch.randint(1, 50, (1, 11))
    pad = 5
    left = torch.cat([torch.zeros(1, pad, dtype=torch.long), seq], dim=1)
    left_mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(seq)], dim=1)
    right = torch.cat([seq, torch.zeros(1, pad, dtype=torch.long)], dim=1)
    right_mask = left_mask.flip(1)
    with torch.no_grad():
        plain = model(seq)
        assert torch.allclose(model(seq, attention_mask=torch.ones_like(seq)), plain, atol=1e-6)
        assert torch.allclose(model(left, attention_mask=left_mask), plain, atol=1e-5)
        assert torch.allclose(model(right, attention_mask=right_mask), plain, atol=1e-5)
        # without the mask the padding is read as tokens and changes the answer
        assert not torch.allclose(model(left), plain, atol=1e-5)


def test_last_token_index() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 0, 0]])
    assert last_token_index(mask).tolist() == [3, 2, 3, 1]


@pytest.mark.parametrize("name", SST_MODELS)
def test_sentiment_model_left_padding_and_accuracy_record(name: str) -> None:
    model, tok = load_model(name)
    info = model_info(name)
    assert info["labels"] == ["negative", "positive"]
    assert info["metrics"]["test_accuracy"] >= 0.65  # chance is 0.5 on the balanced test split
    sentences = ["a gorgeous , witty , seductive movie .", "it's a dull , lifeless mess ."]
    batch = tok.encode_batch(sentences)  # the shipped tokenizer pads on the left
    ids = torch.tensor([e.ids for e in batch])
    mask = torch.tensor([e.attention_mask for e in batch])
    assert mask[:, -1].all() and not mask.all()
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for row, sentence in enumerate(sentences):
            alone = torch.tensor([tok.encode(sentence).ids])
            assert torch.allclose(model(alone), batched[row : row + 1], atol=1e-5)


# ----------------------------------------------------------------------------- corpus parsing

SAMPLE = '\ufeff"1","a gorgeous , witty film . "\r\n"-1","it\'s "" dull "" and\nlong ."\r\n"1","fine ."\r\n'


def test_parse_polarity_csv(tmp_path: Path) -> None:
    path = tmp_path / "sample.csv"
    path.write_bytes(SAMPLE.encode("utf-8"))
    examples = data.parse_polarity_csv(path.read_text(encoding="utf-8-sig"))
    assert [e.label for e in examples] == [1, 0, 1]
    assert examples[0].text == "a gorgeous , witty film ."
    assert examples[1].text == 'it\'s " dull " and long .'
    # a BOM left in the text is tolerated too
    assert data.parse_polarity_csv(SAMPLE) == examples
    with pytest.raises(ValueError):
        data.parse_polarity_csv('"2","bad label"\n')


def test_split_is_fixed_and_disjoint() -> None:
    split = data.split_indices(4000)
    assert [len(split[k]) for k in ("train", "valid", "test")] == [2880, 320, 800]
    everything = split["train"] + split["valid"] + split["test"]
    assert sorted(everything) == list(range(4000))
    assert split == data.split_indices(4000)
    assert split["test"][:8] == [3, 4, 9, 12, 14, 16, 19, 20]  # pinned: results depend on it


def test_cache_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAMBALRP_CACHE", str(tmp_path))
    assert data.cache_dir() == tmp_path / "data"
    assert (tmp_path / "data").is_dir()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", SST_MODELS)
def test_zoo_classifiers_run_and_are_explained_in_half_precision(name, dtype) -> None:
    """The backbone's float32 residual stream meets a half-precision head: the head casts."""
    import mambalrp

    model, tok = load_model(name, dtype=dtype)
    ids = torch.tensor([tok.encode("a gripping, beautifully acted film").ids])
    with torch.no_grad():
        logits = model(ids)
        reference = load_model(name)[0](ids)
    assert logits.dtype == dtype and logits.shape == reference.shape
    assert (logits.float() - reference).abs().max().item() <= 0.05 * reference.abs().max().item()
    exp = mambalrp.explain(model, ids)
    assert exp.verified and torch.isfinite(exp.relevance).all()

"""mambalrp.loading: zoo names, zoo directories and local Hugging Face checkpoints."""

from __future__ import annotations

import pytest
import torch

import mambalrp
from checkpoints import WORDS, save_tiny_gpt2, save_tiny_mamba
from mambalrp.loading import decode, encode, load, token_strings
from mambalrp.models.zoo import ZOO_DIR, available_models


def test_checkpoint_directory_loads_with_its_tokenizer(tmp_path):
    saved = save_tiny_mamba(tmp_path / "tiny")
    model, tokenizer = load(str(tmp_path / "tiny"))
    assert type(model).__name__ == "MambaForCausalLM" and not model.training
    reference = saved.state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(loaded[key], value), key
    ids = encode(tokenizer, "the cat sat on a mat")
    assert ids == [WORDS.index(w) for w in "the cat sat on a mat".split()]
    assert token_strings(tokenizer, torch.tensor(ids)) == "the cat sat on a mat".split()
    assert decode(tokenizer, ids) == "the cat sat on a mat"
    # The loaded model is explained like the saved one.
    x = torch.tensor([ids])
    torch.testing.assert_close(mambalrp.explain(model, x).relevance, mambalrp.explain(saved, x).relevance)
    # dtype and an explicit task.
    half, _ = load(str(tmp_path / "tiny"), task="causal-lm", dtype=torch.float64)
    assert next(half.parameters()).dtype == torch.float64


def test_zoo_name_and_zoo_directory_load_the_same_model():
    by_name, tok = load("kv1-mamba1")
    by_path, tok2 = load(str(ZOO_DIR / "kv1-mamba1"))
    assert type(by_name).__name__ == "MambaSequenceClassifier"
    for (k, a), (_, b) in zip(by_name.state_dict().items(), by_path.state_dict().items()):
        assert torch.equal(a, b), k
    assert tok.to_str() == tok2.to_str()


def test_unsupported_family_loads_and_is_refused_by_explain(tmp_path):
    save_tiny_gpt2(tmp_path / "gpt2")
    model, tokenizer = load(str(tmp_path / "gpt2"))
    with pytest.raises(mambalrp.UnsupportedModelError, match="GPT2LMHeadModel contains no Mamba layer"):
        mambalrp.explain(model, torch.tensor([encode(tokenizer, "the cat")]))


def test_errors(tmp_path):
    zoo = ", ".join(available_models())
    with pytest.raises(mambalrp.InputError, match="no such file or directory") as info:
        load(str(tmp_path / "missing" / "model"))
    assert zoo in str(info.value)
    with pytest.raises(mambalrp.InputError, match="not a zoo model and no such path") as info:
        load("sst-mamba9")
    assert zoo in str(info.value)
    with pytest.raises(mambalrp.InputError, match="has no config.json"):
        load(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(mambalrp.InputError, match="is a file"):
        load(str(tmp_path / "weights.bin"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{ not json")
    with pytest.raises(mambalrp.InputError, match="cannot read its config.json"):
        load(str(tmp_path / "broken"))
    with pytest.raises(mambalrp.InputError, match="task must be one of"):
        load("sst-mamba1", task="translation")
    with pytest.raises(mambalrp.InputError, match="required"):
        load("")


def test_checkpoint_without_tokenizer_or_weights(tmp_path):
    from mambalrp.testing import tiny_mamba

    tiny_mamba(0).save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(mambalrp.InputError, match="no tokenizer files"):
        load(str(tmp_path / "no-tokenizer"))
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text((tmp_path / "no-tokenizer" / "config.json").read_text())
    (tmp_path / "no-weights" / "tokenizer.json").write_text("{}")
    with pytest.raises(mambalrp.InputError, match="cannot load a causal-lm model"):
        load(str(tmp_path / "no-weights"))


def test_encode_refuses_empty_text():
    _, tokenizer = load("kv1-mamba1")
    for text in ("", "   \n"):
        with pytest.raises(mambalrp.InputError, match="the text is empty"):
            encode(tokenizer, text)

"""The Explanation type: token strings, indexing, to_numpy / to_pandas / to_dict, save and load."""

from __future__ import annotations

import json
import struct
import sys

import pytest
import torch

import mambalrp
from mambalrp.serialization import FORMAT, TENSOR_FIELDS
from mambalrp.testing import tiny_mamba


class Vocab:
    """A stand-in for ``tokenizers.Tokenizer``: ``id_to_token``."""

    def id_to_token(self, i: int) -> str:
        return f"\u0120t{i}" if i % 2 else f"s{i}"


class HFLike:
    """A stand-in for a Hugging Face tokenizer: ``convert_ids_to_tokens``."""

    def convert_ids_to_tokens(self, ids):
        return [f"\u2581h{i}" for i in ids]


@pytest.fixture(scope="module")
def model():
    return tiny_mamba(21)


@pytest.fixture(scope="module")
def output(model):
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :2] = 0
    return mambalrp.explain(model, ids, attention_mask=mask, return_hidden=True, tokenizer=Vocab())


@pytest.fixture(scope="module")
def generation(model):
    prompt = torch.randint(0, 64, (5,), generator=torch.Generator().manual_seed(1))
    return mambalrp.explain_generation(model, prompt, max_new_tokens=4, contrast=3, tokenizer=Vocab())


def _assert_identical(a: mambalrp.Explanation, b: mambalrp.Explanation) -> None:
    for name in TENSOR_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert torch.equal(x.view(-1).view(torch.uint8) if x.is_floating_point() else x, 
                               y.view(-1).view(torch.uint8) if y.is_floating_point() else y), name  # bitwise
    assert (a.step_scores is None) == (b.step_scores is None)
    for k, v in (a.step_scores or {}).items():
        assert torch.equal(v.view(torch.uint8), b.step_scores[k].view(torch.uint8)), k
    for name in ("kind", "rules", "verified", "tokens", "generation", "spans"):
        assert getattr(a, name) == getattr(b, name), name


def test_tokens_from_both_tokenizer_kinds(model, output):
    assert output.tokens == [[Vocab().id_to_token(int(i)) for i in row] for row in output.input_ids]
    hf = mambalrp.explain(model, output.input_ids[:1], tokenizer=HFLike(), verify=False)
    assert hf.tokens == [[f"\u2581h{int(i)}" for i in output.input_ids[0]]]
    with pytest.raises(mambalrp.InputError, match="convert_ids_to_tokens"):
        mambalrp.explain(model, output.input_ids[:1], tokenizer=object())


def test_hugging_face_tokenizer_from_the_zoo():
    transformers = pytest.importorskip("transformers")
    from mambalrp.models.zoo import available_models, load_model

    if "lm-mamba2" not in available_models():
        pytest.skip("zoo model lm-mamba2 not present")
    model, tok = load_model("lm-mamba2")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    ids = torch.tensor([tok.encode("a gorgeous , witty film").ids])
    exp = mambalrp.explain(model, ids, tokenizer=hf)
    assert exp.tokens == [hf.convert_ids_to_tokens(ids[0].tolist())] == [[tok.id_to_token(int(i)) for i in ids[0]]]
    assert "witty" in exp.render(color=False)
    words = exp.aggregate("words")
    assert words.tokens == [["a", "gorgeous", ",", "witty", "film"]]


def test_indexing_and_slicing(output, generation):
    one = output[1]
    assert len(one) == 1 and torch.equal(one.relevance, output.relevance[1:2])
    assert torch.equal(one.input_ids, output.input_ids[1:2]) and one.tokens == output.tokens[1:2]
    assert torch.equal(one.hidden_relevance, output.hidden_relevance[1:2])
    assert torch.equal(output[-1].relevance, output.relevance[2:])
    tail = output[1:]
    assert torch.equal(tail.attention_mask, output.attention_mask[1:]) and torch.equal(tail.logit, output.logit[1:])
    picked = output[[2, 0]]
    assert torch.equal(picked.relevance, output.relevance[[2, 0]]) and picked.tokens == [output.tokens[2], output.tokens[0]]
    masked = output[torch.tensor([True, False, True])]
    assert torch.equal(masked.target, output.target[[0, 2]])
    steps = generation[1:3]
    assert steps.kind == "generation" and torch.equal(steps.relevance, generation.relevance[1:3])
    assert torch.equal(steps.input_ids, generation.input_ids) and steps.tokens == generation.tokens
    assert torch.equal(steps.step_scores["entropy"], generation.step_scores["entropy"][1:3])
    assert torch.equal(steps.contrast, generation.contrast[1:3]) and steps.position.tolist() == [5, 6]
    with pytest.raises(IndexError):
        output[3]
    with pytest.raises(IndexError):
        output[True]


def test_to_numpy_and_to_dict(output, generation):
    array = output.to_numpy()
    assert array.shape == (3, 7) and array.dtype.name == "float32"
    assert torch.equal(torch.from_numpy(array), output.relevance)
    array[0, 0] = 1e9  # a copy
    assert output.relevance[0, 0] != 1e9
    for exp in (output, generation):
        plain = json.loads(json.dumps(exp.to_dict()))
        assert plain["format"] == FORMAT and plain["kind"] == exp.kind
        assert torch.equal(torch.tensor(plain["relevance"]), exp.relevance)
        assert plain["tokens"] == exp.tokens
    assert json.loads(json.dumps(generation.to_dict()))["step_scores"]["probability"] == generation.step_scores[
        "probability"
    ].tolist()


def test_to_pandas_long_format(output, generation):
    pytest.importorskip("pandas")
    table = output.to_pandas()
    assert len(table) == 3 * 7 - 2  # two padding tokens left out
    sums = table.groupby("row")["relevance"].sum()
    assert torch.allclose(torch.tensor(sums.values, dtype=torch.float32), output.relevance.sum(-1), atol=1e-5)
    first = table[table.row == 0].iloc[0]
    assert first.token == output.tokens[0][0] and first.token_id == int(output.input_ids[0, 0])
    assert first.target == int(output.target[0]) and first["index"] == 0
    gen = generation.to_pandas()
    p = generation.prompt_length
    assert len(gen) == sum(p + i for i in range(4))  # only what each step sees
    assert set(gen.columns) >= {"row", "step", "generated_id", "generated_token", "index", "token", "relevance"}
    step2 = gen[gen.step == 2]
    assert step2.generated_token.iloc[0] == generation.tokens[0][p + 2]
    assert torch.allclose(torch.tensor(step2.relevance.values, dtype=torch.float32), generation.relevance[2, : p + 2])


def test_to_pandas_without_pandas(output, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pandas"):
        output.to_pandas()


@pytest.mark.parametrize("which", ["output", "generation", "words"])
def test_save_load_round_trip_is_bitwise(output, generation, which, tmp_path, monkeypatch):
    exp = {"output": output, "generation": generation, "words": generation.aggregate("words")}[which]
    path = tmp_path / "e.mlrp"
    exp.save(path)

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_torch_load)
    back = mambalrp.load(path)
    _assert_identical(exp, back)
    assert torch.equal(back.conservation_delta, exp.conservation_delta)
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])  # a safetensors file: JSON header, then raw tensors
    assert header["__metadata__"]["format"] == FORMAT and header["__metadata__"]["version"] == "1"
    assert b"pickle" not in raw and not raw[8 + length :].startswith(b"\x80")


def test_load_refuses_other_files(tmp_path, output):
    from safetensors.torch import save_file

    junk = tmp_path / "junk.mlrp"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(mambalrp.ExplanationFileError, match="not a saved explanation"):
        mambalrp.load(junk)
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(mambalrp.ExplanationFileError, match="format"):
        mambalrp.load(other)
    good = tmp_path / "good.mlrp"
    output.save(good)
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    future = tmp_path / "future.mlrp"
    save_file(tensors, str(future), metadata={**meta, "version": "2"})
    with pytest.raises(mambalrp.ExplanationFileError, match="version 2.*upgrade"):
        mambalrp.load(future)
    with pytest.raises(FileNotFoundError):
        mambalrp.load(tmp_path / "missing.mlrp")


def test_render_both_kinds(output, generation):
    text = output.render(color=False)
    assert text.count("target ") == 3 and " t" in text or "s" in text
    assert output.tokens[0][3].replace("\u0120", " ") in text
    gen = generation.render(color=False)
    assert gen.count("step ") == 4 and "vs 3" in gen
    # Step 0 sees the prompt only: one painted value per prompt token.
    first = gen.split("\n\n")[0].split("\n")[1]
    assert first.count("[") == generation.prompt_length
    words = generation.aggregate("words").render(color=False)
    assert words.count("step ") == 4
    assert "kind='generation'" in repr(generation) and "batch=3" in repr(output)

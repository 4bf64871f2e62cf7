"""Explaining tables of texts without Ray: rows against ``mambalrp.explain``, bad rows, reading files.

The engine's per-shard work (:func:`mambalrp.dataset_rows.explain_table`) runs here in-process;
tests/test_dataset_ray.py runs the same through Ray Data.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

import mambalrp
from mambalrp.errors import InputError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from mambalrp.dataset import _manifest, _model_spec, _prepare_output, _shard_name, read_data  # noqa: E402
from mambalrp.dataset_rows import OUTPUT_COLUMNS, RowOptions, Tokens, explain_table  # noqa: E402
from mambalrp.models.zoo import load_model, model_info  # noqa: E402

LABELS = tuple(model_info("sst-mamba1")["labels"])
TEXTS = [
    "a gorgeous , witty , seductive movie .",
    "dull .",
    "the plot is dull and the acting is flat , but the score is lovely .",
    "an utterly charming and hilarious film .",
    "fine",
]


@pytest.fixture(scope="module")
def sst():
    return load_model("sst-mamba1")


@pytest.fixture(scope="module")
def lm():
    return load_model("lm-mamba1")


def _direct(model, tokenizer, text, target=None):
    """``mambalrp.explain`` on one unpadded row."""
    ids = torch.tensor([tokenizer.encode(text).ids])
    return mambalrp.explain(model, ids, target)


def test_rows_equal_explain_and_conserve(sst):
    model, tok = sst
    table = pa.table({"text": TEXTS, "extra": list(range(len(TEXTS)))})
    out = explain_table(model, tok, table, RowOptions(batch_size=3, labels=LABELS))
    assert out.column_names == ["text", "extra", *OUTPUT_COLUMNS]  # input columns first, order kept
    rows = out.to_pylist()
    assert [r["row_id"] for r in rows] == list(range(len(TEXTS)))
    assert [r["extra"] for r in rows] == list(range(len(TEXTS)))
    for text, row in zip(TEXTS, rows):
        exp = _direct(model, tok, text)
        assert row["error"] is None
        assert row["input_ids"] == exp.input_ids[0].tolist()
        assert row["tokens"] == tok.encode(text).tokens
        torch.testing.assert_close(torch.tensor(row["relevance"]), exp.relevance[0], atol=1e-5, rtol=1e-4)
        assert row["logit"] == pytest.approx(float(exp.logit[0]), abs=1e-5)
        assert row["target"] == int(exp.target[0]) and row["target_label"] == LABELS[row["target"]]
        assert row["position"] is None  # a classifier
        # conservation: the relevance sums to the logit up to the recorded delta
        assert sum(row["relevance"]) + row["conservation_delta"] == pytest.approx(row["logit"], abs=1e-4)
        assert row["verified"] is True and row["rules"] == "mambalrp"


def test_bad_rows_get_errors_and_never_stop_the_others(sst):
    model, tok = sst
    texts = [b"dull .", b"", b"   ", None, b"\xff\xfe not utf-8", TEXTS[2].encode(), b"fine"]
    table = pa.table({"text": pa.array(texts, pa.binary())})
    out = explain_table(model, tok, table, RowOptions(batch_size=4, max_length=8, labels=LABELS)).to_pylist()
    errors = [r["error"] for r in out]
    assert errors[0] is None and errors[6] is None
    assert errors[1] == "empty text" and errors[2] == "empty text"
    assert errors[3] == "no text (null)"
    assert errors[4].startswith("undecodable bytes: not UTF-8")
    n = len(tok.encode(TEXTS[2]).ids)
    assert errors[5] == f"too long: {n} tokens, over max_length=8"
    for r in out:
        if r["error"] is not None:
            assert r["relevance"] is None and r["logit"] is None and r["input_ids"] is None
    ok = out[0]
    exp = _direct(model, tok, "dull .")
    torch.testing.assert_close(torch.tensor(ok["relevance"]), exp.relevance[0], atol=1e-5, rtol=1e-4)


def test_truncation_is_recorded_and_explains_the_kept_tokens(sst):
    model, tok = sst
    out = explain_table(model, tok, pa.table({"text": [TEXTS[2]]}), RowOptions(max_length=6, on_error="truncate")).to_pylist()[0]
    full = tok.encode(TEXTS[2]).ids
    assert out["error"] is None and out["truncated_from"] == len(full)
    assert out["input_ids"] == full[:6] and len(out["relevance"]) == 6
    exp = mambalrp.explain(model, torch.tensor([full[:6]]))
    torch.testing.assert_close(torch.tensor(out["relevance"]), exp.relevance[0], atol=1e-5, rtol=1e-4)


def test_the_tokenizer_limit_is_the_default_max_length(sst):
    model, tok = sst
    long = " ".join(["dull"] * 70)
    assert len(Tokens(tok).encode(long)[0]) == 70 and tok.truncation["max_length"] == 64
    row = explain_table(model, tok, pa.table({"text": [long]}), RowOptions()).to_pylist()[0]
    assert row["error"] == "too long: 70 tokens, over max_length=64"
    assert tok.truncation["max_length"] == 64 and tok.padding is not None  # the caller's tokenizer is unchanged


def test_a_rule_set_object(sst):
    from mambalrp.rules import GRADIENT

    model, tok = sst
    row = explain_table(model, tok, pa.table({"text": ["dull ."]}), RowOptions(rules=GRADIENT)).to_pylist()[0]
    exp = mambalrp.explain(model, torch.tensor([tok.encode("dull .").ids]), rules=GRADIENT)
    assert row["rules"] == "gradient"
    torch.testing.assert_close(torch.tensor(row["relevance"]), exp.relevance[0], atol=1e-5, rtol=1e-4)


def test_null_targets_explain_the_prediction_and_model_errors_are_raised(sst):
    model, tok = sst
    table = pa.table({"text": ["dull .", "a witty film .", "so dull ."], "gold": pa.array([1, None, None], pa.int64())})
    rows = explain_table(model, tok, table, RowOptions(target="gold", batch_size=3)).to_pylist()
    assert rows[0]["target"] == 1
    for row in rows:
        exp = _direct(model, tok, row["text"], None if row["gold"] is None else row["gold"])
        assert row["error"] is None and row["target"] == int(exp.target[0])
        torch.testing.assert_close(torch.tensor(row["relevance"]), exp.relevance[0], atol=1e-5, rtol=1e-4)
    # A model without a Mamba layer: an error of the model, raised, not recorded on every row.
    plain = torch.nn.Sequential(torch.nn.Embedding(4096, 8), torch.nn.Linear(8, 2))
    with pytest.raises(mambalrp.UnsupportedModelError):
        explain_table(plain, tok, pa.table({"text": ["dull .", "fine"]}), RowOptions())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        explain_table(object(), tok, pa.table({"text": ["dull ."]}), RowOptions())


def test_on_error_raise(sst):
    model, tok = sst
    with pytest.raises(InputError, match="empty text"):
        explain_table(model, tok, pa.table({"text": ["dull .", ""]}), RowOptions(on_error="raise"))


def test_targets_by_label_id_and_column(sst):
    model, tok = sst
    table = pa.table({"text": TEXTS[:3], "gold": ["negative", "positive", "neutral"]})
    by_column = explain_table(model, tok, table, RowOptions(target="gold", labels=LABELS)).to_pylist()
    assert [r["target"] for r in by_column[:2]] == [0, 1]
    assert by_column[2]["error"] == "target 'neutral' is not a class id or label of the model"
    for text, row in zip(TEXTS[:2], by_column[:2]):
        exp = _direct(model, tok, text, row["target"])
        torch.testing.assert_close(torch.tensor(row["relevance"]), exp.relevance[0], atol=1e-5, rtol=1e-4)
    by_label = explain_table(model, tok, table.drop(["gold"]), RowOptions(target="negative", labels=LABELS)).to_pylist()
    by_id = explain_table(model, tok, table.drop(["gold"]), RowOptions(target=0, labels=LABELS)).to_pylist()
    assert [r["target"] for r in by_label] == [0, 0, 0] and [r["target_label"] for r in by_label] == ["negative"] * 3
    assert [r["relevance"] for r in by_label] == [r["relevance"] for r in by_id]
    with pytest.raises(InputError, match="neither a column of the data nor a label"):
        explain_table(model, tok, table, RowOptions(target="neutral", labels=LABELS))
    with pytest.raises(InputError, match="names of output columns"):
        explain_table(model, tok, pa.table({"text": ["x"], "relevance": [1]}), RowOptions())
    with pytest.raises(InputError, match="no text column"):
        explain_table(model, tok, pa.table({"sentence": ["x"]}), RowOptions())


def test_language_model_rows_and_hf_tokenizer(lm):
    from transformers import PreTrainedTokenizerFast

    model, tok = lm
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    assert Tokens(hf).encode(TEXTS[0]) == Tokens(tok).encode(TEXTS[0])
    table = pa.table({"text": TEXTS[:2]})
    out = explain_table(model, hf, table, RowOptions(batch_size=2)).to_pylist()
    for text, row in zip(TEXTS[:2], out):
        exp = _direct(model, tok, text)
        assert row["position"] == len(row["input_ids"]) - 1 == int(exp.position[0])
        assert row["target"] == int(exp.target[0]) and row["target_label"] == tok.id_to_token(row["target"])
        torch.testing.assert_close(torch.tensor(row["relevance"]), exp.relevance[0], atol=1e-5, rtol=1e-4)
    # a token string as the target of a language model
    word = tok.encode(" film").tokens[0]
    row = explain_table(model, tok, table, RowOptions(target=word)).to_pylist()[0]
    assert row["target"] == tok.token_to_id(word) and row["target_label"] == word


def test_a_suite_method_runs_through_the_same_rows(sst):
    from benchmarks.faithfulness import methods

    model, tok = sst
    table = pa.table({"text": ["dull .", "a witty film .", "so dull ."]})
    out = explain_table(model, tok, table, RowOptions(method=methods.saliency, batch_size=4)).to_pylist()
    assert [r["rules"] for r in out] == ["saliency"] * 3
    for text, row in zip(table.column("text").to_pylist(), out):
        ids = torch.tensor([tok.encode(text).ids])
        pred = int(model(ids).argmax(-1))
        expected = methods.saliency(model, ids, torch.tensor([pred]))
        assert row["target"] == pred and row["logit"] is None and row["verified"] is None
        torch.testing.assert_close(torch.tensor(row["relevance"]), expected[0], atol=1e-6, rtol=1e-5)


def test_options_are_checked():
    with pytest.raises(InputError, match="batch_size"):
        RowOptions(batch_size=0)
    with pytest.raises(InputError, match="on_error"):
        RowOptions(on_error="skip")
    with pytest.raises(InputError, match="max_length"):
        RowOptions(max_length=0)
    with pytest.raises(InputError, match="target"):
        RowOptions(target=1.5)
    with pytest.raises(InputError, match="recompute"):
        RowOptions(recompute="sometimes")
    with pytest.raises(InputError, match="not a model object"):
        _model_spec(torch.nn.Linear(2, 2))
    assert _model_spec("sst-mamba1") == "sst-mamba1"
    with pytest.raises(InputError, match="neither a zoo model"):
        _model_spec("no-such-model")


def test_ray_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"mambalrp\[ray\]"):
        mambalrp.explain_dataset("sst-mamba1", ["dull ."])


def test_read_data_formats(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"dull .\n\xff bad\n\nfine\n")
    t = read_data(tmp_path / "a.txt")
    assert t.column("text").to_pylist() == [b"dull .", b"\xff bad", b"", b"fine"]  # bytes: some are not UTF-8
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "dull .", "y": 1}\n{"text": "\xff"}\n\n{"text": "fine", "y": 0}\n')
    t = read_data(tmp_path / "b.jsonl")
    assert t.column("text").to_pylist() == [b"dull .", b'{"text": "\xff"}', b"fine"]
    assert t.column("y").to_pylist() == [1, None, 0]
    (tmp_path / "bad.jsonl").write_text('{"text": "dull ."}\nnot json\n')
    with pytest.raises(InputError, match="line 2: not JSON"):
        read_data(tmp_path / "bad.jsonl")
    (tmp_path / "c.json").write_text(json.dumps([{"text": "dull ."}, {"text": "fine"}]))
    assert read_data(tmp_path / "c.json").column("text").to_pylist() == ["dull .", "fine"]
    (tmp_path / "d.csv").write_text("text,label\ndull .,0\nfine,1\n")
    assert read_data(tmp_path / "d.csv").column("label").to_pylist() == [0, 1]
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "e.parquet")
    assert read_data(tmp_path / "e.parquet").num_rows == 1
    with pytest.raises(InputError, match="unsupported data file"):
        (tmp_path / "f.xml").write_text("<x/>")
        read_data(tmp_path / "f.xml")
    with pytest.raises(InputError, match="no data file"):
        read_data(tmp_path / "missing.jsonl")


def test_output_directory_resume_checks(tmp_path):
    table = pa.table({"text": ["a", "b", "c"], "row_id": pa.array([0, 1, 2], pa.int64())})
    manifest = _manifest("sst-mamba1", RowOptions(), table, 4)
    assert _prepare_output(tmp_path, manifest, resume=True) == set()
    pq.write_table(table.slice(0, 2), tmp_path / _shard_name([0, 1]))
    (tmp_path / ".tmp-123-part.parquet").write_bytes(b"half written")
    assert _prepare_output(tmp_path, manifest, resume=True) == {0, 1}
    assert not list(tmp_path.glob(".tmp-*"))  # a killed writer's leftovers are removed
    with pytest.raises(InputError, match="resume=True continues"):
        _prepare_output(tmp_path, manifest, resume=False)
    other = _manifest("sst-mamba1", RowOptions(rules="gradient"), table, 4)
    with pytest.raises(InputError, match="rules differ"):
        _prepare_output(tmp_path, other, resume=True)
    # the same ids always name the same file: a retried shard overwrites, never duplicates
    assert _shard_name([2, 0, 1]) == _shard_name([0, 1, 2]) != _shard_name([0, 1])


def test_command_line_arguments_and_bad_input(tmp_path, capsys):
    import argparse

    from mambalrp.dataset_cli import add_parser, run

    parser = argparse.ArgumentParser(prog="mambalrp")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["explain-dataset", "--model", "sst-mamba1", "--data", "t.jsonl", "--out", "o", "--target", "1",
                              "--max-length", "32", "--on-error", "truncate", "--address", "auto", "--workers", "3"])
    assert (args.model, args.target, args.max_length, args.on_error, args.address, args.workers) == (
        "sst-mamba1", "1", 32, "truncate", "auto", 3)
    assert (args.text_column, args.batch_size, args.quiet) == ("text", 16, False)
    missing = parser.parse_args(["explain-dataset", "--model", "m", "--data", str(tmp_path / "none.jsonl"), "--out", "o"])
    assert run(missing) == 1 and "no data file" in capsys.readouterr().err
    wrong = parser.parse_args(["explain-dataset", "--model", "m", "--data", "texts.xml", "--out", "o"])
    assert run(wrong) == 2 and "--data must end in one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["explain-dataset", "--model", "m", "--data", "t.txt", "--out", "o", "--on-error", "skip"])


def test_bad_input_fails_before_ray_starts():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("Ray is already running in this process")
    with pytest.raises(InputError, match="no text column 'text'"):
        mambalrp.explain_dataset("sst-mamba1", [{"sentence": "dull ."}])
    with pytest.raises(InputError, match="names of output columns"):
        mambalrp.explain_dataset("sst-mamba1", [{"text": "dull .", "error": None}])
    with pytest.raises(InputError, match="neither a column of the data nor one of the labels"):
        mambalrp.explain_dataset("sst-mamba1", ["dull ."], target="neutral")
    with pytest.raises(InputError, match="workers"):
        mambalrp.explain_dataset("sst-mamba1", ["dull ."], workers=0)
    with pytest.raises(InputError, match="not a model object"):
        mambalrp.explain_dataset(torch.nn.Linear(2, 2), ["dull ."])
    assert not ray.is_initialized()


def test_inputs_become_one_table():
    from mambalrp.dataset import _as_table

    pd = pytest.importorskip("pandas")

    ray = pytest.importorskip("ray")
    expected = {"text": ["dull .", "fine"], "y": [0, 1]}
    assert _as_table(pd.DataFrame(expected), "text", ray).to_pydict() == expected
    assert _as_table([{"text": "dull .", "y": 0}, {"text": "fine", "y": 1}], "text", ray).to_pydict() == expected
    assert _as_table(pa.table(expected), "text", ray).to_pydict() == expected
    assert _as_table(["dull .", "fine"], "sentence", ray).to_pydict() == {"sentence": ["dull .", "fine"]}
    assert _as_table(["ok", b"\xff"], "text", ray).column("text").type == pa.binary()  # decoded per row later

    class Arrowish:  # the part of a Hugging Face Dataset that is used (datasets is not installed here)
        __module__ = "datasets.arrow_dataset"

        def with_format(self, kind):
            assert kind == "arrow"
            return self

        def __getitem__(self, index):
            assert index == slice(None)
            return pa.table(expected)

    assert _as_table(Arrowish(), "text", ray).to_pydict() == expected
    with pytest.raises(InputError, match="unsupported data"):
        _as_table(42, "text", ray)

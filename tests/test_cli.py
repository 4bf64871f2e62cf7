"""The ``mambalrp`` command line: in-process through ``main(argv)`` and as a subprocess.

Models are loaded once per test module for the in-process tests (``_load`` is cached), so the
formats are checked without reloading; the subprocess tests run the real thing end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import mambalrp
from checkpoints import WORDS, save_tiny_gpt2, save_tiny_mamba
from generation_reference import reference_generation
from mambalrp import cli

ROOT = Path(__file__).resolve().parents[1]
TEXT = "a gorgeous , witty film ."


@pytest.fixture(scope="module")
def loaded():
    return {}


@pytest.fixture
def run(monkeypatch, loaded, capsys):
    """``run(*argv) -> (status, stdout, stderr)`` with models cached across calls."""
    real = cli._load

    def cached(args):
        key = (args.model, args.task)
        if key not in loaded:
            loaded[key] = real(args)
        return loaded[key]

    monkeypatch.setattr(cli, "_load", cached)

    def call(*argv):
        status = cli.main(list(argv))
        out, err = capsys.readouterr()
        return status, out, err

    return call


def relevance_and_logit(data):
    rel = np.asarray(data["relevance"], dtype=np.float64).reshape(-1)
    logit = float(np.asarray(data["logit"], dtype=np.float64).reshape(-1)[0])
    delta = float(np.asarray(data["conservation_delta"], dtype=np.float64).reshape(-1)[0])
    return rel, logit, delta


def test_help_of_every_command_names_its_options(run):
    status, out, _ = run("--help")
    assert status == 0
    for command in ("explain", "explain-generation", "demo", "explain-dataset"):
        assert command in out
    expected = {
        "explain": ["--model", "--text", "--target", "--position", "--format", "--out", "--rules", "--quiet"],
        "explain-generation": ["--max-new-tokens", "--continuation", "--sample", "--seed", "--temperature", "--format", "--out"],
        "demo": ["--model", "--html", "--no-color", "--rules", "--quiet", "sentence"],
        "explain-dataset": ["--model", "--data", "--out", "--text-column", "--target", "--workers", "--on-error", "--address"],
    }
    for command, options in expected.items():
        status, out, _ = run(command, "--help")
        assert status == 0
        for option in options:
            assert option in out, (command, option)


def test_explain_dataset_errors_follow_the_exit_status_convention(run, tmp_path):
    status, _, err = run("explain-dataset", "--model", "sst-mamba1", "--data", str(tmp_path / "none.jsonl"), "--out", "o")
    assert status == 1 and err.strip() == f"mambalrp: error: no data file {tmp_path / 'none.jsonl'}"
    status, _, err = run("explain-dataset", "--model", "sst-mamba1", "--data", "texts.xml", "--out", "o")
    assert status == 2 and "--data must end in one of" in err


def test_explain_classifier_json_conserves_and_names_the_class(run):
    status, out, err = run("explain", "--model", "sst-mamba1", "--text", TEXT, "--format", "json")
    assert status == 0 and err == ""
    data = json.loads(out)
    rel, logit, delta = relevance_and_logit(data)
    assert rel.size == 8 and data["target_label"] == "positive" and data["verified"] is True
    assert abs(rel.sum() + delta - logit) < 1e-4 and abs(delta) < 0.2 * abs(logit)
    # The same number the library computes.
    model, tokenizer = cli._load(SimpleNamespace(model="sst-mamba1", task=None))
    ids = torch.tensor([tokenizer.encode(TEXT).ids])
    np.testing.assert_allclose(rel, mambalrp.explain(model, ids).relevance[0].numpy(), rtol=1e-5, atol=1e-6)
    status, out, _ = run("explain", "--model", "sst-mamba1", "--text", TEXT, "--target", "negative", "--format", "json")
    data = json.loads(out)
    assert data["target_label"] == "negative" and np.asarray(data["target"]).reshape(-1)[0] == 0


def test_explain_text_html_and_figures(run, tmp_path):
    status, out, _ = run("explain", "--model", "sst-mamba1", "--text", TEXT, "--no-color")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("sst-mamba1: explaining class 'positive' (1)")
    assert " witty[" in lines[1] and "\033[" not in out
    numbers = [float(t) for t in lines[2].replace("=", " ").replace("+ biases", " ").split() if t[0] in "+-"]
    assert abs(numbers[0] - numbers[1] - numbers[2]) < 2e-4

    status, _, err = run("explain", "--model", "sst-mamba1", "--text", TEXT, "--out", str(tmp_path / "x.html"))
    assert status == 0 and "wrote" in err
    page = (tmp_path / "x.html").read_text()
    parser = HTMLParser()
    parser.feed(page)
    assert page.count('class="tok"') == 8 and " witty" in page and "http" not in page
    for fmt, magic in (("png", b"\x89PNG"), ("pdf", b"%PDF"), ("svg", b"<?xml")):
        status, _, err = run("explain", "--model", "sst-mamba1", "--text", TEXT, "--out", str(tmp_path / "fig" / f"x.{fmt}"), "--quiet")
        assert status == 0 and err == ""
        assert (tmp_path / "fig" / f"x.{fmt}").read_bytes().startswith(magic)


def test_explain_language_model_targets(run):
    args = ("explain", "--model", "lm-mamba1", "--text", "the movie is", "--format", "json")
    _, out, _ = run(*args)
    default = json.loads(out)
    predicted = int(np.asarray(default["target"]).reshape(-1)[0])
    _, tokenizer = cli._load(SimpleNamespace(model="lm-mamba1", task=None))
    spelled = tokenizer.id_to_token(predicted)
    assert spelled.startswith("\u0120")  # byte-level BPE: the space is part of the token
    for spec in (str(predicted), spelled, " " + spelled[1:]):
        _, out, _ = run(*args, "--target", spec)
        again = json.loads(out)
        assert again["target"] == default["target"] and again["relevance"] == default["relevance"]
    _, out, _ = run(*args, "--position", "1")
    early = json.loads(out)
    rel = np.asarray(early["relevance"]).reshape(-1)
    assert np.asarray(early["position"]).reshape(-1)[0] == 1 and rel[2] == 0.0 and rel[:2].any()


def test_explain_checkpoint_directory(run, tmp_path):
    saved = save_tiny_mamba(tmp_path / "tiny")
    status, out, _ = run("explain", "--model", str(tmp_path / "tiny"), "--text", "the cat sat on a", "--target", "mat", "--format", "json")
    assert status == 0
    data = json.loads(out)
    ids = [WORDS.index(w) for w in "the cat sat on a".split()]
    assert np.asarray(data["input_ids"]).reshape(-1).tolist() == ids
    assert np.asarray(data["target"]).reshape(-1).tolist() == [WORDS.index("mat")]
    reference = mambalrp.explain(saved, torch.tensor([ids]), WORDS.index("mat"))
    np.testing.assert_allclose(np.asarray(data["relevance"]).reshape(-1), reference.relevance[0].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["explain", "--model", "sst-mamba1", "--text", TEXT, "--format", "png"], "--format png writes a file"),
        (["explain", "--model", "sst-mamba1", "--text", TEXT, "--out", "x.docx"], "cannot tell the format"),
        (["explain", "--model", "sst-mamba1", "--text", TEXT, "--rules", "lrp"], "invalid choice"),
        (["explain", "--text", TEXT], "--model"),
        (["explain-generation", "--model", "lm-mamba1", "--text", "a", "--max-new-tokens", "0"], "at least 1"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(run, argv, message):
    status, out, err = run(*argv)
    assert status == 2 and out == "" and message in err and "usage:" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "sst-mamba1", "--text", TEXT, "--target", "neutral"], "target 'neutral' is not a class of this model"),
        (["--model", "lm-mamba1", "--text", "the movie", "--target", "gorgeous witty"], "is not one token of the vocabulary"),
        (["--model", "sst-mamba1", "--text", "  "], "the text is empty"),
        (["--model", "sst-mamba7", "--text", TEXT], "not a zoo model and no such path"),
        (["--model", "lm-mamba1", "--text", "the movie", "--position", "9"], "position"),
    ],
)
def test_runtime_errors_exit_1_with_one_line(run, argv, message):
    status, out, err = run("explain", *argv)
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("mambalrp: error: ") and message in err


def test_unsupported_model_exits_1_with_one_line(run, tmp_path, capsys):
    save_tiny_gpt2(tmp_path / "gpt2")
    capsys.readouterr()  # transformers' progress bars while saving
    status, out, err = run("explain", "--model", str(tmp_path / "gpt2"), "--text", "the cat")
    assert status == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("mambalrp: error: GPT2LMHeadModel contains no Mamba layer that mambalrp recognises.")


def test_explain_generation_formats(run, monkeypatch, tmp_path):
    monkeypatch.setattr(mambalrp, "explain_generation", reference_generation, raising=False)
    args = ("explain-generation", "--model", "lm-mamba1", "--text", "the movie is", "--max-new-tokens", "3")
    status, out, _ = run(*args, "--format", "json")
    assert status == 0
    data = json.loads(out)
    matrix = np.asarray(data["relevance"])
    assert matrix.shape == (3, 6) and data["prompt_length"] == 3 and len(data["tokens"]) == 6
    for i in range(3):
        assert (matrix[i, 3 + i :] == 0).all() and matrix[i, : 3 + i].any()
    status, out, _ = run(*args, "--no-color")
    lines = out.splitlines()
    assert status == 0 and len(lines) == 4 and lines[3].startswith("[3] ") and lines[3].count("[") == 1 + 5
    status, _, _ = run(*args, "--out", str(tmp_path / "g.html"))
    page = (tmp_path / "g.html").read_text()
    assert status == 0 and page.count('class="tok"') == 3 + 4 + 5 and "step 3" in page
    status, _, _ = run(*args, "--out", str(tmp_path / "g.png"))
    assert status == 0 and (tmp_path / "g.png").read_bytes().startswith(b"\x89PNG")
    # A continuation is explained as given.
    _, tokenizer = cli._load(SimpleNamespace(model="lm-mamba1", task=None))
    status, out, _ = run(*args, "--continuation", " a film", "--format", "json")
    forced = json.loads(out)
    assert forced["generated_ids"] == tokenizer.encode(" a film", add_special_tokens=False).ids


def test_explain_generation_without_the_function(run, monkeypatch):
    monkeypatch.delattr(mambalrp, "explain_generation", raising=False)
    status, _, err = run("explain-generation", "--model", "lm-mamba1", "--text", "the movie")
    assert status == 1 and "cannot explain generations" in err


# ------------------------------------------------------------------------------ subprocesses


def mambalrp_command(*argv, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mambalrp", *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_subprocess_explain_json(tmp_path):
    done = mambalrp_command("explain", "--model", "sst-mamba1", "--text", TEXT, "--format", "json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rel, logit, delta = relevance_and_logit(json.loads(done.stdout))
    assert abs(rel.sum() + delta - logit) < 1e-4


@pytest.mark.parametrize(
    "case",
    [
        "bad-path",
        pytest.param("unsupported", marks=pytest.mark.slow),
        pytest.param("unknown-name", marks=pytest.mark.slow),
        pytest.param("empty-text", marks=pytest.mark.slow),
    ],
)
def test_subprocess_errors_are_one_line(tmp_path, case):
    model, text, message = {
        "bad-path": (str(tmp_path / "no" / "such"), TEXT, "no such file or directory"),
        "unsupported": (str(tmp_path / "gpt2"), "the cat", "GPT2LMHeadModel contains no Mamba layer"),
        "unknown-name": ("sst-mamba7", TEXT, "not a zoo model and no such path (zoo models: "),
        "empty-text": ("sst-mamba1", "", "the text is empty"),
    }[case]
    if case == "unsupported":
        save_tiny_gpt2(tmp_path / "gpt2")
    done = mambalrp_command("explain", "--model", model, "--text", text, cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("mambalrp: error: ") and message in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", ["", "explain", "explain-generation", "demo"])
def test_subprocess_help_of_each_command(tmp_path, command):
    done = mambalrp_command(*([command] if command else []), "--help", cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == ""
    if command:
        assert "--rules" in done.stdout and "--quiet" in done.stdout
    else:
        assert "explain-generation" in done.stdout and "exit status" in done.stdout


@pytest.mark.skipif(not hasattr(mambalrp, "explain_generation"), reason="mambalrp.explain_generation is not available")
def test_subprocess_explain_generation(tmp_path):
    done = mambalrp_command(
        "explain-generation", "--model", "lm-mamba1", "--text", "the movie is", "--max-new-tokens", "3", "--format", "json",
        "--quiet", cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    matrix = np.asarray(data["relevance"], dtype=np.float64).reshape(3, -1)
    prompt = matrix.shape[1] - 3
    for i in range(3):
        assert (matrix[i, prompt + i :] == 0).all()
    done = mambalrp_command(
        "explain-generation", "--model", "lm-mamba1", "--text", "the movie is", "--max-new-tokens", "3", "--out", "g.html",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "g.html").read_text().count("step ") == 3


def test_terminal_rows():
    coloured = cli._paint_row(["\u0120good", "\u0120bad", "\u0120film"], [2.0, -1.0, 0.0], color=True)
    assert "\033[48;2;255;0;0m\033[38;2;0;0;0m good\033[0m" in coloured  # the largest: full red
    assert "\033[48;2;128;128;255m\033[38;2;0;0;0m bad\033[0m" in coloured  # half of it, against: blue
    assert "\033[48;2;255;255;255m" in coloured and "\033[0m\033[48" in coloured  # spaces are in the tokens
    words = cli._paint_row(["good", "film"], [1.0, 0.5], color=True)
    assert "\033[0m \033[48" in words  # word-level tokens get a separator
    assert cli._paint_row(["good", "\n"], [1.0, -0.5], color=False) == "good[+1.00] \u21b5[-0.50]"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["text", "html", "png"])
def test_subprocess_explain_formats(tmp_path, fmt):
    out = {"text": [], "html": ["--out", "x.html"], "png": ["--out", "fig/x.png"]}[fmt]
    done = mambalrp_command("explain", "--model", "sst-mamba1", "--text", TEXT, "--no-color", *out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    if fmt == "text":
        assert done.stdout.startswith("sst-mamba1: explaining class 'positive' (1)") and " witty[" in done.stdout
    elif fmt == "html":
        assert (tmp_path / "x.html").read_text().count('class="tok"') == 8 and "wrote x.html" in done.stderr
    else:
        assert (tmp_path / "fig" / "x.png").read_bytes().startswith(b"\x89PNG")

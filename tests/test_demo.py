"""The demo explains the bundled sentiment classifier and prints a heatmap."""

from __future__ import annotations

from mambalrp import demo


def test_demo_prints_predictions_heatmaps_and_conservation(capsys):
    text = demo.run(color=False)
    assert text in capsys.readouterr().out
    blocks = [b for b in text.split("\n\n") if b.strip()]
    assert blocks[1].startswith("positive")  # "a gorgeous , witty , seductive movie ."
    assert blocks[2].startswith("negative") and blocks[3].startswith("negative")
    assert " witty[+" in blocks[1] and " poorly[+" in blocks[2]
    for block in blocks[1:]:
        line = [ln for ln in block.splitlines() if ln.startswith("conservation:")][0]
        numbers = [float(tok) for tok in line.replace("=", " ").replace("+ biases", " ").split() if tok[0] in "+-"]
        assert abs(numbers[0] - numbers[1] - numbers[2]) < 1e-3


def test_demo_generation_writes_html_and_prints_its_path(tmp_path, monkeypatch, capsys):
    from html.parser import HTMLParser

    import mambalrp
    from generation_reference import reference_generation

    monkeypatch.setattr(mambalrp, "explain_generation", reference_generation, raising=False)
    path = demo.run_generation("lm-mamba1", max_new_tokens=3, html_path=tmp_path / "out" / "generation.html")
    out = capsys.readouterr().out
    assert path == str(tmp_path / "out" / "generation.html") and f"wrote {path}" in out
    page = (tmp_path / "out" / "generation.html").read_text()
    HTMLParser().feed(page)
    prompt = len(demo.PROMPT.split())
    assert page.count('class="tok"') == 3 * prompt + 3 and page.count("step ") == 3
    assert "http" not in page


def test_demo_generation_is_skipped_without_explain_generation(tmp_path, monkeypatch, capsys):
    import mambalrp

    monkeypatch.delattr(mambalrp, "explain_generation", raising=False)
    assert demo.run_generation(html_path=tmp_path / "g.html") is None
    assert "skipped" in capsys.readouterr().out and not (tmp_path / "g.html").exists()


def test_demo_options():
    import argparse

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args([])
    assert args.html == "build/demo/generation.html" and args.lm == "lm-mamba1" and args.sentence == []
    args = parser.parse_args(["--model", "sst-mamba2", "--html", "x.html", "--no-color", "--rules", "gradient", "a b ."])
    assert (args.model, args.html, args.no_color, args.rules, args.sentence) == ("sst-mamba2", "x.html", True, "gradient", ["a b ."])


def test_demo_generation_with_the_library(tmp_path, capsys):
    import pytest

    import mambalrp

    if not hasattr(mambalrp, "explain_generation"):
        pytest.skip("mambalrp.explain_generation is not available")
    path = demo.run_generation(max_new_tokens=3, html_path=tmp_path / "generation.html")
    assert path is not None and f"wrote {path}" in capsys.readouterr().out
    assert (tmp_path / "generation.html").read_text().count("step ") == 3

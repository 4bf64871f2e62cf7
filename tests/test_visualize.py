"""mambalrp.visualize: HTML pages and matplotlib figures from plain data."""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser

import numpy as np
import pytest

from mambalrp import visualize

VOID = {"meta", "br", "img", "link", "input", "hr", "wbr", "source", "area", "base", "col", "embed", "param", "track"}


class Checker(HTMLParser):
    """Parses a page and records tags, titles, inline colours and text; fails on unbalanced tags."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.attrs: list[dict[str, str | None]] = []
        self.text: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.append(dict(attrs))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> Checker:
    checker = Checker()
    checker.feed(page)
    checker.close()
    assert not checker.errors, checker.errors
    assert not checker.stack, f"unclosed tags {checker.stack}"
    return checker


def token_spans(checker: Checker) -> list[dict]:
    return [a for t, a in zip(checker.tags, checker.attrs) if t == "span" and "tok" in (a.get("class") or "").split()]


ROWS = [["a", "<script>alert(1)</script>", "\u0120good", "\n", "  "], ["x", "y"]]
VALUES = [[0.1, 0.8, -0.4, 0.0, 0.2], [2.0, -1.0]]


def test_document_is_well_formed_self_contained_and_escapes_tokens():
    page = visualize.html_document(ROWS, VALUES, row_labels=["first", "second <b>"], title="T & <i>", caption="cap <u>")
    assert page.startswith("<!DOCTYPE html>")
    checker = parse(page)
    assert "script" not in checker.tags and "b" not in checker.tags and "u" not in checker.tags and "i" not in checker.tags
    for bad in ("http://", "https://", "src=", "href=", "@import", "url("):
        assert bad not in page
    assert {"link", "img", "iframe", "object"}.isdisjoint(checker.tags)
    text = "".join(checker.text)
    assert "<script>alert(1)</script>" in text  # shown as text, not run
    assert "T & <i>" in text and "second <b>" in text and "cap <u>" in text
    # Whitespace tokens are visible; the BPE space marker becomes a space.
    assert "\u21b5" in text and "\u2423\u2423" in text and " good" in text
    # A line break follows the newline token.
    assert checker.tags.count("br") == 1


def test_hover_values_and_row_normalisation():
    checker = parse(visualize.html_fragment(ROWS, VALUES))
    spans = token_spans(checker)
    assert len(spans) == 7
    titles = [s["title"] for s in spans]
    assert "R = +0.8" in titles[1] and "R = -0.4" in titles[2] and "R = +2" in titles[5]
    assert "(normalised +1.000)" in titles[1] and "(normalised -0.500)" in titles[2]
    colours = [re.search(r"background:(#[0-9a-f]{6})", s["style"]).group(1) for s in spans]
    # Each row's largest |value| gets full colour: red for, blue against.
    assert colours[1] == "#ff0000" and colours[5] == "#ff0000" and colours[6] == "#8080ff"
    assert colours[2] == "#8080ff" and colours[3] == "#ffffff"


def test_global_and_none_normalisation_and_legend():
    glob = parse(visualize.html_fragment(ROWS, VALUES, normalization="global"))
    spans = token_spans(glob)
    colours = [re.search(r"background:(#[0-9a-f]{6})", s["style"]).group(1) for s in spans]
    assert colours[5] == "#ff0000" and colours[1] == "#ff9999"  # 0.8 / 2.0 of the global max
    legend = "".join(glob.text)
    assert "normalisation: global" in legend and "+2" in legend and "-2" in legend
    none = parse(visualize.html_fragment([["a", "b"]], [[0.5, -3.0]], normalization="none"))
    colours = [re.search(r"background:(#[0-9a-f]{6})", s["style"]).group(1) for s in token_spans(none)]
    assert colours == ["#ff8080", "#0000ff"]  # as given, clipped at -1
    assert "normalisation: none" in "".join(none.text)
    row = "".join(parse(visualize.html_fragment(ROWS, VALUES)).text)
    assert "normalisation: row" in row and "max|R| 2" in row and "max|R| 0.8" in row
    single = "".join(parse(visualize.html_fragment([["a", "b"]], [[0.5, -0.25]])).text)
    assert "-0.5" in single and "+0.5" in single


def test_nan_cells_are_grey_and_labelled_masked():
    checker = parse(visualize.html_fragment([["a", "b"]], [[1.0, float("nan")]]))
    spans = token_spans(checker)
    assert "masked" in spans[1]["class"] and "R = masked" in spans[1]["title"]


def test_normalize_modes():
    scaled, scales = visualize.normalize([[1.0, -4.0], [0.5, 0.25], [0.0, 0.0]], "row")
    assert scales == [4.0, 0.5, 1.0]
    np.testing.assert_allclose(scaled[0], [0.25, -1.0])
    np.testing.assert_allclose(scaled[1], [1.0, 0.5])
    scaled, scales = visualize.normalize([[1.0, -4.0], [0.5, 0.25]], "global")
    assert scales == [4.0, 4.0]
    np.testing.assert_allclose(scaled[1], [0.125, 0.0625])
    scaled, _ = visualize.normalize([[1.0, -4.0]], "none")
    np.testing.assert_allclose(scaled[0], [1.0, -1.0])
    with pytest.raises(ValueError, match="normalization"):
        visualize.normalize([[1.0]], "max")


def test_display_token():
    assert visualize.display_token("\u0120the") == " the"
    assert visualize.display_token("\u2581the") == " the"
    assert visualize.display_token("\u010a") == "\u21b5"
    assert visualize.display_token("a\tb") == "a\u2192b"
    assert visualize.display_token(" ") == "\u2423"
    assert visualize.display_token("") == "\u2205"


@pytest.mark.parametrize(
    "call",
    [
        lambda: visualize.html_document([["a", "b"]], [[1.0]]),
        lambda: visualize.html_document([["a"], ["b"]], [[1.0]]),
        lambda: visualize.html_fragment(["a", "b"], [[1.0, 2.0]]),
        lambda: visualize.html_fragment([["a"]], [[1.0]], row_labels=["x", "y"]),
        lambda: visualize.plot_sequence(["a", "b"], [1.0]),
        lambda: visualize.plot_sequence(["a"], [1.0], wrap=0),
        lambda: visualize.plot_matrix(np.zeros((2, 3)), row_labels=["a"], col_labels=["a", "b", "c"]),
        lambda: visualize.plot_matrix(np.zeros(3), row_labels=["a"], col_labels=["a", "b", "c"]),
        lambda: visualize.generation_rows(["a", "b", "c"], np.zeros((2, 3)), 2),
        lambda: visualize.generation_rows(["a", "b"], np.zeros((2, 3)), 1),
    ],
)
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()


MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF-"}


def check_saved(fig, tmp_path, stem):
    for fmt in ("png", "pdf", "svg"):
        path = tmp_path / f"{stem}.{fmt}"
        fig.savefig(path, dpi=100)
        data = path.read_bytes()
        assert len(data) > 1000
        if fmt == "svg":
            assert b"<svg" in data[:2000]
        else:
            assert data.startswith(MAGIC[fmt])


def test_plot_sequence_saves_png_pdf_svg(tmp_path):
    tokens = ["\u0120the", "\u0120movie", " $x$", "\u010a", "<s>"] * 9
    values = np.linspace(-1.0, 2.0, len(tokens))
    fig = visualize.plot_sequence(tokens, values, title="a title", wrap=10)
    ax = fig.axes[0]
    shown = [t.get_text() for t in ax.texts]
    assert shown[:5] == [" the", " movie", " $x$", "\u21b5", "<s>"] and len(shown) == 45
    assert len({round(t.get_position()[1], 3) for t in ax.texts}) == 5  # 45 tokens, 10 a line
    colour_bar = fig.axes[1]
    assert "max|R| of the row" in colour_bar.get_xlabel()
    # The largest value is full red, the most negative half blue (row normalisation by 2.0).
    faces = [p.get_facecolor() for p in ax.patches]
    np.testing.assert_allclose(faces[-1][:3], (1.0, 0.0, 0.0), atol=0.01)
    np.testing.assert_allclose(faces[0][:3], (0.5, 0.5, 1.0), atol=0.01)
    check_saved(fig, tmp_path, "seq")


def test_plot_sequence_into_given_axes(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3))
    axes = fig.subplots(2, 1)
    assert visualize.plot_sequence(["a", "b"], [1.0, -1.0], ax=axes[1], normalization="none") is fig
    assert [t.get_text() for t in axes[1].texts] == ["a", "b"] and not axes[0].texts


def test_plot_matrix_masks_invisible_cells(tmp_path):
    prompt, new = 3, 4
    matrix = np.random.default_rng(0).normal(size=(new, prompt + new))
    for i in range(new):
        matrix[i, prompt + i :] = np.nan
    cols = ["a", "b", "c", "d", "e", "f", "g"]
    fig = visualize.plot_matrix(matrix, row_labels=cols[3:], col_labels=cols, title="gen", normalization="global")
    ax = fig.axes[0]
    image = ax.images[0]
    grid = image.get_array()
    assert grid.mask.sum() == sum(new - i for i in range(new))
    assert np.isclose(np.abs(grid).max(), 1.0)
    np.testing.assert_allclose(image.cmap.get_bad()[:3], (0.851, 0.851, 0.851), atol=0.01)
    assert [t.get_text() for t in ax.get_xticklabels()] == cols
    assert [t.get_text() for t in ax.get_yticklabels()] == cols[3:]
    assert "max|R| = " in fig.axes[1].get_ylabel()
    # A numpy masked array works the same.
    masked = np.ma.masked_invalid(matrix)
    again = visualize.plot_matrix(masked, row_labels=cols[3:], col_labels=cols)
    assert again.axes[0].images[0].get_array().mask.sum() == grid.mask.sum()
    check_saved(fig, tmp_path, "matrix")


def test_generation_rows():
    matrix = np.array([[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]])
    rows, values, labels = visualize.generation_rows(["p", "g1", "g2"], matrix, 1)
    assert rows == [["p"], ["p", "g1"]] and values == [[1.0], [3.0, 4.0]] and labels == ["g1", "g2"]


def test_plots_name_the_extra_when_matplotlib_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"mambalrp\[viz\]"):
        visualize.plot_sequence(["a"], [1.0])
    # The HTML needs no matplotlib.
    assert "tok" in visualize.html_fragment([["a"]], [[1.0]])

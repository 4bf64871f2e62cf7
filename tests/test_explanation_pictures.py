"""The Explanation's pictures: HTML page and notebook fragment, matplotlib figures, show()."""

from __future__ import annotations

import math
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

import mambalrp
from mambalrp import visualize
from mambalrp.testing import tiny_mamba

pytest.importorskip("matplotlib")

TOKENS = ["<s>", "the", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat", "."]


@pytest.fixture(scope="module")
def model():
    return tiny_mamba(0)


@pytest.fixture(scope="module")
def output(model):
    ids = torch.tensor([[3, 5, 7, 9, 11, 13, 15, 17], [0, 0, 4, 6, 8, 10, 12, 14]])
    mask = torch.tensor([[1] * 8, [0, 0] + [1] * 6])
    exp = mambalrp.explain(model, ids, attention_mask=mask)
    exp.tokens = [list(TOKENS), ["<pad>", "<pad>"] + TOKENS[2:]]
    return exp


@pytest.fixture(scope="module")
def generation(model):
    prompt = torch.tensor([[3, 5, 7, 9]])
    return mambalrp.explain_generation(model, prompt, max_new_tokens=4, progress=False)


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.titles, self.texts, self._in = [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and "tok" in (attrs.get("class") or ""):
            self.titles.append(attrs.get("title"))
            self._in = True

    def handle_endtag(self, tag):
        self._in = False

    def handle_data(self, data):
        if self._in:
            self.texts.append(data)


def test_html_page_shows_every_real_token_with_its_value_and_skips_padding(output, tmp_path):
    page = output.to_html(tmp_path / "sub" / "out.html", normalization="global", title="two rows")
    assert (tmp_path / "sub" / "out.html").read_text(encoding="utf-8") == page
    rows, values, labels = output.heatmap_rows()
    assert page == visualize.html_document(
        rows, values, row_labels=labels, title="two rows", normalization="global", caption=output._caption()
    )
    cells = _Cells()
    cells.feed(page)
    assert len(cells.titles) == 8 + 6  # the two padding tokens of row 1 are not drawn
    for title, value in zip(cells.titles, values[0] + values[1]):
        assert title.split("R = ")[1].split(" ")[0] == visualize._fmt(value)
    assert "<pad>" not in page and "normalisation: <strong>global</strong>" in page
    assert values[1] == output.relevance[1, 2:].tolist()


def test_notebook_fragment_is_the_page_body(output):
    fragment = output._repr_html_()
    assert fragment.startswith('<div class="mlrp">') and "<html" not in fragment
    assert fragment in output.to_html()


def test_generation_html_rows_show_only_what_each_step_saw(generation):
    rows, values, labels = generation.heatmap_rows()
    prompt = generation.prompt_length
    assert [len(r) for r in rows] == [prompt + i for i in range(len(generation))]
    for i, vals in enumerate(values):
        np.testing.assert_array_equal(vals, generation.relevance[i, : prompt + i].numpy())
        assert labels[i] == f"step {i + 1}: {int(generation.target[i])}"
    # A slice keeps each row's own step number.
    assert generation[2:].heatmap_rows()[2] == labels[2:]


def test_generation_figure_masks_unseen_positions(generation, tmp_path):
    fig = generation.plot(normalization="none")
    data = fig.axes[0].images[0].get_array()
    prompt = generation.prompt_length
    for i in range(len(generation)):
        seen = np.ma.getmaskarray(data[i]) | np.isnan(np.ma.getdata(data[i]))
        assert not seen[: prompt + i].any() and seen[prompt + i :].all()
    for suffix, magic in ((".png", b"\x89PNG"), (".pdf", b"%PDF"), (".svg", b"<?xml")):
        fig.savefig(tmp_path / f"g{suffix}")
        assert (tmp_path / f"g{suffix}").read_bytes().startswith(magic)


def test_output_figures_one_axes_per_row_and_single_rows(output, tmp_path):
    fig = output.plot(title="both")
    assert len([ax for ax in fig.axes if ax.get_title().startswith("target")]) == 2
    fig.savefig(tmp_path / "both.png")
    one = output[1].plot()
    texts = [t.get_text() for t in one.axes[0].texts]
    assert texts == [visualize.display_token(t) for t in TOKENS[2:]]
    with pytest.raises(ValueError, match="one row"):
        import matplotlib.figure

        output.plot(ax=matplotlib.figure.Figure().add_subplot())


def test_show_prints_plain_text_off_a_terminal(output, capsys):
    output.show()
    out = capsys.readouterr().out
    assert "\033[" not in out and out.strip() == output.render(color=False).strip()
    assert math.isclose(float(out.split("logit ")[1].split(" ")[0]), output.logit[0].item(), abs_tol=1e-4)

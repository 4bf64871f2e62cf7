"""docs/howto-figures.md, executed literally: every python block of the page, in order.

The blocks run in an empty directory; the test then checks the files they wrote. The generation
block runs where ``mambalrp.explain_generation`` exists. IPython is replaced by a recorder when it
is not installed, so the notebook block runs too.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import mambalrp

PAGE = Path(__file__).resolve().parents[1] / "docs" / "howto-figures.md"
NEEDS_GENERATION = "# needs mambalrp.explain_generation"


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.fixture
def shown(monkeypatch):
    """What the notebook block displays (a stand-in for ``IPython.display``)."""
    seen: list = []
    try:
        import IPython.display as real  # noqa: F401
    except ImportError:
        display_module = types.ModuleType("IPython.display")

        class HTML:
            def __init__(self, data):
                self.data = data

        display_module.HTML = HTML
        display_module.display = lambda *objects: seen.extend(objects)
        package = types.ModuleType("IPython")
        package.display = display_module
        package.version_info = (8, 24, 0)  # matplotlib asks IPython's version before drawing
        monkeypatch.setitem(sys.modules, "IPython", package)
        monkeypatch.setitem(sys.modules, "IPython.display", display_module)
    return seen


def test_page_runs_and_writes_its_figures(tmp_path, monkeypatch, shown):
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "howto"}
    blocks = code_blocks(PAGE.read_text())
    assert len(blocks) == 7 and sum(NEEDS_GENERATION in b for b in blocks) == 1
    generation = hasattr(mambalrp, "explain_generation")
    for i, block in enumerate(blocks):
        if NEEDS_GENERATION in block and not generation:
            continue
        exec(compile(block, f"{PAGE.name}[block {i}]", "exec"), ns)

    # Section 0: the explanation's own figure and page.
    assert (tmp_path / "quick.png").read_bytes().startswith(b"\x89PNG") and "witty" in (tmp_path / "quick.html").read_text()
    # The PNG of section 1: 300 dpi of the figure's size.
    png = tmp_path / "sentence.png"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    height, width = matplotlib.image.imread(png).shape[:2]
    assert width > 600 and height > 150
    for name in ("sentence.pdf", "column.pdf"):
        assert (tmp_path / name).read_bytes().startswith(b"%PDF")
    assert b"<svg" in (tmp_path / "sentence.svg").read_bytes()[:1000]
    # The column figure is the width the page asks for.
    col = matplotlib.image.imread(tmp_path / "column.png")
    assert col.shape[1] == round(3.3 * 300)
    # Conservation, as section 3 says: the shares add up to one minus the biases' part.
    exp = ns["exp"]
    assert abs(sum(ns["share"]) - (1 - float(exp.conservation_delta[0] / exp.logit[0]))) < 1e-4
    page = (tmp_path / "sentence.html").read_text()
    assert page.count('class="tok"') == 2 * len(ns["tokens"]) and "normalisation: <strong>global</strong>" in page
    # The notebook block displayed the fragment and the figure.
    if shown:
        assert " witty" in shown[0].data and shown[1] is ns["fig"]
    if generation:
        assert (tmp_path / "generation.png").read_bytes().startswith(b"\x89PNG")
        grid = ns["fig"].axes[0].images[0].get_array()
        assert grid.mask.sum() == sum(range(1, grid.shape[0] + 1))
    assert np.isfinite(ns["relevance"]).all()

"""Pictures of relevance: self-contained HTML pages and matplotlib figures.

Every function here takes plain data (lists of token strings and numbers, or numpy arrays) and
knows nothing of :class:`~mambalrp.explanation.Explanation`, whose ``to_html``/``plot`` methods
wrap them. Colours follow one diverging scale everywhere: red for relevance that speaks for the
explained output, blue for relevance against it, white for none, symmetric around zero.

Normalisation (the ``normalization`` argument) decides what full colour means:

* ``"row"``: each row is divided by its largest absolute value (rows are compared by pattern);
* ``"global"``: every row is divided by the largest absolute value of all rows (magnitudes
  are comparable across rows);
* ``"none"``: values are drawn as given, full colour at -1 and +1 (values beyond are clipped).

The HTML needs no network and no JavaScript: colours are inline styles and each token's value
shows on hover (its ``title``). matplotlib is imported only inside the plot functions (install
the ``viz`` extra: ``pip install "mambalrp[viz]"``).

Example:
    >>> from mambalrp import visualize
    >>> page = visualize.html_document([["a", " good", " film"]], [[0.1, 0.8, -0.2]], title="demo")
    >>> fig = visualize.plot_sequence(["a", " good", " film"], [0.1, 0.8, -0.2])
    >>> fig.savefig("demo.pdf")
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "NORMALIZATIONS",
    "color_of",
    "display_token",
    "generation_rows",
    "html_document",
    "html_fragment",
    "normalize",
    "plot_matrix",
    "plot_sequence",
]

NORMALIZATIONS = ("row", "global", "none")

_DESCRIPTION = {
    "row": "each row divided by its largest |relevance|",
    "global": "all rows divided by the largest |relevance| of any row",
    "none": "values as given, full colour at \u00b11",
}
_CMAP = "bwr"  # blue - white - red, the same scale as the HTML and terminal colours
_MASKED = "#d9d9d9"


def display_token(token: str) -> str:
    """Return a token as it should be shown: tokenizer space markers as spaces, whitespace visible.

    The byte-level BPE markers ``\u0120`` (space) and ``\u010a`` (newline) and SentencePiece's
    ``\u2581`` become what they stand for; then a newline shows as ``\u21b5``, a tab as ``\u2192``,
    a carriage return as ``\u240d``, and a token made only of spaces as one ``\u2423`` per space.
    The empty token shows as ``\u2205``.

    Args:
        token: A token string as the tokenizer returns it.

    Returns:
        The string to draw.
    """
    text = token.replace("\u0120", " ").replace("\u010a", "\n").replace("\u2581", " ")
    if text == "":
        return "\u2205"
    if text.strip(" ") == "":
        return "\u2423" * len(text)
    return text.replace("\r", "\u240d").replace("\n", "\u21b5").replace("\t", "\u2192")


def normalize(values: Sequence[Sequence[float]] | np.ndarray, normalization: str = "row") -> tuple[list[np.ndarray], list[float]]:
    """Scale rows of values into ``[-1, 1]`` for colouring.

    Args:
        values: Rows of numbers (rows may differ in length); NaN marks a cell to leave out.
        normalization: ``"row"``, ``"global"`` or ``"none"`` (see the module docstring).

    Returns:
        ``(scaled, scales)``: the rows divided by their scale and clipped to ``[-1, 1]`` (NaN
        stays NaN), and each row's scale (1.0 for ``"none"``, and for a row that is all zero).

    Raises:
        ValueError: Unknown ``normalization``.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}; got {normalization!r}")
    rows = [np.asarray(r, dtype=np.float64).reshape(-1) for r in values]
    peaks = [float(np.nanmax(np.abs(r))) if r.size and not np.isnan(r).all() else 0.0 for r in rows]
    if normalization == "row":
        scales = [p if p > 0 else 1.0 for p in peaks]
    elif normalization == "global":
        top = max(peaks, default=0.0)
        scales = [top if top > 0 else 1.0] * len(rows)
    else:
        scales = [1.0] * len(rows)
    scaled = [np.clip(r / s, -1.0, 1.0) for r, s in zip(rows, scales)]
    return scaled, scales


def color_of(value: float) -> str:
    """Return the CSS colour of a normalised value in ``[-1, 1]`` (red for, blue against, white at 0).

    Args:
        value: Normalised relevance; values beyond ``[-1, 1]`` are clipped, NaN is grey.

    Returns:
        A ``#rrggbb`` string.
    """
    if math.isnan(value):
        return _MASKED
    v = max(-1.0, min(1.0, float(value)))
    fade = round(255 * (1 - abs(v)))
    r, g, b = (255, fade, fade) if v >= 0 else (fade, fade, 255)
    return f"#{r:02x}{g:02x}{b:02x}"


def _check_rows(rows: Sequence[Sequence[str]], values: Sequence[Sequence[float]], row_labels) -> None:
    if isinstance(rows, str) or (len(rows) and isinstance(rows[0], str)):
        raise ValueError("rows must be a list of token lists (one per row); wrap a single sequence in a list")
    if len(rows) != len(values):
        raise ValueError(f"{len(rows)} token rows but {len(values)} value rows")
    for i, (toks, vals) in enumerate(zip(rows, values)):
        if len(toks) != len(np.asarray(vals).reshape(-1)):
            raise ValueError(f"row {i}: {len(toks)} tokens but {len(np.asarray(vals).reshape(-1))} values")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")


def _fmt(x: float) -> str:
    return "masked" if math.isnan(x) else f"{x:+.4g}"


_STYLE = """
.mlrp { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #111; max-width: 60em; }
.mlrp h1 { font-size: 1.25em; margin: 0 0 .4em 0; }
.mlrp .row { margin: .35em 0 .6em 0; line-height: 1.9; }
.mlrp .label { font-size: .85em; color: #444; margin-top: .6em; }
.mlrp .tok { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; white-space: pre; padding: .12em .08em;
  border-radius: .2em; border: 1px solid #eee; margin: 0 1px; }
.mlrp .tok.masked { background: #d9d9d9; color: #777; }
.mlrp .legend { display: flex; align-items: center; gap: .5em; font-size: .85em; margin: .6em 0; }
.mlrp .bar { width: 16em; height: .9em; border: 1px solid #999;
  background: linear-gradient(to right, #0000ff, #ffffff, #ff0000); }
.mlrp .caption { font-size: .85em; color: #444; margin-top: .8em; }
"""


def generation_rows(
    tokens: Sequence[str], matrix, prompt_len: int
) -> tuple[list[list[str]], list[list[float]], list[str]]:
    """Split a generation's relevance matrix into the rows a heatmap shows.

    Row ``i`` explains generated token ``i``, which saw the prompt and the ``i`` tokens generated
    before it; cells beyond that are dropped.

    Args:
        tokens: Prompt and generated tokens (``prompt_len + rows`` strings).
        matrix: ``(rows, prompt_len + rows)`` relevance (nested lists or an array).
        prompt_len: Number of prompt tokens.

    Returns:
        ``(rows, values, labels)`` for :func:`html_document`: the visible tokens of each step,
        their relevance, and the generated token each row explains.

    Raises:
        ValueError: The shapes do not fit together.
    """
    data = np.asarray(matrix, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != prompt_len + data.shape[0] or len(tokens) != data.shape[1]:
        raise ValueError(
            f"a generation of {data.shape[0] if data.ndim == 2 else '?'} tokens after a prompt of {prompt_len} needs a "
            f"(rows, prompt_len + rows) matrix and as many tokens as columns; got {data.shape} and {len(tokens)} tokens"
        )
    rows = [list(tokens[: prompt_len + i]) for i in range(data.shape[0])]
    values = [data[i, : prompt_len + i].tolist() for i in range(data.shape[0])]
    labels = [str(tokens[prompt_len + i]) for i in range(data.shape[0])]
    return rows, values, labels


def html_fragment(
    rows: Sequence[Sequence[str]],
    values: Sequence[Sequence[float]],
    *,
    row_labels: Sequence[str] | None = None,
    title: str = "",
    normalization: str = "row",
    caption: str = "",
) -> str:
    """Return the embeddable HTML of a relevance heatmap (a ``<div>`` with its own ``<style>``).

    This is what a notebook shows (``_repr_html_``); :func:`html_document` wraps it in a page.

    Args:
        rows: One list of token strings per row (e.g. one per explained output, or per
            generated token).
        values: The relevance of each token, one list per row, same lengths as ``rows``; NaN
            marks a cell that does not apply (drawn grey).
        row_labels: A heading per row (e.g. the explained target), or ``None``.
        title: Heading of the whole figure (escaped).
        normalization: ``"row"``, ``"global"`` or ``"none"``: what full colour means; named in
            the legend.
        caption: Text under the heatmap (escaped).

    Returns:
        The HTML text.

    Raises:
        ValueError: Rows and values differ in number or length, or unknown ``normalization``.
    """
    _check_rows(rows, values, row_labels)
    scaled, scales = normalize(values, normalization)
    out = ['<div class="mlrp">', f"<style>{_STYLE}</style>"]
    if title:
        out.append(f"<h1>{html.escape(title)}</h1>")
    # Legend: the colour bar with its numeric ends and the normalisation used.
    if normalization == "global":
        lo, hi = f"{-scales[0]:+.4g}" if scales else "-1", f"{scales[0]:+.4g}" if scales else "+1"
    elif normalization == "row" and len(scales) == 1:
        lo, hi = f"{-scales[0]:+.4g}", f"{scales[0]:+.4g}"
    elif normalization == "row":
        lo, hi = "\u2212max|R|", "+max|R|"  # each row's own, shown in its label
    else:
        lo, hi = "\u22121", "+1"
    out.append(
        '<div class="legend">'
        f'<span class="end">{html.escape(lo)}</span><span class="bar" title="blue: against, red: for"></span>'
        f'<span class="end">{html.escape(hi)}</span>'
        f'<span class="norm">normalisation: <strong>{normalization}</strong> ({html.escape(_DESCRIPTION[normalization])}); '
        "red: for the output, blue: against; hover a token for its value</span></div>"
    )
    for i, (toks, raw, vals) in enumerate(zip(rows, values, scaled)):
        raw = np.asarray(raw, dtype=np.float64).reshape(-1)
        label = row_labels[i] if row_labels is not None else ""
        total = float(np.nansum(raw))
        info = f"sum {total:+.4g}" + (f", max|R| {scales[i]:.4g}" if normalization == "row" else "")
        if label or len(rows) > 1:
            out.append(f'<div class="label">{html.escape(str(label))} <span class="sum">({info})</span></div>')
        cells = []
        for tok, r, v in zip(toks, raw, vals):
            shown = display_token(str(tok))
            tip = f"{tok!r}: R = {_fmt(float(r))}" + ("" if math.isnan(r) else f" (normalised {float(v):+.3f})")
            cls = "tok masked" if math.isnan(r) else "tok"
            ink = ";color:#fff" if not math.isnan(r) and v < -0.6 else ""
            style = "" if math.isnan(r) else f' style="background:{color_of(float(v))}{ink}"'
            cells.append(f'<span class="{cls}"{style} title="{html.escape(tip, quote=True)}">{html.escape(shown)}</span>')
            if "\n" in str(tok).replace("\u010a", "\n"):
                cells.append("<br>")
        out.append(f'<div class="row">{"".join(cells)}</div>')
    if caption:
        out.append(f'<div class="caption">{html.escape(caption)}</div>')
    out.append("</div>")
    return "\n".join(out)


def html_document(
    rows: Sequence[Sequence[str]],
    values: Sequence[Sequence[float]],
    *,
    row_labels: Sequence[str] | None = None,
    title: str = "",
    normalization: str = "row",
    caption: str = "",
) -> str:
    """Return one self-contained HTML page (no network, no scripts) showing a relevance heatmap.

    Arguments as for :func:`html_fragment`; write the result to a ``.html`` file and open it in
    any browser.

    Returns:
        The page's text.
    """
    body = html_fragment(rows, values, row_labels=row_labels, title=title, normalization=normalization, caption=caption)
    head_title = html.escape(title or "mambalrp relevance")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{head_title}</title>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - the viz extra is installed in the tests
        raise ImportError(
            'mambalrp.visualize needs matplotlib for figures: pip install "mambalrp[viz]"'
        ) from error
    return Figure


def _colorbar(fig, mappable, ax, normalization: str, scale: float | None, orientation: str = "vertical") -> Any:
    label = {
        "row": "relevance / max|R| of the row",
        "global": "relevance / max|R|",
        "none": "relevance",
    }[normalization]
    if orientation == "horizontal":
        bar = fig.colorbar(mappable, ax=ax, orientation=orientation, fraction=0.12, shrink=0.5, aspect=40, pad=0.03)
    else:
        bar = fig.colorbar(mappable, ax=ax, orientation=orientation, fraction=0.05, pad=0.02)
    if scale is not None and normalization != "none":
        label += f" (max|R| = {scale:.3g})"
    bar.set_ticks([-1.0, -0.5, 0.0, 0.5, 1.0])
    bar.set_label(label, fontsize="small")
    bar.ax.tick_params(labelsize="small")
    return bar


def plot_sequence(
    tokens: Sequence[str],
    values: Sequence[float],
    *,
    ax=None,
    normalization: str = "row",
    title: str = "",
    wrap: int = 20,
    line_width: float | None = None,
):
    """Draw one token sequence as a text heatmap: each token a coloured cell, lines wrapped.

    Args:
        tokens: The token strings (shown through :func:`display_token`).
        values: Their relevance (same length).
        ax: A matplotlib ``Axes`` to draw into; default: a new figure sized to the text.
        normalization: ``"row"``, ``"global"`` (the same for one sequence) or ``"none"``.
        title: Axes title.
        wrap: Tokens per line.
        line_width: Width of a line in characters to lay the cells out against (default: this
            sequence's longest line); give several rows the same value to draw them at one scale.

    Returns:
        The ``matplotlib.figure.Figure`` (save it with ``fig.savefig("x.pdf")``: PNG, PDF, SVG).

    Raises:
        ValueError: ``tokens`` and ``values`` differ in length, ``wrap < 1`` or unknown
            ``normalization``.
        ImportError: matplotlib is not installed.
    """
    Figure = _matplotlib()
    import matplotlib
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    vals = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(tokens) != vals.size:
        raise ValueError(f"{len(tokens)} tokens but {vals.size} values")
    if wrap < 1:
        raise ValueError(f"wrap must be at least 1; got {wrap}")
    (scaled,), (scale,) = normalize([vals], normalization)
    shown = [display_token(str(t)) for t in tokens]
    lines = [list(range(i, min(i + wrap, len(shown)))) for i in range(0, max(len(shown), 1), wrap)]
    widths = [max(len(s), 1) + 1.0 for s in shown]  # in character units, one for the gap
    longest = max((sum(widths[j] for j in line) for line in lines), default=1.0)
    line_width = max(longest, line_width or 0.0)
    base = float(matplotlib.rcParams["font.size"])
    if ax is None:  # about 0.6 em a character, a little room around each
        fig = Figure(figsize=(min(max(2.5, 0.011 * base * line_width + 0.4), 16.0), 1.25 + 0.032 * base * len(lines)), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    # The cells scale with the axes, the text does not: shrink the font until a character fits.
    unit_pt = ax.get_position().width * fig.get_size_inches()[0] * 72.0 / line_width
    fontsize = max(3.0, min(base, 0.85 * unit_pt / 0.6))
    cmap = colormaps[_CMAP]
    for row, line in enumerate(lines):
        x = 0.0
        for j in line:
            v = scaled[j]
            face = _MASKED if np.isnan(v) else cmap(0.5 + 0.5 * v)
            ax.add_patch(Rectangle((x, -row - 0.85), widths[j] - 0.25, 0.7, facecolor=face, edgecolor="none"))
            ax.text(
                x + (widths[j] - 0.25) / 2, -row - 0.5, shown[j], ha="center", va="center",
                family="monospace", fontsize=fontsize, parse_math=False,
                color="white" if not np.isnan(v) and v < -0.6 else "black",
            )
            x += widths[j]
    ax.set_xlim(-0.2, line_width)
    ax.set_ylim(-len(lines) - 0.05, 0.05)
    ax.set_axis_off()
    if title:
        ax.set_title(title, parse_math=False)
    mappable = ScalarMappable(norm=Normalize(-1.0, 1.0), cmap=cmap)
    _colorbar(fig, mappable, ax, normalization, scale, orientation="horizontal")
    return fig


def plot_matrix(
    matrix,
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    ax=None,
    title: str = "",
    normalization: str = "row",
):
    """Draw a generation's relevance matrix: one row per generated token, one column per token.

    Args:
        matrix: ``(rows, cols)`` array-like (a numpy array, a masked array, nested lists, or a
            CPU tensor); NaN or masked cells (positions a row cannot see) are drawn grey.
        row_labels: One label per row (the generated tokens), shown through
            :func:`display_token`.
        col_labels: One label per column (prompt and generated tokens).
        ax: A matplotlib ``Axes`` to draw into; default: a new figure sized to the matrix.
        title: Axes title.
        normalization: ``"row"``, ``"global"`` or ``"none"``.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ValueError: The matrix is not 2-D, the labels do not fit its shape, or unknown
            ``normalization``.
        ImportError: matplotlib is not installed.
    """
    Figure = _matplotlib()
    from matplotlib import colormaps

    data = np.ma.filled(np.ma.asarray(matrix, dtype=np.float64), np.nan) if np.ma.isMaskedArray(matrix) else np.asarray(
        matrix, dtype=np.float64
    )
    if data.ndim != 2:
        raise ValueError(f"matrix must be 2-D; got shape {data.shape}")
    if len(row_labels) != data.shape[0] or len(col_labels) != data.shape[1]:
        raise ValueError(
            f"matrix of shape {data.shape} needs {data.shape[0]} row labels and {data.shape[1]} column labels; "
            f"got {len(row_labels)} and {len(col_labels)}"
        )
    scaled, scales = normalize(list(data), normalization)
    grid = np.ma.masked_invalid(np.stack(scaled) if scaled else data)
    if ax is None:
        rows, cols = data.shape
        fig = Figure(figsize=(min(max(3.0, 0.28 * cols + 2.2), 16.0), min(max(2.2, 0.28 * rows + 1.6), 16.0)), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    cmap = colormaps[_CMAP].with_extremes(bad=_MASKED)
    image = ax.imshow(grid, cmap=cmap, vmin=-1.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(data.shape[1]), [display_token(str(c)) for c in col_labels], rotation=90, family="monospace", fontsize=8)
    ax.set_yticks(range(data.shape[0]), [display_token(str(r)) for r in row_labels], family="monospace", fontsize=8)
    for label in ax.get_xticklabels() + ax.get_yticklabels():
        label.set_parse_math(False)
    ax.set_xlabel("input and generated tokens")
    ax.set_ylabel("generated token")
    ax.tick_params(length=0)
    if title:
        ax.set_title(title, parse_math=False)
    _colorbar(fig, image, ax, normalization, scales[0] if scales and normalization == "global" else None)
    return fig

"""The result of :func:`mambalrp.explain` and :func:`mambalrp.explain_generation`: one type for
single outputs and for generations, with indexing, export, saving and terminal rendering.

Two kinds share the type (:attr:`Explanation.kind`):

* ``"output"`` (from ``explain``): one explained output per batch row; ``relevance`` is
  ``(batch, seq)`` and column ``j`` is token ``j`` of that row.
* ``"generation"`` (from ``explain_generation``): one row per generated token; ``relevance`` is
  ``(new_tokens, prompt_len + new_tokens)`` over the single sequence ``input_ids[0]`` (prompt then
  generated tokens); row ``i`` explains generated token ``i``, and its entries at positions the
  step cannot see (``>= prompt_len + i``) are exactly 0.

After :meth:`Explanation.aggregate` the columns are groups of tokens (words or given spans):
:attr:`Explanation.spans` holds each column's ``[start, end)`` token range, ``tokens`` the group
texts, while ``input_ids`` and ``attention_mask`` stay token-level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

KINDS = ("output", "generation")


@dataclass
class Explanation:
    """Per-token relevance of explained outputs: one per batch row, or one per generated token.

    Attributes:
        relevance: ``(rows, columns)`` float32; each row sums (up to biases) to its :attr:`logit`.
            Rows are batch items (``kind="output"``) or generated tokens (``kind="generation"``);
            columns are the tokens of ``input_ids`` (or groups of them after :meth:`aggregate`).
        logit: ``(rows,)`` float32, the explained value (a logit, or a logit difference for a
            contrastive target).
        target: ``(rows,)`` class/token ids explained, or ``None`` when a callable was explained.
            For a generation: the generated token of each row.
        position: ``(rows,)`` sequence position explained, or ``None`` for sequence-level outputs.
            For a generation, row ``i``'s position is ``prompt_len - 1 + i``.
        input_ids: ``(batch, seq)`` the explained ids; for a generation ``(1, prompt_len +
            new_tokens)``: the prompt followed by the generated tokens.
        attention_mask: ``(batch, seq)`` or ``None``.
        rules: Name of the rule set used.
        hidden_relevance: ``(batch, seq, d_model)`` per-dimension relevance if requested.
        verified: Whether the library verified, before returning it, that the model under the
            rules computes the model's outputs and leaks no relevance (``explain(verify=False)``
            skips that; see :mod:`mambalrp.verification`).
        tokens: Token strings when a tokenizer was given: one list per row of ``input_ids`` (for
            a generation a single list, prompt then generated tokens); after :meth:`aggregate`
            the text of each group.
        kind: ``"output"`` or ``"generation"``.
        generated_ids: ``(new_tokens,)`` the generated (or given) continuation, for a generation.
        step_scores: For a generation, ``{"probability": (rows,), "entropy": (rows,)}``: the
            model's probability of each generated token and the entropy (nats) of its next-token
            distribution at that step (softmax of the logits, temperature 1).
        contrast: ``(rows,)`` alternative token ids for a contrastive generation (the explained
            value is ``logit[token] - logit[alternative]``), else ``None``.
        generation: How the continuation was obtained: ``{"mode": "greedy" | "sampled" |
            "teacher-forced", "temperature", "top_k", "seed"}``, for a generation.
        spans: After :meth:`aggregate`: per row of ``input_ids``, the ``[start, end)`` token range
            of each column; ``None`` when columns are tokens.
    """

    relevance: torch.Tensor
    logit: torch.Tensor
    target: torch.Tensor | None
    position: torch.Tensor | None
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    rules: str
    hidden_relevance: torch.Tensor | None = None
    verified: bool = False
    tokens: list[list[str]] | None = None
    kind: str = "output"
    generated_ids: torch.Tensor | None = None
    step_scores: dict[str, torch.Tensor] | None = None
    contrast: torch.Tensor | None = None
    generation: dict[str, Any] | None = None
    spans: list[list[tuple[int, int]]] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}; got {self.kind!r}")

    # ----------------------------------------------------------------------------------- shape

    @property
    def conservation_delta(self) -> torch.Tensor:
        """``logit - relevance.sum(-1)``: relevance absorbed by biases (zero without biases)."""
        return self.logit - self.relevance.sum(-1)

    @property
    def prompt_length(self) -> int | None:
        """Number of prompt tokens of a generation (``None`` for ``kind="output"``)."""
        if self.kind != "generation" or self.generated_ids is None:
            return None
        return int(self.input_ids.shape[1] - self.generated_ids.shape[0])

    def __len__(self) -> int:
        """Number of rows: batch items, or explained generated tokens."""
        return int(self.relevance.shape[0])

    def __getitem__(self, key: int | slice | Sequence[int] | torch.Tensor) -> Explanation:
        """Rows of the explanation: ``exp[i]`` (one row, kept as a row), ``exp[a:b]``, a list or
        a tensor of row indices (or a boolean mask).

        For ``kind="output"`` rows are batch items (ids, mask and tokens are taken along); for a
        generation rows are generated tokens and the sequence (``input_ids``, ``tokens``,
        ``generated_ids``) stays whole, so ``position`` still locates each row.
        """
        rows = _rows(key, len(self))
        index = torch.tensor(rows, dtype=torch.long)

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index.to(t.device)]

        changes: dict[str, Any] = {
            "relevance": take(self.relevance),
            "logit": take(self.logit),
            "target": take(self.target),
            "position": take(self.position),
            "contrast": take(self.contrast),
            "step_scores": None if self.step_scores is None else {k: take(v) for k, v in self.step_scores.items()},
        }
        if self.kind == "output":
            changes.update(
                input_ids=take(self.input_ids),
                attention_mask=take(self.attention_mask),
                hidden_relevance=take(self.hidden_relevance),
                tokens=None if self.tokens is None else [list(self.tokens[r]) for r in rows],
                spans=None if self.spans is None else [list(self.spans[r]) for r in rows],
            )
        return replace(self, **changes)

    # ----------------------------------------------------------------------------------- export

    def to_numpy(self) -> Any:
        """The relevance as a ``(rows, columns)`` float32 numpy array (a copy)."""
        return self.relevance.detach().cpu().numpy().copy()

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain Python data (lists, floats, ints, strings, ``None``): JSON-ready."""
        from mambalrp.serialization import to_dict

        return to_dict(self)

    def to_pandas(self) -> Any:
        """The relevance in long format, one row per (explained row, column).

        Columns: ``row``; for a generation ``step``, ``generated_id`` and ``generated_token``, for
        an output ``target`` and ``position``; ``logit``; ``index`` (the column: token position,
        or group number after :meth:`aggregate`), ``token_id`` (``-1`` for a group), ``token``
        (``None`` without a tokenizer), ``relevance``. Padding positions and, for a generation,
        positions a step cannot see are left out.

        Raises:
            ImportError: pandas is not installed.
        """
        from mambalrp.serialization import to_pandas

        return to_pandas(self)

    def save(self, path: str | Any) -> None:
        """Write the explanation to one file (``.mlrp``: safetensors with JSON metadata, no pickle;
        the format is described in ``docs/howto-generation.md``). :func:`mambalrp.load` reads it back
        bitwise."""
        from mambalrp.serialization import save

        save(self, path)

    def aggregate(self, groups: str | Sequence[tuple[int, int]] = "words") -> Explanation:
        """Sum relevance over groups of tokens: ``"words"`` (subword tokens to words, from the
        markers of byte-level BPE ``Ġ``, SentencePiece ``▁`` and WordPiece ``##``; needs token
        strings) or explicit ``[start, end)`` token spans (tokens outside every span stay groups of
        their own). Sums keep conservation: each row's total is unchanged.

        Returns:
            A new explanation whose columns are the groups (see :attr:`spans`).
        """
        from mambalrp.aggregate import aggregate

        return aggregate(self, groups)

    # ----------------------------------------------------------------------------------- text

    def render(
        self,
        tokens: Sequence[str] | Sequence[Sequence[str]] | None = None,
        *,
        color: bool = True,
        decode: Callable[[int], str] | None = None,
    ) -> str:
        """Render the relevance as a terminal heatmap (red: for the output, blue: against).

        Args:
            tokens: Token strings of the single row, or one list per row. Defaults to the
                explanation's own :attr:`tokens`, else ``decode`` of each id, or the ids themselves.
            color: Use ANSI 24-bit background colours; if false, print ``token[+0.12]`` text.
            decode: Maps an id to a string when no tokens are known.

        Returns:
            One block per row: a header line and the coloured tokens (for a generation, the
            tokens each step could see).
        """
        seq_rows = self.input_ids.shape[0]
        rows = _rows_of_tokens(tokens, seq_rows) if tokens is not None else self.tokens
        blocks = []
        for i in range(len(self)):
            r = 0 if self.kind == "generation" else i
            columns, keep, toks = self._columns(r, rows[r] if rows is not None else None, decode, i)
            rel = self.relevance[i].tolist()[:columns]
            shown = [(t, v) for t, v, k in zip(toks, rel, keep) if k]
            scale = max((abs(v) for _, v in shown), default=0.0) or 1.0
            head = [f"logit {self.logit[i].item():+.4f}", f"sum(R) {sum(rel):+.4f}"]
            if self.kind == "generation":
                step, name = self._step(i)
                head.insert(0, f"step {step} -> {_clean(name)!r} ({int(self.target[i])})")
                if self.contrast is not None:
                    head.insert(1, f"vs {int(self.contrast[i])}")
            else:
                if self.target is not None:
                    head.insert(0, f"target {int(self.target[i])}")
                if self.position is not None:
                    head.insert(1 if self.target is not None else 0, f"position {int(self.position[i])}")
            head.append(f"rules {self.rules}")
            parts = [_paint(_clean(t), v / scale, color) for t, v in shown]
            blocks.append(" | ".join(head) + "\n" + "".join(parts) + ("\033[0m" if color else ""))
        return "\n\n".join(blocks)

    def _columns(self, r: int, toks: Sequence[str] | None, decode: Callable[[int], str] | None, i: int):
        """``(number of columns, keep flags, strings)`` of row ``i`` over sequence row ``r``."""
        ids = self.input_ids[r].tolist()
        mask = None if self.attention_mask is None else [bool(m) for m in self.attention_mask[r]]
        if self.spans is not None:
            spans = self.spans[r]
            keep = [True] * len(spans) if mask is None else [any(mask[a:b]) for a, b in spans]
            strings = list(toks) if toks is not None else [" ".join(str(t) for t in ids[a:b]) for a, b in spans]
            if len(strings) != len(spans):
                raise ValueError(f"row {r}: {len(strings)} tokens given for {len(spans)} groups")
            count = len(spans)
        else:
            keep = [True] * len(ids) if mask is None else mask
            strings = list(toks) if toks is not None else [decode(t) if decode else str(t) for t in ids]
            if len(strings) != len(ids):
                raise ValueError(f"row {r}: {len(strings)} tokens given for {len(ids)} ids")
            count = len(ids)
        if self.kind == "generation" and self.position is not None:
            visible = int(self.position[i]) + 1
            if self.spans is not None:
                keep = [k and a < visible for k, (a, _) in zip(keep, self.spans[r])]
            else:
                keep = [k and j < visible for j, k in enumerate(keep)]
        return count, keep, strings

    # ----------------------------------------------------------------------------------- pictures

    def heatmap_rows(self, decode: Callable[[int], str] | None = None) -> tuple[list[list[str]], list[list[float]], list[str]]:
        """The rows a heatmap shows: per explained row, the visible tokens (or groups), their
        relevance and a label (the target, or the generated token of the step).

        Padding and, for a generation, the positions a step could not see are left out.
        """
        rows, values, labels = [], [], []
        for i in range(len(self)):
            r = 0 if self.kind == "generation" else i
            toks = self.tokens[r] if self.tokens is not None else None
            columns, keep, strings = self._columns(r, toks, decode, i)
            rel = self.relevance[i].tolist()[:columns]
            rows.append([t for t, k in zip(strings, keep) if k])
            values.append([v for v, k in zip(rel, keep) if k])
            if self.kind == "generation":
                step, name = self._step(i)
                labels.append(f"step {step}: {name}")
            elif self.target is not None:
                labels.append(f"target {int(self.target[i])}")
            else:
                labels.append(f"row {i}")
        return rows, values, labels

    def _step(self, i: int) -> tuple[int, str]:
        """Row ``i`` of a generation: its step number (1 = the first generated token) and the
        generated token's string (its id when no token strings are known)."""
        position = int(self.position[i])
        known = self.tokens is not None and self.spans is None
        name = self.tokens[0][position + 1] if known else str(int(self.target[i]))
        return position - (self.prompt_length or 0) + 2, name

    def _caption(self) -> str:
        delta = self.conservation_delta.abs().max().item() if len(self) else 0.0
        return (
            f"mambalrp, rules {self.rules}, {'verified' if self.verified else 'not verified'}; "
            f"relevance sums to the explained logit up to max |delta| = {delta:.3g} (absorbed by biases)"
        )

    def to_html(
        self,
        path: str | Any | None = None,
        *,
        normalization: str = "row",
        title: str = "",
        decode: Callable[[int], str] | None = None,
    ) -> str:
        """Render the relevance as one self-contained HTML page (no network): a legend with the
        colour scale and the normalisation, the value of each token on hover.

        Args:
            path: Where to write the page; ``None`` only returns it.
            normalization: ``"row"`` (each row by its own max |R|), ``"global"`` or ``"none"``.
            title: Heading of the page.
            decode: Maps an id to a string when the explanation holds no token strings.

        Returns:
            The page's text.
        """
        from mambalrp import visualize

        rows, values, labels = self.heatmap_rows(decode)
        page = visualize.html_document(
            rows, values, row_labels=labels, title=title or self._title(), normalization=normalization, caption=self._caption()
        )
        if path is not None:
            from pathlib import Path

            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(page, encoding="utf-8")
        return page

    def _repr_html_(self) -> str:
        """The heatmap as embeddable HTML, for notebooks."""
        from mambalrp import visualize

        rows, values, labels = self.heatmap_rows()
        return visualize.html_fragment(rows, values, row_labels=labels, title=self._title(), caption=self._caption())

    def _title(self) -> str:
        return "relevance of each generated token" if self.kind == "generation" else "relevance"

    def show(self, *, color: bool | None = None) -> None:
        """Show the explanation: HTML in a notebook (IPython kernel), coloured text in a terminal
        (plain ``token[+0.12]`` text when output is not a terminal or ``color=False``)."""
        import sys

        get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
        kernel = get_ipython is not None and getattr(get_ipython(), "kernel", None) is not None
        if kernel:
            from IPython.display import HTML, display

            display(HTML(self._repr_html_()))
            return
        if color is None:
            color = sys.stdout.isatty()
        print(self.render(color=color))

    def plot(self, *, normalization: str = "row", title: str = "", ax: Any = None, wrap: int = 20) -> Any:
        """Draw the relevance with matplotlib: a matrix for a generation (rows: generated tokens,
        columns: prompt and generated tokens, unseen positions grey), a text heatmap per row
        otherwise. Save it with ``fig.savefig("x.pdf")`` (PNG, PDF, SVG).

        Args:
            normalization: ``"row"``, ``"global"`` or ``"none"``.
            title: Title of the figure.
            ax: Axes to draw into (a generation, or a single row); default: a new figure.
            wrap: Tokens per line of a text heatmap.

        Returns:
            The ``matplotlib.figure.Figure``.
        """
        import numpy as np

        from mambalrp import visualize

        if self.kind == "generation":
            r = 0
            columns, _, strings = self._columns(r, self.tokens[0] if self.tokens is not None else None, None, 0)
            matrix = self.relevance[:, :columns].detach().double().cpu().numpy().copy()
            for i in range(len(self)):
                _, keep, _ = self._columns(r, strings, None, i)
                matrix[i, [j for j, k in enumerate(keep) if not k]] = np.nan
            row_labels = [self._step(i)[1] for i in range(len(self))]
            return visualize.plot_matrix(
                matrix, row_labels=row_labels, col_labels=strings, ax=ax, title=title or self._title(), normalization=normalization
            )
        rows, values, labels = self.heatmap_rows()
        if len(rows) == 1 or ax is not None:
            if len(rows) != 1:
                raise ValueError(f"ax= draws one row; this explanation has {len(rows)} (plot exp[i])")
            return visualize.plot_sequence(rows[0], values[0], ax=ax, normalization=normalization, title=title or labels[0], wrap=wrap)
        from matplotlib.figure import Figure

        from mambalrp.visualize import display_token

        lines = [max(1, -(-len(r) // wrap)) for r in rows]
        width = max(
            sum(len(display_token(str(t))) + 1.0 for t in r[i : i + wrap]) for r in rows for i in range(0, max(len(r), 1), wrap)
        )
        fig = Figure(figsize=(min(max(4.0, 0.12 * width + 0.6), 16.0), sum(1.3 + 0.4 * n for n in lines)), layout="constrained")
        axes = fig.subplots(len(rows), 1, gridspec_kw={"height_ratios": [1.3 + 0.4 * n for n in lines]})
        for axis, toks, vals, label in zip(axes, rows, values, labels):
            visualize.plot_sequence(toks, vals, ax=axis, normalization=normalization, title=label, wrap=wrap, line_width=width)
        if title:
            fig.suptitle(title)
        return fig

    def __repr__(self) -> str:
        rows, cols = self.relevance.shape
        delta = self.conservation_delta.abs().max().item() if rows else 0.0
        if self.kind == "generation":
            return (
                f"Explanation(kind='generation', steps={rows}, prompt={self.prompt_length}, rules={self.rules!r}, "
                f"verified={self.verified}, max|delta|={delta:.3g})"
            )
        return (
            f"Explanation(batch={rows}, seq={cols}, rules={self.rules!r}, verified={self.verified}, "
            f"logit={self.logit.tolist()}, max|delta|={delta:.3g})"
        )


def _rows(key: Any, count: int) -> list[int]:
    """Row indices selected by ``key`` (an int, slice, sequence of ints, or tensor)."""
    if isinstance(key, slice):
        return list(range(count))[key]
    if isinstance(key, torch.Tensor):
        if key.dtype == torch.bool:
            if key.shape != (count,):
                raise IndexError(f"boolean index of shape {tuple(key.shape)} for {count} rows")
            return key.nonzero().flatten().tolist()
        key = key.flatten().tolist() if key.dim() else int(key)
    if isinstance(key, bool):
        raise IndexError("a bool is not a row index")
    if isinstance(key, int):
        if not -count <= key < count:
            raise IndexError(f"row {key} out of range for {count} rows")
        return [key % count]
    rows = []
    for k in key:
        if isinstance(k, bool) or not isinstance(k, int):
            raise IndexError(f"row indices must be ints; got {type(k).__name__}")
        if not -count <= k < count:
            raise IndexError(f"row {k} out of range for {count} rows")
        rows.append(k % count)
    return rows


def _rows_of_tokens(tokens, batch: int):
    if tokens is None:
        return None
    tokens = list(tokens)
    if tokens and isinstance(tokens[0], str):
        if batch != 1:
            raise ValueError("tokens is one row but the explanation has several; pass one list per row")
        return [tokens]
    if len(tokens) != batch:
        raise ValueError(f"{len(tokens)} token rows given for a batch of {batch}")
    return [list(r) for r in tokens]


def _clean(token: str) -> str:
    # Byte-level BPE markers for a space and a newline, SentencePiece's space.
    return token.replace("\u0120", " ").replace("\u2581", " ").replace("\u010a", "\\n").replace("\n", "\\n")


def _paint(token: str, value: float, color: bool) -> str:
    if not color:
        return f"{token}[{value:+.2f}] "
    v = max(-1.0, min(1.0, value))
    fade = int(255 * (1 - abs(v)))
    r, g, b = (255, fade, fade) if v >= 0 else (fade, fade, 255)
    return f"\033[48;2;{r};{g};{b}m\033[38;2;0;0;0m{token}\033[0m"

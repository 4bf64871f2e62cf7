"""The result of :func:`mambalrp.explain` and its terminal rendering."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Explanation:
    """Per-token relevance of one explained output per batch item.

    Attributes:
        relevance: ``(batch, seq)`` float32; sums (up to biases) to :attr:`logit`.
        logit: ``(batch,)`` float32, the explained output value.
        target: ``(batch,)`` class/token ids explained, or ``None`` when a callable was explained.
        position: ``(batch,)`` sequence position explained, or ``None`` for sequence-level outputs.
        input_ids: ``(batch, seq)`` the explained ids.
        attention_mask: ``(batch, seq)`` or ``None``.
        rules: Name of the rule set used.
        hidden_relevance: ``(batch, seq, d_model)`` per-dimension relevance if requested.
        verified: Whether the library verified, before returning it, that the model under the
            rules computes the model's outputs and leaks no relevance (``explain(verify=False)``
            skips that; see :mod:`mambalrp.verification`).
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

    @property
    def conservation_delta(self) -> torch.Tensor:
        """``logit - relevance.sum(-1)``: relevance absorbed by biases (zero without biases)."""
        return self.logit - self.relevance.sum(-1)

    def render(
        self,
        tokens: Sequence[str] | Sequence[Sequence[str]] | None = None,
        *,
        color: bool = True,
        decode: Callable[[int], str] | None = None,
    ) -> str:
        """Render the relevance as a terminal heatmap (red: for the output, blue: against).

        Args:
            tokens: Token strings of the single row, or one list per row. Defaults to ``decode``
                of each id, or the ids themselves.
            color: Use ANSI 24-bit background colours; if false, print ``token[+0.12]`` text.
            decode: Maps an id to a string when ``tokens`` is not given.

        Returns:
            One block per batch row: a header line and the coloured tokens.
        """
        batch = self.relevance.shape[0]
        rows = _rows_of_tokens(tokens, batch)
        blocks = []
        for i in range(batch):
            ids = self.input_ids[i].tolist()
            keep = [True] * len(ids) if self.attention_mask is None else [bool(m) for m in self.attention_mask[i]]
            toks = rows[i] if rows is not None else [decode(t) if decode else str(t) for t in ids]
            if len(toks) != len(ids):
                raise ValueError(f"row {i}: {len(toks)} tokens given for {len(ids)} ids")
            rel = self.relevance[i].tolist()
            scale = max((abs(r) for r, k in zip(rel, keep) if k), default=0.0) or 1.0
            head = [f"logit {self.logit[i].item():+.4f}", f"sum(R) {sum(rel):+.4f}"]
            if self.target is not None:
                head.insert(0, f"target {int(self.target[i])}")
            if self.position is not None:
                head.insert(1 if self.target is not None else 0, f"position {int(self.position[i])}")
            head.append(f"rules {self.rules}")
            parts = [
                _paint(_clean(t), r / scale, color) for t, r, k in zip(toks, rel, keep) if k
            ]
            blocks.append(" | ".join(head) + "\n" + "".join(parts) + ("\033[0m" if color else ""))
        return "\n\n".join(blocks)

    def __repr__(self) -> str:
        b, t = self.relevance.shape
        return (
            f"Explanation(batch={b}, seq={t}, rules={self.rules!r}, verified={self.verified}, "
            f"logit={self.logit.tolist()}, max|delta|={self.conservation_delta.abs().max().item():.3g})"
        )


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
    # Byte-level BPE markers for a space and a newline.
    return token.replace("\u0120", " ").replace("\u010a", "\\n").replace("\n", "\\n")


def _paint(token: str, value: float, color: bool) -> str:
    if not color:
        return f"{token}[{value:+.2f}] "
    v = max(-1.0, min(1.0, value))
    fade = int(255 * (1 - abs(v)))
    r, g, b = (255, fade, fade) if v >= 0 else (fade, fade, 255)
    return f"\033[48;2;{r};{g};{b}m\033[38;2;0;0;0m{token}\033[0m"

"""Summing token relevance over groups of tokens: subword tokens to words, or explicit spans.

Relevance is additive over tokens, so the relevance of a group is the sum of its tokens'
relevance, and every row keeps its total: conservation holds for words as it does for tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from mambalrp.errors import InputError
from mambalrp.explanation import Explanation
from mambalrp.tokens import join_tokens, word_spans


def check_spans(spans: Any, length: int) -> list[tuple[int, int]]:
    """Validate explicit ``[start, end)`` spans and complete them with singletons.

    Args:
        spans: A sequence of ``(start, end)`` pairs of token indices (``start < end``,
            non-overlapping, within ``[0, length]``).
        length: Number of tokens.

    Returns:
        Spans sorted by start that cover every token once: the given ones, plus one span per
        token outside them.

    Raises:
        InputError: A span is malformed, empty, out of range, or overlaps another.
    """
    try:
        given = sorted((int(a), int(b)) for a, b in spans)
    except (TypeError, ValueError) as err:
        raise InputError(f"spans must be (start, end) pairs of token indices; got {spans!r}") from err
    for a, b in given:
        if not 0 <= a < b <= length:
            raise InputError(f"span ({a}, {b}) is empty or outside the {length} tokens (spans are [start, end))")
    for (a0, b0), (a1, b1) in zip(given, given[1:]):
        if a1 < b0:
            raise InputError(f"spans ({a0}, {b0}) and ({a1}, {b1}) overlap")
    out: list[tuple[int, int]] = []
    pos = 0
    for a, b in given:
        out.extend((j, j + 1) for j in range(pos, a))
        out.append((a, b))
        pos = b
    out.extend((j, j + 1) for j in range(pos, length))
    return out


def _sum_groups(values: torch.Tensor, spans: list[tuple[int, int]], width: int) -> torch.Tensor:
    """``(rows, width, ...)``: the sums of ``values`` ``(rows, seq, ...)`` over each span (zeros after)."""
    index = torch.empty(values.shape[1], dtype=torch.long, device=values.device)
    for g, (a, b) in enumerate(spans):
        index[a:b] = g
    shape = (values.shape[0], width) + tuple(values.shape[2:])
    out = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return out.index_add_(1, index, values)


def aggregate(exp: Explanation, groups: str | Sequence[tuple[int, int]] = "words") -> Explanation:
    """Sum ``exp``'s relevance over groups of tokens.

    Args:
        exp: A token-level explanation (of either kind).
        groups: ``"words"``: group subword tokens into words from the token strings (see
            :func:`mambalrp.tokens.word_spans`; padding tokens are grouped alone). Or explicit
            ``[start, end)`` token spans, applied to every row; tokens outside them stay groups of
            their own.

    Returns:
        A new explanation whose columns are the groups: ``relevance`` ``(rows, groups)`` (rows
        with fewer groups padded with zeros), ``hidden_relevance`` summed the same way, ``spans``
        the token range of each column per sequence row, ``tokens`` the text of each group
        (joined token strings) when token strings are known. ``input_ids``, ``attention_mask``
        and the totals (``relevance.sum(-1)``) are unchanged.

    Raises:
        InputError: ``"words"`` without token strings, an unknown mode, or invalid spans.
        ValueError: ``exp`` is already aggregated.
    """
    if exp.spans is not None:
        raise ValueError("this explanation is already aggregated; aggregate the token-level one")
    seq_rows, length = exp.input_ids.shape
    if isinstance(groups, str):
        if groups != "words":
            raise InputError(f"groups must be 'words' or a sequence of (start, end) spans; got {groups!r}")
        if exp.tokens is None:
            raise InputError(
                "aggregate('words') needs the token strings: pass tokenizer= to explain / explain_generation, "
                "or give explicit (start, end) spans"
            )
        per_row = []
        for r in range(seq_rows):
            mask = None if exp.attention_mask is None else exp.attention_mask[r].tolist()
            first = 0 if mask is None else next(j for j, m in enumerate(mask) if m)
            if mask is not None and any(not m for m in mask[first:]):
                # Padding inside the row: words within each run of tokens, padding alone.
                spans: list[tuple[int, int]] = []
                j = 0
                while j < length:
                    if not mask[j]:
                        spans.append((j, j + 1))
                        j += 1
                        continue
                    k = j
                    while k < length and mask[k]:
                        k += 1
                    spans.extend((j + a, j + b) for a, b in word_spans(exp.tokens[r][j:k]))
                    j = k
            else:
                spans = [(j, j + 1) for j in range(first)] + [
                    (first + a, first + b) for a, b in word_spans(exp.tokens[r][first:])
                ]
            per_row.append(spans)
    else:
        common = check_spans(groups, length)
        per_row = [list(common) for _ in range(seq_rows)]
    width = max(len(s) for s in per_row)
    relevance = torch.zeros((len(exp), width), dtype=exp.relevance.dtype, device=exp.relevance.device)
    for i in range(len(exp)):
        r = 0 if exp.kind == "generation" else i
        relevance[i : i + 1] = _sum_groups(exp.relevance[i : i + 1], per_row[r], width)
    hidden = None
    if exp.hidden_relevance is not None:
        hidden = torch.cat(
            [_sum_groups(exp.hidden_relevance[i : i + 1], per_row[i], width) for i in range(exp.hidden_relevance.shape[0])]
        )
    tokens = None
    if exp.tokens is not None:
        tokens = [[join_tokens(exp.tokens[r][a:b]) for a, b in per_row[r]] for r in range(seq_rows)]
    return replace(exp, relevance=relevance, hidden_relevance=hidden, tokens=tokens, spans=per_row)

"""Token strings from a tokenizer, and grouping subword tokens into words.

Two kinds of tokenizer are read: Hugging Face tokenizers (``convert_ids_to_tokens``) and
``tokenizers.Tokenizer`` objects such as the zoo's (``id_to_token``). Word boundaries are read from
the markers that subword tokenizers put on a token that starts after a space: ``Ġ`` (byte-level
BPE, GPT-2 / GPT-NeoX / Mamba), ``▁`` (SentencePiece) and, inversely, ``##`` on a continuation
(WordPiece).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from mambalrp.errors import InputError

SPACE_MARKERS = ("\u0120", "\u2581")  # "Ġ" (byte-level BPE), "▁" (SentencePiece)
NEWLINE_MARKERS = ("\u010a", "\n")  # "Ċ" (byte-level BPE newline), a literal newline
CONTINUATION_MARKER = "##"  # WordPiece
_SPECIAL = re.compile(r"^(<\|?[^<>\s]+\|?>|\[[A-Z_]+\])$")  # <s>, </s>, <|endoftext|>, [CLS]


def token_strings(tokenizer: Any, ids: Sequence[int] | Any) -> list[str]:
    """The token string of each id, as the tokenizer spells it (e.g. ``\u0120the``).

    Args:
        tokenizer: A Hugging Face tokenizer (has ``convert_ids_to_tokens``) or a
            ``tokenizers.Tokenizer`` (has ``id_to_token``).
        ids: Token ids (a sequence or a 1-D tensor).

    Returns:
        One string per id (``"<id>"`` for an id the tokenizer does not know).

    Raises:
        InputError: ``tokenizer`` has neither method.
    """
    ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    lookup = getattr(tokenizer, "id_to_token", None)
    if callable(convert):
        found = list(convert(ids))
    elif callable(lookup):
        found = [lookup(i) for i in ids]
    else:
        raise InputError(
            f"tokenizer of type {type(tokenizer).__name__} has neither convert_ids_to_tokens (Hugging Face "
            "tokenizers) nor id_to_token (tokenizers.Tokenizer)"
        )
    return [t if isinstance(t, str) else f"<{i}>" for t, i in zip(found, ids)]


def _blank(token: str) -> bool:
    """Whether a token is only whitespace and markers (it carries no word of its own)."""
    rest = token
    for marker in SPACE_MARKERS + NEWLINE_MARKERS:
        rest = rest.replace(marker, "")
    return not rest.strip()


def word_spans(tokens: Sequence[str]) -> list[tuple[int, int]]:
    """Split a token sequence into words: ``[start, end)`` token ranges covering every token once.

    A token starts a new word when it begins with a space marker (``Ġ``, ``▁``) or whitespace, is
    a newline, follows a newline, is a special token (``<s>``, ``<|endoftext|>``, ``[CLS]``, each
    a word of its own), or is the first token. In WordPiece output (``##`` continuations and no
    space markers) every token starts a word except those starting with ``##``.
    A token made only of a space marker (byte-level BPE's lone ``Ġ``) joins the word after it.

    Args:
        tokens: Token strings.

    Returns:
        Contiguous, non-overlapping spans in order; their union is ``range(len(tokens))``.
    """
    spans: list[tuple[int, int]] = []
    start = 0
    # WordPiece marks continuations, not word starts: there, every other token starts a word.
    wordpiece = any(t.startswith(CONTINUATION_MARKER) and len(t) > 2 for t in tokens) and not any(
        t.startswith(SPACE_MARKERS) for t in tokens
    )
    for i, token in enumerate(tokens):
        if i == 0:
            continue
        prev = tokens[i - 1]
        if token.startswith(CONTINUATION_MARKER) and len(token) > len(CONTINUATION_MARKER):
            continue
        if wordpiece:
            spans.append((start, i))
            start = i
            continue
        special = bool(_SPECIAL.match(token)) or bool(_SPECIAL.match(prev))
        newline = any(m in token for m in NEWLINE_MARKERS) or any(prev.endswith(m) for m in NEWLINE_MARKERS)
        spaced = token[:1].isspace() or token.startswith(SPACE_MARKERS)
        if special or newline:
            spans.append((start, i))
            start = i
        elif spaced:
            if _blank(prev) and start == i - 1 and not any(m in prev for m in NEWLINE_MARKERS):
                continue  # a lone space marker joins the word after it
            spans.append((start, i))
            start = i
    if tokens:
        spans.append((start, len(tokens)))
    return spans


def join_tokens(tokens: Sequence[str]) -> str:
    """The text of a group of tokens: markers turned back into spaces and newlines, ``##``
    continuations glued on, leading and trailing whitespace removed."""
    parts = []
    for token in tokens:
        if token.startswith(CONTINUATION_MARKER) and len(token) > len(CONTINUATION_MARKER):
            token = token[len(CONTINUATION_MARKER) :]
        for marker in SPACE_MARKERS:
            token = token.replace(marker, " ")
        token = token.replace("\u010a", "\n")
        parts.append(token)
    text = "".join(parts).strip(" ")
    return text if text else "".join(parts)

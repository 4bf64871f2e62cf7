"""Explaining a table of texts: tokenizing, bad rows, length buckets, one output row per input row.

This is the work one dataset worker does on one shard (:mod:`mambalrp.dataset` runs it on Ray
Data); it needs neither Ray nor a cluster and runs in any process that holds the model::

    table = pyarrow.table({"text": ["a gorgeous , witty film .", "dull ."]})
    out = explain_table(model, tokenizer, table, RowOptions(batch_size=8))

Every input column is kept; the columns of :data:`OUTPUT_COLUMNS` are appended. A row that cannot
be explained (empty text, undecodable bytes, too many tokens, a target the model does not have,
an error raised while explaining it) gets a message in ``error`` and nulls in the explanation
columns; it never stops the other rows. What concerns the model rather than a row (an
:class:`~mambalrp.errors.UnsupportedModelError`, a :class:`~mambalrp.verification.VerificationError`)
is raised: every row would fail the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mambalrp.errors import InputError, UnsupportedModelError
from mambalrp.rules import RuleSet
from mambalrp.verification import VerificationError

#: The columns :func:`explain_table` appends, with their Arrow types and meaning (docs/datasets.md).
OUTPUT_COLUMNS: dict[str, tuple[str, str]] = {
    "row_id": ("int64", "the row's index in the input (assigned before any work is distributed)"),
    "input_ids": ("list<int64>", "the explained token ids, without padding"),
    "tokens": ("list<string>", "the token strings of `input_ids`"),
    "relevance": ("list<float32>", "one relevance per token; sums to `logit` up to `conservation_delta`"),
    "logit": ("float32", "the explained output value"),
    "target": ("int64", "the class or token id explained"),
    "target_label": ("string", "its name: the class label, or the token string for a language model"),
    "position": ("int64", "the explained position in `input_ids` (null for classifiers)"),
    "conservation_delta": ("float32", "`logit - sum(relevance)`: relevance absorbed by biases"),
    "rules": ("string", "the rule set (or attribution method) used"),
    "verified": ("bool", "whether the model under the rules was verified before explaining"),
    "truncated_from": ("int64", "the token count before truncation (null when not truncated)"),
    "error": ("string", "why the row has no explanation (null when it has one)"),
}

#: ``recompute="auto"`` recomputes the layers of batches at least this long (padded tokens).
RECOMPUTE_AUTO_TOKENS = 4096

ON_ERROR = ("record", "truncate", "raise")

#: An attribution method of the faithfulness suite: ``(model, ids, target) -> (batch, T)`` scores
#: for unpadded rows of one length.
Method = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RowOptions:
    """What to explain in each row and how.

    Attributes:
        text_column: Column holding the texts (strings, or bytes decoded as UTF-8).
        target: ``None`` (the model's prediction), an ``int`` class / token id, a label name, or
            the name of a column holding one target per row (ids or label names).
        labels: Class names, index = class id (default: read from the model's config).
        batch_size: Rows per forward / backward pass; rows of similar token counts are batched
            together (left-padded with an attention mask).
        max_length: Most tokens per row (``None``: the tokenizer's own limit, its truncation
            length or ``model_max_length``, if it has one; else no limit).
        on_error: ``"record"``: a row over ``max_length`` gets an error; ``"truncate"``: it keeps
            its first ``max_length`` tokens and ``truncated_from`` records its length; ``"raise"``:
            the first bad row raises :class:`~mambalrp.errors.InputError`.
        rules: Rule set (a name or a :class:`~mambalrp.rules.RuleSet`) passed to :func:`mambalrp.explain`.
        recompute: Passed to :func:`mambalrp.explain`; ``"auto"`` recomputes the layers of
            batches of at least :data:`RECOMPUTE_AUTO_TOKENS` tokens.
        verify: Passed to :func:`mambalrp.explain`.
        method: An attribution method ``(model, ids, target) -> (batch, T)`` used instead of
            :func:`mambalrp.explain` (the faithfulness suite's methods); rows are then batched
            by exact length, without padding, and ``logit``, ``conservation_delta`` and
            ``verified`` are null.
        method_name: The ``rules`` value recorded for ``method``.
    """

    text_column: str = "text"
    target: int | str | None = None
    labels: Sequence[str] | None = None
    batch_size: int = 16
    max_length: int | None = None
    on_error: str = "record"
    rules: str | RuleSet = "mambalrp"
    recompute: bool | float | str = "auto"
    verify: bool = True
    method: Method | None = field(default=None, compare=False)
    method_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise InputError(f"batch_size must be a positive int; got {self.batch_size!r}")
        if self.max_length is not None and (
            not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 1
        ):
            raise InputError(f"max_length must be a positive int or None; got {self.max_length!r}")
        if self.on_error not in ON_ERROR:
            raise InputError(f"on_error must be one of {ON_ERROR}; got {self.on_error!r}")
        if isinstance(self.target, bool) or not isinstance(self.target, (int, str, type(None))):
            raise InputError(f"target must be None, an int, a label name or a column name; got {self.target!r}")
        if isinstance(self.recompute, str) and self.recompute != "auto":
            raise InputError(f"recompute must be True, False, a share in (0, 1] or 'auto'; got {self.recompute!r}")
        if self.method is not None and not callable(self.method):
            raise InputError("method must be a callable (model, ids, target) -> (batch, T) scores")

    @property
    def rules_name(self) -> str:
        """What the ``rules`` column records: the rule set's name, or the method's."""
        if self.method is not None:
            return self.method_name or getattr(self.method, "__name__", "method")
        return str(getattr(self.rules, "name", self.rules))

    def target_column(self, columns: Sequence[str]) -> str | None:
        """The column holding per-row targets, or ``None`` when ``target`` is not a column name."""
        return self.target if isinstance(self.target, str) and self.target in columns else None


class Tokens:
    """One interface over a ``tokenizers.Tokenizer`` (the zoo's) and a transformers tokenizer.

    The wrapped tokenizer is never changed: a ``tokenizers.Tokenizer`` is copied with its
    padding and truncation turned off (truncation is decided by :class:`RowOptions`).
    """

    def __init__(self, tokenizer: Any) -> None:
        if tokenizer is None:
            raise InputError("a tokenizer is needed: return (model, tokenizer) from the loader or pass tokenizer=")
        self.fast = type(tokenizer).__module__.split(".")[0] == "tokenizers"
        if self.fast:
            from tokenizers import Tokenizer

            copy = Tokenizer.from_str(tokenizer.to_str())
            copy.no_padding()
            copy.no_truncation()
            self.tok = copy
            padding = tokenizer.padding or {}
            self.pad_id = int(padding.get("pad_id", 0))
            limit = (tokenizer.truncation or {}).get("max_length")
            self.default_max_length = int(limit) if limit else None
        elif callable(tokenizer) and hasattr(tokenizer, "convert_ids_to_tokens"):
            self.tok = tokenizer
            pad = getattr(tokenizer, "pad_token_id", None)
            pad = getattr(tokenizer, "eos_token_id", None) if pad is None else pad
            self.pad_id = int(pad) if isinstance(pad, int) else 0
            limit = getattr(tokenizer, "model_max_length", None)
            self.default_max_length = int(limit) if isinstance(limit, int) and limit < 10**7 else None
        else:
            raise InputError(
                f"unsupported tokenizer {type(tokenizer).__name__}: pass a tokenizers.Tokenizer or a transformers tokenizer"
            )

    def encode(self, text: str) -> tuple[list[int], list[str]]:
        """Token ids and token strings of ``text`` (with the tokenizer's special tokens)."""
        if self.fast:
            enc = self.tok.encode(text)
            return list(enc.ids), list(enc.tokens)
        ids = list(self.tok(text, add_special_tokens=True, truncation=False)["input_ids"])
        return ids, [str(t) for t in self.tok.convert_ids_to_tokens(ids)]

    def token_id(self, token: str) -> int | None:
        """The id of a token string, or ``None`` when the vocabulary lacks it."""
        if self.fast:
            return self.tok.token_to_id(token)
        unk = getattr(self.tok, "unk_token_id", None)
        found = self.tok.convert_tokens_to_ids(token)
        return None if found is None or (found == unk and token != getattr(self.tok, "unk_token", None)) else int(found)

    def token_string(self, token_id: int) -> str | None:
        """The token string of an id."""
        if self.fast:
            return self.tok.id_to_token(int(token_id))
        return str(self.tok.convert_ids_to_tokens([int(token_id)])[0])


def model_labels(model: nn.Module) -> list[str] | None:
    """Class names from ``model.config.id2label``; ``None`` without them or with the default names.

    Transformers gives every config ``LABEL_0``, ``LABEL_1`` by default, language models too; such
    names say nothing, and a language model's targets are tokens.
    """
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None)
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        names = [str(id2label[i]) for i in range(len(id2label))]
    except KeyError:
        return None
    return None if names == [f"LABEL_{i}" for i in range(len(names))] else names


@dataclass
class _Row:
    ids: list[int] | None = None
    tokens: list[str] | None = None
    target: int | None = None
    truncated_from: int | None = None
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)


def explain_table(model: nn.Module, tokenizer: Any, table: Any, options: RowOptions) -> Any:
    """Explain every row of an Arrow table; return the table with :data:`OUTPUT_COLUMNS` appended.

    Args:
        model: The model (on the device it should run on); left as it was.
        tokenizer: Its tokenizer (``tokenizers.Tokenizer`` or a transformers tokenizer).
        table: A ``pyarrow.Table`` with ``options.text_column`` and a ``row_id`` column (added
            as ``0..n-1`` when missing).
        options: What to explain and how.

    Returns:
        A ``pyarrow.Table``: the input columns, then the output columns, in the input's row order.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
        UnsupportedModelError: No adapter can explain the model.
        VerificationError: The model under the rules fails verification.
        InputError: A column is missing or already named like an output column; a label target
            the model does not have; a bad row when ``options.on_error == "raise"``.
    """
    import pyarrow as pa

    from mambalrp.inputs import check_model

    check_model(model)
    columns = table.column_names
    if options.text_column not in columns:
        raise InputError(f"no text column {options.text_column!r} in the data; columns: {columns}")
    clash = [c for c in OUTPUT_COLUMNS if c in columns and c != "row_id"]
    if clash:
        raise InputError(f"input columns {clash} have the names of output columns; rename them")
    if "row_id" not in columns:
        table = table.append_column("row_id", pa.array(range(table.num_rows), pa.int64()))
    tokens = Tokens(tokenizer)
    labels = list(options.labels) if options.labels is not None else model_labels(model)
    column = options.target_column(columns)
    targets = table.column(column).to_pylist() if column else [options.target] * table.num_rows
    if column is None and isinstance(options.target, str) and _label_id(options.target, labels, tokens) is None:
        raise InputError(f"target {options.target!r} is neither a column of the data nor a label of the model ({labels})")
    limit = options.max_length if options.max_length is not None else tokens.default_max_length
    rows = [
        _prepare(text, tgt, tokens, labels, limit, options.on_error)
        for text, tgt in zip(table.column(options.text_column).to_pylist(), targets)
    ]
    _explain_rows(model, rows, tokens, options)
    name = options.rules_name
    out = {
        "input_ids": [r.ids if r.error is None else None for r in rows],
        "tokens": [r.tokens if r.error is None else None for r in rows],
        "relevance": [r.result.get("relevance") for r in rows],
        "logit": [r.result.get("logit") for r in rows],
        "target": [r.result.get("target") for r in rows],
        "target_label": [_label_name(r.result.get("target"), labels, tokens) for r in rows],
        "position": [r.result.get("position") for r in rows],
        "conservation_delta": [r.result.get("conservation_delta") for r in rows],
        "rules": [name] * len(rows),
        "verified": [r.result.get("verified") for r in rows],
        "truncated_from": [r.truncated_from for r in rows],
        "error": [r.error for r in rows],
    }
    types = {
        "input_ids": pa.list_(pa.int64()), "tokens": pa.list_(pa.string()), "relevance": pa.list_(pa.float32()),
        "logit": pa.float32(), "target": pa.int64(), "target_label": pa.string(), "position": pa.int64(),
        "conservation_delta": pa.float32(), "rules": pa.string(), "verified": pa.bool_(),
        "truncated_from": pa.int64(), "error": pa.string(),
    }
    for key, values in out.items():
        table = table.append_column(key, pa.array(values, types[key]))
    return table


def _label_id(value: Any, labels: list[str] | None, tokens: Tokens) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        if labels is not None and value in labels:
            return labels.index(value)
        return tokens.token_id(value) if labels is None else None
    return None


def _label_name(target: int | None, labels: list[str] | None, tokens: Tokens) -> str | None:
    if target is None:
        return None
    if labels is not None:
        return labels[target] if 0 <= target < len(labels) else None
    return tokens.token_string(target)


def _prepare(text: Any, target: Any, tokens: Tokens, labels: list[str] | None, limit: int | None, on_error: str) -> _Row:
    row = _Row()
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as err:
            row.error = f"undecodable bytes: not UTF-8 ({err.reason} at byte {err.start})"
    if row.error is None and not isinstance(text, str):
        row.error = "no text (null)" if text is None else f"the text is a {type(text).__name__}, not a string"
    if row.error is None and not text.strip():
        row.error = "empty text"
    if row.error is None:
        row.ids, row.tokens = tokens.encode(text)
        if not row.ids:
            row.error = "the text has no tokens"
        elif limit is not None and len(row.ids) > limit:
            if on_error == "truncate":
                row.truncated_from = len(row.ids)
                row.ids, row.tokens = row.ids[:limit], row.tokens[:limit]
            else:
                row.error = f"too long: {len(row.ids)} tokens, over max_length={limit}"
    if row.error is None and target is not None:
        row.target = _label_id(target, labels, tokens)
        if row.target is None:
            row.error = f"target {target!r} is not a class id or label of the model"
    if row.error is not None and on_error == "raise":
        raise InputError(f"bad row: {row.error}")
    return row


def _explain_rows(model: nn.Module, rows: list[_Row], tokens: Tokens, options: RowOptions) -> None:
    """Fill ``result`` of every row without an error, batch by batch; record failures per row."""
    ready = [i for i, r in enumerate(rows) if r.error is None]
    # Length buckets: neighbours have similar lengths. Rows explaining the prediction (no target
    # given, or a null one in a target column) and rows with a target are batched apart.
    ready.sort(key=lambda i: (rows[i].target is None, len(rows[i].ids), i))
    batches: list[list[int]] = []
    for i in ready:
        fits = bool(batches) and len(batches[-1]) < options.batch_size
        fits = fits and (rows[batches[-1][0]].target is None) == (rows[i].target is None)
        if fits and options.method is not None:  # explanations pad; the suite's methods take one length
            fits = len(rows[batches[-1][0]].ids) == len(rows[i].ids)
        if fits:
            batches[-1].append(i)
        else:
            batches.append([i])
    for batch in batches:
        try:
            _explain_batch(model, [rows[i] for i in batch], tokens, options)
        except (UnsupportedModelError, VerificationError):
            raise  # the model, not a row: every row would fail the same way
        except Exception as err:  # noqa: BLE001 - one bad row never fails the others
            if len(batch) == 1:
                rows[batch[0]].error = f"{type(err).__name__}: {err}"
                if options.on_error == "raise":
                    raise
                continue
            for i in batch:  # find the row(s) that fail
                try:
                    _explain_batch(model, [rows[i]], tokens, options)
                except (UnsupportedModelError, VerificationError):
                    raise
                except Exception as single:  # noqa: BLE001
                    rows[i].error = f"{type(single).__name__}: {single}"
                    if options.on_error == "raise":
                        raise


def _explain_batch(model: nn.Module, rows: list[_Row], tokens: Tokens, options: RowOptions) -> None:
    from mambalrp.explain import explain, input_embedding

    device = input_embedding(model).weight.device
    length = max(len(r.ids) for r in rows)
    pads = [length - len(r.ids) for r in rows]
    ids = torch.tensor([[tokens.pad_id] * p + r.ids for p, r in zip(pads, rows)], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * p + [1] * len(r.ids) for p, r in zip(pads, rows)], dtype=torch.long, device=device)
    given = [r.target for r in rows]
    if options.method is not None:  # rows of one length: no padding
        predicted, sequence = _predictions(model, ids)
        target = predicted if None in given else torch.tensor(given, dtype=torch.long, device=device)
        scores = options.method(model, ids, target).detach().float().cpu()
        for k, r in enumerate(rows):
            r.result = {"relevance": scores[k].tolist(), "target": int(target[k]), "position": length - 1 if sequence else None}
        return
    if None in given and any(t is not None for t in given):
        raise InputError("rows of one batch mix given and missing targets")
    target = None if given[0] is None else torch.tensor(given, dtype=torch.long, device=device)
    recompute = options.recompute
    if recompute == "auto":
        recompute = length >= RECOMPUTE_AUTO_TOKENS
    no_padding = not any(pads)
    exp = explain(
        model,
        ids,
        target,
        attention_mask=None if no_padding else mask,
        rules=options.rules,
        recompute=recompute,
        verify=options.verify,
    )
    relevance = exp.relevance.cpu()
    delta = exp.conservation_delta.cpu()
    for k, (p, r) in enumerate(zip(pads, rows)):
        r.result = {
            "relevance": relevance[k, p:].tolist(),
            "logit": float(exp.logit[k]),
            "target": None if exp.target is None else int(exp.target[k]),
            "position": None if exp.position is None else int(exp.position[k]) - p,
            "conservation_delta": float(delta[k]),
            "verified": bool(exp.verified),
        }


def _predictions(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The model's predicted ids for unpadded rows, and whether its output has a sequence dimension."""
    from mambalrp.inputs import call_model, output_tensor

    with torch.no_grad():
        out = output_tensor(call_model(model, ids, None, None)[0])
    return (out[:, -1] if out.dim() == 3 else out).argmax(-1), out.dim() == 3

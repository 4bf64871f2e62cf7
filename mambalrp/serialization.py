"""Saving, loading and exporting explanations.

The file format (``.mlrp`` by convention) is one `safetensors <https://github.com/huggingface/safetensors>`_
file: the tensors are stored as raw little-endian bytes (so a round trip is bitwise), everything
else as JSON in the file's string metadata. Nothing is pickled and ``torch.load`` is never used,
so loading a file cannot run code.

Metadata keys (all strings):

* ``format``: ``"mambalrp-explanation"``;
* ``version``: the format version, ``"1"``; files from a newer version are refused;
* ``mambalrp``: the library version that wrote the file;
* ``explanation``: JSON object with ``kind``, ``rules``, ``verified``, ``tokens``, ``spans``,
  ``generation`` and ``tensors`` (the names of the tensor fields present).

Tensor keys: the :class:`~mambalrp.explanation.Explanation` field names (``relevance``, ``logit``,
``target``, ``position``, ``input_ids``, ``attention_mask``, ``hidden_relevance``,
``generated_ids``, ``contrast``) and ``step_scores.<name>`` for each step score; a field that is
``None`` is absent.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from mambalrp.errors import ExplanationFileError
from mambalrp.explanation import Explanation

FORMAT = "mambalrp-explanation"
VERSION = 1
TENSOR_FIELDS = (
    "relevance",
    "logit",
    "target",
    "position",
    "input_ids",
    "attention_mask",
    "hidden_relevance",
    "generated_ids",
    "contrast",
)
_SCORES = "step_scores."


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_dict(exp: Explanation) -> dict[str, Any]:
    """Every field of ``exp`` as plain Python data (tensors become nested lists)."""
    out: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    for name in ("kind", "rules", "verified") + TENSOR_FIELDS + ("step_scores", "tokens", "generation", "spans"):
        out[name] = _plain(getattr(exp, name))
    return out


def _meta(exp: Explanation) -> dict[str, Any]:
    return {
        "kind": exp.kind,
        "rules": exp.rules,
        "verified": bool(exp.verified),
        "tokens": exp.tokens,
        "spans": None if exp.spans is None else [[list(s) for s in row] for row in exp.spans],
        "generation": exp.generation,
    }


def save(exp: Explanation, path: str | os.PathLike) -> None:
    """Write ``exp`` to ``path`` (overwritten) in the format described in this module.

    Raises:
        ImportError: safetensors is not installed.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name in TENSOR_FIELDS:
        value = getattr(exp, name)
        if value is not None:
            tensors[name] = value.detach().cpu().contiguous().clone()
    for name, value in (exp.step_scores or {}).items():
        tensors[_SCORES + name] = value.detach().cpu().contiguous().clone()
    meta = _meta(exp)
    meta["tensors"] = sorted(tensors)
    meta["step_scores"] = None if exp.step_scores is None else list(exp.step_scores)
    from mambalrp import __version__

    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "mambalrp": __version__,
        "explanation": json.dumps(meta, ensure_ascii=False),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


def load(path: str | os.PathLike) -> Explanation:
    """Read an explanation written by :meth:`Explanation.save`, bitwise as it was saved.

    Args:
        path: The file.

    Returns:
        The :class:`~mambalrp.explanation.Explanation` (tensors on the CPU).

    Raises:
        FileNotFoundError: No such file.
        ExplanationFileError: The file is not a saved explanation, or it was written in a newer
            format version than this release reads.
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no explanation file {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ExplanationFileError(f"{path!r} is not a saved explanation (not a safetensors file: {err})") from err
    if metadata.get("format") != FORMAT:
        raise ExplanationFileError(
            f"{path!r} is a safetensors file but not a saved explanation (format {metadata.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    try:
        version = int(metadata.get("version", ""))
    except ValueError as err:
        raise ExplanationFileError(f"{path!r}: unreadable format version {metadata.get('version')!r}") from err
    if version > VERSION:
        raise ExplanationFileError(
            f"{path!r} was written in explanation format version {version} (by mambalrp "
            f"{metadata.get('mambalrp', '?')}); this release reads versions up to {VERSION}: upgrade mambalrp"
        )
    if version < 1:
        raise ExplanationFileError(f"{path!r}: invalid format version {version}")
    try:
        meta = json.loads(metadata["explanation"])
    except (KeyError, json.JSONDecodeError) as err:
        raise ExplanationFileError(f"{path!r}: the explanation metadata is missing or not JSON") from err
    missing = [k for k in meta.get("tensors", []) if k not in tensors]
    if missing or "relevance" not in tensors or "logit" not in tensors or "input_ids" not in tensors:
        raise ExplanationFileError(f"{path!r}: tensors missing: {missing or ['relevance', 'logit', 'input_ids']}")
    names = meta.get("step_scores")
    scores = None if names is None else {n: tensors[_SCORES + n] for n in names}
    spans = meta.get("spans")
    return Explanation(
        **{name: tensors.get(name) for name in TENSOR_FIELDS},
        rules=meta["rules"],
        verified=bool(meta["verified"]),
        tokens=meta.get("tokens"),
        kind=meta["kind"],
        step_scores=scores,
        generation=meta.get("generation"),
        spans=None if spans is None else [[(int(a), int(b)) for a, b in row] for row in spans],
    )


def to_pandas(exp: Explanation) -> Any:
    """The long-format table described in :meth:`Explanation.to_pandas`."""
    try:
        import pandas as pd
    except ImportError as err:
        raise ImportError("Explanation.to_pandas needs pandas: pip install pandas") from err
    records: list[dict[str, Any]] = []
    rel = exp.relevance.detach().cpu().tolist()
    logit = exp.logit.detach().cpu().tolist()
    ids = exp.input_ids.detach().cpu().tolist()
    mask = None if exp.attention_mask is None else exp.attention_mask.detach().cpu().tolist()
    generation = exp.kind == "generation"
    prompt = exp.prompt_length or 0
    for i, row in enumerate(rel):
        r = 0 if generation else i
        head: dict[str, Any] = {"row": i}
        visible = len(ids[r])
        if generation:
            position = int(exp.position[i])
            visible = position + 1
            head["step"] = position - prompt + 1
            head["generated_id"] = int(exp.target[i])
            head["generated_token"] = exp.tokens[0][position + 1] if exp.tokens is not None and exp.spans is None else None
        else:
            head["target"] = None if exp.target is None else int(exp.target[i])
            head["position"] = None if exp.position is None else int(exp.position[i])
        head["logit"] = logit[i]
        if exp.spans is not None:
            columns = [
                (j, -1, a, b) for j, (a, b) in enumerate(exp.spans[r])
            ]
        else:
            columns = [(j, ids[r][j], j, j + 1) for j in range(len(ids[r]))]
        for j, token_id, a, b in columns:
            if a >= visible or (mask is not None and not any(mask[r][a:b])):
                continue
            token = None if exp.tokens is None else exp.tokens[r][j]
            records.append({**head, "index": j, "token_id": token_id, "token": token, "relevance": row[j]})
    return pd.DataFrame.from_records(records)

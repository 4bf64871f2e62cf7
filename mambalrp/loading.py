"""Loading a model and its tokenizer by zoo name or from a local checkpoint directory.

One entry point for the command line and for scripts: :func:`load` takes a zoo name
(``sst-mamba1``, ``lm-mamba2``, ... see :mod:`mambalrp.models.zoo`), a zoo-layout directory, or
a local Hugging Face checkpoint directory (``config.json`` + weights + tokenizer files, as
``save_pretrained`` writes them). Nothing is downloaded: a name that is neither a zoo model nor an
existing path is an error that lists the zoo's models.

The two kinds of tokenizer differ (the zoo ships ``tokenizers.Tokenizer`` objects, checkpoints
load a ``transformers`` tokenizer); :func:`encode` and :func:`token_strings` work with both.

Example:
    >>> from mambalrp.loading import encode, load, token_strings
    >>> model, tokenizer = load("sst-mamba1")
    >>> ids = encode(tokenizer, "a gorgeous , witty film .")
    >>> token_strings(tokenizer, ids)
    ['a', 'gorgeous', ',', 'witty', 'film', '.']
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mambalrp.errors import InputError
from mambalrp.tokens import token_strings  # re-exported: one implementation for both tokenizer kinds

__all__ = ["TASKS", "decode", "encode", "load", "token_strings"]

TASKS = ("causal-lm", "sequence-classification")
# Files of which a checkpoint needs at least one for its tokenizer (transformers 5 would otherwise
# build an empty tokenizer from defaults).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")


def load(name_or_path: str, *, task: str | None = None, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Load a model in eval mode and its tokenizer.

    Args:
        name_or_path: A zoo model name (:func:`mambalrp.models.zoo.available_models`), a zoo
            model directory (holding ``model.json``), or a local Hugging Face checkpoint directory
            (holding ``config.json``). An existing path wins over a zoo name.
        task: For checkpoints: ``"causal-lm"`` (``AutoModelForCausalLM``) or
            ``"sequence-classification"`` (``AutoModelForSequenceClassification``). Default: from
            ``config.architectures`` (a name ending in ``ForSequenceClassification`` picks the
            latter), else a causal LM. Ignored for zoo models, which know their task.
        dtype: Parameter dtype of the returned model.

    Returns:
        ``(model, tokenizer)``: a ``tokenizers.Tokenizer`` for zoo models, the checkpoint's
        ``transformers`` tokenizer otherwise.

    Raises:
        InputError: The path does not exist, the name is neither a path nor a zoo model, the
            directory holds no ``config.json`` / tokenizer / weights, ``task`` is unknown, or
            transformers cannot build the configured model.

    Whether mambalrp can explain the model is decided by :func:`mambalrp.explain`
    (``UnsupportedModelError``), not here.
    """
    from mambalrp.models.zoo import ZOO_DIR, available_models, load_model

    if task is not None and task not in TASKS:
        raise InputError(f"task must be one of {TASKS}; got {task!r}")
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise InputError("a model name or path is required")
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{str(path)!r} is a file; give the checkpoint's directory")
        if (path / "model.json").is_file():
            return load_model(path.name, directory=path.parent, dtype=dtype)
        if not (path / "config.json").is_file():
            raise InputError(f"{str(path)!r} has no config.json: not a Hugging Face checkpoint directory")
        return _load_checkpoint(path, task, dtype)
    zoo = available_models()
    if str(name_or_path) in zoo:
        return load_model(str(name_or_path), directory=ZOO_DIR, dtype=dtype)
    looks_like_path = os.sep in str(name_or_path) or str(name_or_path).startswith((".", "~"))
    what = "no such file or directory" if looks_like_path else "not a zoo model and no such path"
    raise InputError(f"{str(name_or_path)!r}: {what} (zoo models: {', '.join(zoo)})")


def _load_checkpoint(path: Path, task: str | None, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    except ImportError as error:  # pragma: no cover - transformers is installed in the tests
        raise InputError('loading a checkpoint needs transformers: pip install "mambalrp[transformers]"') from error

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{str(path)!r}: cannot read its config.json ({_first_line(error)})") from error
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{str(path)!r}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)})")
    if task is None:
        archs = getattr(config, "architectures", None) or []
        task = "sequence-classification" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal-lm"
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    try:
        model = auto.from_pretrained(str(path), config=config, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{str(path)!r}: cannot load a {task} model ({_first_line(error)})") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{str(path)!r}: no usable tokenizer ({_first_line(error)})") from error
    return model.to(dtype).eval(), tokenizer


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def encode(tokenizer: Any, text: str, *, special_tokens: bool = True) -> list[int]:
    """Return the token ids of ``text`` (no padding).

    Args:
        tokenizer: A ``tokenizers.Tokenizer`` or a ``transformers`` tokenizer.
        text: The text; must contain something besides whitespace.
        special_tokens: Add the special tokens the tokenizer adds to a text (e.g. a BOS token);
            ``False`` for a continuation of a prompt.

    Returns:
        The ids.

    Raises:
        InputError: ``text`` is empty, or it encodes to no tokens.
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError("the text is empty")
    if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "id_to_token"):  # tokenizers.Tokenizer
        ids = list(tokenizer.encode(text, add_special_tokens=special_tokens).ids)
    else:
        ids = list(tokenizer(text, add_special_tokens=special_tokens)["input_ids"])
    if not ids:
        raise InputError(f"the text {text!r} encodes to no tokens")
    return [int(i) for i in ids]


def decode(tokenizer: Any, ids) -> str:
    """Return the text of ``ids`` (special tokens kept).

    Args:
        tokenizer: A ``tokenizers.Tokenizer`` or a ``transformers`` tokenizer.
        ids: A sequence or 1-D tensor of ids.

    Returns:
        The decoded text.
    """
    ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    if hasattr(tokenizer, "id_to_token"):
        return tokenizer.decode(ids, skip_special_tokens=False)
    return tokenizer.decode(ids)
